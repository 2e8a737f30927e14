"""Reading JSON, torch and safetensors files: every way a file can be bad is one error naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.files.reading import (
    load_safetensors_file,
    load_state_dict_file,
    load_tensor_file,
    read_json,
    read_json_object,
    read_npy,
)


class Strange:
    pass


def test_json_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text('{"a": 1, "b": [2]}')
    assert read_json(good) == {"a": 1, "b": [2]}
    assert read_json_object(good, ("a", "b")) == {"a": 1, "b": [2]}
    cases = {
        "no such file": None,
        r"not valid JSON \(line 1, column 15: Expecting value\)": b'{"a": 1, "b": }',
        "not UTF-8 text": b'{"a": "\xff"}',
        r"not a stage manifest \(a JSON list, expected an object\)": b"[1, 2]",
        r"not a complete stage manifest \(no b\)": b'{"a": 1}',
    }
    for message, payload in cases.items():
        path = tmp_path / "bad.json"
        path.unlink(missing_ok=True)
        if payload is not None:
            path.write_bytes(payload)
        with pytest.raises(LookupError, match=rf"^{path}: {message}"):
            read_json_object(path, ("a", "b"), LookupError, "stage manifest")


def test_tensor_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(1000.0)}, path)
    assert torch.equal(load_tensor_file(path)["w"], torch.arange(1000.0))
    whole = path.read_bytes()
    cases = {
        "truncated or damaged PyTorch file": whole[: len(whole) // 2],
        "not a weights-only PyTorch file": b"garbage" * 20,
    }
    for message, payload in cases.items():
        path.write_bytes(payload)
        with pytest.raises(KeyError, match=message) as info:
            load_tensor_file(path, KeyError)
        assert str(path) in str(info.value) and "weights_only=False" not in str(info.value)  # no unsafe advice
    torch.save({"w": Strange()}, path)  # arbitrary objects are refused, not run
    with pytest.raises(ValueError, match="not a weights-only PyTorch file"):
        load_tensor_file(path)
    with pytest.raises(ValueError, match="no such file"):
        load_tensor_file(tmp_path / "none.pt")


def test_safetensors_errors_name_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(3, 4)}, str(path))
    assert torch.equal(load_safetensors_file(path)["w"], torch.ones(3, 4))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"^{path}: truncated or damaged safetensors file"):
        load_safetensors_file(path)
    with pytest.raises(ValueError, match="no such file"):
        load_safetensors_file(tmp_path / "none.safetensors")


def test_a_state_dict_file_holds_only_tensors(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(load_state_dict_file(path)["w"], torch.ones(2))
    for payload in ({"w": torch.ones(2), "step": 3}, [torch.ones(2)]):
        torch.save(payload, path)
        with pytest.raises(KeyError, match=r"model\.pt: not a state dict \(a mapping of names to tensors\)"):
            load_state_dict_file(path, KeyError)


def test_npy_bytes_are_read_or_named() -> None:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.arange(5))
    assert np.array_equal(read_npy(buffer.getvalue(), "x"), np.arange(5))
    with pytest.raises(KeyError, match=r"member a: not a \.npy array"):
        read_npy(b"\x80\x04 a pickle", "member a", KeyError)
    with pytest.raises(ValueError, match=r"^member b: we only support format version"):
        read_npy(b"\x93NUMPY garbage", "member b")

"""The one state-dict comparison: missing, unexpected and re-shaped tensors, in order, and the transformer wording."""

from __future__ import annotations

import torch

from model.files.state_dicts import compare_state_dicts, first_names, model_mismatch


def test_a_fitting_state_dict_has_no_difference() -> None:
    expected = {"a.weight": torch.zeros(2, 3), "b": (4,)}  # tensors or shapes
    diff = compare_state_dicts(expected, {"b": torch.zeros(4), "a.weight": torch.ones(2, 3)})
    assert not diff and (diff.missing, diff.unexpected, diff.mismatched) == ([], [], [])


def test_every_difference_is_named_in_order() -> None:
    expected = {"z": (1,), "a": (2, 2), "m": (3,), "k": (5,)}
    found = {"m": torch.zeros(4), "extra.2": torch.zeros(1), "extra.1": torch.zeros(1), "k": torch.zeros(6)}
    diff = compare_state_dicts(expected, found)
    assert diff
    assert diff.missing == ["z", "a"]  # the expected order
    assert diff.unexpected == ["extra.2", "extra.1"]  # the state's order
    assert diff.mismatched == [("m", (3,), (4,)), ("k", (5,), (6,))]


def test_ignored_prefixes_are_left_out() -> None:
    diff = compare_state_dicts({"a": (1,)}, {"a": torch.zeros(1), "loss.w": torch.zeros(9)}, ("loss.",))
    assert not diff


def test_model_mismatch_wording() -> None:
    expected = {f"layers.{i}.w": (2,) for i in range(10)}
    missing = model_mismatch(expected, {"other": torch.zeros(1)})
    assert missing == (
        "state dict does not match the model: missing ['layers.0.w', 'layers.1.w', 'layers.2.w', 'layers.3.w', "
        "'layers.4.w', 'layers.5.w', 'layers.6.w', 'layers.7.w', '... 2 more'], unexpected ['other']"
    )
    shapes = model_mismatch({"a": (2, 3), "b": (4,)}, {"a": torch.zeros(3, 2), "b": torch.zeros(5)})
    assert shapes == "tensor a: checkpoint shape (3, 2) != model shape (2, 3)"  # the first one only
    assert model_mismatch({"a": (1,)}, {"a": torch.zeros(1)}) is None
    assert first_names(["x"] * 3, most=2) == ["x", "x", "... 1 more"]

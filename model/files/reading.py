"""Reading the small JSON, tensor and .npy files of checkpoints, conversions and stages, with errors that name the
file and say what is wrong with it (missing, truncated, not JSON, not a weights-only torch file), in one line."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch


def first_line(err: BaseException) -> str:
    """An exception's first line (its type's name when it has no message): libraries add paragraphs of advice."""
    return (str(err).splitlines() or [type(err).__name__])[0]


def read_npy(data: bytes, where: str, error: type[Exception] = ValueError) -> np.ndarray:
    """The array in a .npy file's bytes; anything else raises `error` naming `where`. (np.load would take non-.npy
    bytes for a pickle and advise loading them unsafely.)"""
    if data[:6] != b"\x93NUMPY":
        raise error(f"{where}: not a .npy array")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise error(f"{where}: {first_line(err)}") from None


def read_json(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """The JSON value in `path` (a local path, or a store URL); a missing, unreadable, non-UTF-8 or malformed file
    raises `error` naming it."""
    from model.files import storage

    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except OSError as err:
        raise error(f"{path}: cannot read it ({err.strerror or err})") from None


def read_json_object(
    path: str | Path, required: tuple[str, ...], error: type[Exception] = ValueError, what: str = "file"
) -> dict[str, Any]:
    """`read_json` of a file that must hold an object with the `required` keys; `what` names the kind of file."""
    data = read_json(path, error)
    if not isinstance(data, dict):
        raise error(f"{path}: not a {what} (a JSON {type(data).__name__}, expected an object)")
    missing = [key for key in required if key not in data]
    if missing:
        raise error(f"{path}: not a complete {what} (no {', '.join(missing)})")
    return data


def load_tensor_file(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; a missing, truncated or damaged file, or one holding objects
    other than tensors and plain containers, raises `error` naming it."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which runs arbitrary code from the file: not for a damaged
        # or foreign one.
        raise error(f"{path}: not a weights-only PyTorch file (damaged, or holding arbitrary objects)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        reason = first_line(err).split(". ")[0]  # torch's first line goes on with advice too
        raise error(f"{path}: truncated or damaged PyTorch file ({reason})") from None


def load_state_dict_file(path: str | Path, error: type[Exception] = ValueError) -> dict[str, torch.Tensor]:
    """`load_tensor_file` of a file that must hold a state dict (a mapping of names to tensors)."""
    state = load_tensor_file(path, error)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def load_safetensors_file(path: str | Path, error: type[Exception] = ValueError) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file; a missing, truncated or damaged file raises `error` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise error(f"{path}: truncated or damaged safetensors file ({first_line(err)})") from None

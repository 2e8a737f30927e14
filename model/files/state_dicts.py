"""Comparing a state dict with the tensors a model expects: the one check behind every loader of weights (training
checkpoints, `cham convert`, VQGAN checkpoints). Each caller words its own error from the comparison."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Shape = tuple[int, ...]


@dataclass(frozen=True)
class StateDictDiff:
    """How a state dict differs from what a model expects: names missing (in the expected order), names unexpected
    (in the state's order), and (name, expected shape, found shape) of tensors present in both with other shapes."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def shape_of(value: Any) -> Shape:
    """The shape of a tensor (or of anything with `.shape`), or a shape given as a sequence of ints."""
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def compare_state_dicts(
    expected: Mapping[str, Any], found: Mapping[str, Any], ignore_prefixes: tuple[str, ...] = ()
) -> StateDictDiff:
    """Compare `found` (name -> tensor) with `expected` (name -> tensor or shape); names of `found` starting with one
    of `ignore_prefixes` are left out. Empty (falsy) when every name and shape fits."""
    found = {k: v for k, v in found.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else found
    return StateDictDiff(
        missing=[k for k in expected if k not in found],
        unexpected=[k for k in found if k not in expected],
        mismatched=[
            (k, shape_of(v), shape_of(found[k]))
            for k, v in expected.items()
            if k in found and shape_of(found[k]) != shape_of(v)
        ],
    )


def model_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str | None:
    """Why `found` does not fit a transformer of `expected` names and shapes (the checkpoint and conversion
    wording): the names missing and unexpected, else the first tensor of another shape with both shapes; or None."""
    diff = compare_state_dicts(expected, found)
    if diff.missing or diff.unexpected:
        return (
            f"state dict does not match the model: missing {first_names(sorted(diff.missing))}, "
            f"unexpected {first_names(sorted(diff.unexpected))}"
        )
    if diff.mismatched:
        name, want, got = diff.mismatched[0]
        return f"tensor {name}: checkpoint shape {got} != model shape {want}"
    return None


def first_names(names: list[str], most: int = 8) -> list[str]:
    """The first `most` names, and '... N more' for the rest (an error line stays one line)."""
    return names[:most] + ([f"... {len(names) - most} more"] if len(names) > most else [])

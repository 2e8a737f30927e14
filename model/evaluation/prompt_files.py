"""Writing prompt files: the kept set of filtering and the augmented baseline's prompts, in `read_prompts`' format."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from model.files.atomic import write_atomic
from schemas.eval_prompts import EvalPrompt


def prompt_line(prompt: EvalPrompt, folder: Path) -> str:
    """One prompt as a JSON line, its image paths relative to `folder` (where the file goes), unset fields left out."""
    images = [Path(os.path.relpath(Path(p).resolve(), folder.resolve())).as_posix() for p in prompt.images]
    record = prompt.model_dump(exclude_none=True) | {"images": images}
    return json.dumps(record, ensure_ascii=False)


def write_prompts(prompts: Sequence[EvalPrompt], path: str | Path) -> Path:
    """Write `prompts` (image paths absolute, as `read_prompts` returns them) as a prompt file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(prompt_line(p, path.parent) + "\n" for p in prompts))
    return path

"""What every config shares: strict keys, path checks, YAML loading and one clear error per bad file.

Relative paths in a config are resolved against the working directory, as with most ML tools; pass
`base_dir` to `load_config` to resolve them elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, ValidationInfo
from pydantic.functional_validators import AfterValidator

from schemas.source_files import pattern_files, unique_files


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, each bad field and what is allowed."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(f"{source}: {len(problems)} problems\n" + "\n".join(f"  - {p}" for p in problems))


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors (listing the allowed keys); instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def fingerprint(self) -> str:
        """A short, stable hash of the validated config, for manifests and resume checks."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir") or Path.cwd())


def _checking_paths(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("check_paths", True))


def resolve_path(value: str | Path, info: ValidationInfo) -> Path:
    """Expand `~` and make `value` absolute against the config's base directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (_base_dir(info) / path).resolve()


def _existing_path(value: Path, info: ValidationInfo) -> Path:
    path = resolve_path(value, info)
    if _checking_paths(info) and not path.exists():
        raise ValueError(f"path does not exist: {path}")
    return path


def _any_path(value: Path, info: ValidationInfo) -> Path:
    return resolve_path(value, info)


def expand_paths(patterns: list[str] | tuple[str, ...]) -> list[Path]:
    """Files named by paths, folders (every file below) and globs (`**` allowed), each once by its real path.

    Links are followed but a folder is walked once (a link loop under `**` ends), and a dangling link is listed so
    the reader counts it as unreadable. A pattern that matches nothing raises FileNotFoundError naming it.
    """
    files: list[Path] = []
    for pattern in map(str, patterns):
        matches = pattern_files(pattern)
        if not matches and not Path(pattern).is_dir():  # an empty folder exists: its callers say "no images" etc.
            raise FileNotFoundError(f"input not found: {pattern}")
        files += matches
    return unique_files(files)


ExistingPath = Annotated[Path, AfterValidator(_existing_path)]
"""A file or directory that must exist when the config is loaded."""

_STORE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _existing_location(value: Any, info: ValidationInfo) -> Path | str:
    text = str(value) if isinstance(value, (str, Path)) else value
    if isinstance(text, str) and _STORE_URL.match(text) and not text.startswith("file://"):
        return text  # an object store's URL: checked when the job opens it (it needs credentials and the network)
    if isinstance(text, str):
        return _existing_path(Path(text.removeprefix("file://")), info)
    raise ValueError(f"expected a path or a URL, got {type(value).__name__}")


def _output_location(value: Any, info: ValidationInfo) -> Path | str:
    text = str(value) if isinstance(value, (str, Path)) else value
    if isinstance(text, str) and _STORE_URL.match(text) and not text.startswith("file://"):
        return text.rstrip("/")
    if isinstance(text, str):
        return _any_path(Path(text.removeprefix("file://")), info)
    raise ValueError(f"expected a path or a URL, got {type(value).__name__}")


# A plain validator decides Path (local) or str (URL) by itself: a union validated after it would turn one into the
# other (JSON input has no Path type); the forms' schema (Prefect's UI) shows a string.
ExistingLocation = Annotated[Path | str, PlainValidator(_existing_location, json_schema_input_type=str)]
"""A local file or directory that must exist (a Path), or an object-store URL such as s3://bucket/stage (a str)."""
OutputLocation = Annotated[Path | str, PlainValidator(_output_location, json_schema_input_type=str)]
"""A local path a job will create (made absolute), or an object-store URL (a str)."""
OutputPath = Annotated[Path, AfterValidator(_any_path)]
"""A path the job will create; made absolute, not checked."""


def format_location(loc: tuple[int | str, ...]) -> str:
    """('stages', 'stage1', 'sources', 0, 'weight') -> 'stages.stage1.sources[0].weight'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The config class that holds the value at `loc` (walking fields, lists, dicts and optionals)."""
    todo: list[Any] = [root]
    for part in loc:
        current = todo.pop()
        while get_origin(current) in (Annotated, Union, types.UnionType):
            args = [a for a in get_args(current) if a is not type(None)]
            current = args[0]
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            todo.append(field.annotation)
        elif get_origin(current) in (list, tuple, dict):
            todo.append(get_args(current)[-1])
        else:
            return None
    current = todo.pop()
    while get_origin(current) in (Annotated, Union, types.UnionType):
        current = next(a for a in get_args(current) if a is not type(None))
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _describe(error: dict[str, Any], root: type[BaseModel]) -> str:
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    field = format_location(tuple(error["loc"]))
    if error["type"] == "extra_forbidden":
        holder = _model_at(root, tuple(error["loc"][:-1]))
        allowed = ", ".join(holder.model_fields) if holder else "see the docs"
        return f"{field}: unknown key; allowed keys here: {allowed}"
    value = error.get("input")
    if error["type"] not in {"missing", "value_error", "assertion_error"} and isinstance(
        value, str | int | float | bool
    ):
        message += f" (got {value!r})"
    return f"{field}: {message}" if field else message


M = TypeVar("M", bound=BaseModel)


def validate_config(
    cls: type[M], data: Any, source: str = "<config>", base_dir: Path | None = None, check_paths: bool = True
) -> M:
    """Validate a mapping as `cls`; raise ConfigError naming `source`, each bad field and what is allowed."""
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping of keys to values at the top level, got {type(data).__name__}"])
    try:
        return cls.model_validate(data, context={"base_dir": base_dir, "check_paths": check_paths})
    except ValidationError as err:
        raise ConfigError(source, [_describe(e, cls) for e in err.errors()]) from None


def load_config(cls: type[M], path: str | Path, base_dir: Path | None = None, check_paths: bool = True) -> M:
    """Read a YAML file and validate it as `cls` (a clear ConfigError on any problem)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(str(path), ["a folder, not a config file"])
    if not path.is_file():
        raise ConfigError(str(path), ["file not found"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(path), [f"{where}not valid YAML ({getattr(err, 'problem', err)})"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), [f"not UTF-8 text ({err.reason} at byte {err.start})"]) from None
    except RecursionError:
        raise ConfigError(str(path), ["nested too deeply to be a config"]) from None
    if data is None:  # an empty file: fine only where every field has a default
        try:
            return validate_config(cls, {}, str(path), base_dir, check_paths)
        except ConfigError:
            raise ConfigError(str(path), ["the file is empty"]) from None
    return validate_config(cls, data, str(path), base_dir, check_paths)


def dump_config(config: BaseModel, path: str | Path) -> Path:
    """Write a validated config back to YAML (paths as strings), e.g. into a run's output directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return path

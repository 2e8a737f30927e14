"""Every setting of a prepare config is accounted for: it changes the fingerprint of the shards it shapes (so a
changed setting redoes them) or is declared not to (schemas.prepare_config.NOT_IN_SHARDS); a new field fails here
until it is given a changed value below and its answer is checked."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from pipelines.prepare_job import settings_for, source_fingerprint, write_manifest
from pipelines.prepare_record import PrepareSettings
from schemas import PrepareConfig, validate_config
from schemas.download_config import DownloadConfig
from schemas.prepare_config import FINGERPRINTED_APART, NOT_IN_SHARDS, OPTIONS_BY_KIND, SourceConfig

TOKENIZER_FPS = {"text": "t" * 16, "image": "i" * 16}
SOURCES = [
    {"name": "prose", "kind": "text", "format": "jsonl", "paths": ["/raw/prose.jsonl"], "options": {"min_chars": 20}},
    {"name": "photos", "kind": "image_text", "format": "webdataset", "paths": ["/raw/photos"]},
    {"name": "docs", "kind": "interleaved", "format": "parquet", "paths": ["/raw/obelics"]},
    {"name": "chat", "kind": "sft", "format": "jsonl", "paths": ["/raw/sft.jsonl"], "options": {"max_tokens": 900}},
]

# Per PrepareConfig field: a changed value, and whether it changes every source's fingerprint.
CONFIG_CHANGES: dict[str, tuple[Any, bool]] = {
    "sources": ([*SOURCES, {"name": "more", "kind": "text", "format": "jsonl", "paths": ["/raw/more"]}], False),
    "output_dir": ("/elsewhere", False),
    "tokenizers": ({"text": "/moved/text", "image": "/moved/image"}, False),  # their content's fingerprints count
    "image_size": (256, True),
    "samples_per_shard": (7, True),
    "detect_faces": (False, True),
    "fast_image_decode": (False, True),
    "write_images": (True, True),
    "caption_first_ratio": (0.25, True),
    "runner": ({"kind": "local", "workers": 2}, False),
    "download": ({"cache_dir": "/cache"}, True),
    "dedup": ({"jaccard": 0.7}, False),  # only sources with dedup on use the thresholds (tests/pipelines/test_dedup.py)
}
# Per SourceConfig field: a changed value for this source; each changes its fingerprint and no other source's.
NOTES = {
    "name": "notes",
    "kind": "text",
    "format": "jsonl",
    "paths": ["/raw/notes.jsonl"],
    "options": {"max_chars": 900},
}
SOURCE_CHANGES: dict[str, Any] = {
    "name": "notes2",
    "kind": "sft",
    "format": "parquet",
    "paths": ["/raw/other.jsonl"],
    "options": {"max_chars": 901},
    "dedup": "exact",
}
# Per source option of any kind: a value other than its default; each changes its source's fingerprint.
OPTION_CHANGES: dict[str, Any] = {
    "max_tokens": 99,
    "max_record_bytes": 4096,
    "max_chars": 500,
    "min_chars": 5,
    "max_pixels": 1_000_000,
    "min_side": 8,
    "text_field": "body",
    "image_field": "picture",
    "images_dir": "/raw/images",
    "text_separator": " | ",
    "attributes": ["aesthetic"],
}
# Per DownloadConfig field, with downloads on: a changed value, and whether it changes which images a record keeps
# (DownloadConfig.outcome_fingerprint); where and how fast images are fetched does not.
DOWNLOAD_CHANGES: dict[str, tuple[Any, bool]] = {
    "cache_dir": ("/other-cache", False),
    "concurrency": (32, False),
    "per_host": (8, False),
    "connect_timeout_s": (1.0, False),
    "read_timeout_s": (1.0, False),
    "total_timeout_s": (1.0, False),
    "retries": (5, False),
    "backoff_s": (0.1, False),
    "max_backoff_s": (1.0, False),
    "max_bytes": (1 << 20, True),
    "max_redirects": (1, False),
    "allow_private_addresses": (True, True),
    "user_agent": ("someone else", False),
    "disallowed_header_directives": (["noai"], True),
    "failed_image": ("reject", True),
}


def make_config(**overrides: Any) -> PrepareConfig:
    data = {"output_dir": "/out", "tokenizers": {"text": "/tok/text", "image": "/tok/image"}, "sources": SOURCES}
    return validate_config(PrepareConfig, data | overrides, check_paths=False)


def fingerprints(config: PrepareConfig, tokenizer_fps: dict[str, str] = TOKENIZER_FPS) -> dict[str, str]:
    return {s.name: source_fingerprint(config, s, tokenizer_fps) for s in config.sources if s.name != "more"}


def test_every_config_field_is_accounted_for() -> None:
    """A field added to PrepareConfig, SourceConfig, a source's options or DownloadConfig needs a row above."""
    assert set(CONFIG_CHANGES) == set(PrepareConfig.model_fields)
    assert set(SOURCE_CHANGES) == set(SourceConfig.model_fields)
    assert set(OPTION_CHANGES) == {name for cls in OPTIONS_BY_KIND.values() for name in cls.model_fields}
    assert set(DOWNLOAD_CHANGES) == set(DownloadConfig.model_fields)
    # Each PrepareConfig field is fingerprinted as a shard setting, apart, or declared not to shape shards.
    settings, apart, excluded = set(make_config().shard_settings()), set(FINGERPRINTED_APART), set(NOT_IN_SHARDS)
    assert settings | apart | excluded == set(PrepareConfig.model_fields)
    assert not (settings & apart or settings & excluded or apart & excluded)
    # What the table says leaves fingerprints alone is what the declarations say.
    unchanged = {f for f, (_, changes) in CONFIG_CHANGES.items() if not changes}
    assert unchanged == excluded | {"sources", "tokenizers", "dedup"}


@pytest.mark.parametrize("field", list(CONFIG_CHANGES))
def test_a_changed_config_setting_changes_the_fingerprint_unless_declared_not_to(field: str) -> None:
    value, changes = CONFIG_CHANGES[field]
    before, after = fingerprints(make_config()), fingerprints(make_config(**{field: value}))
    for name in before:
        assert (after[name] != before[name]) == changes, f"{field} of source {name}"


def test_the_tokenizers_count_by_their_fingerprints() -> None:
    config = make_config()
    before = fingerprints(config)
    for which in TOKENIZER_FPS:
        after = fingerprints(config, TOKENIZER_FPS | {which: "x" * 16})
        assert all(after[name] != before[name] for name in before), which


@pytest.mark.parametrize("field", list(SOURCE_CHANGES))
def test_a_changed_source_field_changes_its_fingerprint(field: str) -> None:
    before = fingerprints(make_config(sources=[*SOURCES, NOTES]))
    changed = {**NOTES, field: SOURCE_CHANGES[field]}
    after = fingerprints(make_config(sources=[*SOURCES, changed]))
    assert after[changed["name"]] != before["notes"]
    assert all(after[s["name"]] == before[s["name"]] for s in SOURCES)  # the others are left alone


@pytest.mark.parametrize(
    ("kind", "option"), [(kind, option) for kind, cls in OPTIONS_BY_KIND.items() for option in cls.model_fields]
)
def test_a_changed_source_option_changes_its_fingerprint_and_reaches_the_records(kind: str, option: str) -> None:
    fmt = "jsonl"  # every kind reads jsonl but image_text; MMC4 jsonl is the one format with images_dir
    if kind == "image_text":
        fmt = "webdataset"
    source = {"name": "s", "kind": kind, "format": fmt, "paths": ["/raw/s"]}
    plain = make_config(sources=[source])
    changed = make_config(sources=[{**source, "options": {option: OPTION_CHANGES[option]}}])
    assert fingerprints(changed) != fingerprints(plain)
    if option in {f.name for f in fields(PrepareSettings)}:  # a per-record setting: the records see it
        assert getattr(settings_for(changed, changed.sources[0]), option) == OPTION_CHANGES[option]


@pytest.mark.parametrize("field", list(DOWNLOAD_CHANGES))
def test_a_changed_download_setting_changes_the_fingerprint_when_it_decides_outcomes(field: str) -> None:
    value, changes = DOWNLOAD_CHANGES[field]
    base = {"cache_dir": "/cache"}
    before = fingerprints(make_config(download=base))
    after = fingerprints(make_config(download=base | {field: value}))
    assert all((after[name] != before[name]) == changes for name in before), field


def test_every_per_record_setting_comes_from_the_config_or_a_source_option() -> None:
    job = set(make_config().shard_settings())
    options = {name for cls in OPTIONS_BY_KIND.values() for name in cls.model_fields}
    for f in fields(PrepareSettings):
        assert f.name in job | options, f"PrepareSettings.{f.name} is neither a shard setting nor a source option"
        if f.name in job:  # its default is the config's
            assert f.default == PrepareConfig.model_fields[f.name].default, f.name


@pytest.mark.parametrize("field", [f for f, (_, changes) in CONFIG_CHANGES.items() if changes and f != "download"])
def test_a_changed_job_setting_reaches_the_records(field: str) -> None:
    config = make_config(**{field: CONFIG_CHANGES[field][0]})
    if field in {f.name for f in fields(PrepareSettings)}:
        for source in config.sources:
            assert getattr(settings_for(config, source), field) == CONFIG_CHANGES[field][0]
    else:  # it shapes shards, not records (samples_per_shard: the read tasks)
        assert field == "samples_per_shard"


def test_settings_for_keeps_the_steps_defaults_for_options_not_set() -> None:
    config = make_config()
    prose, photos, docs, chat = (settings_for(config, s) for s in config.sources)
    assert prose == PrepareSettings(min_chars=20)
    assert photos == PrepareSettings()
    assert docs == PrepareSettings(text_separator="\n\n")  # OBELICS parquet: a blank line between texts
    assert chat == PrepareSettings(max_tokens=900)


def test_fingerprints_are_the_ones_existing_shards_hold() -> None:
    """Computed before the settings were derived from the config: deriving them redoes no existing shard."""
    assert fingerprints(make_config()) == {
        "prose": "4c7b2cbf3bebd1ff",
        "photos": "255457030f693896",
        "docs": "ae24c2746dfc48e2",
        "chat": "e7c45dcef4810b56",
    }
    changed = make_config(image_size=256, samples_per_shard=7, caption_first_ratio=0.0, write_images=True)
    assert fingerprints(changed) == {
        "prose": "414deb8cf98c9a79",
        "photos": "5c4b50aad42e5268",
        "docs": "b706a443973a228e",
        "chat": "7e07bd720e599db8",
    }
    assert fingerprints(make_config(download={"cache_dir": "/cache"})) == {
        "prose": "6ff3d1055635edd8",
        "photos": "5a1866846e877f39",
        "docs": "34070b89a0df8fdd",
        "chat": "8020aba5e16d853a",
    }


def test_the_manifest_records_the_source_and_every_shard_setting(tmp_path: Path) -> None:
    config = make_config(output_dir=str(tmp_path), image_size=256)
    source = config.sources[0]
    manifest = write_manifest(config, source, {"fingerprint": "f", "tasks": []}, TOKENIZER_FPS)
    assert manifest["config"] == {
        "source": source.model_dump(mode="json"),
        "image_size": 256,
        "samples_per_shard": 1000,
        "detect_faces": True,
        "fast_image_decode": True,
        "write_images": False,
        "caption_first_ratio": 0.5,
    }
    assert json.loads((tmp_path / "prose" / "manifest.json").read_text()) == manifest
    assert not list((tmp_path / "prose").glob(".*"))  # written atomically: no temporary left

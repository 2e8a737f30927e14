"""Mixture filters: the tiny parser (no eval), and MixtureSpec refusing bad filters and stages with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from schemas import ConfigError, MixtureSpec, validate_config
from schemas.sample_filters import FilterError, parse_filter
from tests.conftest import EXAMPLES


@pytest.mark.parametrize(
    ("text", "attribute", "conditions"),
    [
        ("aesthetic >= 6", "aesthetic", ((">=", 6.0),)),
        ("aesthetic>6", "aesthetic", ((">", 6.0),)),
        ("6 < aesthetic", "aesthetic", ((">", 6.0),)),  # seen from the attribute's side
        ("0.9 <= aspect <= 1.1", "aspect", ((">=", 0.9), ("<=", 1.1))),
        ("1.1 > aspect > 0.9", "aspect", (("<", 1.1), (">", 0.9))),
        ("has_face == 1", "has_face", (("==", 1.0),)),
        ("n_tokens < 2e3", "n_tokens", (("<", 2000.0),)),
        ("clip_score >= -0.5", "clip_score", ((">=", -0.5),)),
        ("language == en", "language", (("==", "en"),)),
        ("language != 'de'", "language", (("!=", "de"),)),
    ],
)
def test_filters_parse(text: str, attribute: str, conditions: tuple) -> None:
    parsed = parse_filter(text)
    assert (parsed.attribute, parsed.conditions, parsed.text) == (attribute, conditions, text)


def test_a_filter_accepts_by_its_conditions_and_never_a_missing_value() -> None:
    square = parse_filter("0.9 <= aspect <= 1.1")
    assert [square.accepts(v) for v in (0.9, 1.0, 1.1, 0.89, 1.2, None)] == [True, True, True, False, False, False]
    assert parse_filter("language == en").accepts("en") and not parse_filter("language == en").accepts("de")
    assert not parse_filter("language != en").accepts(None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("aesthetic", "expected ATTRIBUTE OP NUMBER"),
        ("aesthetic >= high", "expected ATTRIBUTE OP NUMBER"),
        ("aesthetic = 6", "cannot read '= 6'"),
        ("aesthetic >= 6 and aspect < 2", "expected ATTRIBUTE OP NUMBER"),
        ("__import__('os').system('x')", "cannot read"),
        ("0.9 <= aspect >= 1.1", "both operators < / <= or both > / >="),
        ("1 <= 2", "expected ATTRIBUTE OP NUMBER"),
        ("language > en", "only language compares with a word"),
        ("language >= 3", "language is a word"),
        ("aesthetic == good", "expected ATTRIBUTE OP NUMBER"),
        ("   ", "non-empty string"),
    ],
)
def test_bad_filters_are_refused_saying_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(FilterError, match=None) as info:
        parse_filter(text)
    assert message in str(info.value)


def spec(tmp_path: Path, filters: list[str] | None = None, **stage2) -> dict:
    source = {"name": "photos", "path": str(tmp_path), "weight": 1.0}
    return {
        "seq_len": 256,
        "tokens_per_image": 64,
        "stages": {
            "stage1": {"tokens": 1000, "sources": [source | ({"filters": filters} if filters is not None else {})]},
            "stage2": {"tokens": 500, "sources": [source]} | stage2,
        },
    }


def test_the_spec_refuses_bad_filters_naming_where(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(MixtureSpec, spec(tmp_path, ["aesthetic >= 6", "aspect >> 1"]))
    assert "stages.stage1.sources[0].filters: filter 'aspect >> 1': expected ATTRIBUTE OP NUMBER" in str(info.value)


def test_the_spec_refuses_attributes_the_prepared_source_lacks_naming_those_it_has(tmp_path: Path) -> None:
    manifest = {"config": {"source": {"name": "photos", "options": {"attributes": ["clip_score"]}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as info:
        validate_config(MixtureSpec, spec(tmp_path, ["aesthetic >= 6"]))
    message = str(info.value)
    assert "filter 'aesthetic >= 6' names attribute 'aesthetic', which the source's samples do not have" in message
    assert "its attributes: n_tokens, n_images, has_face, face_count, width, height, aspect" in message
    assert message.rstrip().split("its attributes: ")[1].startswith("n_tokens") and "clip_score" in message
    validate_config(MixtureSpec, spec(tmp_path, ["clip_score >= 0.3", "0.9 <= aspect <= 1.1"]))  # these it has


def test_hold_modality_of_names_an_earlier_stage(tmp_path: Path) -> None:
    held = validate_config(MixtureSpec, spec(tmp_path, hold_modality_of="stage1"))
    assert held.stages["stage2"].hold_modality_of == "stage1"
    for wrong, says in (("stage2", "earlier stages: stage1"), ("stage3", "earlier stages: stage1")):
        with pytest.raises(ConfigError, match=f"hold_modality_of '{wrong}' must name an earlier stage; {says}"):
            validate_config(MixtureSpec, spec(tmp_path, hold_modality_of=wrong))


def test_new_fields_are_fingerprinted_only_when_set(tmp_path: Path) -> None:
    """Mixtures written before filters existed keep their fingerprints; filters and holding change them."""
    plain = validate_config(MixtureSpec, spec(tmp_path))
    dumped = json.dumps(plain.model_dump(mode="json"))
    assert "filters" not in dumped and "hold_modality_of" not in dumped
    fingerprints = {
        plain.fingerprint(),
        validate_config(MixtureSpec, spec(tmp_path, ["aesthetic >= 6"])).fingerprint(),
        validate_config(MixtureSpec, spec(tmp_path, ["aesthetic >= 6.5"])).fingerprint(),
        validate_config(MixtureSpec, spec(tmp_path, hold_modality_of="stage1")).fingerprint(),
    }
    assert len(fingerprints) == 4
    filtered = validate_config(MixtureSpec, spec(tmp_path, ["aesthetic >= 6"]))
    assert [s.filters for s in filtered.sources_of("stage1")] == [("aesthetic >= 6",)]


def test_the_image_generation_example_holds_the_papers_rule(example_base: Path) -> None:
    spec = validate_config(
        MixtureSpec,
        yaml.safe_load((EXAMPLES / "image_generation_sft.yaml").read_text()),
        base_dir=example_base,
        check_paths=False,
    )
    (source,) = spec.sources_of("image_generation")
    rule = [parse_filter(f) for f in source.filters]
    assert [(f.attribute, f.conditions) for f in rule] == [
        ("aesthetic", ((">=", 6.0),)),
        ("aspect", ((">=", 0.9), ("<=", 1.1))),
    ]

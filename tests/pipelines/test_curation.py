"""Curation attributes stored by prepare and filtered at mix time (real Beam, FnApiRunner, tiny data): attribute
values on the real sample images and on text, filters equal to filtering the inputs by hand, what each filter
removed, samples without the attribute excluded and counted; and stage 2 holding stage 1's text : image proportion."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from pipelines.mix_job import run_mix
from pipelines.mix_plan import MixPlanError, hold_image_share
from pipelines.mix_report import filter_rows, modality_rows
from pipelines.prepare_job import run_prepare
from pipelines.sample_attributes import language_of, metadata_attributes
from pipelines.shard_writer import read_shard
from schemas import ConfigError, MixtureSpec, PrepareConfig, validate_config

FILTERS = ["aesthetic >= 5", "aspect <= 1.4"]
NO_AESTHETIC = 2  # records (the first of each tar) written without an aesthetic value: excluded, counted as missing
TEXTS = [
    {"id": "en", "text": "The committee met on Tuesday to discuss the budget for the new library building."},
    {
        "id": "de",
        "text": "Der Ausschuss traf sich am Dienstag, um den Haushalt für das neue Bibliotheksgebäude zu besprechen.",
    },
]


def _samples(tar: Path) -> list[tuple[str, dict[str, bytes]]]:
    """The members of an img2dataset tar grouped by key, in order."""
    grouped: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as f:
        for member in f:
            key, ext = member.name.split(".", 1)
            grouped.setdefault(key, {})[ext] = f.extractfile(member).read()  # type: ignore[union-attr]
    return list(grouped.items())


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as sink:
        for key, members in samples:
            sink.write({"__key__": key, **members})


def _by_hand(meta: dict) -> bool:
    """FILTERS applied to a raw record's own metadata, as a user filtering the inputs would."""
    aesthetic = meta.get("aesthetic")
    return aesthetic is not None and aesthetic >= 5 and meta["width"] / meta["height"] <= 1.4


@pytest.fixture(scope="module")
def curated(tmp_path_factory, sample_data, tiny_tokenizers) -> dict:
    """The sample photos prepared twice: `full` (every record, aesthetic stored as an attribute) and `hand` (only
    the records FILTERS keep, selected by hand from the raw metadata); plus two texts for language ids."""
    base = tmp_path_factory.mktemp("curation")
    raw_meta = {}
    for n, tar in enumerate(sorted((sample_data[0] / "image_text").glob("*.tar"))):
        samples = _samples(tar)
        for i, (key, members) in enumerate(samples):
            meta = json.loads(members["json"])
            if i == 0:  # no aesthetic value in its metadata
                del meta["aesthetic"]
                members["json"] = json.dumps(meta).encode()
            raw_meta[key] = meta
        _write_tar(base / "full" / f"{n:05d}.tar", samples)
        _write_tar(base / "hand" / f"{n:05d}.tar", [s for s in samples if _by_hand(raw_meta[s[0]])])
    (base / "texts.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in TEXTS))
    out = base / "prepared"
    config = validate_config(
        PrepareConfig,
        {
            "output_dir": str(out),
            "image_size": 64,
            "samples_per_shard": 40,
            "caption_first_ratio": 1.0,  # the layout must not depend on the record ids, which differ by folder
            "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
            "sources": [
                {
                    "name": "full",
                    "kind": "image_text",
                    "format": "webdataset",
                    "paths": [str(base / "full")],
                    "options": {"attributes": ["aesthetic"]},
                },
                {"name": "hand", "kind": "image_text", "format": "webdataset", "paths": [str(base / "hand")]},
                {"name": "texts", "kind": "text", "format": "jsonl", "paths": [str(base / "texts.jsonl")]},
            ],
        },
    )
    run_prepare(config)
    return {"prepared": out, "raw_meta": raw_meta, "base": base}


def _attributes(folder: Path) -> dict[str, dict]:
    """Attribute rows of a prepared source by the raw record's key, with its caption."""
    rows = {}
    for table_path in sorted(folder.glob("shard-*.attributes.parquet")):
        attributes = {r["key"]: r for r in pq.read_table(table_path).to_pylist()}
        for sample in read_shard(folder / table_path.name.replace(".attributes.parquet", ".tar")):
            rows[sample["meta"]["record_id"].rsplit("/", 1)[1]] = attributes[sample["key"]] | {
                "n_tokens_meta": sample["meta"]["n_tokens"],
                "has_face_meta": sample["meta"]["has_face"],
            }
    return rows


def test_attributes_of_the_real_sample_images(curated, sample_data) -> None:
    rows = _attributes(curated["prepared"] / "full")
    assert len(rows) == 24
    by_caption = {}
    for key, meta in curated["raw_meta"].items():
        by_caption[meta["url"].rsplit("/", 1)[1]] = rows[key] | {"meta": meta}
    astronaut = by_caption["astronaut_eileen_collins.jpg"]
    assert (astronaut["width"], astronaut["height"], astronaut["aspect"]) == (512, 512, 1.0)
    assert astronaut["has_face"] == 1 and astronaut["face_count"] >= 1
    cat = by_caption["tabby_cat_chelsea.jpg"]
    assert (cat["width"], cat["height"], cat["has_face"], cat["face_count"]) == (451, 300, 0, 0)
    assert cat["aspect"] == pytest.approx(451 / 300)
    obama = by_caption["barack_obama_congress_address_2009.jpg"]
    assert (obama["width"], obama["height"]) == (334, 640) and obama["aspect"] == pytest.approx(334 / 640)
    for row in by_caption.values():
        meta = row["meta"]
        assert (row["width"], row["height"]) == (meta["width"], meta["height"])  # as read, before resize
        assert row["aesthetic"] == meta.get("aesthetic")  # None where the metadata has none
        assert row["text_length"] == len(meta["caption"]) and row["language"] == "en"
        assert row["n_tokens"] == row["n_tokens_meta"] and row["n_images"] == 1
        assert row["has_face"] == int(row["face_count"] > 0) == int(row["has_face_meta"])
    assert sum(row["aesthetic"] is None for row in rows.values()) == NO_AESTHETIC
    assert "aesthetic" not in pq.read_schema(next((curated["prepared"] / "hand").glob("*.attributes.parquet"))).names


def test_attributes_of_text(curated) -> None:
    rows = {
        r["text_length"]: r
        for r in pq.read_table(curated["prepared"] / "texts" / "shard-00000.attributes.parquet").to_pylist()
    }
    for text in TEXTS:
        row = rows[len(text["text"])]
        assert row["language"] == text["id"] and row["language_score"] > 0.5
        assert (row["width"], row["height"], row["aspect"], row["n_images"], row["has_face"]) == (
            None,
            None,
            None,
            0,
            0,
        )


def test_metadata_columns_and_language_without_a_model_download() -> None:
    row = {"aesthetic": "6.25", "json": {"clip_score": 0.31, "aesthetic": 1.0}, "metadata": '{"pwatermark": 0.1}'}
    assert metadata_attributes(row, ["aesthetic", "clip_score", "pwatermark", "absent"]) == {
        "aesthetic": 6.25,  # the column first, then the metadata objects
        "clip_score": 0.31,
        "pwatermark": 0.1,
        "absent": None,
    }
    assert metadata_attributes({"aesthetic": "n/a", "score": float("nan")}, ["aesthetic", "score"]) == {
        "aesthetic": None,
        "score": None,
    }
    assert language_of("12345 !!") == (None, None)
    assert language_of("Ceci est une phrase en français, écrite pour le test.")[0] == "fr"


def spec(curated: dict, source: str, filters: list[str] | None, tokens: int = 2000) -> MixtureSpec:
    photos = {"name": "photos", "path": str(curated["prepared"] / source), "weight": 1.0}
    if filters is not None:
        photos["filters"] = filters
    data = {
        "seq_len": 256,
        "tokens_per_image": 64,
        "seed": 5,
        "max_repetitions": 16,
        "stages": {"s": {"tokens": tokens, "sources": [photos]}},
    }
    return validate_config(MixtureSpec, data)


def _sequences(stage: Path) -> list[tuple[bytes, bytes]]:
    out = []
    for tar in sorted(stage.glob("shard-*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            out.append((sample["tokens.npy"], sample["docs.npy"]))
    return out


def test_filters_at_mix_time_equal_filtering_the_inputs_by_hand(curated, tmp_path: Path) -> None:
    filtered = run_mix(spec(curated, "full", FILTERS), tmp_path / "filtered")
    by_hand = run_mix(spec(curated, "hand", None), tmp_path / "by_hand")
    sequences = _sequences(tmp_path / "filtered" / "s")
    assert sequences and sequences == _sequences(tmp_path / "by_hand" / "s")  # the same sequences, token for token
    manifest = filtered["manifests"]["s"]
    assert manifest["tokens"] == by_hand["manifests"]["s"]["tokens"]
    assert (
        manifest["sources"]["photos"]["available_tokens"]
        == by_hand["manifests"]["s"]["sources"]["photos"]["available_tokens"]
    )
    # What each filter removed, in order, from the attributes as prepared.
    rows = _attributes(curated["prepared"] / "full")
    no_score = [r for r in rows.values() if r["aesthetic"] is None]
    low = [r for r in rows.values() if r["aesthetic"] is not None and r["aesthetic"] < 5]
    wide = [r for r in rows.values() if r["aesthetic"] is not None and r["aesthetic"] >= 5 and r["aspect"] > 1.4]
    assert manifest["filters"] == {
        "photos": [
            {
                "filter": "aesthetic >= 5",
                "removed_samples": len(no_score) + len(low),
                "removed_tokens": sum(r["n_tokens"] for r in no_score + low),
                "missing_samples": NO_AESTHETIC,
                "missing_tokens": sum(r["n_tokens"] for r in no_score),
            },
            {
                "filter": "aspect <= 1.4",
                "removed_samples": len(wide),
                "removed_tokens": sum(r["n_tokens"] for r in wide),
                "missing_samples": 0,
                "missing_tokens": 0,
            },
        ]
    }
    assert len(rows) - len(no_score) - len(low) - len(wide) == sum(_by_hand(m) for m in curated["raw_meta"].values())
    assert filter_rows(manifest)[0][:3] == ("photos", "aesthetic >= 5", f"{len(no_score) + len(low)}")


def test_a_new_threshold_is_a_re_mix_with_another_fingerprint(curated, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in (curated["prepared"] / "full").iterdir()}
    one = run_mix(spec(curated, "full", ["aesthetic >= 5"]), tmp_path / "a")
    two = run_mix(spec(curated, "full", ["aesthetic >= 6"]), tmp_path / "b")
    assert one["fingerprint"] != two["fingerprint"]
    assert (
        two["manifests"]["s"]["sources"]["photos"]["available_tokens"]
        < one["manifests"]["s"]["sources"]["photos"]["available_tokens"]
    )
    assert {p: p.stat().st_mtime_ns for p in (curated["prepared"] / "full").iterdir()} == before  # nothing re-prepared


def test_a_filter_on_an_attribute_the_source_lacks_fails_naming_those_it_has(curated, tmp_path: Path) -> None:
    says = "names attribute 'aesthetic', which the source's samples do not have; its attributes: n_tokens"
    with pytest.raises(ConfigError, match=says):  # the spec is checked against the prepared source's manifest
        spec(curated, "hand", ["aesthetic >= 5"])
    unchecked = validate_config(MixtureSpec, spec(curated, "hand", None).model_dump(mode="json"), check_paths=False)
    data = unchecked.model_dump(mode="json")
    data["stages"]["s"]["sources"][0]["filters"] = ["aesthetic >= 5"]
    with pytest.raises(MixPlanError, match=says):  # and again by the mix job
        run_mix(validate_config(MixtureSpec, data, check_paths=False), tmp_path / "x")


# --- stage 2's text : image proportion ---------------------------------------------------------------------------


def stages(prepared: Path, hold: bool) -> MixtureSpec:
    """Chameleon's two stages on the prepared sample: stage 2 adds code and instructions to half of stage 1."""
    stage1 = [
        {"name": "prose", "path": str(prepared / "prose"), "weight": 2.9},
        {"name": "photos", "path": str(prepared / "photos"), "weight": 1.5},
        {"name": "howto", "path": str(prepared / "howto"), "weight": 0.4},
    ]
    stage2 = {
        "tokens": 12_000,
        "inherit": {"stage": "stage1", "factor": 0.5},
        "sources": [
            {"name": "code", "path": str(prepared / "code"), "weight": 0.6},
            {"name": "instructions", "path": str(prepared / "instructions"), "weight": 0.6},
        ],
    } | ({"hold_modality_of": "stage1"} if hold else {})
    data = {
        "seq_len": 256,
        "tokens_per_image": 64,
        "seed": 3,
        "max_repetitions": 16,
        "stages": {"stage1": {"tokens": 40_000, "sources": stage1}, "stage2": stage2},
    }
    return validate_config(MixtureSpec, data)


HOLD_TOLERANCE = 0.005  # realized image share of stage 2 within half a percentage point of stage 1's


def test_stage2_holds_stage1s_text_image_proportion(prepared_sources: Path, tmp_path: Path) -> None:
    free = run_mix(stages(prepared_sources, hold=False), tmp_path / "free")["manifests"]
    held = run_mix(stages(prepared_sources, hold=True), tmp_path / "held")["manifests"]
    target = held["stage1"]["modality"]["image_share"]
    assert free["stage1"]["modality"] == held["stage1"]["modality"]  # holding changes stage 2 only
    assert abs(free["stage2"]["modality"]["image_share"] - target) > 4 * HOLD_TOLERANCE  # adding data moves it
    m = held["stage2"]["modality"]
    assert m["held_from"] == "stage1" and m["target_image_share"] == pytest.approx(target)
    assert abs(m["image_share"] - target) <= HOLD_TOLERANCE  # realized, counted in the written shards
    assert m["planned_image_share"] == pytest.approx(m["image_share"])
    # The weights moved, the data added is still there, and the given ones are reported beside them.
    sources = held["stage2"]["sources"]
    assert {n: s["given_weight"] for n, s in sources.items()} == {
        "prose": 1.45,
        "photos": 0.75,
        "howto": 0.2,
        "code": 0.6,
        "instructions": 0.6,
    }
    assert all(s["realized_tokens"] > 0 for s in sources.values())
    assert sources["photos"]["weight"] != 0.75
    rows = {r[0]: r for r in modality_rows(held)}
    assert rows["stage2"][4] == rows["stage1"][3] and rows["stage2"][5] == "stage1" and rows["stage1"][5] == "-"


def test_an_unattainable_proportion_is_an_error(prepared_sources: Path, tmp_path: Path) -> None:
    data = stages(prepared_sources, hold=True).model_dump(mode="json")
    only_text = [{"name": "code", "path": str(prepared_sources / "code"), "weight": 0.6}]
    data["stages"]["stage2"] = {"tokens": 5000, "sources": only_text, "hold_modality_of": "stage1"}
    spec = validate_config(MixtureSpec, data)
    says = r"cannot hold the text : image proportion: an image share of .* is unattainable: every source's image"
    with pytest.raises(MixPlanError, match=rf"stage 'stage2' {says} share is below it \(code 0.0%\)"):
        run_mix(spec, tmp_path / "x")


def test_hold_image_share_scales_two_groups_to_the_target() -> None:
    weights = hold_image_share({"text": 2.0, "pairs": 1.0, "docs": 1.0}, {"text": 0.0, "pairs": 0.8, "docs": 0.3}, 0.25)
    assert sum(weights.values()) == pytest.approx(4.0)
    share = (weights["pairs"] * 0.8 + weights["docs"] * 0.3) / sum(weights.values())
    assert share == pytest.approx(0.25)
    assert weights["pairs"] / weights["docs"] == pytest.approx(1.0)  # both image-richer: their ratio is kept
    with pytest.raises(MixPlanError, match="above it"):
        hold_image_share({"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.6}, 0.25)
    assert np.isclose(sum(hold_image_share({"a": 1.0}, {"a": 0.25}, 0.25).values()), 1.0)


def _record_ids(folder: Path) -> dict[str, str]:
    """Sample key -> the raw record's key, for a prepared source."""
    return {
        s["key"]: s["meta"]["record_id"].rsplit("/", 1)[1]
        for tar in sorted(folder.glob("shard-*.tar"))
        for s in read_shard(tar)
    }


def test_the_papers_image_generation_rule_selects_the_records_it_names(curated) -> None:
    """docs/configs/image_generation_sft.yaml on the sample photos: the drawn records are exactly those whose raw
    metadata has an aesthetic of at least 6 and a near-square image."""
    from pipelines.mix_job import plan_mixture
    from tests.conftest import EXAMPLES

    data = yaml.safe_load((EXAMPLES / "image_generation_sft.yaml").read_text())
    data |= {"seq_len": 256, "tokens_per_image": 64, "max_repetitions": 16}
    data["stages"]["image_generation"]["tokens"] = 500
    data["stages"]["image_generation"]["sources"][0]["path"] = str(curated["prepared"] / "full")
    stages, _ = plan_mixture(validate_config(MixtureSpec, data))
    ids = _record_ids(curated["prepared"] / "full")
    drawn = {ids[ref.key] for ref in stages["image_generation"].plans["photos"].samples}
    by_hand = {
        key
        for key, meta in curated["raw_meta"].items()
        if meta.get("aesthetic") is not None and meta["aesthetic"] >= 6 and 0.9 <= meta["width"] / meta["height"] <= 1.1
    }
    assert drawn == by_hand and by_hand  # retina_fundus (7.92, 480 x 480); the astronaut's score was removed
    assert stages["image_generation"].filtered["photos"][0]["missing_samples"] == NO_AESTHETIC


def test_cham_mix_prints_the_filters_and_the_proportions(curated, prepared_sources: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    data = stages(prepared_sources, hold=True).model_dump(mode="json")
    data["stages"]["stage2"]["sources"].append(
        {"name": "curated", "path": str(curated["prepared"] / "full"), "weight": 0.2, "filters": FILTERS}
    )
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["mix", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    manifest = json.loads((tmp_path / "out" / "stage2" / "manifest.json").read_text())
    removed = manifest["filters"]["curated"][0]
    assert f"│ curated │ aesthetic >= 5 │ {removed['removed_samples']} │ {removed['removed_tokens']:,} │ 2 │" in text
    target = manifest["modality"]["target_image_share"]
    assert f"{(1 - target) / target:.3f} : 1 │ stage1 │" in text  # stage 2's target, held from stage 1

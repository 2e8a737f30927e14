"""The mix job on the prepared sample sources: shares, faces, inheritance, packing rules, reproducibility."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipelines.mix_job import SEQUENCES_PER_SHARD, mixture_fingerprint, plan_mixture, run_mix
from pipelines.mix_plan import MixPlanError
from pipelines.mix_report import plot_shares, report_rows
from pipelines.packing import image_spans
from schemas import MixtureSpec, validate_config
from schemas.vocab import TINY


def spec_for(prepared: Path, **changes) -> MixtureSpec:
    data = {
        "seq_len": 256,
        "tokens_per_image": 64,
        "seed": 3,
        "total_tokens": 60_000,
        "max_repetitions": 16,
        "stages": {
            "stage1": {
                "fraction": 0.8,
                "sources": [
                    {"name": "prose", "path": str(prepared / "prose"), "weight": 2.9},
                    {"name": "photos", "path": str(prepared / "photos"), "weight": 1.5},
                    {"name": "howto", "path": str(prepared / "howto"), "weight": 0.4},
                ],
            },
            "stage2": {
                "fraction": 0.15,
                "inherit": {"stage": "stage1", "factor": 0.5},
                "sources": [{"name": "code", "path": str(prepared / "code"), "weight": 0.6}],
            },
            "sft": {
                "tokens": 6_000,
                "sft": True,
                "sources": [{"name": "instructions", "path": str(prepared / "instructions"), "weight": 1.0}],
            },
        },
    } | changes
    return validate_config(MixtureSpec, data)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, prepared_sources) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mixed")
    return out, run_mix(spec_for(prepared_sources), out)


def sequences(folder: Path) -> list[dict]:
    out = []
    for tar in sorted(folder.glob("shard-*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            seq = {k: np.load(io.BytesIO(v)) for k, v in sample.items() if k.endswith(".npy")}
            out.append(seq | {"key": sample["__key__"]})
    return out


def test_realized_shares_follow_the_targets(mixed) -> None:
    _, result = mixed
    stage1 = result["manifests"]["stage1"]
    for name, s in stage1["sources"].items():
        # Whole samples: realized within one sample of the planned tokens, which are within one of the target.
        assert 0 <= s["planned_tokens"] - s["target_tokens"] < 1_200, name
        assert s["realized_tokens"] == s["planned_tokens"], name
    assert {n: round(s["target_share"], 3) for n, s in stage1["sources"].items()} == {
        "howto": 0.083,
        "photos": 0.312,
        "prose": 0.604,
    }
    assert abs(stage1["sources"]["prose"]["realized_share"] - 0.604) < 0.02
    assert stage1["modality"]["image_tokens"] > 0 and stage1["tokens"] == sum(
        s["realized_tokens"] for s in stage1["sources"].values()
    )


def test_faces_drawn_twice_as_often_and_stage2_inherits(mixed) -> None:
    _, result = mixed
    photos = result["manifests"]["stage1"]["sources"]["photos"]
    p = photos["face_share_source"]
    assert abs(photos["face_share_drawn"] - 2 * p / (1 + p)) < 0.1  # a face sample counts twice
    stage2 = result["manifests"]["stage2"]["sources"]
    assert {n: s["weight"] for n, s in stage2.items()} == {"code": 0.6, "howto": 0.2, "photos": 0.75, "prose": 1.45}


def test_no_image_block_is_split_and_padding_is_masked(mixed) -> None:
    out, _ = mixed
    for seq in sequences(out / "stage1"):
        tokens = seq["tokens.npy"].astype(np.int64)
        assert len(tokens) == 256
        mask = seq["mask.npy"].astype(bool) if "mask.npy" in seq else np.ones(256, bool)
        real = tokens[mask] if not mask.all() else tokens
        spans = image_spans(real, TINY.boi_id, TINY.eoi_id)  # balanced inside the sequence
        assert all(end - start == TINY.image_block_len for start, end in spans)
        assert (tokens[~mask] == 1).all()  # only padding is masked in pretraining


def test_sft_masks_cover_exactly_the_prompts(mixed) -> None:
    out, result = mixed
    assert result["manifests"]["sft"]["sft"] is True
    n_masked_prompts = 0
    for seq in sequences(out / "sft"):
        tokens, mask = seq["tokens.npy"].astype(np.int64), seq["mask.npy"].astype(bool)
        starts, _, _ = seq["docs.npy"]
        for start in starts:
            sep = start + int(np.flatnonzero(tokens[start:] == TINY.sep_id)[0])
            assert not mask[start : sep + 1].any()  # <s> prompt <sep> are not targets
            assert mask[sep + 1]  # the answer is
            n_masked_prompts += 1
    instructions = result["manifests"]["sft"]["sources"]["instructions"]
    # SFT samples are never split: one longer than seq_len is dropped and counted.
    assert n_masked_prompts == instructions["samples"] - instructions["dropped_too_long"] > 0


def test_two_runs_are_byte_identical(mixed, prepared_sources, tmp_path: Path) -> None:
    out, result = mixed
    for stage in result["manifests"]:  # what a mix killed while writing would leave
        (tmp_path / stage).mkdir()
        (tmp_path / stage / ".shard-00000.tar.4242.deadbeef.tmp").write_bytes(b"half a tar")
    again = run_mix(spec_for(prepared_sources), tmp_path)
    assert again["fingerprint"] == result["fingerprint"]
    assert [p.name for p in tmp_path.rglob(".*")] == [".lock"]  # the lock; no temporaries left
    for tar in sorted(out.rglob("shard-*.tar")):
        assert (tmp_path / tar.relative_to(out)).read_bytes() == tar.read_bytes()
    other = run_mix(spec_for(prepared_sources, seed=4), tmp_path / "other")
    assert other["fingerprint"] != result["fingerprint"]
    # Packing is per shard, so another shard size gives other sequences: a loader state must not carry over.
    _, indexes = plan_mixture(spec_for(prepared_sources), SEQUENCES_PER_SHARD)
    assert mixture_fingerprint(spec_for(prepared_sources), indexes, SEQUENCES_PER_SHARD) == result["fingerprint"]
    assert mixture_fingerprint(spec_for(prepared_sources), indexes, SEQUENCES_PER_SHARD // 2) != result["fingerprint"]


def test_infeasible_spec_names_the_shortfall(prepared_sources, tmp_path: Path) -> None:
    message = r"source 'howto' needs 66,667 tokens but 16 repetitions of its 3,238 tokens give 51,808: 14,859 tokens"
    with pytest.raises(MixPlanError, match=message):
        run_mix(spec_for(prepared_sources, total_tokens=1_000_000), tmp_path)


def test_report_rows_and_plot(mixed, tmp_path: Path) -> None:
    _, result = mixed
    rows = report_rows(result["manifests"]["stage1"])
    assert [r[0] for r in rows] == ["howto", "photos", "prose"] and rows[2][2] == "60.4%"
    png = plot_shares(result["manifests"], tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((mixed[0] / "stage1" / "manifest.json").read_text())
    assert manifest == result["manifests"]["stage1"]


def test_sft_category_weights_balance_the_categories(prepared_sources: Path, tmp_path: Path) -> None:
    weights = {"text": 1, "code": 1, "image_generation": 1, "visual_chat": 1, "interleaved": 1, "safety": 0.5}
    source = {"name": "instructions", "path": str(prepared_sources / "instructions"), "weight": 1.0}
    stages = {"sft": {"tokens": 8_000, "sft": True, "category_weights": weights, "sources": [source]}}
    spec = spec_for(prepared_sources, stages=stages)
    manifest = run_mix(spec, tmp_path)["manifests"]["sft"]
    shares = {name.split("/")[1]: s["target_share"] for name, s in manifest["sources"].items()}
    assert shares == pytest.approx({c: w / 5.5 for c, w in weights.items()})
    for name, s in manifest["sources"].items():
        assert 0 <= s["planned_tokens"] - s["target_tokens"] < 400, name  # within one sample of the target
    assert manifest["source_ids"][0] == "instructions/code"


def test_category_weights_need_an_sft_stage(prepared_sources: Path) -> None:
    from schemas import ConfigError

    with pytest.raises(ConfigError, match="category_weights apply to SFT stages only"):
        spec_for(
            prepared_sources,
            stages={
                "s": {
                    "tokens": 10,
                    "category_weights": {"code": 1},
                    "sources": [{"name": "p", "path": str(prepared_sources / "prose"), "weight": 1}],
                }
            },
        )


def test_stage_two_draws_what_stage_one_left_and_sft_skips_what_cannot_fit(prepared_sources: Path) -> None:
    from pipelines.mix_job import plan_mixture, read_index

    stages, indexes = plan_mixture(spec_for(prepared_sources, seq_len=200, max_repetitions=40))
    one, two = stages["stage1"].plans["prose"], stages["stage2"].plans["prose"]
    # Stage 2 goes on in prose's draw order where stage 1 stopped: not stage 1's first samples again.
    assert two.next_draw == one.next_draw + len(two.samples)
    assert one.next_draw + len(two.samples) <= len(indexes["prose"].samples)  # both within prose's first pass ...
    assert not {s.key for s in two.samples} & {s.key for s in one.samples}  # ... so no sample comes twice
    # SFT samples longer than seq_len are never drawn, and the manifest will say how many were left out.
    sft = stages["sft"]
    long = [s for s in read_index("instructions", prepared_sources / "instructions").samples if s.n_tokens > 200]
    assert long and sft.excluded_too_long == {"instructions": len(long)}
    assert all(s.n_tokens <= 200 for plan in sft.plans.values() for s in plan.samples)


def test_a_missing_shard_and_a_bad_stage_name_are_clear_errors(prepared_sources: Path, tmp_path: Path) -> None:
    import shutil

    from schemas import ConfigError

    copy = tmp_path / "prepared"
    shutil.copytree(prepared_sources, copy)
    (copy / "howto" / "shard-00000.tar").unlink()
    with pytest.raises(
        MixPlanError, match=r"source 'howto': .*shard-00000\.tar is listed in manifest\.json but missing"
    ):
        run_mix(spec_for(copy), tmp_path / "out")
    data = spec_for(prepared_sources).model_dump(mode="json")
    data["stages"]["hq_0.5"] = data["stages"].pop("stage2")
    with pytest.raises(ConfigError, match=r"stage name 'hq_0\.5': use letters, digits"):
        validate_config(MixtureSpec, data)


def rewrite_tar(path: Path, change) -> None:
    """Rewrite a tar member by member: change(name, data) returns the new data, or None to leave the member out."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_damaged_prepared_source_is_refused_naming_the_file(prepared_sources: Path, tmp_path: Path) -> None:
    def damaged(case: str, damage) -> Path:
        copy = tmp_path / case
        shutil.copytree(prepared_sources, copy)
        damage(copy / "prose")
        return copy

    def first_shard(source: Path) -> Path:
        return sorted(source.glob("shard-*.tar"))[0]

    def names(source: Path) -> list[str]:
        with tarfile.open(first_shard(source)) as tar:
            return tar.getnames()

    def keep_half(source: Path) -> None:  # a valid tar holding fewer samples than its manifest lists
        keys = sorted({n.split(".")[0] for n in names(source)})
        rewrite_tar(first_shard(source), lambda name, data: data if name.split(".")[0] in keys[::2] else None)

    def truncate(source: Path) -> None:
        first_shard(source).write_bytes(first_shard(source).read_bytes()[:3000])

    def drop_one_npy(source: Path) -> None:
        dropped = sorted(n for n in names(source) if n.endswith(".npy"))[-1]
        rewrite_tar(first_shard(source), lambda name, data: None if name == dropped else data)

    def empty_manifest(source: Path) -> None:
        (source / "manifest.json").write_text("{}")

    def shard_without_count(source: Path) -> None:
        manifest = json.loads((source / "manifest.json").read_text())
        del manifest["shards"][0]["samples"]
        (source / "manifest.json").write_text(json.dumps(manifest))

    def corrupt_npy(source: Path) -> None:  # the tar stays intact: found when the shard's samples are read
        rewrite_tar(first_shard(source), lambda name, data: b"\x93NUMPY garbage" if name.endswith(".npy") else data)

    cases = {
        "half": (keep_half, r"shard-00000\.tar holds \d+ samples, its manifest\.json lists \d+; re-run `cham prepare`"),
        "truncated": (truncate, r"shard-00000\.tar (is damaged|holds 1 samples)"),
        "no-npy": (drop_one_npy, r"shard-00000\.tar: sample '.*' has no tokens \(\.npy\)"),
        "manifest": (empty_manifest, r"manifest\.json: not a complete prepared-source manifest \(no shards"),
        "count": (shard_without_count, r"manifest\.json: not a prepared-source manifest \(each of its shards needs"),
        "npy": (corrupt_npy, r"shard-00000\.tar: sample '.*' is damaged \(ValueError"),
    }
    for case, (damage, message) in cases.items():
        with pytest.raises(MixPlanError, match=message) as info:
            run_mix(spec_for(damaged(case, damage)), tmp_path / f"out-{case}")
        assert "prose" in str(info.value), case

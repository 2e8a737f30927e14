"""Every config kind: the shipped examples validate; bad files fail naming the file, field and what's allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from schemas import (
    CONFIG_KINDS,
    ConfigError,
    GenerateConfig,
    MixtureSpec,
    ModelConfig,
    PrepareConfig,
    SFTConfig,
    TrainConfig,
    dump_config,
    load_config,
    validate_config,
)
from tests.conftest import EXAMPLES

EXAMPLE_FILES = {kind: EXAMPLES / f"{kind}.yaml" for kind in CONFIG_KINDS}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def example(kind: str) -> dict:
    return yaml.safe_load(EXAMPLE_FILES[kind].read_text())


def problems(cls, data, base: Path, name: str = "bad.yaml") -> str:
    """The ConfigError message for `data` saved as `name` under `base`."""
    path = write_yaml(base / name, data)
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, base_dir=base)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message  # always names the file
    return message


@pytest.mark.parametrize("kind", list(CONFIG_KINDS))
def test_every_example_config_is_valid(kind: str, example_base: Path) -> None:
    config = load_config(CONFIG_KINDS[kind], EXAMPLE_FILES[kind], base_dir=example_base)
    # Paths come back absolute, under the base directory.
    dumped = config.model_dump(mode="json")
    assert str(example_base) in str(dumped) or kind == "model"
    assert len(config.fingerprint()) == 16


def test_examples_roundtrip_through_dump(example_base: Path, tmp_path: Path) -> None:
    for kind, cls in CONFIG_KINDS.items():
        config = load_config(cls, EXAMPLE_FILES[kind], base_dir=example_base)
        again = load_config(cls, dump_config(config, tmp_path / f"{kind}.yaml"))
        assert again == config
        assert again.fingerprint() == config.fingerprint()


def test_prepare_example_reads_every_sample_format(example_base: Path) -> None:
    config = load_config(PrepareConfig, EXAMPLE_FILES["prepare"], base_dir=example_base)
    kinds = {s.name: (s.kind, s.format) for s in config.sources}
    assert kinds == {
        "prose": ("text", "jsonl"),
        "code": ("text", "parquet"),
        "photos": ("image_text", "webdataset"),
        "howto": ("interleaved", "parquet"),
        "instructions": ("sft", "jsonl"),
    }
    assert (config.runner.kind, config.runner.workers) == ("local", 2)
    assert config.image_size == 512


def test_chameleon_recipe_stage2_halves_stage1(example_base: Path) -> None:
    spec = load_config(MixtureSpec, EXAMPLE_FILES["mixture"], base_dir=example_base)
    stage1 = {s.name: s.weight for s in spec.sources_of("stage1")}
    stage2 = {s.name: s.weight for s in spec.sources_of("stage2")}
    assert stage1 == {"text": 2.9, "image_text": 1.5, "interleaved": 0.4}
    assert stage2 == {
        "text": 1.45,
        "image_text": 0.75,
        "interleaved": 0.2,
        "high_quality": 0.6,
        "instructions": 0.6,
    }
    assert spec.stage_tokens("stage1") == 8_000_000_000
    assert spec.stage_tokens("stage2") == 2_000_000_000
    assert spec.face_weight == 2.0
    reps = {s.name: s.max_repetitions for s in spec.sources_of("stage2")}
    assert reps["instructions"] == 8 and reps["text"] == 4


def test_own_source_replaces_inherited_namesake(example_base: Path) -> None:
    data = example("mixture")
    data["stages"]["stage2"]["sources"].append({"name": "text", "path": "data/prepared/prose", "weight": 5.0})
    spec = validate_config(MixtureSpec, data, base_dir=example_base)
    assert {s.name: s.weight for s in spec.sources_of("stage2")}["text"] == 5.0


# --- bad configs: one clear message naming the file, the field and what is allowed ---------------------------


def test_negative_weight(example_base: Path) -> None:
    data = example("mixture")
    data["stages"]["stage1"]["sources"][0]["weight"] = -1
    message = problems(MixtureSpec, data, example_base)
    assert "stages.stage1.sources[0].weight" in message
    assert "greater than or equal to 0" in message


def test_all_zero_weights(example_base: Path) -> None:
    data = example("mixture")
    for source in data["stages"]["stage1"]["sources"]:
        source["weight"] = 0
    data["stages"]["stage2"]["sources"] = []
    message = problems(MixtureSpec, data, example_base)
    assert "stages:" in message
    assert "stage 'stage1': all source weights are zero" in message


def test_seq_len_shorter_than_an_image_block(example_base: Path) -> None:
    data = example("mixture") | {"seq_len": 1000}
    message = problems(MixtureSpec, data, example_base)
    assert "seq_len: 1000 is too short for one image block of 1026 positions" in message
    assert "use seq_len >= 1026" in message
    # The rule follows the image grid: a tiny 8x8 grid needs 66 positions.
    spec = validate_config(MixtureSpec, data | {"tokens_per_image": 64, "seq_len": 66}, base_dir=example_base)
    assert spec.image_block_len == 66


def test_missing_path(example_base: Path) -> None:
    data = example("mixture")
    data["stages"]["stage1"]["sources"][1]["path"] = "data/prepared/nowhere"
    message = problems(MixtureSpec, data, example_base)
    assert "stages.stage1.sources[1].path: path does not exist" in message
    assert str(example_base / "data/prepared/nowhere") in message


def test_glob_matching_nothing(example_base: Path) -> None:
    data = example("prepare")
    data["sources"][0]["paths"] = ["data/sample/text/*.csv"]
    message = problems(PrepareConfig, data, example_base)
    assert "sources[0].paths[0]: no file matches the pattern" in message


def test_unknown_source_kind(example_base: Path) -> None:
    data = example("prepare")
    data["sources"][2]["kind"] = "video"
    message = problems(PrepareConfig, data, example_base)
    assert "sources[2].kind:" in message
    assert "'text', 'image_text', 'interleaved' or 'sft'" in message
    assert "(got 'video')" in message


def test_format_that_cannot_hold_the_kind(example_base: Path) -> None:
    data = example("prepare")
    data["sources"][0]["format"] = "webdataset"
    message = problems(PrepareConfig, data, example_base)
    assert "sources[0]: format 'webdataset' cannot hold 'text' records; allowed: jsonl, parquet" in message


def test_unknown_key_lists_allowed_keys(example_base: Path) -> None:
    data = example("train")
    data["optimizer"]["learning_rate"] = 1e-3
    message = problems(TrainConfig, data, example_base)
    assert "optimizer.learning_rate: unknown key; allowed keys here: lr, betas, eps, weight_decay, grad_clip" in message


def test_unknown_top_level_key_and_other_problems_reported_together(example_base: Path) -> None:
    data = example("mixture") | {"sequence_length": 4096}
    data["stages"]["stage1"]["sources"][0]["weight"] = -2
    message = problems(MixtureSpec, data, example_base)
    assert "2 problems" in message
    assert "sequence_length: unknown key" in message and "seq_len" in message
    assert "stages.stage1.sources[0].weight" in message


def test_beam_runner_must_be_named(example_base: Path) -> None:
    data = example("prepare") | {"runner": {"kind": "beam"}}
    assert "runner: kind 'beam' needs options.runner" in problems(PrepareConfig, data, example_base)
    data["runner"]["kind"] = "prism"
    assert "runner.kind: Input should be 'embedded', 'local', 'dask' or 'beam'" in problems(
        PrepareConfig, data, example_base
    )


def test_duplicate_source_names(example_base: Path) -> None:
    data = example("prepare")
    data["sources"][1]["name"] = "prose"
    assert "source names must be unique; repeated: prose" in problems(PrepareConfig, data, example_base)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"inherit": {"stage": "stage9", "factor": 0.5}}, "stage 'stage2' inherits unknown stage 'stage9'"),
        ({"fraction": 0.5}, "stage fractions add up to 1.3, more than 1"),
        ({"tokens": 5}, "give exactly one of 'tokens' or 'fraction'"),
    ],
)
def test_bad_stage_definitions(example_base: Path, change: dict, expected: str) -> None:
    data = example("mixture")
    data["stages"]["stage2"].update(change)
    assert expected in problems(MixtureSpec, data, example_base)


def test_inheritance_cycle(example_base: Path) -> None:
    data = example("mixture")
    data["stages"]["stage1"]["inherit"] = {"stage": "stage2", "factor": 1.0}
    assert "stages inherit in a cycle: stage1 -> stage2 -> stage1" in problems(MixtureSpec, data, example_base)


def test_fraction_needs_total_tokens(example_base: Path) -> None:
    data = example("mixture")
    del data["total_tokens"]
    assert "stage 'stage1' gives a fraction: set total_tokens" in problems(MixtureSpec, data, example_base)


def test_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("stages:\n  stage1: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+, column \d+: not valid YAML"):
        load_config(MixtureSpec, path)


def test_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys to values at the top level, got list"):
        load_config(MixtureSpec, path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nothere\.yaml: file not found"):
        load_config(TrainConfig, tmp_path / "nothere.yaml")


def test_missing_required_field(example_base: Path) -> None:
    data = example("train")
    del data["steps"]
    assert "steps: Field required" in problems(TrainConfig, data, example_base)


# --- model, train, SFT and generate specifics ---------------------------------------------------------------------


def test_model_presets_have_chameleon_shapes() -> None:
    seven = ModelConfig.from_preset("7b")
    assert (seven.dim, seven.n_layers, seven.n_heads, seven.n_kv_heads, seven.ffn_dim) == (
        4096,
        32,
        32,
        32,
        11008,
    )
    assert seven.vocab_size == 65_536 and not seven.swin_norm and seven.qk_norm
    assert 6.9e9 < seven.n_params() < 7.1e9
    big = ModelConfig.from_preset("34b")
    assert (big.dim, big.n_layers, big.n_heads, big.n_kv_heads, big.ffn_dim) == (8192, 48, 64, 8, 22016)
    assert big.swin_norm and 33e9 < big.n_params() < 35e9
    tiny = ModelConfig.from_preset("tiny", n_layers=3)
    assert tiny.n_layers == 3 and tiny.n_kv_heads < tiny.n_heads


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"n_heads": 3}, "dim 64 must be divisible by n_heads 3"),
        ({"n_kv_heads": 3}, "n_heads 4 must be a multiple of n_kv_heads 3"),
        ({"dim": 36, "n_heads": 4, "n_kv_heads": 4}, "head_dim 9 (dim / n_heads) must be even"),
        ({"preset": "70b"}, "preset: Input should be 'tiny', 'proxy-1m', 'proxy-5m', 'proxy-20m', '7b' or '34b'"),
    ],
)
def test_bad_model_shapes(tmp_path: Path, overrides: dict, expected: str) -> None:
    assert expected in problems(ModelConfig, {"preset": "tiny", **overrides}, tmp_path)


def test_sft_defaults_follow_the_recipe(example_base: Path) -> None:
    data = {
        "model": {"preset": "tiny", "max_seq_len": 4096},  # room for SFT's default sequences
        "data": "data/mixed/sft",
        "out_dir": "out",
        "steps": 10,
        "init_from": "data/runs/pretrain/checkpoints/latest",
    }
    sft = validate_config(SFTConfig, data, base_dir=example_base)
    assert sft.optimizer.lr == 1e-5 and sft.schedule.kind == "cosine" and sft.schedule.warmup_steps == 0
    assert sft.dropout == 0.05 and sft.global_batch_size == 128 and sft.seq_len is None  # the stage's
    assert sft.optimizer.betas == (0.9, 0.95) and sft.optimizer.eps == 1e-5 and sft.optimizer.weight_decay == 0.1
    del data["init_from"]
    with pytest.raises(ConfigError, match="init_from: Field required"):
        validate_config(SFTConfig, data, base_dir=example_base)


def test_pretraining_defaults_follow_the_recipe(example_base: Path) -> None:
    config = validate_config(
        TrainConfig,
        {
            "model": {"preset": "tiny"},
            "data": "data/mixed/stage1",
            "out_dir": "o",
            "steps": 10_000,
            "global_batch_size": 8,
            "seq_len": 512,
        },
        base_dir=example_base,
    )
    assert config.schedule.kind == "warmup_exponential" and config.schedule.warmup_steps == 4000
    assert config.z_loss == 1e-5 and config.optimizer.grad_clip == 1.0 and config.model.dropout == 0.0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"seq_len": 1024}, "seq_len 1024 exceeds the model's max_seq_len 512"),
        ({"global_batch_size": 7}, "global_batch_size 7 must be a multiple of micro_batch_size 2"),
        ({"schedule": {"warmup_steps": 500}}, "schedule.warmup_steps 500 must be < steps 200"),
        ({"precision": "fp8"}, "precision: Input should be 'auto', 'bf16' or 'fp32'"),
    ],
)
def test_bad_train_configs(example_base: Path, change: dict, expected: str) -> None:
    assert expected in problems(TrainConfig, example("train") | change, example_base)


def test_generate_defaults_are_chameleons(example_base: Path) -> None:
    config = validate_config(GenerateConfig, {"checkpoint": "data/runs/sft/checkpoints/latest"}, base_dir=example_base)
    assert (config.text.temperature, config.text.top_p, config.text.repetition_penalty) == (0.7, 0.9, 1.2)
    assert (config.image.cfg_text, config.image.cfg_image) == (3.0, 1.2)
    message = problems(GenerateConfig, example("generate") | {"mode": "audio"}, example_base)
    assert "mode: Input should be 'text', 'image' or 'mixed' (got 'audio')" in message


def test_relative_paths_resolve_against_the_working_directory(example_base: Path, monkeypatch) -> None:
    monkeypatch.chdir(example_base)
    config = load_config(GenerateConfig, EXAMPLE_FILES["generate"])
    assert config.checkpoint == example_base / "data/runs/sft/checkpoints/latest"


def test_path_checks_can_be_deferred(tmp_path: Path) -> None:
    # Flows build configs before the folders they name exist; the jobs check again when they run.
    config = load_config(GenerateConfig, write_yaml(tmp_path / "g.yaml", {"checkpoint": "later"}), check_paths=False)
    assert config.checkpoint == Path.cwd() / "later"


def test_docs_show_every_example_and_every_field() -> None:
    from schemas.prepare_config import OPTIONS_BY_KIND

    doc = (EXAMPLES.parent / "configs.md").read_text()
    for path in EXAMPLE_FILES.values():
        assert path.read_text() in doc, f"docs/configs.md does not show {path.name} as it is"
    for cls in [*CONFIG_KINDS.values(), *OPTIONS_BY_KIND.values()]:
        for name in cls.model_fields:
            assert f"`{name}`" in doc, f"docs/configs.md does not explain {cls.__name__}.{name}"


# --- source options are typed per kind; files of another format are refused up front (issue 17) ------------------


@pytest.mark.parametrize(
    ("index", "options", "expected"),
    [
        (
            0,
            {"min_char": 20},
            "sources[0]: options.min_char: unknown option for text sources (did you mean "
            "'min_chars'?); valid options: max_tokens, max_record_bytes, attributes, max_chars, text_field, "
            "min_chars",
        ),
        (0, {"text_feild": "body"}, "options.text_feild: unknown option for text sources (did you mean 'text_field'?)"),
        (
            2,
            {"aesthetic_min": 5},
            "sources[2]: options.aesthetic_min: unknown option for image_text sources; valid "
            "options: max_tokens, max_record_bytes, attributes, max_pixels, min_side, max_chars, "
            "text_field, image_field",
        ),
        (2, {"min_chars": 5}, "options.min_chars: unknown option for image_text sources"),  # only text uses it
        (3, {"images_dir": "data/sample"}, "options.images_dir: only MMC4 jsonl sources look images up by name"),
        (0, {"min_chars": "many"}, "options.min_chars: Input should be a valid integer"),
        (0, {"min_chars": 50, "max_chars": 10}, "options: min_chars 50 is above max_chars 10"),
        (4, {"max_pixels": 0}, "options.max_pixels: Input should be greater than or equal to 1"),
        (4, ["not", "a", "mapping"], "options: should be a mapping of option names to values, got list"),
    ],
)
def test_source_options_are_typed_per_kind(example_base: Path, index: int, options, expected: str) -> None:
    data = example("prepare")
    data["sources"][index]["options"] = options
    assert expected in problems(PrepareConfig, data, example_base)


def test_valid_options_are_typed_and_only_set_keys_are_kept(example_base: Path) -> None:
    data = example("prepare")
    data["sources"][0]["options"] = {"min_chars": "20", "max_tokens": 4096}
    data["sources"][3]["options"] = {"text_separator": " "}
    config = validate_config(PrepareConfig, data, base_dir=example_base)
    assert config.sources[0].options.min_chars == 20 and config.sources[0].options.text_field == "text"
    dumped = config.model_dump(mode="json")["sources"]
    expected = [{"min_chars": 20, "max_tokens": 4096}, {}, {}, {"text_separator": " "}, {}]
    assert [s.get("options") for s in dumped] == expected


@pytest.mark.parametrize("name", ["docs_shard_1_v2.jsonl.bz2", "notes.txt", "table.csv"])
def test_a_file_of_another_format_is_refused_by_config_check(example_base: Path, name: str, monkeypatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    (example_base / "data" / name).write_text("{}")
    data = example("prepare")
    data["sources"][0]["paths"] = [f"data/{name}"]
    expected = f"sources[0].paths[0]: {example_base / 'data' / name} is not a jsonl file; jsonl sources read .jsonl"
    assert expected in problems(PrepareConfig, data, example_base)
    path = write_yaml(example_base / "prepare.yaml", data)
    monkeypatch.chdir(example_base)  # the CLI resolves relative paths from the working directory
    result = CliRunner().invoke(app, ["config", "check", "prepare", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 1 and f"{name} is not a jsonl file" in result.output


def test_a_folder_or_glob_without_a_file_of_the_format_is_refused(example_base: Path) -> None:
    (example_base / "data" / "zips").mkdir()
    (example_base / "data" / "zips" / "docs.tar.bz2").write_text("x")
    data = example("prepare")
    data["sources"][0]["paths"] = ["data/zips"]
    assert "sources[0].paths[0]: no jsonl file (.jsonl, .json, .jsonl.gz" in problems(PrepareConfig, data, example_base)
    (example_base / "data" / "zips" / "docs_shard_0_v2.jsonl.zip").write_bytes(b"")  # MMC4 as shipped is read
    validate_config(PrepareConfig, data, base_dir=example_base)

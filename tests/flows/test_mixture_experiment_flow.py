"""The mixture-experiment flow under the Prefect test harness: a sweep, short runs, held-out loss, the best named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.mixture_experiment import apply_variant, mixture_experiment
from schemas import ExperimentTraining, MixtureSpec, MixtureVariant, WeightSweep, validate_config

pytestmark = pytest.mark.slow


@pytest.fixture()
def spec(prepared_sources: Path) -> MixtureSpec:
    return validate_config(
        MixtureSpec,
        {
            "seq_len": 128,
            "tokens_per_image": 64,
            "max_repetitions": 16,
            "seed": 3,
            "stages": {
                "stage1": {
                    "tokens": 6_000,
                    "sources": [
                        {"name": "prose", "path": str(prepared_sources / "prose"), "weight": 1},
                        {"name": "photos", "path": str(prepared_sources / "photos"), "weight": 1},
                    ],
                }
            },
        },
    )


def test_variant_changes_only_named_weights(spec: MixtureSpec) -> None:
    changed = apply_variant(spec, MixtureVariant(name="x", weights={"photos": 3.0}))
    assert {s.name: s.weight for s in changed.sources_of("stage1")} == {"prose": 1.0, "photos": 3.0}
    with pytest.raises(ValueError, match="no stage lists the sources"):
        apply_variant(spec, MixtureVariant(name="y", weights={"nope": 1.0}))


def test_sweep_trains_each_mixture_and_names_the_best(prefect_api, spec: MixtureSpec, make_stage, tmp_path) -> None:
    heldout = make_stage(3_000)
    training = ExperimentTraining(
        steps=3, warmup_steps=1, global_batch_size=4, heldout=str(heldout), eval_max_batches=2
    )
    state = mixture_experiment(
        spec=spec,
        out_dir=str(tmp_path),
        sweep=WeightSweep(source="photos", weights=[0.25, 4]),
        training=training,
        return_state=True,
    )
    assert state.is_completed(), state.message
    artifacts = prefect_api.artifacts(state.state_details.flow_run_id)
    rows = {r["mixture"]: r for r in prefect_api.by_key(artifacts, "mixture-experiment")["data"]}
    assert set(rows) == {"photos-0.25", "photos-4"}
    for name, row in rows.items():
        manifest = json.loads((tmp_path / name / "mixed" / "stage1" / "manifest.json").read_text())
        assert row["image share"] == pytest.approx(manifest["modality"]["image_share"], abs=1e-4)
        heldout_loss = json.loads((tmp_path / name / "eval-loss.json").read_text())["loss"]
        assert row["held-out loss"] == pytest.approx(heldout_loss, abs=1e-4)
    assert rows["photos-4"]["image share"] > rows["photos-0.25"]["image share"]  # the sweep did change the mix

    best = min(rows, key=lambda n: rows[n]["held-out loss"])
    assert state.result()["best"] == best
    summary = prefect_api.by_key(artifacts, "mixture-experiment-summary")["data"]
    assert f"**Best mixture: `{best}`** by held-out loss: {rows[best]['held-out loss']}" in summary
    plot = prefect_api.by_key(artifacts, "mixture-experiment-plot")["data"]
    assert plot.count("xychart-beta") == 3 and '"photos-0.25", "photos-4"' in plot
    assert f"bar [{rows['photos-0.25']['held-out loss']:.4f}, {rows['photos-4']['held-out loss']:.4f}]" in plot
    assert "data:image/png;base64," in plot


def test_inputs_are_checked_before_any_mixture_is_mixed(prefect_api, spec: MixtureSpec, tmp_path) -> None:
    variants = [MixtureVariant(name="good", weights={"photos": 2.0}), MixtureVariant(name="bad", weights={"nope": 1.0})]
    state = mixture_experiment(spec=spec, out_dir=str(tmp_path / "a"), variants=variants, return_state=True)
    assert state.is_failed() and "mixture 'bad': no stage lists the sources ['nope']" in state.message
    assert not (tmp_path / "a" / "good").exists()  # the good one was not mixed first
    training = ExperimentTraining(steps=3, heldout=str(tmp_path / "no-such-stage"))
    state = mixture_experiment(
        spec=spec, out_dir=str(tmp_path / "b"), variants=variants[:1], training=training, return_state=True
    )
    assert state.is_failed() and "is not a stage folder" in state.message
    assert not (tmp_path / "b" / "good").exists()


def test_a_rerun_with_other_training_settings_is_refused(spec: MixtureSpec, make_stage, tmp_path) -> None:
    from flows.mixture_experiment import _refuse_other_settings, experiment_train_config
    from schemas import dump_config

    stage = make_stage(3_000)
    first = experiment_train_config(ExperimentTraining(steps=3), spec, stage, tmp_path / "run")
    _refuse_other_settings(first, tmp_path / "run" / "train-config.yaml")  # nothing there yet
    dump_config(first, tmp_path / "run" / "train-config.yaml")
    _refuse_other_settings(first, tmp_path / "run" / "train-config.yaml")  # the same settings resume
    other = experiment_train_config(ExperimentTraining(steps=5), spec, stage, tmp_path / "run")
    with pytest.raises(ValueError, match="was trained with other settings"):
        _refuse_other_settings(other, tmp_path / "run" / "train-config.yaml")


def test_the_experiment_model_takes_its_vocabulary_from_the_data(spec: MixtureSpec, tmp_path: Path) -> None:
    """A real vocabulary (here 20,000 ids) with a proxy preset and overrides: the model is built for the data,
    where the fixed tiny preset's 2,048 ids failed ("the stage's vocabulary has 20000 ids, the model 2048")."""
    from flows.mixture_experiment import experiment_train_config

    stage = tmp_path / "stage1"
    stage.mkdir()
    (stage / "manifest.json").write_text(json.dumps({"vocab_layout": {"vocab_size": 20_000}}))
    training = ExperimentTraining(model={"preset": "proxy-1m", "n_layers": 2})
    config = experiment_train_config(training, spec, stage, tmp_path / "run")
    assert config.model.vocab_size == 20_000 and config.model.n_layers == 2 and config.model.dim == 128
    assert config.model.max_seq_len >= spec.seq_len
    assert experiment_train_config(ExperimentTraining(), spec, stage, tmp_path / "run").model.vocab_size == 20_000

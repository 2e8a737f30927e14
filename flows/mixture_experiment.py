"""The `mixture-experiment` flow: mix a spec (or a sweep of its weights), optionally train briefly and evaluate each,
and name the best mixture by held-out loss."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from pydantic import Field

from flows.artifacts import (
    markdown_artifact,
    markdown_table,
    mermaid_bars,
    mermaid_lines,
    plot_loss_curves,
    png_markdown,
    table_artifact,
)
from flows.build_dataset import mix_task
from flows.evaluation_flows import eval_loss_task
from flows.markup import Markdown, code, md
from flows.training_flows import launch_training
from model.files.reading import read_json_object
from schemas import (
    ExperimentTraining,
    MixtureSpec,
    MixtureVariant,
    TrainConfig,
    WeightSweep,
    dump_config,
    validate_config,
)
from schemas.search_config import model_for_data


def expand_variants(variants: list[MixtureVariant] | None, sweep: WeightSweep | None) -> list[MixtureVariant]:
    """The mixtures to run: the explicit ones, then one per swept weight; none given means the spec as it is."""
    out = list(variants or [])
    if sweep:
        out += [
            MixtureVariant(
                name=re.sub(r"[^A-Za-z0-9_.-]", "_", f"{sweep.source}-{w:g}"),
                weights={sweep.source: w},
                stages=sweep.stages,
            )
            for w in sweep.weights
        ]
    if not out:
        out = [MixtureVariant(name="base", weights={})]
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ValueError(f"mixture names must be unique: {names}")
    return out


def apply_variant(spec: MixtureSpec, variant: MixtureVariant) -> MixtureSpec:
    """The spec with the variant's weights; a source name that no chosen stage lists is an error."""
    data = spec.model_dump(mode="json")
    unknown = set(variant.stages or []) - set(data["stages"])
    if unknown:
        raise ValueError(f"mixture {variant.name!r}: unknown stages {sorted(unknown)}; stages: {list(data['stages'])}")
    used: set[str] = set()
    for stage_name, stage in data["stages"].items():
        if variant.stages and stage_name not in variant.stages:
            continue
        for source in stage["sources"]:
            if source["name"] in variant.weights:
                source["weight"] = variant.weights[source["name"]]
                used.add(source["name"])
    missing = set(variant.weights) - used
    if missing:
        raise ValueError(f"mixture {variant.name!r}: no stage lists the sources {sorted(missing)}")
    return validate_config(MixtureSpec, data, f"mixture {variant.name}")


def experiment_train_config(training: ExperimentTraining, spec: MixtureSpec, data: Path, out: Path) -> TrainConfig:
    """The short pretraining run of one mixture; the model's vocabulary is the stage's (from its manifest)."""
    manifest = read_json_object(Path(data) / "manifest.json", ("vocab_layout",), what="stage manifest")
    vocab_size = manifest["vocab_layout"]["vocab_size"]
    model = model_for_data(training.model_settings(), vocab_size, spec.seq_len)
    return validate_config(
        TrainConfig,
        {
            "model": model.model_dump(mode="json"),
            "data": str(data),
            "out_dir": str(out),
            "seq_len": spec.seq_len,
            "steps": training.steps,
            "global_batch_size": training.global_batch_size,
            "micro_batch_size": training.micro_batch_size,
            "optimizer": {"lr": training.lr},
            "schedule": {"warmup_steps": training.warmup_steps},
            "checkpoint": {"every_steps": training.steps, "keep_last": 1},
            "logging": {"every_steps": max(1, training.steps // 5), "tensorboard": False},
        },
    )


def _shares(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{n} {s['realized_share']:.1%}" for n, s in manifest["sources"].items())


def _weights(spec: MixtureSpec, stage: str) -> str:
    return ", ".join(f"{s.name} {s.weight:g}" for s in spec.sources_of(stage))


def _refuse_other_settings(config: TrainConfig, previous: Path) -> None:
    """A rerun into the same out_dir resumes its runs: with other training settings it would report the old losses
    under the new ones (a finished run has nothing to do), so it is refused."""
    if previous.is_file() and yaml.safe_load(previous.read_text()) != config.model_dump(mode="json"):
        raise ValueError(f"{previous.parent} was trained with other settings ({previous}); use a new out_dir")


@flow(name="mixture-experiment")
def mixture_experiment(
    spec: MixtureSpec,
    out_dir: str = Field(description="one folder per mixture is written here"),
    variants: list[MixtureVariant] | None = None,
    sweep: WeightSweep | None = None,
    training: ExperimentTraining | None = None,
) -> dict[str, Any]:
    """Mix each mixture (minutes: `prepare` is never re-run), train and evaluate each briefly, report the best."""
    out = Path(out_dir)
    stage = (training.stage if training else None) or next(iter(spec.stages))
    if stage not in spec.stages:
        raise ValueError(f"training stage {stage!r} is not in the spec; stages: {list(spec.stages)}")
    # Every input is checked before the first mixture is mixed or trained: a typo in the last variant, or a wrong
    # held-out stage, must not surface after the first ones took their minutes (or hours).
    mixtures = [(variant, apply_variant(spec, variant)) for variant in expand_variants(variants, sweep)]
    if training and training.heldout and not (Path(training.heldout) / "manifest.json").is_file():
        raise ValueError(f"heldout {training.heldout!r} is not a stage folder (no manifest.json; run `cham mix`)")
    for variant, mixture in mixtures if training else []:
        previous = out / variant.name / "run" / "train-config.yaml"
        if previous.is_file():  # an earlier run of this experiment: its stage exists, so the config can be built
            config = experiment_train_config(training, mixture, out / variant.name / "mixed" / stage, previous.parent)
            _refuse_other_settings(config, previous)
    rows, curves = [], {}
    for variant, mixture in mixtures:
        folder = out / variant.name
        manifests = mix_task(dump_config(mixture, folder / "mixture.yaml"), folder / "mixed")
        m = manifests[stage]
        row: dict[str, Any] = {
            "mixture": variant.name,
            "stage": stage,
            "weights": _weights(mixture, stage),
            "realized shares": _shares(m),
            "tokens": m["tokens"],
            "sequences": m["sequences"],
            "image share": round(m["modality"]["image_share"], 4),
        }
        if training:
            config = experiment_train_config(training, mixture, folder / "mixed" / stage, folder / "run")
            result = launch_training("train", config, training.nproc_per_node)
            curves[variant.name] = result["loss_curve"]
            row["final train loss"] = round(result["final"]["loss"], 4)
            if training.heldout:
                evaluated = eval_loss_task(
                    result["checkpoint"], training.heldout, training.eval_max_batches, folder / "eval-loss.json"
                )
                row["held-out loss"] = round(evaluated["loss"], 4)
                row["held-out perplexity"] = round(evaluated["perplexity"], 2)
        rows.append(row)

    table_artifact(rows, key="mixture-experiment", description=f"mixtures of {out}: shares, losses")
    metric = "held-out loss" if training and training.heldout else "final train loss" if training else None
    charts = [mermaid_bars(f"{metric} by mixture", {r["mixture"]: r[metric] for r in rows}, metric)] if metric else []
    charts.append(
        mermaid_bars(f"image token share of {stage}", {r["mixture"]: r["image share"] for r in rows}, "image share")
    )
    if curves:
        charts.append(mermaid_lines("training loss by mixture", curves))
        charts.append(
            png_markdown(
                plot_loss_curves(curves, out / "loss-curves.png", "training loss by mixture"),
                "training loss by mixture",
            )
        )
    markdown_artifact(
        Markdown("\n\n".join(charts)),
        key="mixture-experiment-plot",
        description="held-out loss, image share and loss curves by mixture",
    )
    best = min(rows, key=lambda r: r[metric]) if metric else None
    if best:
        why = "held-out loss" if metric == "held-out loss" else "final training loss (no held-out stage was given)"
        headline = md(
            "**Best mixture: {}** by {}: {} (weights of {}: {}).",
            code(best["mixture"]),
            why,
            best[metric],
            stage,
            best["weights"],
        )
    else:
        headline = md("No training was asked for, so the mixtures are not ranked; their shares are below.")
    markdown_artifact(
        md("# Mixture experiment\n\n{}\n\n{}\n\nFolder: {}", headline, markdown_table(rows), code(out)),
        key="mixture-experiment-summary",
        description="the best mixture",
    )
    return {"best": best["mixture"] if best else None, "metric": metric, "rows": rows}

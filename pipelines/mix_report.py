"""The mixture report: target vs realized shares per stage, the text : image proportion of each stage (and the
target of a stage that holds another's), what each curation filter removed; as rows for tables and a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

ROW_FIELDS = (
    "source",
    "weight",
    "target share",
    "realized share",
    "target tokens",
    "realized tokens",
    "samples",
    "repetitions",
    "faces drawn / in source",
)


def report_rows(manifest: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row of strings per source of a stage manifest, in ROW_FIELDS order."""
    rows = []
    for name, s in manifest["sources"].items():
        rows.append(
            (
                name,
                f"{s['weight']:g}",
                f"{s['target_share']:.1%}",
                f"{s['realized_share']:.1%}",
                f"{s['target_tokens']:,}",
                f"{s['realized_tokens']:,}",
                f"{s['samples']:,}",
                f"{s['repetitions']:.2f}",
                f"{s['face_share_drawn']:.0%} / {s['face_share_source']:.0%}",
            )
        )
    return rows


MODALITY_FIELDS = ("stage", "text tokens", "image tokens", "text : image", "target text : image", "held from")
FILTER_FIELDS = ("source", "filter", "samples removed", "tokens removed", "without the attribute")


def _text_to_image(image_share: float) -> str:
    return "all text" if image_share <= 0 else f"{(1 - image_share) / image_share:.3f} : 1"


def modality_rows(manifests: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    """Per stage, in MODALITY_FIELDS order: realized text and image tokens and their proportion, and the target
    proportion of a stage that holds another's (hold_modality_of); '-' where none is held."""
    rows = []
    for stage, manifest in manifests.items():
        m = manifest["modality"]
        target = m.get("target_image_share")
        rows.append(
            (
                stage,
                f"{m['text_tokens']:,}",
                f"{m['image_tokens']:,}",
                _text_to_image(m["image_share"]),
                _text_to_image(target) if target is not None else "-",
                m.get("held_from") or "-",
            )
        )
    return rows


def filter_rows(manifest: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per filter of each filtered source of a stage manifest, in FILTER_FIELDS order: what it removed, counted
    in order (a sample is charged to the first filter it fails), and of those how many lacked the attribute."""
    rows = []
    for source, filters in manifest.get("filters", {}).items():
        for f in filters:
            rows.append(
                (
                    source,
                    f["filter"],
                    f"{f['removed_samples']:,}",
                    f"{f['removed_tokens']:,}",
                    f"{f['missing_samples']:,}",
                )
            )
    return rows


def plot_shares(manifests: dict[str, dict[str, Any]], path: Path) -> Path:
    """Grouped bars of target vs realized token share for every source of every stage, as a PNG."""
    fig, axes = plt.subplots(1, len(manifests), figsize=(4.5 * len(manifests), 3.6), squeeze=False)
    for ax, (stage, manifest) in zip(axes[0], manifests.items(), strict=True):
        names = list(manifest["sources"])
        x = range(len(names))
        target = [manifest["sources"][n]["target_share"] for n in names]
        realized = [manifest["sources"][n]["realized_share"] for n in names]
        ax.bar([i - 0.2 for i in x], target, width=0.4, label="target", color="#9bb7d4")
        ax.bar([i + 0.2 for i in x], realized, width=0.4, label="realized", color="#1f4e79")
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set_title(f"{stage}: {manifest['tokens']:,} tokens, {manifest['modality']['image_share']:.0%} image")
        ax.set_ylabel("token share")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

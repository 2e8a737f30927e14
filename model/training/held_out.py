"""Held-out loss and perplexity on stage shards, overall, per source and per modality.

Supervision is exactly `model/lm/losses.py`'s: target t+1 counts where `loss_mask[t+1]` is True. Each target is
attributed to the source of its document and to its modality (image = codes, BOI and EOI, as the trainer logs it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model.lm.transformer import Transformer
from model.tokenizers.vocabulary import Modality, Vocabulary
from model.training.stage_loader import StageLoader, read_batch
from schemas.vocab import VocabLayout

PADDING_SOURCE = "(padding)"  # supervised targets outside any document; none in stages the mix job writes


def _summary(ce_sum: float, tokens: int) -> dict[str, Any]:
    loss = ce_sum / tokens if tokens else None
    return {"loss": loss, "perplexity": math.exp(loss) if loss is not None else None, "tokens": tokens}


def heldout_loss(
    model: Transformer,
    stage_dir: str | Path,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    document_masking: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Token-weighted next-token CE (fp32, summed in fp64) over every sequence of a stage, or its first batches.

    `progress(done, total)` is called after each batch. Sources or modalities without targets get loss None.
    """
    if batch_size <= 0 or (max_batches is not None and max_batches <= 0):
        raise ValueError(f"batch_size and max_batches must be > 0, got {batch_size} and {max_batches}")
    loader = StageLoader(stage_dir, batch_size=1)  # indexes every sequence; we batch ourselves to keep the tail
    layout = VocabLayout.model_validate(loader.manifest["vocab_layout"])
    if layout.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"{stage_dir}: the stage's vocabulary has {layout.vocab_size} ids, the model {model.config.vocab_size}"
        )
    device = torch.device(device) if device is not None else model.output.weight.device
    image_ids = Vocabulary(layout).mask(Modality.IMAGE, Modality.BOI, Modality.EOI).to(device)
    names = list(loader.source_ids)
    n_sources = len(names) + 1  # slot 0 holds source id -1
    ce_by_source = torch.zeros(n_sources, dtype=torch.float64, device=device)
    n_by_source = torch.zeros(n_sources, dtype=torch.long, device=device)
    ce_image = torch.zeros((), dtype=torch.float64, device=device)
    n_image = torch.zeros((), dtype=torch.long, device=device)

    starts = range(0, len(loader.index), batch_size)
    total = len(starts) if max_batches is None else min(len(starts), max_batches)
    files: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    sequences = 0
    try:
        with torch.no_grad():  # not inference_mode: FSDP2's all-gathers during training's evaluations
            for done, start in enumerate(starts[:total], 1):
                members = loader.index[start : start + batch_size]
                read = read_batch(members, loader.seq_len, files, loader.vocab_size, n_sources=len(names) or None)
                batch = {k: v.to(device) for k, v in read.items()}
                logits = model(
                    batch["tokens"],
                    positions=batch["positions"],
                    doc_ids=batch["doc_ids"] if document_masking else None,
                )
                mask = batch["loss_mask"][:, 1:].bool()
                targets = batch["tokens"][:, 1:][mask]
                rows = logits[:, :-1][mask].float()  # only supervised rows in fp32, as lm_loss does
                ce = (torch.logsumexp(rows, -1) - rows.gather(-1, targets[:, None]).squeeze(-1)).double()
                slot = batch["source_ids"][:, 1:][mask] + 1
                ce_by_source += torch.bincount(slot, weights=ce, minlength=n_sources)
                n_by_source += torch.bincount(slot, minlength=n_sources)
                is_image = image_ids[targets]
                ce_image += ce[is_image].sum()
                n_image += is_image.sum()
                sequences += len(members)
                if progress is not None:
                    progress(done, total)
    finally:
        for f in files.values():
            f.close()
        model.train(was_training)

    ce_sum, n = float(ce_by_source.sum()), int(n_by_source.sum())
    by_source = {name: _summary(float(ce_by_source[i + 1]), int(n_by_source[i + 1])) for i, name in enumerate(names)}
    if int(n_by_source[0]):
        by_source[PADDING_SOURCE] = _summary(float(ce_by_source[0]), int(n_by_source[0]))
    image_sum, image_n = float(ce_image), int(n_image)
    return {
        **_summary(ce_sum, n),
        "by_source": by_source,
        "by_modality": {"text": _summary(ce_sum - image_sum, n - image_n), "image": _summary(image_sum, image_n)},
        "sequences": sequences,
        "batches": total,
        "stage": loader.manifest.get("stage"),
        "stage_dir": str(Path(stage_dir)),
        "fingerprint": loader.fingerprint,
        "document_masking": document_masking,
    }

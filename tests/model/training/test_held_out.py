"""Held-out loss: equal to the training loss's CE, counts that add up and match the shards, trained beats fresh."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from model.generation.inference import load_inference_model
from model.lm.losses import lm_loss
from model.lm.transformer import Transformer
from model.tokenizers.vocabulary import Modality, Vocabulary
from model.training.held_out import heldout_loss
from model.training.stage_loader import StageLoader
from schemas.vocab import VocabLayout

BATCH = 4


@pytest.fixture(scope="module")
def stage(make_stage) -> Path:
    return make_stage(3_000, sequences_per_shard=10)  # several shards; the last batch is a partial one


@pytest.fixture(scope="module")
def loaded(tiny_run: Path):
    return load_inference_model(tiny_run, device="cpu")


def shard_counts(stage: Path) -> tuple[int, Counter, Counter]:
    """(sequences, supervised targets per source name, per modality) read straight from the tars with numpy."""
    manifest = json.loads((stage / "manifest.json").read_text())
    vocab = Vocabulary(VocabLayout.model_validate(manifest["vocab_layout"]))
    by_source, by_modality, sequences = Counter(), Counter(), 0
    for shard in manifest["shards"]:
        with tarfile.open(stage / f"{shard['shard']}.tar") as tar:
            members: dict[str, dict[str, np.ndarray]] = {}
            for info in tar.getmembers():
                key, _, suffix = info.name.partition(".")
                members.setdefault(key, {})[suffix] = np.load(io.BytesIO(tar.extractfile(info).read()))
        for m in members.values():
            sequences += 1
            tokens = m["tokens.npy"].astype(np.int64)
            mask = m["mask.npy"].astype(bool) if "mask.npy" in m else np.ones(len(tokens), bool)
            for start, length, source in m["docs.npy"].T:
                for t in range(max(start, 1), start + length):  # position 0 is never a target
                    if mask[t]:
                        by_source[manifest["source_ids"][source]] += 1
                        kind = vocab.modality(int(tokens[t]))
                        image = kind in (Modality.IMAGE, Modality.BOI, Modality.EOI)
                        by_modality["image" if image else "text"] += 1
    return sequences, by_source, by_modality


def test_overall_loss_is_the_training_ce_on_the_same_batches(loaded, stage: Path) -> None:
    loader = StageLoader(stage, batch_size=BATCH)  # drops the partial tail: compare on its full batches
    image_mask = Vocabulary(loaded.vocab.layout).mask(Modality.IMAGE, Modality.BOI, Modality.EOI)
    sums = {"ce": 0.0, "n": 0, "text": 0.0, "n_text": 0, "image": 0.0, "n_image": 0}
    with torch.no_grad():
        for batch in loader:
            logits = loaded.model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"])
            out = lm_loss(logits, batch["tokens"], batch["loss_mask"], z_loss_weight=0.0, image_token_mask=image_mask)
            sums["ce"] += float(out.ce) * int(out.n_tokens)
            sums["n"] += int(out.n_tokens)
            sums["text"] += float(out.ce_text) * int(out.n_text)
            sums["n_text"] += int(out.n_text)
            sums["image"] += float(out.ce_image) * int(out.n_image)
            sums["n_image"] += int(out.n_image)
    result = heldout_loss(loaded.model, stage, batch_size=BATCH, max_batches=len(loader))
    assert result["tokens"] == sums["n"] and result["batches"] == len(loader)
    assert result["loss"] == pytest.approx(sums["ce"] / sums["n"], abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    text, image = result["by_modality"]["text"], result["by_modality"]["image"]
    assert (text["tokens"], image["tokens"]) == (sums["n_text"], sums["n_image"]) and image["tokens"] > 0
    assert text["loss"] == pytest.approx(sums["text"] / sums["n_text"], abs=1e-5)
    assert image["loss"] == pytest.approx(sums["image"] / sums["n_image"], abs=1e-5)


def test_counts_add_up_and_match_the_shards(loaded, stage: Path) -> None:
    sequences, by_source, by_modality = shard_counts(stage)
    calls = []
    result = heldout_loss(loaded.model, stage, batch_size=BATCH, progress=lambda done, total: calls.append(done))
    assert sequences % BATCH  # the partial last batch is evaluated too
    assert result["sequences"] == sequences and result["batches"] == math.ceil(sequences / BATCH)
    assert calls == list(range(1, result["batches"] + 1))
    assert {k: v["tokens"] for k, v in result["by_source"].items()} == dict(by_source)
    assert {k: v["tokens"] for k, v in result["by_modality"].items()} == dict(by_modality)
    assert set(by_source) == {"prose", "photos"}
    total = result["tokens"]
    assert sum(v["tokens"] for v in result["by_source"].values()) == total
    assert sum(v["tokens"] for v in result["by_modality"].values()) == total
    # The overall loss is the token-weighted mean of the parts.
    weighted = sum(v["loss"] * v["tokens"] for v in result["by_source"].values()) / total
    assert result["loss"] == pytest.approx(weighted, rel=1e-9)
    manifest = json.loads((stage / "manifest.json").read_text())
    assert (result["stage"], result["fingerprint"]) == ("stage1", manifest["fingerprint"])


def test_trained_model_beats_a_fresh_init_and_max_batches_limits(loaded, stage: Path) -> None:
    torch.manual_seed(0)
    fresh = Transformer(loaded.config).eval()
    trained = heldout_loss(loaded.model, stage, batch_size=BATCH)
    untrained = heldout_loss(fresh, stage, batch_size=BATCH)
    assert trained["loss"] < untrained["loss"] - 0.5
    assert trained["by_modality"]["text"]["loss"] < untrained["by_modality"]["text"]["loss"]
    limited = heldout_loss(loaded.model, stage, batch_size=BATCH, max_batches=2)
    assert (limited["batches"], limited["sequences"]) == (2, 2 * BATCH)
    assert 0 < limited["tokens"] < trained["tokens"]
    assert not loaded.model.training


def test_bad_inputs_are_clear_errors(loaded, stage: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a stage folder"):
        heldout_loss(loaded.model, tmp_path)
    other = Transformer(loaded.config.model_copy(update={"vocab_size": loaded.config.vocab_size * 2}))
    with pytest.raises(ValueError, match="the stage's vocabulary has 2048 ids, the model 4096"):
        heldout_loss(other, stage)
    with pytest.raises(ValueError, match="must be > 0"):
        heldout_loss(loaded.model, stage, max_batches=0)

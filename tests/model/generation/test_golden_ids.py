"""Exact ids of seeded generations on a tiny random model, fixed in golden_ids.json: any change to what the
generator samples (modality rules, guidance rows, positions, penalty, top-p, the draws) changes them.

The cases cover text, image and mixed modes, with and without classifier-free guidance, sampled and greedy, batches
of left-padded prompts (one with an image, one ending inside an open image), per-row seeds, and a stream; each runs
on the eager steps and on the static (CUDA-graph shaped) steps. To record new ids after an intended change of
behaviour: `.venv/bin/python tests/model/generation/test_golden_ids.py --write`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.generation.generator import Generator
from model.lm.transformer import Transformer
from model.tokenizers.vocabulary import Vocabulary
from schemas.generate_config import GenerateConfig
from schemas.model_config import ModelConfig
from schemas.vocab import TINY

GOLDEN = Path(__file__).with_name("golden_ids.json")
VOCAB = Vocabulary(TINY)
GREEDY = {"text": {"temperature": 0.0, "repetition_penalty": 1.3}, "image": {"temperature": 0.0}}


def tiny_model() -> Transformer:
    """A seeded random tiny model whose BOI logit is raised, so mixed mode starts images."""
    torch.manual_seed(4)
    model = Transformer(ModelConfig.from_preset("tiny", init_std=0.2)).eval()
    head = nn.Linear(model.config.dim, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.output.weight)
        head.bias.zero_()
        head.bias[VOCAB.boi_id] = 4.0
    model.output = head
    return model


def text_prompt(seed: int, n: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [VOCAB.bos_id, *rng.integers(VOCAB.first_text_id, VOCAB.size, n).tolist()]


def image_prompt(seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    block = VOCAB.image_block(rng.integers(0, VOCAB.n_image_codes, VOCAB.tokens_per_image)).tolist()
    return [*text_prompt(seed, 5), *block, *rng.integers(VOCAB.first_text_id, VOCAB.size, 4).tolist()]


def open_image_prompt(seed: int) -> list[int]:
    """Text, then an image left open after 10 codes: generation must finish it."""
    return [*text_prompt(seed, 3), VOCAB.boi_id, *range(4, 14)]


BATCH = [text_prompt(1, 2), image_prompt(2), text_prompt(3, 7)]
# name: (mode, guidance, sampling overrides, prompts, max_new_tokens, seed, per-row seeds)
CASES = {
    "text_sampled": ("text", True, {}, BATCH, 40, 5, None),
    "text_greedy": ("text", True, GREEDY, BATCH, 30, 0, None),
    "image_guided": ("image", True, {}, BATCH, 80, 3, None),
    "image_unguided": ("image", False, {}, BATCH, 80, 3, None),
    "image_guided_greedy": ("image", True, GREEDY, BATCH[:2], 66, 0, None),
    "mixed_guided": ("mixed", True, {}, BATCH, 160, 7, None),
    "mixed_unguided": ("mixed", False, {}, BATCH, 160, 7, None),
    "mixed_guided_greedy": ("mixed", True, GREEDY, BATCH[:2], 100, 0, None),
    "mixed_open_image_seeds": ("mixed", True, {}, [open_image_prompt(5), *BATCH[:2]], 120, 0, [11, 4, 9]),
    "image_open_image": ("image", True, {}, [open_image_prompt(6), text_prompt(8, 4)], 70, 2, None),
}


def run_case(name: str, static_steps: bool | None) -> list[list[int]]:
    mode, guidance, sampling, prompts, max_new, seed, seeds = CASES[name]
    config = GenerateConfig.model_validate({"checkpoint": str(GOLDEN.parent), **sampling})
    gen = Generator(tiny_model(), VOCAB, config, guidance=guidance, static_steps=static_steps)
    return gen.generate(prompts, mode, max_new, seed, seeds)


def run_stream(static_steps: bool | None) -> list[int]:
    config = GenerateConfig.model_validate({"checkpoint": str(GOLDEN.parent)})
    gen = Generator(tiny_model(), VOCAB, config, static_steps=static_steps)
    return list(gen.stream(image_prompt(9), "mixed", 150, 1))


def record() -> dict:
    golden = {name: run_case(name, None) for name in CASES}
    golden["stream_mixed"] = run_stream(None)
    return golden


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_golden_cases_exercise_what_they_claim(golden):
    # Without images in the mixed cases or differences between guided and unguided ones, the ids would prove less.
    assert set(golden) == {*CASES, "stream_mixed"}
    for name in ("mixed_guided", "mixed_unguided", "mixed_guided_greedy", "stream_mixed"):
        outs = golden[name] if name != "stream_mixed" else [golden[name]]
        assert sum(out.count(VOCAB.boi_id) for out in outs) >= 2, name
    assert golden["image_guided"] != golden["image_unguided"]
    assert golden["mixed_guided"] != golden["mixed_unguided"]
    assert all(len(out) == VOCAB.tokens_per_image + 2 for out in golden["image_guided"])


@pytest.mark.parametrize("static_steps", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("name", list(CASES))
def test_generated_ids_equal_the_golden_ids(golden, name, static_steps):
    assert run_case(name, static_steps) == golden[name]


@pytest.mark.parametrize("static_steps", [False, True], ids=["eager", "static"])
def test_streamed_ids_equal_the_golden_ids(golden, static_steps):
    assert run_stream(static_steps) == golden["stream_mixed"]


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_text(json.dumps(record()) + "\n")

"""KV-cached mixed-modal generation on tiny random models: modality rules, cache/stream/CFG equivalences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.generation.generator import Generator, allowed_mask, stream_segments
from model.generation.sampling import (
    SeenIds,
    draw,
    guided_logits,
    penalize_seen,
    sample_group,
    sample_rows,
    top_p_drop,
)
from model.lm.transformer import Transformer
from model.tokenizers.mixed_tokenizer import ImageSegment, MixedModalTokenizer
from model.tokenizers.text_tokenizer import load_text_tokenizer
from model.tokenizers.vocabulary import Modality, Vocabulary
from schemas.generate_config import GenerateConfig
from schemas.model_config import ModelConfig
from schemas.vocab import TINY

VOCAB = Vocabulary(TINY)
TPI = VOCAB.tokens_per_image  # 64
BLOCK = TPI + 2


def tiny_model(seed: int, boi_bias: float = 0.0, init_std: float = 0.02) -> Transformer:
    """A random tiny model; `boi_bias` is added to BOI's logit so random weights start images now and then."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", init_std=init_std)).eval()
    head = nn.Linear(model.config.dim, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.output.weight)
        head.bias.zero_()
        head.bias[VOCAB.boi_id] = boi_bias
    model.output = head
    return model


def make_config(tmp_path: Path, **overrides) -> GenerateConfig:
    return GenerateConfig.model_validate({"checkpoint": str(tmp_path), **overrides})


def text_prompt(seed: int, n: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [VOCAB.bos_id, *rng.integers(VOCAB.first_text_id, VOCAB.size, n).tolist()]


def image_prompt(seed: int) -> list[int]:
    """`<s>` text, an image block, more text: exercises the image-only guidance row."""
    rng = np.random.default_rng(seed)
    block = VOCAB.image_block(rng.integers(0, VOCAB.n_image_codes, TPI)).tolist()
    return [*text_prompt(seed, 5), *block, *rng.integers(VOCAB.first_text_id, VOCAB.size, 4).tolist()]


def check_mixed(out: list[int], max_new_tokens: int) -> int:
    """Assert the modality grammar of one output; returns the number of images."""
    kinds = VOCAB.modalities(out)
    i, images = 0, 0
    while i < len(out):
        if kinds[i] == Modality.BOI:
            assert max_new_tokens - i >= BLOCK, f"BOI at {i} with {max_new_tokens - i} positions left"
            assert (kinds[i + 1 : i + 1 + TPI] == Modality.IMAGE).all()
            assert kinds[i + 1 + TPI] == Modality.EOI
            i, images = i + BLOCK, images + 1
            continue
        assert kinds[i] == Modality.TEXT or out[i] == VOCAB.eos_id, f"id {out[i]} ({kinds[i]}) outside an image"
        if out[i] == VOCAB.eos_id:
            assert i == len(out) - 1, "tokens after </s>"
        i += 1
    assert len(out) <= max_new_tokens
    return images


# The obvious, one-row-over-all-V way to penalize and sample: references the generator's batched sampling over the
# allowed ids (model.generation.sampling) must equal.


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / Meta penalty: where `seen` [.., V] is True, positive logits are divided and negative multiplied."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits [.., V] with -inf outside the smallest set of most likely ids whose probability reaches `top_p`."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # Drop an id when the ids ranked above it already reach top_p; the most likely id always stays.
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One id from logits [V]: argmax at temperature 0, else temperature, `top_p_filter`, softmax and the
    inverse-CDF draw the generator makes."""
    if temperature == 0:
        return int(logits.argmax())
    probs = top_p_filter(logits.float() / temperature, top_p).softmax(-1)
    return int(draw(probs[None], [generator])[0])


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])
    expected = torch.tensor([[1.0, -4.0, 3.0, -1.0, 0.25]])
    # The generator's penalty: in place, at each row's seen ids among the allowed ids (here ids 0-4).
    scores = logits.clone()
    penalize_seen(scores, torch.arange(5), [SeenIds([0, 1, 4, 99])], 2.0)  # 99 is not allowed: left alone
    assert torch.equal(scores, expected)
    scores = logits.clone()
    penalize_seen(scores, torch.arange(5), [SeenIds([0, 1, 4])], 1.0)
    assert torch.equal(scores, logits)
    # Only the allowed ids are columns: ids 10, 12, 14 of which 12 and 14 were seen.
    scores = torch.tensor([[2.0, -2.0, 3.0], [1.0, 1.0, 1.0]])
    penalize_seen(scores, torch.tensor([10, 12, 14]), [SeenIds([12, 14]), SeenIds([])], 2.0)
    assert torch.equal(scores, torch.tensor([[2.0, -4.0, 1.5], [1.0, 1.0, 1.0]]))
    # The reference the other tests use.
    seen = torch.tensor([[True, True, False, False, True]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), expected)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert (~top_p_drop(probs, 0.8)).tolist() == [True, True, False, False]
    assert (~top_p_drop(probs, 0.01)).tolist() == [True, False, False, False]
    assert (~top_p_drop(probs[[2, 0, 3, 1]], 0.8)).tolist() == [False, True, False, True]  # in any id order
    assert (~top_p_drop(probs, 1.0)).all()
    logits = torch.log(probs)
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [True, False, False, False]


def test_guided_logits_formula():
    full, img, unc = torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([1.0])
    # u + 1.2 (img - u) + 3 (full - img) = 1 + 1.2 + 3
    assert torch.allclose(guided_logits(full, img, unc, 3.0, 1.2), torch.tensor([5.2]))


def test_allowed_mask_rules():
    text, image = VOCAB.mask(Modality.TEXT), VOCAB.mask(Modality.IMAGE)
    m = allowed_mask(VOCAB, "text", False, 0, 1000)
    assert not m[VOCAB.boi_id] and not (m & image).any() and m[VOCAB.eos_id] and torch.equal(m & text, text)
    assert not m[VOCAB.eoi_id] and not m[VOCAB.sep_id] and not m[VOCAB.bos_id] and not m[VOCAB.pad_id]
    assert allowed_mask(VOCAB, "mixed", False, 0, BLOCK)[VOCAB.boi_id]
    assert not allowed_mask(VOCAB, "mixed", False, 0, BLOCK - 1)[VOCAB.boi_id]
    assert allowed_mask(VOCAB, "image", False, 0, 1000).nonzero().flatten().tolist() == [VOCAB.boi_id]
    assert torch.equal(allowed_mask(VOCAB, "mixed", True, 5, 1000), image)
    assert allowed_mask(VOCAB, "image", True, 0, 1000).nonzero().flatten().tolist() == [VOCAB.eoi_id]
    with pytest.raises(ValueError, match="mode"):
        allowed_mask(VOCAB, "video", False, 0, 10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_modality_grammar_holds_on_random_models(tmp_path, seed):
    # High init_std gives peaked random logits; the BOI bias makes images start within a few dozen tokens.
    model = tiny_model(seed, boi_bias=4.0, init_std=0.2)
    gen = Generator(model, VOCAB, make_config(tmp_path, text={"temperature": 1.0, "repetition_penalty": 1.3}))
    prompts = [text_prompt(seed, 3), image_prompt(seed)]
    for out in gen.generate(prompts, "text", 40, seed):
        kinds = VOCAB.modalities(out)
        assert ((kinds == Modality.TEXT) | (np.asarray(out) == VOCAB.eos_id)).all()
    mixed = gen.generate(prompts, "mixed", 150, seed)
    assert sum(check_mixed(out, 150) for out in mixed) > 0, "no image was generated; the test would prove nothing"
    for out in gen.generate(prompts, "image", 80, seed):
        assert out[0] == VOCAB.boi_id and out[-1] == VOCAB.eoi_id and len(out) == BLOCK
        assert (VOCAB.modalities(out[1:-1]) == Modality.IMAGE).all()


def test_boi_needs_room_for_a_whole_image(tmp_path):
    # A BOI bias this large makes BOI the pick whenever it is allowed.
    model = tiny_model(0, boi_bias=50.0)
    gen = Generator(model, VOCAB, make_config(tmp_path))
    prompt = [text_prompt(0, 4)]
    assert VOCAB.boi_id not in gen.generate(prompt, "mixed", BLOCK - 1, 0)[0]
    exact = gen.generate(prompt, "mixed", BLOCK, 0)[0]
    assert exact[0] == VOCAB.boi_id and exact[-1] == VOCAB.eoi_id and len(exact) == BLOCK
    longer = gen.generate(prompt, "mixed", BLOCK + 10, 0)[0]
    assert longer[:1] == [VOCAB.boi_id] and longer.count(VOCAB.boi_id) == 1
    check_mixed(longer, BLOCK + 10)


def test_prompt_ending_with_boi_continues_the_image(tmp_path):
    gen = Generator(tiny_model(0), VOCAB, make_config(tmp_path))
    out = gen.generate([[*text_prompt(0, 3), VOCAB.boi_id]], "mixed", 70, 0)[0]
    assert (VOCAB.modalities(out[:TPI]) == Modality.IMAGE).all() and out[TPI] == VOCAB.eoi_id
    with pytest.raises(ValueError, match="inside an image"):
        gen.generate([[*text_prompt(0, 3), VOCAB.boi_id]], "text", 70, 0)


def test_stream_equals_batch(tmp_path):
    gen = Generator(tiny_model(3, boi_bias=4.0, init_std=0.2), VOCAB, make_config(tmp_path))
    # Different lengths, so the first prompt is left-padded in the batch.
    prompts = [text_prompt(1, 2), image_prompt(2)]
    batch = gen.generate(prompts, "mixed", 120, 7)
    stream = gen.stream(prompts[0], "mixed", 120, 7)
    next(stream)
    assert torch.is_grad_enabled(), "the stream must not leave no_grad on in the caller"
    assert batch[0] != batch[1]
    # Row i samples with seed + i, so each prompt alone reproduces its row of the batch.
    assert [list(gen.stream(prompts[0], "mixed", 120, 7)), list(gen.stream(prompts[1], "mixed", 120, 8))] == batch
    # A left-padded tensor batch is the same prompts.
    padded = torch.full((2, len(prompts[1])), VOCAB.pad_id)
    padded[0, -len(prompts[0]) :] = torch.tensor(prompts[0])
    padded[1] = torch.tensor(prompts[1])
    assert gen.generate(padded, "mixed", 120, 7) == batch


@pytest.mark.parametrize("mode", ["text", "mixed", "image"])
def test_cache_equals_full_recompute_greedy(tmp_path, mode):
    config = make_config(tmp_path, text={"temperature": 0.0}, image={"temperature": 0.0})
    model = tiny_model(4, boi_bias=4.0, init_std=0.2)
    prompts = [text_prompt(5, 1), image_prompt(6)]
    cached = Generator(model, VOCAB, config).generate(prompts, mode, 100, 0)
    recomputed = Generator(model, VOCAB, config, use_cache=False).generate(prompts, mode, 100, 0)
    assert cached == recomputed
    if mode == "mixed":
        assert VOCAB.boi_id in cached[0] + cached[1]


@pytest.mark.parametrize("mode", ["text", "mixed", "image"])
def test_static_steps_equal_the_eager_path(tmp_path, mode):
    # The fixed-shape steps CUDA graphs replay (run eagerly here), with padding and guidance rows: same samples.
    config = make_config(tmp_path)
    model = tiny_model(4, boi_bias=4.0, init_std=0.2)
    prompts = [text_prompt(5, 1), image_prompt(6)]
    eager = Generator(model, VOCAB, config).generate(prompts, mode, 100, 3)
    static = Generator(model, VOCAB, config, static_steps=True)
    assert static.generate(prompts, mode, 100, 3) == eager
    if mode != "text":
        assert VOCAB.boi_id in eager[0] + eager[1]
    # The buffers (on CUDA, the captured graph) are kept for the next generation of the same shape, and replaced
    # for another shape; a stream left open keeps its own while other generations run.
    kept = static._workspace
    assert kept is not None and static.generate(prompts, mode, 100, 3) == eager and static._workspace is kept
    other = Generator(model, VOCAB, config).generate(prompts[:1], mode, 80, 5)
    open_stream = static.stream(prompts[1], mode, 100, 4)
    first = next(open_stream)
    assert static.generate(prompts[:1], mode, 80, 5) == other
    assert [first, *open_stream] == Generator(model, VOCAB, config).generate([prompts[1]], mode, 100, 4)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["text", "mixed"])
def test_cuda_graph_decoding_equals_eager_decoding(tmp_path, mode):
    config = make_config(tmp_path, text={"temperature": 0.0}, image={"temperature": 0.0})
    model = tiny_model(4, boi_bias=4.0, init_std=0.2).cuda()
    prompts = [text_prompt(5, 1), image_prompt(6)]
    graphed = Generator(model, VOCAB, config).generate(prompts, mode, 100, 0)
    assert graphed == Generator(model, VOCAB, config, static_steps=False).generate(prompts, mode, 100, 0)


def test_text_greedy_matches_plain_forward(tmp_path):
    # The generator's own masked forward must agree with Transformer.forward on an unpadded sequence.
    model = tiny_model(5, init_std=0.2)
    config = make_config(tmp_path, text={"temperature": 0.0, "repetition_penalty": 1.0})
    prompt = text_prompt(3, 6)
    out = Generator(model, VOCAB, config).generate([prompt], "text", 20, 0)[0]
    allowed = allowed_mask(VOCAB, "text", False, 0, 0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            logits = model(torch.tensor([ids]))[0, -1].masked_fill(~allowed, float("-inf"))
            ids.append(int(logits.argmax()))
            if ids[-1] == VOCAB.eos_id:
                break
    assert out == ids[len(prompt) :]


@pytest.mark.parametrize("mode", ["image", "mixed"])
def test_cfg_with_unit_scales_equals_conditional_sampling(tmp_path, mode):
    model = tiny_model(6, boi_bias=4.0, init_std=0.2)
    unit = make_config(tmp_path, image={"cfg_text": 1.0, "cfg_image": 1.0})
    prompts = [image_prompt(1), text_prompt(2, 3)]
    guided = Generator(model, VOCAB, unit).generate(prompts, mode, 120, 3)
    plain = Generator(model, VOCAB, unit, guidance=False).generate(prompts, mode, 120, 3)
    assert guided == plain
    # With the default scales guidance changes the codes (so the guidance rows really are used).
    default = Generator(model, VOCAB, make_config(tmp_path)).generate(prompts, "image", 80, 3)
    assert default != Generator(model, VOCAB, unit, guidance=False).generate(prompts, "image", 80, 3)


def test_same_seed_same_output(tmp_path):
    gen = Generator(tiny_model(7, boi_bias=4.0, init_std=0.2), VOCAB, make_config(tmp_path))
    prompts = [text_prompt(0, 3)]
    first = gen.generate(prompts, "mixed", 100, 11)
    assert gen.generate(prompts, "mixed", 100, 11) == first
    assert gen.generate(prompts, "mixed", 100, 12) != first


def test_bad_requests_raise(tmp_path):
    gen = Generator(tiny_model(0), VOCAB, make_config(tmp_path))
    with pytest.raises(ValueError, match="image mode needs"):
        gen.generate([text_prompt(0, 2)], "image", BLOCK - 1, 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate([text_prompt(0, 2)], "text", 1000, 0)


def test_malformed_prompts_are_refused_naming_the_position(tmp_path):
    gen = Generator(tiny_model(0), VOCAB, make_config(tmp_path))
    text = text_prompt(0, 3)
    cases = [  # the second prompt of a batch is the bad one
        ([*text, VOCAB.boi_id, text[1], text[2]], r"prompt 1, position 5: id \d+ \(TEXT\) after 0 of an image's 64"),
        ([*text, VOCAB.eoi_id], r"prompt 1, position 4: id \d+ \(EOI\) outside an image"),
        ([*text, 5], r"prompt 1, position 4: id 5 \(IMAGE\) outside an image"),
        ([*text, VOCAB.pad_id, text[1]], r"prompt 1, position 4: id 1: <pad> inside a prompt"),
        ([*text, VOCAB.size], rf"prompt 1, position 4: id {VOCAB.size} is outside the vocabulary"),
        ([*text, VOCAB.boi_id, *range(4, 4 + TPI), 4], r"prompt 1, position \d+: id 4 \(IMAGE\) after 64 of"),
    ]
    for prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            gen.generate([text, prompt], "mixed", 70, 0)
    with pytest.raises(ValueError, match="stream takes one prompt; got a tensor of 2 rows"):
        next(gen.stream(torch.tensor([text, text]), "text", 4, 0))
    with pytest.raises(ValueError, match="max_new_tokens must be > 0, got 0"):  # 0 is not "the config's default"
        gen.generate([text], "text", 0, 0)
    # Left padding, whole images and an image left open at the end are all fine.
    padded = [VOCAB.pad_id, VOCAB.pad_id, *image_prompt(1), VOCAB.boi_id, 4, 5]
    assert len(gen.generate([padded], "mixed", 70, 0)[0]) > 0


def test_stream_segments_of_a_prompt_that_leaves_an_image_open(tmp_path, tiny_tokenizers):
    tokenizer = MixedModalTokenizer(load_text_tokenizer(tiny_tokenizers["text"]))
    gen = Generator(tiny_model(0), VOCAB, make_config(tmp_path))
    prompt = [*text_prompt(0, 3), VOCAB.boi_id, *range(4, 4 + 10)]  # 10 of the image's 64 codes given
    ids = gen.generate([prompt], "mixed", 70, 0)[0]
    segments = list(gen.stream_segments(tokenizer, prompt, "mixed", 70, 0))
    image = segments[0]
    assert isinstance(image, ImageSegment)  # the prompt's 10 codes and the 54 generated, whole at its EOI
    assert image.codes.tolist() == [c - 4 for c in [*range(4, 14), *ids[: TPI - 10]]]


def test_stream_segments_yields_text_and_images(tmp_path, tiny_tokenizers):
    tokenizer = MixedModalTokenizer(load_text_tokenizer(tiny_tokenizers["text"]))
    gen = Generator(tiny_model(0, boi_bias=50.0), VOCAB, make_config(tmp_path))
    ids = list(gen.stream(text_prompt(0, 2), "mixed", BLOCK + 5, 0))
    segments = list(gen.stream_segments(tokenizer, text_prompt(0, 2), "mixed", BLOCK + 5, 0))
    assert isinstance(segments[0], ImageSegment) and segments[0].codes.shape == (TPI,)
    assert segments == list(stream_segments(tokenizer, iter(ids)))
    # Streamed pieces are the one-shot decode split into smaller text chunks.
    whole = tokenizer.decode(ids, decode_images=False)
    assert whole[0] == segments[0] and whole[1] == "".join(segments[1:])


def reference_greedy(model: Transformer, prompt: list[int], mode: str, max_new_tokens: int, config: GenerateConfig):
    """Meta's scheme written the slow, obvious way: every stream re-run from scratch with Transformer.forward."""

    def last_logits(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids]))[0, -1]

    seq, out, in_image, codes_left, boi_at = list(prompt), [], False, 0, 0
    text_ids = VOCAB.mask(Modality.TEXT)
    while len(out) < max_new_tokens:
        allowed = allowed_mask(VOCAB, mode, in_image, codes_left, max_new_tokens - len(out))
        if int(allowed.sum()) == 1:
            token = int(allowed.nonzero()[0, 0])
        elif in_image:
            keep = (Modality.IMAGE, Modality.BOI, Modality.EOI)
            image_only = [t for t in seq if t == VOCAB.bos_id or VOCAB.modality(t) in keep]
            unconditional = [VOCAB.bos_id, *seq[boi_at:]]
            scores = guided_logits(
                last_logits(seq),
                last_logits(image_only),
                last_logits(unconditional),
                config.image.cfg_text,
                config.image.cfg_image,
            )
            token = int(scores.masked_fill(~allowed, float("-inf")).argmax())
        else:
            seen = torch.zeros(VOCAB.size, dtype=torch.bool)
            seen[seq] = True
            scores = apply_repetition_penalty(last_logits(seq), seen & text_ids, config.text.repetition_penalty)
            token = int(scores.masked_fill(~allowed, float("-inf")).argmax())
        seq.append(token)
        out.append(token)
        kind = VOCAB.modality(token)
        if kind == Modality.BOI:
            in_image, codes_left, boi_at = True, TPI, len(seq) - 1
        elif kind == Modality.IMAGE:
            codes_left -= 1
        elif kind == Modality.EOI:
            in_image = False
            if mode == "image":
                break
        elif token == VOCAB.eos_id:
            break
    return out


@pytest.mark.parametrize("mode", ["image", "mixed"])
def test_guided_greedy_matches_slow_reference(tmp_path, mode):
    # Checks what the guidance rows see: text dropped from the image row, only the current image in the
    # unconditional row (also after a second BOI), positions counted per stream, the penalty over the context.
    config = make_config(tmp_path, text={"temperature": 0.0}, image={"temperature": 0.0})
    model = tiny_model(8, boi_bias=4.0, init_std=0.2)
    prompt = image_prompt(9)
    expected = reference_greedy(model, prompt, mode, 180, config)
    if mode == "mixed":
        assert expected.count(VOCAB.boi_id) >= 2, "the reference must cover a second image"
    with torch.no_grad():
        assert Generator(model, VOCAB, config).generate([text_prompt(1, 9), prompt], mode, 180, 0)[1] == expected


def test_plan_segments_are_in_ascending_id_order():
    # Runs and the gathered ids between them, in id order, so the logits need no reordering after the concat.
    from model.generation.generator import _plan_columns, _plan_segments

    plan = (((10, 80), (100, 200)), (250, 2, 90, 3))
    assert _plan_segments(plan) == ((2, 3), range(10, 80), (90,), range(100, 200), (250,))
    assert _plan_segments((((4, 260),), ())) == (range(4, 260),)
    ids = np.concatenate(
        [np.array(s) if isinstance(s, tuple) else np.arange(s.start, s.stop) for s in _plan_segments(plan)]
    )
    assert np.array_equal(ids, _plan_columns(plan))


def test_restricted_output_logits_equal_full_logits():
    # The fast path computes only the output rows a step may sample (runs + gathered ids); the rest must be -inf
    # and the computed ones must equal the full output layer's.
    from model.generation.generator import _forward_last, _kind_mask, _logit_plan, _plan_columns

    model = tiny_model(2, boi_bias=3.0, init_std=0.2)
    tokens = torch.tensor([text_prompt(4, 9)])
    positions = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        full = _forward_last(model, tokens, positions, None, None, 0)
        torch.testing.assert_close(full, model(tokens)[:, -1].float(), atol=1e-5, rtol=1e-5)
        for keys in [
            {((Modality.TEXT,), (VOCAB.eos_id, VOCAB.boi_id))},
            {((Modality.IMAGE,), ())},
            {((Modality.IMAGE,), ()), ((Modality.TEXT,), (VOCAB.eos_id,))},
        ]:
            plan = _logit_plan(VOCAB, frozenset(keys))
            # Text plus image codes cover 99% of the tiny vocabulary: then every logit is computed (plan None).
            assert (plan is None) == (len(keys) == 2) and (plan is None or plan[0])
            part = _forward_last(model, tokens, positions, None, None, 0, plan)
            need = torch.zeros(VOCAB.size, dtype=torch.bool)
            for k in keys:
                need |= _kind_mask(VOCAB, *k)
            if plan is None:
                torch.testing.assert_close(part, full)
            else:  # exactly the needed ids' logits, in ascending id order
                torch.testing.assert_close(part, full[:, need], atol=1e-5, rtol=1e-5)
                assert torch.equal(torch.from_numpy(_plan_columns(plan)), need.nonzero().flatten())
        assert _forward_last(model, tokens, positions, None, model.make_cache(1, 20), 0, ()) is None


def test_sampling_fast_paths_equal_reference_functions():
    # The generator samples a whole group of rows at once over the allowed ids only; row by row over all V with
    # the obvious functions (penalty over a seen mask, top_p_filter, softmax) must give the same ids.
    torch.manual_seed(0)
    image = VOCAB.mask(Modality.IMAGE)
    image_ids = image.nonzero().flatten()
    text = VOCAB.mask(Modality.TEXT)
    text_ids = text.nonzero().flatten()
    logits = torch.randn(6, VOCAB.size) * 3
    gens = [torch.Generator().manual_seed(seed) for seed in range(3)]
    for n_drawn in range(20):
        rows = [0, 2, 5]
        picked = sample_group(logits, rows, image_ids, image_ids, 0.7, 0.9, gens)
        refs = [torch.Generator().manual_seed(seed) for seed in range(3)]
        for _ in range(n_drawn):  # the reference generators catch up with the draws already made
            for g in refs:
                torch.rand(1, generator=g)
        expected = [
            sample(logits[r].masked_fill(~image, float("-inf")), 0.7, 0.9, g) for r, g in zip(rows, refs, strict=True)
        ]
        assert picked == expected
    seen_ids = [[300, 301, 999, 2000], [], [5, 300]]
    seen = [SeenIds(ids) for ids in seen_ids]
    greedy = sample_group(logits, [0, 1, 2], text_ids, text_ids, 0.0, 1.0, [None] * 3, seen=seen, penalty=1.3)
    for r, ids in enumerate(seen_ids):
        mask = torch.zeros(VOCAB.size, dtype=torch.bool)
        mask[ids] = True
        reference = apply_repetition_penalty(logits[r], mask, 1.3).masked_fill(~text, float("-inf"))
        assert greedy[r] == int(reference.argmax())
    unchanged = logits.clone()
    sample_group(logits, [0, 1, 2], None, torch.arange(VOCAB.size), 0.0, 1.0, [None] * 3, seen=seen, penalty=1.3)
    assert torch.equal(logits, unchanged)  # the penalty works on a copy


def test_a_rows_draws_do_not_depend_on_its_batch_mates():
    scores = torch.randn(4, 50)
    together = sample_rows(scores, 0.9, 0.8, [torch.Generator().manual_seed(s) for s in range(4)])
    alone = [int(sample_rows(scores[r : r + 1], 0.9, 0.8, [torch.Generator().manual_seed(r)])[0]) for r in range(4)]
    assert together.tolist() == alone


def test_sample_rows_follows_the_top_p_distribution():
    # 40,000 draws of one row: each kept id's frequency is its renormalised probability; dropped ids never appear.
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    probs = logits.softmax(-1)
    kept = torch.isfinite(top_p_filter(logits, 0.9))
    expected = torch.where(kept, probs, 0.0) / probs[kept].sum()
    gen = torch.Generator().manual_seed(0)
    draws = sample_rows(logits.expand(40_000, -1), 1.0, 0.9, [gen] * 40_000)
    freq = torch.bincount(draws, minlength=len(logits)).float() / len(draws)
    assert (freq[~kept] == 0).all()
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("mode", ["text", "mixed"])
def test_padded_batch_equals_each_prompt_alone_greedy(tmp_path, mode):
    # Alone, a prompt runs the unmasked fast path (every column valid); in a batch with a longer prompt it is
    # left-padded and runs the masked path. Greedy outputs must agree.
    config = make_config(tmp_path, text={"temperature": 0.0}, image={"temperature": 0.0})
    gen = Generator(tiny_model(9, boi_bias=4.0, init_std=0.2), VOCAB, config, guidance=False)
    prompts = [text_prompt(1, 3), text_prompt(2, 11)]
    batch = gen.generate(prompts, mode, 90, 0)
    assert batch == [gen.generate([p], mode, 90, 0)[0] for p in prompts]
    if mode == "mixed":
        assert VOCAB.boi_id in batch[0] + batch[1]


def test_sampling_non_finite_logits_is_a_clear_error():
    scores = torch.randn(2, 10)
    scores[1, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        sample_rows(scores, 0.7, 0.9, [torch.Generator(), torch.Generator()])


def test_stream_state_machine_walks_text_an_image_and_the_end():
    from model.generation.generator import _Stream

    text_key = ((Modality.TEXT,), (VOCAB.eos_id,))
    st = _Stream.after_prompt(VOCAB, "mixed", text_prompt(0, 3), 2, BLOCK + 5, 0)
    assert (st.in_image, st.done, st.allowed(BLOCK)) == (False, False, ((Modality.TEXT,), (VOCAB.eos_id, VOCAB.boi_id)))
    assert st.allowed(BLOCK - 1) == text_key  # a whole image no longer fits
    word = VOCAB.first_text_id + 3
    assert st.advance(word, 10) == Modality.TEXT and word in st.seen.ids
    assert st.advance(VOCAB.boi_id, 11) == Modality.BOI
    assert (st.in_image, st.codes_left, st.boi_col) == (True, TPI, 11)
    for n in range(TPI):
        assert st.allowed(100) == ((Modality.IMAGE,), ()) and st.advance(4 + n, 12 + n) == Modality.IMAGE
    assert st.codes_left == 0 and st.allowed(100) == ((), (VOCAB.eoi_id,))  # EOI is forced
    assert st.advance(VOCAB.eoi_id, 12 + TPI) == Modality.EOI and not st.in_image and not st.done  # mixed goes on
    assert st.allowed(100) == ((Modality.TEXT,), (VOCAB.eos_id, VOCAB.boi_id))
    st.advance(VOCAB.eos_id, 13 + TPI)
    assert st.done and st.allowed(100) is None
    # Image mode: BOI is forced first and the EOI ends it; a prompt's open image is continued.
    image = _Stream.after_prompt(VOCAB, "image", [*text_prompt(0, 3), VOCAB.boi_id, 4, 5], 1, BLOCK, 0)
    assert (image.in_image, image.codes_left, image.boi_col) == (True, TPI - 2, 1 + 4)
    image.codes_left = 0
    image.advance(VOCAB.eoi_id, 30)
    assert image.done
    assert _Stream.after_prompt(VOCAB, "image", text_prompt(0, 3), 0, BLOCK, 0).allowed(BLOCK) == ((), (VOCAB.boi_id,))


def test_a_failed_graph_capture_decodes_eagerly_with_a_warning(tmp_path, monkeypatch):
    import model.generation.generator as generator

    def fail(*args, **kwargs):
        raise RuntimeError("capture is not supported here")

    config = make_config(tmp_path)
    model = tiny_model(4, boi_bias=4.0, init_std=0.2)
    prompts = [text_prompt(5, 1), image_prompt(6)]
    eager = Generator(model, VOCAB, config).generate(prompts, "mixed", 80, 3)
    monkeypatch.setattr(generator, "GraphedDecode", fail)
    static = Generator(model, VOCAB, config, static_steps=True)
    with pytest.warns(UserWarning, match="CUDA graph capture failed, decoding without it: capture is not supported"):
        assert static.generate(prompts, "mixed", 80, 3) == eager
    # Later generations of this Generator do not try again, and no workspace is kept for them.
    assert static.static_steps is False and static._workspace is None

"""KV-cached sampling of text, images or both from a Chameleon transformer (Meta's `chameleon/inference` rules).

Text steps allow text ids and `</s>` (plus BOI in mixed mode while a whole image still fits); after BOI exactly
`tokens_per_image` image codes are sampled and EOI is appended without sampling. Image codes use Meta's in-batch
three-stream classifier-free guidance: rows [full prompt ; prompt with only `<s>` and image blocks ; `<s>` + the
current image], mixed as `u + s_img * (img - u) + s_txt * (full - img)`.

Unlike Meta, which re-prefills a fresh cache at every modality switch, one cache lives for the whole generation.
All rows get every token at the same cache column; a per-row validity mask decides which columns a row attends to
(left padding, text in the guidance rows, earlier images in the unconditional row) and each row counts its own
positions over its valid columns, so every row sees exactly the sequence Meta would have fed it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from model.mixed_tokenizer import MixedModalTokenizer, Segment
from model.transformer import KVCache, Transformer
from model.vocabulary import Modality, Vocabulary
from schemas.generate_config import GenerateConfig, GenerationMode

MODES = ("text", "image", "mixed")


@lru_cache(maxsize=64)
def _kind_mask(vocab: Vocabulary, kinds: tuple[Modality, ...], extra: tuple[int, ...] = ()) -> torch.Tensor:
    # Cached because np.isin over Meta's 65,536 ids on every step would dominate small-model decoding.
    mask = vocab.mask(*kinds) if kinds else torch.zeros(vocab.size, dtype=torch.bool)
    mask[list(extra)] = True
    return mask


def allowed_mask(vocab: Vocabulary, mode: str, in_image: bool, codes_left: int, positions_left: int) -> torch.Tensor:
    """Bool [V]: the ids the next token may be.

    Inside an image: the image codes while `codes_left > 0`, then only EOI (which the generator inserts without
    sampling). Outside: `image` mode allows only BOI; `text` allows text ids and `</s>`; `mixed` also BOI when
    `positions_left` (new tokens still allowed, this one included) holds BOI, the codes and EOI.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if in_image:
        mask = _kind_mask(vocab, (Modality.IMAGE,)) if codes_left > 0 else _kind_mask(vocab, (), (vocab.eoi_id,))
    elif mode == "image":
        mask = _kind_mask(vocab, (), (vocab.boi_id,))
    elif mode == "mixed" and positions_left >= vocab.tokens_per_image + 2:
        mask = _kind_mask(vocab, (Modality.TEXT,), (vocab.eos_id, vocab.boi_id))
    else:
        mask = _kind_mask(vocab, (Modality.TEXT,), (vocab.eos_id,))
    return mask.clone()  # the cached tensor must not be changed by a caller


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
    """One id from logits [V]: argmax when temperature is 0, else temperature, top-p, multinomial draw."""
    if temperature == 0:
        return int(logits.argmax())
    filtered = top_p_filter(logits.float() / temperature, top_p)
    return int(torch.multinomial(filtered.softmax(-1), 1, generator=generator))


def guided_logits(full: torch.Tensor, img: torch.Tensor, unc: torch.Tensor, s_txt: float, s_img: float) -> torch.Tensor:
    """Meta's InstructPix2Pix-style guidance: u + s_img * (img - u) + s_txt * (full - img)."""
    return unc + s_img * (img - unc) + s_txt * (full - img)


def _forward_last(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                  cache: KVCache | None, start_pos: int) -> torch.Tensor:  # fmt: skip
    # Transformer.forward builds its own causal mask with a cache, which would let rows attend padding; the layers
    # take an explicit mask, so the same embedding -> layers -> norm -> output path runs with the validity mask.
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, positions, mask[:, None], cache, start_pos)
    return model.output(model.norm(h[:, -1])).float()


def _attention_mask(valid: torch.Tensor, start_pos: int, n_new: int) -> torch.Tensor:
    """[R, n_new, start_pos + n_new]: causal over valid columns; every query also sees itself (no empty rows)."""
    end = start_pos + n_new
    q = torch.arange(start_pos, end, device=valid.device)[:, None]
    k = torch.arange(end, device=valid.device)[None, :]
    return (valid[:, None, :end] & (k <= q)) | (k == q)


@dataclass
class _Stream:
    """Decoding state of one prompt."""

    in_image: bool = False
    codes_left: int = 0
    boi_col: int = -1  # cache column of the current image's BOI
    done: bool = False


class Generator:
    """Samples continuations of prompts with one KV cache kept across text and image segments.

    `guidance=False` samples image codes from the full prompt alone (no guidance rows); `use_cache=False`
    recomputes the whole sequence every step (a reference for tests; same masks and positions). The model is used
    as given: put it in eval mode first, or dropout stays on.
    """

    def __init__(self, model: Transformer, vocab: Vocabulary, config: GenerateConfig, guidance: bool = True,
                 use_cache: bool = True):  # fmt: skip
        if model.config.vocab_size != vocab.size:
            raise ValueError(f"model has {model.config.vocab_size} ids but the vocabulary {vocab.size}")
        self.model, self.vocab, self.config = model, vocab, config
        self.guidance = guidance
        self.use_cache = use_cache
        self._text_ids = vocab.mask(Modality.TEXT)

    def _prompts(self, prompt_ids: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
        rows = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else [list(map(int, p)) for p in prompt_ids]
        prompts = []
        for row in rows:
            start = 0
            while start < len(row) and row[start] == self.vocab.pad_id:  # left padding of a batched tensor
                start += 1
            ids = row[start:]
            # Meta prepends <s> to every prompt; the guidance rows are `<s> ...` so they need it too.
            prompts.append(ids if ids and ids[0] == self.vocab.bos_id else [self.vocab.bos_id, *ids])
        if not prompts:
            raise ValueError("no prompts")
        return prompts

    def _start_state(self, ids: list[int], mode: str, pad: int, max_new_tokens: int) -> _Stream:
        """State after the prompt: a prompt may end inside an image (e.g. with BOI) and then continues it."""
        state = _Stream()
        bois = [i for i, t in enumerate(ids) if t == self.vocab.boi_id]
        eois = [i for i, t in enumerate(ids) if t == self.vocab.eoi_id]
        if bois and (not eois or bois[-1] > eois[-1]):
            state.in_image, state.boi_col = True, pad + bois[-1]
            state.codes_left = self.vocab.tokens_per_image - (len(ids) - bois[-1] - 1)
            if mode == "text" or state.codes_left < 0:
                raise ValueError(f"prompt ends inside an image ({len(ids) - bois[-1] - 1} codes) in {mode} mode")
            if state.codes_left + 1 > max_new_tokens:
                raise ValueError(f"max_new_tokens {max_new_tokens} cannot finish the prompt's open image")
        elif mode == "image" and max_new_tokens < self.vocab.tokens_per_image + 2:
            raise ValueError(f"image mode needs max_new_tokens >= {self.vocab.tokens_per_image + 2}")
        return state

    def _steps(self, prompt_ids, mode: GenerationMode, max_new_tokens: int, seed: int) -> Iterator[list[int | None]]:
        """Yields, per step, the new id of every prompt (None once it has finished)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        vocab, model, text_cfg, image_cfg = self.vocab, self.model, self.config.text, self.config.image
        prompts = self._prompts(prompt_ids)
        b, plen = len(prompts), max(len(p) for p in prompts)
        total = plen + max_new_tokens
        if total > model.config.max_seq_len:
            raise ValueError(f"prompt ({plen}) + max_new_tokens ({max_new_tokens}) > max_seq_len")
        device = model.output.weight.device
        states = [self._start_state(p, mode, plen - len(p), max_new_tokens) for p in prompts]
        # Row i samples with its own generator (seed + i): a prompt's output does not depend on its batch-mates.
        gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(b)]
        n_groups = 3 if self.guidance and mode != "text" else 1
        rows = b * n_groups

        tokens = torch.full((rows, total), vocab.pad_id, dtype=torch.long, device=device)
        valid = torch.zeros((rows, total), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            ids = torch.tensor(p, device=device)
            for g in range(n_groups):
                tokens[g * b + i, plen - len(p) : plen] = ids
            valid[i, plen - len(p) : plen] = True
            if n_groups == 3:
                kinds = torch.from_numpy(vocab.modalities(p)).to(device)
                keep = (kinds == Modality.IMAGE) | (kinds == Modality.BOI) | (kinds == Modality.EOI)
                valid[b + i, plen - len(p) : plen] = keep | (ids == vocab.bos_id)
                valid[2 * b + i, plen - len(p)] = True  # the unconditional row: <s>
                if states[i].in_image:  # ... plus the open image of the prompt
                    valid[2 * b + i, states[i].boi_col : plen] = True
        # Each row numbers only the tokens it attends: left padding and dropped text do not shift positions.
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        seen = torch.zeros((b, vocab.size), dtype=torch.bool)  # on the CPU, with the logits
        for i, p in enumerate(prompts):
            seen[i, p] = True
        seen &= self._text_ids  # Meta penalizes the whole context; only text ids can repeat in text

        cache = model.make_cache(rows, total) if self.use_cache else None

        def run(start: int, end: int) -> torch.Tensor:
            if cache is None:  # recompute everything: the reference the cached path must match
                start = 0
            mask = _attention_mask(valid[:, :end], start, end - start)
            # no_grad here, not around the loop: a context held across `yield` would leak into the caller.
            with torch.no_grad():
                logits = _forward_last(model, tokens[:, start:end], positions[:, start:end], mask, cache, start)
            # Sampled on the CPU with CPU generators, so a seed gives the same draws on any device.
            return logits.cpu()

        logits = run(0, plen)
        for step in range(max_new_tokens):
            col = plen + step
            new: list[int | None] = []
            for i, st in enumerate(states):
                if st.done:
                    new.append(None)
                    continue
                allowed = allowed_mask(vocab, mode, st.in_image, st.codes_left, max_new_tokens - step)
                if int(allowed.sum()) == 1:  # BOI in image mode, EOI after the last code: inserted, not sampled
                    token = int(allowed.nonzero()[0, 0])
                elif st.in_image:
                    scores = logits[i]
                    if n_groups == 3:
                        scores = guided_logits(
                            scores, logits[b + i], logits[2 * b + i], image_cfg.cfg_text, image_cfg.cfg_image
                        )
                    scores = scores.masked_fill(~allowed, float("-inf"))
                    token = sample(scores, image_cfg.temperature, image_cfg.top_p, gens[i])
                else:
                    scores = apply_repetition_penalty(logits[i], seen[i], text_cfg.repetition_penalty)
                    scores = scores.masked_fill(~allowed, float("-inf"))
                    token = sample(scores, text_cfg.temperature, text_cfg.top_p, gens[i])
                self._advance(st, i, token, col, mode, b, n_groups, tokens, valid, positions, seen)
                new.append(token)
            yield new
            if all(st.done for st in states) or step == max_new_tokens - 1:
                break
            logits = run(col, col + 1)

    def _advance(self, st: _Stream, i: int, token: int, col: int, mode: str, b: int, n_groups: int,
                 tokens: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                 seen: torch.Tensor) -> None:  # fmt: skip
        """Record prompt i's new token in its rows and move its state machine."""
        vocab = self.vocab
        kind = vocab.modality(token)
        rows = [g * b + i for g in range(n_groups)]
        tokens[rows, col] = token
        valid[i, col] = True
        if kind == Modality.TEXT:
            seen[i, token] = True
        if kind == Modality.BOI:
            st.in_image, st.codes_left, st.boi_col = True, vocab.tokens_per_image, col
            if n_groups == 3:
                # The unconditional stream is `<s>` + this image only (Meta rebuilds it as [<s>, BOI] per image).
                first = int(valid[2 * b + i].nonzero()[0, 0])
                valid[2 * b + i, first + 1 : col] = False
        elif kind == Modality.IMAGE:
            st.codes_left -= 1
        elif kind == Modality.EOI:
            st.in_image = False
            st.done = mode == "image"
        elif token == vocab.eos_id:
            st.done = True
        if n_groups == 3 and kind in (Modality.BOI, Modality.IMAGE, Modality.EOI):
            valid[b + i, col] = True
            valid[2 * b + i, col] = True
        for r in rows:
            positions[r, col] = int(valid[r, :col].sum())

    def generate(self, prompt_ids: Sequence[Sequence[int]] | torch.Tensor, mode: GenerationMode | None = None,
                 max_new_tokens: int | None = None, seed: int | None = None) -> list[list[int]]:  # fmt: skip
        """New ids for each prompt (a list of id lists, or a left-padded tensor), `</s>` included when sampled.

        `mode`, `max_new_tokens` and `seed` default to the config's. Image mode yields BOI, the codes and EOI.
        """
        mode = mode or self.config.mode
        outs: list[list[int]] = [[] for _ in range(len(prompt_ids))]
        for new in self._steps(prompt_ids, mode, max_new_tokens or self.config.max_new_tokens, _seed(seed, self)):
            for i, token in enumerate(new):
                if token is not None:
                    outs[i].append(token)
        return outs

    def stream(self, prompt_ids: Sequence[int] | torch.Tensor, mode: GenerationMode | None = None,
               max_new_tokens: int | None = None, seed: int | None = None) -> Iterator[int]:  # fmt: skip
        """The new ids of ONE prompt, one at a time as they are decoded (same ids as `generate` for that seed)."""
        ids = prompt_ids.reshape(-1).tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        mode = mode or self.config.mode
        for new in self._steps([ids], mode, max_new_tokens or self.config.max_new_tokens, _seed(seed, self)):
            if new[0] is not None:
                yield new[0]

    def stream_segments(self, tokenizer: MixedModalTokenizer, prompt_ids: Sequence[int] | torch.Tensor,
                        mode: GenerationMode | None = None, max_new_tokens: int | None = None,
                        seed: int | None = None) -> Iterator[Segment]:  # fmt: skip
        """`stream` turned into segments: text pieces as soon as they decode, each image when its EOI arrives."""
        return stream_segments(tokenizer, self.stream(prompt_ids, mode, max_new_tokens, seed))


def _seed(seed: int | None, gen: Generator) -> int:
    return gen.config.seed if seed is None else seed


def stream_segments(tokenizer: MixedModalTokenizer, ids: Iterator[int]) -> Iterator[Segment]:
    """Segments of an id stream through `tokenizer.stream()`; pending text is flushed when the stream ends."""
    detok = tokenizer.stream()
    for token in ids:
        yield from detok.push(token)
    yield from detok.finish()

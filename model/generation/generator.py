"""KV-cached sampling of text, images or both from a Chameleon transformer (Meta's `chameleon/inference` rules).

Text steps allow text ids and `</s>` (plus BOI in mixed mode while a whole image still fits); after BOI exactly
`tokens_per_image` image codes are sampled and EOI is appended without sampling. Image codes use Meta's in-batch
three-stream classifier-free guidance: rows [full prompt ; prompt with only `<s>` and image blocks ; `<s>` + the
current image], mixed as `u + s_img * (img - u) + s_txt * (full - img)`.

Unlike Meta, which re-prefills a fresh cache at every modality switch, one cache lives for the whole generation.
All rows get every token at the same cache column; a per-row validity mask decides which columns a row attends to
(left padding, text in the guidance rows, earlier images in the unconditional row) and each row counts its own
positions over its valid columns, so every row sees exactly the sequence Meta would have fed it.

One generation (`Generator._steps`) is made of these parts: `_Stream`, each prompt's state (the modality state
machine: in text or in an image, codes left, finished; its seen text ids and generator); `_prompt_grid`, the rows of
the prompts and their guidance streams; `_Decode`, those grids on the device, filled one column per step;
`_ModelSteps`, the model's logits of the prefill and of each step (eager, or the static step and its CUDA graph);
and `_StepSampler`, each step's ids, inserted when forced, else sampled per allowed set (`model.generation.sampling`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.generation.decode_graph import GraphedDecode
from model.generation.decode_step import DecodeWeights, decode_linear, decode_step, decode_weights
from model.generation.sampling import SeenIds, sample_group
from model.lm.transformer import KVCache, Transformer, rotary_angles
from model.tokenizers.mixed_tokenizer import MixedModalTokenizer, Segment
from model.tokenizers.vocabulary import Modality, Vocabulary
from schemas.generate_config import GenerateConfig, GenerationMode

MODES = ("text", "image", "mixed")


@lru_cache(maxsize=64)
def _kind_mask(vocab: Vocabulary, kinds: tuple[Modality, ...], extra: tuple[int, ...] = ()) -> torch.Tensor:
    # Cached because np.isin over Meta's 65,536 ids on every step would dominate small-model decoding.
    mask = vocab.mask(*kinds) if kinds else torch.zeros(vocab.size, dtype=torch.bool)
    mask[list(extra)] = True
    return mask


def _allowed_parts(
    vocab: Vocabulary, mode: str, in_image: bool, codes_left: int, positions_left: int
) -> tuple[tuple[Modality, ...], tuple[int, ...]]:
    """The (modalities, extra ids) key of `allowed_mask`'s answer: hashable, so masks and plans can be cached."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if in_image:
        return ((Modality.IMAGE,), ()) if codes_left > 0 else ((), (vocab.eoi_id,))
    if mode == "image":
        return (), (vocab.boi_id,)
    if mode == "mixed" and positions_left >= vocab.tokens_per_image + 2:
        return (Modality.TEXT,), (vocab.eos_id, vocab.boi_id)
    return (Modality.TEXT,), (vocab.eos_id,)


def allowed_mask(vocab: Vocabulary, mode: str, in_image: bool, codes_left: int, positions_left: int) -> torch.Tensor:
    """Bool [V]: the ids the next token may be.

    Inside an image: the image codes while `codes_left > 0`, then only EOI (which the generator inserts without
    sampling). Outside: `image` mode allows only BOI; `text` allows text ids and `</s>`; `mixed` also BOI when
    `positions_left` (new tokens still allowed, this one included) holds BOI, the codes and EOI.
    """
    mask = _kind_mask(vocab, *_allowed_parts(vocab, mode, in_image, codes_left, positions_left))
    return mask.clone()  # the cached tensor must not be changed by a caller


@lru_cache(maxsize=64)
def _allowed_ids(vocab: Vocabulary, parts: tuple) -> tuple[int | None, torch.Tensor]:
    """(the one allowed id when there is only one, else None; every allowed id, ascending) for an allowed key."""
    ids = _kind_mask(vocab, *parts).nonzero().flatten()
    return (int(ids[0]) if len(ids) == 1 else None), ids


# Output rows are computed in contiguous runs of at least this many ids; shorter runs are gathered.
_MIN_RUN = 64


@lru_cache(maxsize=64)
def _logit_plan(vocab: Vocabulary, keys: frozenset) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]] | None:
    """Which output rows one step needs: the union of its rows' allowed ids as (runs, gathered ids).

    None means "all of them" (the union covers most of the vocabulary). Only these logits are computed; every
    other id is -inf, which the modality mask would have set anyway.
    """
    need = np.zeros(vocab.size, dtype=bool)
    for parts in keys:
        need |= _kind_mask(vocab, *parts).numpy()
    if need.sum() > 0.9 * vocab.size:
        return None
    edges = np.flatnonzero(np.diff(np.concatenate(([0], need.astype(np.int8), [0]))))
    runs, extra = [], []
    for lo, hi in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
        if hi - lo >= _MIN_RUN:
            runs.append((lo, hi))
        else:
            extra.extend(range(lo, hi))
    return tuple(runs), tuple(extra)


def _forward_last(
    model: Transformer,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    cache: KVCache | None,
    start_pos: int,
    plan=None,
    weights: DecodeWeights | None = None,
) -> torch.Tensor | None:
    """Float logits of the last position, on the CPU: [R, V], or with `plan` (see `_logit_plan`) only the planned
    ids' columns, in ascending id order (`_plan_columns`); `plan=()` runs the layers (filling the cache) and
    returns None. One new token per row with a cache takes `decode_step` (with `weights`, gathered if None).

    Transformer.forward builds its own causal mask with a cache, which would let rows attend padding; the layers
    take an explicit mask, so the same embedding -> layers -> norm -> output path runs with the validity mask
    (None when every row attends every column: plain causal attention).
    """
    cfg = model.config
    if cache is not None and tokens.shape[1] == 1:  # one new token per row: the lean decode path
        h = decode_step(
            weights or decode_weights(model),
            tokens[:, 0],
            positions[:, 0],
            cache,
            start_pos,
            None if mask is None else mask[:, 0],
        )
    else:
        rope = rotary_angles(positions, cfg.head_dim, cfg.rope_theta, complex_rotation=True)  # once for all layers
        h = model.tok_embeddings(tokens)
        attn_mask = None if mask is None else mask[:, None]
        for layer in model.layers:
            h = layer(h, positions, attn_mask, cache, start_pos, rope=rope)
        h = model.norm(h[:, -1])
    return None if plan == () else _output_logits(model, h, plan)


def _output_logits(model: Transformer, h: torch.Tensor, plan) -> torch.Tensor:
    """Float logits on the CPU of the final hidden states h [R, dim]: all [R, V], or only the columns of `plan`."""
    out = model.output
    if plan is None or not isinstance(out, nn.Linear):
        return out(h).float().cpu()
    w, bias = out.weight, out.bias
    parts = []
    for segment in _plan_segments(plan):  # ascending ids: the concatenation needs no reordering
        if isinstance(segment, tuple):  # a few ids between runs: gather their rows
            idx = _id_tensor(segment, h.device)
            rows, b = w.index_select(0, idx), None if bias is None else bias.index_select(0, idx)
        else:
            rows, b = w[segment.start : segment.stop], None if bias is None else bias[segment.start : segment.stop]
        # The output layer is the largest weight a step reads: decode_linear's fast path matters most here.
        parts.append(decode_linear(h, rows) if b is None else F.linear(h, rows, b))
    return (torch.cat(parts, -1) if len(parts) > 1 else parts[0]).float().cpu()  # only these cross to the CPU


@lru_cache(maxsize=64)
def _plan_segments(plan: tuple) -> tuple[range | tuple[int, ...], ...]:
    """A plan's output rows in ascending id order: each run as a range, and the gathered ids between two runs as
    one tuple."""
    runs, extra = plan
    extra = sorted(extra)
    segments: list[range | tuple[int, ...]] = []
    for lo, hi in sorted(runs):
        before = tuple(i for i in extra if i < lo)
        extra = extra[len(before) :]
        segments += [before, range(lo, hi)] if before else [range(lo, hi)]
    return tuple(segments + ([tuple(extra)] if extra else []))


@lru_cache(maxsize=256)
def _id_tensor(ids: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """A cached index tensor of `ids`: the same few id and row lists recur every decoding step."""
    return torch.tensor(ids, device=device)


@lru_cache(maxsize=64)
def _plan_columns(plan: tuple) -> np.ndarray:
    """The ids whose logits a plan computes, ascending: the columns of `_forward_last`'s output."""
    runs, extra = plan
    return np.sort(np.concatenate([np.arange(lo, hi) for lo, hi in runs] + [np.asarray(extra, dtype=np.int64)]))


@lru_cache(maxsize=256)
def _group_columns(vocab: Vocabulary, plan: tuple | None, parts: tuple) -> torch.Tensor | None:
    """The columns of a step's logits (see `_forward_last`) that hold `parts`' allowed ids, ascending; None when
    they are every column (no gather needed)."""
    allowed = _allowed_ids(vocab, parts)[1].numpy()
    ids = np.arange(vocab.size) if plan is None else _plan_columns(plan)
    if len(ids) == len(allowed) and (ids == allowed).all():
        return None
    return torch.from_numpy(np.searchsorted(ids, allowed))


def _attention_mask(valid: torch.Tensor, start_pos: int, n_new: int) -> torch.Tensor:
    """[R, n_new, start_pos + n_new]: causal over valid columns; every query also sees itself (no empty rows)."""
    end = start_pos + n_new
    if n_new == 1:  # decoding: every earlier column is in the causal past, so only validity and the diagonal
        mask = valid[:, None, :end].clone()
        mask[:, :, -1] = True
        return mask
    q = torch.arange(start_pos, end, device=valid.device)[:, None]
    k = torch.arange(end, device=valid.device)[None, :]
    return (valid[:, None, :end] & (k <= q)) | (k == q)


@dataclass
class _Stream:
    """Decoding state of one prompt: where it stands in the modality grammar (in text, or in an image with codes
    left), the text ids its context holds (for the repetition penalty) and its own generator."""

    vocab: Vocabulary
    mode: str
    generator: torch.Generator
    seen: SeenIds
    in_image: bool = False
    codes_left: int = 0
    boi_col: int = -1  # cache column of the current image's BOI
    done: bool = False

    @classmethod
    def after_prompt(
        cls, vocab: Vocabulary, mode: str, ids: list[int], pad: int, max_new_tokens: int, seed: int
    ) -> _Stream:
        """The state after prompt `ids` (left-padded by `pad` columns), sampling with `seed`. A prompt may end
        inside an image (e.g. with BOI): generation then continues it."""
        # Meta penalizes the whole context; only text ids can repeat in text.
        seen = SeenIds(t for t in set(ids) if vocab.modality(t) == Modality.TEXT)
        state = cls(vocab, mode, torch.Generator(device="cpu").manual_seed(seed), seen)
        open_image = _open_image(vocab, ids)
        if open_image:
            n_codes = len(open_image) - 1
            state.in_image, state.boi_col = True, pad + len(ids) - len(open_image)
            state.codes_left = vocab.tokens_per_image - n_codes
            if mode == "text" or state.codes_left < 0:
                raise ValueError(f"prompt ends inside an image ({n_codes} codes) in {mode} mode")
            if state.codes_left + 1 > max_new_tokens:
                raise ValueError(f"max_new_tokens {max_new_tokens} cannot finish the prompt's open image")
        elif mode == "image" and max_new_tokens < vocab.tokens_per_image + 2:
            raise ValueError(f"image mode needs max_new_tokens >= {vocab.tokens_per_image + 2}")
        return state

    def allowed(self, positions_left: int) -> tuple | None:
        """The key of the ids the next token may be (`_allowed_parts`), or None once the prompt has finished."""
        if self.done:
            return None
        return _allowed_parts(self.vocab, self.mode, self.in_image, self.codes_left, positions_left)

    def advance(self, token: int, col: int) -> Modality:
        """Move past `token`, written at cache column `col`, and return its modality: BOI opens an image of
        `tokens_per_image` codes, EOI closes it (and ends an image-mode generation), `</s>` ends."""
        vocab = self.vocab
        kind = vocab.modality(token)
        if kind == Modality.TEXT:
            self.seen.add(token)
        if kind == Modality.BOI:
            self.in_image, self.codes_left, self.boi_col = True, vocab.tokens_per_image, col
        elif kind == Modality.IMAGE:
            self.codes_left -= 1
        elif kind == Modality.EOI:
            self.in_image = False
            self.done = self.mode == "image"
        elif token == vocab.eos_id:
            self.done = True
        return kind


def _prompt_grid(
    vocab: Vocabulary, prompts: list[list[int]], streams: list[_Stream], total: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and validity [groups * b, total] of the b prompts, left-padded to end at the same column.

    Row g * b + i is prompt i's stream g: 0 the full prompt; with guidance (3 groups) 1 the prompt with only `<s>`
    and its image blocks attended, 2 the unconditional `<s>` (plus the image the prompt leaves open). Every row holds
    the prompt's tokens; validity says which columns the row attends.
    """
    b, plen = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((b * groups, total), vocab.pad_id, dtype=torch.long)
    valid = torch.zeros((b * groups, total), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids = torch.tensor(p)
        for g in range(groups):
            tokens[g * b + i, plen - len(p) : plen] = ids
        valid[i, plen - len(p) : plen] = True
        if groups == 3:
            kinds = torch.from_numpy(vocab.modalities(p))
            keep = (kinds == Modality.IMAGE) | (kinds == Modality.BOI) | (kinds == Modality.EOI)
            valid[b + i, plen - len(p) : plen] = keep | (ids == vocab.bos_id)
            valid[2 * b + i, plen - len(p)] = True  # the unconditional row: <s>
            if streams[i].in_image:  # ... plus the open image of the prompt
                valid[2 * b + i, streams[i].boi_col : plen] = True
    return tokens, valid


class _Decode:
    """The token, validity and position grids of one generation (on the model's device, rows as in `_prompt_grid`)
    and the Python-side bookkeeping that fills them one column per step: per-row counts of valid columns, and
    whether every row still attends every column so far (`dense`: then no attention mask is needed).
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        positions: torch.Tensor,
        n_valid: list[int],
        dense: bool,
        groups: int,
        column: torch.Tensor | None = None,
    ):
        self.tokens, self.valid, self.positions = tokens, valid, positions
        self.n_valid, self.dense = n_valid, dense
        self.groups, self.prompts = groups, tokens.shape[0] // groups
        # The newest column (tokens, validity, positions, its index), kept at one address for a CUDA graph to read.
        if column is None:
            column = torch.zeros((4, tokens.shape[0]), dtype=torch.long, device=tokens.device)
        self.column = column
        self.col_tokens: list[int] = []
        self.col_valid: list[bool] = []

    def begin_column(self, pad_id: int) -> None:
        self.col_tokens, self.col_valid = [pad_id] * self.tokens.shape[0], [False] * self.tokens.shape[0]

    def record(self, i: int, token: int, kind: Modality, col: int) -> None:
        """Prompt i's new token (of modality `kind`) at column `col`, in each of its rows: its full row attends it,
        its guidance rows only image tokens; at a BOI the unconditional row restarts as `<s>` + this image (Meta
        rebuilds it as [<s>, BOI] per image)."""
        b = self.prompts
        for g in range(self.groups):
            self.col_tokens[g * b + i] = token
        self.col_valid[i] = True
        if self.groups == 3 and kind in (Modality.BOI, Modality.IMAGE, Modality.EOI):
            if kind == Modality.BOI:
                r = 2 * b + i
                first = int(self.valid[r].nonzero()[0, 0])
                self.valid[r, first + 1 : col] = False
                self.n_valid[r] = int(self.valid[r, :col].sum())
                self.dense = False
            self.col_valid[b + i] = True
            self.col_valid[2 * b + i] = True

    def end_column(self, col: int) -> None:
        """Write the column: a row's position there is the number of valid columns before it."""
        pos = list(self.n_valid)
        self.n_valid = [n + v for n, v in zip(self.n_valid, self.col_valid, strict=True)]
        self.dense = self.dense and all(self.col_valid)
        self.column.copy_(torch.tensor([self.col_tokens, self.col_valid, pos, [col] * len(pos)]))  # one copy
        tokens, valid, positions, _ = self.column.unbind()
        self.tokens.select(1, col).copy_(tokens)
        self.valid.select(1, col).copy_(valid)  # copy_ casts 0/1 to bool
        self.positions.select(1, col).copy_(positions)


@dataclass
class _StaticWorkspace:
    """Device buffers of one generation shape for the static steps, kept by the Generator between generations: the
    CUDA graph captured over them is replayed again by the next generation of the same shape and weights."""

    key: tuple
    tokens: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    column: torch.Tensor
    cache: KVCache
    graphed: GraphedDecode | None = None


def _weights_key(weights: DecodeWeights) -> tuple[int, ...]:
    """Addresses of every tensor the decode step reads: a graph captured over them is valid while they stay."""
    tensors = [weights.embedding, weights.norm]
    for layer in weights.layers:
        tensors += [t for t in layer if isinstance(t, torch.Tensor)]
        tensors += [t for norm in (layer.q_norm, layer.k_norm) if norm is not None for t in norm[:2] if t is not None]
    return tuple(t.data_ptr() for t in tensors)


class _ModelSteps:
    """The model's side of one generation: logits of the prefill and of each new column, only for the ids some row
    may sample (see `_logit_plan`).

    With a workspace (`static`), one-token steps take the fixed-shape static step, captured as a CUDA graph at the
    first of them on CUDA; if capture fails, the rest runs eagerly and `on_capture_failure` is called. Without a
    cache every step recomputes the whole sequence.
    """

    def __init__(
        self,
        model: Transformer,
        vocab: Vocabulary,
        weights: DecodeWeights,
        dec: _Decode,
        cache: KVCache | None,
        workspace: _StaticWorkspace | None,
        on_capture_failure: Callable[[], None],
    ):
        self.model, self.vocab, self.weights, self.dec, self.cache = model, vocab, weights, dec, cache
        self.workspace, self.static = workspace, workspace is not None
        self.on_capture_failure = on_capture_failure

    def logits(self, start: int, end: int, parts: list[tuple | None]) -> tuple[torch.Tensor | None, tuple | None]:
        """(logits, plan) after writing columns start..end-1 for rows whose next ids are `parts` (None: finished)."""
        if self.cache is None:  # recompute everything: the reference the cached path must match
            start = 0
        # Logits only for ids some row may sample next (forced ids, e.g. EOI, need none).
        keys = frozenset(p for p in parts if p is not None and _allowed_ids(self.vocab, p)[0] is None)
        plan = _logit_plan(self.vocab, keys) if keys else ()
        dec = self.dec
        # no_grad here, not around the generation loop: a context held across `yield` would leak into the caller.
        with torch.no_grad():
            if self.static and end - start == 1 and start > 0:  # a one-token step after the prefill wrote `column`
                h = self._static_step()
                if h is not None:
                    return (None if plan == () else _output_logits(self.model, h, plan)), plan
            mask = None if dec.dense else _attention_mask(dec.valid[:, :end], start, end - start)
            # Sampled on the CPU with CPU generators, so a seed gives the same draws on any device.
            logits = _forward_last(
                self.model,
                dec.tokens[:, start:end],
                dec.positions[:, start:end],
                mask,
                self.cache,
                start,
                plan,
                self.weights,
            )
        return logits, plan

    def _static_step(self) -> torch.Tensor | None:
        """Hidden states [rows, dim] of the static step (capturing its graph first), or None if capture fails."""
        ws = self.workspace
        if ws.graphed is None:
            try:  # on CUDA, also runs this step once (the same cache column the replay writes)
                ws.graphed = GraphedDecode(self.weights, self.dec.column, self.dec.valid, self.cache)
            except RuntimeError as err:
                warnings.warn(f"CUDA graph capture failed, decoding without it: {err}", stacklevel=3)
                self.static = False
                self.on_capture_failure()
                return None
        return ws.graphed()


class _StepSampler:
    """One step's ids for every prompt: forced ids (BOI in image mode, EOI after the last code) are inserted, the
    others sampled together per allowed set, text with the repetition penalty, image codes with guidance."""

    def __init__(self, vocab: Vocabulary, config: GenerateConfig, guidance: tuple[int, float, float] | None):
        self.vocab, self.text, self.image, self.guidance = vocab, config.text, config.image, guidance

    def pick(
        self, logits: torch.Tensor | None, plan: tuple | None, streams: list[_Stream], parts: list[tuple | None]
    ) -> list[int | None]:
        """The new id of each prompt (None for finished ones), from the step's logits and plan."""
        new: list[int | None] = [None] * len(streams)
        groups: dict[tuple, list[int]] = {}  # rows to sample, by allowed set: each group samples at once
        for i, key in enumerate(parts):
            if key is None:  # finished
                continue
            forced, _ = _allowed_ids(self.vocab, key)
            if forced is not None:
                new[i] = forced
            else:
                groups.setdefault(key, []).append(i)
        for key, rows in groups.items():
            picked = self._sample_group(logits, plan, key, rows, [streams[i] for i in rows])
            for i, token in zip(rows, picked, strict=True):
                new[i] = token
        return new

    def _sample_group(
        self, logits: torch.Tensor, plan: tuple | None, key: tuple, rows: list[int], streams: list[_Stream]
    ) -> list[int]:
        columns, allowed = _group_columns(self.vocab, plan, key), _allowed_ids(self.vocab, key)[1]
        """Ids for `rows`, which share the allowed set `key`: inside an image (an allowed set is either inside one or
        outside) image sampling with guidance, else text sampling with the repetition penalty."""
        if streams[0].in_image:
            cfg, extra = self.image, {"guidance": self.guidance}
        else:
            cfg, extra = self.text, {"seen": [st.seen for st in streams], "penalty": self.text.repetition_penalty}
        generators = [st.generator for st in streams]
        return sample_group(logits, rows, columns, allowed, cfg.temperature, cfg.top_p, generators, **extra)


class Generator:
    """Samples continuations of prompts with one KV cache kept across text and image segments.

    `guidance=False` samples image codes from the full prompt alone (no guidance rows); `use_cache=False`
    recomputes the whole sequence every step (a reference for tests; same masks and positions). The model is used
    as given: put it in eval mode first, or dropout stays on.

    `static_steps`: the one-token steps with fixed shapes (`model/generation/decode_graph.py`), captured in a CUDA
    graph and replayed on a CUDA device. None (the default): on CUDA, for a model in eval mode; True: on any device
    (eagerly off CUDA: the tests' check of the same computation); False: never. If capturing the graph fails,
    generation goes on without it, with a warning.
    """

    def __init__(
        self,
        model: Transformer,
        vocab: Vocabulary,
        config: GenerateConfig,
        guidance: bool = True,
        use_cache: bool = True,
        static_steps: bool | None = None,
    ):
        if model.config.vocab_size != vocab.size:
            raise ValueError(f"model has {model.config.vocab_size} ids but the vocabulary {vocab.size}")
        self.model, self.vocab, self.config = model, vocab, config
        self.guidance = guidance
        self.use_cache = use_cache
        self.static_steps = static_steps
        self._workspace: _StaticWorkspace | None = None  # out while a generation uses it (streams may interleave)

    def _prompts(self, prompt_ids: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
        rows = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else [list(map(int, p)) for p in prompt_ids]
        prompts = []
        for n, row in enumerate(rows):
            start = 0
            while start < len(row) and row[start] == self.vocab.pad_id:  # left padding of a batched tensor
                start += 1
            ids = row[start:]
            check_prompt(self.vocab, ids, n)
            # Meta prepends <s> to every prompt; the guidance rows are `<s> ...` so they need it too.
            prompts.append(ids if ids and ids[0] == self.vocab.bos_id else [self.vocab.bos_id, *ids])
        if not prompts:
            raise ValueError("no prompts")
        return prompts

    def _steps(
        self, prompt_ids, mode: GenerationMode, max_new_tokens: int, seed: int, seeds: Sequence[int] | None = None
    ) -> Iterator[list[int | None]]:
        """Yields, per step, the new id of every prompt (None once it has finished)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        vocab = self.vocab
        prompts = self._prompts(prompt_ids)
        b, plen = len(prompts), max(len(p) for p in prompts)
        if plen + max_new_tokens > self.model.config.max_seq_len:
            raise ValueError(f"prompt ({plen}) + max_new_tokens ({max_new_tokens}) > max_seq_len")
        streams = self._streams(prompts, mode, max_new_tokens, seed, seeds)
        groups = 3 if self.guidance and mode != "text" else 1
        tokens, valid = _prompt_grid(vocab, prompts, streams, plen + max_new_tokens, groups)
        dec, model_steps = self._start_decoding(tokens, valid, plen, groups)
        guidance = (b, self.config.image.cfg_text, self.config.image.cfg_image) if groups == 3 else None
        sampler = _StepSampler(vocab, self.config, guidance)

        parts = [st.allowed(max_new_tokens) for st in streams]
        logits, plan = model_steps.logits(0, plen, parts)
        for step in range(max_new_tokens):
            col = plen + step
            new = sampler.pick(logits, plan, streams, parts)
            dec.begin_column(vocab.pad_id)
            for i, token in enumerate(new):
                if token is not None:
                    dec.record(i, token, streams[i].advance(token, col), col)
            dec.end_column(col)
            yield new
            if all(st.done for st in streams) or step == max_new_tokens - 1:
                break
            parts = [st.allowed(max_new_tokens - step - 1) for st in streams]
            if mode == "image" and all(p is None or p == ((), (vocab.eoi_id,)) for p in parts):
                continue  # every open image gets its EOI and then ends: no model step is needed for it
            logits, plan = model_steps.logits(col, col + 1, parts)
        if model_steps.static:  # back for the next generation (an abandoned stream keeps its own)
            self._workspace = model_steps.workspace

    def _streams(
        self, prompts: list[list[int]], mode: str, max_new_tokens: int, seed: int, seeds: Sequence[int] | None
    ) -> list[_Stream]:
        """Each prompt's state after it. Row i samples with its own generator (seeds[i], else seed + i): its output
        does not depend on its batch-mates."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        plen = max(len(p) for p in prompts)
        return [
            _Stream.after_prompt(
                self.vocab, mode, p, plen - len(p), max_new_tokens, seeds[i] if seeds is not None else seed + i
            )
            for i, p in enumerate(prompts)
        ]

    def _use_static_steps(self, device: torch.device, weights: DecodeWeights) -> bool:
        """Whether one-token steps take the fixed-shape static step (replayed as a CUDA graph on CUDA)."""
        static = self.static_steps
        if static is None:
            static = device.type == "cuda" and weights.dropout == 0  # graphs replay no fresh dropout masks
        return bool(static) and self.use_cache

    def _stop_static_steps(self) -> None:
        """After a failed graph capture: this Generator's later generations decode without static steps."""
        self.static_steps = False

    def _start_decoding(
        self, tokens: torch.Tensor, valid: torch.Tensor, plen: int, groups: int
    ) -> tuple[_Decode, _ModelSteps]:
        """The grids of `_prompt_grid` on the model's device and the model steps over them: in the kept static
        workspace (its cache and graph) when the static steps are used, else in new tensors and cache."""
        model = self.model
        device = model.output.weight.device
        rows, total = tokens.shape
        # Each row numbers only the tokens it attends: left padding and dropped text do not shift positions.
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        weights = decode_weights(model)  # once per generation: the decode steps read plain tensors
        n_valid, dense = valid.sum(1).tolist(), bool(valid[:, :plen].all())
        # Bookkeeping lives in Python and on the CPU; the device gets one new column per step (no per-row syncs).
        if self._use_static_steps(device, weights):
            ws = self._take_workspace(rows, total, device, weights)
            dec = _Decode(
                ws.tokens.copy_(tokens),
                ws.valid.copy_(valid),
                ws.positions.copy_(positions),
                n_valid,
                dense,
                groups,
                ws.column,
            )
            cache = ws.cache
        else:
            ws = None
            dec = _Decode(tokens.to(device), valid.to(device), positions.to(device), n_valid, dense, groups)
            cache = model.make_cache(rows, total) if self.use_cache else None
        return dec, _ModelSteps(model, self.vocab, weights, dec, cache, ws, self._stop_static_steps)

    def _take_workspace(self, rows: int, total: int, device: torch.device, weights: DecodeWeights) -> _StaticWorkspace:
        """The kept workspace if it fits this generation (its cache zeroed), else new buffers; taken out while used."""
        key = (rows, total, str(device), _weights_key(weights))
        ws, self._workspace = self._workspace, None
        if ws is not None and ws.key == key:
            for t in ws.cache.keys + ws.cache.values:
                t.zero_()  # unwritten columns are masked; zeros keep them finite
            return ws
        del ws  # free the old one's device memory before making the new
        long = {"dtype": torch.long, "device": device}
        return _StaticWorkspace(
            key=key,
            tokens=torch.empty((rows, total), **long),
            valid=torch.empty((rows, total), dtype=torch.bool, device=device),
            positions=torch.empty((rows, total), **long),
            column=torch.zeros((4, rows), **long),
            cache=self.model.make_cache(rows, total),
        )

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
        mode: GenerationMode | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """New ids for each prompt (a list of id lists, or a left-padded tensor), `</s>` included when sampled.

        `mode`, `max_new_tokens` and `seed` default to the config's. Row i samples with `seed + i`, or with
        `seeds[i]`: a prompt then gives the same ids in any batch as alone. Image mode yields BOI, codes and EOI.
        """
        mode = mode or self.config.mode
        outs: list[list[int]] = [[] for _ in range(len(prompt_ids))]
        for new in self._steps(prompt_ids, mode, _max_new(max_new_tokens, self), _seed(seed, self), seeds):
            for i, token in enumerate(new):
                if token is not None:
                    outs[i].append(token)
        return outs

    def stream(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        mode: GenerationMode | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
    ) -> Iterator[int]:
        """The new ids of ONE prompt, one at a time as they are decoded (same ids as `generate` for that seed)."""
        if isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() > 1 and prompt_ids.shape[0] != 1:
            raise ValueError(f"stream takes one prompt; got a tensor of {prompt_ids.shape[0]} rows (use generate)")
        ids = prompt_ids.reshape(-1).tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        mode = mode or self.config.mode
        for new in self._steps([ids], mode, _max_new(max_new_tokens, self), _seed(seed, self)):
            if new[0] is not None:
                yield new[0]

    def stream_segments(
        self,
        tokenizer: MixedModalTokenizer,
        prompt_ids: Sequence[int] | torch.Tensor,
        mode: GenerationMode | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
    ) -> Iterator[Segment]:
        """`stream` turned into segments: text pieces as soon as they decode, each image when its EOI arrives (an
        image the prompt left open included: its BOI and codes so far start the detokenizer)."""
        ids = prompt_ids.reshape(-1).tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        new = self.stream(prompt_ids, mode, max_new_tokens, seed)
        return stream_segments(tokenizer, new, prefix=_open_image(self.vocab, ids))


def check_prompt(vocab: Vocabulary, ids: Sequence[int], row: int = 0) -> None:
    """A ValueError naming the position if `ids` is not a well-formed prompt: ids in the vocabulary, no <pad> inside,
    images as BOI + codes + EOI (the last one may be left open: generation then finishes it)."""
    codes = None  # codes so far of the open image, if any
    for pos, token in enumerate(ids):
        where = f"prompt {row}, position {pos}: id {token}"
        if not 0 <= token < vocab.size:
            raise ValueError(f"{where} is outside the vocabulary of {vocab.size}")
        kind = vocab.modality(token)
        if codes is not None:
            if kind == Modality.IMAGE and codes < vocab.tokens_per_image:
                codes += 1
            elif kind == Modality.EOI and codes == vocab.tokens_per_image:
                codes = None
            else:
                raise ValueError(f"{where} ({kind.name}) after {codes} of an image's {vocab.tokens_per_image} codes")
        elif kind == Modality.BOI:
            codes = 0
        elif token == vocab.pad_id:
            raise ValueError(f"{where}: <pad> inside a prompt (only left padding)")
        elif kind in (Modality.IMAGE, Modality.EOI):
            raise ValueError(f"{where} ({kind.name}) outside an image")


def _open_image(vocab: Vocabulary, ids: Sequence[int]) -> list[int]:
    """The prompt's trailing open image (BOI and the codes after it), or [] if it ends outside an image."""
    bois = [i for i, t in enumerate(ids) if t == vocab.boi_id]
    if bois and vocab.eoi_id not in ids[bois[-1] :]:
        return list(ids[bois[-1] :])
    return []


def _seed(seed: int | None, gen: Generator) -> int:
    return gen.config.seed if seed is None else seed


def _max_new(max_new_tokens: int | None, gen: Generator) -> int:
    return gen.config.max_new_tokens if max_new_tokens is None else max_new_tokens  # 0 is an error, not the default


def stream_segments(
    tokenizer: MixedModalTokenizer, ids: Iterator[int], prefix: Sequence[int] = ()
) -> Iterator[Segment]:
    """Segments of an id stream through `tokenizer.stream()`; pending text is flushed when the stream ends.
    `prefix` (an open image's BOI and codes) is fed first and yields nothing."""
    detok = tokenizer.stream()
    for token in prefix:
        detok.push(token)
    for token in ids:
        yield from detok.push(token)
    yield from detok.finish()

"""Our text tokenizer as Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
whose ids are Chameleon's: the same ids `SentencePieceTokenizer.encode` or Meta's `text_tokenizer.json` give.

Our SentencePiece BPE becomes a `tokenizers` BPE: piece p -> id first_text_id + p - 1, merges ranked by the merged
piece's score (SentencePiece merges the pair whose result scores highest), byte fallback, spaces as U+2581 and no
dummy prefix, as we train it. Every id below the text range gets Meta's name (`<s>`, IMGIMG..., `<eoss>`,
`<racm3:break>`, `<reservedNNNNN>`), and the id after the prompt separator is HF's `<image>` placeholder, as in
Hugging Face's own conversion of Meta's tokenizer. Prompts start with `<s>` (a post-processor), as Meta's do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.tokenizers.text_tokenizer import HFTextTokenizer, SentencePieceTokenizer, TextTokenizer
from model.tokenizers.vocabulary import Vocabulary
from schemas.vocab import BOI_TOKEN, BOS_TOKEN, EOI_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_ID, UNK_TOKEN

IMAGE_TOKEN = "<image>"  # HF ChameleonProcessor's placeholder, expanded to BOI + image_seq_length x <image> + EOI
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_SPACE = "\u2581"


class HFTokenizerError(ValueError):
    """A text tokenizer that cannot be written as Hugging Face tokenizer files, with the reason."""


def image_token_id(vocab: Vocabulary) -> int:
    """The id of HF's `<image>` placeholder: the reserved id right after the prompt separator (Meta's
    `<reserved08707>`, 8711), which Chameleon never emits."""
    token_id = vocab.sep_id + 1
    if token_id >= vocab.first_text_id:
        raise HFTokenizerError(
            f"the vocabulary has no reserved id after the prompt separator {vocab.sep_id} for "
            f"HF's {IMAGE_TOKEN} placeholder (n_reserved {vocab.layout.n_reserved}, sep_offset "
            f"{vocab.layout.sep_offset})"
        )
    return token_id


def control_names(vocab: Vocabulary) -> dict[int, str]:
    """Name of every id below the text range: Meta's names, `<image>` for the placeholder id."""
    names = {i: vocab.special_name(i) for i in range(vocab.first_text_id)}
    names[image_token_id(vocab)] = IMAGE_TOKEN
    return names


def _added(token_id: int, content: str) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _sentencepiece_bpe(tokenizer: SentencePieceTokenizer) -> dict[str, Any]:
    """The `model` / normalizer / decoder parts of tokenizer.json for our SentencePiece BPE."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    vocab = tokenizer.vocab
    offset = vocab.first_text_id - 1
    names = control_names(vocab)
    pieces: dict[str, int] = {name: i for i, name in names.items()}
    scores: dict[str, float] = {}
    for piece_id in range(1, sp.get_piece_size()):  # piece 0 is SentencePiece's <unk>: our id 3
        piece = sp.id_to_piece(piece_id)
        if piece in pieces:
            raise HFTokenizerError(
                f"text piece {piece!r} (id {offset + piece_id}) has the name of id {pieces[piece]}; "
                "a tokenizer.json vocabulary needs distinct names"
            )
        pieces[piece] = offset + piece_id
        if not (sp.is_byte(piece_id) or sp.is_control(piece_id) or sp.is_unused(piece_id)):
            scores[piece] = sp.get_score(piece_id)
    merges = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in scores and right in scores:
                merges.append((-score, pieces[piece], pieces[left], pieces[right], left, right))
    merges.sort()
    return {
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE},
        "pre_tokenizer": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK_TOKEN,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": pieces,
            "merges": [[m[4], m[5]] for m in merges],
        },
    }


def _meta_tokenizer(tokenizer: HFTextTokenizer) -> dict[str, Any]:
    """Meta's text_tokenizer.json with its `<reserved08707>` renamed `<image>` (as HF's converter does)."""
    data = json.loads(tokenizer.path.read_text(encoding="utf-8"))
    image_id = image_token_id(tokenizer.vocab)
    old = tokenizer.vocab.special_name(image_id)
    vocab = data["model"]["vocab"]
    if vocab.get(old) == image_id:
        vocab[IMAGE_TOKEN] = vocab.pop(old)
    return {k: data.get(k) for k in ("normalizer", "pre_tokenizer", "decoder", "model")}


def tokenizer_json(tokenizer: TextTokenizer) -> dict[str, Any]:
    """tokenizer.json content for `tokenizer` (ours or Meta's), ids equal to its own; control ids are special
    added tokens, so `<image>`, `<racm3:break>`, `<eoss>` and the separator in a prompt are single ids."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        parts = _sentencepiece_bpe(tokenizer)
    elif isinstance(tokenizer, HFTextTokenizer):
        parts = _meta_tokenizer(tokenizer)
    else:
        raise HFTokenizerError(f"no Hugging Face form for a {type(tokenizer).__name__}")
    vocab = tokenizer.vocab
    image_id = image_token_id(vocab)
    control = [vocab.bos_id, vocab.pad_id, vocab.eos_id, UNK_ID, vocab.eoi_id, vocab.boi_id, vocab.sep_id, image_id]
    names = control_names(vocab)
    bos = {"id": BOS_TOKEN, "type_id": 0}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added(i, names[i]) for i in sorted(control)],
        **{k: parts[k] for k in ("normalizer", "pre_tokenizer")},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": bos},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": bos},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [vocab.bos_id], "tokens": [BOS_TOKEN]}},
        },
        **{k: parts[k] for k in ("decoder", "model")},
    }


def special_tokens(vocab: Vocabulary) -> dict[str, str]:
    """The tokenizer's named special tokens (HF's sep_token is Chameleon's prompt separator)."""
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "sep_token": vocab.special_name(vocab.sep_id),
    }


def write_hf_tokenizer(tokenizer: TextTokenizer, folder: str | Path, max_length: int) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder` (AutoTokenizer loads
    them as a PreTrainedTokenizerFast); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = special_tokens(tokenizer.vocab)
    extra = {"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "extra_special_tokens": extra,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_length,
        "padding_side": "left",  # generation pads on the left, as HF's Chameleon docs advise
        "clean_up_tokenization_spaces": False,
    }
    files = {
        TOKENIZER_FILE: tokenizer_json(tokenizer),
        TOKENIZER_CONFIG_FILE: config,
        SPECIAL_TOKENS_MAP_FILE: {**specials, **extra},
    }
    paths = []
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        paths.append(folder / name)
    return paths

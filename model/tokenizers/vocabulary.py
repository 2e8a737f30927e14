"""The vocabulary as one object: id ranges, special tokens by name, VQ code <-> id, the modality of any id."""

from __future__ import annotations

import re
from enum import IntEnum

import numpy as np
import torch

from schemas.vocab import (
    BOI_TOKEN,
    BOS_ID,
    CHAMELEON,
    EOI_TOKEN,
    EOS_ID,
    IMAGE_CODE_OFFSET,
    PAD_ID,
    RESERVED_NAME_OFFSET,
    SPECIAL_TOKENS,
    UNK_ID,
    VocabLayout,
    reserved_token,
)

_RESERVED = re.compile(r"^<reserved(\d{5})>$")
_DIGIT_LETTERS = "ABCDEFGHIJ"  # Meta names image code 53 "IMGIMGFDZ": digits spelled A..J


class Modality(IntEnum):
    """What an id stands for."""

    SPECIAL = 0  # <s> <pad> </s> <unk>
    IMAGE = 1  # a VQ code
    EOI = 2
    BOI = 3
    RESERVED = 4
    TEXT = 5


def image_token_name(code: int) -> str:
    """Meta's name for an image code in `text_tokenizer.json`: IMGIMG + its digits as letters A..J + Z."""
    return "IMGIMG" + "".join(_DIGIT_LETTERS[int(d)] for d in str(code)) + "Z"


def image_code_from_name(name: str) -> int:
    """Inverse of `image_token_name` (`IMGIMGFDZ` -> 53)."""
    if not (name.startswith("IMGIMG") and name.endswith("Z")) or len(name) < 8:
        raise ValueError(f"not an image token name: {name!r}")
    return int("".join(str(_DIGIT_LETTERS.index(c)) for c in name[6:-1]))


class Vocabulary:
    """Where every id lives, for one `VocabLayout` (Meta's by default)."""

    def __init__(self, layout: VocabLayout = CHAMELEON):
        self.layout = layout
        self.size = layout.vocab_size
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = BOS_ID, PAD_ID, EOS_ID, UNK_ID
        self.eoi_id, self.boi_id, self.sep_id = layout.eoi_id, layout.boi_id, layout.sep_id
        self.first_text_id = layout.first_text_id
        self.n_image_codes = layout.image_codes
        self.tokens_per_image = layout.tokens_per_image
        modality = np.full(self.size, Modality.TEXT, dtype=np.int8)
        modality[: len(SPECIAL_TOKENS)] = Modality.SPECIAL
        modality[IMAGE_CODE_OFFSET : self.eoi_id] = Modality.IMAGE
        modality[self.eoi_id] = Modality.EOI
        modality[self.boi_id] = Modality.BOI
        modality[layout.first_reserved_id : self.first_text_id] = Modality.RESERVED
        self._modality = modality

    def __repr__(self) -> str:
        return (
            f"Vocabulary(size={self.size}, image codes {IMAGE_CODE_OFFSET}..{self.eoi_id - 1}, "
            f"EOI {self.eoi_id}, BOI {self.boi_id}, "
            f"reserved {self.layout.first_reserved_id}..{self.first_text_id - 1}, "
            f"text {self.first_text_id}..{self.size - 1})"
        )

    def special_id(self, name: str) -> int:
        """The id of a named token that is not a text piece: `<s>`, `<eoss>`, `<reserved08706>`, ..."""
        if name in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(name)
        if name == EOI_TOKEN:
            return self.eoi_id
        if name == BOI_TOKEN:
            return self.boi_id
        match = _RESERVED.match(name)
        if match:
            token_id = int(match.group(1)) + RESERVED_NAME_OFFSET
            if self.layout.first_reserved_id <= token_id < self.first_text_id:
                return token_id
            raise KeyError(f"{name} (id {token_id}) is outside the reserved range of {self!r}")
        raise KeyError(f"no special token named {name!r}")

    def special_name(self, token_id: int) -> str:
        """The name of a non-text id (inverse of `special_id`; image codes get Meta's IMGIMG name)."""
        kind = self.modality(token_id)
        if kind == Modality.SPECIAL:
            return SPECIAL_TOKENS[token_id]
        if kind == Modality.IMAGE:
            return image_token_name(token_id - IMAGE_CODE_OFFSET)
        if kind == Modality.EOI:
            return EOI_TOKEN
        if kind == Modality.BOI:
            return BOI_TOKEN
        if kind == Modality.RESERVED:
            return reserved_token(token_id)
        raise KeyError(f"id {token_id} is a text piece; ask the text tokenizer for its name")

    def modality(self, token_id: int) -> Modality:
        """What one id stands for."""
        if not 0 <= token_id < self.size:
            raise IndexError(f"id {token_id} is outside the vocabulary of {self.size}")
        return Modality(int(self._modality[token_id]))

    def modalities(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """Modality of every id of an array, vectorized."""
        return self._modality[np.asarray(ids)]

    def codes_to_ids(self, codes: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """VQ codes -> token ids (code + 4); same array type out as in."""
        if int(codes.min()) < 0 or int(codes.max()) >= self.n_image_codes:
            raise ValueError(
                f"image codes must be in [0, {self.n_image_codes}), got {int(codes.min())}..{int(codes.max())}"
            )
        return codes + IMAGE_CODE_OFFSET

    def ids_to_codes(self, ids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Token ids of image codes -> VQ codes; any other id is an error."""
        lo, hi = int(ids.min()), int(ids.max())
        if lo < IMAGE_CODE_OFFSET or hi >= self.eoi_id:
            raise ValueError(f"image-code ids must be in [{IMAGE_CODE_OFFSET}, {self.eoi_id}), got {lo}..{hi}")
        return ids - IMAGE_CODE_OFFSET

    def mask(self, *kinds: Modality) -> torch.Tensor:
        """A bool tensor over the vocabulary, True where the id is one of `kinds` (for logit masks)."""
        return torch.from_numpy(np.isin(self._modality, [int(k) for k in kinds]))

    def image_block(self, codes: np.ndarray) -> np.ndarray:
        """BOI + code ids in row-major order + EOI for one image's codes."""
        codes = np.asarray(codes).reshape(-1)
        if codes.size != self.tokens_per_image:
            raise ValueError(f"an image has {self.tokens_per_image} codes, got {codes.size}")
        ids = self.codes_to_ids(codes.astype(np.int64))
        return np.concatenate([[self.boi_id], ids, [self.eoi_id]]).astype(np.int64)

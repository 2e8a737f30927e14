"""The vocabulary layout of DESIGN.md: where specials, image codes, sentinels, reserved and text ids live.

Meta's released vocabulary is the `CHAMELEON` layout; smaller layouts (tests, the demo) keep the same rule:
specials, then image codes, then EOI and BOI, then reserved tokens, then text pieces up to `vocab_size`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<s>", "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
IMAGE_CODE_OFFSET = len(SPECIAL_TOKENS)  # id = VQ code + 4
EOI_TOKEN = "<eoss>"  # end of image
BOI_TOKEN = "<racm3:break>"  # begin of image
# Reserved tokens are named by id - 4 (Meta's naming); <reserved08706> (id 8710) ends a prompt in SFT/chat.
RESERVED_NAME_OFFSET = 4

# Meta's 7B/34B release.
CHAMELEON_VOCAB_SIZE = 65_536
CHAMELEON_IMAGE_CODES = 8_192
CHAMELEON_IMAGE_GRID = 32
CHAMELEON_EOI_ID = IMAGE_CODE_OFFSET + CHAMELEON_IMAGE_CODES  # 8196
CHAMELEON_BOI_ID = CHAMELEON_EOI_ID + 1  # 8197
CHAMELEON_SEP_ID = 8_710  # <reserved08706>
# Text pieces of the released tokenizer start at 16384 ("!"); ids 8198..16383 are reserved.
CHAMELEON_FIRST_TEXT_ID = 16_384


def reserved_token(token_id: int) -> str:
    """Meta's name for a reserved id: `<reservedNNNNN>` with NNNNN = id - 4."""
    return f"<reserved{token_id - RESERVED_NAME_OFFSET:05d}>"


class VocabLayout(BaseModel):
    """Sizes of one vocabulary; every id range follows from them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(CHAMELEON_VOCAB_SIZE, gt=0, description="total ids, specials and image codes included")
    image_codes: int = Field(CHAMELEON_IMAGE_CODES, gt=0, description="VQ codebook size")
    image_grid: int = Field(CHAMELEON_IMAGE_GRID, gt=0, description="codes per image side (32 -> 1,024 codes)")
    n_reserved: int = Field(CHAMELEON_FIRST_TEXT_ID - CHAMELEON_BOI_ID - 1, ge=1)
    sep_offset: int = Field(
        CHAMELEON_SEP_ID - CHAMELEON_BOI_ID - 1,
        ge=0,
        description="index of the prompt separator among reserved ids",
    )

    @model_validator(mode="after")
    def _check_room(self) -> VocabLayout:
        if self.sep_offset >= self.n_reserved:
            raise ValueError(f"sep_offset {self.sep_offset} must be < n_reserved {self.n_reserved}")
        if self.n_text < 256:
            raise ValueError(
                f"vocab_size {self.vocab_size} leaves {self.n_text} text ids after {self.first_text_id} "
                "specials, image codes and reserved ids; at least 256 (one per byte) are needed"
            )
        return self

    @property
    def eoi_id(self) -> int:
        return IMAGE_CODE_OFFSET + self.image_codes

    @property
    def boi_id(self) -> int:
        return self.eoi_id + 1

    @property
    def first_reserved_id(self) -> int:
        return self.boi_id + 1

    @property
    def sep_id(self) -> int:
        return self.first_reserved_id + self.sep_offset

    @property
    def first_text_id(self) -> int:
        return self.first_reserved_id + self.n_reserved

    @property
    def n_text(self) -> int:
        return self.vocab_size - self.first_text_id

    @property
    def tokens_per_image(self) -> int:
        return self.image_grid * self.image_grid

    @property
    def image_block_len(self) -> int:
        """Positions one image takes in a sequence: BOI, the codes, EOI."""
        return self.tokens_per_image + 2


CHAMELEON = VocabLayout()
# Tiny layout for tests and the demo: 256 codes on an 8x8 grid, 2,048 ids in all.
TINY = VocabLayout(vocab_size=2_048, image_codes=256, image_grid=8, n_reserved=16, sep_offset=0)
VOCAB_PRESETS = {"chameleon": CHAMELEON, "tiny": TINY}

"""The vocabulary layout matches Meta's release and keeps the same rule at small sizes."""

import pytest
from pydantic import ValidationError

from schemas.vocab import BOI_TOKEN, CHAMELEON, EOI_TOKEN, SPECIAL_TOKENS, TINY, VocabLayout, reserved_token


def test_chameleon_ids_match_metas_release() -> None:
    assert SPECIAL_TOKENS == ("<s>", "<pad>", "</s>", "<unk>")
    assert (EOI_TOKEN, BOI_TOKEN) == ("<eoss>", "<racm3:break>")
    assert (CHAMELEON.eoi_id, CHAMELEON.boi_id) == (8196, 8197)
    assert CHAMELEON.sep_id == 8710 and reserved_token(CHAMELEON.sep_id) == "<reserved08706>"
    assert CHAMELEON.first_text_id == 16384 and CHAMELEON.vocab_size == 65536
    assert CHAMELEON.tokens_per_image == 1024 and CHAMELEON.image_block_len == 1026
    # Image codes are ids 4 .. 8195.
    assert CHAMELEON.eoi_id - CHAMELEON.image_codes == 4


def test_tiny_layout_keeps_the_rule() -> None:
    assert TINY.eoi_id == 4 + TINY.image_codes
    assert TINY.boi_id == TINY.eoi_id + 1
    assert TINY.sep_id == TINY.boi_id + 1
    assert TINY.first_text_id + TINY.n_text == TINY.vocab_size
    assert TINY.image_block_len == 66


def test_layout_without_room_for_bytes_is_rejected() -> None:
    with pytest.raises(ValidationError, match="at least 256"):
        VocabLayout(vocab_size=500, image_codes=256, image_grid=8, n_reserved=16, sep_offset=0)
    with pytest.raises(ValidationError, match="sep_offset 20 must be < n_reserved 16"):
        VocabLayout(vocab_size=2048, image_codes=256, image_grid=8, n_reserved=16, sep_offset=20)

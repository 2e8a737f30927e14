"""The vocabulary object: id ranges, names, code <-> id, modality masks."""

import numpy as np
import pytest
import torch

from model.tokenizers.vocabulary import Modality, Vocabulary, image_code_from_name, image_token_name
from schemas.vocab import TINY


def test_meta_image_token_names() -> None:
    assert image_token_name(53) == "IMGIMGFDZ"
    assert image_token_name(0) == "IMGIMGAZ"
    assert all(image_code_from_name(image_token_name(c)) == c for c in range(0, 8192, 7))
    with pytest.raises(ValueError, match="not an image token name"):
        image_code_from_name("<s>")


def test_chameleon_vocabulary_ranges() -> None:
    vocab = Vocabulary()
    assert [vocab.modality(i) for i in (0, 3, 4, 8195, 8196, 8197, 8198, 8710, 16383, 16384, 65535)] == [
        Modality.SPECIAL,
        Modality.SPECIAL,
        Modality.IMAGE,
        Modality.IMAGE,
        Modality.EOI,
        Modality.BOI,
        Modality.RESERVED,
        Modality.RESERVED,
        Modality.RESERVED,
        Modality.TEXT,
        Modality.TEXT,
    ]
    assert vocab.special_id("<reserved08706>") == 8710 == vocab.sep_id
    assert vocab.special_id("<racm3:break>") == 8197 and vocab.special_id("</s>") == 2
    assert vocab.special_name(8710) == "<reserved08706>" and vocab.special_name(4 + 53) == "IMGIMGFDZ"
    assert int(vocab.mask(Modality.IMAGE).sum()) == 8192
    assert int(vocab.mask(Modality.TEXT).sum()) == 65536 - 16384
    with pytest.raises(IndexError):
        vocab.modality(65536)
    with pytest.raises(KeyError, match="text piece"):
        vocab.special_name(20000)


def test_codes_and_ids_round_trip_for_numpy_and_torch() -> None:
    vocab = Vocabulary(TINY)
    codes = np.arange(256)
    assert (vocab.ids_to_codes(vocab.codes_to_ids(codes)) == codes).all()
    t = torch.tensor([[0, 255], [7, 9]])
    assert torch.equal(vocab.codes_to_ids(t), t + 4)
    with pytest.raises(ValueError, match=r"image codes must be in \[0, 256\)"):
        vocab.codes_to_ids(np.array([256]))
    with pytest.raises(ValueError, match="image-code ids must be in"):
        vocab.ids_to_codes(np.array([vocab.boi_id]))


def test_image_block_and_reserved_range_of_tiny() -> None:
    vocab = Vocabulary(TINY)
    block = vocab.image_block(np.arange(64))
    assert len(block) == 66 and block[0] == vocab.boi_id and block[-1] == vocab.eoi_id
    assert (block[1:-1] == np.arange(64) + 4).all()
    assert (vocab.modalities(block[1:-1]) == Modality.IMAGE).all()
    with pytest.raises(ValueError, match="an image has 64 codes, got 63"):
        vocab.image_block(np.arange(63))
    with pytest.raises(KeyError, match="outside the reserved range"):
        vocab.special_id("<reserved08706>")

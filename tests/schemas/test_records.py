"""Arrow schemas of the raw kinds, rejects and tokenized samples survive a parquet round trip."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import records


def test_every_kind_has_a_schema() -> None:
    assert set(records.RAW_SCHEMAS) == set(records.RECORD_KINDS) == {"text", "image_text", "interleaved", "sft"}
    for kind, schema in records.RAW_SCHEMAS.items():
        assert schema.metadata[b"kind"] == kind.encode()
        assert schema.field("id").nullable is False


def test_interleaved_uses_the_obelics_layout(tmp_path: Path) -> None:
    row = {
        "id": "doc-1",
        "texts": [None, "A cat.", None],
        "images": [
            {"bytes": b"\xff\xd8", "path": None, "url": None},
            None,
            {"bytes": None, "path": None, "url": "http://x/y.jpg"},
        ],
        "metadata": "[]",
    }
    pq.write_table(pa.Table.from_pylist([row], schema=records.INTERLEAVED), tmp_path / "i.parquet")
    back = pq.read_table(tmp_path / "i.parquet")
    assert back.schema.equals(records.INTERLEAVED, check_metadata=False)
    assert back.to_pylist() == [row]


def test_sft_segments_hold_text_or_image() -> None:
    row = {
        "id": "s",
        "category": "visual_chat",
        "prompt": [
            {"text": "What is this?", "image": None},
            {"text": None, "image": {"bytes": None, "path": "images/a.jpg", "url": None}},
        ],
        "answer": [{"text": "A cat.", "image": None}],
    }
    table = pa.Table.from_pylist([row], schema=records.SFT)
    assert table.to_pylist() == [row]
    assert set(records.SFT_CATEGORIES) == {
        "text",
        "code",
        "image_generation",
        "visual_chat",
        "interleaved",
        "safety",
    }


def test_reject_and_tokenized_sample_schemas() -> None:
    reject = {
        "source": "photos",
        "record_id": "000000001",
        "stage": "image",
        "reason": "image_truncated",
        "detail": "image file is truncated (3 bytes not processed)",
    }
    assert pa.Table.from_pylist([reject], schema=records.REJECT).to_pylist() == [reject]
    assert reject["reason"] in records.REJECT_REASONS
    assert "image_not_local" in records.REJECT_REASONS
    sample = {
        "key": "photos_000001",
        "source": "photos",
        "kind": "image_text",
        "record_id": "000000001",
        "tokens": [0, 8197, *range(4, 1028), 8196, 2],
        "n_tokens": 1029,
        "n_images": 1,
        "n_prompt_tokens": 0,
        "has_face": True,
        "n_faces": 1,
        "image_sizes": [[640, 480]],
    }
    assert pa.Table.from_pylist([sample], schema=records.TOKENIZED_SAMPLE).to_pylist() == [sample]
    with pytest.raises(pa.ArrowInvalid):
        pa.Table.from_pylist([{**sample, "image_sizes": [[640, 480, 3]]}], schema=records.TOKENIZED_SAMPLE)

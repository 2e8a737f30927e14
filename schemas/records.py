"""Arrow schemas of every record the jobs read or write, and the reject reason codes.

Raw kinds are the canonical form readers convert user formats into; an image is referenced the way
Hugging Face datasets stores one (a struct of bytes and path), plus the URL it came from.
"""

from __future__ import annotations

import pyarrow as pa

# Re-exported: the kinds' names live in schemas/record_kinds.py, without pyarrow.
from schemas.record_kinds import RECORD_KINDS as RECORD_KINDS
from schemas.record_kinds import SFT_CATEGORIES as SFT_CATEGORIES
from schemas.record_kinds import RecordKind as RecordKind
from schemas.record_kinds import SftCategory as SftCategory

# Exactly one of bytes / path should hold the image; a URL alone is fetched by the download stage (or, with
# downloads off, a reject: `image_not_local`).
IMAGE_REF = pa.struct(
    [
        pa.field("bytes", pa.binary()),
        pa.field("path", pa.string()),
        pa.field("url", pa.string()),
    ]
)

TEXT = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string()),
    ],
    metadata={"kind": "text"},
)

IMAGE_TEXT = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),  # the caption
        pa.field("image", IMAGE_REF, nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ],
    metadata={"kind": "image_text"},
)

# OBELICS layout: parallel lists; at each position exactly one of texts[i] / images[i] is set.
INTERLEAVED = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("texts", pa.list_(pa.string()), nullable=False),
        pa.field("images", pa.list_(IMAGE_REF), nullable=False),
        pa.field("metadata", pa.string()),  # JSON, as in OBELICS
    ],
    metadata={"kind": "interleaved"},
)

# One segment of an SFT turn: exactly one of text / image is set.
SEGMENT = pa.struct([pa.field("text", pa.string()), pa.field("image", IMAGE_REF)])

SFT = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("prompt", pa.list_(SEGMENT), nullable=False),
        pa.field("answer", pa.list_(SEGMENT), nullable=False),
    ],
    metadata={"kind": "sft"},
)

RAW_SCHEMAS: dict[str, pa.Schema] = {
    "text": TEXT,
    "image_text": IMAGE_TEXT,
    "interleaved": INTERLEAVED,
    "sft": SFT,
}

REJECT = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # read, clean, image, tokenize, ...
        pa.field("reason", pa.string(), nullable=False),  # a code of REJECT_REASONS
        pa.field("detail", pa.string()),
    ]
)

TOKENIZED_SAMPLE = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # WebDataset sample key, no dots
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("tokens", pa.large_list(pa.int32()), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("n_images", pa.int32(), nullable=False),
        # Leading tokens excluded from the loss (the SFT prompt); 0 for pretraining documents.
        pa.field("n_prompt_tokens", pa.int32(), nullable=False),
        pa.field("has_face", pa.bool_(), nullable=False),
        pa.field("n_faces", pa.int32(), nullable=False),
        pa.field("image_sizes", pa.list_(pa.list_(pa.int32(), 2))),  # original (width, height) per image
    ]
)

# One row per sample of a prepared shard, in key order (pipelines/shard_writer.py writes it as
# shard-NNNNN.attributes.parquet): the attributes of schemas/sample_filters.py BUILTIN_ATTRIBUTES, then one float64
# column per metadata column the source's options.attributes names. Null where a sample has no such value.
SAMPLE_ATTRIBUTES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("n_images", pa.int32(), nullable=False),
        pa.field("has_face", pa.int8(), nullable=False),  # 0 / 1, so that a filter compares it as a number
        pa.field("face_count", pa.int32(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("aspect", pa.float64()),
        pa.field("text_length", pa.int64(), nullable=False),
        pa.field("language", pa.string()),
        pa.field("language_score", pa.float64()),
    ]
)

REJECT_REASONS: dict[str, str] = {
    "file_unreadable": "the whole file could not be read (corrupt, truncated or not this format)",
    "bad_schema": "the file's columns do not hold what this source kind needs",
    "bad_record": "the record does not have the fields its kind needs, or they have the wrong type",
    "bad_json": "the line is not valid JSON",
    "record_too_large": "a jsonl line, tar member or parquet row larger than max_record_bytes (skipped unread)",
    "duplicate_member": "a tar sample has two members with the same extension (webdataset refuses it too)",
    "invalid_utf8": "text is not valid UTF-8",
    "empty_text": "no text left after cleanup",
    "text_too_short": "text shorter than the configured minimum",
    "text_too_long": "text longer than the configured maximum",
    "image_missing": "the image file or bytes are missing",
    "image_not_local": "the image is given only as a URL and downloads are off (set download.cache_dir), or its "
    "scheme is not http(s)",
    "download_bad_url": "the image URL is malformed, or it (or a redirect) is not http(s): nothing was fetched",
    "download_not_found": "the image URL answered HTTP 404 or 410",
    "download_http_error": "the image URL answered another HTTP error (the detail has the status), after retries",
    "download_timeout": "fetching the image timed out (connect, read or total), after retries",
    "download_connection_error": "the image's server could not be reached or dropped the connection, after retries",
    "download_too_large": "the image response is larger than download.max_bytes",
    "download_too_many_redirects": "the image URL redirects more than download.max_redirects times",
    "download_not_image": "the fetched bytes are not an image (an HTML page, an SVG, an empty body ...)",
    "download_opted_out": "the image's X-Robots-Tag opts it out (noai, noimageai, noindex, noimageindex)",
    "download_private_address": "the image's host (or a redirect's) is not a public address: loopback, private "
    "network, link-local (download.allow_private_addresses is off); nothing was sent to it",
    "image_empty": "the image has zero bytes",
    "image_truncated": "the image data ends early",
    "image_not_an_image": "the bytes are not an image format we can decode",
    "image_too_large": "the image has more pixels than the decompression-bomb limit",
    "image_too_small": "the image is smaller than the configured minimum side",
    "image_unsupported_mode": "the image's colour mode cannot be converted to RGB",
    "too_many_images": "the document has more images than fit one sequence",
    "too_long": "the tokenized sample is longer than the configured maximum",
    "duplicate": "the record repeats one kept (exactly, or nearly with dedup on); the detail names the kept record",
    "unexpected_error": "handling the record raised an error no other reason covers (the detail names it)",
}

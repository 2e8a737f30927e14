"""The names of record kinds and SFT categories: configs need them and load in every command, so they live apart
from the Arrow schemas (schemas/records.py re-exports them) and cost no pyarrow import."""

from __future__ import annotations

from typing import Literal, get_args

RecordKind = Literal["text", "image_text", "interleaved", "sft"]
RECORD_KINDS: tuple[str, ...] = get_args(RecordKind)

SftCategory = Literal["text", "code", "image_generation", "visual_chat", "interleaved", "safety"]
SFT_CATEGORIES: tuple[str, ...] = get_args(SftCategory)

"""GenerateConfig: sampling settings for text, images or both, with Chameleon's defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.config_base import ExistingLocation, StrictModel

GenerationMode = Literal["text", "image", "mixed"]


class TextSampling(StrictModel):
    temperature: float = Field(0.7, ge=0.0, description="0 means greedy")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.2, ge=1.0)


class ImageSampling(StrictModel):
    """Image codes; classifier-free guidance: u + s_img*(img - u) + s_txt*(full - img)."""

    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    cfg_text: float = Field(3.0, ge=0.0, description="guidance scale of the text prompt (s_txt)")
    cfg_image: float = Field(1.2, ge=0.0, description="guidance scale of the prompt's images (s_img)")


class GenerateConfig(StrictModel):
    checkpoint: ExistingLocation  # a path, or an s3:// (gs://, az://) URL
    mode: GenerationMode = "mixed"
    max_new_tokens: int = Field(1024, gt=0)
    text: TextSampling = Field(default_factory=TextSampling)
    image: ImageSampling = Field(default_factory=ImageSampling)
    seed: int = 0

"""DownloadConfig: how the prepare job fetches images that sources give only by URL (OBELICS, MMC4, URL lists).

Downloads are on when `cache_dir` is set; without it a URL-only image stays a reject (`image_not_local`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.config_base import OutputPath, StrictModel

# img2dataset's defaults: images whose server asks search engines and AI crawlers not to use them are skipped.
DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


class DownloadConfig(StrictModel):
    """Fetching URL images into a cache (img2dataset's per-image files and metadata, keyed by URL hash)."""

    cache_dir: OutputPath | None = Field(
        None, description="where fetched images and their metadata are kept; none: downloads are off"
    )
    concurrency: int = Field(16, ge=1, le=1024, description="downloads in flight per worker")
    per_host: int = Field(4, ge=1, description="downloads in flight per worker to one host")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0, description="longest wait for the next bytes of a response")
    total_timeout_s: float = Field(60.0, gt=0, description="longest time one attempt may take, however it trickles")
    retries: int = Field(
        2, ge=0, le=10, description="attempts after the first, on timeouts, connection errors, 429, 5xx"
    )
    backoff_s: float = Field(0.5, ge=0, description="first back-off; doubled each retry, with jitter")
    max_backoff_s: float = Field(30.0, ge=0, description="cap on one back-off, Retry-After included")
    max_bytes: int = Field(32 << 20, ge=1024, description="larger responses are refused (download_too_large)")
    max_redirects: int = Field(5, ge=0)
    allow_private_addresses: bool = Field(
        False,
        description="also fetch from loopback, private-network and link-local addresses (the cloud metadata "
        "service among them); off, a host that resolves only to such addresses, directly or by a redirect, is "
        "refused (download_private_address)",
    )
    user_agent: str = "chameleon-pipeline/0.1 (image download; img2dataset-compatible cache)"
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DISALLOWED_DIRECTIVES),
        description="X-Robots-Tag directives that opt an image out (download_opted_out); [] to ignore the header",
    )
    failed_image: Literal["drop", "reject"] = Field(
        "drop",
        description="interleaved documents: drop an image that cannot be fetched (and count it), or reject "
        "the whole document; an image-text pair or SFT sample without its image is always rejected",
    )

    @property
    def enabled(self) -> bool:
        return self.cache_dir is not None

    @model_validator(mode="after")
    def _per_host_within_concurrency(self) -> DownloadConfig:
        if self.per_host > self.concurrency:
            raise ValueError(f"per_host ({self.per_host}) cannot exceed concurrency ({self.concurrency})")
        return self

    def outcome_fingerprint(self) -> dict[str, object] | None:
        """The settings that decide which images a record keeps (not where they are cached or how fast they come):
        part of a source's fingerprint, so turning downloads on redoes the shards that rejected URLs."""
        if not self.enabled:
            return None
        return {
            "max_bytes": self.max_bytes,
            "failed_image": self.failed_image,
            "disallowed": sorted(d.lower() for d in self.disallowed_header_directives),
            "allow_private_addresses": self.allow_private_addresses,
        }

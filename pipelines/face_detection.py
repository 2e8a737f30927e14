"""Face detection for the mixture's face weight: OpenCV's Haar cascade on a copy no larger than 256 px.

Behind the small `FaceDetector` interface so a better detector (YuNet, MediaPipe) can be plugged in.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import cv2
import numpy as np

DEFAULT_MAX_SIDE = 256


class FaceDetector(Protocol):
    """Counts the human faces in an RGB uint8 image (H, W, 3)."""

    name: str

    def count_faces(self, rgb: np.ndarray) -> int: ...


@lru_cache(maxsize=4)
def _cascade(file_name: str) -> cv2.CascadeClassifier:
    path = cv2.data.haarcascades + file_name
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"could not load the Haar cascade {path}: is opencv-python-headless < 5 installed?")
    return cascade


class HaarFaceDetector:
    """Frontal-face Haar cascade; cheap enough for every image when run at 256 px (see docs/performance.md)."""

    def __init__(
        self,
        max_side: int = DEFAULT_MAX_SIDE,
        scale_factor: float = 1.15,  # on the sample photos: as many faces as 1.1, fewer false ones, 1.4x faster
        min_neighbors: int = 5,
        min_size: int = 24,
        cascade: str = "haarcascade_frontalface_default.xml",
    ):
        self.name = f"haar:{cascade}@{max_side}"
        self.max_side = max_side
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size = min_size
        self.cascade_file = cascade

    def count_faces(self, rgb: np.ndarray) -> int:
        """Number of faces found on a grayscale copy whose long side is at most `max_side`."""
        gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        scale = self.max_side / max(gray.shape)
        if scale < 1.0:
            size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        faces = _cascade(self.cascade_file).detectMultiScale(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
        )
        return len(faces)

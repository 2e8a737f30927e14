"""Face detection on the sample photos: faces found where the captions say there are faces."""

import json

import numpy as np
from PIL import Image

from pipelines.face_detection import HaarFaceDetector
from tests.conftest import REPO


def test_faces_on_sample_photos() -> None:
    detector = HaarFaceDetector()
    photos = [json.loads(line) for line in (REPO / "sample/images/images.jsonl").open()]
    found = {}
    for photo in photos:
        with Image.open(REPO / "sample/images" / photo["file"]) as image:
            found[photo["file"]] = detector.count_faces(np.asarray(image.convert("RGB")))
    with_faces = [p["file"] for p in photos if p["has_face"]]
    without = [p["file"] for p in photos if not p["has_face"]]
    # Frontal faces are found; the profile face (man_with_camera) is a known miss of a frontal cascade.
    assert sum(found[f] >= 1 for f in with_faces) >= 5
    assert found["grace_hopper_portrait.jpg"] == 1 and found["astronaut_eileen_collins.jpg"] == 1
    # At most one false positive among the 18 photos without faces (a Haar cascade is a heuristic).
    assert sum(found[f] >= 1 for f in without) <= 1


def test_blank_and_tiny_images_have_no_faces() -> None:
    detector = HaarFaceDetector()
    assert detector.count_faces(np.full((512, 512, 3), 255, np.uint8)) == 0
    assert detector.count_faces(np.zeros((8, 8, 3), np.uint8)) == 0
    assert detector.name == "haar:haarcascade_frontalface_default.xml@256"

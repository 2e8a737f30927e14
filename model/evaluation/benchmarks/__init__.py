"""Benchmarks scored automatically: image-to-text (COCO captioning, VQAv2) and text benchmarks, from local files."""

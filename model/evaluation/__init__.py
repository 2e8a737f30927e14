"""Evaluation: held-out loss, and the human-evaluation harness with its annotation pages and scores."""

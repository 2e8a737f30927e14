"""Generation: the generator, its one-token decode step and CUDA graph, prompts, segment output, loading a trained
model."""

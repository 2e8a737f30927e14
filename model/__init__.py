"""Everything torch: tokenizers, the transformer, checkpoints, the shard loader, the trainer, generation, evaluation."""

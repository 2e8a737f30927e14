"""Everything torch, in rooms that import downward only:
files <- tokenizers <- lm <- training <- generation <- evaluation.

- `model.files`: reading and writing the files model code keeps (bounded readers with one-line errors).
- `model.tokenizers`: the vocabulary, text / image / mixed-modal tokenizers, image preprocessing, the VQGAN, its
  checkpoints and training; the only room `pipelines/` imports.
- `model.lm`: the transformer, its losses and document attention, weight conversion and exports.
- `model.training`: the trainer, stage loader, checkpoints, optimizer and schedules, MFU, the run lock.
- `model.generation`: the generator, its decode step and CUDA graph, prompts, segment output, loading a trained model.
- `model.evaluation`: held-out loss and the human-evaluation harness with its pages and scores.
"""

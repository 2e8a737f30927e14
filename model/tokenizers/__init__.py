"""Tokenizers: the vocabulary, text / image / mixed-modal tokenizers, image preprocessing, the VQGAN, its checkpoints
and its training. The only room of model/ that pipelines/ imports."""

"""The language model: the transformer, its losses and document attention, weight conversion (Meta, Hugging Face)."""

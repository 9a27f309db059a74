"""The small world: synthetic tasks, tokenizer and data files for the bundled default model."""

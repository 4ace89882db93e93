"""Files: Hugging Face checkpoints, BiTA adapter files, orbax training checkpoints, GGUF conversion."""

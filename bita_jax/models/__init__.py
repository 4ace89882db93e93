"""The LLaMA model: layers (norms, rotary embeddings, attention) and the decoder."""

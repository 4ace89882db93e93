"""Decoding: the KV cache, acceptance, the tree step, the on-device loop and the host runner."""

"""BiTA itself: the adapter (prompt prefix and mask tokens), the draft tree, the training format."""

"""Training the adapter: data (host, numpy), the train step, the loop, pretraining of the demo model."""

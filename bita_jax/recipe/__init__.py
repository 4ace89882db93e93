"""The self-distillation recipe end to end: real prompts, the base model's answers, training with
held-out evaluation, tree tuning and an MT-Bench report (`python -m bita_jax.recipe --help`)."""

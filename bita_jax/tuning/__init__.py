"""Hardware-aware draft trees: acceptance statistics, measured step cost, and the tree choice.

stats.py      rank paths' acceptance probabilities from teacher-forcing ranks (numpy only)
calibrate.py  those ranks from calibration data, by the training-format forward
step_cost.py  measured seconds of the jitted tree step (a ladder of row counts) and of the AR step
choice.py     predicted tokens/s per tree and batch size, the choice (AR unless a tree wins), trees.json
tuner.py      the pipeline behind `python -m bita_jax.tune` (bita_jax/cli/tune.py)
auto.py       `--tree auto`: the stored choice, else step costs measured now, else the default tree
"""

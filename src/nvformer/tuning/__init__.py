"""Post-training regularisation: choosing the knobs of a converted model.

``space`` (which modules share a setting, and the ranges), ``search`` (Optuna, imported on first
use), ``shared`` (a study shared by workers: its lock, dead trials, the recorded space),
``report`` (trials.csv, best.json, plots), ``cache`` (memoised evaluation for searches).
"""

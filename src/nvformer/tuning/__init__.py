"""Post-training regularisation: choosing the knobs of a converted model.

``space`` (which modules share a setting, and the ranges), ``search`` (Optuna, imported on first
use), ``report`` (trials.csv, best.json, plots), ``cache`` (memoised evaluation for searches).
"""

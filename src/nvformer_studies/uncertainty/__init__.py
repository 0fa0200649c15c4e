"""Uncertainty of review classifiers: MAP, MC dropout, ensembles, Dirichlet and NV attention (the
harness), the Bayesian-attention study and its doc section."""

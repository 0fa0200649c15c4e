"""Uncertainty of review classifiers: MAP, MC dropout, ensembles, Dirichlet and NV attention."""

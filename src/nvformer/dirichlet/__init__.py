"""Bayesian attention weights (Cinquin, Immer, Horn & Fortuin 2021; docs/MATH.md section 5):
``functional`` (the maths), ``module`` (``DirichletAttention``); Hugging Face models: :mod:`nvformer.hf.dirichlet`."""

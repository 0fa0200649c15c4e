"""The studies of nvformer (docs/RESULTS.md): data readers for ``../shared/data``, fine-tuning
harnesses, the sentiment / language-model / translation / NVAE / Bayesian-attention studies, the
writers of the doc sections and their plots. Built on the public ``nvformer`` API; nothing in
``nvformer`` imports this package. Command line: ``nvformer-studies``.
"""

"""The studies of nvformer (docs/RESULTS.md, docs/PERFORMANCE.md): data readers for
``../shared/data``, fine-tuning harnesses, one study protocol (:mod:`.common.protocol`) shared by
the sentiment / language-model / translation studies, the NVAE and Bayesian-attention studies, the
identity check of converted checkpoints, the writers of the doc sections (every table through
``docs/results/<name>.csv``) and their plots, benchmark timing. Built on the ``nvformer`` API;
nothing in ``nvformer`` imports this package. Command line: ``nvformer-studies``; the commands that
write the docs: ``experiments/*.py`` and ``benchmarks/*.py``.
"""

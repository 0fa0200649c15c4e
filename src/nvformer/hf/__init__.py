"""Hugging Face ``transformers`` integration (docs/DESIGN.md, "Hugging Face").

``adapters`` (the family table), ``forward`` (the NV forward shared by every converted module),
``convert`` (in place, and back), ``prior`` (empirical priors through the adapters), ``dirichlet``
(Dirichlet attention through ``transformers.AttentionInterface``). Nothing here imports
``transformers`` at module level.
"""

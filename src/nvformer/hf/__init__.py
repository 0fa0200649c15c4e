"""Hugging Face ``transformers`` integration (docs/DESIGN.md, "Hugging Face").

``adapters`` (the family table), ``forward`` (the NV forward shared by every converted module),
``convert`` (in place, and back), ``prior`` (empirical priors through the adapters), ``io``
(whole-model save/load). Nothing here imports ``transformers`` except ``io.load_pretrained``.
"""

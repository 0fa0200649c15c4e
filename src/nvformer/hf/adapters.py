"""The adapter table: how nvformer reads each Hugging Face attention family.

ONE table (:data:`ADAPTERS`). An entry says, for a family of attention classes, where the
query/key/value/output projections are (in ``nn.Linear`` convention), the head size, the
attention dropout, which forward arguments carry the cross-attention input, the mask, the KV
cache, rotary embeddings and a position bias, and what the forward returns. Families whose
modeling code is "Copied from" another share an entry. The NV forward itself
(:mod:`nvformer.hf.forward`) is shared by all.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..nn.mha import layer_index as path_layer_index

Linear = tuple[Tensor, Tensor | None]  # (weight [out, in], bias [out] or None)

# The KV cache reaches an attention module under a name that transformers has changed between
# releases (``cache`` from 5.24, ``past_key_values`` before, ``past_key_value`` in 4.x): an
# adapter with ``cached=True`` resolves it from the module's own signature, and a signature
# with none of these names is an error, not a silently ignored cache.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def _linear(module: nn.Module, name: str) -> Linear:
    lin = getattr(module, name)
    return lin.weight, lin.bias


def _named_qkv(q: str, k: str, v: str) -> Callable[[nn.Module], tuple[Linear, Linear, Linear]]:
    def get(module: nn.Module) -> tuple[Linear, Linear, Linear]:
        return _linear(module, q), _linear(module, k), _linear(module, v)

    return get


def _gpt2_qkv(module: nn.Module) -> tuple[Linear, Linear, Linear]:
    """GPT-2 packs projections in ``Conv1D`` (weight ``[in, out]``): ``c_attn`` = q|k|v, or k|v plus ``q_attn``."""
    E = module.embed_dim
    w, b = module.c_attn.weight, module.c_attn.bias
    if module.is_cross_attention:
        q = (module.q_attn.weight.t(), module.q_attn.bias)
        return q, (w[:, :E].t(), b[:E]), (w[:, E:].t(), b[E:])
    return (w[:, :E].t(), b[:E]), (w[:, E : 2 * E].t(), b[E : 2 * E]), (w[:, 2 * E :].t(), b[2 * E :])


def _out_proj(name: str | None) -> Callable[[nn.Module, Tensor], Tensor]:
    if name is None:
        return lambda module, x: x
    return lambda module, x: getattr(module, name)(x)


def _gpt2_out(module: nn.Module, x: Tensor) -> Tensor:
    return module.resid_dropout(module.c_proj(x))


def _dropout_p(value) -> float:
    return float(value.p) if isinstance(value, nn.Dropout) else float(value)


@dataclass(frozen=True)
class Adapter:
    """How to read one family of attention modules. See the module docstring."""

    family: str
    classes: tuple[str, ...]
    qkv: Callable[[nn.Module], tuple[Linear, Linear, Linear]]
    out: Callable[[nn.Module, Tensor], Tensor]
    head_dim: str
    dropout: str
    is_cross: Callable[[nn.Module, str], bool]
    arg_kv: str | None = None
    arg_mask: str = "attention_mask"
    arg_kv_mask: str | None = None
    cached: bool = False
    arg_rope: str | None = None
    arg_position_bias: str | None = None
    returns_position_bias: bool = False
    notes: str = ""
    _params: dict = field(default_factory=dict, compare=False, repr=False)

    def _signature(self, cls: type) -> tuple[list[str], str | None]:
        """(positional parameter names after ``self``, the cache argument's name) of ``cls.forward``, computed once per class."""
        if cls not in self._params:
            params = list(inspect.signature(cls.forward).parameters.values())[1:]
            cache = None
            if self.cached:
                names = {p.name for p in params}
                cache = next((n for n in CACHE_ARGUMENTS if n in names), None)
                if cache is None:
                    raise ValueError(f"nvformer: {cls.__name__}.forward takes none of the KV-cache arguments {CACHE_ARGUMENTS} "
                                     f"(its parameters: {[p.name for p in params]}); this transformers version is not supported yet")
            self._params[cls] = ([p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)], cache)
        return self._params[cls]

    def positional_names(self, cls: type) -> list[str]:
        """Names of the original forward's positional parameters after ``self``."""
        return self._signature(cls)[0]

    def call_arguments(self, module: nn.Module, args: tuple, kwargs: dict) -> dict:
        """The original forward's arguments by name (positional ones named from the base class's signature)."""
        call = dict(zip(self.positional_names(base_class(module)), args))
        call.update(kwargs)
        return call

    def hidden_states(self, module: nn.Module, call: dict) -> Tensor:
        """The input states: the original forward's first positional argument, from :meth:`call_arguments`."""
        return call[self.positional_names(base_class(module))[0]]

    def check_signature(self, module: nn.Module) -> None:
        """Read ``module``'s forward signature now (once per class): a forward this adapter cannot
        call, such as one taking no known KV-cache argument, fails here rather than mid-forward."""
        self._signature(base_class(module))

    def cache(self, module: nn.Module, call: dict):
        """The KV cache object passed to ``module`` (None for families without one, or when none was passed)."""
        name = self._signature(base_class(module))[1]
        return call.get(name) if name else None

    def dropout_p(self, module: nn.Module) -> float:
        return _dropout_p(getattr(module, self.dropout))

    def head_size(self, module: nn.Module) -> int:
        return int(getattr(module, self.head_dim))


def base_class(module: nn.Module) -> type:
    """The original Hugging Face class of ``module`` (also after conversion)."""
    return getattr(type(module), "_nv_base_class", type(module))


def _class_is_cross(module: nn.Module, name: str) -> bool:
    return type(module).__name__.endswith("CrossAttention")


ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        family="bert",
        classes=("BertSelfAttention", "BertCrossAttention", "RobertaSelfAttention", "RobertaCrossAttention"),
        qkv=_named_qkv("query", "key", "value"),
        out=_out_proj(None),  # the output dense layer lives in BertSelfOutput
        head_dim="attention_head_size",
        dropout="dropout",
        is_cross=_class_is_cross,
        arg_kv="encoder_hidden_states",
        cached=True,
        notes="BERT, RoBERTa (incl. all-MiniLM-L6-v2) and BERT decoders in EncoderDecoderModel",
    ),
    Adapter(
        family="distilbert",
        classes=("DistilBertSelfAttention",),
        qkv=_named_qkv("q_lin", "k_lin", "v_lin"),
        out=_out_proj("out_lin"),
        head_dim="attention_head_size",
        dropout="dropout",
        is_cross=lambda m, n: False,
    ),
    Adapter(
        family="vit",
        classes=("ViTAttention",),
        qkv=_named_qkv("q_proj", "k_proj", "v_proj"),
        out=_out_proj("o_proj"),
        head_dim="head_dim",
        dropout="attention_dropout",
        is_cross=lambda m, n: False,
    ),
    Adapter(
        family="gpt2",
        classes=("GPT2Attention",),
        qkv=_gpt2_qkv,
        out=_gpt2_out,
        head_dim="head_dim",
        dropout="attn_dropout",
        is_cross=lambda m, n: bool(m.is_cross_attention),
        arg_kv="encoder_hidden_states",
        arg_kv_mask="encoder_attention_mask",
        cached=True,
        notes="packed Conv1D projections; `scaling` includes scale_attn_by_inverse_layer_idx",
    ),
    Adapter(
        family="llama",
        classes=("LlamaAttention", "Qwen2Attention"),
        qkv=_named_qkv("q_proj", "k_proj", "v_proj"),
        out=_out_proj("o_proj"),
        head_dim="head_dim",
        dropout="attention_dropout",
        is_cross=lambda m, n: False,
        cached=True,
        arg_rope="position_embeddings",
        notes="grouped-query attention and rotary embeddings (rotate_half convention); incl. SmolLM2",
    ),
    Adapter(
        family="bart",
        classes=("BartAttention", "MarianAttention"),
        qkv=_named_qkv("q_proj", "k_proj", "v_proj"),
        out=_out_proj("out_proj"),
        head_dim="head_dim",
        dropout="dropout",
        is_cross=lambda m, n: n.rsplit(".", 1)[-1] == "encoder_attn",
        arg_kv="key_value_states",
        cached=True,
    ),
    Adapter(
        family="t5",
        classes=("T5Attention",),
        qkv=_named_qkv("q", "k", "v"),
        out=_out_proj("o"),
        head_dim="key_value_proj_dim",
        dropout="dropout",
        is_cross=lambda m, n: ".EncDecAttention" in f".{n}",
        arg_kv="key_value_states",
        arg_mask="mask",
        cached=True,
        arg_position_bias="position_bias",
        returns_position_bias=True,
        notes="no logit scaling; relative position bias computed once and reused by later layers",
    ),
)

_BY_CLASS = {cls: a for a in ADAPTERS for cls in a.classes}


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter of ``module``'s class (also after conversion, via ``_nv_base_class``)."""
    return _BY_CLASS.get(base_class(module).__name__)


def supported_classes() -> list[str]:
    return sorted(_BY_CLASS)


def looks_like_attention(module: nn.Module) -> bool:
    """A leaf-level attention module: class name contains "Attention" and no child does."""
    if "Attention" not in type(module).__name__:
        return False
    return not any("Attention" in type(c).__name__ for c in module.modules() if c is not module)


def layer_index(module: nn.Module, name: str) -> int | None:
    """The module's own ``layer_idx``, else the index in its path (``"...layer.3.attention"`` -> 3)."""
    idx = getattr(module, "layer_idx", None)
    return idx if isinstance(idx, int) else path_layer_index(name)

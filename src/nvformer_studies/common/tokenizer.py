"""A byte-level BPE tokenizer trained on the study's own text (the translation model and the NVAE
are trained from scratch here, so their vocabularies are too)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SPECIAL_TOKENS", "train_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2


def train_tokenizer(texts: Sequence[str], vocab_size: int = 8000, *, min_frequency: int = 2, model_max_length: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` (one vocabulary; for translation, shared by both languages).

    Special tokens: ``<pad>`` (id 0), ``</s>`` (id 1, appended to every encoded text, as Marian
    expects on both sides), ``<unk>`` (id 2; byte-level BPE never needs it). Decoding with
    ``skip_special_tokens=True`` gives the input text back exactly (no normaliser, no prefix
    space). Returns a ``transformers.PreTrainedTokenizerFast`` (``save_pretrained`` works).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: no texts")
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"train_tokenizer: vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes), got {vocab_size}")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    eos = tk.token_to_id("</s>")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)

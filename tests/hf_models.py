"""Tiny Hugging Face models of every supported family, built from configs, all weights perturbed."""

from __future__ import annotations

import torch
import transformers as tf

V = 60  # vocabulary size


def perturb(model, std=0.05, seed=0):
    """Add noise to every parameter (HF random init zeroes biases and hides bias-path bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def _bert_cfg(**kw):
    return dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, **kw)


def build(family: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    if family == "bert":
        m = tf.BertForSequenceClassification(tf.BertConfig(**_bert_cfg()))
    elif family == "roberta":
        m = tf.RobertaModel(tf.RobertaConfig(**_bert_cfg(pad_token_id=1)), add_pooling_layer=False)
    elif family == "distilbert":
        m = tf.DistilBertModel(tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0, attention_dropout=0.0, max_position_embeddings=64))
    elif family == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    elif family == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    elif family == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    elif family == "bart":
        m = tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))
    elif family == "marian":
        m = tf.MarianMTModel(tf.MarianConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=V - 1, eos_token_id=0, decoder_start_token_id=V - 1))
    elif family == "t5":
        m = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    elif family == "vit":
        m = tf.ViTModel(tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), add_pooling_layer=False)
    elif family == "encdec":
        enc = tf.BertConfig(**_bert_cfg())
        dec = tf.BertConfig(**_bert_cfg(is_decoder=True, add_cross_attention=True))
        m = tf.EncoderDecoderModel(config=tf.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
        m.config.decoder_start_token_id = 0
        m.config.pad_token_id = 0
    else:
        raise ValueError(family)
    m.set_attn_implementation(attn)
    return perturb(m)


ENCODERS = ("bert", "roberta", "distilbert", "vit")
CAUSAL = ("gpt2", "llama", "qwen2")
SEQ2SEQ = ("bart", "marian", "t5", "encdec")
ALL = ENCODERS + CAUSAL + SEQ2SEQ


def inputs(family: str, padding: str | None, B: int = 3, N: int = 7, seed: int = 1):
    """Model keyword inputs and the bool ``[B, N]`` mask of positions whose outputs are compared."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(B, 3, 16, 16, generator=g)}, None
    ids = torch.randint(3, V - 2, (B, N), generator=g)
    am = torch.ones(B, N, dtype=torch.long)
    if padding == "right":
        am[1, N - 2:] = 0
        am[2, 2:] = 0
    elif padding == "left":
        am[1, :2] = 0
        am[2, : N - 2] = 0
    kw = {"input_ids": ids, "attention_mask": am}
    if family in SEQ2SEQ:
        kw["decoder_input_ids"] = torch.randint(3, V - 2, (B, 5), generator=g)
        return kw, None  # decoder positions are all valid
    return kw, am.bool()


def output(model, kw):
    out = model(**kw)
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    raise AssertionError(type(out))


def tiny_llama(tok, positions: int = 128, **overrides):
    """A tiny Llama causal LM (GQA, RoPE) over a BERT WordPiece tokenizer whose BOS token is set
    (e.g. ``[CLS]``); seeded random weights, evaluation mode."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{**dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=positions, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id), **overrides})
    return tf.LlamaForCausalLM(cfg).eval()


def tiny_marian(tok, positions: int = 128, **overrides):
    """A tiny Marian encoder-decoder over a BERT WordPiece tokenizer (pad = decoder start, [SEP] = EOS);
    seeded random weights, evaluation mode."""
    torch.manual_seed(0)
    cfg = tf.MarianConfig(**{**dict(vocab_size=tok.vocab_size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=positions,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.pad_token_id),
                             **overrides})
    return tf.MarianMTModel(cfg).eval()

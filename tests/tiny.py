"""Tiny random-weight models and an offline tokenizer for tests (no hub, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from kvcompile.kvparams import KVParams
from kvcompile.plan import ModelShape

WORDS = ("the a of and to in is was it that he she said her his with for as on at by be had not but what all "
         "were when we there can an your which their if do will each about how up out them then many some so "
         "these would other into has more two like him see time could no make than first been its who now "
         "people my made over did down only way find use may water long little very after words called just "
         "where most know secret code alpha beta gamma delta one three four five six seven eight nine zero").split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary (ids < 160), built offline."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_llama_config(**kw: int) -> LlamaConfig:
    """2 layers, 6 query heads over 2 KV heads (GQA 3), head_dim 16."""
    base = dict(vocab_size=160, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(config: LlamaConfig | None = None, seed: int = 0) -> torch.nn.Module:
    """A random-weight causal LM in eval mode (SDPA attention)."""
    torch.manual_seed(seed)
    cfg = config or tiny_llama_config()
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_tiny(folder: Path, config: LlamaConfig | None = None, seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as a HuggingFace folder; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(config, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def calib_text(n_words: int = 6000, seed: int = 0) -> str:
    """Pseudo-text over the tokenizer's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g)
    return " ".join(WORDS[i] for i in idx.tolist())


def kv_params(shape: ModelShape, p: float | tuple[float, float], mean: float | None = None, seed: int = 0) -> KVParams:
    """Static K/V parameters for a plan on ``shape`` (a ``ModelShape``): direction statistics ``P`` either a constant
    or ``lo + span * U[0, 1)`` for ``p = (lo, span)``, and, with ``mean``, centring means ``mean * N(0, 1)``; drawn
    per layer and role (K then V) from one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = KVParams()
    dims = (shape.num_kv_heads, shape.head_dim)
    for i in range(shape.num_layers):
        for role in ("k", "v"):
            if isinstance(p, tuple):
                out.set(i, role, "p", p[0] + p[1] * torch.rand(*dims, generator=g))
            else:
                out.set(i, role, "p", torch.full(dims, float(p)))
            if mean is not None:
                out.set(i, role, "mean", mean * torch.randn(*dims, generator=g))
    return out

"""Per-layer attention-output fidelity of the quantized runtime against fp16, with identical inputs.

Tensor reconstruction error can run opposite to end-to-end quality, so this compares what attention produces (as the
kvmix validation does): an fp16 forward over an eval window captures every layer's post-RoPE q/k/v
(:mod:`kvcompile.capture`); each layer's captured k/v are then fed, ``chunk`` tokens at a time, into that layer of a
real runtime cache (``QuantizedKVCache(plan, params, config).layers[i]``: ``update``, ``attend``, ``flush``, the
calls the registered attention function makes) and the output is compared with fp32 causal attention over the same
q/k/v (:func:`kvcompile.formats.reference_attention`). Because every layer gets the fp16 model's own inputs, errors
do not compound across layers: the number isolates each layer's quantization.

Per layer: mean cosine similarity of the output vectors (over query tokens and query heads), the mean cosine of the
worst query head, and the relative MSE ``sum ||o - o_ref||^2 / sum ||o_ref||^2``. Layers the plan keeps in fp16 go
through transformers' ``DynamicLayer`` (what the runtime uses for them) and come out exact; sliding-window layers are
bounded fp16 caches in the runtime and are reported as not compared.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from rich.progress import Progress
from torch import Tensor

from kvcompile.errors import KVCompileError
from kvcompile.formats import reference_attention

__all__ = ["DEFAULT_FIDELITY_WINDOWS", "LayerStats", "compare_layer", "run_fidelity"]

#: eval windows of ``ctx`` tokens used when no ``max_tokens`` is given (one is enough to rank layers; it is cheap)
DEFAULT_FIDELITY_WINDOWS = 1


class LayerStats:
    """Running sums of one layer's comparison (over windows, chunks, tokens and query heads)."""

    def __init__(self, num_q_heads: int) -> None:
        self.cos_sum = torch.zeros(num_q_heads, dtype=torch.float64)
        self.count = torch.zeros(num_q_heads, dtype=torch.float64)
        self.err = 0.0
        self.ref = 0.0

    def add(self, out: Tensor, ref: Tensor) -> None:
        """Accumulate outputs ``out`` and references ``ref`` ``[B, Hq, T, d]``."""
        o, r = out.double(), ref.double()
        cos = torch.nn.functional.cosine_similarity(o, r, dim=-1, eps=1e-30)  # [B, Hq, T]
        self.cos_sum += cos.sum(dim=(0, 2)).cpu()
        self.count += cos.shape[0] * cos.shape[2]
        self.err += float(((o - r) ** 2).sum())
        self.ref += float((r ** 2).sum())

    def summary(self) -> dict[str, float]:
        per_head = self.cos_sum / self.count.clamp_min(1)
        return {"cos": float(self.cos_sum.sum() / self.count.sum().clamp_min(1)),
                "cos_worst_head": float(per_head.min()),
                "rel_mse": self.err / self.ref if self.ref > 0 else 0.0}


def _reference(q: Tensor, k: Tensor, v: Tensor, scaling: float, start: int, softcap: float | None) -> Tensor:
    """fp32 causal attention of queries at positions ``start..start+Tq-1`` over keys at ``0..Tk-1`` (GQA)."""
    tq, tk = q.shape[2], k.shape[2]
    qpos = torch.arange(start, start + tq, device=q.device)
    kpos = torch.arange(tk, device=q.device)
    if softcap is None:
        return reference_attention(q, k, v, scaling, q_positions=qpos, k_positions=kpos)
    # Soft-capped logits (Gemma 2): the reference above has no cap, so the same computation is written out with it.
    rep = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(rep, dim=1), v.float().repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scaling
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vf)


def compare_layer(layer: Any, q: Tensor, k: Tensor, v: Tensor, scaling: float, chunk: int, stats: LayerStats,
                  softcap: float | None = None) -> None:
    """Feed one layer's k/v ``[B, Hkv, T, d]`` into runtime cache ``layer`` by chunks; compare attention outputs.

    ``layer`` is a :class:`~kvcompile.runtime.cache.QuantizedLayer` (quantized path: update, attend, flush) or the
    ``DynamicLayer`` the runtime uses for an all-fp16 layer (attended by plain causal attention, as SDPA would).
    """
    from kvcompile.runtime.attention import attend
    from kvcompile.runtime.cache import QuantizedLayer

    T = q.shape[2]
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        qc = q[:, :, s:e]
        if isinstance(layer, QuantizedLayer):
            layer.update(k[:, :, s:e], v[:, :, s:e])
            out = attend(layer, qc, None, scaling, softcap)
            layer.flush()  # as the registered attention function does after attending
        else:
            kk, vv = layer.update(k[:, :, s:e], v[:, :, s:e])
            out = _reference(qc, kk, vv, scaling, s, softcap)
        stats.add(out, _reference(qc, k[:, :, :e], v[:, :, :e], scaling, s, softcap))


def _formats(plan: Any, i: int) -> str:
    lp = plan.layers[i]
    ks, vs = sorted({hp.k.name for hp in lp.heads}), sorted({hp.v.name for hp in lp.heads})
    return f"K {'/'.join(ks)}, V {'/'.join(vs)}"


def run_fidelity(model: torch.nn.Module, tokenizer: Any, *, data: str = "austen", max_tokens: int | None = None,
                 ctx: int = 2048, chunk: int = 128, progress: Progress | None = None) -> dict[str, Any]:
    """Per-layer attention-output fidelity of a lowered model on the eval split of ``data`` (module docstring).

    ``fp16`` is the reference (cosine 1 by definition); ``quantized`` the worst layer's mean cosine; ``details``
    has the worst layers and ``per_layer`` lists (index = layer; None for a layer not compared) of the cosine,
    worst-head cosine, relative MSE and formats.
    """
    from kvcompile.capture import capture_attention
    from kvcompile.data import token_windows
    from kvcompile.eval import make_progress
    from kvcompile.eval.ppl import EVAL_SEED
    from kvcompile.runtime.cache import QuantizedKVCache

    if max_tokens is None:
        n, length = DEFAULT_FIDELITY_WINDOWS, ctx
    else:
        n, length = max(1, max_tokens // ctx), min(ctx, max_tokens)
    ids = token_windows(data, tokenizer, split="eval", n_windows=n, seq_len=length, seed=EVAL_SEED)
    lowered = model.kvcompile
    plan = lowered.plan
    shape = plan.shape
    dev = next(model.parameters()).device
    params = lowered.params.to(dev)
    stats = [LayerStats(shape.num_q_heads) for _ in range(shape.num_layers)]
    compared: set[int] = set()

    own = progress is None
    prog = make_progress() if own else progress
    with prog if own else nullcontext():
        task = prog.add_task("fidelity (layers x windows)", total=n * shape.num_layers)
        for w in range(ids.shape[0]):
            cache = QuantizedKVCache(plan, params, model.config, mode=lowered.mode)

            def callback(i: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
                         module: torch.nn.Module, cache: QuantizedKVCache = cache) -> None:
                if not (shape.sliding and shape.sliding[i]):
                    softcap = getattr(module, "attn_logit_softcapping", None)
                    compare_layer(cache.layers[i], q, k, v, scaling, chunk, stats[i], softcap)
                    compared.add(i)
                prog.advance(task)

            with torch.no_grad(), capture_attention(model, callback) as cap:
                model(ids[w:w + 1].to(dev), use_cache=False, logits_to_keep=1)
            cap.require()

    per_layer = []
    for i in range(shape.num_layers):
        row: dict[str, Any] = {"layer": i, "formats": _formats(plan, i)}
        row.update(stats[i].summary() if i in compared else {"cos": None, "cos_worst_head": None, "rel_mse": None,
                                                              "note": "sliding-window layer (fp16), not compared"})
        per_layer.append(row)
    rows = [r for r in per_layer if r["cos"] is not None]
    if not rows:
        raise KVCompileError("no attention layer could be compared (every layer uses a sliding window)")
    worst = min(rows, key=lambda r: r["cos"])
    worst_mse = max(rows, key=lambda r: r["rel_mse"])
    return {
        "fp16": 1.0,
        "quantized": worst["cos"],
        "delta": worst["cos"] - 1.0,
        "metric": "worst-layer attention-output cosine (fp16 is the reference)",
        "n_tokens": int(ids.numel()),
        "settings": {"ctx": int(ids.shape[1]), "chunk": chunk, "windows": int(ids.shape[0]), "eval_seed": EVAL_SEED},
        "details": {
            "worst_layer": worst["layer"],
            "worst_cos": worst["cos"],
            "worst_rel_mse_layer": worst_mse["layer"],
            "max_rel_mse": worst_mse["rel_mse"],
            "mean_cos": sum(r["cos"] for r in rows) / len(rows),
            # columns rather than rows: compact in JSON and in the CLI's table (one line per metric)
            "per_layer": {key: [r.get(key) for r in per_layer] for key in ("cos", "cos_worst_head", "rel_mse",
                                                                            "formats")},
        },
        "baseline": None,
    }

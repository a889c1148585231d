"""Perplexity through the quantized runtime, against fp16 on the same windows in the same run.

Runtime protocol (the default): each window of ``ctx`` eval tokens is fed through the lowered model in chunks of
``chunk`` tokens with ``past_key_values=model.kvcompile.new_cache()``. Every chunk attends to itself and the fp16
window in full precision and to everything older through the packed cache, exactly as a prompt processed in chunks
and then decoded would: the number measures the runtime the user gets, flush schedule and fp16 sinks included. The fp16
baseline feeds the same windows with the same chunking through a ``transformers.DynamicCache`` (on a lowered model
that is exactly the unmodified model).

Simulated protocol (:mod:`kvcompile.eval.simulate`): one full forward per window in which every K/V, the current
token's included, is fake-quantized per the plan. This is how the seed papers (and KIVI, SmoothQuant, ...) report
ΔPPL; it ignores the fp16 window and sinks and is here for comparison with published numbers.

The NLL of every token of a window but the first is counted; PPL = exp(mean NLL) over all windows.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from typing import Any

import torch
from rich.progress import Progress
from torch import Tensor

from kvcompile.errors import KVCompileError

__all__ = ["DEFAULT_WINDOWS", "EVAL_SEED", "chunked_nll", "eval_windows", "full_nll", "perplexity", "run_ppl"]

#: windows of ``ctx`` tokens evaluated when no ``max_tokens`` is given (4 x 2048 tokens keeps a CPU run in minutes)
DEFAULT_WINDOWS = 4
#: the seed that places the eval windows; fixed so every recipe and run is scored on the same tokens
EVAL_SEED = 0
#: logits rows turned into NLL at once in :func:`full_nll` (bounds the log-softmax copy of a 150k-token vocabulary)
_NLL_ROWS = 256


def eval_windows(data: str, tokenizer: Any, *, max_tokens: int | None, ctx: int) -> Tensor:
    """``[n, T]`` token windows of the eval split of ``data``: as many windows of ``ctx`` as fit in ``max_tokens``.

    ``max_tokens=None`` gives :data:`DEFAULT_WINDOWS` windows; ``max_tokens < ctx`` gives one shorter window.
    """
    from kvcompile.data import token_windows

    if max_tokens is None:
        n, length = DEFAULT_WINDOWS, ctx
    elif max_tokens < ctx:
        n, length = 1, max_tokens
    else:
        n, length = max_tokens // ctx, ctx
    if length < 2:
        raise KVCompileError(f"perplexity needs windows of at least 2 tokens (got {length}); raise --max-tokens")
    return token_windows(data, tokenizer, split="eval", n_windows=n, seq_len=length, seed=EVAL_SEED)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token NLL (fp32) of ``targets`` ``[n]`` under ``logits`` ``[n, V]``, a slice at a time."""
    out = []
    for s in range(0, targets.shape[0], _NLL_ROWS):
        rows = logits[s:s + _NLL_ROWS].float()
        out.append(torch.nn.functional.cross_entropy(rows, targets[s:s + _NLL_ROWS], reduction="none"))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def chunked_nll(model: torch.nn.Module, ids: Tensor, *, chunk: int, cache: Any,
                progress: Progress | None = None, task: Any = None) -> Tensor:
    """NLL ``[T - 1]`` of tokens 1..T-1 of one window ``ids`` ``[T]``, fed ``chunk`` tokens at a time into ``cache``.

    The last position of a chunk predicts the first token of the next one, so no prediction is lost at chunk borders.
    """
    dev = _device(model)
    ids = ids.to(dev).view(1, -1)
    T = ids.shape[1]
    out = []
    with torch.no_grad():
        for s in range(0, T, chunk):
            e = min(s + chunk, T)
            logits = model(ids[:, s:e], past_key_values=cache, use_cache=True).logits[0]
            targets = ids[0, s + 1:e + 1]
            out.append(_nll(logits[:targets.shape[0]], targets))
            if progress is not None and task is not None:
                progress.advance(task)
    return torch.cat(out).cpu()


def full_nll(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """NLL ``[T - 1]`` of tokens 1..T-1 of one window ``ids`` ``[T]`` from one full forward without a cache."""
    dev = _device(model)
    ids = ids.to(dev).view(1, -1)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0]
    return _nll(logits[:-1], ids[0, 1:]).cpu()


def perplexity(nll: Tensor | list[float], count: int | None = None) -> float:
    """exp(mean NLL): of a tensor of per-token NLLs, or of a sum of NLLs with its ``count``."""
    if isinstance(nll, Tensor):
        return math.exp(float(nll.double().mean()))
    total = float(sum(nll))
    if not count:
        raise ValueError("perplexity of an NLL sum needs its token count")
    mean = total / count
    return math.exp(mean) if mean < 700 else math.inf  # exp overflows past ~709; such a model has diverged anyway


def _ids_digest(ids: Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _measure(model: torch.nn.Module, ids: Tensor, *, protocol: str, chunk: int, quantized: bool,
             progress: Progress, label: str) -> list[Tensor]:
    """Per-window NLL tensors of one side (fp16 or quantized) under ``protocol``."""
    from transformers import DynamicCache

    n, T = ids.shape
    if protocol == "runtime":
        steps = -(-T // chunk)
        task = progress.add_task(label, total=n * steps)
        out = []
        for i in range(n):
            cache = model.kvcompile.new_cache() if quantized else DynamicCache()
            out.append(chunked_nll(model, ids[i], chunk=chunk, cache=cache, progress=progress, task=task))
        return out
    from kvcompile.eval.simulate import simulated_quantization

    task = progress.add_task(label, total=n)
    out = []
    for i in range(n):
        lowered = model.kvcompile
        with simulated_quantization(model, lowered.plan, lowered.params) if quantized else nullcontext():
            out.append(full_nll(model, ids[i]))
        progress.advance(task)
    return out


def run_ppl(model: torch.nn.Module, tokenizer: Any, *, data: str = "austen", max_tokens: int | None = None,
            ctx: int = 2048, chunk: int = 128, protocol: str = "runtime", baseline: dict[str, Any] | None = None,
            fp16_only: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Perplexity of a lowered model, quantized vs fp16, on the eval split of ``data`` (see the module docstring).

    Returns ``{"fp16", "quantized", "delta", "metric", "n_tokens", "settings", "details", "baseline"}``; pass
    ``baseline`` from an earlier call with the same model and settings to reuse its fp16 side. ``fp16_only`` measures
    the fp16 side alone (``quantized`` and ``delta`` are then None): the baseline a benchmark measures once per model.
    """
    from kvcompile.eval import make_progress

    if protocol not in ("runtime", "simulated"):
        raise KVCompileError(f"unknown protocol {protocol!r}; use runtime or simulated")
    ids = eval_windows(data, tokenizer, max_tokens=max_tokens, ctx=ctx)
    n, T = ids.shape
    digest = _ids_digest(ids)
    key = {"protocol": protocol, "chunk": chunk if protocol == "runtime" else None, "ids": digest}
    if baseline is not None and {k: baseline.get(k) for k in key} != key:
        raise KVCompileError("the fp16 baseline given was measured on other windows or settings; measure it again")
    own = progress is None
    prog = make_progress() if own else progress
    with prog if own else nullcontext():
        q_nll = None if fp16_only else _measure(model, ids, protocol=protocol, chunk=chunk, quantized=True,
                                                progress=prog, label=f"ppl quantized ({protocol})")
        if baseline is None:
            f_nll = _measure(model, ids, protocol=protocol, chunk=chunk, quantized=False, progress=prog,
                             label=f"ppl fp16 ({protocol})")
            f_sums = [float(x.double().sum()) for x in f_nll]
        else:
            f_sums = [float(x) for x in baseline["nll_sums"]]
    per_window_tokens = T - 1
    count = n * per_window_tokens
    fp16_ppl = perplexity(f_sums, count)
    q_sums = [float(x.double().sum()) for x in q_nll] if q_nll is not None else None
    q_ppl = perplexity(q_sums, count) if q_sums is not None else None
    return {
        "fp16": fp16_ppl,
        "quantized": q_ppl,
        "delta": q_ppl - fp16_ppl if q_ppl is not None else None,
        "metric": "perplexity",
        "n_tokens": count,
        "settings": {"protocol": protocol, "ctx": T, "chunk": chunk, "windows": n, "eval_seed": EVAL_SEED},
        "details": {
            "fp16_nll": sum(f_sums) / count,
            "quantized_nll": sum(q_sums) / count if q_sums is not None else None,
            "per_window": [{"fp16": perplexity([f], per_window_tokens),
                            "quantized": perplexity([q], per_window_tokens) if q is not None else None}
                           for f, q in zip(f_sums, q_sums or [None] * n, strict=True)],
        },
        "baseline": {**key, "nll_sums": f_sums, "ppl": fp16_ppl, "n_tokens": count},
    }

"""Quality evaluation: perplexity, needle retrieval and attention fidelity, quantized against fp16 in one run.

:func:`evaluate` is what ``kvcompile eval`` (and :func:`kvcompile.api.evaluate`) runs: it loads an artifact, or
compiles a model reference with a recipe in memory, then runs one task on the ``eval`` split of the text source (never
the calibration split). The fp16 baseline always comes from the same model object, inputs and settings: a lowered
model given a plain ``transformers.DynamicCache`` (or no cache) is exactly the unmodified model, because keys that no
quantized cache layer tagged fall back to SDPA.

:func:`evaluate_model` runs a task on an already lowered model; the quality benchmark uses it directly so that it can
load each model once and reuse the fp16 baseline across recipes.

Tasks (each its own module):

* ``ppl`` (:mod:`kvcompile.eval.ppl`): perplexity over windows of ``ctx`` tokens fed in chunks through the runtime
  cache (``protocol="runtime"``), or the seed papers' simulated protocol (:mod:`kvcompile.eval.simulate`);
* ``needle`` (:mod:`kvcompile.eval.needle`): single- and multi-needle retrieval of secret codes from real text;
* ``fidelity`` (:mod:`kvcompile.eval.fidelity`): per-layer cosine and relative MSE of the attention output.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from kvcompile.errors import KVCompileError

__all__ = ["PROTOCOLS", "TASKS", "evaluate", "evaluate_model", "make_progress", "write_json_atomic"]

TASKS: tuple[str, ...] = ("ppl", "needle", "fidelity")
PROTOCOLS: tuple[str, ...] = ("runtime", "simulated")

#: the keys every result of :func:`evaluate` has (the JSON schema of ``kvcompile eval --json``)
RESULT_KEYS: tuple[str, ...] = ("task", "model", "recipe", "avg_bits", "bytes_per_token", "fp16", "quantized",
                                "delta", "n_tokens", "settings")


def make_progress(console: Console | None = None) -> Progress:
    """The progress display every evaluation task uses (on stderr, so stdout stays clean for tables)."""
    return Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console or Console(stderr=True))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(_jsonable(obj), fh, indent=2, allow_nan=True)
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a result file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: tuples become lists, non-finite floats stay (json writes them as NaN / Infinity)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors and numpy scalars
        return obj.item()
    return obj


def check_task(task: str, protocol: str = "runtime") -> None:
    """Raise :class:`KVCompileError` for an unknown task or protocol, or a protocol the task does not have."""
    if task not in TASKS:
        raise KVCompileError(f"unknown eval task {task!r}; use one of {', '.join(TASKS)}")
    if protocol not in PROTOCOLS:
        raise KVCompileError(f"unknown protocol {protocol!r}; use runtime or simulated")
    if protocol == "simulated" and task != "ppl":
        raise KVCompileError("--protocol simulated exists for --task ppl only; drop it for needle and fidelity")


def evaluate_model(model: Any, tokenizer: Any, task: str, *, data: str = "austen", max_tokens: int | None = None,
                   ctx: int = 2048, chunk: int = 128, protocol: str = "runtime", baseline: dict[str, Any] | None = None,
                   fp16_only: bool = False, needle_options: dict[str, Any] | None = None,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Run ``task`` on a model lowered by :func:`kvcompile.passes.lower.lower`; quantized and fp16 in one call.

    Returns ``{"fp16", "quantized", "delta", "metric", "n_tokens", "settings", "details", "baseline"}``.
    ``"baseline"`` holds the fp16 measurements in a form that can be passed back as ``baseline`` to a later call of
    the same task, model and settings, which then skips measuring fp16 again (the benchmark reuses one baseline across
    recipes); ``fp16_only`` measures only that baseline (ppl and needle; ``quantized`` and ``delta`` are then None).
    ``needle_options`` are passed to :func:`kvcompile.eval.needle.run_needle` (lengths, depths, ...).
    """
    check_task(task, protocol)
    if getattr(model, "kvcompile", None) is None:
        raise KVCompileError("evaluate_model needs a lowered model: use kvcompile.load(ARTIFACT) or "
                             "kvcompile.api.compile_model(MODEL, RECIPE)")
    if ctx < 2 or chunk < 1:
        raise KVCompileError(f"--ctx must be at least 2 and --chunk at least 1 (got {ctx} and {chunk})")
    if task == "ppl":
        from kvcompile.eval.ppl import run_ppl

        return run_ppl(model, tokenizer, data=data, max_tokens=max_tokens, ctx=ctx, chunk=chunk, protocol=protocol,
                       baseline=baseline, fp16_only=fp16_only, progress=progress)
    if task == "needle":
        from kvcompile.eval.needle import run_needle

        opts = dict(needle_options or {})
        opts.setdefault("lengths", default_needle_lengths(ctx, max_tokens))
        return run_needle(model, tokenizer, data=data, chunk=chunk, baseline=baseline, fp16_only=fp16_only,
                          progress=progress, **opts)
    if fp16_only:
        raise KVCompileError("fidelity compares quantized with fp16 attention: it has no fp16-only mode")
    from kvcompile.eval.fidelity import run_fidelity

    return run_fidelity(model, tokenizer, data=data, max_tokens=max_tokens, ctx=ctx, chunk=chunk, progress=progress)


def default_needle_lengths(ctx: int, max_tokens: int | None = None) -> tuple[int, ...]:
    """Haystack lengths for ``kvcompile eval --task needle``: half the context and the context (max-tokens caps)."""
    top = min(ctx, max_tokens) if max_tokens else ctx
    return tuple(sorted({max(64, top // 2), max(64, top)}))


def _load_target(target: str, recipe: str | None, device: str) -> tuple[Any, Any, str, str]:
    """(lowered model, tokenizer, model name, recipe name) of an artifact folder or a model reference + recipe."""
    from kvcompile import api

    if (Path(target) / "kvcompile.json").is_file():
        from kvcompile.artifact import read_artifact

        if recipe is not None:
            raise KVCompileError(f"{target} is an artifact: it already holds its plan, so drop --recipe")
        art = read_artifact(target)
        model = api.load(target, device=device)
        return model, model.kvcompile_tokenizer, str(art.model.get("name") or target), \
            str(art.recipe.get("name") or "?")
    if recipe is None:
        raise KVCompileError(f"{target} is a model, not an artifact: pass --recipe (e.g. mixed-nsep or fp16) "
                             "or build an artifact first with `kvcompile build`")
    ctx, rec = api.compile_model(target, recipe, device=device)
    return ctx.model, ctx.tokenizer, target, rec.name


def evaluate(target: str, task: str, *, recipe: str | None = None, data: str = "austen",
             max_tokens: int | None = None, ctx: int = 2048, chunk: int = 128, protocol: str = "runtime",
             json_path: str | Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Evaluate an artifact, or a model reference compiled with ``recipe``, on ``task`` (ppl, needle, fidelity).

    Always measures on the ``eval`` split of ``data``. Returns (and with ``json_path`` writes atomically)
    ``{"task", "model", "recipe", "avg_bits", "bytes_per_token", "fp16", "quantized", "delta", "n_tokens",
    "settings"}`` plus ``"metric"`` (what fp16/quantized measure) and ``"details"`` (per window, length or layer).
    """
    check_task(task, protocol)
    from kvcompile.data import check_source

    check_source(data)
    model, tokenizer, model_name, recipe_name = _load_target(target, recipe, device)
    plan = model.kvcompile.plan
    out = evaluate_model(model, tokenizer, task, data=data, max_tokens=max_tokens, ctx=ctx, chunk=chunk,
                         protocol=protocol)
    result: dict[str, Any] = {
        "task": task,
        "model": model_name,
        "recipe": recipe_name,
        "avg_bits": round(plan.avg_bits(), 4),
        "bytes_per_token": plan.bytes_per_token(),
        "fp16": out["fp16"],
        "quantized": out["quantized"],
        "delta": out["delta"],
        "metric": out["metric"],
        "n_tokens": out["n_tokens"],
        "settings": {"data": data, "split": "eval", "device": device, **out["settings"]},
        "details": out["details"],
    }
    if json_path is not None:
        write_json_atomic(json_path, result)
    return result


"""The Python API that the CLI wraps: profile(), build(), load(), evaluate(), inspect(), export_onnx()."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def profile(model: str, calib: str, out: str | Path, *, windows: int = 32, seq_len: int = 1024,
            device: str = "cpu") -> Path:
    """Profile what breaks KV quantization on ``model`` over ``calib`` text; write the profile folder ``out``."""
    from rich.console import Console

    from kvcompile.data import token_windows
    from kvcompile.models import load_model, model_identity, resolve_model
    from kvcompile.passes.profile import print_summary, profile_model

    resolved = resolve_model(model)
    m, tok = load_model(resolved, device=device)
    ids = token_windows(calib, tok, split="calib", n_windows=windows, seq_len=seq_len, seed=0)
    t0 = time.perf_counter()
    prof = profile_model(m, ids, holdout=min(4, max(1, ids.shape[0] - 1)))
    prof.timings.setdefault("total_s", round(time.perf_counter() - t0, 2))
    prof.model = model_identity(resolved, m.config)
    prof.settings.setdefault("calib", calib)
    path = prof.save(out)
    print_summary(prof, Console())
    return path


def build(model: str, out: str | Path, *, recipe: str = "mixed-nsep", budget_bits: float | None = None,
          window: int | None = None, sinks: int | None = None, calib: str = "austen", windows: int | None = None,
          seq_len: int | None = None, device: str = "cpu", verify_tokens: int = 2048) -> Path:
    """Compile ``model`` with ``recipe`` into an artifact folder ``out``.

    Runs the recipe's passes (profile, calibrate, smooth, allocate/uniform), lowers the model onto the quantized
    runtime, measures the cache it holds after ``verify_tokens`` calibration tokens against an fp16 cache, and
    writes the artifact atomically.
    """
    from kvcompile.artifact import write_artifact
    from kvcompile.models import model_identity

    t0 = time.perf_counter()
    ctx, rec = compile_model(model, recipe, budget_bits=budget_bits, window=window, sinks=sinks, calib=calib,
                             windows=windows, seq_len=seq_len, device=device, lower_model=False)
    plan = ctx.plan
    assert plan is not None
    metrics = {"build_seconds": None, "pass_seconds": ctx.timings, **_measure_cache(ctx, verify_tokens)}
    metrics["build_seconds"] = round(time.perf_counter() - t0, 2)
    identity = model_identity(ctx.resolved, ctx.model.config)

    def extra(tmp: Path) -> None:
        if ctx.profile is not None:
            ctx.profile.save(tmp)
        if ctx.model_changed:
            _save_model(ctx, tmp / "model")
        with open(tmp / "report.md", "a") as f:
            f.write("\n" + plan_markdown(plan, rec.name, metrics))

    path = write_artifact(out, plan, ctx.params, identity, recipe=rec.to_dict(), metrics=metrics, extra=extra)
    ctx.console.log(f"wrote {path}: {plan.avg_bits():.3f} bits/element, {plan.bytes_per_token():.0f} B/token "
                    f"(fp16 {plan.fp16_bytes_per_token():.0f})")
    return path


def compile_model(model: str, recipe: str = "mixed-nsep", *, budget_bits: float | None = None,
                  window: int | None = None, sinks: int | None = None, calib: str = "austen",
                  windows: int | None = None, seq_len: int | None = None, device: str = "cpu",
                  lower_model: bool = True) -> tuple[Any, Any]:
    """Run a recipe in memory, without writing an artifact: returns ``(ctx, recipe)``.

    ``ctx.model`` (lowered onto the quantized runtime when ``lower_model``), ``ctx.tokenizer``, ``ctx.plan``,
    ``ctx.params`` and ``ctx.profile`` hold the results. Used by ``build`` and by ``eval`` with ``--recipe``.
    """
    from kvcompile.models import check_model_ref
    from kvcompile.passes.lower import lower
    from kvcompile.pipeline import CompileContext, load_recipe, run_recipe

    rec = load_recipe(recipe)  # a malformed recipe fails before any model is loaded
    check_model_ref(model)
    ctx = CompileContext(model, calib=calib, device=device, overrides={
        "budget_bits": budget_bits, "window": window, "sinks": sinks, "windows": windows, "seq_len": seq_len})
    run_recipe(rec, ctx)
    assert ctx.plan is not None
    ctx.plan.meta.update({"recipe": rec.name})
    if lower_model:
        lower(ctx.model, ctx.plan, ctx.params.to(ctx.model.device))
    return ctx, rec


def _save_model(ctx: Any, folder: Path) -> None:
    folder.mkdir(parents=True)
    ctx.model.save_pretrained(folder, safe_serialization=True)
    ctx.tokenizer.save_pretrained(folder)


def _measure_cache(ctx: Any, tokens: int) -> dict[str, Any]:
    """Run ``tokens`` calibration tokens through the lowered model; report the bytes its cache holds vs fp16."""
    from kvcompile.data import token_windows
    from kvcompile.passes.lower import lower

    ids = token_windows(ctx.calib, ctx.tokenizer, split="calib", n_windows=1, seq_len=tokens, seed=1)
    model = lower(ctx.model, ctx.plan, ctx.params.to(ctx.model.device))
    cache = model.kvcompile.new_cache()
    with torch.no_grad():
        model(ids.to(model.device), past_key_values=cache, use_cache=True)
    held = cache.storage_bytes()
    fp16 = ctx.plan.fp16_bytes_per_token() * ids.shape[1]
    return {"cache_tokens": int(ids.shape[1]), "cache_bytes": int(held), "fp16_cache_bytes": int(fp16),
            "cache_ratio": round(held / fp16, 4)}


def plan_markdown(plan: Any, recipe: str, metrics: dict[str, Any] | None = None) -> str:
    """The plan as a markdown section (for report.md)."""
    lines = [f"## Plan ({recipe})", "",
             f"- average stored bits per K/V element: {plan.avg_bits():.3f} (metadata included)",
             f"- bytes per token: {plan.bytes_per_token():.0f} (fp16: {plan.fp16_bytes_per_token():.0f})",
             f"- fp16 window {plan.window}, sinks {plan.sinks}, flush block {plan.block}, "
             f"K centred {plan.k_center}, V centred {plan.v_center}"]
    if metrics and "cache_bytes" in metrics:
        lines.append(f"- measured cache after {metrics['cache_tokens']} tokens: {metrics['cache_bytes']} B = "
                     f"{100 * metrics['cache_ratio']:.1f}% of fp16")
    lines += ["", "| layer | K formats | V formats |", "|---|---|---|"]
    for i, lp in enumerate(plan.layers):
        lines.append(f"| {i} | {' '.join(hp.k.name for hp in lp.heads)} | {' '.join(hp.v.name for hp in lp.heads)} |")
    return "\n".join(lines) + "\n"


def load(path: str | Path, device: str = "cpu", *, model: str | None = None, mode: str = "fused") -> Any:
    """Load an artifact: verify it, load its model and lower it onto the quantized KV runtime.

    ``model`` overrides the recorded model reference (it must be the same model: the identity is checked).
    Returns a transformers model whose ``generate()`` runs on the quantized cache; ``model.kvcompile`` holds the
    plan and ``model.kvcompile.new_cache()`` makes a cache for manual forward passes. The tokenizer is attached as
    ``model.kvcompile_tokenizer``.
    """
    from kvcompile.artifact import ArtifactError, read_artifact
    from kvcompile.models import load_model, model_identity, resolve_model
    from kvcompile.passes.lower import lower

    art = read_artifact(path)
    if art.has_model_weights and model is None:
        ref = str(art.path / "model")
    else:
        recorded = art.model.get("path") if art.model.get("source") == "folder" else art.model.get("name")
        ref = model or recorded
    if not ref:
        raise ArtifactError(f"artifact {path} records no model reference; pass model=...")
    resolved = resolve_model(ref)
    m, tok = load_model(resolved, device=device)
    ident = model_identity(resolved, m.config)
    want, got = art.model.get("config_sha256"), ident.get("config_sha256")
    if want and got and want != got and not art.has_model_weights:
        raise ArtifactError(f"artifact {path} was built for model {art.model.get('name')!r} but {ref!r} is a "
                            "different model (config differs); load it onto the model it was built for")
    lower(m, art.plan, art.params.to(m.device), mode=mode)
    m.kvcompile_tokenizer = tok
    return m


def evaluate(target: str, task: str, *, recipe: str | None = None, data: str = "austen",
             max_tokens: int | None = None, ctx: int = 2048, chunk: int = 128, protocol: str = "runtime",
             json_path: str | Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Evaluate quality (ppl, needle or fidelity) of an artifact, or of a model reference with ``recipe``.

    The fp16 baseline comes from the same model, windows and settings in the same run. Returns (and with
    ``json_path`` writes) ``{"task", "model", "recipe", "avg_bits", "bytes_per_token", "fp16", "quantized", "delta",
    "n_tokens", "settings"}``.
    """
    from kvcompile.eval import evaluate as run_eval

    return run_eval(target, task, recipe=recipe, data=data, max_tokens=max_tokens, ctx=ctx, chunk=chunk,
                    protocol=protocol, json_path=json_path, device=device)


def inspect(artifact: str | Path) -> None:
    """Print an artifact's plan as a table with average bits and bytes per token against fp16."""
    from rich.console import Console
    from rich.table import Table

    from kvcompile.artifact import read_artifact

    art = read_artifact(artifact)
    plan = art.plan
    t = Table(title=f"{art.path.name}: {art.model.get('name', '?')} / recipe {art.recipe.get('name', '?')}")
    for col in ("layer", "K format/bits", "V format/bits", "fp16 heads (K | V)", "bytes/token"):
        t.add_column(col)
    d = plan.shape.head_dim
    for i, lp in enumerate(plan.layers):
        kf = _runs([hp.k.name for hp in lp.heads])
        vf = _runs([hp.v.name for hp in lp.heads])
        kh = [h for h, hp in enumerate(lp.heads) if hp.k.kind == "fp16"]
        vh = [h for h, hp in enumerate(lp.heads) if hp.v.kind == "fp16"]
        b = sum(hp.k.bytes_per_token(d, "k") + hp.v.bytes_per_token(d, "v") for hp in lp.heads)
        t.add_row(str(i), kf, vf, f"{kh or '-'} | {vh or '-'}", f"{b:.0f}")
    con = Console()
    con.print(t)
    con.print(f"avg bits/element: [bold]{plan.avg_bits():.3f}[/bold] (metadata included; fp16 = 16)   "
              f"bytes/token: {plan.bytes_per_token():.0f} vs fp16 {plan.fp16_bytes_per_token():.0f} "
              f"({100 * plan.bytes_per_token() / plan.fp16_bytes_per_token():.1f}%)   "
              f"window {plan.window}, sinks {plan.sinks}, K centred {plan.k_center}")
    if "cache_bytes" in art.metrics:
        mt = art.metrics
        con.print(f"measured cache after {mt['cache_tokens']} tokens: {mt['cache_bytes']:,} B vs fp16 "
                  f"{mt['fp16_cache_bytes']:,} B ({100 * mt['cache_ratio']:.1f}%)")


def _runs(names: list[str]) -> str:
    """'nsep-4 x3' for uniform heads, else the per-head list."""
    return f"{names[0]} x{len(names)}" if len(set(names)) == 1 else " ".join(names)


def export_onnx(artifact: str | Path, out: str | Path) -> Path:
    """Export an artifact as an ONNX decoder-with-past over the packed KV cache (see ``kvcompile.onnx_export``)."""
    from kvcompile.onnx_export import export_onnx as _export

    return _export(artifact, out)

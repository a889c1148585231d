"""Recipe bindings: each pass a recipe can name, as a function of the :class:`CompileContext` and its options."""

from __future__ import annotations

from kvcompile.errors import KVCompileError
from kvcompile.formats import FP16, KVFormat
from kvcompile.passes.allocate import allocate, plan_from_allocation
from kvcompile.passes.calibrate import calibrate, finalize_scales
from kvcompile.pipeline import CompileContext, register_pass
from kvcompile.plan import ModelShape, Plan


def ensure_model(ctx: CompileContext) -> None:
    """Load the model and tokenizer once (the first pass that needs them)."""
    if ctx.model is None:
        from kvcompile.models import load_model, resolve_model

        ctx.resolved = ctx.resolved or resolve_model(ctx.model_ref)
        ctx.model, ctx.tokenizer = load_model(ctx.resolved, device=ctx.device)


def _runtime_kw(ctx: CompileContext) -> dict[str, int | bool]:
    return {"window": ctx.runtime["window"], "sinks": ctx.runtime["sinks"], "block": ctx.runtime["block"],
            "k_center": ctx.centering["k"], "v_center": ctx.centering["v"]}


@register_pass("profile", windows=int, seq_len=int, holdout=int, sensitivity=bool, candidates=list)
def profile_pass(ctx: CompileContext, windows: int = 32, seq_len: int = 1024, holdout: int = 4,
                 sensitivity: bool = True, candidates: list | None = None) -> None:
    """Measure statistics and per-head sensitivity on the calibration split of ``ctx.calib``."""
    from kvcompile.data import token_windows
    from kvcompile.passes.profile import DEFAULT_CANDIDATES, profile_model

    ensure_model(ctx)
    n = int(ctx.option({"windows": windows}, "windows", windows))
    length = int(ctx.option({"seq_len": seq_len}, "seq_len", seq_len))
    if ctx.calib_ids is not None:
        ids = ctx.calib_ids
    else:
        ids = token_windows(ctx.calib, ctx.tokenizer, split="calib", n_windows=n, seq_len=length, seed=0)
    cands = tuple(candidates or DEFAULT_CANDIDATES) if sensitivity else ()
    ctx.profile = profile_model(ctx.model, ids, holdout=min(holdout, max(1, ids.shape[0] - 1)),
                                window=ctx.runtime["window"], sinks=ctx.runtime["sinks"], candidates=cands)


@register_pass("calibrate", statistic=str, alpha=float, center_k=bool, center_v=bool)
def calibrate_pass(ctx: CompileContext, statistic: str = "p999", alpha: float = 1.0, center_k: bool = False,
                   center_v: bool = False) -> None:
    """Static nsep statistics and centring vectors from the profile."""
    if ctx.profile is None:
        raise KVCompileError("the 'calibrate' pass needs a 'profile' pass before it in the recipe")
    calibrate(ctx.profile, ctx.params, statistic=statistic, center_k=center_k, center_v=center_v)
    ctx.centering = {"k": center_k, "v": center_v}
    ctx.metrics["alpha"] = alpha


def _finish(ctx: CompileContext, plan: Plan) -> None:
    finalize_scales(plan, ctx.params, float(ctx.metrics.get("alpha", 1.0)))
    ctx.plan = plan


@register_pass("uniform", k=str, v=str)
def uniform_pass(ctx: CompileContext, k: str = "fp16", v: str = "fp16") -> None:
    """Every head of every full-attention layer in the same K and V format."""
    ensure_model(ctx)
    try:
        kf, vf = KVFormat.parse(k), KVFormat.parse(v)
    except ValueError as e:
        raise KVCompileError(f"uniform pass: {e}") from e
    shape = ModelShape.from_config(ctx.model.config)
    _finish(ctx, Plan.uniform(shape, kf, vf, **_runtime_kw(ctx)))


@register_pass("allocate", budget_bits=float, candidates=list)
def allocate_pass(ctx: CompileContext, budget_bits: float = 4.0, candidates: list | None = None) -> None:
    """Per-head formats minimising the profiled attention-output error under ``budget_bits``."""
    if ctx.profile is None:
        raise KVCompileError("the 'allocate' pass needs a 'profile' pass before it in the recipe")
    budget = float(ctx.option({"budget_bits": budget_bits}, "budget_bits", budget_bits))
    fmts = [KVFormat.parse(c) for c in (candidates or ["fp16", "nsep-8", "nsep-4", "nsep-2"])]
    shape = ctx.profile.shape
    errors = {}
    import torch

    for role in ("k", "v"):
        for f in fmts:
            if f == FP16:
                continue
            name = f"{f.name}c" if (f.kind == "nsep" and ctx.centering[role]) else f.name
            rows = ctx.profile.sens(role, name)
            errors[(role, f.name)] = torch.tensor([[x if x is not None else 0.0 for x in row] for row in rows])
    alloc = allocate(shape, errors, budget, fmts)
    plan = plan_from_allocation(shape, alloc, **_runtime_kw(ctx))
    plan.meta.update({"budget_bits": budget, "predicted_error": alloc.predicted_error})
    _finish(ctx, plan)

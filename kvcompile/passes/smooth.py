"""Optional passes (issue 6): learned clip ratios of the nsep scales, and K/V smoothing folded into the weights.

``clip``
    Per layer, role and KV head, the clip ratio ``alpha`` of the static nsep scales (``s = alpha * P / L``, see
    :func:`kvcompile.formats.nsep_scale`) chosen by grid search on calibration windows to minimise the attention-output
    error of that head, under the runtime's past-only protocol (the profiler's sensitivity protocol: for query ``t``
    the keys/values in ``[sinks, t - window)`` are quantized, the sinks and the recent ``window`` stay exact). It runs
    *after* the plan exists (``profile -> calibrate -> allocate -> clip``), so every head is tuned for the bits and the
    centring the plan actually gives it, then writes ``layers.{i}.{k|v}.alpha`` ``[H]`` and re-runs
    :func:`~kvcompile.passes.calibrate.finalize_scales`. K is tuned with V exact and V with K exact (the per-head
    errors the allocator reasons with). The calibrate pass's global alpha is always in the grid and a head only
    leaves it for a strictly smaller error, so clipping never increases the calibration error it optimises.
    Only nsep heads are clipped: int-token and KIVI baselines compute their scales per token / group at run time,
    there is nothing static to clip.

``smooth``
    Per-channel factors that move K's outlier channels into Q (``K' = K / s``, ``Q' = Q * s``: every score
    ``q . k`` unchanged) and V's channel scale into ``o_proj`` (``V' = V / t``, ``o_proj`` input columns ``* t``: the
    layer output unchanged), folded into ``q_proj``/``k_proj``/``v_proj`` rows (and biases) and ``o_proj`` columns.
    With GQA every query head that shares a KV head gets that head's factor. RoPE (rotate_half: channel ``i`` pairs
    with ``i + r/2`` over the ``r`` rotary channels) rotates each pair, so a pair shares one factor and the rotation
    commutes with the scaling; statistics of a pair are taken on the pair's norm, which RoPE leaves unchanged.
    Factors follow SmoothQuant, on calibration maxima over the non-sink tokens:
    ``s_c = max|K_c|^a / max|Q_c|^(1-a)`` and ``t_c = max|V_c|^a / max|W_o[:, c]|^(1-a)``, each normalised to a
    geometric mean of 1 per head (so activations keep their overall magnitude, which matters for fp16 range) and
    clamped to ``[1 / max_factor, max_factor]``. The folded model is checked against the original on a calibration
    slice (logits must agree to float precision) and restored if they do not. Supported: Llama / Qwen2 / Mistral
    style attention (separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears, no per-head ``q_norm``/``k_norm``);
    anything else is a :class:`~kvcompile.errors.KVCompileError`.

    The pass changes the weights (``ctx.model_changed``; the artifact then carries them in ``model/``), so statistics
    measured before it are stale: a profile (and the calibration drawn from it) made earlier is dropped, and the
    recipe lists ``smooth`` *before* ``profile`` (``smooth -> profile -> calibrate -> allocate [-> clip]``).
    The factors are kept in the params as ``layers.{i}.{k|v}.smooth`` ``[H, d]`` for the record (the runtime does not
    need them: they are in the weights).

Why smoothing barely moves nsep (measured, see the issue report): nsep already has a static per-channel scale, so a
per-channel rescaling of K is absorbed by ``P_c`` up to the per-token norm; it matters for formats with one scale per
token or per channel group (``int-token``, KIVI values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kvcompile.capture import capture_attention
from kvcompile.errors import KVCompileError
from kvcompile.formats import KVFormat, fake_quantize, nsep_scale
from kvcompile.kvparams import KVParams
from kvcompile.passes.profile import _softcap, _visibility
from kvcompile.pipeline import CompileContext, register_pass
from kvcompile.plan import Plan

ROLES: tuple[str, ...] = ("k", "v")
#: default clip-ratio grid: 0.25, 0.30, ..., 1.20 (1.0 included; the calibrate pass's alpha is always added). 2-bit
#: heads want strong clipping (on SmolLM2 most 2-bit V heads sat at the old lower end, 0.5, measured with the former
#: 3-level 2-bit grid; for the midrise grid the MSE-optimal top level of a Gaussian is ~0.45 of its 99.9th
#: percentile); 4-bit ones 0.7 to 1.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.25 + 0.05 * i, 2) for i in range(20))
#: seed of the clip pass's calibration windows; the profile uses seed 0, so alpha is fit on (mostly) other windows
#: than the ones the statistic P came from
CLIP_SEED = 1
_EPS = 1e-12


def _calib_ids(ctx: CompileContext, windows: int, seq_len: int, seed: int) -> Tensor:
    if ctx.calib_ids is not None:
        return ctx.calib_ids
    from kvcompile.data import token_windows

    n = int(ctx.option({"windows": windows}, "windows", windows))
    length = int(ctx.option({"seq_len": seq_len}, "seq_len", seq_len))
    return token_windows(ctx.calib, ctx.tokenizer, split="calib", n_windows=n, seq_len=length, seed=seed)


def _run_windows(model: nn.Module, ids: Tensor, callback: Any) -> None:
    """Run the decoder (no LM head) over every window with ``callback`` capturing each attention layer."""
    runner = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_attention(model, callback) as cap:
            for b in range(ids.shape[0]):
                runner(input_ids=ids[b:b + 1].to(device=device, dtype=torch.long), use_cache=False)
                cap.require()
    finally:
        model.train(was_training)


# ================================================================================================ clip
@dataclass
class ClipErrors:
    """Attention-output errors of every (layer, role, candidate, KV head) on calibration windows.

    ``err[i, r, a, h]``: summed squared error of the head's attention output (its query heads, the sampled queries)
    when role ``ROLES[r]`` of layer ``i`` is quantized with candidate ``a``; ``ref[i, h]``: summed squared norm of the
    exact output (the same for both roles). Heads whose plan format is not nsep have zero error.
    """

    err: Tensor
    ref: Tensor

    def rel(self) -> Tensor:
        """``err / ref`` ``[L, 2, A, H]`` (0 where a layer was not seen)."""
        return self.err / self.ref.clamp_min(1e-300)[:, None, None, :]

    def total(self, a: int = 0) -> float:
        """Relative error summed over layers, roles and heads for candidate ``a`` (what the allocator adds up)."""
        return float(self.rel()[:, :, a].sum())


def _nsep_heads(plan: Plan, layer: int, role: str) -> list[tuple[int, int]]:
    """``(head, bits)`` of the heads of ``layer`` whose ``role`` is stored in nsep."""
    out = []
    for h, hp in enumerate(plan.layers[layer].heads):
        f = hp.k if role == "k" else hp.v
        if f.kind == "nsep":
            out.append((h, f.bits))
    return out


def attention_errors(model: nn.Module, ids: Tensor, plan: Plan, scales: dict[tuple[int, str], Tensor],
                     means: dict[tuple[int, str], Tensor], *, query_stride: int = 8) -> ClipErrors:
    """Past-only attention-output errors of candidate nsep scales.

    ``scales[(layer, role)]`` is ``[A, H, d]``: ``A`` candidate scale sets for the heads of that layer's K or V that the
    plan stores in nsep (other heads are skipped). ``means[(layer, role)]`` ``[H, d]`` centres that role before
    quantization (added back after: centring is exact for attention). Queries are every ``query_stride``-th position
    from ``sinks + window + 1`` on; for query ``t`` the keys/values in ``[sinks, t - window)`` are quantized (the
    plan's runtime window and sinks), as in the profiler's sensitivity.
    """
    shape = plan.shape
    A = max((s.shape[0] for s in scales.values()), default=1)
    L, H = shape.num_layers, shape.num_kv_heads
    err = torch.zeros(L, len(ROLES), A, H, dtype=torch.float64)
    ref = torch.zeros(L, H, dtype=torch.float64)
    window, sinks = plan.window, plan.sinks
    heads = {(i, r): _nsep_heads(plan, i, r) for i in range(L) for r in ROLES}

    def callback(layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
                 module: nn.Module) -> None:
        if layer >= L or not (heads[(layer, "k")] or heads[(layer, "v")]):
            return
        B, Hq, T, d = q.shape
        rep = Hq // k.shape[1]
        dev = q.device
        qpos = torch.arange(sinks + window + 1, T, query_stride, device=dev)
        Tq = qpos.numel()
        if Tq == 0:
            return
        kpos = torch.arange(T, device=dev)
        quant = (kpos[None, :] >= sinks) & (kpos[None, :] < qpos[:, None] - window)  # [Tq, T]
        quant_rows = quant.repeat(rep, 1)  # [rep*Tq, T], query-head major like qh below
        vis = _visibility(mask, qpos, T, module).unsqueeze(2)  # [B|1, 1, 1, Tq, T]
        bias = torch.zeros(vis.shape, device=dev).masked_fill_(~vis, float("-inf"))
        cap = getattr(module, "attn_logit_softcapping", None)

        def probs(scores: Tensor) -> Tensor:  # [B, n, rep*Tq, T]
            n = scores.shape[1]
            return torch.softmax(scores.view(B, n, rep, Tq, T) + bias, dim=-1).view(B, n, rep * Tq, T)

        todo = {r: dict(heads[(layer, r)]) for r in ROLES}
        for h in sorted(set(todo["k"]) | set(todo["v"])):
            qh = (q[:, h * rep:(h + 1) * rep, qpos].float() * scaling).reshape(B, 1, rep * Tq, d)
            kh, vh = k[:, h:h + 1].float(), v[:, h:h + 1].float()
            s_ref = _softcap(torch.matmul(qh, kh.transpose(-1, -2)), cap)
            p_ref = probs(s_ref)
            o_ref = torch.matmul(p_ref, vh)  # [B, 1, rep*Tq, d]
            ref[layer, h] += float(o_ref.double().square().sum())
            for ri, role in enumerate(ROLES):
                if h not in todo[role]:
                    continue
                x = kh if role == "k" else vh
                s = scales[(layer, role)][:, h].to(dev)  # [A_r, d]: the candidates act as "heads" of one call
                mu = means.get((layer, role))
                mu = mu[h].to(dev) if mu is not None else None
                body = x.expand(B, s.shape[0], T, d)
                if mu is not None:
                    body = body - mu
                x_hat = fake_quantize(body, KVFormat("nsep", todo[role][h]), role, s)  # type: ignore[arg-type]
                if mu is not None:
                    x_hat = x_hat + mu
                if role == "k":
                    s_q = _softcap(torch.matmul(qh, x_hat.transpose(-1, -2)), cap)
                    o = torch.matmul(probs(torch.where(quant_rows, s_q, s_ref)), vh)
                else:
                    # only the quantized values' share of the output changes
                    o = o_ref + torch.matmul(p_ref * quant_rows, x_hat - vh)
                e = (o - o_ref).double().square().sum(dim=(0, 2, 3)).cpu()
                err[layer, ri, :e.shape[0], h] += e

    _run_windows(model, ids, callback)
    return ClipErrors(err, ref)


def _means(plan: Plan, params: KVParams, centering: dict[str, bool]) -> dict[tuple[int, str], Tensor]:
    out = {}
    for i in range(plan.shape.num_layers):
        for r in ROLES:
            mu = params.mean(i, r)
            if centering.get(r) and mu is not None:
                out[(i, r)] = mu
    return out


def calibration_error(model: nn.Module, ids: Tensor, plan: Plan, params: KVParams, centering: dict[str, bool], *,
                      query_stride: int = 8) -> ClipErrors:
    """The objective of :func:`clip_search` for the scales currently in ``params`` (``A = 1``)."""
    scales = {}
    for i in range(plan.shape.num_layers):
        for r in ROLES:
            s = params.scale(i, r)
            if s is not None and _nsep_heads(plan, i, r):
                scales[(i, r)] = s[None]
    return attention_errors(model, ids, plan, scales, _means(plan, params, centering), query_stride=query_stride)


@dataclass
class ClipResult:
    """What :func:`clip_search` chose: ``alpha[i][role]`` ``[H]`` and the errors behind it."""

    grid: list[float]
    base_index: int
    errors: ClipErrors
    #: chosen grid index per head, ``[H]`` per (layer, role) with nsep heads
    index: dict[tuple[int, str], Tensor] = field(default_factory=dict)

    @property
    def alpha(self) -> dict[tuple[int, str], Tensor]:
        """Chosen clip ratio per head, ``[H]`` per (layer, role)."""
        g = torch.tensor(self.grid)
        return {key: g[idx] for key, idx in self.index.items()}

    def summary(self) -> dict[str, Any]:
        rel = self.errors.rel()  # [L, 2, A, H]
        before = float(rel[:, :, self.base_index].sum())
        after = 0.0
        for (i, r), idx in self.index.items():
            after += float(rel[i, ROLES.index(r), idx, torch.arange(len(idx))].sum())
        base = self.grid[self.base_index]
        chosen = {r: [a for (_, rr), a in self.alpha.items() if rr == r] for r in ROLES}
        mean = {r: float(torch.cat(a).mean()) if a else base for r, a in chosen.items()}
        return {"grid": self.grid, "base_alpha": base, "rel_err_base": before, "rel_err_clipped": after,
                "mean_alpha_k": mean["k"], "mean_alpha_v": mean["v"]}


def clip_search(model: nn.Module, ids: Tensor, plan: Plan, params: KVParams, centering: dict[str, bool], *,
                alphas: tuple[float, ...] | list[float] = DEFAULT_ALPHAS, base_alpha: float = 1.0,
                query_stride: int = 8) -> ClipResult:
    """Grid-search the per-head clip ratio of every nsep head of ``plan``; does not modify ``params``.

    ``params`` must hold the calibrated statistic ``P`` (``layers.{i}.{role}.p``) and, for centred roles, the mean.
    ``base_alpha`` is always added to the grid and kept unless another ratio gives a strictly smaller error.
    """
    grid = sorted({round(float(a), 6) for a in alphas} | {round(float(base_alpha), 6)})
    if any(a <= 0 for a in grid):
        raise KVCompileError(f"clip ratios must be positive, got {grid}")
    base = grid.index(round(float(base_alpha), 6))
    scales: dict[tuple[int, str], Tensor] = {}
    for i in range(plan.shape.num_layers):
        for r in ROLES:
            nh = _nsep_heads(plan, i, r)
            if not nh:
                continue
            p = params.get(i, r, "p")
            if p is None:
                raise KVCompileError(f"layer {i} {r.upper()} uses nsep but was not calibrated: the 'clip' pass needs "
                                     "'profile' and 'calibrate' before it")
            bits = dict(nh)
            # [A, H, d]; heads that are not nsep get the 4-bit scale (unused: they are skipped)
            scales[(i, r)] = torch.stack([torch.cat([nsep_scale(p[h:h + 1], bits.get(h, 4), a)
                                                     for h in range(p.shape[0])]) for a in grid])
    errors = attention_errors(model, ids, plan, scales, _means(plan, params, centering), query_stride=query_stride)
    result = ClipResult(grid, base, errors)
    for (i, r) in scales:
        e = errors.err[i, ROLES.index(r)]  # [A, H]
        best = e.argmin(dim=0)
        keep = e.gather(0, best[None])[0] >= e[base]  # ties (and non-nsep heads, all zero) keep the base ratio
        result.index[(i, r)] = torch.where(keep, torch.full_like(best, base), best)
    return result


@register_pass("clip", windows=int, seq_len=int, alphas=list, query_stride=int)
def clip_pass(ctx: CompileContext, windows: int = 4, seq_len: int = 1024, alphas: list | None = None,
              query_stride: int = 8) -> None:
    """Per-head nsep clip ratios minimising the past-only attention-output error, for the plan's formats.

    ``windows`` x ``seq_len`` calibration tokens (the command line's ``--windows`` / ``--seq-len`` override these as
    they do the profile's), every ``query_stride``-th query; ``alphas`` the grid (the calibrate pass's alpha is always
    added). The cost is about that of the profile's sensitivity pass: one attention per grid point, head and role.
    """
    from kvcompile.passes.calibrate import finalize_scales

    if ctx.plan is None:
        raise KVCompileError("the 'clip' pass tunes the scales of a plan: put it after 'allocate' (or 'uniform')")
    if ctx.model is None:
        raise KVCompileError("the 'clip' pass needs the model: put it after 'profile' and 'calibrate'")
    try:
        grid = [float(a) for a in (alphas or DEFAULT_ALPHAS)]
    except (TypeError, ValueError) as e:
        raise KVCompileError(f"clip.alphas must be a list of numbers: {e}") from e
    if query_stride < 1:
        raise KVCompileError("clip.query_stride must be >= 1")
    ids = _calib_ids(ctx, windows, seq_len, CLIP_SEED)
    if ids.shape[1] <= ctx.plan.sinks + ctx.plan.window + 1:
        raise KVCompileError(f"clip windows of {ids.shape[1]} tokens leave no query that sees a quantized token "
                             f"(sinks {ctx.plan.sinks} + window {ctx.plan.window}): use a longer seq_len")
    base = float(ctx.metrics.get("alpha", 1.0))
    res = clip_search(ctx.model, ids, ctx.plan, ctx.params, ctx.centering, alphas=grid, base_alpha=base,
                      query_stride=query_stride)
    for (i, r), a in res.alpha.items():
        ctx.params.set(i, r, "alpha", a)
    finalize_scales(ctx.plan, ctx.params, base)
    summary = res.summary()
    ctx.plan.meta["clip"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in summary.items()}
    ctx.console.log(f"clip: calibration attention error {summary['rel_err_base']:.4g} -> "
                    f"{summary['rel_err_clipped']:.4g} (mean alpha K {summary['mean_alpha_k']:.3f}, "
                    f"V {summary['mean_alpha_v']:.3f})")


# ================================================================================================ smooth
@dataclass
class AttnModules:
    """The attention projections of one layer, and the geometry needed to fold factors into them."""

    layer: int
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


def rotary_dims(config: Any, head_dim: int) -> int:
    """Channels of a head that RoPE rotates (rotate_half pairs ``i`` with ``i + r/2``); the rest are left as is."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    factor = getattr(cfg, "partial_rotary_factor", None)
    rope = getattr(cfg, "rope_parameters", None)
    if factor is None and isinstance(rope, dict):
        factor = rope.get("partial_rotary_factor")
    r = int(head_dim * float(factor if factor is not None else 1.0))
    return r - r % 2


def attention_modules(model: nn.Module) -> list[AttnModules]:
    """Every attention layer's projections, in layer order; a :class:`KVCompileError` for unsupported layouts."""
    from kvcompile.plan import ModelShape

    shape = ModelShape.from_config(model.config)
    name = type(model).__name__
    found: dict[int, AttnModules] = {}
    for mod in model.modules():
        if not all(hasattr(mod, a) for a in ("k_proj", "v_proj")) or not hasattr(mod, "q_proj"):
            continue
        projs = [getattr(mod, a, None) for a in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if not all(isinstance(p, nn.Linear) for p in projs):
            raise KVCompileError(f"{name}: smoothing needs separate q_proj/k_proj/v_proj/o_proj linear layers "
                                 "(Llama, Qwen2, Mistral style)")
        if any(getattr(mod, a, None) is not None for a in ("q_norm", "k_norm")):
            # a per-head RMSNorm after the projection would undo (and its shared weight cannot carry) the factors
            raise KVCompileError(f"{name} normalises q/k after the projection (q_norm/k_norm): smoothing cannot be "
                                 "folded into its weights; leave the 'smooth' pass out of the recipe")
        idx = getattr(mod, "layer_idx", None)
        idx = int(idx) if idx is not None else len(found)
        found[idx] = AttnModules(idx, *projs, shape.num_q_heads, shape.num_kv_heads, shape.head_dim)
    if sorted(found) != list(range(shape.num_layers)):
        raise KVCompileError(f"{name}: found attention projections for layers {sorted(found)} of "
                             f"{shape.num_layers}: smoothing supports Llama, Qwen2 and Mistral style models")
    for m in found.values():
        H, Hq, d = m.num_kv_heads, m.num_q_heads, m.head_dim
        if (m.q_proj.out_features, m.k_proj.out_features, m.v_proj.out_features, m.o_proj.in_features) != (
                Hq * d, H * d, H * d, Hq * d):
            raise KVCompileError(f"{name} layer {m.layer}: projection shapes do not match {Hq} query / {H} KV heads "
                                 f"of dim {d}: unsupported attention layout for smoothing")
    return [found[i] for i in range(shape.num_layers)]


def _pair_absmax(x: Tensor, rot: int) -> Tensor:
    """Per-channel max over tokens of ``x`` ``[B, H, T, d]`` -> ``[H, d]``; a RoPE pair gets its pair norm's max."""
    xf = x.detach().float()
    half = rot // 2
    parts = []
    if half:
        pn = torch.sqrt(xf[..., :half].square() + xf[..., half:rot].square()).amax(dim=(0, 2))
        parts += [pn, pn]
    if rot < xf.shape[-1]:
        parts.append(xf[..., rot:].abs().amax(dim=(0, 2)))
    return torch.cat(parts, dim=-1)


@dataclass
class SmoothStats:
    """Calibration maxima per layer, ``[H, d]`` per KV head: ``q`` over the head's query group, ``k``, ``v`` (RoPE
    pairs of q and k share their pair norm's max)."""

    q: dict[int, Tensor] = field(default_factory=dict)
    k: dict[int, Tensor] = field(default_factory=dict)
    v: dict[int, Tensor] = field(default_factory=dict)


def smooth_stats(model: nn.Module, ids: Tensor, *, sinks: int = 0) -> SmoothStats:
    """Per-channel maxima of post-RoPE Q, K and of V over the windows (the first ``sinks`` tokens left out: the
    runtime keeps them in fp16 and attention sinks carry extreme values that would dominate the maxima)."""
    st = SmoothStats()
    rot: dict[int, int] = {}

    def callback(layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
                 module: nn.Module) -> None:
        B, Hq, T, d = q.shape
        H = k.shape[1]
        if layer not in rot:
            rot[layer] = rotary_dims(model.config, d)
        s = min(sinks, T - 1)
        qm = _pair_absmax(q[:, :, s:], rot[layer]).view(H, Hq // H, d).amax(dim=1)
        km = _pair_absmax(k[:, :, s:], rot[layer])
        vm = v[:, :, s:].detach().float().abs().amax(dim=(0, 2))
        for acc, x in ((st.q, qm), (st.k, km), (st.v, vm)):
            acc[layer] = torch.maximum(acc[layer], x.cpu()) if layer in acc else x.cpu()

    _run_windows(model, ids, callback)
    return st


def _balance(num: Tensor, den: Tensor, strength: float, max_factor: float) -> Tensor:
    """``num^a / den^(1-a)`` per channel, geometric mean 1 per head, clamped to ``[1/max_factor, max_factor]``."""
    a = float(strength)
    f = num.double().clamp_min(_EPS).pow(a) / den.double().clamp_min(_EPS).pow(1.0 - a)
    f = f / f.log().mean(dim=-1, keepdim=True).exp()
    return f.clamp(1.0 / max_factor, max_factor).float()


def smoothing_factors(mods: list[AttnModules], stats: SmoothStats, *, k_strength: float = 0.5,
                      v_strength: float = 0.5, max_factor: float = 16.0,
                      roles: tuple[str, ...] = ROLES) -> dict[tuple[int, str], Tensor]:
    """``{(layer, "k"): s, (layer, "v"): t}``, each ``[H, d]``: SmoothQuant-style factors (see the module doc).

    K: ``s = max|K|^a / max|Q|^(1-a)`` (pairs share a factor because their statistics do). V:
    ``t = max|V|^a / max|W_o col|^(1-a)`` with the column max taken over the query heads that read the KV head.
    """
    if not 0.0 <= k_strength <= 1.0 or not 0.0 <= v_strength <= 1.0:
        raise KVCompileError("smooth strengths must lie in [0, 1]")
    if max_factor < 1.0:
        raise KVCompileError(f"smooth.max_factor must be >= 1, got {max_factor}")
    out: dict[tuple[int, str], Tensor] = {}
    for m in mods:
        i, H, d = m.layer, m.num_kv_heads, m.head_dim
        rep = m.num_q_heads // H
        if i not in stats.k:
            continue  # a layer the capture never saw (none in supported models)
        if "k" in roles:
            out[(i, "k")] = _balance(stats.k[i], stats.q[i], k_strength, max_factor)
        if "v" in roles:
            w = m.o_proj.weight.detach().float().abs().amax(dim=0).view(H, rep, d).amax(dim=1).cpu()
            out[(i, "v")] = _balance(stats.v[i], w, v_strength, max_factor)
    return out


@torch.no_grad()
def apply_smoothing(mods: list[AttnModules], factors: dict[tuple[int, str], Tensor]) -> None:
    """Fold the factors into the weights in place: Q rows ``* s``, K rows ``/ s``, V rows ``/ t``, o_proj
    columns ``* t`` (biases with their rows)."""

    def scale_rows(lin: nn.Linear, f: Tensor) -> None:
        f = f.to(lin.weight.device)
        lin.weight.copy_((lin.weight.float() * f[:, None]).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.float() * f).to(lin.bias.dtype))

    for m in mods:
        rep = m.num_q_heads // m.num_kv_heads
        s = factors.get((m.layer, "k"))
        if s is not None:
            scale_rows(m.q_proj, s.repeat_interleave(rep, dim=0).reshape(-1))  # query head j uses KV head j // rep
            scale_rows(m.k_proj, 1.0 / s.reshape(-1))
        t = factors.get((m.layer, "v"))
        if t is not None:
            scale_rows(m.v_proj, 1.0 / t.reshape(-1))
            w = m.o_proj.weight
            tq = t.repeat_interleave(rep, dim=0).reshape(-1).to(w.device)
            w.copy_((w.float() * tq[None, :]).to(w.dtype))


def _outlier_ratio(x: Tensor) -> float:
    """Largest max/median channel ratio over the heads of ``[H, d]`` per-channel maxima."""
    return float((x.amax(dim=-1) / x.median(dim=-1).values.clamp_min(_EPS)).max())


@register_pass("smooth", windows=int, seq_len=int, k_strength=float, v_strength=float, max_factor=float, roles=list)
def smooth_pass(ctx: CompileContext, windows: int = 8, seq_len: int = 512, k_strength: float = 0.5,
                v_strength: float = 0.5, max_factor: float = 16.0, roles: list | None = None) -> None:
    """Fold SmoothQuant-style K->Q and V->o_proj channel factors into the weights (exact before quantization)."""
    from kvcompile.passes.stages import ensure_model

    which = tuple(roles or ROLES)
    if not which or any(r not in ROLES for r in which):
        raise KVCompileError(f"smooth.roles must be a non-empty subset of [k, v], got {roles!r}")
    ensure_model(ctx)
    mods = attention_modules(ctx.model)
    ids = _calib_ids(ctx, windows, seq_len, seed=0)
    stats = smooth_stats(ctx.model, ids, sinks=int(ctx.runtime.get("sinks", 0)))
    factors = smoothing_factors(mods, stats, k_strength=k_strength, v_strength=v_strength, max_factor=max_factor,
                                roles=which)
    fold_checked(ctx.model, mods, factors, ids[:1, : min(ids.shape[1], 128)])
    for (i, r), f in factors.items():
        old = ctx.params.get(i, r, "smooth")
        ctx.params.set(i, r, "smooth", f * old if old is not None else f)
    if ctx.profile is not None or any(n.rsplit(".", 1)[-1] in ("p", "mean", "scale", "alpha") for n in ctx.params):
        # statistics of the unsmoothed model no longer describe its K/V: later passes must profile again
        ctx.console.log("smooth: dropping the profile and calibration made before smoothing; "
                        "list 'profile' (and 'calibrate') after 'smooth'")
        ctx.profile = None
        ctx.params.tensors = {n: t for n, t in ctx.params.tensors.items()
                              if n.rsplit(".", 1)[-1] not in ("p", "mean", "scale", "alpha")}
    ctx.model_changed = True
    k_before = max((_outlier_ratio(stats.k[i]) for i in stats.k), default=math.nan)
    k_after = max((_outlier_ratio(stats.k[i] / factors[(i, "k")]) for i in stats.k if (i, "k") in factors),
                  default=k_before)
    ctx.metrics["smooth"] = {"k_outlier_ratio_before": round(k_before, 3), "k_outlier_ratio_after": round(k_after, 3),
                             "roles": list(which), "k_strength": k_strength, "v_strength": v_strength,
                             "max_factor": max_factor}
    ctx.console.log(f"smooth: folded factors into {len(mods)} layers ({', '.join(which)}); worst K channel "
                    f"max/median {k_before:.1f} -> {k_after:.1f}")


@torch.no_grad()
def fold_checked(model: nn.Module, mods: list[AttnModules], factors: dict[tuple[int, str], Tensor],
                 ids: Tensor) -> None:
    """:func:`apply_smoothing`, then check the logits on ``ids`` are unchanged; restore the weights if they are not.

    The check catches an architecture whose attention does not follow the rotate_half / separate-projection
    convention the folding assumes (the scores would change), instead of shipping a silently different model.
    """
    touched = [lin for m in mods for lin in (m.q_proj, m.k_proj, m.v_proj, m.o_proj)]
    saved = [(lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
             for lin in touched]
    device = next(model.parameters()).device
    x = ids.to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        before = model(input_ids=x, use_cache=False).logits.float()
        apply_smoothing(mods, factors)
        after = model(input_ids=x, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    dtype = next(model.parameters()).dtype
    tol = 1e-3 if dtype == torch.float32 else 5e-2  # relative to the logits' range; fp32 folding errs ~1e-6
    diff = float((after - before).abs().max() / before.abs().max().clamp_min(_EPS))
    if not diff <= tol:
        for lin, (w, b) in zip(touched, saved, strict=True):
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        raise KVCompileError(f"{type(model).__name__}: folding the smoothing factors changed the logits (relative "
                             f"{diff:.2e} > {tol:g}); its attention does not follow the Llama/Qwen2/Mistral "
                             "convention this pass assumes. The model was left unchanged; remove 'smooth' from the "
                             "recipe")

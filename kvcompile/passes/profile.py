"""The profile pass: what breaks KV quantization on a model, measured on calibration text.

:func:`profile_model` runs the model over calibration windows with every attention layer captured
(:mod:`kvcompile.capture`) and streams statistics of the post-RoPE keys and values, per layer, KV head and channel,
never keeping the activations themselves:

* outlier channels (per-channel absmax, max/median ratio over channels, the channels above 8x the median);
* token-norm variation (mean, std, max/min of ``||x||`` over tokens);
* K-vs-V norm disparity (activation norms, spectral / Frobenius norms of each head's slice of k_proj and v_proj);
* nsep calibration statistics: per-channel max and 99.9th percentile of ``|u_c|`` with ``u = x / ||x||``, for the raw
  vectors and for the vectors centred on the per-channel mean;
* sensitivity: the attention-output error when one layer's K (or V) is quantized to a candidate format, under the
  runtime's past-only protocol, measured on held-out windows.

Passes over the windows (``N`` windows, the last ``holdout`` held out):

1. mean pass: the first ``min(4, N - holdout)`` windows give the per-channel K/V means ``mu``. The centred direction
   ``(x - mu) / ||x - mu||`` needs ``mu`` before its histogram can be streamed; a few windows pin the mean down well
   (it is what the runtime subtracts, and centring is exact for attention with any ``mu``, so the choice only affects
   how well the static scales fit, not correctness). ``layers.{i}.{k|v}.mean`` stores this ``mu``, consistent with the
   ``cdir_*`` statistics computed from it.
2. statistics pass: all ``N - holdout`` statistics windows. Pass 1 keeps the K/V of its few windows when they fit
   in :data:`MEAN_CACHE_BYTES` and feeds them here, so the model runs on them only once; otherwise they are
   run again. Everything else is streamed: sums, sums of squares (fp64 running sums), maxima and histograms.
3. sensitivity pass: the ``holdout`` windows, with the nsep scales from pass 2 (``s = nsep_scale(dir_p999, bits)``;
   ``nsep-Nc`` quantizes ``x - mu`` with ``nsep_scale(cdir_p999, bits)``). Every ``query_stride``-th query position
   after the fp16 window is evaluated (16 by default: about 55 queries per 1024-token window, times the query heads
   of each KV head), which keeps the pass a fraction of the model's own forward time; ``settings`` records it.
   Since one KV head's K/V only reach its own query heads, quantizing every head of a layer at once gives each
   head's error exactly as if it alone were quantized.

Tokens at the first ``sinks`` positions of a window are left out of the statistics: the runtime keeps them in fp16,
and attention-sink tokens carry extreme norms that would otherwise dominate the statistics of the tokens that are
quantized.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kvcompile.capture import capture_attention, kv_weight_norms
from kvcompile.errors import KVCompileError
from kvcompile.formats import KVFormat, fake_quantize, nsep_scale
from kvcompile.plan import ModelShape

PROFILE_VERSION = 1
DEFAULT_CANDIDATES: tuple[str, ...] = ("fp16", "nsep-8", "nsep-4", "nsep-2", "int-token-4")
#: a channel is an outlier when its absmax exceeds this multiple of the median channel absmax of its head
OUTLIER_FACTOR = 8.0
#: histogram bins on [0, 1] for |u_c| (resolution 1/1024 of the unit range)
HIST_BINS = 1024
#: the percentile of |u_c| that nsep scales are calibrated on
PERCENTILE = 0.999
#: windows used for the centring mean (pass 1)
MEAN_WINDOWS = 4
#: pass 1 keeps its K/V for pass 2 (instead of running the model on those windows again) up to this many bytes
MEAN_CACHE_BYTES = 512 << 20
#: tensors per (layer, role) in stats.safetensors, each [H, d]
TENSOR_NAMES: tuple[str, ...] = ("absmax", "mean", "std", "dir_max", "dir_p999", "cdir_max", "cdir_p999")
PROFILE_JSON = "profile.json"
STATS_FILE = "stats.safetensors"
ROLES: tuple[str, ...] = ("k", "v")

_EPS = 1e-12


# ---------------------------------------------------------------------------------------------- the result
@dataclass
class Profile:
    """The result of :func:`profile_model`.

    ``layers[i]`` holds layer ``i``'s statistics: ``{"index", "sliding", "captured", "k": {...}, "v": {...}}`` where
    each role has ``"heads"`` (one dict per KV head, see :func:`_head_summary`) and layer-level aggregates.
    ``tensors`` maps ``layers.{i}.{k|v}.{name}`` (``name`` in :data:`TENSOR_NAMES`) to ``[H, d]`` fp32 tensors.
    ``sensitivity`` is ``{"formats": [...], "k" | "v": {format: {"rel_mse": [[L x H]], "cos": [[L x H]]}}}``.
    """

    shape: ModelShape
    settings: dict[str, Any]
    layers: list[dict[str, Any]]
    tensors: dict[str, Tensor]
    sensitivity: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    version: int = PROFILE_VERSION

    # ------------------------------------------------------------------ access
    def tensor(self, layer: int, role: str, name: str) -> Tensor:
        """Per-channel tensor ``[H, d]`` of one layer's K or V (see :data:`TENSOR_NAMES`)."""
        key = f"layers.{layer}.{role}.{name}"
        if key not in self.tensors:
            raise KeyError(f"profile has no tensor {key} (layer not captured?)")
        return self.tensors[key]

    def sens(self, role: str, fmt: str, metric: str = "rel_mse") -> list[list[float | None]]:
        """Sensitivity matrix ``[layer][kv head]`` of ``role`` at ``fmt`` (e.g. ``nsep-4``, ``nsep-4c``)."""
        try:
            return self.sensitivity[role][fmt][metric]
        except KeyError as e:
            have = ", ".join(self.sensitivity.get("formats", []))
            raise KeyError(f"no {role} sensitivity for {fmt!r}/{metric} (profiled formats: {have})") from e

    @property
    def summary(self) -> dict[str, Any]:
        """Everything but the per-channel tensors, as a JSON-able dict (the content of ``profile.json``)."""
        return {
            "version": self.version,
            "model": self.model,
            "shape": self.shape.to_dict(),
            "settings": self.settings,
            "timings": self.timings,
            "disparity": norm_disparity(self),
            "layers": self.layers,
            "sensitivity": self.sensitivity,
        }

    # ------------------------------------------------------------------ persistence
    def save(self, out_dir: str | Path) -> Path:
        """Write ``profile.json``, ``stats.safetensors``, ``report.md`` and the plots into ``out_dir``.

        Files are written into a temporary folder beside ``out_dir`` and then moved in one by one with an atomic
        rename, so a reader never sees a half-written file and other files already in ``out_dir`` are kept.
        """
        from safetensors.torch import save_file

        from kvcompile.report import write_report

        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            (tmp / PROFILE_JSON).write_text(json.dumps(_jsonable(self.summary), indent=1) + "\n")
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.tensors.items()},
                      str(tmp / STATS_FILE), metadata={"kvcompile_profile_version": str(self.version)})
            write_report(self, tmp)
            if not out.exists():
                os.replace(tmp, out)
                return out
            if not out.is_dir():
                raise KVCompileError(f"{out} exists and is not a folder: choose another output path")
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile folder written by :meth:`save`."""
        from safetensors.torch import load_file

        p = Path(path)
        jf, sf = p / PROFILE_JSON, p / STATS_FILE
        if not jf.is_file() or not sf.is_file():
            raise KVCompileError(f"{p} is not a profile folder (needs {PROFILE_JSON} and {STATS_FILE}): "
                                 "run `kvcompile profile` to make one")
        try:
            d = json.loads(jf.read_text())
            version = int(d["version"])
        except (ValueError, KeyError, TypeError) as e:
            raise KVCompileError(f"{jf} is malformed ({e}): run `kvcompile profile` again") from e
        if version > PROFILE_VERSION:
            raise KVCompileError(f"profile version {version} is newer than this kvcompile understands "
                                 f"({PROFILE_VERSION}): upgrade kvcompile")
        return cls(
            shape=ModelShape.from_dict(d["shape"]),
            settings=d["settings"],
            layers=_from_jsonable(d["layers"]),
            tensors=load_file(str(sf)),
            sensitivity=_from_jsonable(d["sensitivity"]),
            timings=d.get("timings", {}),
            model=d.get("model", {}),
            version=version,
        )


# ---------------------------------------------------------------------------------------------- streaming stats
def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(u, n)`` with ``n = ||x||`` over the last dim and ``u = x / n``: the nsep direction of formats.py."""
    n = torch.linalg.vector_norm(x, dim=-1)
    return x / n.clamp_min(_EPS).unsqueeze(-1), n


class _DirHist:
    """Max and a fixed-bin histogram on [0, 1] of ``|u_c|`` per (head, channel), for the raw and the centred
    direction at once (one scatter per update), streamed."""

    def __init__(self, H: int, d: int, device: torch.device, bins: int) -> None:
        self.H, self.d, self.bins = H, d, bins
        self.max = torch.zeros(2, H, d, device=device)
        # int32 halves the memory of the largest accumulator; counts stay far below 2^31
        self.counts = torch.zeros(2 * H * d * bins, dtype=torch.int32, device=device)
        # flat bin offset of each (set, head, channel); float32 holds these integers exactly (< 2^24 for any model
        # up to 16k channels per layer), so the index is computed in one float pass and converted once
        if 2 * H * d * bins >= 1 << 24:
            raise KVCompileError(f"{H} KV heads of dim {d} are too many for the {bins}-bin histograms: "
                                 "use fewer histogram bins")
        self._offset = (torch.arange(2 * H * d, device=device, dtype=torch.float32) * bins).view(2, H, 1, d)
        self._one = torch.ones(1, dtype=torch.int32, device=device)

    def update(self, u: Tensor, uc: Tensor) -> None:
        """``u``, ``uc``: ``[H, N, d]`` raw and centred unit directions."""
        a = torch.stack([u, uc]).abs_()  # [2, H, N, d]
        self.max = torch.maximum(self.max, a.amax(dim=2))
        idx = a.mul_(self.bins).clamp_(max=self.bins - 1).floor_().add_(self._offset).to(torch.int64)
        self.counts.put_(idx, self._one.expand(idx.shape), accumulate=True)

    def quantile(self, q: float) -> Tensor:
        """``[2, H, d]``: the upper edge of the bin holding the ``q`` quantile, capped at the exact max.

        The upper edge errs on the side of a slightly larger clip, never clipping more than ``1 - q`` of the values.
        """
        c = self.counts.view(2, self.H, self.d, self.bins).to(torch.int64)
        total = c.sum(-1, keepdim=True)
        target = torch.ceil(total.double() * q).clamp_min(1).to(torch.int64)
        idx = (c.cumsum(-1) < target).sum(-1)
        edge = (idx + 1).float() / self.bins
        return torch.minimum(edge, self.max)


class _MeanAcc:
    """Per-channel mean of one layer's K or V (pass 1)."""

    def __init__(self, H: int, d: int, device: torch.device) -> None:
        self.tokens = 0
        self.s1 = torch.zeros(H, d, dtype=torch.float64, device=device)

    def update(self, x: Tensor) -> None:
        B, H, T, d = x.shape
        self.tokens += B * T
        # one window's partial sum is exact enough in fp32; the running sum over windows is fp64
        self.s1 += x.detach().float().sum(dim=(0, 2)).double()

    def mean(self) -> Tensor:
        return (self.s1 / max(self.tokens, 1)).float()


class _RoleStats:
    """Streaming statistics of one layer's K or V: ``[H, d]`` per channel and ``[H]`` per head.

    ``center`` is the pass-1 mean: moments are accumulated about it (no cancellation in the variance of channels
    with a large constant offset) and the centred direction is taken relative to it.
    """

    def __init__(self, H: int, d: int, device: torch.device, bins: int, center: Tensor) -> None:
        self.H, self.d = H, d
        self.tokens = 0
        self.center = center.float().to(device)
        self.absmax = torch.zeros(H, d, device=device)
        self.s1 = torch.zeros(H, d, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(H, d, dtype=torch.float64, device=device)
        self.n1 = torch.zeros(H, dtype=torch.float64, device=device)
        self.n2 = torch.zeros(H, dtype=torch.float64, device=device)
        self.nmax = torch.zeros(H, device=device)
        self.nmin = torch.full((H,), math.inf, device=device)
        self.hist = _DirHist(H, d, device, bins)

    def update(self, x: Tensor) -> None:
        """``x``: ``[B, H, T, d]`` (tokens already selected)."""
        B, H, T, d = x.shape
        xf = x.detach().float().transpose(0, 1).reshape(H, B * T, d)
        self.tokens += B * T
        self.absmax = torch.maximum(self.absmax, xf.abs().amax(dim=1))
        xc = xf - self.center.unsqueeze(1)
        # per-window partial sums in fp32 (about the centre, so small), running sums in fp64
        self.s1 += xc.sum(dim=1).double()
        self.s2 += xc.square().sum(dim=1).double()
        u, n = _unit(xf)
        self.n1 += n.sum(dim=1).double()
        self.n2 += n.square().sum(dim=1).double()
        self.nmax = torch.maximum(self.nmax, n.amax(dim=1))
        self.nmin = torch.minimum(self.nmin, n.amin(dim=1))
        self.hist.update(u, _unit(xc)[0])

    def tensors(self) -> dict[str, Tensor]:
        n = max(self.tokens, 1)
        m = self.s1 / n
        var = (self.s2 / n - m.square()).clamp_min(0.0)
        p = self.hist.quantile(PERCENTILE)
        return {
            "absmax": self.absmax.cpu(),
            "mean": self.center.cpu(),
            "std": var.sqrt().float().cpu(),
            "dir_max": self.hist.max[0].cpu(),
            "dir_p999": p[0].cpu(),
            "cdir_max": self.hist.max[1].cpu(),
            "cdir_p999": p[1].cpu(),
        }

    def heads(self) -> list[dict[str, Any]]:
        """Per-head summary numbers (JSON)."""
        n = max(self.tokens, 1)
        mean_n = self.n1 / n
        std_n = (self.n2 / n - mean_n.square()).clamp_min(0.0).sqrt()
        center_norm = torch.linalg.vector_norm(self.center.double(), dim=-1)
        out = []
        for h in range(self.H):
            a = self.absmax[h].cpu()
            med = float(a.median())
            mx = float(a.max())
            order = torch.argsort(a, descending=True)
            nmin = float(self.nmin[h])
            out.append({
                "absmax": mx,
                "median_absmax": med,
                "outlier_ratio": mx / med if med > 0 else math.inf,
                "outlier_channels": [int(c) for c in order if float(a[c]) > OUTLIER_FACTOR * med],
                "top_channels": [int(c) for c in order[:4]],
                "norm_mean": float(mean_n[h]),
                "norm_std": float(std_n[h]),
                "norm_max": float(self.nmax[h]),
                "norm_min": nmin,
                "norm_ratio": float(self.nmax[h]) / nmin if nmin > 0 else math.inf,
                # how much of the typical norm is a constant offset: what centring removes
                "center_fraction": float(center_norm[h] / mean_n[h]) if mean_n[h] > 0 else None,
                "tokens": self.tokens,
            })
        return out


# ---------------------------------------------------------------------------------------------- sensitivity
@dataclass(frozen=True)
class _Variant:
    """One sensitivity column: a format, optionally applied to the centred vectors."""

    name: str
    fmt: KVFormat
    centred: bool = False


def _variants(candidates: tuple[str, ...] | list[str]) -> list[_Variant]:
    """Parse candidate names; every nsep candidate also gets its centred variant ``nsep-Nc``."""
    out: list[_Variant] = []
    for name in candidates:
        base, centred = (name[:-1], True) if name.endswith("c") and name.startswith("nsep-") else (name, False)
        try:
            fmt = KVFormat.parse(base)
        except ValueError as e:
            raise KVCompileError(f"unknown candidate format {name!r}: {e}") from e
        if centred and fmt.kind != "nsep":
            raise KVCompileError(f"only nsep formats have a centred variant, got {name!r}")
        vs = [_Variant(name, fmt, centred)]
        if fmt.kind == "nsep" and not centred:
            vs.append(_Variant(f"{fmt.name}c", fmt, True))
        for v in vs:
            if v.name not in {o.name for o in out}:
                out.append(v)
    return out


def _visibility(mask: Tensor | None, qpos: Tensor, T: int, module: nn.Module) -> Tensor:
    """Boolean ``[B or 1, 1, Tq, T]``: which keys each selected query may see, from the model's own mask."""
    if mask is not None and mask.dim() == 4:
        m = mask[:, :, qpos, :T]
        if m.dtype == torch.bool:
            return m
        # additive float masks (eager): 0 where visible, the dtype's min (or -inf) where masked
        return m > torch.finfo(m.dtype).min / 2
    kpos = torch.arange(T, device=qpos.device)
    vis = kpos[None, :] <= qpos[:, None]
    sw = getattr(module, "sliding_window", None)
    if isinstance(sw, int) and sw > 0:
        vis &= (qpos[:, None] - kpos[None, :]) < sw
    return vis[None, None]


def _softcap(s: Tensor, cap: float | None) -> Tensor:
    return s if not cap else torch.tanh(s / cap) * cap


class _Sensitivity:
    """Streams attention-output errors of quantized K (or V) per (variant, layer, KV head)."""

    def __init__(self, variants: list[_Variant], num_layers: int, H: int, *, window: int, sinks: int, stride: int,
                 scales: dict[tuple[int, str, str], Tensor], means: dict[tuple[int, str], Tensor]) -> None:
        self.variants, self.window, self.sinks, self.stride = variants, window, sinks, stride
        self.scales, self.means = scales, means
        shape = (len(ROLES), len(variants), num_layers, H)
        self.err = torch.zeros(shape, dtype=torch.float64)
        self.ref = torch.zeros(shape, dtype=torch.float64)
        self.cos = torch.zeros(shape, dtype=torch.float64)
        self.count = torch.zeros(shape, dtype=torch.float64)
        self.seen = [False] * num_layers

    def _quantized(self, x: Tensor, layer: int, role: str, var: _Variant) -> Tensor:
        """Fake-quantized ``x`` ``[B, H, T, d]`` (fp32); sink tokens untouched so token groups start after them."""
        s = self.sinks
        mu = self.means[(layer, role)].to(x.device) if var.centred else None
        body = x[:, :, s:].float()
        if mu is not None:
            body = body - mu[None, :, None, :]
        scale = None
        if var.fmt.kind == "nsep":
            p = self.scales[(layer, role, "cdir_p999" if var.centred else "dir_p999")].to(x.device)
            scale = nsep_scale(p, var.fmt.bits)
        hat = fake_quantize(body, var.fmt, role, scale)  # type: ignore[arg-type]
        if mu is not None:
            # centring is exact for attention; adding mu back gives the same scores up to a per-query constant
            hat = hat + mu[None, :, None, :]
        return torch.cat([x[:, :, :s].float(), hat], dim=2)

    def update(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
               module: nn.Module) -> None:
        B, Hq, T, d = q.shape
        H = k.shape[1]
        rep = Hq // H
        dev = q.device
        qpos = torch.arange(self.sinks + self.window + 1, T, self.stride, device=dev)
        Tq = qpos.numel()
        if Tq == 0:
            return
        self.seen[layer] = True
        kpos = torch.arange(T, device=dev)
        # keys in [sinks, t - window) are quantized for query t: the runtime's past-only protocol
        quant = (kpos[None, :] >= self.sinks) & (kpos[None, :] < (qpos[:, None] - self.window))  # [Tq, T]
        vis = _visibility(mask, qpos, T, module).unsqueeze(2)  # [B|1, 1, 1, Tq, T]
        # an additive bias computed once instead of a masked_fill per variant; every selected query sees itself,
        # so no row is fully masked
        bias = torch.zeros(vis.shape, device=dev).masked_fill_(~vis, float("-inf"))
        cap = getattr(module, "attn_logit_softcapping", None)
        # The softmax scaling is folded into the queries; query heads stay grouped by their KV head (repeat_kv
        # order: q head h*rep + r uses KV head h) so keys are never repeated.
        qg = (q[:, :, qpos].float() * scaling).view(B, H, rep, Tq, d)
        kf, vf = k.float(), v.float()
        hats = {(role, vi): self._quantized(kf if role == "k" else vf, layer, role, var)
                for role in ROLES for vi, var in enumerate(self.variants) if var.fmt.kind != "fp16"}
        # Queries in a few chunks, each against the keys up to its last position only: causal attention leaves the
        # later keys masked, so this skips about a third of the work without changing any result.
        n_chunks = min(4, Tq)
        bounds = [round(i * Tq / n_chunks) for i in range(n_chunks + 1)]
        for a, b in pairwise(bounds):
            kmax = int(qpos[b - 1]) + 1
            self._chunk(layer, qg[:, :, :, a:b].reshape(B, H, rep * (b - a), d), kf[:, :, :kmax], vf[:, :, :kmax],
                        {key: x[:, :, :kmax] for key, x in hats.items()}, bias[..., a:b, :kmax],
                        quant[a:b, :kmax], cap)

    def _chunk(self, layer: int, qg: Tensor, kf: Tensor, vf: Tensor, hats: dict[tuple[str, int], Tensor],
               bias: Tensor, quant: Tensor, cap: float | None) -> None:
        """Accumulate errors for one chunk of queries ``qg`` ``[B, H, rep*Tc, d]`` against keys ``[B, H, K, d]``."""
        B, H, R, _ = qg.shape
        Tc, K = quant.shape
        rep = R // Tc

        def probs(scores: Tensor) -> Tensor:
            return torch.softmax(scores.view(B, H, rep, Tc, K) + bias, dim=-1).view(B, H, R, K)

        s_ref = _softcap(torch.matmul(qg, kf.transpose(-1, -2)), cap)
        p_ref = probs(s_ref)
        o_ref = torch.matmul(p_ref, vf)
        ref_energy = o_ref.double().square().sum(dim=(0, 2, 3)).cpu()
        ref_norm = torch.linalg.vector_norm(o_ref, dim=-1)
        quant_rows = quant.repeat(rep, 1)  # [R, K]
        p_quant = p_ref * quant_rows  # attention mass on quantized values
        rows = B * R
        for ri, role in enumerate(ROLES):
            for vi, var in enumerate(self.variants):
                self.ref[ri, vi, layer] += ref_energy
                self.count[ri, vi, layer] += rows
                if var.fmt.kind == "fp16":
                    # fake_quantize keeps fp16-format tensors as they are: no error by construction
                    self.cos[ri, vi, layer] += rows
                    continue
                x_hat = hats[(role, vi)]
                if role == "k":
                    s_q = _softcap(torch.matmul(qg, x_hat.transpose(-1, -2)), cap)
                    o = torch.matmul(probs(torch.where(quant_rows, s_q, s_ref)), vf)
                else:
                    # only the quantized values' share of the output changes
                    o = o_ref + torch.matmul(p_quant, x_hat - vf)
                self.err[ri, vi, layer] += (o - o_ref).square().sum(dim=(0, 2, 3)).double().cpu()
                cos = (o * o_ref).sum(-1) / (torch.linalg.vector_norm(o, dim=-1) * ref_norm).clamp_min(1e-12)
                self.cos[ri, vi, layer] += cos.sum(dim=(0, 2)).double().cpu()

    def table(self) -> dict[str, Any]:
        out: dict[str, Any] = {"formats": [v.name for v in self.variants]}
        rel = self.err / self.ref.clamp_min(1e-300)
        cos = self.cos / self.count.clamp_min(1)
        for ri, role in enumerate(ROLES):
            out[role] = {}
            for vi, var in enumerate(self.variants):
                # layers never measured (not captured) get a row of None, so every row has one entry per KV head
                out[role][var.name] = {
                    metric: [[float(x) if self.seen[i] else None for x in values[ri, vi, i]]
                             for i in range(values.shape[2])]
                    for metric, values in (("rel_mse", rel), ("cos", cos))
                }
        return out


# ---------------------------------------------------------------------------------------------- the pass
def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # on stderr, like the rest of kvcompile's progress output, so stdout stays clean for tables and results
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the statistics of CPU tensors on one thread, restoring the caller's setting after.

    They are many medium-sized elementwise ops: on a CPU shared with other processes, every OpenMP barrier waits for
    a descheduled thread, which made them 10x slower on 2 threads than on 1 (measured on a loaded 2-core machine).
    The model's own forward keeps the caller's thread count.
    """
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_windows(windows: Tensor, holdout: int, window: int, sinks: int, query_stride: int) -> tuple[int, int]:
    if not isinstance(windows, Tensor) or windows.dim() != 2:
        raise KVCompileError("calibration windows must be a 2-D tensor of token ids [N, L]: "
                             "build them with kvcompile.data.token_windows")
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise KVCompileError(f"calibration windows must hold integer token ids, got {windows.dtype}")
    N, L = windows.shape
    if N == 0 or L == 0:
        raise KVCompileError("no calibration tokens: give a calibration text with at least 2 windows of tokens")
    if N < 2:
        raise KVCompileError(f"profiling needs at least 2 calibration windows (1 for statistics, 1 held out for "
                             f"sensitivity), got {N}: use more calibration text or more windows")
    if window < 0 or sinks < 0 or query_stride < 1:
        raise KVCompileError("window and sinks must be >= 0 and the query stride >= 1")
    if sinks + window + 1 >= L:
        raise KVCompileError(
            f"calibration windows have {L} tokens, but the runtime keeps the first {sinks} and the last {window} in "
            f"fp16, so no query would see a quantized token: use windows longer than {sinks + window + 1} tokens "
            "(e.g. --seq-len 1024) or a smaller --window")
    hold = min(max(int(holdout), 1), N - 1)
    return N - hold, hold


def profile_model(
    model: nn.Module,
    windows: Tensor,
    *,
    holdout: int = 4,
    window: int = 128,
    sinks: int = 4,
    candidates: tuple[str, ...] | list[str] = DEFAULT_CANDIDATES,
    progress: bool = True,
    batch_size: int = 1,
    query_stride: int = 16,
    hist_bins: int = HIST_BINS,
) -> Profile:
    """Profile ``model``'s keys and values over calibration ``windows`` (LongTensor ``[N, L]``).

    The last ``holdout`` windows (at least 1, leaving at least 1) are kept for sensitivity; the rest give statistics.
    ``window`` / ``sinks`` are the runtime's fp16 window and sink tokens (past-only protocol); ``candidates`` the
    formats whose sensitivity is measured (each nsep format also centred, as ``nsep-Nc``). Sensitivity is measured on
    every ``query_stride``-th query position from ``sinks + window + 1`` on (earlier queries see no quantized key).
    ``batch_size`` windows run per forward. Runs under ``torch.no_grad`` with the model in eval mode (restored after).
    """
    if getattr(model, "config", None) is None:
        raise KVCompileError(f"{type(model).__name__} has no transformers config: load the model with transformers "
                             "(AutoModelForCausalLM) to profile it")
    n_stats, n_hold = _check_windows(windows, holdout, window, sinks, query_stride)
    variants = _variants(tuple(candidates))
    if batch_size < 1:
        raise KVCompileError("batch_size must be >= 1")
    shape = ModelShape.from_config(model.config)
    device = _model_device(model)
    windows = windows.to(device=device, dtype=torch.long)
    runner = getattr(model, "base_model", model)  # the decoder without the LM head: its logits are not needed
    n_mean = min(MEAN_WINDOWS, n_stats)
    L = windows.shape[1]

    # state shared with the capture callback
    phase = {"name": "mean"}
    mean_acc: dict[tuple[int, str], _MeanAcc] = {}
    cached: dict[tuple[int, str], list[Tensor]] = {}
    stats: dict[tuple[int, str], _RoleStats] = {}
    means: dict[tuple[int, str], Tensor] = {}
    weights: dict[int, dict[str, list[dict[str, float]] | None]] = {}
    sens: _Sensitivity | None = None
    seen_dims: dict[int, tuple[int, int, int]] = {}
    # Pass 1 keeps its windows' K/V (at most MEAN_WINDOWS windows) when they fit in MEAN_CACHE_BYTES, so pass 2 can
    # feed them to the statistics without running the model on them a second time.
    elem = next((p.element_size() for p in model.parameters()), 4)
    cache_bytes = n_mean * (L - sinks) * shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * max(elem, 2)
    keep = cache_bytes <= MEAN_CACHE_BYTES

    def check_dims(layer: int, q: Tensor, k: Tensor, module: nn.Module) -> None:
        if layer in seen_dims:
            return
        dims = (q.shape[1], k.shape[1], k.shape[-1])
        if layer >= shape.num_layers or dims[1:] != (shape.num_kv_heads, shape.head_dim) or dims[0] % dims[1]:
            raise KVCompileError(
                f"layer {layer} attention has {dims[0]} query heads, {dims[1]} KV heads of dim {dims[2]}, but the "
                f"config says {shape.num_layers} layers of {shape.num_kv_heads} KV heads of dim {shape.head_dim}: "
                "this architecture is not supported")
        seen_dims[layer] = dims
        weights[layer] = {r: kv_weight_norms(module, r, dims[0], dims[1], dims[2]) for r in ROLES}

    def stats_of(layer: int, role: str, x: Tensor) -> _RoleStats:
        key = (layer, role)
        if key not in stats:
            mu = means.get(key)
            stats[key] = _RoleStats(x.shape[1], x.shape[-1], x.device, hist_bins,
                                    mu if mu is not None else torch.zeros(x.shape[1], x.shape[-1]))
        return stats[key]

    def callback(layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
                 module: nn.Module) -> None:
        with _one_cpu_thread(k.device):
            work(layer, q, k, v, mask, scaling, module)

    def work(layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
             module: nn.Module) -> None:
        check_dims(layer, q, k, module)
        if phase["name"] == "sens":
            assert sens is not None
            sens.update(layer, q, k, v, mask, scaling, module)
            return
        for role, x in (("k", k), ("v", v)):
            body = x[:, :, sinks:]
            if phase["name"] == "mean":
                acc = mean_acc.setdefault((layer, role), _MeanAcc(x.shape[1], x.shape[-1], x.device))
                acc.update(body)
                if keep:
                    cached.setdefault((layer, role), []).append(body.detach().clone())
            else:
                stats_of(layer, role, x).update(body)

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_attention(model, callback) as cap, _progress(progress) as bar:
            total = n_mean + n_stats - (n_mean if keep else 0) + (n_hold if variants else 0)
            task = bar.add_task("profile: K/V means", total=total)

            def run(lo: int, hi: int, name: str) -> None:
                phase["name"] = name
                for b in range(lo, hi, batch_size):
                    runner(input_ids=windows[b:min(b + batch_size, hi)], use_cache=False)
                    cap.require()
                    bar.advance(task, min(b + batch_size, hi) - b)

            t0 = time.perf_counter()
            run(0, n_mean, "mean")
            means.update({key: acc.mean() for key, acc in mean_acc.items()})
            timings["mean_pass_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            bar.update(task, description="profile: statistics")
            for (layer, role), xs in cached.items():
                for x in xs:
                    stats_of(layer, role, x).update(x)
            cached.clear()
            run(n_mean if keep else 0, n_stats, "stats")
            timings["stats_pass_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            bar.update(task, description="profile: sensitivity")
            scales: dict[tuple[int, str, str], Tensor] = {}
            for (i, r), acc in stats.items():
                t = acc.tensors()
                scales[(i, r, "dir_p999")], scales[(i, r, "cdir_p999")] = t["dir_p999"], t["cdir_p999"]
            sens = _Sensitivity(variants, shape.num_layers, shape.num_kv_heads, window=window, sinks=sinks,
                                stride=query_stride, scales=scales, means={k: v.cpu() for k, v in means.items()})
            if variants:  # no candidates: statistics only, the held-out windows are not run
                run(n_stats, n_stats + n_hold, "sens")
            timings["sensitivity_pass_s"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    timings["total_s"] = time.perf_counter() - t_start

    tensors: dict[str, Tensor] = {}
    layers: list[dict[str, Any]] = []
    for i in range(shape.num_layers):
        entry: dict[str, Any] = {"index": i, "sliding": bool(shape.sliding[i]) if shape.sliding else False,
                                 "captured": (i, "k") in stats}
        for role in ROLES:
            acc = stats.get((i, role))
            if acc is None:
                entry[role] = None
                continue
            for name, t in acc.tensors().items():
                tensors[f"layers.{i}.{role}.{name}"] = t
            heads = acc.heads()
            norms = weights.get(i, {}).get(role)
            for h, hd in enumerate(heads):
                hd["weight_spectral"] = norms[h]["spectral"] if norms else None
                hd["weight_frobenius"] = norms[h]["frobenius"] if norms else None
            entry[role] = _role_summary(heads)
        layers.append(entry)

    assert sens is not None
    settings = {
        "windows": int(windows.shape[0]),
        "seq_len": int(L),
        "stats_windows": n_stats,
        "mean_windows": n_mean,
        "holdout_windows": n_hold,
        "window": window,
        "sinks": sinks,
        "batch_size": batch_size,
        "candidates": list(candidates),
        "outlier_factor": OUTLIER_FACTOR,
        "percentile": PERCENTILE,
        "hist_bins": hist_bins,
        "stats_tokens": f"positions >= {sinks} of each statistics window (sink tokens stay fp16)",
        "centring_mean": f"per-channel mean over the first {n_mean} statistics windows",
        "sensitivity_queries": (f"every {query_stride}th query position from {sinks + window + 1} to {L - 1} of the "
                                f"{n_hold} held-out windows; keys in [sinks, t - window) quantized for query t"),
        "query_stride": query_stride,
        "sensitivity_metric": "rel_mse = sum ||o_q - o||^2 / sum ||o||^2 over the head's query heads and queries; "
                              "cos = mean cosine similarity of o_q and o",
    }
    config = getattr(model, "config", None)
    model_info = {
        "class": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", "") or "",
        "model_type": getattr(config, "model_type", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch.") if any(True for _ in model.parameters())
        else None,
    }
    return Profile(shape=shape, settings=settings, layers=layers, tensors=tensors, sensitivity=sens.table(),
                   timings={k: round(v, 3) for k, v in timings.items()}, model=model_info)


def _role_summary(heads: list[dict[str, Any]]) -> dict[str, Any]:
    """Layer-level aggregates of one role, with the per-head dicts."""
    spectral = [h["weight_spectral"] for h in heads]
    return {
        "heads": heads,
        "max_outlier_ratio": max(h["outlier_ratio"] for h in heads),
        "norm_mean": sum(h["norm_mean"] for h in heads) / len(heads),
        "max_norm_ratio": max(h["norm_ratio"] for h in heads),
        "weight_spectral_mean": sum(spectral) / len(spectral) if all(s is not None for s in spectral) else None,
    }


def norm_disparity(profile: Profile) -> dict[str, Any]:
    """K-vs-V norm disparity over the captured layers: activation-norm and weight-spectral-norm ratios K / V."""
    act, spec = [], []
    for entry in profile.layers:
        k, v = entry.get("k"), entry.get("v")
        if not k or not v:
            continue
        if v["norm_mean"] > 0:
            act.append(k["norm_mean"] / v["norm_mean"])
        if k["weight_spectral_mean"] is not None and v["weight_spectral_mean"]:
            spec.append(k["weight_spectral_mean"] / v["weight_spectral_mean"])

    def stats(xs: list[float]) -> dict[str, Any] | None:
        if not xs:
            return None
        s = sorted(xs)
        return {"median": s[len(s) // 2], "min": s[0], "max": s[-1], "layers_k_larger": sum(x > 1 for x in xs),
                "layers": len(xs)}

    return {"activation_norm_k_over_v": stats(act), "weight_spectral_k_over_v": stats(spec)}


def _jsonable(x: Any) -> Any:
    """Replace non-finite floats (JSON has none) by strings so profile.json stays valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _from_jsonable(x: Any) -> Any:
    """Inverse of :func:`_jsonable` for the numeric parts of a profile (layers, sensitivity)."""
    if isinstance(x, str) and x in _NON_FINITE:
        return _NON_FINITE[x]
    if isinstance(x, dict):
        return {k: _from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_jsonable(v) for v in x]
    return x


def print_summary(profile: Profile, console: Any = None) -> None:
    """Render the per-layer summary table with rich (see :func:`kvcompile.report.print_summary`)."""
    from kvcompile.report import print_summary as _print

    _print(profile, console)

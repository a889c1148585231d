"""Calibration: turn profiled direction statistics into the static nsep parameters a plan needs.

``calibrate`` stores, per layer and role, the statistic ``P`` (``[H, d]``; max or 99.9th percentile of the unit
direction's ``|u_c|``, of the centred vectors when the role is centred) and the centring mean. The scale of each head
depends on the bits the plan gives it (``s = alpha * P / L``, ``L = nsep_levels(bits)``: ``2^(b-1) - 1``, or 3 for the
midrise 2-bit grid), so :func:`finalize_scales` runs once the plan exists.
"""

from __future__ import annotations

import torch

from kvcompile.errors import KVCompileError
from kvcompile.formats import nsep_scale
from kvcompile.kvparams import KVParams
from kvcompile.plan import Plan

STATISTICS = ("max", "p999")


def calibrate(profile: object, params: KVParams, *, statistic: str = "p999", center_k: bool = False,
              center_v: bool = False) -> None:
    """Copy the direction statistic (and centring means) of every captured full-attention layer into ``params``."""
    if statistic not in STATISTICS:
        raise KVCompileError(f"calibrate.statistic must be one of {STATISTICS}, got {statistic!r}")
    shape = profile.shape  # type: ignore[attr-defined]
    for i in range(shape.num_layers):
        if shape.sliding and shape.sliding[i]:
            continue
        for role, centred in (("k", center_k), ("v", center_v)):
            name = ("cdir_" if centred else "dir_") + statistic
            params.set(i, role, "p", profile.tensor(i, role, name))  # type: ignore[attr-defined]
            if centred:
                params.set(i, role, "mean", profile.tensor(i, role, "mean"))  # type: ignore[attr-defined]


def finalize_scales(plan: Plan, params: KVParams, alpha: float = 1.0) -> None:
    """Set ``layers.{i}.{k|v}.scale`` for every layer/role where the plan uses nsep, from ``P``, bits and alpha.

    A per-head clip ratio ``layers.{i}.{role}.alpha`` ``[H]`` (the clipping pass) overrides ``alpha``.
    """
    for i, lp in enumerate(plan.layers):
        for role in ("k", "v"):
            fmts = [hp.k if role == "k" else hp.v for hp in lp.heads]
            if not any(f.kind == "nsep" for f in fmts):
                continue
            p = params.get(i, role, "p")
            if p is None:
                raise KVCompileError(f"layer {i} {role.upper()} uses nsep but was not calibrated; "
                                     "add a 'calibrate' pass (after 'profile') to the recipe")
            a = params.get(i, role, "alpha")
            rows = []
            for h, f in enumerate(fmts):
                bits = f.bits if f.kind == "nsep" else 4
                rows.append(nsep_scale(p[h:h + 1], bits, float(a[h]) if a is not None else alpha))
            params.set(i, role, "scale", torch.cat(rows, dim=0))

"""Bit allocation: choose per layer and KV head the K and V formats that minimise the profiled attention-output
error under a byte budget.

Each (layer, head, role) is an item with one option per candidate format: its cost is the bytes it stores per token
(codes + per-token multiplier; ``KVFormat.bytes_per_token``) and its error the profiled relative MSE of the attention
output when only that item is quantized (``profile.py``, past-only protocol). Errors of different items are treated
as additive, which makes this a multiple-choice knapsack. We solve its Lagrangian relaxation exactly (every item
picks ``argmin err + lam * bytes``; ``lam`` bisected to the budget) and then spend the budget left over greedily
on the upgrades with the best error reduction per byte. Sliding-window layers stay fp16 and are not counted
(their cache is bounded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvcompile.errors import KVCompileError
from kvcompile.formats import FP16, KVFormat
from kvcompile.plan import HeadPlan, LayerPlan, ModelShape, Plan


@dataclass
class Allocation:
    """Result of :func:`allocate`: the chosen formats and the predicted total error."""

    k: list[list[KVFormat]]
    v: list[list[KVFormat]]
    predicted_error: float
    bits: float


def allocate(shape: ModelShape, errors: dict[tuple[str, str], Tensor], budget_bits: float,
             candidates: list[KVFormat]) -> Allocation:
    """Multiple-choice knapsack over (layer, head, role) items.

    ``errors[(role, format name)]`` is a ``[layers, heads]`` tensor of profiled errors (fp16 may be absent: 0).
    ``budget_bits`` is the average stored bits per K/V element over the quantized (non-sliding) layers.
    """
    d = shape.head_dim
    layers = [i for i in range(shape.num_layers) if not (shape.sliding and shape.sliding[i])]
    if not layers:
        raise KVCompileError("the model has no full-attention layers to quantize")
    roles = ("k", "v")
    # cost[role] [n_opt]; err[role] [L, H, n_opt]
    cost = {r: torch.tensor([f.bytes_per_token(d, r) for f in candidates], dtype=torch.float64) for r in roles}
    err: dict[str, Tensor] = {}
    for r in roles:
        cols = []
        for f in candidates:
            e = errors.get((r, f.name))
            if e is None:
                if f == FP16:
                    e = torch.zeros(shape.num_layers, shape.num_kv_heads)
                else:
                    raise KVCompileError(f"the profile has no sensitivity for {r.upper()} in {f.name}; "
                                         "re-run the profile with that candidate")
            cols.append(e.double()[layers])
        err[r] = torch.stack(cols, dim=-1).clamp_min(0)
    n_items = 2 * len(layers) * shape.num_kv_heads
    budget = budget_bits / 8.0 * d * n_items  # bytes per token over all items
    min_cost = sum(cost[r].min().item() for r in roles) * len(layers) * shape.num_kv_heads
    if budget < min_cost - 1e-9:
        cheapest = min(candidates, key=lambda f: f.bytes_per_token(d, "k"))
        raise KVCompileError(f"budget of {budget_bits} bits is below the cheapest candidate "
                             f"({cheapest.name}: {cheapest.bits_per_element(d, 'k'):.3f} bits); raise --budget-bits")

    def choose(lam: float) -> dict[str, Tensor]:
        return {r: (err[r] + lam * cost[r]).argmin(dim=-1) for r in roles}

    def total_cost(ch: dict[str, Tensor]) -> float:
        return sum(cost[r][ch[r]].sum().item() for r in roles)

    lo, hi = 0.0, 1.0
    while total_cost(choose(hi)) > budget and hi < 1e12:
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        if total_cost(choose(mid)) > budget:
            lo = mid
        else:
            hi = mid
    ch = choose(hi)
    # greedy: spend what is left on the best error reduction per extra byte
    spent = total_cost(ch)
    while True:
        best = None
        for r in roles:
            cur_err = err[r].gather(-1, ch[r].unsqueeze(-1)).squeeze(-1)
            cur_cost = cost[r][ch[r]]
            d_cost = cost[r].view(1, 1, -1) - cur_cost.unsqueeze(-1)
            d_err = cur_err.unsqueeze(-1) - err[r]
            ok = (d_cost > 0) & (d_err > 0) & (d_cost <= budget - spent + 1e-9)
            if not ok.any():
                continue
            gain = torch.where(ok, d_err / d_cost.clamp_min(1e-12), torch.full_like(d_err, -1.0))
            flat = int(gain.argmax())
            g = gain.flatten()[flat].item()
            if g > 0 and (best is None or g > best[0]):
                li, hi_, oi = torch.unravel_index(torch.tensor(flat), gain.shape)
                best = (g, r, int(li), int(hi_), int(oi), d_cost[li, hi_, oi].item())
        if best is None:
            break
        _, r, li, hh, oi, dc = best
        ch[r][li, hh] = oi
        spent += dc
    predicted = sum(err[r].gather(-1, ch[r].unsqueeze(-1)).sum().item() for r in roles)
    k_out = [[FP16] * shape.num_kv_heads for _ in range(shape.num_layers)]
    v_out = [[FP16] * shape.num_kv_heads for _ in range(shape.num_layers)]
    for j, i in enumerate(layers):
        for h in range(shape.num_kv_heads):
            k_out[i][h] = candidates[int(ch["k"][j, h])]
            v_out[i][h] = candidates[int(ch["v"][j, h])]
    return Allocation(k_out, v_out, predicted, 16.0 * spent / (2 * d * n_items))


def plan_from_allocation(shape: ModelShape, alloc: Allocation, **runtime: int | bool) -> Plan:
    """Wrap an :class:`Allocation` into a :class:`Plan`."""
    layers = [LayerPlan([HeadPlan(k, v) for k, v in zip(alloc.k[i], alloc.v[i], strict=True)])
              for i in range(shape.num_layers)]
    return Plan(shape, layers, **runtime)  # type: ignore[arg-type]

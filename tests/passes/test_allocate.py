"""The bit allocator: budget respected, error minimised, monotone in the budget."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvcompile.errors import KVCompileError
from kvcompile.formats import KVFormat
from kvcompile.passes.allocate import allocate, plan_from_allocation
from kvcompile.plan import ModelShape

SHAPE = ModelShape(num_layers=6, num_q_heads=8, num_kv_heads=2, head_dim=64)
CANDS = [KVFormat.parse(n) for n in ("fp16", "nsep-8", "nsep-4", "nsep-2")]


def _errors(seed: int = 0) -> dict[tuple[str, str], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(SHAPE.num_layers, SHAPE.num_kv_heads, generator=g) + 0.1
    base[2, 1] *= 100  # an outlier head
    out = {}
    for role, w in (("k", 4.0), ("v", 1.0)):
        for name, e in (("nsep-8", 1e-4), ("nsep-4", 1e-2), ("nsep-2", 2e-1)):
            out[(role, name)] = w * base * e
    return out


@pytest.mark.parametrize("budget", [2.25, 2.5, 3.0, 4.0, 6.0])
def test_budget_respected(budget: float) -> None:
    a = allocate(SHAPE, _errors(), budget, CANDS)
    plan = plan_from_allocation(SHAPE, a)
    assert plan.avg_bits() <= budget + 1e-6
    assert abs(plan.avg_bits() - a.bits) < 1e-6


def test_error_decreases_with_budget_and_outlier_protected() -> None:
    errs = [allocate(SHAPE, _errors(), b, CANDS).predicted_error for b in (2.5, 3.0, 4.0, 6.0)]
    assert all(x >= y - 1e-12 for x, y in itertools.pairwise(errs))
    a = allocate(SHAPE, _errors(), 3.0, CANDS)
    # the outlier K head gets at least as many bits as any other K head
    bits = [[f.bits for f in row] for row in a.k]
    assert bits[2][1] == max(max(r) for r in bits)


def test_keys_get_more_bits_than_values_when_more_sensitive() -> None:
    a = allocate(SHAPE, _errors(), 3.0, CANDS)
    k_bits = sum(f.bits for row in a.k for f in row)
    v_bits = sum(f.bits for row in a.v for f in row)
    assert k_bits >= v_bits


def test_budget_too_small_is_an_error() -> None:
    with pytest.raises(KVCompileError, match="budget"):
        allocate(SHAPE, _errors(), 1.0, CANDS)


def test_exhaustive_optimum_on_small_instance() -> None:
    """On 2 layers x 1 head (4 items, 4 options each) the result matches brute force."""
    shape = ModelShape(num_layers=2, num_q_heads=1, num_kv_heads=1, head_dim=64)
    g = torch.Generator().manual_seed(3)
    errors = {(r, n): torch.rand(2, 1, generator=g) * s for r in "kv" for n, s in
              (("nsep-8", 0.01), ("nsep-4", 0.1), ("nsep-2", 1.0))}
    budget = 4.0
    a = allocate(shape, errors, budget, CANDS)
    d = 64
    best = None
    items = [(r, i) for r in "kv" for i in range(2)]
    for combo in itertools.product(range(4), repeat=4):
        cost = sum(CANDS[o].bytes_per_token(d, r) for (r, _), o in zip(items, combo, strict=True))
        if 16 * cost / (2 * d * 4) > budget + 1e-9:
            continue
        err = sum(0.0 if CANDS[o].kind == "fp16" else errors[(r, CANDS[o].name)][i, 0].item()
                  for (r, i), o in zip(items, combo, strict=True))
        best = err if best is None else min(best, err)
    assert a.predicted_error <= best * 1.5 + 1e-9  # Lagrangian + greedy fill: near the exact optimum

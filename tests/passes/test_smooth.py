"""The optional smoothing and clipping passes: exact folding, flatter K, never-worse clipping, recipe integration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

import kvcompile
from kvcompile.api import build
from kvcompile.artifact import read_artifact
from kvcompile.errors import KVCompileError
from kvcompile.formats import KVFormat, nsep_levels
from kvcompile.kvparams import KVParams
from kvcompile.passes.calibrate import calibrate, finalize_scales
from kvcompile.passes.profile import profile_model
from kvcompile.passes.smooth import (
    DEFAULT_ALPHAS,
    apply_smoothing,
    attention_modules,
    calibration_error,
    clip_search,
    fold_checked,
    smooth_stats,
    smoothing_factors,
)
from kvcompile.plan import HeadPlan, ModelShape, Plan
from tests.tiny import calib_text, save_tiny, tiny_model

GEOM = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
HALF = 8  # head_dim / 2: RoPE pairs channel c with c + HALF
#: planted outlier channels (head, channel): scaled rows of k_proj (and their RoPE partners)
OUTLIERS = ((0, 3), (1, 5))


def _config(kind: str) -> LlamaConfig | Qwen2Config:
    if kind == "qwen2":
        return Qwen2Config(**GEOM)  # q/k/v projections with biases
    return LlamaConfig(**GEOM)


def _ids(n: int = 3, t: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 160, (n, t), generator=torch.Generator().manual_seed(seed))


def _planted(kind: str) -> torch.nn.Module:
    """A tiny model whose K has two outlier channel pairs (rows of k_proj scaled by 20)."""
    model = tiny_model(_config(kind), seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            k = layer.self_attn.k_proj
            for h, c in OUTLIERS:
                for ch in (c, c + HALF):
                    row = h * 16 + ch
                    k.weight[row] *= 20.0
                    if k.bias is not None:
                        k.bias[row] = 3.0  # a constant offset too, as real outlier channels carry
    return model


def _k_outlier_ratio(stats_k: dict[int, torch.Tensor]) -> float:
    return max(float((x.amax(-1) / x.median(-1).values).max()) for x in stats_k.values())


# ---------------------------------------------------------------------------------------------- smoothing
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_smoothing_is_exact_and_flattens_k(kind: str) -> None:
    model = _planted(kind)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    mods = attention_modules(model)
    stats = smooth_stats(model, ids, sinks=2)
    before = _k_outlier_ratio(stats.k)
    assert before > 8  # the planted channels are outliers
    factors = smoothing_factors(mods, stats)
    apply_smoothing(mods, factors)
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).abs().max() < 1e-4
    after = _k_outlier_ratio(smooth_stats(model, ids, sinks=2).k)
    assert after < 0.5 * before
    for (_, role), f in factors.items():
        if role == "k":  # RoPE partners share their factor, so the rotation commutes with the scaling
            assert torch.equal(f[:, :HALF], f[:, HALF:])
    # the planted channels were scaled down, i.e. moved into Q
    s0 = factors[(0, "k")]
    assert s0[0, 3] == s0[0].max() > 2 and s0[1, 5] == s0[1].max() > 2


def test_smoothing_folds_v_into_o_proj_only() -> None:
    model = _planted("llama")
    ids = _ids(2, 64)
    with torch.no_grad():
        ref = model(ids).logits
    mods = attention_modules(model)
    factors = smoothing_factors(mods, smooth_stats(model, ids), roles=("v",), max_factor=4.0)
    assert {r for _, r in factors} == {"v"}
    assert all(f.max() <= 4.0 + 1e-6 and f.min() >= 0.25 - 1e-6 for f in factors.values())
    q0 = mods[0].q_proj.weight.clone()
    fold_checked(model, mods, factors, ids[:1])
    assert torch.equal(mods[0].q_proj.weight, q0)
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() < 1e-4


def test_smoothing_rejects_qk_norm_models() -> None:
    model = tiny_model(Qwen3Config(**GEOM))
    with pytest.raises(KVCompileError, match="q_norm"):
        attention_modules(model)


def test_fold_check_restores_a_model_it_would_change() -> None:
    model = _planted("llama")
    mods = attention_modules(model)
    w = mods[0].k_proj.weight.clone()
    # factors that break the RoPE pairing: the scores change, the check must catch it and undo the folding
    bad = {(0, "k"): torch.linspace(0.2, 5.0, 16).expand(2, 16).contiguous()}
    with pytest.raises(KVCompileError, match="changed the logits"):
        fold_checked(model, mods, bad, _ids(1, 64))
    assert torch.equal(mods[0].k_proj.weight, w)


# ---------------------------------------------------------------------------------------------- clipping
def _calibrated(model: torch.nn.Module, ids: torch.Tensor, plan: Plan, center_k: bool) -> KVParams:
    prof = profile_model(model, ids, holdout=1, window=plan.window, sinks=plan.sinks, candidates=(), progress=False)
    params = KVParams()
    calibrate(prof, params, statistic="p999", center_k=center_k)
    finalize_scales(plan, params, 1.0)
    return params


@pytest.mark.parametrize("center_k", [False, True])
def test_clipping_never_increases_the_calibration_error(center_k: bool) -> None:
    model = _planted("qwen2")
    ids = _ids(4, 128)
    shape = ModelShape.from_config(model.config)
    n2, n4, fp = KVFormat.parse("nsep-2"), KVFormat.parse("nsep-4"), KVFormat.parse("fp16")
    plan = Plan.uniform(shape, n2, n2, window=16, sinks=2, k_center=center_k)
    plan.layers[1].heads[0] = HeadPlan(n4, fp)  # mixed bits, and a head the pass must leave alone
    params = _calibrated(model, ids[:3], plan, center_k)
    centering = {"k": center_k, "v": False}
    calib = ids[1:]
    base = calibration_error(model, calib, plan, params, centering)

    res = clip_search(model, calib, plan, params, centering)
    assert 1.0 in res.grid and res.grid[res.base_index] == 1.0
    for (i, r), a in res.alpha.items():
        params.set(i, r, "alpha", a)
    assert float(res.alpha[(1, "v")][0]) == 1.0  # the fp16 head keeps the base ratio
    finalize_scales(plan, params, 1.0)
    after = calibration_error(model, calib, plan, params, centering)

    e0, e1 = base.err[:, :, 0], after.err[:, :, 0]
    assert bool((e1 <= e0 * (1 + 1e-5) + 1e-12).all())  # per layer, role and head
    assert after.total() < 0.99 * base.total()  # and 2-bit heads do gain from clipping
    assert any(bool((a != 1.0).any()) for a in res.alpha.values())
    # the chosen ratio is the grid's best for each head
    rel = res.errors.err
    for (i, r), idx in res.index.items():
        ri = ("k", "v").index(r)
        assert torch.allclose(rel[i, ri, idx, torch.arange(len(idx))], rel[i, ri].min(dim=0).values)


def test_clip_grid_keeps_the_base_alpha() -> None:
    model = _planted("llama")
    ids = _ids(3, 96)
    plan = Plan.uniform(ModelShape.from_config(model.config), KVFormat.parse("nsep-4"), KVFormat.parse("nsep-4"),
                        window=16, sinks=2)
    params = _calibrated(model, ids, plan, False)
    res = clip_search(model, ids[1:], plan, params, {"k": False, "v": False}, alphas=[0.6, 0.8], base_alpha=0.9)
    assert res.grid == [0.6, 0.8, 0.9] and res.base_index == 2
    assert 1.0 in DEFAULT_ALPHAS


# ---------------------------------------------------------------------------------------------- in a recipe
RECIPE = """name: tiny-smooth
passes:
  - smooth: {windows: 2, seq_len: 96}
  - profile: {windows: 4, seq_len: 96, holdout: 1}
  - calibrate: {statistic: p999, center_k: true}
  - allocate: {budget_bits: 3.0, candidates: [fp16, nsep-8, nsep-4, nsep-2]}
  - clip: {windows: 2, seq_len: 96, alphas: [0.6, 0.8, 1.0, 1.1]}
runtime: {window: 16, sinks: 2, block: 16}
"""


def test_passes_run_in_a_recipe_and_the_artifact_carries_the_weights(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "model", LlamaConfig(**GEOM))
    (tmp_path / "calib.txt").write_text(calib_text())
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    out = build(str(folder), tmp_path / "out", recipe=str(tmp_path / "recipe.yaml"),
                calib=str(tmp_path / "calib.txt"), verify_tokens=64)
    art = read_artifact(out)
    assert [next(iter(p)) for p in art.recipe["passes"]] == ["smooth", "profile", "calibrate", "allocate", "clip"]
    assert (out / "model").is_dir()  # the smoothed weights travel with the artifact
    assert {"layers.0.k.smooth", "layers.0.v.smooth", "layers.1.k.alpha"} <= set(art.params)
    clip = art.plan.meta["clip"]
    assert clip["rel_err_clipped"] <= clip["rel_err_base"] * (1 + 1e-6)
    # the scales the runtime uses are the clipped ones
    for i in range(2):
        a, p, s = (art.params.get(i, "k", n) for n in ("alpha", "p", "scale"))
        levels = torch.tensor([nsep_levels(hp.k.bits if hp.k.kind == "nsep" else 4) for hp in art.plan.layers[i].heads])
        assert torch.allclose(s, a[:, None] * p.clamp_min(1e-6) / levels[:, None])

    original = tiny_model(LlamaConfig(**GEOM))  # save_tiny's weights (same seed)
    m = kvcompile.load(out)
    k0 = m.model.layers[0].self_attn.k_proj.weight
    assert not torch.allclose(k0, original.model.layers[0].self_attn.k_proj.weight)
    ids = _ids(1, 12)  # inside the fp16 window: nothing quantized, so smoothing must not show
    with torch.no_grad():
        got = m(ids, past_key_values=m.kvcompile.new_cache(), use_cache=True).logits
        want = original(ids).logits
    assert (got - want).abs().max() < 1e-2  # fp16 window storage


def test_shipped_smooth_recipe_parses() -> None:
    from kvcompile.pipeline import load_recipe

    r = load_recipe("mixed-nsep-smooth")
    names = [p.name for p in r.passes]
    assert names.index("smooth") < names.index("profile") < names.index("allocate") < names.index("clip")
    assert r.runtime == load_recipe("mixed-nsep").runtime
    budget = next(p for p in r.passes if p.name == "allocate").options["budget_bits"]
    assert budget == 4.0

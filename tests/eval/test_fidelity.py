"""Per-layer attention-output fidelity on a tiny random-weight model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvcompile.eval.fidelity import LayerStats, compare_layer, run_fidelity
from kvcompile.formats import KVFormat
from kvcompile.kvparams import KVParams
from kvcompile.passes.calibrate import finalize_scales
from kvcompile.passes.lower import lower
from kvcompile.plan import HeadPlan, LayerPlan, ModelShape, Plan
from kvcompile.runtime.cache import QuantizedKVCache
from tests.tiny import calib_text, kv_params, tiny_llama_config, tiny_model, tiny_tokenizer

CFG = tiny_llama_config()
SHAPE = ModelShape.from_config(CFG)
CTX, CHUNK = 64, 16


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("eval_fidelity")
    path = root / "text.txt"
    path.write_text(calib_text(4000, seed=3))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVCOMPILE_HOME", str(root / "home"))
        yield str(path)


def _params(center: bool = False) -> KVParams:
    return kv_params(SHAPE, (0.4, 0.3), 0.5 if center else None)


def _uniform(fmt: str, window: int, center: bool = False) -> tuple[Plan, KVParams]:
    plan = Plan.uniform(SHAPE, KVFormat.parse(fmt), KVFormat.parse(fmt), window=window, sinks=2, block=16,
                        k_center=center, v_center=center)
    params = _params(center)
    finalize_scales(plan, params)
    return plan, params


def _fidelity(plan: Plan, params: KVParams, text_file: str) -> dict:
    model = lower(tiny_model(CFG), plan, params, mode="reference")
    return run_fidelity(model, tiny_tokenizer(), data=text_file, ctx=CTX, chunk=CHUNK)


def test_fp16_plan_is_exact(text_file: str) -> None:
    r = _fidelity(*_uniform("fp16", 8), text_file)
    assert r["fp16"] == 1.0 and r["quantized"] == pytest.approx(1.0, abs=1e-12)
    per_layer = r["details"]["per_layer"]
    assert per_layer["cos"] == pytest.approx([1.0] * SHAPE.num_layers, abs=1e-12)
    assert per_layer["rel_mse"] == [0.0] * SHAPE.num_layers
    assert r["n_tokens"] == CTX and per_layer["formats"] == ["K fp16, V fp16"] * SHAPE.num_layers


def test_runtime_layer_without_quantized_tokens_matches_reference(text_file: str) -> None:
    """A QuantizedLayer whose window never fills holds everything in its 16-bit window: same output as the fp32
    reference up to fp16 rounding, with centred K and V (exact for attention), chunking, sinks and GQA in play."""
    r = _fidelity(*_uniform("nsep-4", 4 * CTX, center=True), text_file)
    per_layer = r["details"]["per_layer"]
    assert min(per_layer["cos"]) > 1 - 1e-5 and max(per_layer["rel_mse"]) < 1e-5


def test_quantized_plans_lose_fidelity_in_order_of_bits(text_file: str) -> None:
    got = {fmt: _fidelity(*_uniform(fmt, 8), text_file) for fmt in ("nsep-8", "nsep-2")}
    for r in got.values():
        assert r["quantized"] < 1.0 and r["delta"] < 0.0 and r["details"]["max_rel_mse"] > 0.0
    assert got["nsep-2"]["quantized"] < got["nsep-8"]["quantized"]
    assert got["nsep-2"]["details"]["max_rel_mse"] > 10 * got["nsep-8"]["details"]["max_rel_mse"]
    assert got["nsep-8"]["quantized"] > 0.99


def test_worst_layer_is_the_quantized_one(text_file: str) -> None:
    f = KVFormat.parse
    layers = [LayerPlan([HeadPlan(f("fp16"), f("fp16"))] * SHAPE.num_kv_heads),
              LayerPlan([HeadPlan(f("int-token-2"), f("int-token-2")), HeadPlan(f("fp16"), f("fp16"))])]
    plan = Plan(SHAPE, layers, window=4, sinks=0, block=16)
    r = _fidelity(plan, _params(), text_file)
    cos, worst_head = r["details"]["per_layer"]["cos"], r["details"]["per_layer"]["cos_worst_head"]
    assert cos[0] == pytest.approx(1.0, abs=1e-12)
    assert cos[1] < 1.0 and r["details"]["worst_layer"] == 1 and r["details"]["worst_rel_mse_layer"] == 1
    # the quantized KV head serves query heads 0-2 only (GQA 3): the worst query head is worse than the layer mean
    assert worst_head[1] < cos[1]


def test_compare_layer_counts_every_query() -> None:
    """Chunks that do not divide the sequence: every query token and head is compared once."""
    plan, params = _uniform("nsep-4", 4)
    layer = QuantizedKVCache(plan, params, CFG, mode="reference").layers[0]
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, SHAPE.num_q_heads, 37, SHAPE.head_dim, generator=g)
    k = torch.randn(1, SHAPE.num_kv_heads, 37, SHAPE.head_dim, generator=g)
    v = torch.randn(1, SHAPE.num_kv_heads, 37, SHAPE.head_dim, generator=g)
    stats = LayerStats(SHAPE.num_q_heads)
    compare_layer(layer, q, k, v, SHAPE.head_dim ** -0.5, 10, stats)
    assert stats.count.tolist() == [37.0] * SHAPE.num_q_heads
    assert layer.get_seq_length() == 37 and layer.n_quant > 0
    assert 0.9 < stats.summary()["cos"] < 1.0

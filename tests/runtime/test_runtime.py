"""The quantized runtime on a tiny model: fused path == reference path, fp16 plan == plain model, cache contents."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvcompile.formats import KVFormat
from kvcompile.kvparams import KVParams
from kvcompile.passes.lower import lower
from kvcompile.plan import HeadPlan, LayerPlan, ModelShape, Plan
from kvcompile.runtime.cache import QuantizedKVCache, QuantizedLayer
from tests.tiny import kv_params, tiny_llama_config, tiny_model

CFG = tiny_llama_config()
SHAPE = ModelShape.from_config(CFG)


def _params(seed: int = 0, center: bool = True) -> KVParams:
    return kv_params(SHAPE, (0.3, 0.5), 0.2 if center else None, seed)


def _plan(k: str, v: str, window: int = 8, sinks: int = 2, block: int = 16,
          center: bool = True) -> tuple[Plan, KVParams]:
    from kvcompile.passes.calibrate import finalize_scales

    plan = Plan.uniform(SHAPE, KVFormat.parse(k), KVFormat.parse(v), window=window, sinks=sinks, block=block,
                        k_center=center, v_center=center)
    params = _params(center=center)
    finalize_scales(plan, params)
    return plan, params


def _mixed_plan() -> tuple[Plan, KVParams]:
    """Per-head mixed formats, fp16 heads included: exercises head groups."""
    from kvcompile.passes.calibrate import finalize_scales

    f = KVFormat.parse
    layers = [LayerPlan([HeadPlan(f("nsep-4"), f("nsep-2")), HeadPlan(f("fp16"), f("nsep-8"))]),
              LayerPlan([HeadPlan(f("int-token-4"), f("int-token-4")), HeadPlan(f("nsep-2"), f("fp16"))])]
    plan = Plan(SHAPE, layers, window=8, sinks=2, block=16, k_center=True, v_center=False)
    params = _params()
    finalize_scales(plan, params)
    return plan, params


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(CFG)


@pytest.fixture(autouse=True)
def torch_kernels(request: pytest.FixtureRequest):
    """Whole-model runs use the kernels' PyTorch path on the CPU (tests/kernels checks the Triton kernels against it;
    ``test_interpreted_kernels_in_the_runtime`` runs the interpreted Triton kernels through the runtime once)."""
    from kvcompile.kernels._backend import force_cpu_backend

    backend = "interpret" if "interpreted" in request.node.name else "torch"
    with force_cpu_backend(backend):
        yield


def _run_chunks(model: torch.nn.Module, ids: torch.Tensor, cache: object, chunks: list[int],
                mask: torch.Tensor | None = None) -> torch.Tensor:
    out, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            kw = {} if mask is None else {"attention_mask": mask[:, : pos + n]}
            out.append(model(ids[:, pos:pos + n], past_key_values=cache, use_cache=True, **kw).logits)
            pos += n
    return torch.cat(out, dim=1)


PLANS = [("nsep-4", "nsep-4"), ("nsep-2", "nsep-8"), ("int-token-4", "int-token-4"), ("kivi-4g16", "kivi-2g16")]


@pytest.mark.parametrize("k,v", PLANS)
def test_fused_equals_reference_logits(model: torch.nn.Module, k: str, v: str) -> None:
    """Chunked prefill then 40 decode steps: the fused decode path equals dequantize-then-attend."""
    plan, params = _plan(k, v)
    lower(model, plan, params)
    ids = torch.randint(4, 160, (2, 70), generator=torch.Generator().manual_seed(1))
    chunks = [13, 17] + [1] * 40
    outs = {}
    for mode in ("fused", "reference"):
        model.kvcompile.mode = mode
        cache = model.kvcompile.new_cache()
        outs[mode] = _run_chunks(model, ids, cache, chunks)
        layer = cache.layers[0]
        assert isinstance(layer, QuantizedLayer) and layer.n_quant > 0  # quantized tokens were really read
    torch.testing.assert_close(outs["fused"], outs["reference"], rtol=1e-4, atol=1e-4)


def test_interpreted_kernels_in_the_runtime(model: torch.nn.Module) -> None:
    """The real Triton kernels (interpreted on the CPU) inside the runtime: quantize-on-write + fused decode."""
    plan, params = _plan("nsep-4", "nsep-2", window=4, sinks=1, block=8)
    lower(model, plan, params)
    ids = torch.randint(4, 160, (2, 30), generator=torch.Generator().manual_seed(9))
    outs = {}
    for mode in ("fused", "reference"):
        model.kvcompile.mode = mode
        outs[mode] = _run_chunks(model, ids, model.kvcompile.new_cache(), [26] + [1] * 4)
    torch.testing.assert_close(outs["fused"], outs["reference"], rtol=1e-4, atol=1e-4)


def test_mixed_head_groups(model: torch.nn.Module) -> None:
    plan, params = _mixed_plan()
    lower(model, plan, params)
    ids = torch.randint(4, 160, (3, 60), generator=torch.Generator().manual_seed(2))
    outs = {}
    for mode in ("fused", "reference"):
        model.kvcompile.mode = mode
        outs[mode] = _run_chunks(model, ids, model.kvcompile.new_cache(), [20] + [1] * 40)
    torch.testing.assert_close(outs["fused"], outs["reference"], rtol=1e-4, atol=1e-4)


def test_fp16_plan_is_the_plain_model(model: torch.nn.Module) -> None:
    plan = Plan.uniform(SHAPE, KVFormat(), KVFormat(), window=0, sinks=0)
    lower(model, plan, KVParams())
    ids = torch.randint(4, 160, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids, past_key_values=DynamicCache()).logits
    got = _run_chunks(model, ids, model.kvcompile.new_cache(), [10, 10] + [1] * 20)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_no_quantization_inside_window_is_exact(model: torch.nn.Module) -> None:
    """With a window longer than the sequence, nothing is quantized: centring and the 16-bit window storage alone
    change the fp32 model's logits only by fp16 rounding."""
    plan, params = _plan("nsep-2", "nsep-2", window=200, sinks=0)
    lower(model, plan, params)
    ids = torch.randint(4, 160, (1, 50), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(ids, past_key_values=DynamicCache()).logits
    got = _run_chunks(model, ids, model.kvcompile.new_cache(), [25] + [1] * 25)
    torch.testing.assert_close(got, plain, rtol=1e-3, atol=1e-3)


def test_left_padding_batch(model: torch.nn.Module) -> None:
    """Batch with left padding: fused == reference, and an fp16 plan equals the plain padded model."""
    ids = torch.randint(4, 160, (2, 50), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    plan, params = _plan("nsep-4", "nsep-4")
    lower(model, plan, params)
    outs = {}
    for mode in ("fused", "reference"):
        model.kvcompile.mode = mode
        outs[mode] = _run_chunks(model, ids, model.kvcompile.new_cache(), [20] + [1] * 30, mask)
    torch.testing.assert_close(outs["fused"], outs["reference"], rtol=1e-4, atol=1e-4)


def test_generate_greedy_matches_reference_and_continues(model: torch.nn.Module) -> None:
    plan, params = _plan("nsep-4", "int-token-4")
    lower(model, plan, params)
    ids = torch.randint(4, 160, (2, 30), generator=torch.Generator().manual_seed(6))
    gens = {}
    for mode in ("fused", "reference"):
        model.kvcompile.mode = mode
        gens[mode] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                    pad_token_id=3)
    assert torch.equal(gens["fused"], gens["reference"])
    # stop after 10 tokens and continue with the same cache: same tokens as one call of 24
    model.kvcompile.mode = "fused"
    cache = model.kvcompile.new_cache()
    first = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                           pad_token_id=3, past_key_values=cache)
    second = model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=14, do_sample=False,
                            pad_token_id=3, past_key_values=cache)
    assert torch.equal(second, gens["fused"])


def test_generate_sampling_and_beams(model: torch.nn.Module) -> None:
    plan, params = _plan("nsep-4", "nsep-4")
    lower(model, plan, params)
    ids = torch.randint(4, 160, (1, 30), generator=torch.Generator().manual_seed(7))
    outs = {}
    for mode in ("fused", "reference"):
        model.kvcompile.mode = mode
        torch.manual_seed(0)
        s = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=True, top_k=20,
                           pad_token_id=3)
        b = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, num_beams=3,
                           do_sample=False, pad_token_id=3)
        outs[mode] = (s, b)
    assert torch.equal(outs["fused"][0], outs["reference"][0])
    assert torch.equal(outs["fused"][1], outs["reference"][1])
    assert outs["fused"][1].shape == (1, 50)


def test_cache_holds_packed_bytes_plus_window(model: torch.nn.Module) -> None:
    """Storage after T tokens equals the plan's byte count: packed tokens + fp16 sinks/tail, nothing else."""
    plan, params = _plan("nsep-4", "nsep-2", window=8, sinks=2, block=16)
    lower(model, plan, params)
    ids = torch.randint(4, 160, (1, 300), generator=torch.Generator().manual_seed(8))
    cache = model.kvcompile.new_cache()
    _run_chunks(model, ids, cache, [100, 100, 100])
    layer = cache.layers[0]
    assert isinstance(layer, QuantizedLayer)
    n_fp = layer.n_fp
    assert plan.sinks + plan.window <= n_fp < plan.sinks + plan.window + plan.block
    n_quant = 300 - n_fp
    assert layer.n_quant == n_quant
    per_layer_q = plan.bytes_per_token() / SHAPE.num_layers
    per_layer_fp = 2 * SHAPE.num_kv_heads * SHAPE.head_dim * 2  # K and V; the tail is stored in 16 bits
    assert cache.storage_bytes() == SHAPE.num_layers * (n_quant * per_layer_q + n_fp * per_layer_fp)
    assert cache.storage_bytes() < 0.3 * plan.fp16_bytes_per_token() * 300  # 4+2-bit codes + r at d=16, 12-token tail


def test_plan_for_wrong_model_is_rejected(model: torch.nn.Module) -> None:
    from kvcompile.plan import PlanError

    other = ModelShape(SHAPE.num_layers + 1, SHAPE.num_q_heads, SHAPE.num_kv_heads, SHAPE.head_dim)
    plan = Plan.uniform(other, KVFormat.parse("nsep-4"), KVFormat.parse("nsep-4"))
    with pytest.raises(PlanError, match="num_layers"):
        lower(model, plan, KVParams())


def test_quantized_cache_constructor_rejects_mode() -> None:
    plan, params = _plan("nsep-4", "nsep-4")
    with pytest.raises(ValueError):
        QuantizedKVCache(plan, params, CFG, mode="bogus")


@pytest.mark.gpu
@pytest.mark.parametrize("k,v", [("nsep-4", "nsep-4"), ("nsep-2", "nsep-4"), ("int-token-4", "int-token-4"),
                                 ("kivi-4g16", "kivi-4g16")])
def test_gpu_fused_runtime_matches_reference(k: str, v: str) -> None:
    """On CUDA (compiled Triton kernels, bf16 model): fused decode == dequantize-then-attend within bf16 noise."""
    cfg = tiny_llama_config(hidden_size=384, num_attention_heads=6, num_key_value_heads=2, head_dim=64)
    gpu_model = tiny_model(cfg).to("cuda", torch.bfloat16)
    shape = ModelShape.from_config(cfg)
    from kvcompile.passes.calibrate import finalize_scales

    plan = Plan.uniform(shape, KVFormat.parse(k), KVFormat.parse(v), window=8, sinks=2, block=16, k_center=True)
    params = kv_params(shape, 0.4, 0.1)
    finalize_scales(plan, params)
    lower(gpu_model, plan, params.to("cuda"))
    ids = torch.randint(4, 160, (4, 200), generator=torch.Generator().manual_seed(10)).cuda()
    outs = {}
    for mode in ("fused", "reference"):
        gpu_model.kvcompile.mode = mode
        outs[mode] = _run_chunks(gpu_model, ids, gpu_model.kvcompile.new_cache(), [150] + [1] * 50).float()
    err = (outs["fused"] - outs["reference"]).norm() / outs["reference"].norm()
    assert err < 2e-2, err

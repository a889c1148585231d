"""CUDA-graph decoding: the graph-mode cache (device-side lengths, host-scheduled flushes) equals the eager runtime.

On the CPU the graph-mode code path runs eagerly step by step (what a capture records); on a GPU ``DecodeGraph``
replays captured steps and must choose the same tokens as eager decoding.
"""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

from kvcompile.passes.lower import lower
from kvcompile.runtime.cache import QuantizedLayer
from tests.runtime.test_runtime import CFG, _mixed_plan, _plan
from tests.tiny import kv_params, tiny_llama_config, tiny_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(CFG)


def _decode_eager(model: torch.nn.Module, cache: object, ids: torch.Tensor, steps: int,
                  static: bool) -> torch.Tensor:
    """Prefill ``ids`` (two chunks), then ``steps`` greedy decode steps; graph mode as DecodeGraph drives it."""
    logits = []
    with torch.no_grad():
        out = model(ids[:, :30], past_key_values=cache, use_cache=True)
        out = model(ids[:, 30:], past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        pos = ids.shape[1]
        for _ in range(steps):
            if static:
                cache.step.static = True
                cache.flush_pending()
                kw = {"position_ids": torch.full_like(nxt, pos)}
            else:
                kw = {}
            o = model(nxt, past_key_values=cache, use_cache=True, **kw).logits[:, -1]
            logits.append(o)
            nxt = o.argmax(-1, keepdim=True)
            pos += 1
    return torch.stack(logits, 1)


@pytest.mark.parametrize("which", ["uniform", "mixed", "interpreted"])
def test_graph_mode_steps_equal_eager(model: torch.nn.Module, which: str) -> None:
    from kvcompile.kernels._backend import force_cpu_backend

    plan, params = _mixed_plan() if which == "mixed" else _plan("nsep-4", "nsep-2")
    lower(model, plan, params)
    ids = torch.randint(4, 160, (2, 45), generator=torch.Generator().manual_seed(3))
    with force_cpu_backend("interpret" if which == "interpreted" else "torch"):
        ref_cache = model.kvcompile.new_cache()
        steps = 20 if which == "interpreted" else 40  # either way the decode crosses a flush
        ref = _decode_eager(model, ref_cache, ids, steps, static=False)
        cache = model.kvcompile.new_cache(graphs=True)
        got = _decode_eager(model, cache, ids, steps, static=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    layers = cache.quantized_layers()
    assert all(isinstance(la, QuantizedLayer) for la in cache.layers)  # graphs=True: no DynamicLayer
    for la, rl in zip(layers, ref_cache.quantized_layers(), strict=True):
        # host and device counters agree, and quantized as much as the eager cache (which flushes after attention)
        assert la.lens.tolist() == [la.n_quant, la.n_fp]
        assert la.n_quant + la.n_fp == rl.n_quant + rl.n_fp


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["mixed-bf16", "fp16-static"])
def test_decode_graph_matches_eager_on_gpu(which: str) -> None:
    """DecodeGraph (captured once, replayed across flushes) picks the same greedy tokens as eager decoding."""
    from kvcompile.formats import KVFormat
    from kvcompile.passes.calibrate import finalize_scales
    from kvcompile.plan import HeadPlan, LayerPlan, ModelShape, Plan
    from kvcompile.runtime.graph import DecodeGraph

    cfg = tiny_llama_config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    m = tiny_model(cfg).to("cuda", torch.bfloat16)
    shape = ModelShape.from_config(cfg)
    f = KVFormat.parse
    prompt = torch.randint(4, 160, (1, 150), generator=torch.Generator().manual_seed(5)).cuda()
    steps, batch = 70, 3

    def fresh_cache(graphs: bool) -> object:
        if which == "fp16-static":
            m.set_attn_implementation("sdpa")
            return StaticCache(config=m.config, max_cache_len=prompt.shape[1] + steps + 4)
        layers = [LayerPlan([HeadPlan(f("nsep-4"), f("nsep-2")), HeadPlan(f("fp16"), f("nsep-8"))]),
                  LayerPlan([HeadPlan(f("fp16"), f("fp16")), HeadPlan(f("fp16"), f("fp16"))])]
        plan = Plan(shape, layers, window=8, sinks=2, block=16, k_center=True)
        params = kv_params(shape, 0.4, 0.1)
        finalize_scales(plan, params)
        lower(m, plan, params.to("cuda"))
        return m.kvcompile.new_cache(graphs=graphs)

    def prefill(cache: object) -> torch.Tensor:
        with torch.no_grad():
            out = m(prompt.expand(batch, -1), past_key_values=cache, use_cache=True)
        return out.logits[:, -1:].argmax(-1)

    cache = fresh_cache(False)
    nxt = prefill(cache)
    eager = []
    with torch.no_grad():
        for i in range(steps):
            pos = torch.full_like(nxt, prompt.shape[1] + i)
            nxt = m(nxt, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            eager.append(nxt)
    cache = fresh_cache(True)
    runner = DecodeGraph(m, cache, prefill(cache), prompt.shape[1], prompt.shape[1] + steps + 4)
    graphed = []
    for _ in range(steps):
        runner.step()
        graphed.append(runner.ids.clone())
    runner.close()
    assert runner.captures == 1  # one capture served every step, flushes included
    agree = (torch.cat(eager, 1) == torch.cat(graphed, 1)).float().mean().item()
    assert agree > 0.95, agree  # bf16: a near-tie can flip late tokens; a wrong cache would disagree everywhere

"""Perplexity (runtime and simulated protocols) and evaluate() on a tiny random-weight model and offline text."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvcompile.errors import KVCompileError
from kvcompile.eval import RESULT_KEYS, evaluate
from kvcompile.eval.ppl import eval_windows, run_ppl
from kvcompile.eval.simulate import fake_quantize_layer, simulated_quantization
from kvcompile.formats import KVFormat, fake_quantize
from kvcompile.kvparams import KVParams
from kvcompile.passes.calibrate import finalize_scales
from kvcompile.passes.lower import lower
from kvcompile.plan import HeadPlan, LayerPlan, ModelShape, Plan
from tests.tiny import calib_text, kv_params, save_tiny, tiny_llama_config, tiny_model, tiny_tokenizer

CFG = tiny_llama_config()
SHAPE = ModelShape.from_config(CFG)
CTX, CHUNK = 96, 32


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local text source (its eval split is the last 20%) and a private kvcompile cache."""
    root = tmp_path_factory.mktemp("eval_ppl")
    path = root / "text.txt"
    path.write_text(calib_text(6000))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVCOMPILE_HOME", str(root / "home"))
        yield str(path)


def make_plan(k: str, v: str, *, window: int = 8, sinks: int = 0, block: int = 16, p: float = 0.6,
              center: bool = False) -> tuple[Plan, KVParams]:
    plan = Plan.uniform(SHAPE, KVFormat.parse(k), KVFormat.parse(v), window=window, sinks=sinks, block=block,
                        k_center=center, v_center=center)
    params = kv_params(SHAPE, p, 0.1 if center else None)
    finalize_scales(plan, params)
    return plan, params


def plain_ppl(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Perplexity of an unmodified model, one full forward per window: the independent reference."""
    nll = []
    with torch.no_grad():
        for w in ids:
            logits = model(w[None], use_cache=False).logits[0, :-1]
            nll.append(torch.nn.functional.cross_entropy(logits.double(), w[1:], reduction="none"))
    return math.exp(float(torch.cat(nll).mean()))


@pytest.mark.parametrize("k,window", [("fp16", 8), ("nsep-4", 4 * CTX)])
def test_runtime_ppl_without_quantized_tokens_equals_plain_model(text_file: str, k: str, window: int) -> None:
    """fp16 plan (DynamicLayer) and an nsep plan whose window never fills (QuantizedLayer, nothing quantized) both
    reproduce the plain model's full-forward perplexity: chunking and target alignment lose nothing."""
    tok = tiny_tokenizer()
    ids = eval_windows(text_file, tok, max_tokens=2 * CTX, ctx=CTX)
    assert ids.shape == (2, CTX)
    ref = plain_ppl(tiny_model(CFG), ids)
    model = lower(tiny_model(CFG), *make_plan(k, k, window=window), mode="reference")
    r = run_ppl(model, tok, data=text_file, max_tokens=2 * CTX, ctx=CTX, chunk=CHUNK)
    assert r["n_tokens"] == 2 * (CTX - 1)
    assert r["fp16"] == pytest.approx(ref, rel=1e-4)
    assert r["quantized"] == pytest.approx(ref, rel=1e-4)
    assert abs(r["delta"]) < 1e-4 * ref


def _sensitive_model() -> torch.nn.Module:
    """A random model whose predictions come from attention (no MLP, larger attention output) and are confident."""
    m = tiny_model(CFG)
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
        for layer in m.model.layers:
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.o_proj.weight.mul_(4)
            layer.self_attn.q_proj.weight.mul_(2)
    return m


@pytest.fixture(scope="module")
def own_samples() -> torch.Tensor:
    """Two windows sampled from the sensitive model itself, as its eval text.

    Random weights do not model any real text, so a perturbation could move perplexity on it either way. On the
    model's own samples the expected NLL is its entropy under fp16 and entropy + KL(fp16 || quantized) under any
    perturbation, so a damaging plan must raise perplexity.
    """
    from transformers import DynamicCache

    torch.manual_seed(0)
    start = torch.randint(4, CFG.vocab_size, (2, 1))
    with torch.no_grad():
        return _sensitive_model().generate(start, do_sample=True, max_new_tokens=CTX - 1, min_new_tokens=CTX - 1,
                                           top_k=0, top_p=1.0, temperature=1.0, past_key_values=DynamicCache(),
                                           pad_token_id=3)


def test_broken_plan_shows_large_delta(own_samples: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """2-bit codes with no fp16 window raise perplexity a lot, 8-bit nsep barely: the metric can fail."""
    import kvcompile.eval.ppl as ppl

    monkeypatch.setattr(ppl, "eval_windows", lambda *a, **k: own_samples)
    model = _sensitive_model()
    shift, baseline = {}, None
    for name, (k, window, p) in {"good": ("nsep-8", 8, 0.6), "broken": ("int-token-2", 0, 0.6),
                                 "absurd scales": ("nsep-2", 0, 100.0)}.items():
        lower(model, *make_plan(k, k, window=window, p=p), mode="reference")
        r = run_ppl(model, tiny_tokenizer(), data="unused", ctx=CTX, chunk=CHUNK, baseline=baseline)
        baseline = r["baseline"]  # the fp16 side does not depend on the plan: measure it once
        shift[name] = math.log(r["quantized"] / r["fp16"])
        assert r["delta"] == pytest.approx(r["quantized"] - r["fp16"])
    assert abs(shift["good"]) < 0.02
    assert shift["broken"] > 0.2 and shift["absurd scales"] > 0.2


def test_simulated_protocol(text_file: str, own_samples: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 plan: simulated == fp16 == the plain model. A 2-bit plan raises perplexity. The implementation is
    restored afterwards."""
    import kvcompile.eval.ppl as ppl

    tok = tiny_tokenizer()
    model = lower(tiny_model(CFG), *make_plan("fp16", "fp16"))
    r = run_ppl(model, tok, data=text_file, max_tokens=CTX, ctx=CTX, protocol="simulated")
    assert r["quantized"] == r["fp16"]
    assert r["fp16"] == pytest.approx(plain_ppl(tiny_model(CFG), eval_windows(text_file, tok, max_tokens=CTX,
                                                                              ctx=CTX)), rel=1e-5)
    monkeypatch.setattr(ppl, "eval_windows", lambda *a, **k: own_samples)
    model = lower(_sensitive_model(), *make_plan("int-token-2", "int-token-2", window=0))
    r2 = run_ppl(model, tok, data="unused", ctx=CTX, protocol="simulated")
    assert math.log(r2["quantized"] / r2["fp16"]) > 0.2
    assert model.config._attn_implementation == "kvcompile"


def test_simulated_fake_quantizes_each_head_group_with_its_format_and_centre() -> None:
    """A mixed plan: nsep heads use their own scales, centred around the calibrated mean; fp16 heads are untouched."""
    f = KVFormat.parse
    layers = [LayerPlan([HeadPlan(f("nsep-4"), f("int-token-2")), HeadPlan(f("fp16"), f("fp16"))]),
              LayerPlan([HeadPlan(f("fp16"), f("fp16")), HeadPlan(f("fp16"), f("fp16"))])]
    plan = Plan(SHAPE, layers, window=8, sinks=0, block=16, k_center=True)
    params = KVParams()
    g = torch.Generator().manual_seed(1)
    for i in range(SHAPE.num_layers):
        for role in ("k", "v"):
            params.set(i, role, "p", 0.3 + 0.5 * torch.rand(SHAPE.num_kv_heads, SHAPE.head_dim, generator=g))
            params.set(i, role, "mean", torch.randn(SHAPE.num_kv_heads, SHAPE.head_dim, generator=g))
    finalize_scales(plan, params)
    k = torch.randn(1, 2, 10, 16, generator=g)
    v = torch.randn(1, 2, 10, 16, generator=g)
    kq, vq = fake_quantize_layer(plan, params, 0, k, v)
    mu = params.mean(0, "k")[0][None, None, None]
    want_k0 = fake_quantize(k[:, :1] - mu, f("nsep-4"), "k", scale=params.scale(0, "k")[:1]) + mu
    torch.testing.assert_close(kq[:, :1], want_k0)
    torch.testing.assert_close(vq[:, :1], fake_quantize(v[:, :1], f("int-token-2"), "v"))
    assert torch.equal(kq[:, 1:], k[:, 1:]) and torch.equal(vq[:, 1:], v[:, 1:])
    assert not torch.allclose(kq[:, :1], k[:, :1])
    k1, v1 = fake_quantize_layer(plan, params, 1, k, v)
    assert k1 is k and v1 is v


def test_simulated_context_restores_on_error() -> None:
    model = lower(tiny_model(CFG), *make_plan("nsep-4", "nsep-4"))
    plan, params = model.kvcompile.plan, model.kvcompile.params
    with pytest.raises(RuntimeError, match="boom"), simulated_quantization(model, plan, params):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "kvcompile"


def test_evaluate_json_has_every_key(text_file: str, tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "tiny", CFG)
    out = tmp_path / "res" / "ppl.json"
    result = evaluate(str(folder), "ppl", recipe="fp16", data=text_file, max_tokens=CTX, ctx=CTX, chunk=CHUNK,
                      json_path=out)
    assert set(RESULT_KEYS) <= set(result)
    written = json.loads(out.read_text())
    assert set(RESULT_KEYS) <= set(written)
    assert written["recipe"] == "fp16" and written["task"] == "ppl" and written["avg_bits"] == 16.0
    assert written["quantized"] == pytest.approx(written["fp16"], rel=1e-6)
    assert written["settings"]["split"] == "eval" and written["n_tokens"] == CTX - 1
    assert not list(out.parent.glob(".*tmp"))  # the atomic write left no temporary file behind


def test_evaluate_artifact(text_file: str, tmp_path: Path) -> None:
    """An artifact folder carries its plan and recipe: evaluate() loads it (and refuses a second recipe)."""
    from kvcompile.api import build
    from kvcompile.artifact import read_artifact

    folder = save_tiny(tmp_path / "tiny", CFG)
    art = build(str(folder), tmp_path / "art", recipe="naive-int4", calib=text_file, verify_tokens=64)
    # 256 tokens: longer than the recipe's fp16 window (128) + flush block (32), so some tokens are quantized
    result = evaluate(str(art), "ppl", data=text_file, max_tokens=256, ctx=256, chunk=64)
    assert result["recipe"] == "naive-int4" and result["model"] == read_artifact(art).model["name"]
    assert result["avg_bits"] == pytest.approx(16 * (8 + 2) / 32)  # 4-bit codes + an fp16 multiplier per 16 values
    assert result["quantized"] != result["fp16"] and result["n_tokens"] == 255
    with pytest.raises(KVCompileError, match="drop --recipe"):
        evaluate(str(art), "ppl", recipe="fp16", data=text_file)


def test_evaluate_rejects_bad_requests(text_file: str, tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "tiny", CFG)
    with pytest.raises(KVCompileError, match="--recipe"):
        evaluate(str(folder), "ppl", data=text_file)
    with pytest.raises(KVCompileError, match="simulated"):
        evaluate(str(folder), "needle", recipe="fp16", data=text_file, protocol="simulated")
    with pytest.raises(KVCompileError, match="unknown eval task"):
        evaluate(str(folder), "bleu", recipe="fp16", data=text_file)


def test_baseline_reuse_is_checked(text_file: str) -> None:
    tok = tiny_tokenizer()
    model = lower(tiny_model(CFG), *make_plan("nsep-4", "nsep-4"), mode="reference")
    first = run_ppl(model, tok, data=text_file, max_tokens=CTX, ctx=CTX, chunk=CHUNK)
    again = run_ppl(model, tok, data=text_file, max_tokens=CTX, ctx=CTX, chunk=CHUNK, baseline=first["baseline"])
    assert again["fp16"] == first["fp16"] and again["quantized"] == first["quantized"]
    with pytest.raises(KVCompileError, match="baseline"):
        run_ppl(model, tok, data=text_file, max_tokens=CTX, ctx=CTX, chunk=16, baseline=first["baseline"])

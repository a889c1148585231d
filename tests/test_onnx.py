"""ONNX export (kvcompile export-onnx) and its onnxruntime runner, against formats.py and the PyTorch runtime.

Exports are slow (torch.export traces every layer symbolically), so each module-scoped fixture exports once and the
tests share it: a tiny 2-layer model with a mixed per-head plan (nsep 2/4 bits, int-token 8, fp16 heads, K and V
centring, sinks, window 4, flush block 3) and the same model with the fp16 plan and an fp16 full-precision state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from kvcompile.artifact import read_artifact, write_artifact
from kvcompile.errors import KVCompileError
from kvcompile.formats import FP16, KVFormat, quantize
from kvcompile.kvparams import KVParams
from kvcompile.models import model_identity, resolve_model
from kvcompile.onnx_export import (
    CONFIG_FILE,
    MODEL_FILE,
    OPSET,
    DecoderStep,
    OnnxExportError,
    export_onnx,
    layer_layouts,
    register_attention,
)
from kvcompile.onnx_runtime import OnnxDecoder, generate
from kvcompile.passes.calibrate import finalize_scales
from kvcompile.plan import HeadPlan, LayerPlan, ModelShape, Plan
from tests.tiny import save_tiny, tiny_llama_config

CFG = tiny_llama_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16)
SHAPE = ModelShape.from_config(CFG)
F = KVFormat.parse
#: layer 0: two head groups (nsep-4 K / int-token-8 V; fp16 K / nsep-2 V); layer 1: one group, nsep-4 K / nsep-2 V
MIXED = [LayerPlan([HeadPlan(F("nsep-4"), F("int-token-8")), HeadPlan(FP16, F("nsep-2"))]),
         LayerPlan([HeadPlan(F("nsep-4"), F("nsep-2")), HeadPlan(F("nsep-4"), F("nsep-2"))])]


def _write_art(root: Path, name: str, plan: Plan, params: KVParams) -> Path:
    folder = root / "model"
    if not folder.exists():
        save_tiny(folder, CFG)
    resolved = resolve_model(str(folder))
    return write_artifact(root / name, plan, params, model_identity(resolved, AutoConfig.from_pretrained(folder)))


def _params(seed: int = 0) -> KVParams:
    g = torch.Generator().manual_seed(seed)
    p = KVParams()
    for i in range(SHAPE.num_layers):
        for role in ("k", "v"):
            # layer 1 K (nsep-4, s = P / 7): P far above 1 rounds many directions to all-zero codes, so the fallback
            # runs (nsep-2 is midrise: it has no zero code and no fallback)
            lo = 6.0 if (i, role) == (1, "k") else 0.3
            p.set(i, role, "p", lo + 0.5 * torch.rand(SHAPE.num_kv_heads, SHAPE.head_dim, generator=g))
            p.set(i, role, "mean", 0.3 * torch.randn(SHAPE.num_kv_heads, SHAPE.head_dim, generator=g))
    return p


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(artifact, onnx folder) for the mixed plan."""
    root = tmp_path_factory.mktemp("onnx_mixed")
    plan = Plan(SHAPE, MIXED, window=4, sinks=2, block=3, k_center=True, v_center=True)
    params = _params()
    finalize_scales(plan, params)
    art = _write_art(root, "art", plan, params)
    return art, export_onnx(art, root / "onnx")


@pytest.fixture(scope="module")
def fp16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(artifact, onnx folder) for the fp16 plan with an fp16 state: the plain decoder-with-past baseline."""
    root = tmp_path_factory.mktemp("onnx_fp16")
    art = _write_art(root, "art", Plan.uniform(SHAPE, FP16, FP16, window=4, sinks=2, block=3), KVParams())
    return art, export_onnx(art, root / "onnx", kv_dtype="float16")


def _runtime(art: Path) -> torch.nn.Module:
    import kvcompile

    return kvcompile.load(art)


def _compare(model: torch.nn.Module, onnx_dir: Path, ids: torch.Tensor, steps: int = 32) -> tuple[
        float, list[int], list[int], OnnxDecoder]:
    """Prompt ``ids`` + ``steps`` greedy steps through the lowered runtime model and the ONNX decoder on the same
    tokens (the runtime's choice); returns (worst relative logit error, runtime tokens, ONNX argmax tokens, decoder)."""
    dec = OnnxDecoder(onnx_dir)
    cache = model.kvcompile.new_cache()
    worst, ref_tokens, onnx_tokens = 0.0, [], []
    with torch.no_grad():
        for _ in range(steps + 1):
            ref = model(ids, past_key_values=cache, use_cache=True).logits.float().numpy()
            got = dec.step(ids.numpy())
            worst = max(worst, float(np.abs(ref - got).max() / np.abs(ref).max()))
            ref_tokens.append(int(ref[0, -1].argmax()))
            onnx_tokens.append(int(got[0, -1].argmax()))
            ids = torch.tensor([[ref_tokens[-1]]])
    return worst, ref_tokens, onnx_tokens, dec


def _prompt(n: int = 5) -> torch.Tensor:
    return torch.randint(4, CFG.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- folder and config
def test_export_folder_config_and_checker(mixed: tuple[Path, Path]) -> None:
    import onnx

    art, out = mixed
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["opset"] == OPSET >= 18 and cfg["ir_version"] >= 8
    assert {MODEL_FILE, "model.onnx.data", "tokenizer.json"} <= set(cfg["files"])
    onnx.checker.check_model(str(out / MODEL_FILE))
    proto = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    assert [i.name for i in proto.graph.input] == [t["name"] for t in cfg["inputs"]]
    assert [o.name for o in proto.graph.output] == [t["name"] for t in cfg["outputs"]]
    names = {t["name"]: t for t in cfg["inputs"]}
    assert names["past.0.g0.k.codes"] == {"name": "past.0.g0.k.codes", "dtype": "uint8",
                                          "shape": [1, 1, "past", 8]}
    assert names["past.0.g1.k.data"]["dtype"] == "float16" and names["past.1.g0.v.r"]["dtype"] == "float16"
    assert names["past.1.g0.v.window"]["shape"] == [1, 2, 4 + 3 - 1, 16]
    assert names["past.1.g0.v.sinks"]["shape"] == [1, 2, 2, 16]
    plan = read_artifact(art).plan
    # every token costs exactly what the plan counts (codes, r, fp16-format heads), nothing more; sinks and window
    # are a fixed (sinks + window + block - 1) tokens in float32
    assert cfg["past_bytes"]["per_token"] == plan.bytes_per_token()
    assert cfg["past_bytes"]["fixed"] == (2 + 6) * 4 * 2 * 16 * 2 * 2
    assert cfg["model"]["config_sha256"] == read_artifact(art).model["config_sha256"]


def test_unsupported_plans_are_refused(tmp_path: Path) -> None:
    kivi = Plan.uniform(SHAPE, F("kivi-4g32"), F("kivi-4g32"), block=32)
    with pytest.raises(OnnxExportError, match="kivi formats are not supported for ONNX export yet"):
        layer_layouts(kivi)
    sliding = Plan.uniform(dataclasses.replace(SHAPE, sliding=(True, False)), F("nsep-4"), F("nsep-4"))
    with pytest.raises(OnnxExportError, match="sliding-window"):
        layer_layouts(sliding)
    with pytest.raises(OnnxExportError, match="kv_dtype"):
        export_onnx(tmp_path, tmp_path / "x", kv_dtype="bfloat16")


def test_export_refuses_to_overwrite_an_artifact(mixed: tuple[Path, Path]) -> None:
    art, _ = mixed
    with pytest.raises(KVCompileError, match="is a kvcompile artifact"):
        export_onnx(art, art)
    assert read_artifact(art).plan.window == 4  # untouched


# ---------------------------------------------------------------------------------------------- against the runtime
def test_mixed_plan_matches_runtime(mixed: tuple[Path, Path]) -> None:
    art, out = mixed
    worst, ref, got, dec = _compare(_runtime(art), out, _prompt(5), steps=32)
    assert worst < 1e-3
    assert got == ref
    state = dec.state_numpy()
    assert dec.length == 5 + 32 and state["past.0.g0.k.codes"].shape == (1, 1, 37, 8)
    assert state["past.1.g0.v.codes"].shape == (1, 2, 37, 4)  # nsep-2: 16 channels in 4 bytes


def test_chunks_match_runtime(mixed: tuple[Path, Path]) -> None:
    """Chunks of any size after a non-empty past (the runtime flushes whole blocks after each): same logits."""
    art, out = mixed
    model, dec = _runtime(art), OnnxDecoder(out)
    cache = model.kvcompile.new_cache()
    ids = torch.randint(4, CFG.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    start = 0
    with torch.no_grad():
        for n in (3, 7, 1, 5, 1, 1, 12):
            chunk = ids[:, start:start + n]
            start += n
            ref = model(chunk, past_key_values=cache, use_cache=True).logits.float().numpy()
            got = dec.step(chunk.numpy())
            assert got.shape == ref.shape
            assert np.abs(ref - got).max() < 1e-3 * np.abs(ref).max()


def test_generate_matches_runtime_greedy(mixed: tuple[Path, Path]) -> None:
    art, out = mixed
    model = _runtime(art)
    tok = model.kvcompile_tokenizer
    prompt = "she said that the water was"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert ref.shape[1] == ids.shape[1] + 12  # no early EOS: 6 + 12 tokens, most of them quantized on the way
    expected = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert generate(out, prompt, 12) == expected


def test_fp16_plan_export_is_plain_past(fp16: tuple[Path, Path], mixed: tuple[Path, Path]) -> None:
    art, out = fp16
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert [t["name"] for t in cfg["inputs"]] == ["input_ids", "past.0.k", "past.0.v", "past.1.k", "past.1.v"]
    plan = read_artifact(art).plan
    assert cfg["past_bytes"] == {"per_token": plan.fp16_bytes_per_token(), "fixed": 0}  # fp16 K/V, 2 bytes each
    mixed_cfg = json.loads((mixed[1] / CONFIG_FILE).read_text())
    assert mixed_cfg["past_bytes"]["per_token"] < cfg["past_bytes"]["per_token"]
    # the fp16 state rounds each K/V once; everything else is the unmodified model
    worst, ref, got, dec = _compare(_runtime(art), out, _prompt(5), steps=8)
    assert worst < 1e-2
    assert dec.state_numpy()["past.1.v"].dtype == np.float16 and dec.state_numpy()["past.1.v"].shape[2] == 13


# ---------------------------------------------------------------------------------------------- against formats.py
def _eager_step(art: Path) -> DecoderStep:
    import kvcompile

    a = read_artifact(art)
    model = kvcompile.load(art, mode="reference")
    register_attention()
    model.set_attn_implementation("kvcompile_onnx")
    return DecoderStep(model, a.plan, a.params, "float32").eval()


def _feeds(dec: OnnxDecoder, state: list[torch.Tensor], ids: torch.Tensor) -> dict[str, np.ndarray]:
    return {"input_ids": ids.numpy(), **{sp.name: t.numpy() for sp, t in zip(dec.inputs[1:], state, strict=True)}}


def test_graph_stores_formats_quantize_of_new_tokens(mixed: tuple[Path, Path]) -> None:
    """From a random state, a 6-token chunk: each new token's store row is formats.quantize of its full-precision
    copy in the window (nsep-2 midrise, nsep-4 with the all-zero fallback, int-token 8, fp16); old rows are kept.
    """
    art, out = mixed
    step, dec = _eager_step(art), OnnxDecoder(out)
    a = read_artifact(art)
    past, t = 9, 6
    state = step.random_state(past=past, generator=torch.Generator().manual_seed(3))
    named = {sp.name: x for sp, x in zip(dec.inputs[1:], state, strict=True)}
    outs = dict(zip([o.name for o in dec.session.get_outputs()],
                    dec.session.run(None, _feeds(dec, state, torch.tensor([[5, 9, 11, 3, 4, 8]]))), strict=True))
    dead = 0
    for i, lay in enumerate(layer_layouts(a.plan)):
        for j, g in enumerate(lay.groups):
            for role, fmt in (("k", g.k), ("v", g.v)):
                pre = f"{i}.g{j}.{role}"
                window = torch.from_numpy(outs[f"present.{pre}.window"])
                assert window.shape[2] == t  # window 4 + block 3 - 1 slots: the chunk fills them
                np.testing.assert_array_equal(outs[f"present.{pre}.sinks"], named[f"past.{pre}.sinks"].numpy())
                scale = a.params.scale(i, role)
                scale = scale[list(g.heads)] if fmt.kind == "nsep" else None
                new = window[:, :, -t:]
                want = quantize(new, fmt, role, scale)
                if fmt.kind == "nsep" and fmt.bits == 4:
                    u = new / torch.linalg.vector_norm(new, dim=-1, keepdim=True)
                    dead += int(((u / scale[None, :, None, :]).round() == 0).all(dim=-1).sum())
                for name, x in want.items():
                    got = outs[f"present.{pre}.{name}"]
                    assert got.shape[2] == past + t
                    np.testing.assert_array_equal(got[:, :, :past], named[f"past.{pre}.{name}"].numpy())
                    if name == "codes":
                        np.testing.assert_array_equal(got[:, :, past:], x.numpy())
                    else:
                        np.testing.assert_allclose(got[:, :, past:].astype(np.float32), x.float().numpy(), rtol=2e-3)
    assert dead > 0  # the all-zero-codes fallback was exercised (and matched formats.py)


def test_graph_logits_match_eager_step_from_random_state(mixed: tuple[Path, Path]) -> None:
    """Random packed codes (every code value), random buffers, a 3-token chunk: graph == traced module."""
    art, out = mixed
    step, dec = _eager_step(art), OnnxDecoder(out)
    state = step.random_state(past=11, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([[5, 9, 11]])
    with torch.no_grad():
        ref = step(ids, state)
    got = dec.session.run(None, _feeds(dec, state, ids))
    np.testing.assert_allclose(got[0], ref[0].numpy(), rtol=1e-4, atol=1e-4 * float(ref[0].abs().max()))
    for r, g in zip(ref[1:], got[1:], strict=True):
        assert tuple(r.shape) == g.shape


def test_reexport_replaces_an_earlier_export_atomically(tmp_path: Path) -> None:
    from kvcompile.artifact import staging
    from kvcompile.onnx_export import _replacing

    out = tmp_path / "onnx"
    out.mkdir()
    (out / CONFIG_FILE).write_text("{}")
    (out / "old.bin").write_text("old")
    with pytest.raises(RuntimeError), _replacing(out), staging(out) as tmp:
        (tmp / "half.bin").write_text("half")
        raise RuntimeError("export failed")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, "old.bin"])  # the earlier export is back
    with _replacing(out), staging(out) as tmp:
        (tmp / CONFIG_FILE).write_text("{}")
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, "new.bin"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no staging or old folders left behind


def test_decoder_runs_one_sequence(mixed: tuple[Path, Path]) -> None:
    dec = OnnxDecoder(mixed[1], verify=False)
    with pytest.raises(KVCompileError, match="one sequence at a time"):
        dec.step(np.zeros((2, 3), dtype=np.int64))
    logits = dec.step([5, 9])
    assert logits.shape == (1, 2, CFG.vocab_size) and dec.length == 2
    dec.reset()
    assert dec.length == 0 and dec.state_numpy()["past.0.g0.k.codes"].shape == (1, 1, 0, 8)


# ---------------------------------------------------------------------------------------------- damaged folders
@pytest.fixture
def copy_of(mixed: tuple[Path, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "onnx"
    shutil.copytree(mixed[1], dst)
    return dst


def _one_line_error(folder: Path, match: str) -> None:
    with pytest.raises(KVCompileError, match=match) as info:
        OnnxDecoder(folder)
    assert "\n" not in str(info.value) and "export-onnx" in str(info.value)


def test_missing_file_is_reported(copy_of: Path) -> None:
    (copy_of / "model.onnx.data").unlink()
    _one_line_error(copy_of, "model.onnx.data is missing")


def test_corrupted_weights_fail_checksum(copy_of: Path) -> None:
    data = bytearray((copy_of / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (copy_of / "model.onnx.data").write_bytes(bytes(data))
    _one_line_error(copy_of, "does not match its checksum")


def test_config_of_another_export_is_recognised(copy_of: Path, fp16: tuple[Path, Path]) -> None:
    shutil.copy(fp16[1] / CONFIG_FILE, copy_of / CONFIG_FILE)
    _one_line_error(copy_of, "does not describe model.onnx")


def test_edited_plan_does_not_match_graph(copy_of: Path) -> None:
    cfg = json.loads((copy_of / CONFIG_FILE).read_text())
    cfg["plan"]["window"] = 64
    (copy_of / CONFIG_FILE).write_text(json.dumps(cfg))
    _one_line_error(copy_of, "does not describe model.onnx")


def test_not_an_export_and_garbage_config(tmp_path: Path) -> None:
    _one_line_error(tmp_path, "not a kvcompile ONNX export")
    (tmp_path / CONFIG_FILE).write_text("{not json")
    _one_line_error(tmp_path, "is corrupted")


# ---------------------------------------------------------------------------------------------- a real model
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KVCOMPILE_LONG_TESTS") != "1",
                    reason="exporting smollm2-135m takes ~10 min on 2 cores: set KVCOMPILE_LONG_TESTS=1")
def test_smollm2_nsep4_matches_runtime(tmp_path_factory: pytest.TempPathFactory) -> None:
    """smollm2-135m, nsep-4 everywhere (calibrated on a little text), window 8, sinks 4, block 1: a one-sentence
    prompt and 32 greedy steps, each of which moves a token from the window to the packed store."""
    import kvcompile
    from kvcompile.api import build

    root = tmp_path_factory.mktemp("onnx_smollm2")
    built = build("smollm2-135m", root / "built", recipe="nsep-int4", window=8, sinks=4, calib="austen", windows=4,
                  seq_len=256, verify_tokens=256)
    a = read_artifact(built)
    art = write_artifact(root / "art", dataclasses.replace(a.plan, block=1), a.params, a.model, recipe=a.recipe)
    out = export_onnx(art, root / "onnx")
    # the runtime's reference mode (its tests pin fused == reference): the fused decode kernel under Triton's CPU
    # interpreter would take ~10 s per step here
    model = kvcompile.load(art, mode="reference")
    ids = model.kvcompile_tokenizer("The quick brown fox jumps over the lazy dog, and then it",
                                    return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 4 + 8  # past the sinks and the window: a token leaves the window on every step
    worst, ref_tokens, onnx_tokens, dec = _compare(model, out, ids, steps=32)
    assert worst < 1e-3
    assert onnx_tokens == ref_tokens
    assert dec.state_numpy()["past.0.g0.k.codes"].shape[2] == dec.length
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["past_bytes"]["per_token"] == a.plan.bytes_per_token() < a.plan.fp16_bytes_per_token() / 3

"""build -> artifact -> load on a tiny model folder: round trip, verification failures, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kvcompile
from kvcompile.api import build, inspect
from kvcompile.artifact import ArtifactError, read_artifact
from kvcompile.errors import KVCompileError
from tests.tiny import calib_text, save_tiny, tiny_llama_config

RECIPE = """name: tiny-mixed
passes:
  - profile: {windows: 4, seq_len: 96, holdout: 1}
  - calibrate: {statistic: p999, center_k: true}
  - allocate: {budget_bits: 4.0, candidates: [fp16, nsep-8, nsep-4, nsep-2]}
runtime: {window: 16, sinks: 2, block: 16}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("art")
    folder = save_tiny(root / "model")
    (root / "calib.txt").write_text(calib_text())
    (root / "recipe.yaml").write_text(RECIPE)
    out = build(str(folder), root / "out", recipe=str(root / "recipe.yaml"), calib=str(root / "calib.txt"),
                verify_tokens=128)
    return root, folder, out


def test_artifact_layout_and_inspect(built: tuple[Path, Path, Path], capsys: pytest.CaptureFixture) -> None:
    _, _, out = built
    names = {p.name for p in out.iterdir()}
    assert {"kvcompile.json", "kv_params.safetensors", "profile.json", "stats.safetensors", "report.md"} <= names
    assert not any(n.startswith(".") for n in names)
    art = read_artifact(out)
    assert art.plan.avg_bits() <= 4.0 + 1e-9
    assert art.metrics["cache_ratio"] < 1.0
    inspect(out)
    text = capsys.readouterr().out
    assert "avg bits/element" in text and "layer" in text


def test_plan_and_params_round_trip_bit_exactly(built: tuple[Path, Path, Path]) -> None:
    _, _, out = built
    art = read_artifact(out)
    manifest = json.loads((out / "kvcompile.json").read_text())
    assert art.plan.to_dict() == manifest["plan"]
    m = kvcompile.load(out)
    for key in art.params:
        assert torch.equal(m.kvcompile.params.tensors[key], art.params.tensors[key])
    assert m.kvcompile.plan.to_dict() == art.plan.to_dict()


def test_loaded_model_generates_on_quantized_cache(built: tuple[Path, Path, Path]) -> None:
    _, _, out = built
    m = kvcompile.load(out)
    ids = torch.randint(4, 160, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = m.kvcompile.new_cache()
    g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=3,
                   past_key_values=cache)
    assert g.shape == (1, 48)
    assert any(getattr(layer, "n_quant", 0) > 0 for layer in cache.layers)


def test_wrong_model_is_rejected(built: tuple[Path, Path, Path]) -> None:
    root, _, out = built
    other = save_tiny(root / "other", tiny_llama_config(num_hidden_layers=3))
    with pytest.raises(KVCompileError, match=r"different model|num_layers"):
        kvcompile.load(out, model=str(other))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_tensor_file_fails(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, out = built
    bad = _copy(out, tmp_path / "bad")
    data = bytearray((bad / "kv_params.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "kv_params.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        read_artifact(bad)


def test_newer_format_version_fails(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, out = built
    bad = _copy(out, tmp_path / "newer")
    manifest = json.loads((bad / "kvcompile.json").read_text())
    manifest["version"] = 99
    (bad / "kvcompile.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="newer"):
        read_artifact(bad)
    manifest["version"] = 1
    manifest["plan"]["version"] = 99
    (bad / "kvcompile.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="newer"):
        read_artifact(bad)


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a kvcompile artifact"):
        read_artifact(tmp_path)


def test_failed_build_leaves_nothing(built: tuple[Path, Path, Path]) -> None:
    root, folder, _ = built
    out = root / "failed"
    with pytest.raises(KVCompileError, match="budget"):
        build(str(folder), out, recipe=str(root / "recipe.yaml"), calib=str(root / "calib.txt"), budget_bits=1.0,
              verify_tokens=64)
    assert not out.exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".failed")]


def test_staging_is_atomic(tmp_path: Path) -> None:
    from kvcompile.artifact import staging

    out = tmp_path / "art"
    with pytest.raises(RuntimeError), staging(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-write")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_plan_format_1_with_nsep2_heads_is_refused() -> None:
    """Format-1 plans meant another nsep 2-bit grid: refused with a rebuild hint; other format-1 plans still load."""
    from kvcompile.formats import KVFormat
    from kvcompile.plan import ModelShape, Plan, PlanError
    from tests.tiny import tiny_llama_config

    shape = ModelShape.from_config(tiny_llama_config())
    for k, ok in (("nsep-2", False), ("nsep-4", True)):
        d = Plan.uniform(shape, KVFormat.parse(k), KVFormat.parse("nsep-4"), window=8, sinks=2).to_dict()
        d["version"] = 1
        if ok:
            assert Plan.from_dict(d).layers[0].heads[0].k == KVFormat.parse(k)
        else:
            with pytest.raises(PlanError, match="rebuild"):
                Plan.from_dict(d)

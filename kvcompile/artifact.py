"""Write, read and verify an artifact folder (DESIGN.md, "Artifact")::

    OUT/
      kvcompile.json        plan + format version + model identity + recipe + measured metrics + file checksums
      kv_params.safetensors static scales, centring vectors, clip ratios: "layers.{i}.{k|v}.{name}"
      profile.json          calibration statistics behind the plan (when the recipe profiled)
      model/                weights and config when a pass changed them (smoothing folded in), else absent
      report.md, *.png      human summary

Writing is atomic: everything goes to a temporary sibling folder that is renamed into place only when complete, so a
failed build leaves no half-written artifact. Reading verifies the format version, every file's SHA-256 and (on load)
the identity of the model the plan is applied to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from kvcompile import __version__
from kvcompile.errors import KVCompileError
from kvcompile.kvparams import KVParams
from kvcompile.plan import Plan, PlanError

ARTIFACT_VERSION = 1
MANIFEST = "kvcompile.json"
PARAMS_FILE = "kv_params.safetensors"


class ArtifactError(KVCompileError):
    """An artifact folder that is missing, tampered with, too new, or for another model."""


@dataclass
class Artifact:
    """The contents of an artifact folder (tensors loaded lazily by :func:`read_artifact`)."""

    path: Path
    plan: Plan
    params: KVParams
    model: dict[str, Any]
    recipe: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def has_model_weights(self) -> bool:
        return (self.path / "model").is_dir()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path, fmt: str, max_version: int, what: str, error: type[KVCompileError],
                  hint: str) -> dict[str, Any]:
    """Parse the JSON manifest of a kvcompile folder (an artifact, an ONNX export) and check its format tag and version.

    Every failure is one line of ``error``: ``hint`` (how to rebuild) is appended, except for a manifest written by a
    newer kvcompile, which asks for an upgrade instead.
    """
    if not path.is_file():
        raise error(f"{path.parent} is not a {what} (no {path.name}); {hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path} is corrupted ({e.msg} at line {e.lineno}); {hint}") from e
    if not isinstance(data, dict) or data.get("format") != fmt or not isinstance(data.get("version"), int):
        raise error(f"{path} is not a {what} manifest; {hint}")
    if data["version"] > max_version:
        raise error(f"{path.parent}: format version {data['version']} is newer than this kvcompile supports "
                    f"({max_version}); upgrade kvcompile")
    return data


def _files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            yield p


@contextmanager
def staging(out: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` only if the block completes."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not a kvcompile artifact; choose another -o folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_artifact(out: str | Path, plan: Plan, params: KVParams, model_identity: dict[str, Any], *,
                   recipe: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                   extra: Callable[[Path], None] | None = None) -> Path:
    """Write an artifact atomically. ``extra(tmpdir)`` may add files (profile.json, model/, report.md, plots)."""
    out = Path(out).resolve()
    with staging(out) as tmp:
        save_file({k: params.tensors[k].contiguous() for k in params}, str(tmp / PARAMS_FILE),
                  metadata={"kvcompile_version": __version__})
        if extra is not None:
            extra(tmp)
        manifest = {
            "format": "kvcompile-artifact",
            "version": ARTIFACT_VERSION,
            "kvcompile_version": __version__,
            "model": model_identity,
            "plan": plan.to_dict(),
            "recipe": recipe or {},
            "metrics": metrics or {},
            "files": {str(p.relative_to(tmp)): sha256_file(p) for p in _files(tmp)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return out


def read_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read an artifact folder, checking its version and (``verify``) every file's checksum."""
    root = Path(path)
    manifest = read_manifest(root / MANIFEST, "kvcompile-artifact", ARTIFACT_VERSION, "kvcompile artifact",
                             ArtifactError, "build it with `kvcompile build`")
    files: dict[str, str] = manifest.get("files", {})
    if verify:
        for rel, digest in files.items():
            p = root / rel
            if not p.is_file():
                raise ArtifactError(f"artifact file {rel} is missing; the artifact is incomplete, rebuild it")
            if sha256_file(p) != digest:
                raise ArtifactError(f"artifact file {rel} does not match its checksum (tampered or corrupted); "
                                    "rebuild the artifact")
        unknown = [str(p.relative_to(root)) for p in _files(root) if str(p.relative_to(root)) not in files]
        if unknown:
            raise ArtifactError(f"artifact holds files not in its manifest: {', '.join(unknown[:3])}")
    try:
        plan = Plan.from_dict(manifest["plan"])
    except (PlanError, KeyError) as e:
        raise ArtifactError(f"artifact plan is invalid: {e}") from e
    tensors = load_file(str(root / PARAMS_FILE)) if (root / PARAMS_FILE).is_file() else {}
    return Artifact(root, plan, KVParams(dict(tensors)), manifest.get("model", {}), manifest.get("recipe", {}),
                    manifest.get("metrics", {}), manifest)

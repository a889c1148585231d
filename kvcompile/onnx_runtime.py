"""Run an ONNX export of kvcompile (``kvcompile export-onnx``) with onnxruntime.

:class:`OnnxDecoder` verifies the folder, opens a session (CUDA when onnxruntime has it, the CPU otherwise) and keeps
the packed cache state between :meth:`OnnxDecoder.step` calls; :func:`generate` is greedy decoding on top of it.
The state stays in onnxruntime's own buffers (``OrtValue``), on the GPU when the session runs there: each step feeds
the previous step's ``present.*`` outputs back as ``past.*`` without copying them through numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvcompile.errors import KVCompileError
from kvcompile.onnx_export import (
    CONFIG_FILE,
    DTYPE_BYTES,
    MODEL_FILE,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    PAST,
    TensorSpec,
    io_specs,
    layout_digest,
)
from kvcompile.plan import Plan, PlanError

_NP_TYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "int64": np.int64}


class OnnxExportFolderError(KVCompileError):
    """An ONNX export folder that is missing files, corrupted, or whose parts do not belong together."""


_REEXPORT = "re-export it with `kvcompile export-onnx ARTIFACT -o DIR`"


def _fail(msg: str) -> OnnxExportFolderError:
    return OnnxExportFolderError(f"{msg}; {_REEXPORT}")


def read_config(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and check ``onnx_config.json`` of an export folder: format, version, file checksums (``verify``), the
    graph's recorded layout against the config's plan, and the graph's inputs/outputs against the config."""
    import onnx

    from kvcompile.artifact import read_manifest, sha256_file

    root = Path(folder)
    path = root / CONFIG_FILE
    cfg = read_manifest(path, ONNX_FORMAT, ONNX_FORMAT_VERSION, "kvcompile ONNX export", OnnxExportFolderError,
                        _REEXPORT)
    files: dict[str, str] = cfg.get("files") or {}
    if MODEL_FILE not in files:
        raise _fail(f"{path} lists no {MODEL_FILE}")
    for rel in files:
        if not (root / rel).is_file():
            raise _fail(f"{root} is incomplete: {rel} is missing")
    try:
        plan = Plan.from_dict(cfg["plan"])
        kv_dtype, vocab = str(cfg["kv_dtype"]), int(cfg["vocab_size"])
        inputs, outputs = io_specs(plan, kv_dtype, vocab)
    except (PlanError, KeyError, TypeError, ValueError) as e:
        raise _fail(f"{path} holds an invalid plan ({e})") from e
    # Cheap identity checks first (the graph without its weights), so a config from another export is named as such
    # rather than reported as a checksum mismatch.
    try:
        proto = onnx.load(str(root / MODEL_FILE), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / OSError variants for a damaged protobuf
        raise _fail(f"{root / MODEL_FILE} cannot be read ({type(e).__name__})") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    want = layout_digest(plan, kv_dtype, vocab, model.get("config_sha256"))
    if meta.get("kvcompile.layout_sha256") != want or cfg.get("layout_sha256") != want:
        raise _fail(f"{path} does not describe {MODEL_FILE} (its model, plan or layout belong to another export)")
    _check_graph_io(proto, inputs, outputs, root)
    if [sp.to_dict() for sp in inputs] != cfg.get("inputs") or [sp.to_dict() for sp in outputs] != cfg.get("outputs"):
        raise _fail(f"{path} lists inputs/outputs that do not match its plan")
    if verify:
        for rel, digest in files.items():
            if sha256_file(root / rel) != digest:
                raise _fail(f"{root / rel} does not match its checksum (corrupted or replaced)")
    cfg["_plan"], cfg["_inputs"], cfg["_outputs"] = plan, inputs, outputs
    return cfg


def _check_graph_io(proto: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], root: Path) -> None:
    """The graph's inputs/outputs must be exactly the specs the plan implies (names, element types, static dims)."""
    from onnx import helper

    for kind, values, specs in (("inputs", proto.graph.input, inputs), ("outputs", proto.graph.output, outputs)):
        names = [v.name for v in values]
        if names != [sp.name for sp in specs]:
            raise _fail(f"{root / MODEL_FILE} has {kind} {names[:3]}... that do not match its config's plan")
        for v, sp in zip(values, specs, strict=True):
            tt = v.type.tensor_type
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            static_ok = all(a == b for a, b in zip(dims, sp.shape, strict=False) if isinstance(b, int))
            if dtype != np.dtype(_NP_TYPES[sp.dtype]) or len(dims) != len(sp.shape) or not static_ok:
                raise _fail(f"{root / MODEL_FILE} input/output {sp.name} is {dtype} {dims}, but the plan implies "
                            f"{sp.dtype} {list(sp.shape)}")


def _providers(providers: list[str] | None) -> list[str]:
    import onnxruntime as ort

    if providers:
        return providers
    avail = ort.get_available_providers()
    # onnxruntime-gpu lists CUDA even on machines without a GPU (and then logs errors while falling back): ask for it
    # only where a GPU is visible.
    gpu = any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/dxg")) or _torch_cuda()
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if gpu else ("CPUExecutionProvider",)
    return [p for p in wanted if p in avail]


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available()


class OnnxDecoder:
    """An onnxruntime session over an export folder that keeps the cache state between steps.

    ``step(input_ids)`` runs the given tokens (``[1, tokens]`` or ``[tokens]``: a whole prompt, a chunk or one
    token) after everything fed so far and returns their logits ``[1, tokens, vocab]`` (float32, numpy).
    ``reset()`` starts a new sequence. ``verify=False`` skips the files' SHA-256 (the layout checks still run).
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None, *, verify: bool = True,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.config = read_config(self.folder, verify=verify)
        self.plan: Plan = self.config["_plan"]
        self.inputs: list[TensorSpec] = self.config["_inputs"]
        self.outputs: list[TensorSpec] = self.config["_outputs"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.folder / MODEL_FILE), opts, providers=_providers(providers))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise _fail(f"onnxruntime cannot load {self.folder / MODEL_FILE} ({first[:200]})") from e
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.state: dict[str, Any] = {}
        self.length = 0
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Start a new sequence: no past rows, zero sinks and window buffers."""
        import onnxruntime as ort

        self.state = {}
        for sp in self.inputs[1:]:
            shape = [0 if a == PAST else a for a in sp.shape]
            self.state[sp.name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, _NP_TYPES[sp.dtype]), self.device)
        self.length = 0

    def step(self, input_ids: Any) -> np.ndarray:
        """Run ``input_ids`` (``[1, tokens]`` or ``[tokens]`` ints) after the cached tokens; returns their logits."""
        import onnxruntime as ort

        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise KVCompileError(f"input_ids must be [1, tokens] with tokens >= 1 (the export runs one sequence at a "
                                 f"time), got shape {list(ids.shape)}")
        feeds = {"input_ids": ort.OrtValue.ortvalue_from_numpy(ids, self.device), **self.state}
        names = [sp.name for sp in self.outputs]
        outs = self.session.run_with_ort_values(names, feeds)
        for sp, value in zip(self.outputs[1:], outs[1:], strict=True):
            self.state["past" + sp.name[len("present"):]] = value
        self.length += ids.shape[1]
        return outs[0].numpy()

    def state_bytes(self) -> int:
        """Bytes the cache state holds now (packed store, full-precision sinks and window, unquantized layers)."""
        return sum(int(np.prod(v.shape())) * DTYPE_BYTES[sp.dtype]
                   for sp, v in ((sp, self.state[sp.name]) for sp in self.inputs[1:]))

    def state_numpy(self) -> dict[str, np.ndarray]:
        """The current state as numpy arrays (copies; for inspection and tests)."""
        return {name: v.numpy() for name, v in self.state.items()}

    @property
    def eos_token_ids(self) -> list[int]:
        return [int(x) for x in self.config.get("eos_token_id") or []]


def generate(dir: str | Path, prompt: str, max_new_tokens: int, *, decoder: OnnxDecoder | None = None) -> str:
    """Greedy continuation of ``prompt`` (at most ``max_new_tokens`` tokens, stopping at EOS) with the export in
    ``dir``; returns the generated text without the prompt. Pass ``decoder`` to reuse an open session."""
    from transformers import AutoTokenizer

    dec = decoder or OnnxDecoder(dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(dec.folder))
    except (OSError, ValueError) as e:
        raise _fail(f"{dec.folder} has no usable tokenizer") from e
    ids = tok(prompt, return_tensors="np")["input_ids"].astype(np.int64)
    if ids.shape[1] == 0:
        raise KVCompileError("the prompt is empty after tokenization; give at least one token")
    dec.reset()
    logits = dec.step(ids)
    out: list[int] = []
    eos = set(dec.eos_token_ids)
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        if nxt in eos:
            break
        out.append(nxt)
        if len(out) == max_new_tokens:
            break
        logits = dec.step(np.array([[nxt]], dtype=np.int64))
    return tok.decode(out, skip_special_tokens=True)


__all__ = ["OnnxDecoder", "OnnxExportFolderError", "generate", "read_config"]

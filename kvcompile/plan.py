"""The bit plan: which KV format every (layer, KV head) of a model uses for K and for V.

A :class:`Plan` is what the allocator decides, what the artifact stores (as JSON inside ``kvcompile.json``) and what
the runtime lowers. It knows the model's attention shape so it can be validated against the model it is applied to,
and it computes the stored bytes per token (every byte counted: codes, per-token multipliers, group metadata).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvcompile.errors import KVCompileError
from kvcompile.formats import FP16, KVFormat

#: 2: nsep at 2 bits moved to the midrise grid {-3, -1, 1, 3} * s (version-1 nsep-2 scales mean another grid)
PLAN_VERSION = 2


class PlanError(KVCompileError):
    """A plan that is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry a plan is made for."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    #: per layer: True where the layer uses sliding-window attention (its cache is bounded and kept in fp16)
    sliding: tuple[bool, ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read the attention shape from a transformers config (text config for multimodal models)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        missing = [a for a in ("num_hidden_layers", "num_attention_heads") if getattr(cfg, a, None) is None]
        if missing:
            raise PlanError(f"model config has no {', '.join(missing)}: kvcompile supports decoder-only transformers")
        nq = int(cfg.num_attention_heads)
        nkv = int(getattr(cfg, "num_key_value_heads", None) or nq)
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nq
        n = int(cfg.num_hidden_layers)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
        sliding = tuple(t == "sliding_attention" for t in types)
        return cls(n, nq, nkv, int(hd), sliding)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_q_heads": self.num_q_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "sliding": [i for i, s in enumerate(self.sliding) if s],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelShape:
        sl = set(d.get("sliding", []))
        n = int(d["num_layers"])
        return cls(n, int(d["num_q_heads"]), int(d["num_kv_heads"]), int(d["head_dim"]),
                   tuple(i in sl for i in range(n)))


@dataclass(frozen=True)
class HeadPlan:
    """Format of one KV head's keys and values."""

    k: KVFormat = FP16
    v: KVFormat = FP16


@dataclass
class LayerPlan:
    """Formats of every KV head of one layer."""

    heads: list[HeadPlan]

    def groups(self) -> dict[tuple[KVFormat, KVFormat], list[int]]:
        """KV heads grouped by their (K format, V format): the runtime runs one kernel per group."""
        out: dict[tuple[KVFormat, KVFormat], list[int]] = {}
        for h, hp in enumerate(self.heads):
            out.setdefault((hp.k, hp.v), []).append(h)
        return out


@dataclass
class Plan:
    """Per-layer, per-head K/V formats plus the runtime's full-precision window.

    ``window``: the most recent tokens kept in fp16 (past-only quantization). ``sinks``: the first tokens kept in
    fp16 forever. ``block``: tokens are quantized ``block`` at a time as they leave the window, so the fp16 tail holds
    between ``window`` and ``window + block - 1`` tokens (KIVI needs ``block`` to be a multiple of its group).
    ``k_center`` / ``v_center``: subtract the calibrated per-channel mean of K (V) before storing; exact for
    attention (softmax shift invariance; probabilities sum to one).
    """

    shape: ModelShape
    layers: list[LayerPlan]
    window: int = 128
    sinks: int = 4
    block: int = 32
    k_center: bool = False
    v_center: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    # ------------------------------------------------------------------ construction
    @classmethod
    def uniform(cls, shape: ModelShape, k: KVFormat, v: KVFormat, **kw: Any) -> Plan:
        """Every head of every full-attention layer in (k, v); sliding-window layers in fp16."""
        layers = [
            LayerPlan([HeadPlan(FP16, FP16) if shape.sliding and shape.sliding[i] else HeadPlan(k, v)
                       for _ in range(shape.num_kv_heads)])
            for i in range(shape.num_layers)
        ]
        return cls(shape, layers, **kw)

    # ------------------------------------------------------------------ accounting
    def formats(self) -> set[KVFormat]:
        return {f for lp in self.layers for hp in lp.heads for f in (hp.k, hp.v)}

    def bytes_per_token(self) -> float:
        """Stored bytes per token over all layers and KV heads, K and V, metadata included."""
        d = self.shape.head_dim
        return sum(hp.k.bytes_per_token(d, "k") + hp.v.bytes_per_token(d, "v")
                   for lp in self.layers for hp in lp.heads)

    def fp16_bytes_per_token(self) -> float:
        return 2.0 * 2 * self.shape.head_dim * self.shape.num_kv_heads * self.shape.num_layers

    def avg_bits(self) -> float:
        """Average stored bits per K/V element of a quantized token (metadata included)."""
        return 16.0 * self.bytes_per_token() / self.fp16_bytes_per_token()

    def static_bytes(self) -> int:
        """Bytes that do not grow with context: nsep scales and centering vectors (fp32)."""
        hd, nkv = self.shape.head_dim, self.shape.num_kv_heads
        n = 0
        for lp in self.layers:
            n += sum(1 for hp in lp.heads if hp.k.kind == "nsep") * hd * 4
            n += sum(1 for hp in lp.heads if hp.v.kind == "nsep") * hd * 4
        n += (int(self.k_center) + int(self.v_center)) * self.shape.num_layers * nkv * hd * 4
        return n

    def cache_bytes(self, tokens: int, batch: int = 1) -> float:
        """Bytes the runtime cache holds after ``tokens`` tokens: fp16 sinks and window, packed rest, statics.

        The fp16 tail is counted at its largest (``window + block - 1``) so this is an upper bound.
        """
        fp16_tokens = min(tokens, self.sinks + self.window + self.block - 1)
        quant_tokens = tokens - fp16_tokens
        per_seq = fp16_tokens * self.fp16_bytes_per_token() + quant_tokens * self.bytes_per_token()
        return batch * per_seq + self.static_bytes()

    # ------------------------------------------------------------------ validation
    def validate(self, shape: ModelShape | None = None) -> None:
        """Raise :class:`PlanError` if the plan is inconsistent or (given ``shape``) made for another model."""
        s = self.shape
        if len(self.layers) != s.num_layers:
            raise PlanError(f"plan has {len(self.layers)} layers but its shape says {s.num_layers}")
        for i, lp in enumerate(self.layers):
            if len(lp.heads) != s.num_kv_heads:
                raise PlanError(f"plan layer {i} has {len(lp.heads)} KV heads, expected {s.num_kv_heads}")
            for hp in lp.heads:
                for role, f in (("K", hp.k), ("V", hp.v)):
                    if not f.packable:
                        raise PlanError(f"layer {i} {role} format {f.name} cannot be stored packed")
                    if f.kind == "kivi" and self.block % f.group:
                        raise PlanError(f"layer {i}: flush block {self.block} is not a multiple of "
                                        f"kivi group {f.group}")
                    if f.kind != "fp16" and s.head_dim % (8 // f.bits):
                        raise PlanError(f"head_dim {s.head_dim} cannot hold packed {f.bits}-bit codes")
        if self.window < 0 or self.sinks < 0 or self.block <= 0:
            raise PlanError("window and sinks must be >= 0 and block > 0")
        if shape is not None:
            mine, theirs = self.shape, shape
            for attr in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"):
                a, b = getattr(mine, attr), getattr(theirs, attr)
                if a != b:
                    raise PlanError(
                        f"plan was made for a model with {attr}={a}, but this model has {attr}={b}: "
                        "build a new artifact for this model")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "shape": self.shape.to_dict(),
            "window": self.window,
            "sinks": self.sinks,
            "block": self.block,
            "k_center": self.k_center,
            "v_center": self.v_center,
            "layers": [{"k": [hp.k.name for hp in lp.heads], "v": [hp.v.name for hp in lp.heads]}
                       for lp in self.layers],
            "avg_bits": round(self.avg_bits(), 4),
            "bytes_per_token": self.bytes_per_token(),
            "fp16_bytes_per_token": self.fp16_bytes_per_token(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        try:
            version = int(d["version"])
            if version > PLAN_VERSION:
                raise PlanError(
                    f"plan format version {version} is newer than this kvcompile understands ({PLAN_VERSION}): "
                    "upgrade kvcompile")
            layers = [LayerPlan([HeadPlan(KVFormat.parse(k), KVFormat.parse(v))
                                 for k, v in zip(lay["k"], lay["v"], strict=True)])
                      for lay in d["layers"]]
            if version < 2 and any(f.kind == "nsep" and f.bits == 2 for lay in layers for hp in lay.heads
                                   for f in (hp.k, hp.v)):
                raise PlanError("this plan was built by an older kvcompile whose nsep 2-bit grid differs from this "
                                "one (plan format 1): rebuild it with `kvcompile build`")
            version = PLAN_VERSION
            plan = cls(ModelShape.from_dict(d["shape"]), layers, int(d["window"]), int(d["sinks"]),
                       int(d.get("block", 32)), bool(d.get("k_center", False)), bool(d.get("v_center", False)),
                       dict(d.get("meta", {})), version)
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed plan: {e}") from e
        plan.validate()
        return plan

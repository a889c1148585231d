"""Lowering: install the quantized KV runtime on an unmodified transformers model.

After :func:`lower`, the model's attention implementation is kvcompile's registered function, ``model.kvcompile``
holds the plan and static parameters, ``model.kvcompile.new_cache()`` makes an empty quantized cache, and
``model.generate()`` uses such a cache whenever the caller does not pass one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from kvcompile.errors import KVCompileError
from kvcompile.kvparams import KVParams
from kvcompile.plan import ModelShape, Plan, PlanError
from kvcompile.runtime.attention import register
from kvcompile.runtime.cache import QuantizedKVCache


@dataclass
class Lowered:
    """What :func:`lower` attaches to a model as ``model.kvcompile``."""

    plan: Plan
    params: KVParams
    config: Any
    mode: str = "fused"

    def new_cache(self, graphs: bool = False) -> QuantizedKVCache:
        """An empty quantized cache for one ``forward``/``generate`` session.

        ``graphs=True``: a cache that :class:`kvcompile.runtime.graph.DecodeGraph` can capture decode steps over.
        """
        return QuantizedKVCache(self.plan, self.params, self.config, self.mode, graphs=graphs)


def check_supported(model: torch.nn.Module) -> ModelShape:
    """The model's attention shape; a clear error for models kvcompile cannot lower."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise KVCompileError(f"{type(model).__name__} is not a transformers causal LM (no config / generate)")
    if getattr(config, "is_encoder_decoder", False):
        raise KVCompileError(f"{type(model).__name__} is an encoder-decoder model; kvcompile supports decoder-only LMs")
    try:
        return ModelShape.from_config(config)
    except PlanError as e:
        raise KVCompileError(str(e)) from e


def lower(model: torch.nn.Module, plan: Plan, params: KVParams, mode: str = "fused") -> torch.nn.Module:
    """Install ``plan`` on ``model`` in place and return it.

    Raises :class:`~kvcompile.plan.PlanError` if the plan was made for a model of another shape.
    """
    shape = check_supported(model)
    plan.validate(shape)
    name = register()
    model.set_attn_implementation(name)
    model.kvcompile = Lowered(plan, params, model.config, mode)
    if not getattr(model.generate, "_kvcompile", False):
        model.generate = _generate_with_cache(model, model.generate)
    return model


def _generate_with_cache(model: torch.nn.Module, generate: Any) -> Any:
    @functools.wraps(generate)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            kwargs["past_key_values"] = model.kvcompile.new_cache()
        return generate(*args, **kwargs)

    wrapped._kvcompile = True  # type: ignore[attr-defined]
    return wrapped

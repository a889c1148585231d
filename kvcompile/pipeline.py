"""Recipes (YAML) -> an ordered list of passes over one :class:`CompileContext`.

A recipe names passes with options, and the runtime settings of the plan::

    name: mixed-nsep
    passes:
      - profile: {windows: 32, seq_len: 1024}
      - calibrate: {statistic: p999, center_k: true}
      - allocate: {budget_bits: 4.0, candidates: [fp16, nsep-8, nsep-4, nsep-2]}
    runtime: {window: 128, sinks: 4, block: 32}

Passes talk only through the context. A malformed recipe is rejected with the line that is wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from kvcompile.errors import KVCompileError
from kvcompile.kvparams import KVParams
from kvcompile.plan import Plan


class RecipeError(KVCompileError):
    """A recipe that cannot be parsed or names unknown passes/options."""


# ---------------------------------------------------------------------------------------------- recipes
class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key, for error messages."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = _LineDict(loader.construct_mapping(node, deep=True))
    mapping.lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    mapping.line = node.start_mark.line + 1
    return mapping


class _LineDict(dict):  # type: ignore[type-arg]
    lines: dict[str, int]
    line: int


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass
class PassSpec:
    """One pass of a recipe: its name, options and the recipe line it came from."""

    name: str
    options: dict[str, Any]
    line: int = 0


@dataclass
class Recipe:
    """A parsed, validated recipe."""

    name: str
    passes: list[PassSpec]
    runtime: dict[str, Any]
    description: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "passes": [{p.name: dict(p.options)} for p in self.passes], "runtime": dict(self.runtime)}


RUNTIME_KEYS = {"window": int, "sinks": int, "block": int}


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with kvcompile."""
    return sorted(p.name[:-5] for p in resources.files("kvcompile.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(ref: str) -> Recipe:
    """Load a built-in recipe by name, or a recipe file by path. Raises :class:`RecipeError` with the bad line."""
    path = Path(ref)
    if ref.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {ref} does not exist")
        text, where = path.read_text(), str(path)
    else:
        res = resources.files("kvcompile.recipes") / f"{ref}.yaml"
        if not res.is_file():
            raise RecipeError(f"unknown recipe {ref!r}; built-in recipes: {', '.join(builtin_recipes())}, "
                              "or pass a path to a .yaml file")
        text, where = res.read_text(), f"recipe {ref}"
    return parse_recipe(text, where)


def parse_recipe(text: str, where: str = "recipe") -> Recipe:
    """Parse and validate recipe YAML text."""
    try:
        doc = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise RecipeError(f"{where}, line {line}: invalid YAML ({e.problem})") from e
    if not isinstance(doc, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with keys name, passes, runtime")

    def fail(key: str, msg: str, d: Any = doc) -> RecipeError:
        line = getattr(d, "lines", {}).get(key, getattr(d, "line", 0))
        return RecipeError(f"{where}, line {line}: {msg}")

    unknown = set(doc) - {"name", "description", "passes", "runtime"}
    if unknown:
        k = sorted(unknown)[0]
        raise fail(k, f"unknown key {k!r} (expected name, description, passes, runtime)")
    name = doc.get("name", Path(where).stem)
    passes_doc = doc.get("passes")
    if not isinstance(passes_doc, list) or not passes_doc:
        raise fail("passes", "'passes' must be a non-empty list of {pass_name: {options}}")
    passes: list[PassSpec] = []
    for item in passes_doc:
        line = getattr(item, "line", doc.lines.get("passes", 0))
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"{where}, line {line}: each pass is one mapping {{name: {{options}}}}")
        (pname, opts), = item.items()
        opts = opts or {}
        if pname not in PASSES:
            raise RecipeError(f"{where}, line {line}: unknown pass {pname!r}; passes: {', '.join(sorted(PASSES))}")
        if not isinstance(opts, dict):
            raise RecipeError(f"{where}, line {line}: options of pass {pname!r} must be a mapping")
        allowed = PASSES[pname].options
        for k, v in opts.items():
            if k not in allowed:
                raise RecipeError(f"{where}, line {getattr(opts, 'lines', {}).get(k, line)}: pass {pname!r} has no "
                                  f"option {k!r}; options: {', '.join(sorted(allowed))}")
            if not _type_ok(v, allowed[k]):
                raise RecipeError(f"{where}, line {getattr(opts, 'lines', {}).get(k, line)}: option {pname}.{k} "
                                  f"must be {allowed[k].__name__}, got {v!r}")
        passes.append(PassSpec(pname, dict(opts), line))
    runtime = doc.get("runtime") or {}
    if not isinstance(runtime, dict):
        raise fail("runtime", "'runtime' must be a mapping with window, sinks, block")
    for k, v in runtime.items():
        if k not in RUNTIME_KEYS:
            raise fail(k, f"unknown runtime key {k!r} (expected {', '.join(RUNTIME_KEYS)})", runtime)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise fail(k, f"runtime.{k} must be a non-negative integer, got {v!r}", runtime)
    if not any(p.name in ("allocate", "uniform") for p in passes):
        raise fail("passes", "a recipe needs an 'allocate' or 'uniform' pass to produce a plan")
    return Recipe(str(name), passes, dict(runtime), str(doc.get("description", "")), text)


def _type_ok(value: Any, typ: type) -> bool:
    if typ is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typ is list:
        return isinstance(value, list)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


# ---------------------------------------------------------------------------------------------- context
@dataclass
class CompileContext:
    """Everything the passes share: the model, the calibration data, what each pass produced."""

    model_ref: str
    model: Any = None
    tokenizer: Any = None
    resolved: Any = None
    calib: str = "austen"
    #: token windows to calibrate on instead of reading ``calib`` (benchmarks on random-weight models)
    calib_ids: Any = None
    device: str = "cpu"
    overrides: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, int] = field(default_factory=dict)
    profile: Any = None
    params: KVParams = field(default_factory=KVParams)
    plan: Plan | None = None
    centering: dict[str, bool] = field(default_factory=lambda: {"k": False, "v": False})
    model_changed: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    console: Console = field(default_factory=lambda: Console(stderr=True))

    def option(self, opts: dict[str, Any], key: str, default: Any) -> Any:
        """A pass option, where a command-line override (same key) wins over the recipe."""
        if self.overrides.get(key) is not None:
            return self.overrides[key]
        return opts.get(key, default)


@dataclass
class PassInfo:
    fn: Callable[..., None]
    options: dict[str, type]


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, **options: type) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: make ``fn(ctx, **options)`` available to recipes as ``name``."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        PASSES[name] = PassInfo(fn, options)
        return fn

    return deco


def run_recipe(recipe: Recipe, ctx: CompileContext) -> CompileContext:
    """Run the recipe's passes in order over ``ctx``, timing each."""
    ctx.runtime = {"window": 128, "sinks": 0, "block": 32, **recipe.runtime}
    for key in ("window", "sinks"):
        if ctx.overrides.get(key) is not None:
            ctx.runtime[key] = int(ctx.overrides[key])
    for spec in recipe.passes:
        t0 = time.perf_counter()
        ctx.console.log(f"[bold]pass[/bold] {spec.name} {spec.options or ''}")
        PASSES[spec.name].fn(ctx, **spec.options)
        ctx.timings[spec.name] = round(time.perf_counter() - t0, 2)
    if ctx.plan is None:
        raise RecipeError(f"recipe {recipe.name} produced no plan")
    return ctx


# Importing the pass modules registers them (they import register_pass from here).
from kvcompile.passes import smooth as _smooth  # noqa: E402,F401  (the optional smoothing/clipping passes)
from kvcompile.passes import stages as _stages  # noqa: E402,F401

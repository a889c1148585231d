"""The quality table of RESULTS.md: perplexity and needle retrieval of every recipe on the zoo models, in one run.

For each model (``--models``) and recipe (fp16, naive-int4, kivi-int4, kivi-int2, nsep-int4, mixed-nsep,
mixed-nsep-2bit, plus any ``--recipes``): average stored bits, bytes per token, perplexity and its delta against fp16
(runtime protocol: windows of ``--ctx`` tokens fed through the packed cache ``--chunk`` tokens at a time, the same
eval windows for every row) and needle accuracy (the runtime through ``generate``). Recipes calibrate on the
``calib`` split of ``--calib``; everything is measured on the ``eval`` split of ``--data`` (for the offline corpora the
two splits are different books / plays, so calibration and evaluation text are disjoint).

Feasible on a small CPU: each model is loaded once and every recipe is compiled in memory onto it (lowering only swaps
the plan; a recipe whose passes change weights gets a fresh copy of the model afterwards), recipes that profile with
the same settings share one profile (kept on disk beside the results, so an interrupted run does not profile again),
and the fp16 baseline (perplexity and needle answers) is measured once per model. The all-fp16 row is that baseline:
an all-fp16 plan runs the unmodified attention, so measuring it again would repeat the same computation.

Resumable: results accumulate in ``--results`` (JSON, written atomically after every (model, recipe) cell); cells
already there are skipped. The settings that change numbers are stored with them; rerunning with different ones is
refused unless ``--fresh`` (start over) or another ``--results`` file is given. At the end (and after every cell) the
markdown table, with the exact command line, date, versions and timings, is written to ``--out``.

Examples::

    python benchmarks/quality.py                                   # all three models, defaults (hours on a CPU)
    python benchmarks/quality.py --models smollm2-135m --eval-windows 1 --ctx 1024 --profile-windows 4 \\
        --seq-len 512 --needle-lengths 512 --needle-depths 0.25,0.75 --results /tmp/q.json --out /tmp/q.md
    python benchmarks/quality.py --profile-windows qwen2.5-1.5b=8 --seq-len qwen2.5-1.5b=1024
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from kvcompile.errors import KVCompileError  # noqa: E402
from kvcompile.eval import evaluate_model, write_json_atomic  # noqa: E402

MODELS = ("smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b")
RECIPES = ("fp16", "naive-int4", "kivi-int4", "kivi-int2", "nsep-int4", "mixed-nsep", "mixed-nsep-2bit")
RESULTS_VERSION = 1


# ---------------------------------------------------------------------------------------------- options
def _per_model(values: list[str] | None, what: str) -> dict[str, int]:
    """``["8", "qwen2.5-1.5b=4"]`` -> ``{"*": 8, "qwen2.5-1.5b": 4}`` (a bare number applies to every model)."""
    out: dict[str, int] = {}
    for v in values or []:
        model, _, num = v.rpartition("=")
        try:
            out[model or "*"] = int(num)
        except ValueError:
            raise SystemExit(f"--{what} takes N or MODEL=N, got {v!r}") from None
    return out


def _csv(text: str, cast: Any) -> list[Any]:
    return [cast(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model references (default: %(default)s)")
    p.add_argument("--recipes", default="", help="extra recipes (names or .yaml paths) appended to the standard rows")
    p.add_argument("--only", default="", help="run only these recipes (comma-separated) instead of the standard rows")
    p.add_argument("--data", default="austen", help="evaluation text; its eval split is used (default: %(default)s)")
    p.add_argument("--calib", default="austen", help="calibration text; its calib split is used (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=2048, help="perplexity window length in tokens (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=128, help="tokens per forward step (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=4, help="perplexity windows of --ctx tokens (default: 4)")
    p.add_argument("--profile-windows", action="append", metavar="[MODEL=]N",
                   help="override the recipes' profile windows (repeatable; MODEL=N for one model)")
    p.add_argument("--seq-len", action="append", metavar="[MODEL=]N",
                   help="override the recipes' profile window length (repeatable; MODEL=N for one model)")
    p.add_argument("--needle-lengths", default="1024,2048", help="haystack lengths in tokens (default: %(default)s)")
    p.add_argument("--needle-depths", default="0.1,0.3,0.5,0.7,0.9",
                   help="single-needle depths, one haystack each per length (default: %(default)s)")
    p.add_argument("--needle-multi", type=int, default=1, help="multi-needle haystacks per length (default: 1)")
    p.add_argument("--needle-count", type=int, default=3, help="needles per multi-needle haystack (default: 3)")
    p.add_argument("--no-needle", action="store_true", help="skip the needle task")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 by default because on a CPU shared with other jobs every OpenMP barrier "
                        "waits for a descheduled thread (a 135M forward measured 10x slower on 2 threads than on 1 "
                        "on a loaded 2-core machine); 0 keeps torch's default")
    p.add_argument("--results", type=Path, default=Path("benchmarks/quality.json"),
                   help="JSON file the results accumulate in (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/quality.md"),
                   help="markdown file the table is written to (default: %(default)s)")
    p.add_argument("--fresh", action="store_true",
                   help="discard results already in --results and the profiles cached beside it")
    args = p.parse_args(argv)
    args.model_list = _csv(args.models, str)
    only = _csv(args.only, str)
    args.recipe_list = list(dict.fromkeys(only or [*RECIPES, *_csv(args.recipes, str)]))
    args.profile_windows_map = _per_model(args.profile_windows, "profile-windows")
    args.seq_len_map = _per_model(args.seq_len, "seq-len")
    args.needle = None if args.no_needle else {
        "lengths": _csv(args.needle_lengths, int), "depths": _csv(args.needle_depths, float),
        "multi_haystacks": args.needle_multi, "multi_needles": args.needle_count}
    return args


def model_settings(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Everything that changes one model's numbers; a stored cell is reused only when these match."""
    pick = lambda m: m.get(model, m.get("*"))  # noqa: E731
    return {"data": args.data, "calib": args.calib, "ctx": args.ctx, "chunk": args.chunk,
            "eval_windows": args.eval_windows, "profile_windows": pick(args.profile_windows_map),
            "seq_len": pick(args.seq_len_map), "needle": args.needle, "device_type": args.device.split(":")[0]}


# ---------------------------------------------------------------------------------------------- results file
def load_results(path: Path, fresh: bool) -> dict[str, Any]:
    if fresh or not path.is_file():
        return {"version": RESULTS_VERSION, "models": {}, "runs": []}
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KVCompileError(f"{path} is not valid JSON ({e}); pass --fresh or another --results file") from e
    if res.get("version") != RESULTS_VERSION:
        raise KVCompileError(f"{path} was written by another version of this script; pass --fresh")
    return res


def model_entry(results: dict[str, Any], model: str, settings: dict[str, Any]) -> dict[str, Any]:
    entry = results["models"].setdefault(model, {"settings": settings, "baseline": {}, "cells": {}})
    if entry["settings"] != settings:
        diff = sorted(k for k in settings if entry["settings"].get(k) != settings[k])
        raise KVCompileError(f"{model}: results in this file were measured with other settings ({', '.join(diff)}); "
                             "pass --fresh to start over or use another --results file")
    return entry


# ---------------------------------------------------------------------------------------------- compile
class ModelHolder:
    """One loaded model per model reference, reloaded only after a recipe changed its weights."""

    def __init__(self, ref: str, device: str) -> None:
        from kvcompile.models import resolve_model

        self.ref, self.device = ref, device
        self.resolved = resolve_model(ref)
        self.model: Any = None
        self.tokenizer: Any = None
        self.load_seconds = 0.0

    def get(self) -> tuple[Any, Any]:
        if self.model is None:
            from kvcompile.models import load_model

            t0 = time.perf_counter()
            self.model, self.tokenizer = load_model(self.resolved, device=self.device)
            self.load_seconds += time.perf_counter() - t0
        return self.model, self.tokenizer

    def fp16_model(self) -> tuple[Any, Any]:
        """The model, unmodified, lowered onto an all-fp16 plan (the evaluators need a lowered model; fp16 runs the
        model's own attention)."""
        from kvcompile.formats import FP16
        from kvcompile.kvparams import KVParams
        from kvcompile.passes.lower import lower
        from kvcompile.plan import ModelShape, Plan

        model, tok = self.get()
        lower(model, Plan.uniform(ModelShape.from_config(model.config), FP16, FP16), KVParams())
        return model, tok

    def discard(self) -> None:
        self.model = None
        gc.collect()


def _profile_key(ref: str, recipe: Any, settings: dict[str, Any], calib: str) -> str | None:
    """Cache key of a recipe's profile pass, or None when it cannot be shared (not the first pass)."""
    if not recipe.passes or recipe.passes[0].name != "profile":
        return None  # a pass before it may change the model: the profile would not be the plain model's
    opts = dict(recipe.passes[0].options)
    for key in ("windows", "seq_len"):
        if settings.get("profile_windows" if key == "windows" else key) is not None:
            opts[key] = settings["profile_windows" if key == "windows" else key]
    blob = json.dumps({"model": ref, "calib": calib, "options": opts, "window": recipe.runtime.get("window"),
                       "sinks": recipe.runtime.get("sinks")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def compile_on(holder: ModelHolder, recipe_ref: str, settings: dict[str, Any], profile_dir: Path) -> tuple[Any, Any]:
    """Run a recipe's passes on the held model and lower it; returns (context, recipe)."""
    from kvcompile.passes.lower import lower
    from kvcompile.passes.profile import Profile
    from kvcompile.pipeline import CompileContext, Recipe, load_recipe, run_recipe

    rec = load_recipe(recipe_ref)
    model, tok = holder.get()
    ctx = CompileContext(holder.ref, model=model, tokenizer=tok, resolved=holder.resolved, calib=settings["calib"],
                         device=holder.device, overrides={"windows": settings["profile_windows"],
                                                          "seq_len": settings["seq_len"]})
    key = _profile_key(holder.ref, rec, settings, settings["calib"])
    cached = profile_dir / key if key else None
    run = rec
    if cached is not None and (cached / "profile.json").is_file():
        ctx.profile = Profile.load(cached)
        ctx.timings["profile"] = 0.0  # shared with an earlier recipe
        run = Recipe(rec.name, rec.passes[1:], rec.runtime, rec.description, rec.source)
    run_recipe(run, ctx)
    if cached is not None and run is rec and ctx.profile is not None:
        ctx.profile.save(cached)
    assert ctx.plan is not None
    ctx.plan.meta.update({"recipe": rec.name})
    lower(ctx.model, ctx.plan, ctx.params.to(ctx.model.device))
    return ctx, rec


# ---------------------------------------------------------------------------------------------- measuring
def ensure_baseline(entry: dict[str, Any], model: Any, tok: Any, settings: dict[str, Any], save: Any) -> None:
    """fp16 perplexity and needle answers of this model, measured once per model on the unmodified weights."""
    base = entry["baseline"]
    common = dict(data=settings["data"], ctx=settings["ctx"], chunk=settings["chunk"])
    if "ppl" not in base:
        t0 = time.perf_counter()
        r = evaluate_model(model, tok, "ppl", max_tokens=settings["eval_windows"] * settings["ctx"], fp16_only=True,
                           **common)
        base["ppl"] = r["baseline"]
        base["ppl_seconds"] = round(time.perf_counter() - t0, 1)
        save()
    if settings["needle"] is not None and "needle" not in base:
        t0 = time.perf_counter()
        r = evaluate_model(model, tok, "needle", fp16_only=True, needle_options=settings["needle"], **common)
        base["needle"] = r["baseline"]
        base["needle_details"] = {"by_length": {k: v["fp16"] for k, v in r["details"]["by_length"].items()},
                                  "questions": r["details"]["questions"], "correct": r["details"]["fp16_correct"]}
        base["needle_seconds"] = round(time.perf_counter() - t0, 1)
        save()


def measure_cell(ctx: Any, rec: Any, entry: dict[str, Any], settings: dict[str, Any],
                 compile_seconds: float) -> dict[str, Any]:
    from kvcompile.formats import FP16

    plan, model, tok = ctx.plan, ctx.model, ctx.tokenizer
    base = entry["baseline"]
    cell: dict[str, Any] = {"recipe": rec.name, "avg_bits": round(plan.avg_bits(), 4),
                            "bytes_per_token": plan.bytes_per_token(),
                            "fp16_bytes_per_token": plan.fp16_bytes_per_token(),
                            "window": plan.window, "sinks": plan.sinks, "k_center": plan.k_center,
                            "timings": {"compile_s": round(compile_seconds, 1), "passes": dict(ctx.timings)}}
    common = dict(data=settings["data"], ctx=settings["ctx"], chunk=settings["chunk"])
    all_fp16 = plan.formats() == {FP16}
    t0 = time.perf_counter()
    if all_fp16:
        ppl_q = base["ppl"]["ppl"]
    else:
        r = evaluate_model(model, tok, "ppl", max_tokens=settings["eval_windows"] * settings["ctx"],
                           baseline=base["ppl"], **common)
        ppl_q = r["quantized"]
    cell.update({"ppl": ppl_q, "ppl_fp16": base["ppl"]["ppl"], "delta_ppl": ppl_q - base["ppl"]["ppl"],
                 "ppl_tokens": base["ppl"]["n_tokens"], "from_baseline": all_fp16})
    cell["timings"]["ppl_s"] = round(time.perf_counter() - t0, 1)
    if settings["needle"] is not None:
        t0 = time.perf_counter()
        if all_fp16:
            nd = base["needle_details"]
            cell.update({"needle": base["needle"]["accuracy"], "needle_correct": nd["correct"],
                         "needle_questions": nd["questions"], "needle_by_length": nd["by_length"],
                         "needle_missed": []})
        else:
            r = evaluate_model(model, tok, "needle", baseline=base["needle"], needle_options=settings["needle"],
                               **common)
            d = r["details"]
            cell.update({"needle": r["quantized"], "needle_correct": d["quantized_correct"],
                         "needle_questions": d["questions"],
                         "needle_by_length": {k: v["quantized"] for k, v in d["by_length"].items()},
                         "needle_missed": d["missed"], "needle_gained": d["gained"]})
        cell["timings"]["needle_s"] = round(time.perf_counter() - t0, 1)
    return cell


# ---------------------------------------------------------------------------------------------- report
def versions() -> dict[str, str]:
    import transformers

    import kvcompile

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "kvcompile": kvcompile.__version__, "platform": platform.platform()}
    try:
        import subprocess

        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        out["git"] = "?"
    return out


def hardware(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {torch.get_num_threads()} " \
           "torch threads"


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(results: dict[str, Any], models: list[str], recipes: list[str]) -> str:
    run = results["runs"][-1] if results["runs"] else {}
    earlier = [r["command"] for r in results["runs"][:-1]]
    lines = ["# kvcompile quality table", "",
             f"Command: `{run.get('command', '?')}`  ",
             *([f"Resumed from earlier runs: {'; '.join(f'`{c}`' for c in earlier)}  "] if earlier else []),
             f"Date: {run.get('date', '?')}  ",
             f"Versions: {', '.join(f'{k} {v}' for k, v in run.get('versions', {}).items())}  ",
             f"Hardware: {run.get('hardware', '?')}  ",
             f"Wall time: {sum(r.get('seconds', 0) for r in results['runs']):.0f} s over {len(results['runs'])} "
             "run(s)" + ("" if "seconds" in run else " (this run in progress)"), ""]
    for model in models:
        entry = results["models"].get(model)
        if not entry:
            continue
        s = entry["settings"]
        nd = s["needle"]
        lines += [f"## {model}", "",
                  f"Perplexity: runtime protocol, windows: {s['eval_windows']} x {s['ctx']} tokens of the "
                  f"`{s['data']}` eval split fed {s['chunk']} tokens at a time (tokens beyond the fp16 window attend "
                  f"to the packed quantized past); calibration on the `{s['calib']}` calib split"
                  + (f" (profile overridden: {s['profile_windows'] or 'recipe'} windows x "
                     f"{s['seq_len'] or 'recipe'} tokens)" if s["profile_windows"] or s["seq_len"] else "") + ".  "]
        if nd:
            lines.append(f"Needle: haystacks of {', '.join(map(str, nd['lengths']))} tokens; per length one "
                         f"single-needle haystack per depth ({', '.join(map(str, nd['depths']))}) and "
                         f"{nd['multi_haystacks']} with {nd['multi_needles']} needles; greedy answers through the "
                         "runtime's generate, exact code match.")
        lines += ["", "| recipe | avg bits | bytes/token | PPL | ΔPPL | needle |", "|---|---:|---:|---:|---:|---:|"]
        for name in recipes:
            c = entry["cells"].get(name)
            if c is None:
                lines.append(f"| {name} | | | (not run) | | |")
                continue
            needle = f"{c['needle_correct']}/{c['needle_questions']}" if "needle" in c else "—"
            delta = "—" if c.get("from_baseline") else f"{c['delta_ppl']:+.3f}"
            lines.append(f"| {name} | {c['avg_bits']:.2f} | {c['bytes_per_token']:,.0f} | {_fmt(c['ppl'], '.3f')} "
                         f"| {delta} | {needle} |")
        lines += ["", "<details><summary>timings and needle misses</summary>", "",
                  f"fp16 baseline: PPL {entry['baseline'].get('ppl_seconds', '?')} s"
                  + (f", needle {entry['baseline'].get('needle_seconds', '?')} s" if nd else ""), ""]
        for name in recipes:
            c = entry["cells"].get(name)
            if c is None:
                continue
            t = c["timings"]
            if c.get("from_baseline"):
                lines.append(f"- {name}: all-fp16 plan, reported from the fp16 baseline")
                continue
            passes = ", ".join(f"{k} {v:.0f} s" for k, v in t.get("passes", {}).items())
            lines.append(f"- {name}: compile {t['compile_s']} s ({passes}); PPL {t.get('ppl_s', '—')} s; "
                         f"needle {t.get('needle_s', '—')} s"
                         + (f"; needles fp16 found but {name} missed: "
                            + ", ".join(f"{m['name']} ({m['length']} tokens, depth {m['depth']:.2f})"
                                        for m in c["needle_missed"])
                            if c.get("needle_missed") else ""))
        lines += ["", "</details>", ""]
    return "\n".join(lines) + "\n"


def _table_rows(results: dict[str, Any], args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Models and recipes of the table: this run's, then any others the results file holds (runs made per model
    with their own settings still land in one table)."""
    models = list(dict.fromkeys([*args.model_list, *results["models"]]))
    stored = [r for m in models for r in results["models"].get(m, {}).get("cells", {})]
    return models, list(dict.fromkeys([*args.recipe_list, *stored]))


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from rich.console import Console

    con = Console(stderr=True)
    results = load_results(args.results, args.fresh)
    for model_ref in args.model_list:  # refuse mismatched settings before anything is written
        model_entry(results, model_ref, model_settings(args, model_ref))
    results["runs"].append({"command": shlex.join([Path(sys.executable).name, *sys.argv]),
                            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "versions": versions(),
                            "hardware": hardware(args.device)})
    profile_dir = args.results.with_suffix(".profiles")
    if args.fresh and profile_dir.is_dir():
        import shutil

        shutil.rmtree(profile_dir)  # this script's own cache: a fresh start profiles again too

    def save() -> None:
        write_json_atomic(args.results, results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(results, *_table_rows(results, args)))

    save()
    total = len(args.model_list) * len(args.recipe_list)
    done, worked = 0, False
    t_start = time.perf_counter()
    for model_ref in args.model_list:
        settings = model_settings(args, model_ref)
        entry = model_entry(results, model_ref, settings)
        todo = [r for r in args.recipe_list if r not in entry["cells"]]
        done += len(args.recipe_list) - len(todo)
        if not todo:
            continue
        holder = ModelHolder(model_ref, args.device)
        worked = True
        if "ppl" not in entry["baseline"] or (settings["needle"] is not None and "needle" not in entry["baseline"]):
            con.rule(f"{model_ref}: fp16 baseline")
            ensure_baseline(entry, *holder.fp16_model(), settings, save)
        for recipe in todo:
            done += 1
            con.rule(f"[{done}/{total}] {model_ref} / {recipe}")
            t0 = time.perf_counter()
            ctx, rec = compile_on(holder, recipe, settings, profile_dir / model_ref)
            compile_s = time.perf_counter() - t0
            cell = measure_cell(ctx, rec, entry, settings, compile_s)
            entry["cells"][recipe] = cell
            save()
            con.log(f"{model_ref} / {rec.name}: {cell['avg_bits']:.2f} bits, PPL {cell['ppl']:.3f} "
                    f"({cell['delta_ppl']:+.3f})" + (f", needle {cell['needle_correct']}/{cell['needle_questions']}"
                                                    if "needle" in cell else ""))
            if ctx.model_changed:  # a pass folded something into the weights: the next recipe needs a clean model
                holder.discard()
            del ctx
        entry.setdefault("load_seconds", round(holder.load_seconds, 1))
        holder.discard()
    if worked:
        results["runs"][-1]["seconds"] = round(time.perf_counter() - t_start, 1)
    else:  # everything was already measured: this invocation only printed the table, so it is not a run
        results["runs"].pop()
    save()
    print(markdown(results, *_table_rows(results, args)))
    con.log(f"wrote {args.results} and {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KVCompileError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

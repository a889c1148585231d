"""The ``kvcompile`` command line: a thin click layer over kvcompile.api.

User errors end here in one place: a KVCompileError (or a missing file / bad value from the user's input) prints
``error: <message>`` on one line of stderr and exits 1; a feature not built yet exits 2. ``--debug`` re-raises
instead, with the traceback.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from kvcompile import __version__
from kvcompile.errors import KVCompileError

DEVICES = click.Choice(["cpu", "cuda", "auto"])
_DEVICE_HELP = "cpu, cuda, or auto (spread over the visible GPUs with CPU offload; CPU when there is none)."
_MODEL_HELP = "MODEL is a HuggingFace model folder, a zoo name (see `kvcompile models`) or a hub id org/name[@rev]."
_TEXT_HELP = "an offline corpus (austen, shakespeare), a .txt/.jsonl/.parquet file or folder, or hf:name[:config]"


def _shipped_recipes() -> str:
    folder = resources.files("kvcompile").joinpath("recipes")
    names = sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))
    return ", ".join(names) or "none"


_RECIPE_HELP = f"recipe: one shipped with kvcompile ({_shipped_recipes()}) or a path to a YAML file"

stdout = Console()


def _one_line(message: object) -> str:
    return " ".join(str(message).split()) or "unknown error"


class _Group(click.Group):
    """A click group that turns user errors into one line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KVCompileError, NotImplementedError, FileNotFoundError, ValueError) as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {_message(exc)}", err=True)
            ctx.exit(2 if isinstance(exc, NotImplementedError) else 1)


def _message(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        # "No such file or directory: x" reads better than the default "[Errno 2] ..." rendering.
        return f"{exc.strerror or 'no such file'}: {exc.filename}"
    return _one_line(exc)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="kvcompile")
def main(debug: bool) -> None:
    """kvcompile: calibrate, plan and lower a quantized KV cache for HuggingFace causal LMs."""


def _check_model(ref: str) -> None:
    # Cheap validation first, so a typo fails in a second instead of after loading text or downloading a model.
    from kvcompile.models import check_model_ref

    check_model_ref(ref)


def _check_text(source: str) -> None:
    from kvcompile.data import check_source

    check_source(source)


@main.command("models")
def models_cmd() -> None:
    """List the offline model zoo: real pretrained models fetched from PyPI on first use."""
    from kvcompile.models import list_zoo

    table = Table(title="kvcompile model zoo")
    for column in ("name", "what it is", "params", "download", "on disk", "cached"):
        table.add_column(column)
    for row in list_zoo():
        table.add_row(
            row["name"], row["description"], row["params"], _size(row["download_bytes"]),
            _size(row["size_on_disk"]) if row["cached"] else "-", "yes" if row["cached"] else "no",
        )
    stdout.print(table)


@main.command("profile", epilog=_MODEL_HELP)
@click.argument("model")
@click.option("--calib", required=True, help=f"Calibration text: {_TEXT_HELP}.")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Profile folder to write.")
@click.option("--windows", default=32, show_default=True, type=click.IntRange(min=1), help="Calibration windows.")
@click.option("--seq-len", default=1024, show_default=True, type=click.IntRange(min=1), help="Tokens per window.")
@click.option("--device", default="cpu", show_default=True, type=DEVICES, help=_DEVICE_HELP)
def profile_cmd(model: str, calib: str, out: Path, windows: int, seq_len: int, device: str) -> None:
    """Profile what breaks KV quantization on MODEL over calibration text; write the profile to OUT."""
    _check_model(model)
    _check_text(calib)
    from kvcompile import api

    path = api.profile(model, calib, out, windows=windows, seq_len=seq_len, device=device)
    stdout.print(f"profile written to {path}")


@main.command("build", epilog=_MODEL_HELP)
@click.argument("model")
@click.option("--recipe", default="mixed-nsep", show_default=True, help=f"Compilation {_RECIPE_HELP}.")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--budget-bits", type=click.FloatRange(min=0, min_open=True),
              help="Average bits per K/V element the plan may spend (default: the recipe's).")
@click.option("--window", type=click.IntRange(min=0), help="Recent tokens kept in fp16 (default: the recipe's).")
@click.option("--sinks", type=click.IntRange(min=0), help="Initial sink tokens kept in fp16 (default: the recipe's).")
@click.option("--calib", default="austen", show_default=True, help=f"Calibration text: {_TEXT_HELP}.")
@click.option("--windows", type=click.IntRange(min=1), help="Calibration windows (default: the recipe's).")
@click.option("--seq-len", type=click.IntRange(min=1), help="Tokens per calibration window (default: the recipe's).")
@click.option("--device", default="cpu", show_default=True, type=DEVICES, help=_DEVICE_HELP)
def build_cmd(model: str, recipe: str, out: Path, budget_bits: float | None, window: int | None, sinks: int | None,
              calib: str, windows: int | None, seq_len: int | None, device: str) -> None:
    """Compile MODEL with a recipe into an artifact folder OUT (plan, KV parameters, report)."""
    _check_model(model)
    _check_text(calib)
    from kvcompile import api

    path = api.build(model, out, recipe=recipe, budget_bits=budget_bits, window=window, sinks=sinks, calib=calib,
                     windows=windows, seq_len=seq_len, device=device)
    stdout.print(f"artifact written to {path}")


@main.command("eval", epilog=f"TARGET is an artifact folder or a model. {_MODEL_HELP}")
@click.argument("target")
@click.option("--task", required=True, type=click.Choice(["ppl", "needle", "fidelity"]),
              help="ppl: perplexity; needle: retrieval of a planted fact; fidelity: per-layer attention cosine.")
@click.option("--recipe", help=f"For a model TARGET, the {_RECIPE_HELP} (default: no quantization).")
@click.option("--data", default="austen", show_default=True,
              help=f"Evaluation text (its eval split): {_TEXT_HELP}.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Evaluate at most this many tokens (default: all).")
@click.option("--ctx", default=2048, show_default=True, type=click.IntRange(min=1), help="Context length.")
@click.option("--chunk", default=128, show_default=True, type=click.IntRange(min=1),
              help="Tokens fed per forward step, so that later tokens attend to the quantized past.")
@click.option("--protocol", default="runtime", show_default=True, type=click.Choice(["runtime", "simulated"]),
              help="runtime: through the packed cache; simulated: fake-quantized K/V in a plain model.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the result as JSON here.")
@click.option("--device", default="cpu", show_default=True, type=DEVICES, help=_DEVICE_HELP)
def eval_cmd(target: str, task: str, recipe: str | None, data: str, max_tokens: int | None, ctx: int, chunk: int,
             protocol: str, json_path: Path | None, device: str) -> None:
    """Evaluate TARGET (an artifact, or a model with --recipe) on a quality task and print the result."""
    if not (Path(target) / "kvcompile.json").is_file():
        _check_model(target)
    _check_text(data)
    from kvcompile import api

    result = api.evaluate(target, task, recipe=recipe, data=data, max_tokens=max_tokens, ctx=ctx, chunk=chunk,
                          protocol=protocol, json_path=json_path, device=device)
    stdout.print(result_table(result, title=f"{task} on {target}"))


@main.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
def inspect_cmd(artifact: Path) -> None:
    """Print an artifact's plan: per-layer formats, average bits and bytes per token against fp16."""
    from kvcompile import api

    api.inspect(artifact)


@main.command("export-onnx")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Folder for the ONNX model.")
def export_onnx_cmd(artifact: Path, out: Path) -> None:
    """Export ARTIFACT as an ONNX decoder-with-past over the packed KV cache."""
    from kvcompile import api

    path = api.export_onnx(artifact, out)
    stdout.print(f"ONNX model written to {path}")


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        rows = []
        for key, item in value.items():
            rows.extend(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    return [(prefix, value)]


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        if len(value) > 8:
            return f"[{', '.join(_format(v) for v in value[:8])}, ... ({len(value)} items)]"
        return f"[{', '.join(_format(v) for v in value)}]"
    return str(value)


def result_table(result: dict[str, Any], title: str | None = None) -> Table:
    """A two-column rich table of a (possibly nested) result dict; nested keys are joined with dots."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in _flatten(result):
        table.add_row(key, _format(value))
    return table


def _size(n_bytes: int) -> str:
    if n_bytes < 1000:
        return f"{n_bytes} B"
    exponent = min(int(math.log10(n_bytes) // 3), 3)
    return f"{n_bytes / 1000 ** exponent:.1f} {('kB', 'MB', 'GB')[exponent - 1]}"

"""Human-readable output of a profile: ``report.md``, plots (matplotlib, Agg) and a rich summary table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvcompile.passes.profile import Profile

#: the formats the report ranks K sensitivity by (the core format and the naive baseline, at 4 bits)
REPORT_FORMATS: tuple[str, ...] = ("nsep-4", "int-token-4")
TOP_N = 5

PLOT_OUTLIERS = "outliers.png"
PLOT_SENSITIVITY = "sensitivity.png"
PLOT_NORMS = "norms.png"


# ---------------------------------------------------------------------------------------------- helpers
def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if not math.isfinite(x):
        return "inf"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"


def _matrix(profile: Profile, role: str, key: str) -> list[list[float] | None]:
    """Per-layer list of per-head values of ``key`` (None for layers not captured)."""
    out: list[list[float] | None] = []
    for entry in profile.layers:
        r = entry.get(role)
        out.append([float(h[key]) if h[key] is not None else math.nan for h in r["heads"]] if r else None)
    return out


def _four_bit_formats(profile: Profile) -> list[str]:
    from kvcompile.formats import KVFormat

    out = []
    for name in profile.sensitivity.get("formats", []):
        base = name[:-1] if name.startswith("nsep-") and name.endswith("c") else name
        try:
            if KVFormat.parse(base).bits == 4:
                out.append(name)
        except ValueError:
            continue
    return out


def _ranked(matrix: list[list[float] | None], n: int) -> list[tuple[int, int, float]]:
    """Top ``n`` (layer, head, value) by value, NaN and missing layers skipped."""
    cells = [(i, h, x) for i, row in enumerate(matrix) if row for h, x in enumerate(row)
             if x is not None and not (isinstance(x, float) and math.isnan(x))]
    cells.sort(key=lambda c: -c[2])
    return cells[:n]


# ---------------------------------------------------------------------------------------------- markdown
def render_markdown(profile: Profile) -> str:
    """The report: what breaks KV quantization on this model."""
    from kvcompile.passes.profile import OUTLIER_FACTOR, norm_disparity

    s, st = profile.shape, profile.settings
    name = profile.model.get("name_or_path") or profile.model.get("class", "model")
    lines = [
        f"# KV profile: {name}",
        "",
        f"{s.num_layers} layers, {s.num_q_heads} query heads, {s.num_kv_heads} KV heads, head_dim {s.head_dim}"
        + (f", sliding-window layers {[i for i, x in enumerate(s.sliding) if x]}" if any(s.sliding) else "") + ".",
        f"Calibration: {st['stats_windows']} statistics windows + {st['holdout_windows']} held out, "
        f"{st['seq_len']} tokens each; runtime window {st['window']}, sinks {st['sinks']}. "
        f"Profiled in {profile.timings.get('total_s', float('nan')):.1f} s.",
        "",
        "## Outlier channels",
        "",
        f"Ratio = max channel absmax / median channel absmax of a (layer, KV head); outlier channels exceed "
        f"{OUTLIER_FACTOR:g}x the median. A large K ratio is what breaks naive per-token quantization.",
        "",
    ]
    for role, label in (("k", "Keys"), ("v", "Values")):
        top = _ranked(_matrix(profile, role, "outlier_ratio"), TOP_N)
        lines += [f"**{label}**", "", "| layer | head | ratio | absmax | outlier channels |", "|---|---|---|---|---|"]
        for i, h, x in top:
            hd = profile.layers[i][role]["heads"][h]
            chans = ", ".join(map(str, hd["outlier_channels"][:12])) or \
                f"none (largest: {', '.join(map(str, hd['top_channels'][:3]))})"
            lines.append(f"| {i} | {h} | {_fmt(x)} | {_fmt(hd['absmax'])} | {chans} |")
        lines.append("")

    lines += ["## Sensitivity", "",
              "Relative MSE of the attention output when one layer's K (or V) of one head is quantized, keys older "
              "than the window quantized (past-only), measured on held-out windows. `nsep-Nc`: nsep of the centred "
              "vectors.", ""]
    for fmt in REPORT_FORMATS:
        if fmt not in profile.sensitivity.get("k", {}):
            continue
        top = _ranked(profile.sens("k", fmt), TOP_N)
        lines += [f"**K at {fmt}: top {TOP_N}**", "", "| layer | head | rel. MSE | cos |", "|---|---|---|---|"]
        cos = profile.sens("k", fmt, "cos")
        for i, h, x in top:
            lines.append(f"| {i} | {h} | {_fmt(x)} | {_fmt(cos[i][h], 5)} |")  # type: ignore[index]
        lines.append("")
    lines += ["**Worst (layer, head) per format**", "", "| format | K rel. MSE (worst) | V rel. MSE (worst) |",
              "|---|---|---|"]
    for fmt in profile.sensitivity.get("formats", []):
        cells = []
        for role in ("k", "v"):
            top = _ranked(profile.sens(role, fmt), 1)
            cells.append(f"{_fmt(top[0][2])} (L{top[0][0]} h{top[0][1]})" if top else "-")
        lines.append(f"| {fmt} | {cells[0]} | {cells[1]} |")
    lines.append("")

    disp = norm_disparity(profile)
    lines += ["## K vs V norm disparity", ""]
    for key, label in (("activation_norm_k_over_v", "mean activation norm ||K|| / ||V||"),
                       ("weight_spectral_k_over_v", "spectral norm of k_proj / v_proj (per-head slices)")):
        d = disp.get(key)
        if d is None:
            lines.append(f"- {label}: not available")
        else:
            lines.append(f"- {label}: median {_fmt(d['median'])} (min {_fmt(d['min'])}, max {_fmt(d['max'])}); "
                         f"K larger in {d['layers_k_larger']} of {d['layers']} layers")
    lines += ["", "## Token-norm variation", "",
              "| role | largest norm max/min over tokens (layer, head) | median over (layer, head) |", "|---|---|---|"]
    for role in ("k", "v"):
        m = _matrix(profile, role, "norm_ratio")
        vals = sorted(x for row in m if row for x in row if math.isfinite(x))
        top = _ranked(m, 1)
        if top and vals:
            lines.append(f"| {role.upper()} | {_fmt(top[0][2])} (L{top[0][0]} h{top[0][1]}) | "
                         f"{_fmt(vals[len(vals) // 2])} |")
    lines += ["", f"![outliers]({PLOT_OUTLIERS})", f"![sensitivity]({PLOT_SENSITIVITY})", f"![norms]({PLOT_NORMS})",
              ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def _array(data: list[list[float] | None], heads: int, log: bool) -> Any:
    import numpy as np

    arr = np.array([[np.nan if x is None else x for x in row] if row else [np.nan] * heads for row in data],
                   dtype=float)
    return np.log10(np.clip(arr, 1e-12, None)) if log else arr


def _heat(ax: Any, data: list[list[float] | None], title: str, heads: int, log: bool,
          sliding: tuple[bool, ...], limits: tuple[float, float] | None = None) -> None:
    arr = _array(data, heads, log)
    vmin, vmax = limits if limits else (None, None)
    im = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap="magma", vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer (* sliding)")
    ax.set_xticks(range(heads))
    n = len(data)
    step = max(1, n // 16)
    ax.set_yticks(range(0, n, step))
    ax.set_yticklabels([f"{i}{'*' if sliding and sliding[i] else ''}" for i in range(0, n, step)], fontsize=7)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def write_plots(profile: Profile, out_dir: str | Path) -> list[Path]:
    """Write the heatmaps and the norm-disparity plot; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    H, sl = profile.shape.num_kv_heads, profile.shape.sliding
    files = []

    fig, axes = plt.subplots(1, 2, figsize=(8, max(3.0, 0.18 * profile.shape.num_layers + 1.5)))
    for ax, role in zip(axes, ("k", "v"), strict=True):
        _heat(ax, _matrix(profile, role, "outlier_ratio"), f"{role.upper()} outlier ratio (max/median)", H, False, sl)
    fig.tight_layout()
    fig.savefig(out / PLOT_OUTLIERS, dpi=110)
    plt.close(fig)
    files.append(out / PLOT_OUTLIERS)

    fmts = _four_bit_formats(profile) or list(profile.sensitivity.get("formats", []))[:1]
    if fmts:
        fig, axes = plt.subplots(2, len(fmts), figsize=(3.6 * len(fmts), 2 * max(3.0, 0.18 * len(profile.layers) + 1)),
                                 squeeze=False)
        import numpy as np

        for r, role in enumerate(("k", "v")):
            # one colour scale per role, so the formats of a row compare at a glance
            arrs = [_array(profile.sens(role, fmt), H, True) for fmt in fmts]
            finite = np.concatenate([a[np.isfinite(a)] for a in arrs])
            limits = (float(finite.min()), float(finite.max())) if finite.size else None
            for c, fmt in enumerate(fmts):
                _heat(axes[r][c], profile.sens(role, fmt), f"{role.upper()} {fmt}: log10 rel. MSE", H, True, sl,
                      limits)
        fig.tight_layout()
        fig.savefig(out / PLOT_SENSITIVITY, dpi=110)
        plt.close(fig)
        files.append(out / PLOT_SENSITIVITY)

    idx = [e["index"] for e in profile.layers if e.get("k") and e.get("v")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for role, color in (("k", "tab:red"), ("v", "tab:blue")):
        axes[0].plot(idx, [profile.layers[i][role]["norm_mean"] for i in idx], "o-", color=color, ms=3,
                     label=role.upper())
        spec = [profile.layers[i][role]["weight_spectral_mean"] for i in idx]
        if all(s is not None for s in spec):
            axes[1].plot(idx, spec, "o-", color=color, ms=3, label=f"{role}_proj")
    axes[0].set_title("mean activation norm per layer (mean over KV heads)", fontsize=9)
    axes[1].set_title("spectral norm of per-head projection slices", fontsize=9)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / PLOT_NORMS, dpi=110)
    plt.close(fig)
    files.append(out / PLOT_NORMS)
    return files


def write_report(profile: Profile, out_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and the plots into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(render_markdown(profile))
    return [out / "report.md", *write_plots(profile, out)]


# ---------------------------------------------------------------------------------------------- console
def print_summary(profile: Profile, console: Any = None) -> None:
    """Per-layer rich table: outlier ratios, norm max/min, 4-bit sensitivity (worst head) and top channels."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    fmts = [f for f in _four_bit_formats(profile) if f in profile.sensitivity.get("k", {})]
    table = Table(title=f"KV profile: {profile.model.get('name_or_path') or profile.model.get('class', '')}",
                  show_lines=False)
    table.add_column("layer", justify="right")
    for col in ("K outlier", "V outlier", "K norm max/min", "V norm max/min"):
        table.add_column(col, justify="right")
    for role in ("K", "V"):
        for f in fmts:
            table.add_column(f"{role} {f}", justify="right")
    table.add_column("top K channels (head: ch)")
    for entry in profile.layers:
        i = entry["index"]
        label = f"{i}{' S' if entry.get('sliding') else ''}"
        k, v = entry.get("k"), entry.get("v")
        if not k or not v:
            table.add_row(label, *["-"] * (4 + 2 * len(fmts)), "not captured")
            continue
        row = [label, _fmt(k["max_outlier_ratio"]), _fmt(v["max_outlier_ratio"]), _fmt(k["max_norm_ratio"]),
               _fmt(v["max_norm_ratio"])]
        for role in ("k", "v"):
            for f in fmts:
                vals = profile.sens(role, f)[i]
                row.append(_fmt(max(vals)) if vals else "-")
        worst = max(range(len(k["heads"])), key=lambda h: k["heads"][h]["outlier_ratio"])
        chans = k["heads"][worst]["outlier_channels"] or k["heads"][worst]["top_channels"][:2]
        row.append(f"{worst}: {', '.join(map(str, chans[:6]))}")
        table.add_row(*row)
    console.print(table)
    console.print(f"4-bit columns: worst relative MSE of the attention output over the layer's KV heads; outlier: "
                  f"max/median channel absmax. Timings: {profile.timings}")

"""Plots and one HTML page for `ember report RUN_DIR [RUN_DIR ...]`, drawn from each run's logs.jsonl.

One PNG per quantity (train/eval loss, learning rate, grad norm, tokens/s, MFU, each other eval
metric), every run overlaid in its own colour, an `overview.png` with all of them, and
`report.html` with the images embedded (base64), so the page displays offline on its own.

matplotlib is optional (`pip install 'ember[report]'`) and used through its object API with the
Agg canvas: no pyplot, no window, no change to the caller's matplotlib backend.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.args.parser import ConfigError
from ember.report.keys import is_eval_metric, is_number

__all__ = ["Panel", "ReportError", "RunLog", "find_runs", "panels_for", "run_names", "write_report"]

MATPLOTLIB_HINT = "pip install matplotlib (or pip install 'ember[report]')"


class ReportError(ConfigError):
    """The report cannot be made (missing input or matplotlib); the message says what to do."""


@dataclass
class RunLog:
    name: str
    records: list[dict[str, Any]]
    summary: str = ""


@dataclass(frozen=True)
class Panel:
    """One plot: the log keys drawn in it, and how."""

    name: str  # file stem
    title: str
    keys: tuple[str, ...]
    ylabel: str = ""
    scale: float = 1.0  # e.g. 100 for MFU in percent
    smooth: bool = False  # noisy per-step quantities: faint raw curve, smoothed curve on top
    labels: tuple[str, ...] = ()


_FIXED_PANELS = (
    Panel("loss", "Loss", ("loss", "eval_loss"), "loss", smooth=True, labels=("train", "eval")),
    Panel("learning_rate", "Learning rate", ("learning_rate",), "learning rate"),
    Panel("grad_norm", "Gradient norm", ("grad_norm",), "norm", smooth=True),
    Panel("tokens_per_second", "Throughput", ("tokens_per_second",), "tokens / s", smooth=True),
    Panel("samples_per_second", "Throughput", ("samples_per_second",), "samples / s", smooth=True),
    Panel("mfu", "Model FLOPs utilisation", ("mfu",), "MFU (%)", scale=100.0, smooth=True),
)
# Per-evaluation numbers that describe speed, not the model.


def find_runs(paths: Sequence[str]) -> list[Path]:
    """The logs behind `paths`: a run folder, a log file itself, or a folder whose subfolders are
    runs (e.g. a hyperparameter search's output_dir with run-0, run-1, ...).

    A run's log is its logs.jsonl (ember's jsonl tracker) or, failing that, the `log_history` of its
    trainer_state.json, which `save_state()` writes on both ember and transformers: so a run made
    with transformers' Trainer can be drawn beside an ember run.
    """
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            found.append(path)
        elif log := _log_of(path):
            found.append(log)
        elif path.is_dir() and (children := _child_logs(path)):
            found.extend(children)
        else:
            raise ReportError(
                f"{path} has no logs.jsonl or trainer_state.json; point to the output_dir of a run "
                "(or a folder of runs)."
            )
    return found


def _log_of(folder: Path) -> Path | None:
    for name in ("logs.jsonl", "trainer_state.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def _child_logs(folder: Path) -> list[Path]:
    logs = [log for child in folder.iterdir() if child.is_dir() and (log := _log_of(child))]
    return sorted(logs, key=_natural)


def _natural(path: Path) -> tuple[Any, ...]:
    # run-10 after run-9
    name = path.parent.name
    stem = name.rstrip("0123456789")
    digits = name[len(stem) :]
    return (str(path.parent.parent), stem, int(digits) if digits else -1, name)


def run_names(logs: Sequence[Path]) -> list[str]:
    """Short, distinct names: each run folder's name, with as many parent folders as needed."""
    parts = [log.resolve().parent.parts for log in logs]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return [str(log.parent) for log in logs]


def default_out_dir(logs: Sequence[Path]) -> Path:
    """RUN_DIR/report for one run; for several, `report` in the folder that holds them all."""
    if len(logs) == 1:
        return logs[0].parent / "report"
    common = Path(os.path.commonpath([str(log.resolve().parent) for log in logs]))
    if common == Path(common.anchor):
        raise ReportError("the runs share no folder to put the report in; pass --out DIR.")
    return common / "report"


def panels_for(runs: Sequence[RunLog]) -> list[Panel]:
    """The fixed panels that some run has data for, then one per other eval metric."""
    keys = {key for run in runs for record in run.records for key, v in record.items() if is_number(v)}
    panels = [p for p in _FIXED_PANELS if any(k in keys for k in p.keys)]
    if "tokens_per_second" in keys:  # tokens/s says it all; samples/s only where there are no tokens
        panels = [p for p in panels if p.name != "samples_per_second"]
    for key in sorted(keys):
        if key != "eval_loss" and is_eval_metric(key):
            title = key.removeprefix("eval_").replace("_", " ").capitalize() + " (eval)"
            panels.append(Panel(key, title, (key,), key))
    return panels


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps: list[float] = []
    values: list[float] = []
    for record in records:
        value: Any = record.get(key)
        # The final summary repeats quantities under other names; only per-step logs are plotted.
        if is_number(value) and is_number(record.get("step")) and "train_runtime" not in record:
            steps.append(float(record["step"]))
            values.append(float(value))
    return steps, values


def smooth(values: Sequence[float]) -> list[float]:
    """Debiased exponential moving average; its weight grows with the number of points, so a
    short curve stays close to the data and a long, noisy one becomes readable."""
    weight = min(0.85, max(0.0, 1.0 - 10.0 / max(len(values), 1)))
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i) if weight else value)
    return out


# ---------------------------------------------------------------------------------------------------------
# Drawing


def _import_matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401  (the object API needs no pyplot)
    except ImportError:
        raise ReportError(
            f"plots need matplotlib: {MATPLOTLIB_HINT}; or pass --no-plots for the text summary only."
        ) from None
    return matplotlib


_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
    "savefig.dpi": 100,
}


def _draw(ax: Any, panel: Panel, runs: Sequence[RunLog], colors: Sequence[Any], run_legend: bool) -> None:
    """Draw `panel` for every run; the legend names the runs (when `run_legend`) by colour and,
    for train + eval panels, the line styles."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    series = []  # (run, colour, key index, steps, values)
    for run, color in zip(runs, colors):
        for i, key in enumerate(panel.keys):
            steps, values = _series(run.records, key)
            if steps:
                series.append((run, color, i, steps, [v * panel.scale for v in values]))
    log = _wants_log_scale(panel, [max(v) for *_, v in series], [x for *_, v in series for x in v])
    styles: dict[str, Any] = {}
    labelled: set[str] = set()
    for run, color, i, steps, values in series:
        if log:  # a log axis cannot show 0 (a learning rate decayed to 0): leave those points out
            steps, values = [s for s, v in zip(steps, values) if v > 0], [v for v in values if v > 0]
        label = run.name if run_legend and run.name not in labelled else None
        labelled.add(run.name)
        is_eval = panel.keys[i].startswith("eval_")
        if panel.labels:
            styles[panel.labels[i]] = "--" if is_eval else "-"
        if is_eval:
            ax.plot(steps, values, color=color, linestyle="--", marker="o", markersize=4, label=label)
        elif panel.smooth and len(values) >= 8:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            ax.plot(steps, smooth(values), color=color, linewidth=2, label=label)
        else:
            marker = "." if len(steps) < 30 else None
            ax.plot(steps, values, color=color, linewidth=2, marker=marker, label=label)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(panel.ylabel)
    if log:
        ax.set_yscale("log")
    elif panel.name == "learning_rate":  # 2e-3, not 0.00200
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 4), useMathText=True)
    if panel.name in ("tokens_per_second", "samples_per_second"):
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    handles, _ = ax.get_legend_handles_labels()
    if len(styles) > 1:
        handles += [Line2D([], [], color="0.35", linestyle=ls, label=name) for name, ls in styles.items()]
    if handles:
        ax.legend(handles=handles, frameon=False, loc="best")


def _wants_log_scale(panel: Panel, peaks: Sequence[float], values: Sequence[float]) -> bool:
    """Log axis where a linear one would flatten something: losses falling by a decade or more,
    and runs whose learning rates or gradient norms differ by a decade or more."""
    positive = [v for v in values if v > 0]
    if not positive:
        return False
    if panel.name == "loss":
        return len(positive) == len(values) and max(positive) / min(positive) >= 10
    if panel.name in ("learning_rate", "grad_norm"):
        top = [p for p in peaks if p > 0]
        return len(top) > 1 and max(top) / min(top) >= 10
    return False


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")


def draw_plots(runs: Sequence[RunLog], out: Path) -> list[Path]:
    """One PNG per panel plus `overview.png` with all of them; returns the paths written."""
    matplotlib = _import_matplotlib()
    from matplotlib.figure import Figure

    panels = panels_for(runs)
    if not panels:
        return []
    colors = _colors(len(runs))
    written = []
    several = len(runs) > 1
    with matplotlib.rc_context(_STYLE):
        for panel in panels:
            fig = Figure(figsize=(7, 4.2), layout="constrained")
            _draw(fig.add_subplot(), panel, runs, colors, run_legend=several)
            written.append(out / f"{panel.name}.png")
            _save(fig, written[-1])
        columns = 1 if len(panels) == 1 else 2
        rows = math.ceil(len(panels) / columns)
        fig = Figure(figsize=(6 * columns, 3.4 * rows + 0.4), layout="constrained")
        for i, panel in enumerate(panels):
            _draw(fig.add_subplot(rows, columns, i + 1), panel, runs, colors, run_legend=False)
        if several:  # one legend for the whole figure instead of one per panel
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], color=c, linewidth=2, label=r.name) for r, c in zip(runs, colors)]
            fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 6), frameon=False)
        else:
            fig.suptitle(runs[0].name, fontsize=12, fontweight="bold")
        written.insert(0, out / "overview.png")
        _save(fig, written[0])
    return written


# ---------------------------------------------------------------------------------------------------------
# Page


@dataclass
class _Page:
    runs: Sequence[RunLog]
    images: Sequence[Path] = field(default_factory=list)

    def render(self) -> str:
        names = ", ".join(html.escape(run.name) for run in self.runs)
        parts = [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>ember report: {names}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>ember report</h1><p>{len(self.runs)} run(s): {names}</p>",
        ]
        if self.images:
            overview, *rest = self.images
            parts.append(f"<h2>Overview</h2>{_img(overview, 'overview')}")
        else:
            rest = []
        parts.append("<h2>Summary</h2>")
        for run in self.runs:
            parts.append(f"<h3>{html.escape(run.name)}</h3><pre>{html.escape(run.summary)}</pre>")
        if rest:
            parts.append('<h2>Plots</h2><div class="grid">')
            parts += [f"<figure>{_img(p, p.stem)}<figcaption>{p.name}</figcaption></figure>" for p in rest]
            parts.append("</div>")
        parts.append("</body></html>\n")
        return "\n".join(parts)


_CSS = (
    "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1240px;"
    "margin:2em auto;padding:0 1em;color:#222}"
    "pre{background:#f6f8fa;padding:.8em 1em;border-radius:6px;overflow-x:auto;font-size:13px}"
    "img{max-width:100%;height:auto}"
    ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1em}"
    "figure{margin:0}figcaption{color:#666;font-size:12px;text-align:center}"
)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def write_report(runs: Sequence[RunLog], out: Path, plots: bool = True) -> list[Path]:
    """Write the PNGs (when `plots`) and `report.html` into `out`; returns every file written.

    Raises ReportError naming the install command when matplotlib is missing (checked before
    anything is written)."""
    if plots:
        _import_matplotlib()
    out.mkdir(parents=True, exist_ok=True)
    images = draw_plots(runs, out) if plots else []
    page = out / "report.html"
    page.write_text(_Page(runs, images).render(), encoding="utf-8")
    return [*images, page]

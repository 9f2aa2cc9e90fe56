"""Turn a run's metrics.jsonl into a summary (table, JSON) and, optionally, a PNG or HTML report.

Invariants:
* A line with "eval_*" keys and no "loss" is an eval record; any other line is a training record.
  If a step appears twice in one series (a resume whose old lines were kept), the later line wins.
* The summary (first/last/min/max and a sparkline per metric) needs only the standard library and
  rich; matplotlib (the `[report]` extra) is imported only when a picture is asked for.
* min/max skip NaN/inf; first/last are what was logged, NaN included (written as null in JSON).
* The picture is drawn on an Agg canvas built directly (no pyplot), so no global backend is
  switched and no window is opened, even on a desktop.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from dpocli import __version__
from dpocli.errors import DpocliError
from dpocli.io.atomic import atomic_write_bytes, atomic_write_text
from dpocli.io.console import log, warn

METRICS_FILE = "metrics.jsonl"
SPARKS = "▁▂▃▄▅▆▇█"
STAT_COLUMNS = ("first", "last", "min", "max")
# Counters that only ever grow: kept in the JSON summary, left out of the table (their trend says nothing).
COUNTERS = ("epoch", "num_tokens", "elapsed_s")
ORDER = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
         "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "tokens_per_s", "pairs_per_s")
# (title, y label, metric names); each is drawn from the train series and, if logged, the eval one.
PANELS = [("DPO loss", "loss", ["loss"]),
          ("Reward accuracy", "fraction of pairs", ["rewards/accuracies"]),
          ("Reward margin", "β·(Δchosen − Δrejected)", ["rewards/margins"]),
          ("Rewards", "β·(policy − ref) log-prob", ["rewards/chosen", "rewards/rejected"]),
          ("Policy log-probs", "sum over completion", ["logps/chosen", "logps/rejected"]),
          ("Learning rate", "learning rate", ["learning_rate"]),
          ("Gradient norm", "‖g‖ before clipping", ["grad_norm"]),
          ("Throughput", "tokens / s", ["tokens_per_s"])]
COLORS = {"loss": "tab:blue", "rewards/accuracies": "tab:blue", "rewards/margins": "tab:blue",
          "rewards/chosen": "tab:green", "rewards/rejected": "tab:red", "logps/chosen": "tab:green",
          "logps/rejected": "tab:red", "learning_rate": "tab:purple", "grad_norm": "tab:orange",
          "tokens_per_s": "tab:gray"}
COMPONENT_COLORS = ["tab:cyan", "tab:olive", "tab:brown", "tab:pink"]
EVAL_COLORS = {"rewards/chosen": "darkgreen", "rewards/rejected": "darkred", "logps/chosen": "darkgreen",
               "logps/rejected": "darkred"}
SMOOTH_ABOVE = 200  # train series longer than this are drawn faint with a moving average on top
CONFIG_KEYS = ("model", "loss", "beta", "lr", "scheduler", "batch_size", "grad_accum", "max_steps",
               "max_grad_norm")


@dataclass(frozen=True)
class Series:
    """One metric over training: `steps[i]` is the optimizer step at which `values[i]` was logged."""
    steps: list[int]
    values: list[float]


def read_metrics(run_dir: str | Path) -> tuple[dict[str, Series], dict[str, Series]]:
    """(train, eval) series by metric name from RUN_DIR/metrics.jsonl (or a metrics file itself)."""
    run_dir = Path(run_dir)
    path = run_dir if run_dir.is_file() else run_dir / METRICS_FILE
    if not path.is_file():
        raise DpocliError("no metrics file (expected RUN_DIR/metrics.jsonl)", file=path,
                          hint="pass the --out folder of `dpo train`")
    points: dict[bool, dict[str, dict[int, float]]] = {False: {}, True: {}}
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.strip())
            except json.JSONDecodeError as err:
                raise DpocliError(f"is not valid JSON ({err.msg}, column {err.colno})", file=path,
                                  row=row, hint="a run killed mid-write can leave a cut last line; "
                                  "delete that line") from None
            except RecursionError:
                raise DpocliError("nests JSON too deeply to be a metrics line", file=path, row=row) from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise DpocliError("is not a metrics record (expected an object with an integer "
                                  "'step')", file=path, row=row)
            is_eval = "loss" not in record and any(k.startswith("eval_") for k in record)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    points[is_eval].setdefault(key, {})[record["step"]] = float(value)
    if not any(points.values()):
        raise DpocliError("has no metrics records yet", file=path, hint="wait for the first logged step")
    train, evals = ({k: Series(sorted(v), [v[s] for s in sorted(v)]) for k, v in points[e].items()}
                    for e in (False, True))
    return train, evals


def sparkline(values: list[float], width: int = 14) -> str:
    """Unicode bars, lowest value ▁ to highest █; longer series are averaged into `width` buckets.

    A flat series is drawn at mid height (▄); NaN/inf points are blanks.
    """
    if len(values) > width:
        buckets = [values[i * len(values) // width:(i + 1) * len(values) // width] for i in range(width)]
        values = [sum(b) / len(b) for b in buckets]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return " " * len(values)
    lo, hi = min(finite), max(finite)
    if hi == lo:
        return "".join(SPARKS[3] if math.isfinite(v) else " " for v in values)
    return "".join(SPARKS[round((v - lo) / (hi - lo) * (len(SPARKS) - 1))] if math.isfinite(v) else " "
                   for v in values)


def _stats(series: Series) -> dict:
    finite = [(v, s) for s, v in zip(series.steps, series.values) if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else ((math.nan, None), (math.nan, None))
    return {"first": series.values[0], "last": series.values[-1], "min": lo[0], "max": hi[0],
            "min_step": lo[1], "max_step": hi[1], "points": len(series.values),
            "spark": sparkline(series.values)}


def _ordered(names) -> list[str]:
    rank = {name: i for i, name in enumerate(ORDER)}
    rank.update({n.removeprefix("eval_"): 0.5 for n in names if n.removeprefix("eval_").startswith("loss/")})
    return sorted(names, key=lambda n: (rank.get(n.removeprefix("eval_"), len(ORDER)), n))


REPORT_MARK = "dpocli report"


GENERATOR_META = f'<meta name="generator" content="{REPORT_MARK}">'
# What a report starts with: a PNG's signature and its Software text chunk, or the HTML head.
_REPORT_STARTS = {".png": (b"\x89PNG\r\n\x1a\n", b"tEXtSoftware\x00" + REPORT_MARK.encode()),
                  ".html": (f'<!doctype html>\n<html><head><meta charset="utf-8">{GENERATOR_META}'.encode(),
                            GENERATOR_META.encode())}


def _written_by_report(path: Path) -> bool:
    """A report starts as dpo report writes it and carries REPORT_MARK in the place it writes it
    (the PNG's Software text chunk, the HTML generator meta tag), within its first 4 KiB: a file
    that merely mentions "dpocli report" is not one. Only a regular file is opened (a FIFO would
    block)."""
    start, mark = _REPORT_STARTS.get(path.suffix.lower(), (None, None))
    if start is None or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(start) and mark in head


def summarize(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """The report as a dict (the `--json` output); also writes `out` (.png or .html) when given."""
    run_dir = Path(run_dir)
    if out is not None:
        out = Path(out)
        if out.suffix.lower() not in (".png", ".html"):
            raise DpocliError("unknown report format (expected a .png or .html file name)", file=out)
        if not out.parent.is_dir():
            raise DpocliError("folder does not exist", file=out.parent)
        if out.exists() and not _written_by_report(out):
            raise DpocliError("exists and was not written by `dpo report`; dpocli will not replace it",
                              file=out, field="--out", hint="choose another file name")
    train, evals = read_metrics(run_dir)
    config = {}
    config_path = (run_dir if run_dir.is_dir() else run_dir.parent) / "run_config.json"
    if config_path.is_file():  # optional: a bare metrics file still gets a report
        try:
            full = json.loads(config_path.read_text())
            config = {k: full[k] for k in CONFIG_KEYS if k in full}
        except (json.JSONDecodeError, TypeError, RecursionError, OSError, UnicodeDecodeError):
            warn(f"{config_path}: not a JSON object; the report leaves the configuration out")
    eval_steps = sorted({s for series in evals.values() for s in series.steps})
    last_eval = eval_steps[-1] if eval_steps else None
    summary = {
        "command": "report", "dpocli_version": __version__, "run_dir": str(run_dir),
        "train_steps": len(train["loss"].steps) if "loss" in train else 0,
        "last_step": max((s.steps[-1] for s in train.values()), default=None),
        "eval_steps": eval_steps, "config": config,
        "metrics": {k: _stats(s) for k, s in [*((n, train[n]) for n in _ordered(train)),
                                              *((n, evals[n]) for n in _ordered(evals))]},
        "final_eval": {k: s.values[-1] for k in _ordered(evals)
                       if (s := evals[k]).steps[-1] == last_eval},
        "report": None,
    }
    if out is not None:
        png = render_png(train, evals, title=_title(run_dir, config), notes=_notes(summary),
                         clip=config.get("max_grad_norm"))
        if out.suffix.lower() == ".png":
            atomic_write_bytes(out, png)
        else:
            atomic_write_text(out, _html_page(summary, png))
        summary["report"] = str(out)
        log(f"wrote {out}")
    return summary


def _notes(summary: dict) -> list[str]:
    """The text cell of the figure: configuration and final eval metrics."""
    # note: long model paths keep their end (the informative part) so the text stays in its cell
    lines = [f"  {k:<14} {v if len(str(v)) <= 36 else '…' + str(v)[-35:]}"
             for k, v in summary["config"].items()]
    lines = ["configuration", *lines] if lines else []
    if summary["final_eval"]:
        lines += [""] * bool(lines) + [f"final eval (step {summary['eval_steps'][-1]})"]
        lines += [f"  {k.removeprefix('eval_'):<20} {_num(v)}" for k, v in summary["final_eval"].items()]
    return lines


def _title(run_dir: Path, config: dict) -> str:
    parts = [f"{k}={config[k]}" for k in ("loss", "beta", "lr", "batch_size") if k in config]
    return f"dpo run {run_dir}" + (f"  ({', '.join(parts)})" if parts else "")


def render_png(train: dict[str, Series], evals: dict[str, Series], *, title: str = "",
               notes: list[str] = (), clip: float | None = None) -> bytes:
    """A grid of panels (one per entry of PANELS, then `notes` as text) as PNG bytes; needs matplotlib.

    `clip` (the run's max_grad_norm) is drawn as a line on the gradient-norm panel.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DpocliError("matplotlib is needed to draw the report (--out)",
                          hint="pip install 'dpocli[report]'   (or drop --out for the table only)") from None
    ncols = 3
    nrows = math.ceil((len(PANELS) + bool(notes)) / ncols)
    fig = Figure(figsize=(6 * ncols, 4.2 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=15)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (panel_title, ylabel, names) in zip(axes, PANELS):
        if names == ["loss"]:  # a combined loss: its components (loss/<type>) go on the same panel
            names = names + sorted(k for k in train if k.startswith("loss/"))
        colors = [COLORS.get(n) for n in names]
        colors[1:] = [COLORS.get(n) or COMPONENT_COLORS[i % len(COMPONENT_COLORS)]  # loss/<type> lines
                      for i, n in enumerate(names[1:])]
        drawn = [_plot(ax, n, train, evals, labelled=len(names) > 1, color=c) for n, c in zip(names, colors)]
        ax.set_title(panel_title, fontsize=13)
        ax.set_xlabel("step", fontsize=11)
        ax.set_ylabel(ylabel, fontsize=11)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
        if "learning_rate" in names:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if "grad_norm" in names and clip and "grad_norm" in train:
            ax.axhline(clip, color="gray", ls=":", lw=1.5, label=f"clip at {clip:g}")
        if any(drawn):
            ax.legend(fontsize=10, loc="best")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
                    fontsize=12, color="gray")
    for ax in axes[len(PANELS):]:
        ax.set_axis_off()
    if notes:
        axes[len(PANELS)].text(0.02, 0.98, "\n".join(notes), va="top", ha="left", family="monospace",
                               fontsize=11, transform=axes[len(PANELS)].transAxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": REPORT_MARK})
    return buf.getvalue()


def _plot(ax, name: str, train: dict[str, Series], evals: dict[str, Series], labelled: bool,
          color: str | None) -> bool:
    """Train as a line (faint, plus a moving average, when long), eval as dashed markers."""
    label = name.split("/")[-1] if labelled else ""
    if name in train:
        s = train[name]
        # thousands of noisy steps: show the trend, keep the raw faint (never smooth a schedule)
        if len(s.values) > SMOOTH_ABOVE and name != "learning_rate":
            ax.plot(s.steps, s.values, color=color, lw=0.8, alpha=0.3)
            ax.plot(s.steps, _ema(s.values, span=len(s.values) // 25), color=color, lw=1.8,
                    label=f"train {label}".strip() + " (EMA)")
        else:
            ax.plot(s.steps, s.values, color=color, lw=1.6, label=f"train {label}".strip())
    if f"eval_{name}" in evals:
        s = evals[f"eval_{name}"]
        ax.plot(s.steps, s.values, color=EVAL_COLORS.get(name, "black"), lw=1.6, ls="--", marker="o",
                ms=6, label=f"eval {label}".strip())
    return name in train or f"eval_{name}" in evals


def _ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average (pandas' `ewm(span=...)` without bias correction); skips NaN."""
    alpha, out, acc = 2 / (max(span, 2) + 1), [], None
    for v in values:
        if math.isfinite(v):
            acc = v if acc is None else acc + alpha * (v - acc)
        out.append(math.nan if acc is None else acc)
    return out


def _num(v) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _html_page(summary: dict, png: bytes) -> str:
    """One self-contained page: the PNG inline (base64) and the summary table."""
    esc = html.escape
    rows = "\n".join(
        f"<tr><td>{esc(k)}</td>" + "".join(f"<td>{_num(m[c])}</td>" for c in STAT_COLUMNS)
        + f"<td class=s>{esc(m['spark'])}</td></tr>" for k, m in summary["metrics"].items())
    config = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>"
                     for k, v in summary["config"].items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8">{GENERATOR_META}
<title>dpo report {esc(summary['run_dir'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}} img{{max-width:100%}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child{{text-align:left}} td.s{{font-family:monospace;text-align:left}}</style></head><body>
<h1>dpo report: {esc(summary['run_dir'])}</h1>
<p>{summary['train_steps']} training steps; eval at steps {esc(str(summary['eval_steps']))};
dpocli {esc(summary['dpocli_version'])}</p>
<img alt="training curves" src="data:image/png;base64,{base64.b64encode(png).decode('ascii')}">
<h2>Metrics</h2><table>
<tr><th>metric</th><th>first</th><th>last</th><th>min</th><th>max</th><th>trend</th></tr>
{rows}</table>
<h2>Configuration</h2><table>{config}</table>
</body></html>
"""


def report_table(summary: dict):
    """The terminal summary: one row per metric with first/last/min/max and a sparkline.

    Laid out to fit 80 columns (what rich assumes when stdout is a pipe): no vertical rules or edge
    padding, eval metrics in their own section without the "eval_" prefix, at most 14 bars.
    """
    from rich import box
    from rich.table import Table
    title = f"report {summary['run_dir']}: {summary['train_steps']} steps"
    if summary["eval_steps"]:
        title += f", eval at {', '.join(map(str, summary['eval_steps']))}"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  padding=(0, 1, 0, 0), caption=f"wrote {summary['report']}" if summary["report"] else None,
                  caption_justify="left")
    table.add_column("metric", style="bold", no_wrap=True)
    for col in STAT_COLUMNS:
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("trend", no_wrap=True, overflow="crop")
    metrics = summary["metrics"]
    for section in ("train", "eval"):
        keys = [k for k in metrics if k.startswith("eval_") == (section == "eval")
                and k.removeprefix("eval_") not in COUNTERS]
        if section == "eval" and keys:
            table.add_section()
            table.add_row("[cyan]held-out eval[/cyan]")
        for key in keys:
            m = metrics[key]
            table.add_row(key.removeprefix("eval_"), *(_num(m[c]) for c in STAT_COLUMNS), m["spark"])
    return table

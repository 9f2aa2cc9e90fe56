"""The picture of `dpo cache audit --out audit.png|audit.html`: histograms of the token lengths and
of the reference margins, drawn from the audit's accumulators (no second pass over the cache).

Like `dpo report`, a PNG carries AUDIT_MARK in its metadata and an HTML page in a meta tag, so an
existing file is replaced only when dpocli wrote it. Needs matplotlib (the 'report' extra).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from dpocli.errors import DpocliError
from dpocli.io.atomic import atomic_write_bytes, atomic_write_text
from dpocli.io.console import log

AUDIT_MARK = "dpocli cache audit"
LENGTH_BINS = 40


def _written_by_audit(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return AUDIT_MARK.encode() in f.read(4096)
    except OSError:
        return False


def check_out(out: Path) -> None:
    """Before any work: a .png or .html name, in an existing folder, not a file dpocli did not write."""
    if out.suffix.lower() not in (".png", ".html"):
        raise DpocliError(
            "unknown picture format (expected a .png or .html file name)", file=out, field="--out"
        )
    if not out.parent.is_dir():
        raise DpocliError("folder does not exist", file=out.parent, field="--out")
    if out.is_dir() or (out.exists() and not _written_by_audit(out)):
        raise DpocliError(
            "exists and was not written by `dpo cache audit`; dpocli will not replace it",
            file=out,
            field="--out",
            hint="choose another file name",
        )


def _length_panel(ax, name: str, counts: np.ndarray) -> None:
    if counts.sum() == 0:
        return
    top = int(np.flatnonzero(counts)[-1]) + 1
    width = max(1, -(-top // LENGTH_BINS))
    padded = np.zeros(-(-top // width) * width, dtype=np.int64)
    padded[:top] = counts[:top]
    ax.bar(
        np.arange(padded.size // width) * width,
        padded.reshape(-1, width).sum(1),
        width=width,
        align="edge",
        color="#4c72b0",
    )
    ax.set_title(f"{name} tokens", fontsize=12)
    ax.set_ylabel("pairs")


def _margin_panel(ax, name: str, margins) -> None:
    if margins.n == 0:
        return
    used = np.flatnonzero(margins.bins)
    edges = margins.bin_edges(used[0], used[-1] + 1)
    counts = margins.bins[used[0] : used[-1] + 1]
    groups = np.linspace(0, counts.size, min(60, counts.size) + 1).astype(int)
    sums = np.add.reduceat(counts, groups[:-1])
    ax.bar(edges[groups[:-1]], sums, width=np.diff(edges[groups]), align="edge", color="#dd8452")
    ax.axvline(0, color="gray", ls=":", lw=1.5)
    ax.set_title(f"reference {name} (accuracy {margins.correct / margins.n:.3f})", fontsize=12)
    ax.set_ylabel("pairs")


def render_png(summary: dict, audit) -> bytes:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DpocliError(
            "matplotlib is needed to draw the audit (--out)",
            hint="pip install 'dpocli[report]'   (or drop --out for the table only)",
        ) from None
    fig = Figure(figsize=(18, 8.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"dpo cache audit {summary['cache']}  ({summary['rows']} pairs)", fontsize=15)
    axes = fig.subplots(2, 3).ravel()
    for ax, part in zip(axes, ("prompt", "chosen", "rejected", "total")):
        _length_panel(ax, part, audit.lengths[part].counts)
    _margin_panel(axes[4], "margin", audit.margin)
    _margin_panel(axes[5], "margin per token", audit.margin_per_token)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": AUDIT_MARK})
    return buf.getvalue()


def _html_page(summary: dict, png: bytes) -> str:
    esc = html.escape
    shown = {k: v for k, v in summary.items() if k not in ("picture", "seconds")}
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta name="generator" content="{AUDIT_MARK}">
<title>dpo cache audit {esc(summary["cache"])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}} img{{max-width:100%}}
pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>dpo cache audit: {esc(summary["cache"])}</h1>
<img alt="length and margin histograms" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">
<h2>Audit</h2><pre>{esc(json.dumps(shown, indent=2, default=str))}</pre>
</body></html>
"""


def write(out: Path, summary: dict, audit) -> str:
    png = render_png(summary, audit)
    if out.suffix.lower() == ".png":
        atomic_write_bytes(out, png)
    else:
        atomic_write_text(out, _html_page(summary, png))
    log(f"wrote {out}")
    return str(out)

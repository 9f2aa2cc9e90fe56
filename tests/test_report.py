"""dpo report: summary numbers from a hand-written metrics.jsonl, sparklines, errors, PNG/HTML output.

The synthetic run below has 4 training steps and evals at steps 2 and 4; every expected number in
these tests is read off it by hand, not recomputed with the code under test.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import struct
import sys

import pytest
from rich.console import Console

from conftest import invoke
from dpocli.errors import DpocliError
from dpocli.train.report import read_metrics, report_table, sparkline, summarize

NAN = float("nan")
LINES = [
    {"step": 1, "loss": 0.7, "rewards/accuracies": 0.25, "grad_norm": 1.0, "learning_rate": 1e-3},
    {"step": 2, "loss": 0.5, "rewards/accuracies": 0.5, "grad_norm": 1.5, "learning_rate": 1e-3},
    {"step": 2, "eval_loss": 0.65, "eval_rewards/accuracies": 0.5},
    {"step": 3, "loss": 0.6, "rewards/accuracies": 0.75, "grad_norm": NAN, "learning_rate": 1e-3},
    {"step": 4, "loss": 0.9, "rewards/accuracies": 0.0, "grad_norm": 9.0, "learning_rate": 1e-3},
    # a resumed run logged step 4 again: the later line wins
    {"step": 4, "loss": 0.2, "rewards/accuracies": 1.0, "grad_norm": 3.0, "learning_rate": 1e-3},
    {"step": 4, "eval_loss": 0.3, "eval_rewards/accuracies": 1.0},
]


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # json.dumps writes NaN as the bare token NaN, as the trainer's MetricsLog does
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LINES))
    (run / "run_config.json").write_text(json.dumps({"loss": "sigmoid", "beta": 0.1, "lr": 1e-3,
                                                     "max_grad_norm": 1.0, "seed": 42}))
    return run


def test_train_and_eval_series_are_split_and_deduplicated(run_dir):
    train, evals = read_metrics(run_dir)
    assert train["loss"].steps == [1, 2, 3, 4] and train["loss"].values == [0.7, 0.5, 0.6, 0.2]
    assert evals["eval_loss"].steps == [2, 4] and evals["eval_loss"].values == [0.65, 0.3]
    assert "eval_loss" not in train and "loss" not in evals


def test_summary_numbers(run_dir):
    s = summarize(run_dir)
    loss = s["metrics"]["loss"]
    assert (loss["first"], loss["last"], loss["min"], loss["max"]) == (0.7, 0.2, 0.2, 0.7)
    assert (loss["min_step"], loss["max_step"], loss["points"]) == (4, 1, 4)
    # NaN at step 3 is skipped by min/max, kept in the sparkline as a blank:
    # lo 1, hi 3 -> 1.0: ▁, 1.5: round(0.25*7)=2 ▃, nan: ' ', 3.0: █
    g = s["metrics"]["grad_norm"]
    assert (g["min"], g["max"], g["spark"]) == (1.0, 3.0, "▁▃ █")
    assert s["metrics"]["rewards/accuracies"]["spark"] == "▁▃▆█"  # levels 0, 7/3, 14/3, 7, rounded
    assert s["metrics"]["learning_rate"]["spark"] == "▄▄▄▄"  # flat: mid height
    assert s["metrics"]["eval_loss"] == {"first": 0.65, "last": 0.3, "min": 0.3, "max": 0.65,
                                         "min_step": 4, "max_step": 2, "points": 2, "spark": "█▁"}
    assert s["final_eval"] == {"eval_loss": 0.3, "eval_rewards/accuracies": 1.0}
    assert (s["train_steps"], s["last_step"], s["eval_steps"]) == (4, 4, [2, 4])
    assert s["config"] == {"loss": "sigmoid", "beta": 0.1, "lr": 1e-3, "max_grad_norm": 1.0}
    assert s["report"] is None


@pytest.mark.parametrize("values, width, expected", [
    ([0, 1, 2, 3, 4, 5, 6, 7], 14, "▁▂▃▄▅▆▇█"),
    ([7, 0, 7], 14, "█▁█"),
    ([5, 5], 14, "▄▄"),
    ([NAN, NAN], 14, "  "),
    # 28 points into 14 buckets of 2: means 0.5, 2.5, ..., 26.5 -> level round(i * 7/13)
    (list(range(28)), 14, "▁▂▂▃▃▄▄▅▅▆▆▇▇█"),
])
def test_sparkline(values, width, expected):
    assert sparkline(values, width) == expected


def test_table_fits_80_columns(run_dir):
    buf = io.StringIO()
    Console(file=buf, width=80).print(report_table(summarize(run_dir)))
    text = buf.getvalue()
    assert "…" not in text and "▁▃ █" in text and "held-out eval" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_bad_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n\n{"step": 2, "loss"\n')
    with pytest.raises(DpocliError) as err:
        read_metrics(tmp_path)
    assert str(err.value).startswith(f"{path}:3: is not valid JSON")
    path.write_text('{"step": 1, "loss": 0.7}\n[1, 2]\n')
    with pytest.raises(DpocliError, match=re.escape(f"{path}:2: ")):
        read_metrics(path)  # a metrics file may also be passed directly


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DpocliError, match="no metrics file") as err:
        read_metrics(tmp_path / "nope")
    assert str(tmp_path / "nope" / "metrics.jsonl") in str(err.value)


def test_cli_json_summary_and_errors_exit_2(run_dir, tmp_path):
    result = invoke(["report", run_dir, "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["command"] == "report" and summary["metrics"]["loss"]["last"] == 0.2
    assert summary["metrics"]["grad_norm"]["first"] == 1.0
    result = invoke(["report", tmp_path / "nope"])
    assert result.exit_code == 2 and result.stdout == "" and result.stderr.startswith("error: ")
    result = invoke(["report", run_dir, "--out", tmp_path / "r.pdf"])
    assert result.exit_code == 2 and ".png or .html" in result.stderr
    assert not (tmp_path / "r.pdf").exists()


def test_missing_matplotlib_gives_the_install_hint(run_dir, tmp_path, monkeypatch):
    # None in sys.modules makes an import fail: every matplotlib module, since an earlier test in
    # the session (a picture) may have imported its submodules already.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(DpocliError) as err:
        summarize(run_dir, tmp_path / "r.png")
    assert "pip install 'dpocli[report]'" in err.value.hint
    assert not (tmp_path / "r.png").exists()
    assert summarize(run_dir)["metrics"]["loss"]["last"] == 0.2  # the table needs no matplotlib


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow  # matplotlib's first import and render take ~10 s
def test_png_and_html_are_written(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "report.png"
    assert summarize(run_dir, png)["report"] == str(png)
    assert _png_size(png.read_bytes()) == (1800, 1260)  # 3x3 panels of 6 x 4.2 inches at 100 dpi
    page = tmp_path / "report.html"
    summarize(run_dir, page)
    text = page.read_text()
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text).group(1)
    assert _png_size(base64.b64decode(embedded)) == (1800, 1260)
    assert "<td>eval_loss</td><td>0.65</td><td>0.3</td>" in text and "sigmoid" in text
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_nan_is_null_in_json(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n')
    result = invoke(["report", tmp_path, "--json"])
    assert json.loads(result.stdout)["metrics"]["loss"]["first"] is None
    assert math.isnan(summarize(tmp_path)["metrics"]["loss"]["first"])

"""The README's promises: two set-up commands, CI runs the same test command, every command and every
flag documented, the loss table equal to the code, and the README's code blocks run.

How the README's code blocks are tested (`test_readme_blocks_run`):

- A ```bash block right after `<!-- docs-test: run -->` is run, in README order, in one temporary
  folder (later blocks use what earlier ones wrote), with `bash -e -o pipefail`; it must exit 0.
- A ```bash block right after `<!-- docs-test: skip (REASON) -->` is shown, not run (torchrun,
  several GPUs, placeholders for your own files). Every ```bash block outside "Set-up" carries one
  of the two markers, so no example can go untested by accident.
- A ```text block right after `<!-- docs-test: output -->` is output the README shows: each of its
  lines must appear in the stdout of the block before it (compared with table borders dropped and
  runs of spaces collapsed, so column widths do not matter).
- The two set-up commands install packages and are never run here.

The blocks use the sample's paths (`sample_data/train.jsonl`, `sample_data/tiny-llama`) and small
`--max-steps`. One substitution keeps the test short, and it is the only one: the temporary
folder's `sample_data/train.jsonl` and `heldout.jsonl` are the first 160 and 48 rows of the real
files (the model is the real one). `dpo` runs this checkout's `dpocli.cli.app.main`, the console
script's entry point, in a child forked from a process that imported torch once
(`tests/docs/dpo_server.py`): the same command, without ~5 s of imports per call.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SAMPLE_ROWS = {"train.jsonl": 160, "heldout.jsonl": 48}
BLOCK_RE = re.compile(r"(?:<!-- docs-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)\n```",
                      re.S)


def section(title: str) -> str:
    return README.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


def setup_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", section("Set-up: two commands"))


def blocks() -> list[tuple[str | None, str, str]]:
    """(marker, language, body) of every fenced block after the set-up section, in order."""
    after_setup = README.split("\n## Set-up: two commands", 1)[1].split("\n## ", 1)[1]
    return [(m["marker"], m["lang"], m["body"]) for m in BLOCK_RE.finditer(after_setup)]


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2
    assert "sample_data/run_sample.sh" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci


def test_every_command_is_documented():
    for command in ("precompute-ref", "train", "eval", "cache info", "cache verify", "report", "cache audit",
                    "cache filter", "cache split", "cache merge"):
        assert f"dpo {command}" in README, command


def test_exit_codes_are_documented():
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 130 |"):
        assert code in README


# ---- every flag of every command ----

def cli_flags() -> dict[str, list[str]]:
    """command name ("cache verify") -> its options, from the CLI itself."""
    import typer

    from dpocli.cli.app import app
    found: dict[str, list[str]] = {}

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, [*path, name])
        elif path:
            found[" ".join(path)] = [opt for p in command.params for opt in (*p.opts, *p.secondary_opts)
                                     if opt.startswith("--")]
    walk(typer.main.get_command(app), [])
    return found


def command_section(command: str) -> str:
    """The README's `### `dpo COMMAND ...`` section (info and verify share one)."""
    match = re.search(rf"\n### [^\n]*`dpo {re.escape(command)}[ `].*?(?=\n### |\n## )", README, re.S)
    assert match, f"no section for dpo {command}"
    return match.group(0)


def test_every_flag_of_every_command_is_documented_in_its_section():
    """A flag counts as documented when its command's section, or the section on the options
    shared by the commands, names it (as a whole word: `--max-tokens` does not count for `--max`)."""
    common = README.split("\n### Options shared by the commands", 1)[1].split("\n### ", 1)[0]
    missing = []
    for command, flags in cli_flags().items():
        text = command_section(command) + common
        missing += [f"dpo {command} {flag}" for flag in flags if flag != "--help"
                    and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    assert not missing, "undocumented flags: " + ", ".join(missing)


# ---- the loss table ----

def readme_loss_start_values() -> dict[str, str]:
    table = README.split("<!-- loss-start-values -->", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", table, re.M)
    return dict(rows)


def test_loss_start_value_table_equals_the_code():
    """Each loss at policy = reference (all log-ratios 0), default options (exo_pair needs ε > 0:
    the table says which ε it uses), computed by dpocli.objective.losses itself."""
    import torch

    from dpocli.objective.losses import LOSSES, LossInputs, LossSpec
    table = readme_loss_start_values()
    assert set(table) == set(LOSSES)
    zero = torch.zeros(3, dtype=torch.float64)
    for name, fn in LOSSES.items():
        number = re.match(r"[-0-9.]+", table[name])
        if name == "sft":  # not a function of the log-ratios: the model's own chosen NLL per token
            assert number is None, table[name]
            continue
        eps = 1e-3 if name == "exo_pair" else 0.0
        x = LossInputs(zero - 4, zero - 6, zero - 4, zero - 6, torch.full((3,), 5), torch.full((3,), 7))
        value = float(fn(x, LossSpec(losses=(name,), label_smoothing=eps)).mean())
        assert number, f"{name}: {table[name]}"
        assert math.isclose(float(number.group(0)), value, abs_tol=6e-5), (name, table[name], value)


def test_first_warmup_step_has_learning_rate_zero():
    """The README says so; the schedule must agree."""
    from dpocli.train.schedule import Schedule
    linear = Schedule("linear", warmup=5, total=100)
    assert linear.factor(0) == 0.0 and linear.factor(1) == 0.2
    assert "first warm-up step's learning rate is 0" in README


# ---- the README's code blocks, run ----

def test_every_example_block_is_marked_run_or_skip():
    for marker, lang, body in blocks():
        if lang == "bash":
            assert marker and (marker == "run" or marker.startswith("skip (")), body
        if marker == "output":
            assert lang == "text", body


def test_some_blocks_run_and_some_check_output():
    markers = [m for m, _, _ in blocks()]
    assert markers.count("run") >= 5 and markers.count("output") >= 1


def normalise(line: str) -> str:
    return " ".join(re.sub(r"[│┃|]", " ", line).split())


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The temporary folder with the cut sample, and the environment whose `dpo` runs this checkout's
    `dpocli.cli.app.main` (through a fork server that imports torch once: tests/docs/dpo_server.py)."""
    work = tmp_path_factory.mktemp("readme")
    sample = work / "sample_data"
    sample.mkdir()
    (sample / "tiny-llama").symlink_to(ROOT / "sample_data" / "tiny-llama")
    for name, rows in SAMPLE_ROWS.items():
        lines = (ROOT / "sample_data" / name).read_text().splitlines(keepends=True)[:rows]
        (sample / name).write_text("".join(lines))
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "dpo"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests/docs/dpo_client.py"}" "$@"\n')
    shim.chmod(0o755)
    socket_path = bin_dir / "dpo.sock"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "NO_COLOR": "1",
           "DPO_DOCS_SOCKET": str(socket_path)}
    env.pop("DPOCLI_DEBUG", None)
    server = subprocess.Popen([sys.executable, str(ROOT / "tests/docs/dpo_server.py"), str(socket_path)],
                              env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not socket_path.exists():
            assert server.poll() is None and time.monotonic() < deadline, "the dpo docs server did not start"
            time.sleep(0.1)
        yield work, env
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_readme_blocks_run(sandbox):
    work, env = sandbox
    last_stdout = None
    ran = 0
    for marker, lang, body in blocks():
        if marker == "run":
            result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=work, env=env,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"README block failed ({result.returncode}):\n{body}\n" \
                                           f"stderr:\n{result.stderr[-3000:]}"
            last_stdout, ran = result.stdout, ran + 1
        elif marker == "output":
            assert last_stdout is not None, body
            shown = {normalise(line) for line in last_stdout.splitlines()}
            for line in body.splitlines():
                if line.strip():
                    assert normalise(line) in shown, f"README shows {line!r}; the run printed:\n{last_stdout}"
    assert ran >= 5


# ---- the Guide's figures from the sample run ----

# (value the Guide's table shows for the trained policy, tolerance): thread counts and hardware
# change the last bits of a 75-step trajectory, so the check is loose, the README rounded.
SAMPLE_EVAL_FIGURES = {"loss": ("0.1551", 0.01), "rewards/accuracies": ("0.9833", 0.0125),
                       "preference_prob/mean": ("0.8778", 0.01),
                       "displacement/chosen_below_ref": ("0.8333", 0.03)}


@pytest.mark.slow
def test_guide_quotes_what_the_sample_run_gives(trained_run, heldout_cache):
    """trained_run is run_sample.sh's training (tests/conftest.py SAMPLE_TRAIN_ARGS); eval-cache and
    save cadence do not change its weights, so `dpo eval` of it gives the Guide's figures."""
    import json

    from conftest import invoke
    guide = section("Guide")
    result = invoke(["eval", heldout_cache, "--model", trained_run, "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["models"][0]
    for key, (shown, tolerance) in SAMPLE_EVAL_FIGURES.items():
        assert re.search(rf"\| {re.escape(key)} \| [^|]+ \| {re.escape(shown)} \|", guide), key
        assert abs(metrics[key] - float(shown)) <= tolerance, (key, metrics[key], shown)

"""Every command driven through a table of bad inputs: exit code, one `error:` line, nothing written.

Exit codes: 2 for bad input or usage, 1 for failures at run time. "Nothing written" means the
command's output does not exist afterwards and the folders it was pointed at are byte-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import MODEL, SAMPLE, invoke, write_jsonl


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def assert_one_error_line(result, code: int, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert result.exit_code == code, result.stderr
    assert len(errors) == 1 and lines[0].startswith("error:"), result.stderr
    assert all(not line or line.startswith(("error:", "hint:", "warning:")) for line in lines), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_cache):
    """Inputs shared by the table: good ones, and bad files made once."""
    root = tmp_path_factory.mktemp("bad")
    rows = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines()[:4]]
    good = write_jsonl(root / "good.jsonl", rows)
    (root / "surrogate.jsonl").write_text('{"prompt": "a\\ud800", "chosen": "b", "rejected": "c"}\n')
    (root / "broken.jsonl").write_text('{"prompt": "a", "chosen": "b"\n')
    import gzip
    (root / "good.jsonl.gz").write_bytes(gzip.compress(good.read_bytes()))
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]
    write_jsonl(root / "chat.jsonl", chat)
    plain_model = root / "no-template-model"
    shutil.copytree(MODEL, plain_model)
    (plain_model / "chat_template.jinja").unlink()
    config = json.loads((plain_model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain_model / "tokenizer_config.json").write_text(json.dumps(config))
    (root / "list-manifest").mkdir()
    (root / "list-manifest" / "manifest.json").write_text("[1, 2]")
    (root / "folder-manifest" / "manifest.json").mkdir(parents=True)
    (root / "a-folder").mkdir()
    (root / "bad.toml").write_text('beta = "abc"\n')
    (root / "user-file.jsonl").write_text("my notes\n")
    return {"root": root, "good": good, "cache": small_cache, "plain_model": plain_model}


def precompute(w, *extra, data=None):
    return ["precompute-ref", data or w["good"], "--model", MODEL, "--out", w["root"] / "out", *extra]


def train(w, *extra, cache=None):
    return ["train", cache or w["cache"], "--model", MODEL, "--out", w["root"] / "out", "--max-steps", 1, *extra]


def evaluate(w, *extra):
    return ["eval", w["cache"], "--model", MODEL, *extra]


CASES = {
    # precompute-ref
    "batch size 0": (lambda w: precompute(w, "--batch-size", 0), 2, "--batch-size"),
    "max tokens 0": (lambda w: precompute(w, "--max-tokens", 0), 2, "--max-tokens"),
    "device tpu": (lambda w: precompute(w, "--device", "tpu"), 2, "--device"),
    "device cuda without a GPU": (lambda w: precompute(w, "--device", "cuda"), 2, "--device"),
    "max length 1": (lambda w: precompute(w, "--max-length", 1), 2, "--max-length"),
    "rows per shard 0": (lambda w: precompute(w, "--rows-per-shard", 0), 2, "--rows-per-shard"),
    "missing input": (lambda w: precompute(w, data=w["root"] / "nope.jsonl"), 2, "nope.jsonl"),
    "lone surrogate": (lambda w: precompute(w, data=w["root"] / "surrogate.jsonl"), 2, "surrogate.jsonl:1"),
    "cut JSON line": (lambda w: precompute(w, data=w["root"] / "broken.jsonl"), 2, "broken.jsonl:1"),
    "chat rows, no chat template": (lambda w: ["precompute-ref", w["root"] / "chat.jsonl", "--model",
                                               w["plain_model"], "--out", w["root"] / "out"], 2, "chat template"),
    "unknown split": (lambda w: precompute(w, "--split", "test"), 2, "split"),
    "config is a folder": (lambda w: precompute(w, "--config", w["root"] / "a-folder"), 2, "a-folder"),
    "out is the input's folder": (lambda w: ["precompute-ref", w["good"], "--model", MODEL, "--out",
                                             w["root"]], 2, "--out"),
    "out is the model": (lambda w: ["precompute-ref", w["good"], "--model", MODEL, "--out", MODEL], 2, "--out"),
    "out under a file": (lambda w: precompute(w)[:-1] + [w["good"] / "cache"], 2, "is a file"),
    # train
    "warmup steps < 0": (lambda w: train(w, "--warmup-steps", -1), 2, "--warmup-steps"),
    "save total limit < 0": (lambda w: train(w, "--save-total-limit", -1), 2, "--save-total-limit"),
    "max grad norm < 0": (lambda w: train(w, "--max-grad-norm", -1), 2, "--max-grad-norm"),
    "20-digit seed": (lambda w: train(w, "--seed", 10**20), 2, "--seed"),
    "adam beta2 1": (lambda w: train(w, "--adam-beta2", 1), 2, "--adam-beta2"),
    "lr 0": (lambda w: train(w, "--lr", 0), 2, "--lr"),
    "train device tpu": (lambda w: train(w, "--device", "tpu"), 2, "--device"),
    "seed not a number": (lambda w: train(w, "--seed", "abc"), 2, "--seed"),
    "missing option": (lambda w: ["train", w["cache"], "--out", w["root"] / "out"], 2, "--model"),
    "bad value in config": (lambda w: train(w, "--config", w["root"] / "bad.toml"), 2, "bad.toml", "--beta"),
    "manifest is a list": (lambda w: train(w, cache=w["root"] / "list-manifest"), 2, "manifest.json"),
    "manifest is a folder": (lambda w: train(w, cache=w["root"] / "folder-manifest"), 2, "manifest.json"),
    "train out is the cache": (lambda w: train(w)[:5] + [w["cache"], "--max-steps", 1], 2, "--out"),
    "train out is the model": (lambda w: train(w)[:5] + [MODEL, "--max-steps", 1], 2, "--out"),
    "eval every without eval cache": (lambda w: train(w, "--eval-every", 1), 2, "--eval-every"),
    "wsd decay past max steps": (lambda w: train(w, "--scheduler", "warmup_stable_decay", "--num-decay-steps", 2),
                                 2, "--scheduler warmup_stable_decay", "--num-decay-steps", "--max-steps"),
    "wsd past the epoch": (lambda w: ["train", w["cache"], "--model", MODEL, "--out", w["root"] / "out",
                                      "--batch-size", 8, "--scheduler", "warmup_stable_decay",
                                      "--warmup-steps", 3, "--num-decay-steps", 4], 2, "--warmup-steps",
                           "--num-decay-steps", "the run's 6 steps"),
    # eval
    "kl samples 0": (lambda w: evaluate(w, "--kl-samples", 0), 2, "--kl-samples"),
    "temperature < 0": (lambda w: evaluate(w, "--temperature", -1), 2, "--temperature"),
    "samples < 0": (lambda w: evaluate(w, "--samples", -1), 2, "--samples"),
    "max new tokens 0": (lambda w: evaluate(w, "--max-new-tokens", 0), 2, "--max-new-tokens"),
    "eval max tokens 0": (lambda w: evaluate(w, "--max-tokens", 0), 2, "--max-tokens"),
    "eval dtype fp8": (lambda w: evaluate(w, "--dtype", "fp8"), 2, "--dtype"),
    "eval 20-digit seed": (lambda w: evaluate(w, "--seed", 10**20), 2, "--seed"),
    "per-example into the cache": (lambda w: evaluate(w, "--per-example", w["cache"] / "x.jsonl"), 2,
                                   "--per-example"),
    "per-example over a user file": (lambda w: evaluate(w, "--per-example", w["root"] / "user-file.jsonl"), 2,
                                     "not written by"),
    "per-example bad suffix": (lambda w: evaluate(w, "--per-example", w["root"] / "x.csv"), 2, "--per-example"),
    # cache, report
    "info on a missing cache": (lambda w: ["cache", "info", w["root"] / "nope"], 2, "nope"),
    "verify a list manifest": (lambda w: ["cache", "verify", w["root"] / "list-manifest"], 2, "manifest.json"),
    "verify rescore < 0": (lambda w: ["cache", "verify", w["cache"], "--rescore", -1], 2, "--rescore"),
    "report on a missing run": (lambda w: ["report", w["root"] / "nope"], 2, "nope"),
    "unknown command": (lambda w: ["bogus"], 2, "bogus"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_writes_nothing(world, name):
    make_args, code, *needles = CASES[name]
    before = snapshot(world["root"])
    cache_before = snapshot(world["cache"])
    result = invoke(make_args(world))
    assert_one_error_line(result, code, *needles)
    assert snapshot(world["root"]) == before  # no output folder, no stray file
    assert snapshot(world["cache"]) == cache_before


def test_debug_adds_the_traceback_and_keeps_the_exit_code(world, monkeypatch):
    monkeypatch.setenv("DPOCLI_DEBUG", "1")
    result = invoke(train(world, "--warmup-steps", -1))
    assert result.exit_code == 2 and "Traceback" in result.stderr and "error:" in result.stderr


def test_gzipped_json_lines_read_like_the_plain_file(world, tmp_path):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    for data, out in ((world["good"], plain), (world["root"] / "good.jsonl.gz", packed)):
        result = invoke(["precompute-ref", data, "--model", MODEL, "--out", out, "--quiet"])
        assert result.exit_code == 0, result.stderr
    from conftest import ref_values
    assert ref_values(plain) == ref_values(packed) and len(ref_values(plain)) == 4

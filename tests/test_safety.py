"""dpocli deletes only what it can prove it wrote, and a full disk is one line and a resumable state.

Every data-loss case runs on copies, and asserts the user's files are byte-identical afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from test_bad_inputs import snapshot

from conftest import MODEL, invoke, read_jsonl, write_jsonl


def user_folder(root: Path, name: str = "mine") -> Path:
    """A folder of the user's own files, with names dpocli itself uses."""
    folder = root / name
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".env").write_text("SECRET=1\n")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a b c\n")
    (folder / "part-00000.parquet").write_bytes(b"PAR1 the user's own data")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    return folder


def precompute(data, out, *extra):
    return invoke(["precompute-ref", data, "--model", MODEL, "--out", out, "--rows-per-shard", 8, "--quiet",
                   *extra])


def train(cache, out, *extra, model=MODEL):
    return invoke(["train", cache, "--model", model, "--out", out, "--max-steps", 2, "--batch-size", 4,
                   "--quiet", *extra])


def interrupt_second_shard(monkeypatch):
    """Ctrl-C while precompute writes its second shard; returns the real writer."""
    from dpocli.cache import store as cache
    real, calls = cache.write_shard, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(cache, "write_shard", crash_on_second)
    return real


@pytest.fixture()
def prefs(tmp_path, sample_rows):
    return write_jsonl(tmp_path / "prefs.jsonl", sample_rows[:16])


@pytest.mark.parametrize("extra", [(), ("--overwrite",)])
def test_precompute_never_clears_a_folder_it_did_not_write(tmp_path, prefs, extra):
    folder = user_folder(tmp_path)
    before = snapshot(folder)
    result = precompute(prefs, folder, *extra)
    assert result.exit_code == 2 and "not a dpocli cache" in result.stderr
    assert snapshot(folder) == before


def test_precompute_into_its_own_input_folder_is_refused(tmp_path, prefs):
    data = tmp_path / "sparkdata"
    data.mkdir()
    shutil.copy(prefs, data / "part-00000.jsonl")
    before = snapshot(data)
    result = precompute(data, data)
    assert result.exit_code == 2 and "--out" in result.stderr
    assert snapshot(data) == before


def test_precompute_overwrite_checks_the_device_before_deleting(tmp_path, prefs, sample_rows):
    out = tmp_path / "cache"
    assert precompute(prefs, out).exit_code == 0
    before = snapshot(out)
    other = write_jsonl(tmp_path / "other.jsonl", sample_rows[16:24])
    result = precompute(other, out, "--overwrite", "--device", "cuda")
    assert result.exit_code == 2 and "--device" in result.stderr
    assert snapshot(out) == before  # the old cache is intact, not an empty folder


def test_precompute_overwrite_keeps_a_cache_that_holds_foreign_files(tmp_path, prefs, sample_rows):
    out = tmp_path / "cache"
    assert precompute(prefs, out).exit_code == 0
    (out / "notes.txt").write_text("mine")
    other = write_jsonl(tmp_path / "other.jsonl", sample_rows[16:24])
    before = snapshot(out)
    result = precompute(other, out, "--overwrite")
    assert result.exit_code == 2 and "'notes.txt'" in result.stderr and "did not write" in result.stderr
    assert snapshot(out) == before
    # A finished cache with a matching spec is a no-op, whatever else lies beside it.
    (out / "run").mkdir()
    result = precompute(prefs, out)
    assert result.exit_code == 0 and "already complete" not in result.stdout


def test_precompute_resume_cleans_its_own_temporaries(tmp_path, prefs, monkeypatch):
    out = tmp_path / "cache"
    interrupt_second_shard(monkeypatch)
    result = precompute(prefs, out)
    assert result.exit_code == 130 and "rerun the same command" in result.stderr
    monkeypatch.undo()
    (out / ".part-00001.parquet.dpocli-tmp-0123456789abcdef").write_bytes(b"half")
    (out / "tokenizer.dpocli-tmpdir-0123456789abcdef").mkdir()
    assert precompute(prefs, out).exit_code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.resolved.toml", "manifest.json", "part-00000.parquet", "part-00001.parquet",
                     "tokenizer"]


def sft_model(root: Path) -> Path:
    model = root / "sft-model"
    shutil.copytree(MODEL, model)
    (model / "metrics.jsonl").write_text('{"step": 100, "loss": 0.1}\n')
    return model


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_train_never_writes_into_a_folder_it_did_not_write(small_cache, tmp_path, flag):
    model = sft_model(tmp_path)
    before = snapshot(model)
    result = train(small_cache, model, flag, model=MODEL)
    assert result.exit_code == 2 and "not a dpocli run" in result.stderr
    assert snapshot(model) == before


@pytest.mark.parametrize("target", ["cache", "model", "cwd", "parent"])
def test_train_overwrite_refuses_what_the_command_reads_and_the_working_directory(
        small_cache, tmp_path, monkeypatch, target):
    work = tmp_path / "work"
    (work / "project").mkdir(parents=True)
    (work / "project" / "keep.txt").write_text("keep")
    monkeypatch.chdir(work / "project")
    model = sft_model(tmp_path)
    out = {"cache": small_cache, "model": model, "cwd": Path("."), "parent": Path("..")}[target]
    before = {p: snapshot(p) for p in (small_cache, model, work)}
    result = train(small_cache, out, "--overwrite", model=model)
    assert result.exit_code == 2 and "--out" in result.stderr and "Traceback" not in result.stderr
    assert {p: snapshot(p) for p in before} == before


def test_overwrite_replaces_only_a_dpocli_run(small_cache, tmp_path):
    run = tmp_path / "run"
    assert train(small_cache, run).exit_code == 0
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    result = train(small_cache, run, "--overwrite")
    assert result.exit_code == 2 and "'notes.txt'" in result.stderr
    assert snapshot(run) == before
    (run / "notes.txt").unlink()
    assert train(small_cache, run, "--overwrite").exit_code == 0
    record = json.loads((run / "run_record.json").read_text())
    assert "config.json" in record["files"] and "model.safetensors" in record["files"]


def test_a_failed_start_leaves_nothing_behind(small_cache, tmp_path, monkeypatch):
    from dpocli.errors import RunFailure
    from dpocli.train import loop as train_module

    def failing_check(*args, **kwargs):
        raise RunFailure("step-0 check failed (simulated)")
    monkeypatch.setattr(train_module, "step0_check", failing_check)
    run = tmp_path / "new" / "run"
    result = train(small_cache, run)
    assert result.exit_code == 1 and "step-0" in result.stderr
    assert not run.exists()  # no run_config.json in the way of the corrected rerun
    monkeypatch.undo()
    assert train(small_cache, run).exit_code == 0


def test_resume_cleans_temporaries_and_tolerates_a_cut_metrics_line(small_cache, tmp_path):
    run = tmp_path / "run"
    assert train(small_cache, run, "--save-every", 1, "--max-steps", 1).exit_code == 0
    (run / "checkpoint-2.dpocli-tmpdir-0123456789abcdef").mkdir()
    (run / ".metrics.jsonl.dpocli-tmp-0123456789abcdef").write_text("x")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a write cut by a kill
    result = train(small_cache, run, "--save-every", 1, "--max-steps", 1, "--resume")
    assert result.exit_code == 0, result.stderr
    assert not (run / "checkpoint-2.dpocli-tmpdir-0123456789abcdef").exists() and not (run / ".metrics.jsonl.dpocli-tmp-0123456789abcdef").exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1]


def test_resume_refuses_a_rebuilt_cache(tmp_path, prefs, sample_rows):
    cache_dir, run = tmp_path / "cache", tmp_path / "run"
    assert precompute(prefs, cache_dir).exit_code == 0
    assert train(cache_dir, run, "--save-every", 1, "--max-steps", 1).exit_code == 0
    write_jsonl(prefs, sample_rows[20:36])  # same path, other data
    assert precompute(prefs, cache_dir, "--overwrite").exit_code == 0
    result = train(cache_dir, run, "--save-every", 1, "--max-steps", 2, "--resume")
    assert result.exit_code == 2 and "rebuilt" in result.stderr


def test_pruning_deletes_only_the_runs_own_checkpoints(small_cache, tmp_path):
    run = tmp_path / "run"
    result = train(small_cache, run, "--save-every", 1, "--max-steps", 3, "--save-total-limit", 1)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"]
    record = json.loads((run / "run_record.json").read_text())
    assert [n for n in record["files"] if n.startswith("checkpoint-")] == ["checkpoint-3"]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("code,says", [(errno.ENOSPC, "no space left"), (errno.EROFS, "not writable"),
                                       (errno.EACCES, "not writable")])
def test_full_or_read_only_disk_during_precompute_is_one_line_and_resumes(tmp_path, prefs, monkeypatch,
                                                                          code, says):
    from dpocli.cache import store as cache
    out = tmp_path / "cache"
    real, calls = cache.pq.write_table, []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)
    monkeypatch.setattr(cache.pq, "write_table", fail_on_second)
    result = precompute(prefs, out)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and lines[0].startswith("error:") and says in lines[0]
    assert "part-00001.parquet" in lines[0] and "Traceback" not in result.stderr
    assert not [p for p in out.iterdir() if ".dpocli-" in p.name]
    monkeypatch.undo()  # the user frees space
    result = precompute(prefs, out, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["status"] == "resumed"


@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_full_disk_while_saving_is_one_line_and_resumes(small_cache, tmp_path, monkeypatch, where):
    import torch
    from transformers import PreTrainedModel
    run = tmp_path / "run"
    if where == "checkpoint":
        monkeypatch.setattr(torch, "save", enospc)
    else:
        real, calls = PreTrainedModel.save_pretrained, []

        def full_on_final(self, folder, *args, **kwargs):
            calls.append(folder)
            if "final-model" in str(folder):
                real(self, folder, *args, **kwargs)
                (Path(folder) / "config.json").unlink(missing_ok=True)
                enospc()
            return real(self, folder, *args, **kwargs)
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_on_final)
    result = train(small_cache, run, "--save-every", 1)
    assert result.exit_code == 1, result.stderr
    assert result.stderr.startswith("error:") and "no space left" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run / "config.json").exists()  # nothing that looks like a finished model
    assert not [p for p in run.iterdir() if ".dpocli-" in p.name]
    monkeypatch.undo()
    result = train(small_cache, run, "--save-every", 1, "--resume")
    assert result.exit_code == 0, result.stderr
    assert (run / "config.json").exists() and (run / "model.safetensors").exists()


def test_per_example_path_is_checked_first_and_its_folders_created(small_cache, tmp_path, monkeypatch):
    from dpocli.eval import evaluate
    target = tmp_path / "new" / "deeper" / "rows.jsonl"
    result = invoke(["eval", small_cache, "--model", MODEL, "--per-example", target, "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert len(read_jsonl(target)) > 0
    # Rewriting our own file is fine; a full disk at the end is one line, exit 1.
    monkeypatch.setattr(evaluate, "atomic_path", lambda path: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))))
    result = invoke(["eval", small_cache, "--model", MODEL, "--per-example", target, "--quiet"])
    assert result.exit_code == 1 and result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_relative_and_absolute_paths_name_the_same_input(tmp_path, prefs, monkeypatch):
    from dpocli.cache import store as cache
    monkeypatch.chdir(tmp_path)
    real = interrupt_second_shard(monkeypatch)
    assert precompute(Path("prefs.jsonl"), Path("cache")).exit_code == 130
    monkeypatch.setattr(cache, "write_shard", real)
    result = precompute(prefs.resolve(), (tmp_path / "cache").resolve(), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "resumed"


def test_verify_rescore_finds_a_relative_reference_from_anywhere(tmp_path, prefs, monkeypatch):
    shutil.copytree(MODEL, tmp_path / "ref")
    monkeypatch.chdir(tmp_path)
    result = invoke(["precompute-ref", "prefs.jsonl", "--model", "ref", "--out", "cache", "--quiet"])
    assert result.exit_code == 0, result.stderr
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = invoke(["cache", "verify", tmp_path / "cache", "--rescore", 2, "--json"])
    assert result.exit_code == 0, result.stderr
    shutil.rmtree(tmp_path / "ref")
    result = invoke(["cache", "verify", tmp_path / "cache", "--rescore", 2])
    assert result.exit_code == 2 and "--model" in result.stderr


def test_resuming_a_finished_run_prunes_and_logs_its_final_eval_once(small_cache, tmp_path):
    run = tmp_path / "run"
    args = ("--save-every", 1, "--max-steps", 3, "--eval-cache", small_cache, "--eval-every", 2)
    assert train(small_cache, run, *args).exit_code == 0
    assert len(list(run.glob("checkpoint-*"))) == 3
    result = train(small_cache, run, *args, "--save-total-limit", 1, "--resume")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"]
    evals = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
    assert evals == [2, 3]  # the periodic one, and the final one once

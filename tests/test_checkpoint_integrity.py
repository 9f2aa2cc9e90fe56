"""Checkpoints you can trust: every file checksummed, damaged or contradicting state refused with
one line naming the file (and field), never used silently and never an internal error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import MODEL, invoke
from dpocli.errors import DpocliError
from dpocli.eval.evaluate import expand_models
from dpocli.io.state_files import StateFile

TRAIN = ["--model", MODEL, "--max-steps", 4, "--save-every", 2, "--batch-size", 4, "--lr", "5e-4",
         "--quiet"]


@pytest.fixture(scope="module")
def trained(small_cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("integrity") / "run"
    result = invoke(["train", small_cache, "--out", run, *TRAIN])
    assert result.exit_code == 0, result.stderr
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run to damage (its run_config.json says where it is now, so that
    --resume with --out at the copy is the same run)."""
    copy = Path(shutil.copytree(trained, tmp_path / "run"))
    _edit_json(copy / "run_config.json", lambda d: d.update(out=str(copy)))
    return copy


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_a_weight_byte(path: Path) -> None:
    """Change one byte inside the tensor data (after the safetensors header): the file still loads."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    middle = header + (len(data) - header) // 2
    data[middle] ^= 0x01
    path.write_bytes(bytes(data))


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "internal error" not in stderr and "Traceback" not in stderr, stderr
    return errors[0]


# ---- 1. the checksum record ----

def test_every_checkpoint_and_the_final_model_record_each_files_sha256(trained):
    for folder in (trained / "checkpoint-2", trained / "checkpoint-4", trained):
        record = json.loads((folder / "checksums.json").read_text())
        assert record["format"] == "dpocli-checksums"
        listed = record["files"]
        if folder.name.startswith("checkpoint-"):  # everything the checkpoint holds
            assert set(listed) == set(files_of(folder)) - {"checksums.json"}
        else:  # the final model's files, not the run's logs
            assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(listed)
            assert "metrics.jsonl" not in listed and "run_record.json" not in listed
        for name, entry in listed.items():
            data = (folder / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert "checksums.json" in json.loads((trained / "run_record.json").read_text())["files"]


@pytest.mark.parametrize("target", ["checkpoint-4", "."])
def test_a_bit_flip_in_the_weights_is_refused_by_eval(small_cache, run, target):
    folder = (run / target).resolve()
    flip_a_weight_byte(folder / "model.safetensors")
    result = invoke(["eval", small_cache, "--model", folder, "--quiet"])
    assert result.exit_code == 2, result.stderr
    line = one_error_line(result.stderr)
    assert "model.safetensors" in line and "sha256" in line


def test_a_bit_flip_is_refused_by_train_model_and_by_resume_leaving_the_run_as_it_was(
        small_cache, run, tmp_path):
    flip_a_weight_byte(run / "checkpoint-4" / "model.safetensors")
    before = files_of(run)
    new = tmp_path / "new"
    started = invoke(["train", small_cache, *TRAIN[:1], run / "checkpoint-4", *TRAIN[2:], "--out", new])
    assert started.exit_code == 2, started.stderr
    assert "model.safetensors" in one_error_line(started.stderr)
    assert not new.exists()
    resumed = invoke(["train", small_cache, "--out", run, *TRAIN, "--resume"])
    assert resumed.exit_code == 2, resumed.stderr
    assert "checkpoint-4/model.safetensors" in one_error_line(resumed.stderr)
    assert files_of(run) == before  # refused before anything was written or deleted


def test_a_missing_checkpoint_file_is_refused_not_skipped(small_cache, run):
    (run / "checkpoint-4" / "optimizer.pt").unlink()
    before = files_of(run)
    resumed = invoke(["train", small_cache, "--out", run, *TRAIN, "--resume"])
    assert resumed.exit_code == 2, resumed.stderr
    assert "checkpoint-4/optimizer.pt" in one_error_line(resumed.stderr)
    assert files_of(run) == before


def test_a_plain_hf_folder_missing_a_weight_is_refused_not_reinitialised(small_cache, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = Path(shutil.copytree(MODEL, tmp_path / "model"))
    weights = load_file(folder / "model.safetensors")
    dropped = sorted(weights)[5]
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    result = invoke(["eval", small_cache, "--model", folder, "--quiet"])
    assert result.exit_code == 2, result.stderr
    line = one_error_line(result.stderr)
    assert str(folder) in line and repr(dropped) in line


def test_a_plain_hf_folder_loads_as_before(small_cache):
    result = invoke(["eval", small_cache, "--model", MODEL, "--json"])
    assert result.exit_code == 0, result.stderr
    assert "unverified" not in result.stderr


def test_a_checkpoint_without_a_record_loads_with_one_warning(small_cache, run):
    """Run folders written before checksums existed still load, flagged as unverified."""
    for folder in (run / "checkpoint-2", run / "checkpoint-4"):
        (folder / "checksums.json").unlink()
    result = invoke(["eval", small_cache, "--model", run / "checkpoint-2", "--model",
                     run / "checkpoint-4", "--json"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("unverified") == 1, result.stderr


# ---- 2. state that contradicts the run, damaged state ----

def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("rename", [False, True])
def test_a_trainer_state_beyond_max_steps_is_refused(small_cache, run, rename):
    folder = run / "checkpoint-4"
    _edit_json(folder / "trainer_state.json", lambda d: d.update(step=9))
    if rename:  # consistent with its folder name (and the run record), still beyond the run's 4 steps
        folder = folder.rename(run / "checkpoint-9")
        _edit_json(run / "run_record.json", lambda d: d["files"].append("checkpoint-9"))
    before = files_of(run)
    result = invoke(["train", small_cache, "--out", run, *TRAIN, "--resume"])
    assert result.exit_code == 2, result.stderr
    line = one_error_line(result.stderr)
    assert f"{folder.name}/trainer_state.json" in line and "field 'step'" in line
    assert files_of(run) == before


def _drop_rng(folder: Path) -> None:
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    del state["rng"]
    torch.save(state, folder / "optimizer.pt")


def _empty_scheduler(folder: Path) -> None:
    """A scheduler state the scheduler cannot take, in a checkpoint without checksums (as an older
    dpocli wrote them), so that it reaches the loading itself."""
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    torch.save({**state, "scheduler": {}}, folder / "optimizer.pt")
    (folder / "checksums.json").unlink()


DAMAGE = {
    "rng": ("checkpoint-4/optimizer.pt", "field 'rng'", _drop_rng),
    "micro_index": ("checkpoint-4/trainer_state.json", "field 'micro_index'",
                    lambda f: _edit_json(f / "trainer_state.json", lambda d: d.pop("micro_index"))),
    "step_type": ("checkpoint-4/trainer_state.json", "field 'step'",
                  lambda f: _edit_json(f / "trainer_state.json", lambda d: d.update(step="4"))),
    "truncated_state": ("checkpoint-4/trainer_state.json", "not valid JSON",
                        lambda f: (f / "trainer_state.json").write_text('{"step": 4, "epo')),
    "scheduler": ("checkpoint-4/optimizer.pt", "field 'scheduler' does not fit this run", _empty_scheduler),
    "run_config": ("run_config.json", "not valid JSON",
                   lambda f: (f.parent / "run_config.json").write_text("{not json")),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_state_is_one_line_naming_file_and_field(small_cache, run, case):
    name, expected, damage = DAMAGE[case]
    damage(run / "checkpoint-4")
    before = files_of(run)
    result = invoke(["train", small_cache, "--out", run, *TRAIN, "--resume"])
    assert result.exit_code == 2, result.stderr
    line = one_error_line(result.stderr)
    assert name in line and expected in line, line
    if case != "scheduler":  # found in the checks before anything is written
        assert files_of(run) == before


def test_eval_names_a_corrupt_run_config(small_cache, run):
    (run / "run_config.json").write_text("{not json")
    result = invoke(["eval", small_cache, "--model", run / "checkpoint-4", "--quiet"])
    assert result.exit_code == 2, result.stderr
    assert "run_config.json" in one_error_line(result.stderr)


def test_an_intact_resume_still_reproduces_the_run(small_cache, trained, run):
    """Verification does not get in the way: resuming from checkpoint-2 ends where the run did."""
    shutil.rmtree(run / "checkpoint-4")
    result = invoke(["train", small_cache, "--out", run, *TRAIN, "--resume"])
    assert result.exit_code == 0, result.stderr
    assert (run / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()


# ---- the validating reader ----

def test_state_file_names_the_file_and_field(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"step": 3, "flag": True, "nested": {"a": 1}}))
    state = StateFile.read_json(path)
    assert state.count("step") == 3 and state.get("nested.a", int) == 1
    assert state.get("absent", int, 7) == 7
    for call, expected in ((lambda: state.get("absent"), "field 'absent' is missing"),
                           (lambda: state.count("flag"), "field 'flag' is bool, expected an integer"),
                           (lambda: state.get("nested.b", int), "field 'nested.b' is missing")):
        with pytest.raises(DpocliError) as err:
            call()
        assert str(err.value) == f"{path}: {expected}"
    path.write_text("[1, 2]")
    with pytest.raises(DpocliError, match="holds list"):
        StateFile.read_json(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(DpocliError, match="cannot be read"):
        StateFile.read_json(path)
    with pytest.raises(DpocliError, match="is missing"):
        StateFile.read_torch(tmp_path / "absent.pt")


# ---- 4. globs skip dpocli's temporaries ----

def test_a_model_glob_skips_dpoclis_own_temporaries(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-6.dpocli-tmpdir-0123456789abcdef", "final-model.dpocli-tmpdir-fedcba9876543210",
                 "checkpoint-4.dpocli-old-00112233aabbccdd"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-6.dpocli-tmpdir-0123456789abcdef" / "model.safetensors").write_bytes(b"half a file")
    found = expand_models([os.fspath(tmp_path / "checkpoint-*")])
    assert [Path(p).name for p in found] == ["checkpoint-2", "checkpoint-10"]
    with pytest.raises(DpocliError, match="matches no model folder"):
        expand_models([os.fspath(tmp_path / "final-model*")])


def test_eval_of_the_readme_glob_ignores_a_crash_leftover(small_cache, run):
    leftover = run / "checkpoint-6.dpocli-tmpdir-0123456789abcdef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a file")
    result = invoke(["eval", small_cache, "--model", f"{run}/checkpoint-*", "--json"])
    assert result.exit_code == 0, result.stderr
    assert [Path(m["model"]).name for m in json.loads(result.stdout)["models"]] == \
        ["checkpoint-2", "checkpoint-4"]

"""Datasets and models by Hub id (dpocli.data.hub), from a fake Hugging Face cache built in a temporary
HF_HUB_CACHE with huggingface_hub's layout: `datasets--ORG--NAME/{blobs,refs,snapshots/<commit>}`,
snapshot files being symlinks into `blobs/` as huggingface_hub writes them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import MODEL, invoke, write_jsonl
from dpocli.data import hub
from dpocli.errors import DpocliError
from dpocli.model.load import resolve_model_dir, weights_fingerprint

C1, C2 = "1" * 40, "2" * 40  # commit hashes


def rows(tag: str, n: int = 3) -> list[dict]:
    return [
        {"id": f"{tag}-{i}", "prompt": f"{tag} question {i}?", "chosen": " yes", "rejected": " no"}
        for i in range(n)
    ]


def parquet_bytes(data: list[dict], tmp_path: Path) -> bytes:
    path = tmp_path / "tmp.parquet"
    pq.write_table(pa.Table.from_pylist(data), path)
    return path.read_bytes()


def fake_snapshot(
    cache: Path,
    repo_type: str,
    repo_id: str,
    commit: str,
    files: dict[str, bytes],
    refs: tuple[str, ...] = ("main",),
) -> Path:
    """Lay `files` (path in repo -> bytes) out as huggingface_hub's cache does; point `refs` at `commit`."""
    repo = cache / "--".join([{"dataset": "datasets", "model": "models"}[repo_type], *repo_id.split("/")])
    snap = repo / "snapshots" / commit
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target = snap / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def model_files(extra_config: dict | None = None) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in MODEL.iterdir() if p.is_file()}
    if extra_config:  # another revision: a changed config.json changes the weights fingerprint
        files["config.json"] = json.dumps({**json.loads(files["config.json"]), **extra_config}).encode()
    return files


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF_HUB_CACHE, offline. huggingface_hub froze the cache folder and offline flag into
    constants at import (before this fixture), so these tests also prove dpocli reads them now."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


class Calls(list):
    """`local_files_only` of each snapshot_download call; `download` stands in for the Hub."""

    def download(self, repo_id, **kwargs):
        raise AssertionError(f"network download attempted for {repo_id}")


@pytest.fixture
def calls(monkeypatch) -> Calls:
    """huggingface_hub.snapshot_download, recording `local_files_only` of each call; a call that may
    use the network fails the test unless the test replaces `calls.download`."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    seen = Calls()

    def spy(repo_id, *, local_files_only=False, **kwargs):
        seen.append(local_files_only)
        if not local_files_only:
            return seen.download(repo_id, **kwargs)
        return real(repo_id, local_files_only=True, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return seen


# ---------------------------------------------------------------- resolution rules


def test_cache_folder_and_offline_mode_are_read_from_the_environment_now(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub" and not hub.offline()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub.cache_dir() == tmp_path / "hub-cache" and hub.offline()
    assert hub.repo_folder("org/name", "dataset") == tmp_path / "hub-cache" / "datasets--org--name"


def test_dataset_id_resolves_to_the_snapshot_of_main_or_of_a_revision(hf_cache, tmp_path, calls):
    fake_snapshot(hf_cache, "dataset", "org/prefs", C1, {"data/train.jsonl": b"{}\n"}, refs=("v1",))
    fake_snapshot(hf_cache, "dataset", "org/prefs", C2, {"data/train.jsonl": b"{}\n"})
    path, snap = hub.resolve_dataset("org/prefs")
    assert (snap.repo_id, snap.revision, path) == ("org/prefs", C2, snap.path) and path.name == C2
    assert hub.resolve_dataset("org/prefs", "v1")[1].revision == C1  # a tag/branch -> its commit
    assert hub.resolve_dataset("org/prefs", C1)[1].revision == C1  # a commit itself
    assert snap.relative(path / "data" / "train.jsonl") == "data/train.jsonl"
    assert calls and not any(flag is False for flag in calls)  # offline: the network never asked


def test_a_missing_dataset_or_revision_names_the_cache_folder_searched(hf_cache, calls):
    with pytest.raises(DpocliError) as err:
        hub.resolve_dataset("org/absent")
    line = err.value.one_line()
    assert line.startswith(
        "org/absent: is neither a local path nor a dataset in the local Hugging Face cache"
    )
    assert f"searched {hf_cache / 'datasets--org--absent'}" in line and "HF_HUB_OFFLINE" in line
    assert "hf download org/absent --repo-type dataset" in err.value.hint
    fake_snapshot(hf_cache, "dataset", "org/prefs", C1, {"train.jsonl": b"{}\n"})
    with pytest.raises(DpocliError, match="has no revision 'v9' in the local Hugging Face cache"):
        hub.resolve_dataset("org/prefs", "v9")
    assert calls == [True, True]


def test_a_local_path_wins_over_a_hub_id_and_refuses_a_revision(hf_cache, tmp_path, monkeypatch, calls):
    fake_snapshot(hf_cache, "dataset", "org/prefs", C1, {"train.jsonl": b"{}\n"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "prefs").mkdir(parents=True)
    write_jsonl(tmp_path / "org" / "prefs" / "train.jsonl", rows("local"))
    path, snap = hub.resolve_dataset("org/prefs")
    assert snap is None and path == Path("org/prefs") and calls == []
    with pytest.raises(DpocliError, match="is a local path, so --revision v1 cannot be honoured"):
        hub.resolve_dataset("org/prefs", "v1")
    with pytest.raises(DpocliError, match="does not exist \\(and is not a Hub dataset id"):
        hub.resolve_dataset("no/such/file.jsonl")


def test_online_a_missing_dataset_is_downloaded_into_the_cache(hf_cache, tmp_path, monkeypatch, calls):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def download(repo_id, *, repo_type, revision, cache_dir):
        assert (repo_type, revision, Path(cache_dir)) == ("dataset", "v1", hf_cache)
        return str(fake_snapshot(hf_cache, "dataset", repo_id, C1, {"train.jsonl": b"{}\n"}, refs=("v1",)))

    calls.download = download
    assert hub.resolve_dataset("org/new", "v1")[1].revision == C1
    assert calls == [True, False]  # the cache first, then the Hub
    assert hub.resolve_dataset("org/new", "v1")[1].revision == C1 and calls[2:] == [True]  # cached now

    def unreachable(repo_id, **kwargs):
        raise ConnectionError("Max retries exceeded\nwith url")

    calls.download = unreachable
    with pytest.raises(DpocliError) as err:
        hub.resolve_dataset("org/other")
    assert "could not be downloaded (ConnectionError: Max retries exceeded)" in err.value.one_line()
    assert f"searched {hf_cache / 'datasets--org--other'}" in err.value.one_line()


def test_model_id_and_revision_resolve_to_their_snapshot(hf_cache, calls):
    fake_snapshot(hf_cache, "model", "org/tiny", C1, model_files(), refs=("v1",))
    fake_snapshot(hf_cache, "model", "org/tiny", C2, model_files({"dpocli_test": 2}))
    assert resolve_model_dir("org/tiny").name == C2
    assert resolve_model_dir("org/tiny", "v1").name == C1
    old, new = weights_fingerprint("org/tiny", "v1"), weights_fingerprint("org/tiny")
    assert (old["path"], old["revision"], new["revision"]) == ("org/tiny", C1, C2)
    assert old["sha256"] != new["sha256"]
    with pytest.raises(DpocliError, match="is a local folder, so --model-revision v1 cannot be honoured"):
        resolve_model_dir(str(MODEL), "v1")
    with pytest.raises(DpocliError, match="has no revision 'v2'.*searched .*models--org--tiny"):
        resolve_model_dir("org/tiny", "v2")


# ---------------------------------------------------------------- through the CLI


def _hub_dataset(hf_cache: Path, tmp_path: Path) -> None:
    """org/prefs at C1 with two README configs: `small` (the default) and `big`, each with a train
    and a test split; main has moved on to C2, whose data is different."""
    readme = (
        "---\nconfigs:\n- config_name: small\n  default: true\n  data_files:\n"
        "  - split: train\n    path: small/train-*.parquet\n"
        "  - split: test\n    path: small/test.jsonl\n"
        "- config_name: big\n  data_files:\n  - split: train\n    path: big/train-*.parquet\n"
        "---\n# prefs\n"
    )
    jsonl = "".join(json.dumps(r) + "\n" for r in rows("small-test")).encode()
    fake_snapshot(
        hf_cache,
        "dataset",
        "org/prefs",
        C1,
        {
            "README.md": readme.encode(),
            "small/test.jsonl": jsonl,
            "small/train-00000-of-00001.parquet": parquet_bytes(rows("small"), tmp_path),
            "big/train-00000-of-00001.parquet": parquet_bytes(rows("big", 5), tmp_path),
        },
        refs=("v1",),
    )
    fake_snapshot(
        hf_cache,
        "dataset",
        "org/prefs",
        C2,
        {
            "README.md": readme.encode(),
            "small/test.jsonl": jsonl,
            "small/train-00000-of-00001.parquet": parquet_bytes(rows("newer"), tmp_path),
            "big/train-00000-of-00001.parquet": parquet_bytes(rows("newer-big", 5), tmp_path),
        },
    )


def test_precompute_from_hub_dataset_and_model_records_repo_revision_and_subset(hf_cache, tmp_path, calls):
    _hub_dataset(hf_cache, tmp_path)
    fake_snapshot(hf_cache, "model", "org/tiny", C1, model_files(), refs=("v1",))
    fake_snapshot(hf_cache, "model", "org/tiny", C2, model_files({"dpocli_test": 2}))
    out = tmp_path / "cache"
    args = [
        "precompute-ref",
        "org/prefs",
        "--revision",
        "v1",
        "--subset",
        "big",
        "--split",
        "train",
        "--model",
        "org/tiny",
        "--model-revision",
        "v1",
        "--out",
        out,
        "--quiet",
        "--json",
    ]
    result = invoke(args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rows_written"] == 5
    spec = json.loads((out / "manifest.json").read_text())["spec"]
    assert spec["input"]["hub"] == {"repo_id": "org/prefs", "revision": C1}
    assert (spec["input"]["subset"], spec["input"]["split"]) == ("big", "train")
    assert [f["path"] for f in spec["input"]["files"]] == ["big/train-00000-of-00001.parquet"]
    assert (spec["reference_model"]["path"], spec["reference_model"]["revision"]) == ("org/tiny", C1)
    shard_ids = pq.read_table(out / "part-00000.parquet").column("id").to_pylist()
    assert shard_ids == [f"big-{i}" for i in range(5)]

    # The same snapshot in another cache folder is the same input: the rerun is a no-op.
    moved = tmp_path / "moved-cache"
    shutil.copytree(hf_cache, moved, symlinks=True)
    shutil.rmtree(hf_cache)
    os.environ["HF_HUB_CACHE"] = str(moved)  # monkeypatch (hf_cache) restores it
    again = invoke(args)
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "already_complete"

    # main moved to C2 (other weights); verify --rescore still finds the commit the cache was made from.
    verify = invoke(["cache", "verify", out, "--rescore", "2", "--json", "--quiet"])
    assert verify.exit_code == 0, verify.stderr
    assert json.loads(verify.stdout)["rescored_rows"] == 2
    assert not any(flag is False for flag in calls)


def test_a_missing_hub_dataset_is_exit_2_before_anything_is_written(hf_cache, tmp_path, calls):
    out = tmp_path / "cache"
    result = invoke(["precompute-ref", "org/absent", "--model", MODEL, "--out", out])
    assert result.exit_code == 2 and not out.exists()
    assert (
        f"error: org/absent: is neither a local path nor a dataset in the local Hugging Face cache (searched "
        f"{hf_cache / 'datasets--org--absent'}" in " ".join(result.stderr.split())
    )


@pytest.mark.parametrize("command", [["train", "CACHE", "--out", "OUT"], ["eval", "CACHE"]])
def test_train_and_eval_resolve_the_model_revision(hf_cache, tmp_path, small_cache, command, calls):
    """A revision that is not in the cache stops the command (exit 2) naming the model's cache folder:
    the revision reached the model lookup instead of being dropped."""
    fake_snapshot(hf_cache, "model", "org/tiny", C1, model_files())
    args = [small_cache if a == "CACHE" else tmp_path / "run" if a == "OUT" else a for a in command]
    result = invoke([*args, "--model", "org/tiny", "--model-revision", "v7"])
    assert result.exit_code == 2, result.stderr
    assert "org/tiny: has no revision 'v7' in the local Hugging Face cache" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "command, flags",
    [
        (["precompute-ref"], ["--revision", "--subset", "--model-revision"]),
        (["train"], ["--model-revision"]),
        (["eval"], ["--model-revision"]),
        (["cache", "verify"], ["--model-revision"]),
    ],
)
def test_hub_flags_are_in_help_and_print_config(command, flags, tmp_path):
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

    help_text = " ".join(invoke([*command, "--help"]).stdout.split())
    printed = invoke([*command, "--print-config"]).stdout
    config = tmp_path / "c.toml"
    config.write_text("".join(f'{flag[2:]} = "v-{flag[2:]}"\n' for flag in flags))
    resolved = tomllib.loads(invoke([*command, "--config", config, "--print-config"]).stdout)
    for flag in flags:
        assert flag in help_text and f"# {flag[2:]} =" in printed  # unset by default
        assert resolved[flag[2:]] == f"v-{flag[2:]}"


def test_train_from_a_hub_model_uses_the_revision_asked_for(hf_cache, tmp_path, small_cache, calls):
    """org/tiny@v1 holds the cache's reference files; main (C2) has another config.json. Only with
    the revision threaded through loading and the step-0 check is the policy the reference."""
    fake_snapshot(hf_cache, "model", "org/tiny", C1, model_files(), refs=("v1",))
    fake_snapshot(hf_cache, "model", "org/tiny", C2, model_files({"dpocli_test": 2}))
    for revision, is_reference in (("v1", True), (None, False)):
        out = tmp_path / f"run-{revision}"
        args = ["--model-revision", revision] if revision else []
        result = invoke(
            [
                "train",
                small_cache,
                "--model",
                "org/tiny",
                *args,
                "--out",
                out,
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--json",
                "--quiet",
            ]
        )
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["step0_policy_is_reference"] is is_reference
        assert json.loads((out / "run_config.json").read_text())["model_revision"] == revision

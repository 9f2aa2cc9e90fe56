"""Hostile use, round 3 (issue 23, section 4): each class of case, with instances beyond the reported ones.

Data-loss cases run on copies and assert the user's files are byte-identical afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_bad_inputs import snapshot

from conftest import MODEL, invoke, write_jsonl

HEX = "0123456789abcdef"


def no_internal_error(result) -> None:
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def refused(result, *needles: str) -> None:
    assert result.exit_code == 2, result.stderr
    no_internal_error(result)
    assert result.stderr.startswith("error:"), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# 1. User files taken for dpocli's own -------------------------------------------------------------

def test_only_names_of_dpocli_generated_form_are_temporaries(tmp_path):
    from dpocli.io.atomic import atomic_dir, atomic_path, temporary_base
    seen = []
    with atomic_path(tmp_path / "metrics.jsonl") as tmp:
        seen.append(tmp.name)
        tmp.write_text("x")
    with atomic_dir(tmp_path / "checkpoint-2") as tmp:
        seen.append(tmp.name)
    with atomic_dir(tmp_path / "checkpoint-2"):  # replaces: the old folder goes through a temporary
        seen += [p.name for p in tmp_path.iterdir() if p.name not in ("metrics.jsonl", "checkpoint-2")]
    assert [temporary_base(n) for n in seen[:2]] == ["metrics.jsonl", "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    for name in [f".metrics.jsonl.dpocli-tmp-{HEX}", f"checkpoint-2.dpocli-tmpdir-{HEX}",
                 f"checkpoint-2.dpocli-old-{HEX}"]:
        assert temporary_base(name) is not None, name
    # What a person names a backup, and near misses of dpocli's form, are never ours.
    for name in ["metrics.jsonl.old-20240101", "checkpoint-2.old-1", "manifest.json.old-1",
                 "part-00001.parquet.old-3", ".metrics.jsonl.backup01.tmp", "checkpoint-2.tmp-mybackup",
                 "tokenizer.tmp-abcd1234", f".metrics.jsonl.dpocli-tmp-{HEX[:-1]}",
                 f".metrics.jsonl.dpocli-tmp-{HEX}0", f".metrics.jsonl.dpocli-tmp-{HEX.upper()}",
                 f"checkpoint-2.dpocli-tmpdir-{HEX[:-1]}g", f"checkpoint-2.dpocli-old-{HEX}\n"]:
        assert temporary_base(name) is None, name


BACKUPS = {"metrics.jsonl.old-20240101": "file", "checkpoint-2.old-1": "folder",
           ".metrics.jsonl.backup01.tmp": "file", "checkpoint-2.tmp-mybackup": "folder",
           "run_config.json.old-7": "file"}


def plant(folder: Path, names: dict[str, str]) -> None:
    for name, kind in names.items():
        if kind == "folder":
            (folder / name).mkdir()
            (folder / name / "model.safetensors").write_bytes(b"the user's own weights")
        else:
            (folder / name).write_text("the user's own backup\n")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, small_cache) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    result = invoke(["train", small_cache, "--model", MODEL, "--out", run, "--max-steps", 1,
                     "--batch-size", 4, "--save-every", 1, "--quiet"])
    assert result.exit_code == 0, result.stderr
    return run


def copy_run(short_run: Path, run: Path) -> Path:
    """A copy of the short run that resumes as if it had been trained at `run`."""
    shutil.copytree(short_run, run)
    config = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**config, "out": str(run)}))
    return run


def train_again(cache, run: Path, mode: str):
    """The short run's own command again, with --resume or --overwrite."""
    return invoke(["train", cache, "--model", MODEL, "--out", run, "--max-steps", 1,
                   "--batch-size", 4, "--save-every", 1, "--quiet", mode])


def test_the_short_run_resumes_and_is_replaced(short_run, small_cache, tmp_path):
    """The cases below are refused for what they plant, not for another reason."""
    for mode in ("--resume", "--overwrite"):
        run = copy_run(short_run, tmp_path / mode)
        result = train_again(small_cache, run, mode)
        assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("mode", ["--resume", "--overwrite"])
@pytest.mark.parametrize("backup", list(BACKUPS))
def test_user_backups_in_a_run_folder_are_never_deleted(short_run, small_cache, tmp_path, mode, backup):
    run = copy_run(short_run, tmp_path / "run")
    plant(run, {backup: BACKUPS[backup]})
    before = snapshot(run)
    result = train_again(small_cache, run, mode)
    refused(result, backup, "did not write")
    assert snapshot(run) == before


CACHE_BACKUPS = {"manifest.json.old-1": "file", "part-00001.parquet.old-3": "file",
                 ".part-00000.parquet.abcd1234.tmp": "file", "tokenizer.tmp-abcd1234": "folder",
                 "tokenizer.old-12": "folder"}


@pytest.mark.parametrize("backup", list(CACHE_BACKUPS))
def test_user_backups_in_a_cache_are_never_deleted(small_cache, tmp_path, sample_rows, backup):
    cache_dir = tmp_path / "cache"
    shutil.copytree(small_cache, cache_dir)
    plant(cache_dir, {backup: CACHE_BACKUPS[backup]})
    before = snapshot(cache_dir)
    other = write_jsonl(tmp_path / "other.jsonl", sample_rows[:8])
    result = invoke(["precompute-ref", other, "--model", MODEL, "--out", cache_dir, "--overwrite", "--quiet"])
    refused(result, backup, "did not write")
    assert snapshot(cache_dir) == before


def user_files(root: Path) -> dict[str, Path]:
    ours = {"model": "m", "id": "x", "source_row": 0}
    files = {
        "blank first line": "\n{\"note\": \"mine\"}\n",
        "empty": "",
        "the old eval columns": json.dumps(ours) + "\n",
        "an eval row then a note": json.dumps({"dpocli": "eval --per-example", **ours}) + "\nmy note\n",
        "a note then an eval row": "my note\n" + json.dumps({"dpocli": "eval --per-example", **ours}) + "\n",
    }
    paths = {}
    for i, (name, text) in enumerate(files.items()):
        paths[name] = root / f"notes{i}.jsonl"
        paths[name].write_text(text)
    paths["parquet with the eval columns"] = root / "notes.parquet"
    pq.write_table(pa.Table.from_pylist([ours]), paths["parquet with the eval columns"])
    return paths


def test_per_example_never_replaces_a_file_dpo_eval_did_not_write(small_cache, tmp_path):
    for name, path in user_files(tmp_path).items():
        before = path.read_bytes()
        result = invoke(["eval", small_cache, "--model", MODEL, "--per-example", path, "--quiet"])
        refused(result, "not written by `dpo eval`")
        assert path.read_bytes() == before, name
    # Its own output it replaces, in both formats.
    for suffix in (".jsonl", ".parquet"):
        own = tmp_path / f"own{suffix}"
        for _ in range(2):
            result = invoke(["eval", small_cache, "--model", MODEL, "--per-example", own, "--quiet"])
            assert result.exit_code == 0, result.stderr


def test_report_never_replaces_a_file_that_only_mentions_it(short_run, tmp_path):
    notes = {"notes.html": "<html><body>How I use dpocli report: ...</body></html>\n",
             "fake.png": "dpocli report\n", "page.html": '<meta name="generator" content="dpocli report">\n'}
    for name, text in notes.items():
        path = tmp_path / name
        path.write_text(text)
        result = invoke(["report", short_run, "--out", path])
        refused(result, "not written by `dpo report`")
        assert path.read_text() == text
    own = tmp_path / "own.html"
    for _ in range(2):
        result = invoke(["report", short_run, "--out", own])
        assert result.exit_code == 0, result.stderr


# 2. Crafted caches -------------------------------------------------------------------------------

def resign(cache_dir: Path, edit) -> None:
    from dpocli.cache.manifest import fingerprint
    path = cache_dir / "manifest.json"
    body = json.loads(path.read_text())
    edit(body)
    body.pop("manifest_sha256")
    body["manifest_sha256"] = fingerprint(body)
    path.write_text(json.dumps(body))


def _set(keys: str, value):
    def edit(body):
        *parents, last = keys.split(".")
        for key in parents:
            body = body[int(key)] if isinstance(body, list) else body[key]
        index = int(last) if isinstance(body, list) else last
        if value is KeyError:
            del body[index]
        else:
            body[index] = value
    return edit


OUTSIDE = {  # a shard or tokenizer name that leaves the cache folder (to an existing copy of a shard)
    "shard ..": (lambda root: _set("shards.0.file", "../x.parquet"), "shards[0].file"),
    "shard absolute": (lambda root: _set("shards.0.file", str(root / "x.parquet")), "shards[0].file"),
    "shard in a subfolder": (lambda root: _set("shards.0.file", "sub/part-00000.parquet"), "shards[0].file"),
    "tokenizer name ..": (lambda root: lambda b: b["tokenizer_files"].update({"../manifest.json": "0" * 64}),
                          "tokenizer_files"),
}
MISTYPED = {
    "no dtype": (_set("spec.dtype", KeyError), "spec.dtype"),
    "tokenizer a string": (_set("spec.tokenizer", "x"), "spec.tokenizer"),
    "pad id a string": (_set("spec.tokenizer.pad_token_id", "0"), "spec.tokenizer.pad_token_id"),
    "rows a bool": (_set("shards.0.rows", True), "shards[0].rows"),
    "shards an object": (_set("shards", {}), "shards"),
    "shard a string": (_set("shards.0", "part-00000.parquet"), "shards[0]"),
    "no budget": (_set("shards.0.budget", KeyError), "shards[0].budget"),
    "batching a list": (_set("spec.batching", []), "spec.batching"),
    "complete a string": (_set("complete", "yes"), "complete"),
    "tokenizer files a list": (_set("tokenizer_files", []), "tokenizer_files"),
    "input files a string": (_set("spec.input.files", "data.jsonl"), "spec.input.files"),
    "dtype unknown": (_set("spec.dtype", "int4"), "spec.dtype"),
    "no spec": (_set("spec", KeyError), "spec"),
    "dropped counts strings": (_set("shards.0.dropped", {"too_long": "1"}), "shards[0].dropped.too_long"),
}


@pytest.mark.parametrize("case", list(OUTSIDE) + list(MISTYPED))
def test_a_re_signed_manifest_is_bad_input_naming_the_field(small_cache, tmp_path, case):
    edit, field = OUTSIDE[case] if case in OUTSIDE else (lambda root: MISTYPED[case][0], MISTYPED[case][1])
    cache_dir = tmp_path / "cache"
    shutil.copytree(small_cache, cache_dir)
    shutil.copy(cache_dir / "part-00000.parquet", tmp_path / "x.parquet")
    (cache_dir / "sub").mkdir()
    shutil.copy(cache_dir / "part-00000.parquet", cache_dir / "sub" / "part-00000.parquet")
    resign(cache_dir, edit(tmp_path))
    for args in (["cache", "verify", cache_dir], ["cache", "info", cache_dir],
                 ["eval", cache_dir, "--model", MODEL, "--quiet"]):
        refused(invoke(args), f"field '{field}'")


def test_a_shard_or_tokenizer_file_linked_out_of_the_cache_is_refused(small_cache, tmp_path):
    for target in ("part-00000.parquet", "tokenizer/tokenizer.json", "tokenizer"):
        cache_dir = tmp_path / f"cache-{target.replace('/', '-')}"
        shutil.copytree(small_cache, cache_dir)
        moved = tmp_path / f"moved-{target.replace('/', '-')}"
        os.replace(cache_dir / target, moved)
        (cache_dir / target).symlink_to(moved)
        for args in (["cache", "verify", cache_dir], ["eval", cache_dir, "--model", MODEL, "--quiet"]):
            refused(invoke(args), "outside")


@pytest.mark.parametrize("name", ["../victim", "/tmp/victim", "sub/../../victim", "", ".", 7])
def test_a_run_record_naming_entries_outside_its_folder_is_refused(short_run, small_cache, tmp_path, name):
    run = copy_run(short_run, tmp_path / "run")
    (tmp_path / "victim").write_text("keep me\n")
    record = json.loads((run / "run_record.json").read_text())
    record["files"].append(name)
    (run / "run_record.json").write_text(json.dumps(record))
    before = snapshot(tmp_path)
    for mode in ("--resume", "--overwrite"):
        refused(train_again(small_cache, run, mode), "run_record.json", "field 'files'")
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("field,value", [("step", "1"), ("epoch", None), ("micro_index", True),
                                         ("num_tokens", KeyError), ("global_batch", 4.0)])
def test_a_mistyped_checkpoint_state_is_bad_input(short_run, small_cache, tmp_path, field, value):
    run = copy_run(short_run, tmp_path / "run")
    state_path = run / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    _set(field, value)(state)
    state_path.write_text(json.dumps(state))
    refused(train_again(small_cache, run, "--resume"), "trainer_state.json", f"field '{field}'")


# 3. Config files that lie ------------------------------------------------------------------------

LYING_CONFIGS = {
    "top-level typo beside a table": ("max-stepz = 2\n[train]\nbeta = 0.5\n", "max-stepz"),
    "typo in another command's table": ("[train]\nbeta = 0.5\n[eval]\nsampels = 2\n", "eval.sampels"),
    "a table no command has": ("[trian]\nmax-steps = 2\n", "trian"),
    "inline table beside a table": ('model = {path = "x"}\n[train]\nbeta = 0.5\n', "model"),
    "inline table alone": ("lr = {value = 1}\n", "lr"),
    "true for an integer": ("max-steps = true\n", "max-steps"),
    "false for an integer in a table": ("[train]\nbatch-size = false\n", "train.batch-size"),
    "a float for an integer": ("max-steps = 2.5\n", "max-steps"),
    "an integer for a switch": ("no-shuffle = 1\n", "no-shuffle"),
    "a string for a number": ('beta = "0.1"\n', "beta"),
    "a number for a string": ("dtype = 32\n", "dtype"),
    "an array for a number": ("beta = [0.1]\n", "beta"),
    "two spellings, two values": ("max-steps = 2\nmax_steps = 3\n", "max_steps"),
    "two spellings, one value": ("max-steps = 2\nmax_steps = 2\n", "max_steps"),
    "two spellings in a table": ("[train]\nbatch-size = 2\nbatch_size = 2\n", "train.batch_size"),
    "another command's top-level key mistyped": ("samples = true\n[train]\nbeta = 0.5\n", "samples"),
}


@pytest.mark.parametrize("case", list(LYING_CONFIGS))
def test_a_config_key_that_is_unknown_mistyped_or_repeated_is_refused(small_cache, tmp_path, case):
    text, key = LYING_CONFIGS[case]
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    result = invoke(["train", small_cache, "--model", MODEL, "--out", tmp_path / "out", "--config", cfg,
                     "--print-config"])
    refused(result, "run.toml", f"field '{key}'")
    assert not (tmp_path / "out").exists()


def test_a_shared_config_file_still_serves_each_command(small_cache, tmp_path):
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f'model = "{MODEL}"\nsamples = 2\nbeta = 1\n[train]\nmax-steps = 3\n[eval]\nmax-new-tokens = 8\n')
    import tomllib
    train_cfg = invoke(["train", small_cache, "--out", tmp_path / "o", "--config", cfg, "--print-config"])
    assert train_cfg.exit_code == 0, train_cfg.stderr
    values = tomllib.loads(train_cfg.stdout)
    assert (values["model"], values["max-steps"], values["beta"]) == (str(MODEL), 3, 1)
    eval_cfg = invoke(["eval", small_cache, "--config", cfg, "--print-config"])
    assert eval_cfg.exit_code == 0, eval_cfg.stderr
    values = tomllib.loads(eval_cfg.stdout)
    assert (values["model"], values["samples"], values["max-new-tokens"]) == ([str(MODEL)], 2, 8)


# 4. Hangs and unbounded work ---------------------------------------------------------------------

@pytest.fixture()
def fifo(tmp_path):
    """A FIFO, and a thread that, for 120 s, gives each reader that opens it one line and then the
    end of the file: code that reads it (dpocli before this fix) fails instead of hanging the test."""
    import errno
    import threading
    import time
    made = []

    def make(name: str) -> Path:
        path = tmp_path / name
        os.mkfifo(path)
        stop = threading.Event()

        def feed():
            deadline, fed = time.monotonic() + 120, False
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as err:
                    if err.errno != errno.ENXIO:
                        return
                    fed = False  # no reader (any more): the next one gets a line
                    time.sleep(0.02)
                    continue
                if not fed:
                    os.write(fd, b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
                    fed = True
                os.close(fd)  # the reader sees the end of the file once it has read the line
                time.sleep(0.02)
        thread = threading.Thread(target=feed, daemon=True)
        thread.start()
        made.append((stop, thread))
        return path
    yield make
    for stop, thread in made:
        stop.set()
        thread.join()


def test_an_input_or_output_that_is_a_fifo_is_refused(small_cache, tmp_path, fifo):
    cases = {
        "input": lambda p: ["precompute-ref", p, "--model", MODEL, "--out", tmp_path / "c", "--quiet"],
        "per-example": lambda p: ["eval", small_cache, "--model", MODEL, "--per-example", p, "--quiet"],
        "config": lambda p: ["train", small_cache, "--config", p, "--print-config"],
    }
    for name, args in cases.items():
        path = fifo(f"{name}.jsonl" if name != "config" else "run.toml")
        refused(invoke(args(path)), str(path), "not a regular file")
    assert not (tmp_path / "c").exists()


class _Tokenizer:
    pad_token_id, eos_token_id = 0, 2

    def get_vocab(self):
        return {}


class _Model:
    """Records what `generate` was asked for; its config says it has 32 positions."""

    def __init__(self):
        import types
        self.config = types.SimpleNamespace(max_position_embeddings=32)
        self.asked = []

    def generate(self, inputs, attention_mask, max_new_tokens, **kwargs):
        import torch
        self.asked.append(max_new_tokens)
        return torch.cat([inputs, torch.full((inputs.shape[0], 1), 5)], dim=1)


def test_max_new_tokens_is_capped_at_the_model_context():
    from dpocli.eval.sampling import _generate
    model = _Model()
    out = _generate(model, [1] * 10, _Tokenizer(), n=2, max_new_tokens=100_000_000, temperature=0, device="cpu")
    assert model.asked == [22] and out == [[5], [5]]
    assert _generate(model, [1] * 8, _Tokenizer(), n=1, max_new_tokens=4, temperature=0, device="cpu") == [[5]]
    assert model.asked == [22, 4]  # within the context: as asked
    # A prompt that fills the context leaves no room: nothing is generated.
    assert _generate(model, [1] * 32, _Tokenizer(), n=1, max_new_tokens=4, temperature=0, device="cpu") == [[]]
    assert model.asked == [22, 4]


def test_eval_samples_with_a_huge_max_new_tokens_finishes_with_a_warning(small_cache, tmp_path):
    model = tmp_path / "short-context"
    shutil.copytree(MODEL, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 48}))
    result = invoke(["eval", small_cache, "--model", model, "--samples", 1, "--max-new-tokens", 100_000_000,
                     "--temperature", 1, "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert "--max-new-tokens 100000000 does not fit the model's context of 48" in " ".join(result.stderr.split())
    text = json.loads(result.stdout)["models"][0]["samples"]["generations"][0]["policy"]
    from transformers import AutoTokenizer
    assert len(AutoTokenizer.from_pretrained(model)(text, add_special_tokens=False)["input_ids"]) <= 48


# 5. Bad input reported as a bug ------------------------------------------------------------------

def nested(depth: int, leaf="x") -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


DEEP_ROWS = {
    "5000 deep in an unused column": '{"prompt": "p", "chosen": "a", "rejected": "b", "meta": %s}' % nested(5000),
    "900 deep in tool-call arguments": (
        '{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "", '
        '"tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": %s}}}]}], '
        '"rejected": [{"role": "assistant", "content": "b"}]}' % nested(900)),
    "150 deep in a message": ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", '
                              '"content": %s}], "rejected": "b"}' % nested(150)),
    "a tools string 5000 deep": ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", '
                                 '"content": "a"}], "rejected": [{"role": "assistant", "content": "b"}], '
                                 '"tools": %s}' % json.dumps(nested(5000))),
}


@pytest.mark.parametrize("case", list(DEEP_ROWS))
def test_a_deeply_nested_row_is_bad_input_naming_file_and_row(tmp_path, case):
    data = tmp_path / "deep.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + DEEP_ROWS[case] + "\n")
    result = invoke(["precompute-ref", data, "--model", MODEL, "--out", tmp_path / "c", "--quiet"])
    refused(result, f"{data}:2:")
    assert not (tmp_path / "c").exists()


def test_a_deeply_nested_parquet_value_is_bad_input(tmp_path):
    from dpocli.errors import DpocliError
    from dpocli.io.nesting import MAX_DEPTH, check_depth
    deep = "x"
    for _ in range(150):
        deep = [deep]
    path = tmp_path / "deep.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "a", "rejected": "b", "tools": deep}]), path)
    refused(invoke(["precompute-ref", path, "--model", MODEL, "--out", tmp_path / "c", "--quiet"]), str(path))
    # Parquet refuses 100 levels and more itself; the row check holds the same line for every reader.
    at_limit = "x"
    for _ in range(MAX_DEPTH):
        at_limit = [at_limit]
    check_depth({"tools": at_limit}, {"file": str(path), "row": 2})
    with pytest.raises(DpocliError) as err:
        check_depth({"tools": [at_limit]}, {"file": str(path), "row": 2})
    assert err.value.one_line().startswith(f"{path}:2: field 'tools'")


def test_deeply_nested_dpocli_files_are_bad_input(short_run, small_cache, tmp_path):
    deep = '{"a": %s}' % nested(100_000)
    cache_dir = tmp_path / "cache"
    shutil.copytree(small_cache, cache_dir)
    (cache_dir / "manifest.json").write_text(deep)
    run = copy_run(short_run, tmp_path / "run")
    (run / "metrics.jsonl").write_text(deep + "\n")
    cfg = tmp_path / "deep.toml"
    cfg.write_text("beta = %s\n" % nested(5000, 1))
    record_run = copy_run(short_run, tmp_path / "record-run")
    (record_run / "run_record.json").write_text(deep)
    config_run = copy_run(short_run, tmp_path / "config-run")
    (config_run / "run_config.json").write_text(deep)
    cases = [(["cache", "info", cache_dir], "manifest.json"), (["cache", "verify", cache_dir], "manifest.json"),
             (["report", run], "metrics.jsonl"), (["train", small_cache, "--config", cfg, "--print-config"], "deep.toml"),
             (["train", small_cache, "--model", MODEL, "--out", record_run, "--resume", "--quiet"], "run_record.json"),
             (["eval", small_cache, "--model", config_run, "--quiet"], "run_config.json")]
    for args, where in cases:
        refused(invoke(args), where)

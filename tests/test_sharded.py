"""FSDP2 runs keep no whole model or optimizer in one process (issue 15): sharded (DCP) checkpoints
that resume on another number of ranks, a streamed final HF folder, sharded loading, and
`precompute-ref --fsdp`. CPU/gloo with torchrun."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import cache_values
from torchrun_runs import copytree, dpo, rmtree, scenario

from conftest import MODEL, invoke, read_jsonl, write_jsonl

pytestmark = pytest.mark.slow

COMMON = ["--max-steps", 4, "--no-shuffle", "--lr", "1e-3", "--save-every", 2, "--fsdp"]


def weights(folder) -> dict:
    """The final model's tensors, from one file or an index of several."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out = {}
    for name in files:
        out.update(load_file(folder / name))
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train(cache, out, nproc: int, *extra):
    # 8 pairs per step in every run: 8 per rank on 1 process, 4 per rank on 2.
    return ["train", cache, "--model", MODEL, "--out", out, "--batch-size", 8 // nproc, *COMMON,
            *(extra or ["--quiet"])]


RESUMES = ((("two", 2), "two", 0.0), (("two", 1), "one", 1e-5), (("one", 2), "one", 1e-5))


@scenario
def sharded_resumes(folder, small_cache):
    """Train on 1 and on 2 ranks, keep a copy of each run as it finished ("-saved"), then resume
    each run's step-2 checkpoint on a fresh copy of the run (a resume must name the run's own
    --out); the (two, 2) resume is kept as "two-resumed-2" before "two" is copied afresh."""
    one, two = folder / "one", folder / "two"
    steps = [dpo("one", *train(small_cache, one, 1), ranks=1), copytree(one, folder / "one-saved"),
             dpo("two", *train(small_cache, two, 2)), copytree(two, folder / "two-saved")]
    order = (("two", 2), ("one", 2), ("two", 1))  # the 1-rank resume runs in the last launch
    for name, nproc in order:
        run = folder / name
        steps += [rmtree(run), copytree(folder / f"{name}-saved", run), rmtree(run / "checkpoint-4"),
                  dpo(f"{name}@{nproc}", *train(small_cache, run, nproc, "--resume"), ranks=nproc)]
        if (name, nproc) == ("two", 2):
            steps.append(copytree(run, folder / "two-resumed-2"))
    return steps


@pytest.mark.torchrun("sharded_resumes")
def test_sharded_checkpoints_resume_across_world_sizes(small_cache, torchrun_scenario):
    runs = torchrun_scenario
    for name in ("one", "two"):
        assert runs[name].returncode == 0, runs[name].stderr
    one, two = runs.folder / "one-saved", runs.folder / "two-saved"  # as the runs finished
    w_one, w_two = weights(one), weights(two)
    print(f"2 ranks vs 1 process: max |weight diff| {max_diff(w_one, w_two):.3g}")
    assert max_diff(w_one, w_two) < 1e-5  # 2 ranks follow 1 rank

    # A sharded checkpoint: each rank's shards through DCP, no whole-model files, no optimizer.pt.
    ckpt = two / "checkpoint-2"
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    assert not (ckpt / "optimizer.pt").exists() and not list(ckpt.glob("*.safetensors"))
    assert (ckpt / "config.json").is_file()
    # Its checksum record, written by rank 0 before the rename, covers every rank's shards.
    checksums = json.loads((ckpt / "checksums.json").read_text())["files"]
    assert {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - set(checksums) \
        == {"checksums.json"}
    assert len([n for n in checksums if n.startswith("dcp/") and n.endswith(".distcp")]) == 2
    record = json.loads((two / "run_record.json").read_text())
    assert {"checkpoint-2", "checkpoint-4", "model.safetensors", "config.json"} <= set(record["files"])

    # dpo eval reads a sharded checkpoint: checkpoint-4 holds the final weights.
    a = invoke(["eval", small_cache, "--model", two / "checkpoint-4", "--json", "--quiet"])
    b = invoke(["eval", small_cache, "--model", two, "--json", "--quiet"])
    assert a.exit_code == 0 and b.exit_code == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["models"][0]["loss"] == json.loads(b.stdout)["models"][0]["loss"]

    # Each resume started from the step-2 checkpoint of a fresh copy of the run. Same world size:
    # bitwise; across world sizes: 1e-5.
    references = {"one": w_one, "two": w_two}
    resumed = {("two", 2): runs.folder / "two-resumed-2", ("two", 1): runs.folder / "two",
               ("one", 2): runs.folder / "one"}
    for (name, nproc), reference, tolerance in RESUMES:
        done, run = runs[f"{name}@{nproc}"], resumed[name, nproc]
        assert done.returncode == 0, done.stderr
        assert "resuming from" in done.stderr and "checkpoint-2" in done.stderr
        assert len([r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]) == 4
        diff = max_diff(weights(run), references[reference])
        print(f"resume of {name}'s checkpoint-2 on {nproc} rank(s): max |weight diff| {diff:.3g}")
        assert diff <= tolerance, (name, nproc)


def test_streamed_final_model_splits_into_indexed_shards(tmp_path):
    """The final folder written one parameter at a time: several files plus an index when it
    exceeds the shard size, read back by from_pretrained with the same values."""
    from transformers import AutoModelForCausalLM

    from dpocli.model import sharding
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    names = sharding.stream_weights(tmp_path, model, max_bytes=100_000)
    model.config.save_pretrained(tmp_path)
    assert "model.safetensors.index.json" in names and len(names) > 3
    expected = {k: v for k, v in model.state_dict().items()}
    assert max_diff(weights(tmp_path), expected) == 0.0
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(10)[None]
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_sharded_loading_builds_no_whole_model(tmp_path):
    """On meta, parameters take no memory; buffers (rotary tables) stay real."""
    from dpocli.model import sharding
    model = sharding.build_on_meta(MODEL, torch.float32, None, False)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())


@scenario
def fsdp_precompute(folder, small_prefs):
    return [dpo("cache", "precompute-ref", small_prefs, "--model", MODEL, "--out", folder / "cache-fsdp",
                "--rows-per-shard", 16, "--batch-size", 8, "--quiet", "--json", "--fsdp")]


@pytest.mark.torchrun("fsdp_precompute")
def test_fsdp_precompute_equals_one_process(small_cache, torchrun_scenario):
    out = torchrun_scenario.folder / "cache-fsdp"
    done = torchrun_scenario["cache"]
    assert done.returncode == 0, done.stderr
    one, two = cache_values(small_cache), cache_values(out)
    assert one.keys() == two.keys()
    assert all(one[key][:2] == two[key][:2] for key in one)
    diff = max(abs(one[k][i] - two[k][i]) for k in one for i in (2, 3))
    print(f"precompute --fsdp vs 1 process: max |ref logps diff| {diff:.3g}")
    assert diff <= 1e-4
    a = json.loads((small_cache / "manifest.json").read_text())
    b = json.loads((out / "manifest.json").read_text())
    assert a["spec"] == b["spec"]


@scenario
def fsdp_eval(folder, small_cache):
    """A model that differs from the reference, saved with the tiny model's tokenizer files."""
    from transformers import AutoModelForCausalLM
    perturbed = folder / "perturbed"
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(perturbed)
    for f in MODEL.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, perturbed / f.name)
    return [dpo("eval", "eval", small_cache, "--model", perturbed, "--json", "--quiet", "--fsdp")]


@pytest.mark.torchrun("fsdp_eval")
def test_fsdp_eval_equals_one_process(small_cache, torchrun_scenario):
    """`dpo eval --fsdp` on 2 ranks (each loads only its part of each weight) gives the metrics
    of a one-process eval, for a model that differs from the reference."""
    perturbed = torchrun_scenario.folder / "perturbed"
    one = invoke(["eval", small_cache, "--model", perturbed, "--json", "--quiet"])
    assert one.exit_code == 0, one.stderr
    two = torchrun_scenario["eval"]
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout)["models"][0], json.loads(two.stdout)["models"][0]
    assert a["rewards/accuracies"] == b["rewards/accuracies"] and 0 < a["rewards/accuracies"] < 1
    for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "entropy"):
        assert b[key] == pytest.approx(a[key], abs=1e-5), key
    print(f"eval --fsdp vs 1 process: loss {a['loss']:.6f} vs {b['loss']:.6f}")


@scenario
def fsdp_tied(folder, sample_rows):
    """A tiny model with tied input/output embeddings, and 16 rows to score with it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    tied = folder / "tied"
    config = AutoConfig.from_pretrained(MODEL)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tied)
    for f in MODEL.iterdir():
        if "token" in f.name or f.name == "chat_template.jinja":
            shutil.copy(f, tied / f.name)
    prefs = write_jsonl(folder / "p.jsonl", sample_rows[:16])
    common = [prefs, "--model", tied, "--rows-per-shard", 4, "--batch-size", 4, "--quiet", "--json"]
    return [dpo("one", "precompute-ref", *common, "--out", folder / "one", ranks=1),
            dpo("two", "precompute-ref", *common, "--out", folder / "two", "--fsdp")]


@pytest.mark.torchrun("fsdp_tied")
def test_fsdp_precompute_of_a_tied_model_equals_one_process(torchrun_scenario):
    """Tied input/output embeddings stay one parameter in the root unit under forward-only
    sharding (the embedding and head are their own units only when untied)."""
    for name in ("one", "two"):
        assert torchrun_scenario[name].returncode == 0, torchrun_scenario[name].stderr
    folder = torchrun_scenario.folder
    a, b = cache_values(folder / "one"), cache_values(folder / "two")
    assert a.keys() == b.keys() and len(a) == 16
    diff = max(abs(a[k][i] - b[k][i]) for k in a for i in (2, 3))
    print(f"tied model, precompute --fsdp vs 1 process: max |ref logps diff| {diff:.3g}")
    assert diff <= 1e-4

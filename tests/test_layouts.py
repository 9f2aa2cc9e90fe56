"""`--layout` (dpocli/model/layouts.py): what auto chooses, that the older flags keep their meaning, that
the layout that ran is recorded, and that caches and runs made before `--layout` (padded, no
`layout` field) still resume, confirm and evaluate unchanged."""

from __future__ import annotations

import json

import pytest

from conftest import MODEL, invoke, read_jsonl
from dpocli.cache.store import read_manifest
from dpocli.errors import DpocliError
from dpocli.model import layouts

CPU = {"device_type": "cpu"}


@pytest.mark.parametrize("kwargs,expected", [
    (CPU, "packed-shared"),
    ({"device_type": "cuda"}, "padded"),
    ({**CPU, "attn_implementation": "sdpa"}, "packed-shared"),
    ({**CPU, "attn_implementation": "eager"}, "padded"),
    ({**CPU, "compile": True}, "padded"),
    ({**CPU, "torchrun": True}, "padded"),
    ({**CPU, "model_config": {"model_type": "gemma2", "attn_logit_softcapping": 50.0}}, "padded"),
    ({**CPU, "model_config": {"model_type": "gpt_oss"}}, "padded"),
    ({**CPU, "model_config": {"model_type": "x", "text_config": {"attn_logit_softcapping": 30.0}}}, "padded"),
    # MoE: the router's aux loss depends on a batch's tokens (TRL's is the padded batch's); a VLM's
    # image batches are padded.
    ({**CPU, "model_config": {"model_type": "mixtral", "num_local_experts": 4}}, "padded"),
    ({**CPU, "model_config": {"model_type": "qwen2_moe", "num_experts": 8}}, "padded"),
    ({**CPU, "model_config": {"model_type": "llava", "vision_config": {}, "text_config": {}}}, "padded"),
    ({**CPU, "started_with": (False, False)}, "padded"),
    ({"device_type": "cuda", "started_with": (True, True)}, "packed-shared"),
])
def test_auto_chooses_by_device_model_and_the_run_it_resumes(kwargs, expected):
    kwargs = {"model_config": {"model_type": "llama"}, **kwargs}
    assert layouts.choose("auto", False, False, **kwargs) == expected


@pytest.mark.parametrize("packing,sharing,expected", [
    (True, False, "packed"), (False, True, "shared"), (True, True, "packed-shared")])
def test_the_older_flags_keep_their_meaning_on_every_device(packing, sharing, expected):
    for device in ("cpu", "cuda"):
        assert layouts.choose("auto", packing, sharing, device_type=device,
                              started_with=(False, False)) == expected


def test_an_explicit_layout_wins_over_device_and_resume():
    assert layouts.choose("padded", False, False, device_type="cpu", model_config={}) == "padded"
    assert layouts.choose("packed", False, False, device_type="cuda", started_with=(True, True)) == "packed"
    assert layouts.FLAGS["shared"] == (False, True)


def test_an_unreadable_model_config_means_padded(tmp_path):
    assert layouts.read_model_config(tmp_path) is None
    assert layouts.choose("auto", False, False, device_type="cpu", model_config=None) == "padded"
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert layouts.packable(layouts.read_model_config(tmp_path))


@pytest.mark.parametrize("layout,flags", [("padded", ["--packing"]), ("bogus", [])])
def test_bad_layout_arguments_are_refused_before_any_work(small_prefs, tmp_path, layout, flags):
    result = invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", tmp_path / "c",
                     "--layout", layout, *flags])
    assert result.exit_code == 2 and "--layout" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "c").exists()
    with pytest.raises(DpocliError):
        layouts.check(layout, bool(flags), False)


def _train(cache, out, *args):
    return invoke(["train", cache, "--model", MODEL, "--out", out, "--max-steps", 2, "--batch-size", 8,
                   "--lr", "1e-3", "--no-shuffle", "--quiet", "--json", *args])


@pytest.fixture(scope="module")
def auto_cache(tmp_path_factory, small_prefs):
    out = tmp_path_factory.mktemp("auto") / "cache"
    result = invoke(["precompute-ref", small_prefs, "--model", MODEL, "--out", out, "--rows-per-shard", 16,
                     "--batch-size", 8, "--quiet"])
    assert result.exit_code == 0, result.stderr
    return out


def test_default_precompute_on_cpu_is_packed_shared_and_recorded(auto_cache):
    manifest = read_manifest(auto_cache)
    assert manifest.spec["batching"]["packing"] is True and manifest.spec["batching"]["prefix_sharing"] is True
    assert manifest.created["attention_kernel"] == "packed-sdpa"


@pytest.mark.slow
def test_a_default_cache_trains_and_evaluates_in_every_layout(auto_cache, tmp_path):
    losses = {}
    for name in layouts.FLAGS:
        out = tmp_path / name
        result = _train(auto_cache, out, "--layout", name)
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["step0_policy_is_reference"] and summary["step0_max_abs_diff"] < 1e-4
        config = json.loads((out / "run_config.json").read_text())
        assert (config["layout"], config["packing"], config["prefix_sharing"]) == (name, *layouts.FLAGS[name])
        steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
        losses[name] = [r["loss"] for r in steps]
        if name == "padded":
            tokens = [r["num_tokens"] for r in steps]
        # TRL's num_tokens (the prompt counted per sequence), whatever the layout
        assert [r["num_tokens"] for r in steps] == tokens
    for name, values in losses.items():
        assert values == pytest.approx(losses["padded"], rel=1e-5), name
    # eval replays the cache's own (packed-shared) layout: the reference is exactly neutral
    m = json.loads(invoke(["eval", auto_cache, "--model", MODEL, "--json", "--quiet"]).stdout)["models"][0]
    assert m["rewards/margins"] == 0.0 and m["rewards/accuracies"] == 0.0


def test_default_train_records_the_layout_that_ran(small_cache, tmp_path):
    result = _train(small_cache, tmp_path / "r")
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "r" / "run_config.json").read_text())
    assert (config["layout"], config["packing"], config["prefix_sharing"]) == ("packed-shared", True, True)
    assert config["attention_kernel"] == "packed-sdpa"


@pytest.mark.slow
def test_a_run_started_before_layout_existed_resumes_padded(small_cache, tmp_path):
    out = tmp_path / "old"
    assert _train(small_cache, out, "--layout", "padded", "--save-every", 1).exit_code == 0
    # what dpocli wrote before --layout: no `layout` field, padded flags
    config_path = out / "run_config.json"
    config = json.loads(config_path.read_text())
    del config["layout"]
    config_path.write_text(json.dumps(config))
    result = _train(small_cache, out, "--resume")  # default flags: auto keeps the run's layout
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["attention_kernel"] == "default"  # padded, not packed-sdpa
    refused = _train(small_cache, out, "--resume", "--layout", "packed-shared")
    assert refused.exit_code == 2 and "packing" in refused.stderr


def test_a_padded_cache_from_before_layout_is_confirmed_by_a_default_rerun(small_prefs, tmp_path):
    out = tmp_path / "c"
    args = ["precompute-ref", small_prefs, "--model", MODEL, "--out", out, "--rows-per-shard", 16,
            "--batch-size", 8, "--quiet", "--json"]
    assert invoke([*args, "--layout", "padded"]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = invoke(args)  # default flags: auto keeps the cache's layout instead of refusing it
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "already_complete"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    replaced = invoke([*args, "--overwrite"])  # --overwrite: a new cache, in the device's layout
    assert replaced.exit_code == 0, replaced.stderr
    assert read_manifest(out).spec["batching"]["packing"] is True

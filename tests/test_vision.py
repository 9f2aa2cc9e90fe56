"""Vision-language DPO on the bundled tiny LLaVA and Idefics3 (sample_data/make_vlm_sample.py): token
ids and a 5-step trajectory against TRL 1.16's VLM DPO (tests/fixtures/trl_vlm_FAMILY.json, recorded by
tests/fixtures/make_trl_vlm.py with TRL's own collator and trainer, reference live), the
reference's neutrality on its own cache, and the one-line refusals of bad images."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import MODEL, SAMPLE, invoke
from dpocli.cache import store as cache
from dpocli.errors import DpocliError
from dpocli.model import vision

FAMILIES = ("llava", "idefics3")
VLM = SAMPLE / "tiny-llava"  # the family of the tests that are about rows, not models
ROWS = SAMPLE / "vlm_train.jsonl"
TRL = {f: json.loads((Path(__file__).parent / "fixtures" / f"trl_vlm_{f}.json").read_text()) for f in FAMILIES}


def _precompute(tmp_path_factory, family: str) -> Path:
    out = tmp_path_factory.mktemp(f"vlm-{family}") / "cache"
    result = invoke(["precompute-ref", ROWS, "--model", SAMPLE / f"tiny-{family}", "--out", out, "--quiet"])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_cache(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, _precompute(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def vlm_cache(tmp_path_factory) -> Path:
    return _precompute(tmp_path_factory, "llava")


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sample_rows() -> list[dict]:
    return [json.loads(line) for line in ROWS.read_text().splitlines()]


def test_token_ids_equal_trl(family_cache):
    """Every row's prompt (image tokens expanded), chosen and rejected ids as TRL's VLM collator."""
    family, vlm_cache = family_cache
    table = pq.read_table(vlm_cache / "part-00000.parquet").to_pylist()
    assert len(table) == len(TRL[family]["ids"]) == 12
    for row, want in zip(table, TRL[family]["ids"]):
        assert row["id"] == want["id"]
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == \
               (want["prompt_ids"], want["chosen_ids"], want["rejected_ids"])


def test_cache_holds_images_and_info_counts_them(vlm_cache):
    table = pq.read_table(vlm_cache / "part-00000.parquet")
    images = table.column("images").to_pylist()
    sample = _sample_rows()
    assert [len(x) for x in images] == [len(r["images"]) for r in sample]
    first = (SAMPLE / sample[0]["images"][0]).read_bytes()
    assert images[0][0] == first
    assert table.column("image_sha256").to_pylist()[0][0] == vision.sha256_bytes(first)
    result = invoke(["cache", "info", vlm_cache, "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)["vision"]
    assert info["images"] == sum(len(r["images"]) for r in sample)
    assert info["image_bytes"] == sum((SAMPLE / p).stat().st_size for r in sample for p in r["images"])


def test_reference_on_its_own_cache_is_neutral(family_cache):
    family, vlm_cache = family_cache
    result = invoke(["eval", vlm_cache, "--model", SAMPLE / f"tiny-{family}", "--json"])
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["models"][0]
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-12)
    assert metrics["rewards/margins"] == 0.0 and metrics["rewards/chosen"] == 0.0


def test_trajectory_follows_trl(family_cache, tmp_path):
    """5 steps from the cache vs TRL 1.16 with its reference live (same rows in order, batch 4),
    within 1e-4 relative (measured on CPU fp32: within 4e-6), and the final folder loads as a VLM
    with its processor."""
    family, vlm_cache = family_cache
    t = TRL[family]["train"]
    run = tmp_path / "run"
    result = invoke(["train", vlm_cache, "--model", SAMPLE / f"tiny-{family}", "--out", run, "--batch-size", t["batch_size"],
                     "--lr", t["lr"], "--max-steps", t["steps"], "--no-shuffle", "--scheduler", "linear",
                     "--beta", t["beta"], "--quiet"])
    assert result.exit_code == 0, result.stderr
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert len(steps) == 5 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-9)
    for ours, theirs in zip(steps, TRL[family]["steps"]):
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/chosen",
                    "rewards/rejected", "entropy", "logits/chosen", "logits/rejected", "learning_rate"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-9), (ours["step"], key)
        assert ours["rewards/accuracies"] == theirs["rewards/accuracies"]
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(run)
    processor = AutoProcessor.from_pretrained(run, backend="pil")
    names = {"llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
             "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor")}
    assert (type(model).__name__, type(processor).__name__) == names[family]


def _error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["missing", "undecodable", "too_many_parts"])
def test_bad_images_are_one_line_naming_the_row(tmp_path, case):
    rows = _sample_rows()[:3]
    for r in rows:
        r["images"] = [str(SAMPLE / p) for p in r["images"]]
    if case == "missing":
        rows[1]["images"] = [str(tmp_path / "nope.png")]
    elif case == "undecodable":
        (tmp_path / "bad.png").write_bytes(b"not a png at all")
        rows[1]["images"] = ["bad.png"]  # relative to the input file
    else:
        rows[1]["images"] = []
    path = _rows(tmp_path / "rows.jsonl", rows)
    line = _error(invoke(["precompute-ref", path, "--model", VLM, "--out", tmp_path / "c"]))
    assert f"{path}:2" in line, line
    assert not (tmp_path / "c").exists()
    expect = {"missing": "cannot read image file", "undecodable": "does not decode as an image",
              "too_many_parts": "1 image part(s) but the row brings 0 image(s)"}[case]
    assert expect in line


def test_images_given_to_a_text_model_are_refused(tmp_path):
    path = _rows(tmp_path / "rows.jsonl", _sample_rows()[:2])
    line = _error(invoke(["precompute-ref", path, "--model", MODEL, "--out", tmp_path / "c"]))
    assert "image" in line


@pytest.mark.parametrize("form", ["struct", "raw"])
def test_image_bytes_as_struct_and_raw(tmp_path, form):
    """The {bytes, path} struct HF datasets writes into Parquet, and raw bytes, read like files,
    giving the same token ids as the file paths."""
    import pyarrow as pa
    rows = _sample_rows()[:4]
    blobs = [[(SAMPLE / p).read_bytes() for p in r["images"]] for r in rows]
    for r, row in zip(rows, blobs):
        r["images"] = [{"bytes": b, "path": "elsewhere.png"} for b in row] if form == "struct" else row
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    read = vision.read_vision_examples(path)
    assert [[d for d, _ in ex.images] for ex in read] == blobs
    processor = vision.load_processor(VLM)
    for ex, want in zip(read, TRL["llava"]["ids"]):
        pair = vision.tokenize_vision_pair(ex, processor, 1024)
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == \
               (want["prompt_ids"], want["chosen_ids"], want["rejected_ids"])


def test_layouts_without_images_are_refused(vlm_cache, tmp_path):
    line = _error(invoke(["precompute-ref", ROWS, "--model", VLM, "--out", tmp_path / "c", "--packing"]))
    assert "--packing" in line
    line = _error(invoke(["train", vlm_cache, "--model", VLM, "--out", tmp_path / "r", "--prefix-sharing",
                          "--max-steps", 1]))
    assert "--prefix-sharing" in line


def test_changed_image_bytes_are_caught(vlm_cache, tmp_path):
    """A shard whose image bytes were rewritten: train refuses and `cache verify` fails; and the
    per-row sha256 names the row when the bytes no longer match what precompute recorded."""
    copy = tmp_path / "cache"
    shutil.copytree(vlm_cache, copy)
    shard = copy / "part-00000.parquet"
    table = pq.read_table(shard)
    images = table.column("images").to_pylist()
    images[2][0] = images[2][0][:-1] + bytes([images[2][0][-1] ^ 1])
    import pyarrow as pa
    table = table.set_column(table.schema.get_field_index("images"), "images",
                             pa.array(images, table.schema.field("images").type))
    pq.write_table(table, shard)
    assert invoke(["train", copy, "--model", VLM, "--out", tmp_path / "r", "--max-steps", 1]).exit_code == 2
    assert invoke(["cache", "verify", copy]).exit_code != 0
    with pytest.raises(DpocliError) as err:  # past the shard checksum: the row's own sha256
        cache.load_cache(copy, checksums=False)
    assert err.value.row == 3 and "changed since precompute" in str(err.value)


def test_lora_goes_on_the_language_model_only(family_cache, tmp_path):
    """--lora-r on a VLM: adapters on the language model's q_proj/v_proj (none in the vision tower,
    which has layers of the same names), step-0 check passes, --merge gives a loadable VLM folder."""
    family, vlm_cache = family_cache
    model_dir = SAMPLE / f"tiny-{family}"
    run = tmp_path / "run"
    result = invoke(["train", vlm_cache, "--model", model_dir, "--out", run, "--batch-size", 4,
                     "--max-steps", 2, "--lora-r", 4, "--merge", "--no-shuffle", "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["step0_max_abs_diff"] < 1e-3
    from transformers import AutoModelForImageTextToText
    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    decoder = base.get_decoder()
    prefix = next(n for n, m in base.named_modules() if m is decoder) + "."
    assert "vision" not in prefix
    targets = json.loads((run / "adapter_config.json").read_text())["target_modules"]
    assert targets and all(t.startswith(prefix) for t in targets), targets
    assert {t.rsplit(".", 1)[-1] for t in targets} == {"q_proj", "v_proj"}
    merged = AutoModelForImageTextToText.from_pretrained(run / "merged")
    changed = {n for n, p in merged.state_dict().items() if not (p == base.state_dict()[n]).all()}
    assert changed and all(n.startswith(prefix) for n in changed), changed


def test_cache_verify_rescores_a_vision_cache_and_a_rerun_is_a_no_op(vlm_cache):
    result = invoke(["cache", "verify", vlm_cache, "--rescore", 4, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rescore_max_abs_diff"] < 1e-4
    again = invoke(["precompute-ref", ROWS, "--model", VLM, "--out", vlm_cache, "--json", "--quiet"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "already_complete"


def test_standard_rows_with_placeholders(tmp_path):
    """A standard row holding the chat text itself (with `<image>`) gives the ids TRL gives the
    conversational row it renders; a placeholder count that does not fit the images is one line."""
    row = _sample_rows()[0]
    text = {k: row[k][0]["content"] for k in ("chosen", "rejected")}
    standard = {"id": "std", "images": [str(SAMPLE / row["images"][0])],
                "prompt": "<s><|user|>\n<image>What colour is this?<|end|>\n<|assistant|>\n",
                "chosen": text["chosen"] + "<|end|>\n", "rejected": text["rejected"] + "<|end|>\n"}
    bad = {**standard, "id": "bad", "prompt": "<image>" + standard["prompt"]}
    path = _rows(tmp_path / "std.jsonl", [standard, bad])
    read = vision.read_vision_examples(path)
    processor = vision.load_processor(VLM)
    pair = vision.tokenize_vision_pair(read[0], processor, 1024)
    want = TRL["llava"]["ids"][0]
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == \
           (want["prompt_ids"], want["chosen_ids"], want["rejected_ids"])
    line = _error(invoke(["precompute-ref", path, "--model", VLM, "--out", tmp_path / "c"]))
    assert f"{path}:2: field 'prompt'" in line and "2 <image> tokens and 1 images" in line


def test_text_rows_with_a_vlm_take_the_text_path(tmp_path):
    """No image column: TRL uses its text collator even for a VLM, and so does dpocli (a text cache
    whose spec has no `vision` entry, ids as for the tokenizer alone); train runs one step on it."""
    path = tmp_path / "text.jsonl"
    path.write_text("".join((SAMPLE / "train.jsonl").read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "cache"
    result = invoke(["precompute-ref", path, "--model", VLM, "--out", out, "--quiet"])
    assert result.exit_code == 0, result.stderr
    manifest = cache.read_manifest(out)
    assert "vision" not in manifest.spec and "images" not in pq.read_schema(out / "part-00000.parquet").names
    from dpocli.data.examples import read_examples
    from dpocli.data.tokenization import tokenize_pair
    from dpocli.model.load import load_tokenizer
    tok = load_tokenizer(str(VLM))
    want = [tokenize_pair(ex, tok, 1024).chosen_ids for ex in read_examples(path).examples]
    assert pq.read_table(out / "part-00000.parquet").column("chosen_ids").to_pylist() == want
    run = invoke(["train", out, "--model", VLM, "--out", tmp_path / "run", "--max-steps", 1, "--quiet"])
    assert run.exit_code == 0, run.stderr


def test_null_images_mean_no_images(tmp_path):
    rows = _sample_rows()
    rows = [dict(rows[4], images=None)]  # the sample's row without image parts
    read = vision.read_vision_examples(_rows(tmp_path / "rows.jsonl", rows))
    assert read[0].images == ()

"""Training peak memory of vision-language DPO: dpocli from its cache vs TRL 1.16 (reference live).

Rows (each in its own process, so peaks do not mix):
  dpocli-precompute  `dpo precompute-ref` with the VLM reference (stage 1, once per dataset)
  dpocli-train       `dpo train` from that cache: the reference is never loaded
  trl                TRL 1.16's DPOTrainer on the same rows (it refuses precompute_ref_log_probs for
                     vision datasets, so its reference VLM stays loaded and runs every step)
Same rows (sample_data/vlm_train.jsonl), batch, steps, fp32 on CPU (bf16 on CUDA), AdamW,
sequential order. Figures: peak RSS (ru_maxrss) of the process and, on CUDA,
torch.cuda.max_memory_allocated.

Shapes:
  tiny           sample_data/tiny-idefics3 (about 0.3M parameters: start-up dominates RSS)
  smolvlm-256m   Idefics3 with SmolVLM-256M-Instruct's shapes (SigLIP-B/16 at 512 px, 12 layers,
                 768 wide; SmolLM2-135M text: 30 layers, 576 wide, vocab 49280; pixel-shuffle 4):
                 random weights, built here; one 512x512 tile per image (no splitting)

Usage:
  python bench/vlm_memory.py --shapes tiny --trl-python /tmp/trlenv/bin/python
  python bench/vlm_memory.py --shapes smolvlm-256m --batch-size 2 --steps 2 --trl-python ...
  (bench/gpu.sh runs it with --device cuda after its text rows)
Writes bench/results/vlm_memory_SHAPES_DEVICE.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "sample_data" / "vlm_train.jsonl"


def build_smolvlm_shapes(folder: Path) -> Path:
    """Idefics3 at SmolVLM-256M's shapes, random weights, with the sample's tokenizer."""
    sys.path.insert(0, str(ROOT / "sample_data"))
    import torch
    from make_vlm_sample import CHAT_TEMPLATE, IDEFICS3_TOKENS, IMAGE_TOKEN, _tokenizer
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    tok = _tokenizer()
    tok.add_tokens(IDEFICS3_TOKENS, special_tokens=True)
    config = Idefics3Config(
        text_config={"model_type": "llama", "vocab_size": 49280, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "max_position_embeddings": 8192, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 512, "patch_size": 16},
        scale_factor=4, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config)
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": 512}, do_image_splitting=False,
                                                  max_image_size={"longest_edge": 512}),
        tokenizer=tok, image_seq_len=(512 // 16) ** 2 // 16, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def rows_file(folder: Path) -> Path:
    """The sample rows with absolute image paths (TRL reads the paths as given)."""
    out = folder / "rows.jsonl"
    with open(out, "w") as fh:
        for line in ROWS.read_text().splitlines():
            row = json.loads(line)
            row["images"] = [str(ROWS.parent / p) for p in row["images"]]
            fh.write(json.dumps(row) + "\n")
    return out


def run_child(cmd: list[str]) -> tuple[dict, float]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - t


def trl_worker(args) -> None:
    """Runs under TRL's Python: DPOTrainer on the rows; prints one JSON line."""
    import torch
    from datasets import Dataset, Image, List
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    class Sequential(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
    raw = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    for row in raw:
        del row["id"]
    dataset = Dataset.from_list(raw).cast_column("images", List(Image()))
    cuda = args.device == "cuda"
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model, backend="pil")
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                           learning_rate=1e-5, use_cpu=not cuda, bf16=cuda, fp16=False, logging_steps=1,
                           save_strategy="no", report_to="none", disable_tqdm=True, max_length=1024,
                           dataloader_num_workers=0)
        Sequential(model=model, args=config, train_dataset=dataset, processing_class=processor).train()
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if cuda:
        out["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=["tiny", "smolvlm-256m"], default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--trl-python", default=sys.executable)
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model")
    p.add_argument("--rows")
    args = p.parse_args()
    if args.trl_worker:
        trl_worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = ROOT / "sample_data" / "tiny-idefics3" if args.shapes == "tiny" else \
            build_smolvlm_shapes(tmp / "model")
        rows = rows_file(tmp)
        # fp32 weights everywhere; on CUDA dpocli trains under bf16 autocast, as TRL's bf16=True does
        autocast = ["--autocast", "bfloat16"] if args.device == "cuda" else []
        results = {"shapes": args.shapes, "device": args.device, "batch_size": args.batch_size,
                   "steps": args.steps, "rows": {}}
        pre, pre_s = run_child([sys.executable, "-m", "dpocli", "precompute-ref", str(rows), "--model", str(model),
                                "--out", str(tmp / "cache"), "--device", args.device, "--json", "--quiet"])
        results["rows"]["dpocli-precompute"] = {"peak_rss_mb": pre["peak_rss_mb"], "seconds": round(pre_s, 1)}
        train, train_s = run_child([sys.executable, "-m", "dpocli", "train", str(tmp / "cache"), "--model",
                                    str(model), "--out", str(tmp / "run"), "--batch-size", str(args.batch_size),
                                    "--max-steps", str(args.steps), "--no-shuffle", "--device", args.device,
                                    *autocast, "--lr", "1e-5", "--json", "--quiet"])
        results["rows"]["dpocli-train"] = {k: train[k] for k in ("peak_rss_mb", "peak_gpu_mem_mb") if k in train}
        results["rows"]["dpocli-train"]["seconds"] = round(train_s, 1)
        trl, trl_s = run_child([args.trl_python, __file__, "--trl-worker", "--model", str(model), "--rows",
                                str(rows), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                                "--device", args.device])
        results["rows"]["trl"] = {**trl, "seconds": round(trl_s, 1)}
    out = ROOT / "bench" / "results" / f"vlm_memory_{args.shapes}_{args.device}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

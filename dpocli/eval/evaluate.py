"""`dpo eval`: score checkpoints against a held-out cache (the reference lives in the cache).

Per model, every metric below is computed from four [N] vectors: policy and cached reference
summed log-probs of chosen and rejected, plus completion lengths. Definitions (N pairs, β, and
h_i = Δw_i − Δl_i with Δ = policy − reference sums):

    loss                       the chosen loss type(s) at β over all N pairs (as in training, with
                               WPO weights and LD-DPO sums when asked), + coef·aux_loss for MoE
    aux_loss                   MoE only: the router load-balancing loss of each forward batch,
                               averaged weighted by the batch's pairs (TRL's eval_aux_loss)
    rewards/accuracies         mean 1[β·Δw > β·Δl] (strict: ties count as wrong)
    rewards/margins            mean β·h, with std and p5/p25/p50/p75/p95 under rewards/margins_*
    rewards/chosen|rejected    mean β·Δw, mean β·Δl
    logps/chosen|rejected      mean over pairs of summed policy log-probs
    logps/chosen_per_token     Σ_i logp_i / Σ_i len_i (token-weighted), likewise rejected
    preference_prob/mean       mean σ(β·h): the implicit probability that chosen is preferred
    entropy, logits/chosen|rejected, mean_token_accuracy
                               TRL's LM-head metrics (metrics.py), token-weighted over the whole set
    displacement/chosen_below_ref   fraction of pairs with policy chosen log-prob < reference's
                                    (likelihood displacement); rejected likewise
    length_bias/<bucket>       accuracy and count by bucket of len(chosen) − len(rejected) tokens

Assumptions: batches replay precompute's plan and layout, and the model runs in the cache's dtype
and attention implementation unless told otherwise (with a warning), so evaluating the reference
reproduces the cache exactly on the same hardware (margins 0, accuracy 0, sigmoid loss ln 2).
A model whose folder holds a tokenizer must have the cache's (as in train).
"""

from __future__ import annotations

import glob
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import torch

from dpocli import __version__
from dpocli.cache import store as cache
from dpocli.errors import DpocliError
from dpocli.eval.config import EvalConfig
from dpocli.eval.sampling import sample_report
from dpocli.io import ownership as outputs
from dpocli.io.atomic import atomic_path, temporary_base
from dpocli.io.console import ProgressBar, log, warn
from dpocli.io.state_files import StateFile
from dpocli.model import distributed, quantization
from dpocli.model.devices import resolve_device
from dpocli.model.load import load_causal_lm, load_causal_lm_sharded
from dpocli.model.logprobs import CompletionScorer, router_aux_coefficient
from dpocli.objective.losses import LossSpec
from dpocli.objective.metrics import LENGTH_BUCKETS, pair_metrics  # noqa: F401 (LENGTH_BUCKETS: for summaries)
from dpocli.objective.spec import LOSS_OPTIONS, spec_from_options
from dpocli.options import LossOpts
from dpocli.scoring import shared_cache
from dpocli.scoring.policy import check_model_tokenizer, check_vocab
from dpocli.scoring.replay import RefLogps, cached_reference, check_token_logps, score_cache
from dpocli.scoring.vlm import prepare_cache


def expand_models(patterns: list[str]) -> list[str]:
    """Models in the given order; a glob pattern expands to its matches sorted by trailing number
    (checkpoint-9 before checkpoint-10), skipping dpocli's temporaries (atomic.temporary_base)."""
    def natural(path: str):
        m = re.search(r"(\d+)/?$", path)
        return (int(m.group(1)) if m else -1, path)
    out: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            # dpocli's own temporaries (a checkpoint being written, a crash's leftover) are no models
            matches = sorted((m for m in glob.glob(pattern) if temporary_base(Path(m).name) is None),
                             key=natural)
            if not matches:
                raise DpocliError("matches no model folder", file=pattern, field="--model")
            out += matches
        else:
            out.append(pattern)
    return out


def evaluate_policy(scorer, data, manifest, spec: LossSpec, pad_id: int, device, *,
                    max_tokens: int | None = None, dist=None) -> tuple[dict, dict, RefLogps]:
    """(metrics, per-pair columns, reference values) of the model behind `scorer` on a cache: the
    one evaluation path, used by `dpo eval` and by training's periodic eval (as eval_*)."""
    t0 = time.perf_counter()
    # MoE: as TRL's prediction_step, the eval loss adds coef x the router loss (`spec` resolved
    # against the model by `logprobs.router_aux_coefficient`), which metrics log as aux_loss.
    policy = score_cache(scorer, data, manifest, pad_id, device, max_tokens=max_tokens, dist=dist,
                         token_stats=True, ld_alpha=spec.ld_alpha, router_aux=bool(spec.router_aux_loss_coef))
    ref = cached_reference(data, range(data.num_rows), "cpu", spec.ld_alpha)
    metrics, columns = pair_metrics(policy, ref, spec)
    # HF's evaluate() speed metrics (eval_runtime, eval_samples_per_second once renamed); no
    # steps_per_second: eval batches follow precompute's token budget, not a batch size.
    seconds = time.perf_counter() - t0
    metrics["runtime"] = round(seconds, 4)
    metrics["samples_per_second"] = round(data.num_rows / seconds, 3) if seconds > 0 else None
    return metrics, columns, ref


# The mark of a file `dpo eval --per-example` wrote, which no file has by chance: the Parquet
# schema's metadata key, and in JSONL a field of every row (JSONL has no other place for it).
PER_EXAMPLE_KEY = "dpocli.per_example"
JSONL_MARK = ("dpocli", "eval --per-example")


def check_per_example_path(path: Path, reads: list[str]) -> None:
    """--per-example may replace only a file `dpo eval` wrote; its folder is created if missing."""
    for source in reads:
        if Path(source).exists() and Path(source).resolve() in path.resolve().parents:
            raise DpocliError(f"lies inside {source}, which this command reads", file=path,
                              field="--per-example", hint="write it somewhere else")
    if path.exists() and not path.is_dir() and not path.is_file():
        raise DpocliError("is not a regular file (a FIFO, socket or device); dpocli writes a file "
                          "it can rename into place", file=path, field="--per-example",
                          hint="give the name of a new file")
    if path.exists() and not path.is_dir() and not _written_by_eval(path):
        raise DpocliError("exists and was not written by `dpo eval`; dpocli will not replace it",
                          file=path, field="--per-example", hint="choose another file name")
    outputs.check_writable_file(path, "--per-example")


def _written_by_eval(path: Path) -> bool:
    """Whether the regular file `path` carries dpo eval's mark: in Parquet, the schema metadata key;
    in JSONL, every line an object with the mark (a line the user added, or a blank one, is not)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            return PER_EXAMPLE_KEY.encode() in (pq.read_schema(path).metadata or {})
        key, mark = JSONL_MARK
        with open(path, encoding="utf-8") as f:
            lines = 0
            for line in f:
                row = json.loads(line)
                if not (isinstance(row, dict) and row.get(key) == mark):
                    return False
                lines += 1
        return lines > 0
    except Exception:  # unreadable, another format, nested too deep: not provably ours
        return False


def numerics_like_cache(manifest: cache.Manifest, dtype: str | None,
                        attn_implementation: str | None) -> tuple[str, str | None]:
    """(dtype, attention implementation) to load models with: the cache's unless given. A value
    that differs from the cache's gets a warning, because the reference then no longer scores
    exactly neutral on its own cache (a bfloat16 cache scored in float32: accuracy 0.23, not 0, on
    30 sample pairs)."""
    cached_attn = manifest.spec["attn_implementation"]  # "default" = transformers' choice (None)
    chosen = {"--dtype": (dtype, manifest.spec["dtype"]),
              "--attn-implementation": (attn_implementation, cached_attn)}
    for flag, (given, cached) in chosen.items():
        if given is not None and given != cached:
            warn(f"{flag} {given} differs from the cache's {cached}: the reference model will not "
                 "score exactly neutral on this cache (small nonzero margins, not exactly 0)")
    dtype = dtype if dtype is not None else manifest.spec["dtype"]
    if attn_implementation is None and cached_attn != "default":
        attn_implementation = cached_attn
    return dtype, attn_implementation


def write_per_example(path: Path, rows: list[dict]) -> None:
    """One row per (model, pair); Parquet or JSONL by suffix, written atomically."""
    import pyarrow as pa
    table = pa.Table.from_pylist(rows)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            pq.write_table(table.replace_schema_metadata({PER_EXAMPLE_KEY: "1"}), tmp)
        elif path.suffix in (".jsonl", ".json"):
            with open(tmp, "w", encoding="utf-8") as f:
                key, mark = JSONL_MARK
                for row in rows:
                    f.write(json.dumps({key: mark, **row}) + "\n")
        else:
            raise DpocliError("must end in .parquet or .jsonl", file=path, field="--per-example")


def run_config_of(model: str) -> Path | None:
    """The run_config.json of the dpocli run that wrote `model`: in a run folder itself, or beside a
    checkpoint-N folder inside one (train.py writes it there; the name is fixed by train.RUN_CONFIG)."""
    folder = Path(model)
    for candidate in (folder, folder.parent if re.fullmatch(r"checkpoint-\d+", folder.name) else None):
        if candidate is not None and (candidate / "run_config.json").is_file():
            return candidate / "run_config.json"
    return None


def _flag(option: str) -> str:
    return "--ipo-sum" if option == "ipo_length_normalized" else "--" + option.replace("_", "-")


def loss_options_from_runs(models: list[str], options: dict, given: frozenset[str]) -> tuple[dict, list[str]]:
    """`options` with every loss option not in `given` replaced by the value the models were trained
    with, and the run_config.json files it came from. Models that are not dpocli runs have no say;
    runs that disagree on an option not given are refused (the loss would be ambiguous).
    --rpo-alpha stands for a --loss and --loss-weights: either side given takes nothing of the
    other side from a run, so that the user's choice does not meet a run's conflicting one."""
    if given & {"loss", "loss_weights"}:
        given = given | {"rpo_alpha"}
    if "rpo_alpha" in given:
        given = given | {"loss", "loss_weights"}
    saved: dict[str, dict] = {}
    for model in models:
        path = run_config_of(model)
        if path is not None:
            config = StateFile.read_json(path, hint="the run's settings are damaged; pass the loss "
                                                    "options explicitly").data
            saved[str(path)] = {k: config[k] for k in LOSS_OPTIONS if k in config and k not in given}
    if not saved:
        return options, []
    (first_path, first), *rest = saved.items()
    for path, other in rest:
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise DpocliError(f"the models come from runs trained with different loss options ({key}: "
                                  f"{first.get(key)!r} in {first_path}, {other.get(key)!r} in {path})",
                                  field="--model", hint=f"pass {_flag(key)} (and the other loss options) "
                                                        "explicitly to score them alike")
    return {**options, **first}, list(saved)


def run_eval(cfg: EvalConfig) -> dict:
    """Metrics of each of `cfg.models` on the cache. `model_revision` applies to every model (each
    must then be a hub id). `load_in_4bit` ...: score each model (an adapter folder: its base)
    quantized, as `dpo train` trained a QLoRA adapter."""
    t0 = time.perf_counter()
    cfg.check()
    models = expand_models(list(cfg.models))
    if not models:
        raise DpocliError("give at least one --model", field="--model")
    options, options_from = cfg.loss_options(), []
    if cfg.loss_given is not None:
        options, options_from = loss_options_from_runs(models, options, cfg.loss_given)
        if options_from:
            log(f"loss options from {', '.join(options_from)}: " +
                ", ".join(f"{k}={options[k]!r}" for k in LOSS_OPTIONS if k not in cfg.loss_given))
    spec = spec_from_options(LossOpts(**options))
    dist = distributed.current()
    manifest, data = shared_cache.load_cache(cfg.cache, dist=dist)  # one copy per node under torchrun
    if prepare_cache(cfg.cache, manifest, data) is not None and (cfg.samples or cfg.fsdp):
        raise DpocliError("is not supported on a vision-language cache yet",
                          field="--samples" if cfg.samples else "--fsdp")
    if spec.ld_alpha is not None:  # LD-DPO needs per-token reference values (as train)
        check_token_logps("--ld-alpha", (cfg.cache, data))
    if cfg.per_example:  # checked before the evaluation, so a bad path does not lose its results
        check_per_example_path(Path(cfg.per_example), [cfg.cache, *models])
    results, per_rows = _score_models(cfg, models, spec, manifest, data, dist)
    if cfg.per_example and dist.is_main:
        write_per_example(Path(cfg.per_example), per_rows)
        log(f"wrote {len(per_rows)} per-example rows to {cfg.per_example}")
    return {"command": "eval", "dpocli_version": __version__, "cache": str(cfg.cache),
            "spec_fingerprint": manifest.spec_fingerprint, "beta": options["beta"], "loss": options["loss"],
            "loss_options": options, "loss_options_from": options_from,
            "pairs": data.num_rows, "models": results, "per_example": cfg.per_example,
            "seconds": round(time.perf_counter() - t0, 3)}


def _score_models(cfg: EvalConfig, models: list[str], spec: LossSpec, manifest, data, dist) -> tuple:
    """(one result entry per model, the per-example rows of all models), in the cache's numerics."""
    quant = quantization.of_config(cfg)
    dtype, attn_implementation = numerics_like_cache(manifest, cfg.dtype, cfg.attn_implementation)
    if quant is not None:
        log(f"scoring with the weights in {quant.describe()}; the cache holds the unquantized reference, "
            "so even the reference scores away from 0")
    dev = dist.device_for(resolve_device(cfg.device))
    pad_id = int(manifest.spec["tokenizer"]["pad_token_id"])
    results, per_rows = [], []
    with ProgressBar("eval", len(models)) as bar:
        for path in models:
            check_model_tokenizer(path, manifest, trust_remote_code=cfg.trust_remote_code,
                                  revision=cfg.model_revision)
            model, scorer = _load_scorer(path, cfg.fsdp, lambda m: check_vocab(m, data, cfg.cache),
                                         dtype=dtype, device=dev, attn_implementation=attn_implementation,
                                         trust_remote_code=cfg.trust_remote_code, revision=cfg.model_revision,
                                         quantization=quant)
            # TRL's router_aux_loss_coef: the one asked for (or the run's), else this model's config's
            coef = router_aux_coefficient(model, spec.router_aux_loss_coef)
            metrics, columns, ref = evaluate_policy(scorer, data, manifest,
                                                    replace(spec, router_aux_loss_coef=coef), pad_id, dev,
                                                    max_tokens=cfg.max_tokens, dist=dist)
            # HF's evaluate() names: eval_runtime, eval_samples_per_second (the rest stay unprefixed)
            entry = {"model": path, **{("eval_" + k if k in ("runtime", "samples_per_second") else k): v
                                       for k, v in metrics.items()}}
            if cfg.samples:
                entry["samples"] = _samples(cfg, model, path, data, dev, dtype)
            results.append(entry)
            if cfg.per_example:
                per_rows += per_example_rows(path, data, columns, ref)
            del model
            bar.update(1)
    return results, per_rows


def _samples(cfg: EvalConfig, model, path: str, data, device, dtype: str) -> dict:
    """--samples: generations for held-out prompts and a Monte-Carlo KL(policy || reference)."""
    return sample_report(model, path, data, cfg.samples, ref_model=cfg.ref_model,
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         kl_samples=cfg.kl_samples, seed=cfg.seed, device=device, dtype=dtype,
                         tokenizer_dir=Path(cfg.cache) / cache.TOKENIZER_DIR)


def per_example_rows(model: str, data, columns: dict, ref: RefLogps) -> list[dict]:
    """One `--per-example` row per pair: the model's per-pair metric columns and the cached values."""
    return [{"model": model, "id": data.ids[i], "source_row": int(data.source_row[i]),
             **{k: (bool(v[i]) if v.dtype == torch.bool else float(v[i])) for k, v in columns.items()},
             "ref_chosen_logps": float(ref.chosen_logps[i]),
             "ref_rejected_logps": float(ref.rejected_logps[i]),
             "chosen_len": int(ref.chosen_len[i]), "rejected_len": int(ref.rejected_len[i])}
            for i in range(data.num_rows)]


def _load_scorer(path: str, fsdp: bool, check, **load):
    """(model, scorer) to evaluate. With `fsdp` the model is built on meta, sharded in small
    forward-only units and each rank loads only its part (as precompute-ref --fsdp);
    score_cache keeps the ranks in step. `check(model)` runs before any weight is read when it can."""
    if not fsdp:
        model = load_causal_lm(path, **load)
        check(model)
        return model, CompletionScorer(model)

    def shard(model):
        check(model)  # shapes only
        return distributed.shard_for_inference(model, CompletionScorer(model))
    load.pop("quantization")  # None: refused with fsdp by run_eval
    return load_causal_lm_sharded(path, shard, **load)



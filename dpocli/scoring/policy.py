"""The policy: loaded (optionally quantized), checked against the cache, adapted (LoRA), wrapped
for the ranks.

Checks that a policy fits a cache: same tokenizer (the ids mean the same words), ids in its
vocabulary, and at step 0 the step-0 check (policy = reference reproduces the cached values; a
quantized policy cannot, so there the difference is reported, not enforced).
"""

from __future__ import annotations

from pathlib import Path

from dpocli.cache import store as cache
from dpocli.data.tokenization import tokenizer_fingerprint
from dpocli.errors import DpocliError, RunFailure
from dpocli.io.console import log, warn
from dpocli.model import distributed, lora, quantization
from dpocli.model.load import (
    DTYPES,
    active_dropout,
    load_causal_lm,
    load_causal_lm_sharded,
    load_tokenizer,
    resolve_model_dir,
    weights_fingerprint,
)
from dpocli.model.logprobs import CompletionScorer

# Tolerance on summed log-probs when checking that a policy reproduces cached reference values.
# Per token the error is about one ulp of the logit scale; sums over hundreds of tokens grow it.
STEP0_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.25}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_tokenizer(model: str, manifest: cache.Manifest, *, trust_remote_code: bool = False,
                          allow_mismatch: bool = False, override_flag: str | None = None,
                          revision: str | None = None):
    """The model folder's own tokenizer, refused (exit 2) when it differs from the one that made
    the cache; None when the folder has no tokenizer (nothing to compare; `check_vocab` still runs).

    `allow_mismatch` turns the refusal into a warning; `override_flag` names the command's flag
    for that in the hint (train has --allow-tokenizer-mismatch, eval has none).
    """
    folder = resolve_model_dir(model, revision)
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        return None
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer_fingerprint(tokenizer) != manifest.spec["tokenizer"]["fingerprint"]:
        message = ("the model's tokenizer differs from the one that produced the cache, so cached "
                   "token ids would mean different text")
        if not allow_mismatch:
            hint = "precompute the cache with this model's tokenizer"
            if override_flag:
                hint += f", or pass {override_flag} if you know the vocabularies agree"
            raise DpocliError(message, file=model, field="tokenizer.fingerprint", hint=hint)
        warn(message + f" ({override_flag} given)")
    return tokenizer


def load_policy_tokenizer(cfg, manifest: cache.Manifest):
    """The tokenizer to ship with checkpoints: the policy's own if it has one (and it must match the
    cache's, unless overridden), else the one stored in the cache."""
    tokenizer = check_model_tokenizer(cfg.model, manifest, trust_remote_code=cfg.trust_remote_code,
                                      allow_mismatch=cfg.allow_tokenizer_mismatch,
                                      override_flag="--allow-tokenizer-mismatch", revision=cfg.model_revision)
    if tokenizer is not None:
        return tokenizer
    log("the policy folder has no tokenizer; using the cache's")
    return load_tokenizer(str(Path(cfg.cache) / cache.TOKENIZER_DIR))


def check_vocab(model, data: cache.CacheData, cache_path: str) -> None:
    """Every cached id must be a row of the policy's embedding matrix."""
    vocab = model.get_input_embeddings().weight.shape[0]
    top = max((int(values.max()) for name, (values, _) in data.lists.items()
               if name in cache.ID_COLUMNS and values.size), default=-1)
    if top >= vocab:
        raise DpocliError(f"holds token id {top}, but the policy's vocabulary has {vocab} entries",
                          file=cache_path, field="token ids",
                          hint="this cache was made with another tokenizer/model family")


def build_policy(cfg, data: cache.CacheData, resume_from, device):
    """(model, scorer): the policy in train mode, and the module the loop calls (the completion
    scorer, wrapped for DDP or FSDP under torchrun). LoRA checkpoints hold only the adapter, so
    LoRA always starts from the base weights.

    LoRA with --fsdp takes the path of one process: every rank loads the whole base model and
    adds the adapter exactly as one process does (same seed, same A matrices, B = 0), then
    `fully_shard` shards frozen and trainable parameters alike. The peak per rank is the whole
    base model during set-up (as with DDP); after sharding it holds its shard of it."""
    from_checkpoint = resume_from is not None and cfg.lora_r is None
    weights_path = str(resume_from[1]) if from_checkpoint else cfg.model
    quant = quantization.of_config(cfg)  # checked by cfg.check: only with LoRA, never with --fsdp
    if cfg.fsdp and cfg.lora_r is None:
        return _build_sharded_policy(cfg, data, weights_path, None if from_checkpoint else cfg.model_revision,
                                     device)
    model = load_causal_lm(weights_path, dtype=cfg.dtype, device=device,
                           revision=None if from_checkpoint else cfg.model_revision,
                           attn_implementation=cfg.attn_implementation, quantization=quant,
                           trust_remote_code=cfg.trust_remote_code, keep_dropout=cfg.keep_dropout)
    check_vocab(model, data, cfg.cache)
    if quant is not None:
        # No peft.prepare_model_for_kbit_training, as TRL 1.16's DPOTrainer: its fp32 copies of the
        # norms, embeddings and LM head cost memory (GBs with large vocabularies) while the chunked
        # head already computes in fp32, and `dpo eval --load-in-4bit` then scores the same numerics.
        # peft freezes the base; checkpointing is switched on below, non-reentrant, as for any run.
        layers = quantization.quantized_modules(model)
        log(f"base weights in {quant.describe()}: " + ", ".join(f"{n} {k}" for k, n in layers.items()))
    if cfg.lora_r is not None:
        model = (lora.resume(model, resume_from[1]) if resume_from else
                 lora.wrap(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules, use_dora=cfg.use_dora,
                           use_rslora=cfg.use_rslora, modules_to_save=cfg.lora_modules_to_save))
        log(lora.trainable_summary(model))
    model.train()
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    scorer = CompletionScorer(model, chunk_size=cfg.chunk_size, compile=cfg.compile)
    # With FSDP the mixed-precision policy casts parameters (instead of autocast in the loop).
    scorer = distributed.wrap_for_training(scorer, model, device, cfg.fsdp,
                                           DTYPES[cfg.autocast] if cfg.autocast else None)
    return model, scorer


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (TRL's default). transformers 5.2x renamed
    gradient_checkpointing_enable and warns on the old name; earlier 5.x has only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _build_sharded_policy(cfg, data: cache.CacheData, weights_path: str, revision: str | None, device):
    """FSDP2: built on meta, sharded per decoder layer, then each rank loads only its part
    (modeling.load_causal_lm_sharded). A sharded checkpoint's weights are loaded again with its
    optimizer state by checkpoint_state.restore; loading them here too keeps one path."""
    def wrap(model):
        check_vocab(model, data, cfg.cache)  # shapes only: before any weight is read
        model.train()
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        scorer = CompletionScorer(model, chunk_size=cfg.chunk_size, compile=cfg.compile)
        return distributed.shard_model(model, scorer,
                                       DTYPES[cfg.autocast] if cfg.autocast else None)
    model, scorer = load_causal_lm_sharded(weights_path, wrap, dtype=cfg.dtype, device=device,
                                           attn_implementation=cfg.attn_implementation,
                                           trust_remote_code=cfg.trust_remote_code,
                                           keep_dropout=cfg.keep_dropout, revision=revision)
    model.train()
    return model, scorer


def merged_policy(cfg, model, run_dir: Path):
    """The LoRA policy with its adapter merged, as a plain model for RUN_DIR/merged. A quantized
    base is not merged into (that would round the update into 4/8 bits and save a bitsandbytes
    model): the base is loaded again unquantized in --dtype, on the CPU, and the adapter just saved
    in `run_dir` merged into it. Under --fsdp the adapter is sharded, so rank 0 does the same
    (the adapter is saved in the training dtype: the merged weights are the same numbers)."""
    quant = quantization.of_config(cfg)
    if quant is None and not cfg.fsdp:
        return model.merge_and_unload()
    log(f"merging the saved adapter into the base loaded again ({cfg.dtype}, on the CPU)")
    return load_causal_lm(str(run_dir), dtype=cfg.dtype, device="cpu",
                          attn_implementation=cfg.attn_implementation,
                          trust_remote_code=cfg.trust_remote_code, keep_dropout=cfg.keep_dropout)


def step0_check(cfg, manifest: cache.Manifest, diff: float, model) -> dict:
    """Policy == reference at step 0 must reproduce the cached values (catches tokenization,
    precision and parallelism drift). Enforced only when the policy has the reference's weights;
    `diff` is the max |policy − cached reference| over the first micro-batch of every rank.

    A quantized policy has not: its base is the reference rounded to 4 or 8 bits, while the cache
    holds the unquantized reference's values (TRL 1.16's reference would be the quantized base
    with the adapter disabled, so its step-0 loss is ln 2 and ours is not). How far the rounding
    moves a summed log-prob depends on the model and the length, so no tolerance can separate it
    from real drift: the difference is logged as the quantization error and not enforced."""
    ref = manifest.spec["reference_model"]  # hashed the way the cache was (full unless recorded)
    mode = ref.get("fingerprint", "full")
    same_weights = weights_fingerprint(cfg.model, cfg.model_revision, mode=mode)["sha256"] == ref["sha256"]
    precision = cfg.autocast or cfg.dtype
    tolerance = STEP0_TOLERANCE[precision]
    quant = quantization.of_config(cfg)
    if same_weights and quant is not None:
        log(f"step-0: the policy is the reference in {quant.describe()}, the cache holds the unquantized "
            f"reference: max |Δ| = {diff:.3g} is the quantization error (not checked); rewards start "
            "away from 0 and the loss away from ln 2")
        same_weights = False
    elif not same_weights:
        log(f"step-0: policy weights differ from the cache's reference (max |Δ| = {diff:.3g}); "
            "rewards start away from 0")
    else:
        log(f"step-0 check: max |policy - cached reference| = {diff:.3g} (tolerance {tolerance:g})")
        if diff > tolerance and not cfg.skip_step0_check:
            dropout = active_dropout(model) if cfg.keep_dropout else []
            raise RunFailure(
                f"step-0 check failed: the policy starts from the reference's weights but its log-probs "
                f"differ from the cache by up to {diff:.3g} (> {tolerance:g} for {precision})",
                hint=(f"--keep-dropout leaves dropout on in training ({', '.join(dropout)}), so the "
                      "policy's log-probs are noisy; drop --keep-dropout" if dropout else
                      "precompute and train with the same --dtype / attention implementation, or pass "
                      "--skip-step0-check"))
    return {"step0_max_abs_diff": diff, "step0_policy_is_reference": same_weights}

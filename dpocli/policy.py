"""Checks that a policy fits a cache: same tokenizer (the ids mean the same words), ids in vocab."""

from __future__ import annotations

from pathlib import Path

from dpocli import cache
from dpocli.console import log, warn
from dpocli.errors import DpocliError
from dpocli.modeling import load_tokenizer, resolve_model_dir
from dpocli.tokenization import tokenizer_fingerprint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_tokenizer(model: str, manifest: cache.Manifest, *, trust_remote_code: bool = False,
                          allow_mismatch: bool = False, override_flag: str | None = None):
    """The model folder's own tokenizer, refused (exit 2) when it differs from the one that made
    the cache; None when the folder has no tokenizer (nothing to compare; `check_vocab` still runs).

    `allow_mismatch` turns the refusal into a warning; `override_flag` names the command's flag
    for that in the hint (train has --allow-tokenizer-mismatch, eval has none).
    """
    folder = resolve_model_dir(model)
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        return None
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
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
                                      override_flag="--allow-tokenizer-mismatch")
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

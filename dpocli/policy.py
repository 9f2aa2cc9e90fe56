"""Checks that a policy fits a cache: same tokenizer (the ids mean the same words), ids in vocab."""

from __future__ import annotations

from pathlib import Path

from dpocli import cache
from dpocli.console import log, warn
from dpocli.errors import DpocliError
from dpocli.modeling import load_tokenizer, resolve_model_dir
from dpocli.tokenization import tokenizer_fingerprint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_policy_tokenizer(cfg, manifest: cache.Manifest):
    """The tokenizer to ship with checkpoints: the policy's own if it has one (and it must match the
    cache's, unless overridden), else the one stored in the cache."""
    expected = manifest.spec["tokenizer"]["fingerprint"]
    folder = resolve_model_dir(cfg.model)
    if any((folder / name).exists() for name in TOKENIZER_FILES):
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        if tokenizer_fingerprint(tokenizer) != expected:
            message = ("the policy's tokenizer differs from the one that produced the cache, so cached "
                       "token ids would mean different text")
            if not cfg.allow_tokenizer_mismatch:
                raise DpocliError(message, file=cfg.model, field="tokenizer",
                                  hint="precompute the cache with this model's tokenizer, or pass "
                                       "--allow-tokenizer-mismatch if you know the vocabularies agree")
            warn(message + " (--allow-tokenizer-mismatch given)")
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

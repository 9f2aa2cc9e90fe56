"""Load models and tokenizers safely (no remote code unless asked, safetensors), and fingerprint them.

Loader failures become one-line `DpocliError`s that say what to fix, instead of transformers'
multi-line tracebacks. Every loaded model has its dropout turned off unless the caller keeps it
(`disable_dropout`), as TRL's `disable_dropout=True` default intends.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from dpocli.data.hub import resolve_model
from dpocli.errors import DpocliError
from dpocli.io import folder_checksums
from dpocli.io.atomic import sha256_file
from dpocli.io.console import log
from dpocli.model import lora, sharding
from dpocli.model.quantization import bnb_config
from dpocli.options import WEIGHTS_FINGERPRINT_MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



def quiet_transformers() -> None:
    """transformers' own progress bars ("Loading weights") would interleave with ours on stderr."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder, or the snapshot folder of a hub id at `revision` (see `hub.resolve_model`)."""
    return resolve_model(name_or_path, revision)[0]


def _explain_load_error(path: str, err: Exception) -> DpocliError:
    text = str(err)
    if "trust_remote_code" in text:
        return DpocliError("this model needs custom code from its repository", file=path,
                           hint="pass --trust-remote-code if you trust it")
    if "Unrecognized configuration class" in text or "does not appear to have" in text:
        return DpocliError("is not a causal language model transformers can load", file=path)
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return DpocliError(f"could not be loaded: {first}", file=path)


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer
    folder = resolve_model_dir(name_or_path, revision)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types here; all mean "cannot load"
        raise _explain_load_error(name_or_path, err) from None


# Dropout probabilities held as plain floats: config fields (attention_dropout, hidden_dropout,
# resid_pdrop, embd_pdrop, layerdrop, ...) and the module attributes copied from them at init.
DROPOUT_NAME = re.compile(r".*(dropout|pdrop|layerdrop)(_prob|_rate|_p)?$")
DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                   torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def active_dropout(model) -> list[str]:
    """Every non-zero dropout setting of `model`: `Dropout` modules and float fields of its modules
    and configs, as 'name=p'. Empty when the model is deterministic in train mode."""
    found = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, DROPOUT_MODULES) and module.p > 0:
            found.setdefault(f"{type(module).__name__}(p={module.p:g})", mod_name)
        for field, value in _dropout_fields(module):
            found.setdefault(f"{field}={value:g}", mod_name)
    for config in _configs(model):
        for field, value in _dropout_fields(config):
            found.setdefault(f"{field}={value:g}", "config")
    return sorted(found)


def disable_dropout(model) -> list[str]:
    """Set every dropout of `model` to 0 in place; returns what was on (`active_dropout`).

    TRL's `disable_dropout_in_model` sets `p = 0` on `torch.nn.Dropout` modules only. transformers'
    attention reads a float instead (Llama: `dropout=0.0 if not self.training else
    self.attention_dropout`, copied from the config at init), and Falcon or GPT-Neo read the config at
    every forward, so TRL 1.16 still trains a Llama with `attention_dropout: 0.3` with attention
    dropout on. We zero those floats and config fields too, so the default policy is deterministic.
    The zeroed config fields are what a checkpoint's config.json then records.
    """
    before = active_dropout(model)
    for module in model.modules():
        if isinstance(module, DROPOUT_MODULES):
            module.p = 0.0
        for field, _ in _dropout_fields(module):
            setattr(module, field, 0.0)
    for config in _configs(model):
        for field, _ in _dropout_fields(config):
            setattr(config, field, 0.0)
    return before


def _dropout_fields(obj) -> list[tuple[str, float]]:
    """(name, p) of float attributes named like a dropout probability and > 0 (bools and None skipped)."""
    return [(k, v) for k, v in vars(obj).items()
            if type(v) is float and v > 0 and DROPOUT_NAME.fullmatch(k)]


def _configs(model) -> list:
    """The model's config and its nested sub-configs (text_config, vision_config, ...)."""
    from transformers import PretrainedConfig
    todo, seen = [getattr(model, "config", None)], []
    while todo:
        config = todo.pop()
        if isinstance(config, PretrainedConfig) and all(config is not c for c in seen):
            seen.append(config)
            todo += [v for v in vars(config).values() if isinstance(v, PretrainedConfig)]
    return seen


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", device: torch.device | str = "cpu",
                   attn_implementation: str | None = None, trust_remote_code: bool = False,
                   keep_dropout: bool = False, revision: str | None = None, quantization=None):
    """An `AutoModelForCausalLM` in `dtype` on `device`, in eval mode, safetensors only, with every
    dropout set to 0 unless `keep_dropout` (it matters only once a caller switches to train mode).
    `revision`: the commit, branch or tag of a hub id (refused for a local folder).
    `quantization` (a `quantization.Quantization`): the linear layers in 4 or 8 bits through
    bitsandbytes, computing in `dtype`; an adapter folder's adapter then stays unmerged."""
    model = _load_causal_lm(name_or_path, dtype=dtype, device=device, revision=revision,
                            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                            quantization=quantization)
    if not keep_dropout:
        turned_off = disable_dropout(model)
        if turned_off:
            log(f"dropout set to 0 ({', '.join(turned_off)}); --keep-dropout keeps it in training")
    return model


def _load_causal_lm(name_or_path: str, *, dtype: str, device: torch.device | str,
                    attn_implementation: str | None, trust_remote_code: bool, revision: str | None = None,
                    quantization=None):
    from transformers import AutoModelForCausalLM
    quiet_transformers()
    folder = resolve_model_dir(name_or_path, revision)
    folder_checksums.verify(folder)  # a dpocli checkpoint or run: refused if changed since written
    if lora.is_adapter_folder(folder):  # a LoRA run: base model named in the adapter + adapter
        base = _load_causal_lm(lora.base_model_path(folder), dtype=dtype, device=device,
                               attn_implementation=attn_implementation,
                               trust_remote_code=trust_remote_code, quantization=quantization)
        # Merging into 4/8-bit weights would round the adapter's update into the quantization grid.
        return lora.apply_for_inference(base, folder, merge=quantization is None).eval()
    if not (folder / "config.json").exists():
        raise DpocliError("has no config.json; not a transformers model folder", file=name_or_path)
    if sharding.is_dcp_folder(folder):  # a checkpoint of an --fsdp run: gathered into this process
        model = sharding.build_on_meta(folder.resolve(), DTYPES[dtype], attn_implementation,
                                       trust_remote_code)
        sharding.load_weights(model, folder, torch.device(device))
        return model.eval()
    # An absolute path, so a LoRA adapter trained on top records where its base model lives.
    folder = folder.resolve()
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=None)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        # bitsandbytes quantizes while placing the weights; a quantized model cannot be moved after.
        kwargs.update(quantization_config=bnb_config(quantization, DTYPES[dtype]), device_map={"": device})
    kwargs["output_loading_info"] = True
    auto = AutoModelForCausalLM
    if has_vision_tower(folder):  # an image-text-to-text model (vision.py): the whole VLM
        from transformers import AutoModelForImageTextToText as auto
    try:
        model, info = auto.from_pretrained(folder, **kwargs)
    except TypeError:  # transformers < 4.56 names the argument torch_dtype
        kwargs["torch_dtype"] = kwargs.pop("dtype")
        model, info = auto.from_pretrained(folder, **kwargs)
    except Exception as err:
        raise _explain_load_error(name_or_path, err) from None
    refuse_missing_weights(name_or_path, info.get("missing_keys") or [])
    return (model if quantization is not None else model.to(device)).eval()


def has_vision_tower(folder: Path) -> bool:
    """A model folder whose config has a vision tower (an image-text-to-text model)."""
    try:
        return isinstance(json.loads((folder / "config.json").read_text()).get("vision_config"), dict)
    except (OSError, ValueError):
        return False


def load_causal_lm_sharded(name_or_path: str, wrap, *, dtype: str = "float32",
                           device: torch.device | str = "cpu", attn_implementation: str | None = None,
                           trust_remote_code: bool = False, keep_dropout: bool = False,
                           revision: str | None = None):
    """(model, root) for FSDP2 without a whole model in any process: the model is built with
    meta parameters, `wrap(model)` shards it and returns the root module, then each rank loads
    its own part (sharding.py). A model with tied embeddings is loaded whole and then wrapped
    (sharding.py, "Assumptions")."""
    folder = resolve_model_dir(name_or_path, revision)
    folder_checksums.verify(folder)
    if lora.is_adapter_folder(folder):
        raise DpocliError("is a LoRA adapter; --fsdp loads full models only", file=name_or_path,
                          hint="merge the adapter first (dpo train --merge), or drop --fsdp")
    if not (folder / "config.json").exists():
        raise DpocliError("has no config.json; not a transformers model folder", file=name_or_path)
    try:
        model = sharding.build_on_meta(folder.resolve(), DTYPES[dtype], attn_implementation,
                                       trust_remote_code)
    except Exception as err:
        raise _explain_load_error(name_or_path, err) from None
    if sharding.has_tied_embeddings(model):
        log("tied input/output embeddings: the model is loaded whole, then sharded")
        model = load_causal_lm(name_or_path, dtype=dtype, device=device,
                               attn_implementation=attn_implementation,
                               trust_remote_code=trust_remote_code, keep_dropout=keep_dropout,
                               revision=revision)
        return model, wrap(model)
    if not keep_dropout:
        disable_dropout(model)
    root = wrap(model)
    sharding.load_weights(model, folder, torch.device(device))
    return model.eval(), root


def refuse_missing_weights(name_or_path, missing) -> None:
    """transformers initialises weights a folder lacks at random (and only logs it): for dpocli
    that is an error, never a silently re-initialised model."""
    missing = sorted(missing)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DpocliError(f"holds no weights for {missing[0]!r}{more}; transformers would initialise "
                          "them at random", file=name_or_path, field="weights",
                          hint="the weight files are incomplete or belong to another model: copy the "
                               "folder again")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# "auto" hashes every byte up to this many bytes of weights (about 8B parameters in bf16: ~15 s
# at 1 GB/s, small next to scoring them), and samples above it (minutes for 70B otherwise).
FULL_HASH_LIMIT = 16 * 2**30
SAMPLES, SAMPLE_BYTES = 64, 1 << 16  # per weight file in "sampled" mode: 64 blocks of 64 KiB


def sampled_sha256(path: Path) -> str:
    """sha256 of a weight file's size, its safetensors header (every tensor's name, dtype, shape
    and offsets) and SAMPLES blocks of SAMPLE_BYTES at evenly spaced offsets (first and last
    included): reads ~4 MB per file whatever its size. It catches a different, re-saved or
    truncated file and any retrained tensor of more than a few blocks; it can miss an edit confined
    to bytes between the samples, which `full` (the default below FULL_HASH_LIMIT) cannot."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"size:{size};".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, size - 8)))
        last = max(size - SAMPLE_BYTES, 0)
        for k in range(SAMPLES):
            f.seek(last * k // (SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def weights_fingerprint(name_or_path: str, revision: str | None = None, *, mode: str = "auto") -> dict:
    """sha256 of every weight file and of config.json (mode "full"), or of their sizes, headers
    and sampled bytes ("sampled"); "auto" is full up to FULL_HASH_LIMIT bytes of weights.
    Read once per precompute, it makes a stale cache detectable. The mode used is returned, and a
    cache records it (only when sampled, so caches made before the mode existed stay valid).
    `revision` is the snapshot's commit for a hub id, None for a local folder."""
    if mode not in WEIGHTS_FINGERPRINT_MODES:
        raise DpocliError(f"'{mode}' is not one of {', '.join(WEIGHTS_FINGERPRINT_MODES)}",
                          field="--weights-fingerprint")
    folder = resolve_model_dir(name_or_path, revision)
    files = sorted(p for p in folder.iterdir()
                   if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES))
    if mode == "auto":
        mode = "full" if sum(p.stat().st_size for p in files) <= FULL_HASH_LIMIT else "sampled"
    hash_file = sha256_file if mode == "full" else sampled_sha256
    per_file = {p.name: hash_file(p) for p in files}
    combined = hashlib.sha256("".join(f"{k}:{v};" for k, v in per_file.items()).encode()).hexdigest()
    revision = folder.name if "snapshots" in folder.parts else None
    return {"path": os.fspath(name_or_path), "revision": revision, "sha256": combined, "files": per_file,
            "mode": mode}

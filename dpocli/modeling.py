"""Load models and tokenizers safely (no remote code unless asked, safetensors), and fingerprint them.

Loader failures become one-line `DpocliError`s that say what to fix, instead of transformers'
multi-line tracebacks.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from dpocli.atomic import sha256_file
from dpocli.errors import DpocliError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tolerance on summed log-probs when checking that a policy reproduces cached reference values.
# Per token the error is about one ulp of the logit scale; sums over hundreds of tokens grow it.
STEP0_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.25}


def quiet_transformers() -> None:
    """transformers' own progress bars ("Loading weights") would interleave with ours on stderr."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DpocliError(f"'{name}' is not a device torch knows", field="--device",
                          hint="use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DpocliError("CUDA was requested but no GPU is available", field="--device",
                              hint="use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DpocliError(f"there is no GPU {device.index} (found {torch.cuda.device_count()})",
                              field="--device")
    elif device.type != "cpu":
        accel = getattr(torch, device.type, None)
        if accel is None or not getattr(accel, "is_available", lambda: False)():
            raise DpocliError(f"'{name}' is not available on this machine", field="--device",
                              hint="use --device cpu")
    return device


def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder, or the snapshot folder of a hub id already in the local HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise DpocliError("is a file, expected a model folder", file=name_or_path)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:
        raise DpocliError("no such model folder, and not a hub id in the local HF cache",
                          file=name_or_path, hint="pass a folder with config.json and weights") from None


def _explain_load_error(path: str, err: Exception) -> DpocliError:
    text = str(err)
    if "trust_remote_code" in text:
        return DpocliError("this model needs custom code from its repository", file=path,
                           hint="pass --trust-remote-code if you trust it")
    if "Unrecognized configuration class" in text or "does not appear to have" in text:
        return DpocliError("is not a causal language model transformers can load", file=path)
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return DpocliError(f"could not be loaded: {first}", file=path)


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    folder = resolve_model_dir(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types here; all mean "cannot load"
        raise _explain_load_error(name_or_path, err) from None


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", device: torch.device | str = "cpu",
                   attn_implementation: str | None = None, trust_remote_code: bool = False):
    """An `AutoModelForCausalLM` in `dtype` on `device`, in eval mode, safetensors only."""
    from transformers import AutoModelForCausalLM
    quiet_transformers()
    folder = resolve_model_dir(name_or_path)
    from dpocli import lora
    if lora.is_adapter_folder(folder):  # a LoRA run: base model named in the adapter + adapter
        base = load_causal_lm(lora.base_model_path(folder), dtype=dtype, device=device,
                              attn_implementation=attn_implementation,
                              trust_remote_code=trust_remote_code)
        return lora.apply_for_inference(base, folder).eval()
    if not (folder / "config.json").exists():
        raise DpocliError("has no config.json; not a transformers model folder", file=name_or_path)
    # An absolute path, so a LoRA adapter trained on top records where its base model lives.
    folder = folder.resolve()
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=None)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except TypeError:  # transformers < 4.56 names the argument torch_dtype
        kwargs["torch_dtype"] = kwargs.pop("dtype")
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as err:
        raise _explain_load_error(name_or_path, err) from None
    return model.to(device).eval()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_fingerprint(name_or_path: str) -> dict:
    """sha256 of every weight file and of config.json. Read once per precompute: a few seconds per
    GB, small next to the forward pass, and it makes a stale cache detectable."""
    folder = resolve_model_dir(name_or_path)
    files = sorted(p for p in folder.iterdir()
                   if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES))
    per_file = {p.name: sha256_file(p) for p in files}
    combined = hashlib.sha256("".join(f"{k}:{v};" for k, v in per_file.items()).encode()).hexdigest()
    revision = folder.name if "snapshots" in folder.parts else None
    return {"path": os.fspath(name_or_path), "revision": revision, "sha256": combined, "files": per_file}

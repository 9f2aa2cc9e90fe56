"""LoRA through `peft` (optional extra: `pip install 'dpocli[lora]'`).

With a cache the reference is already scored, so LoRA training needs no adapter switching: the
policy is base + adapter, the reference is the cache. LoRA's B matrices start at zero, so the
step-0 check still sees exactly the base model.

Layout of a LoRA run: RUN_DIR holds the adapter (adapter_config.json + adapter_model.safetensors,
loadable with peft's `AutoPeftModelForCausalLM` or `PeftModel.from_pretrained`), plus, with
`--merge`, RUN_DIR/merged/ as a plain HF model. `dpo eval --model RUN_DIR` loads the base model
named in adapter_config.json and applies the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpocli.errors import DpocliError

ADAPTER_CONFIG = "adapter_config.json"


def _peft(folder: str | Path | None = None):
    """peft, or an error naming what asked for it: --lora-r, or an adapter folder given as a model."""
    try:
        import peft
    except ImportError:
        if folder is not None:
            raise DpocliError("is a LoRA adapter, and loading it needs the peft package", file=folder,
                              hint="pip install 'dpocli[lora]'") from None
        raise DpocliError("LoRA needs the peft package", field="--lora-r",
                          hint="pip install 'dpocli[lora]'") from None
    return peft


def is_adapter_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).exists() and not (path / "config.json").exists()


def is_adapter_model(model) -> bool:
    """A model wrapped by peft (its checkpoints and final folder are the adapter alone)."""
    return getattr(model, "peft_config", None) is not None


def _names(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def wrap(model, *, r: int, alpha: float, dropout: float, target_modules: str | None,
         use_dora: bool = False, use_rslora: bool = False, modules_to_save: str | None = None):
    """Add fresh LoRA adapters. `target_modules` None = peft's default for the architecture
    (q_proj, v_proj for Llama), "all-linear", or a comma-separated list of module names.
    `use_dora`, `use_rslora` and `modules_to_save` are peft's LoraConfig options of those names."""
    peft = _peft()
    targets = "all-linear" if target_modules == "all-linear" else _names(target_modules)
    targets = _language_model_only(model, targets)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             use_dora=use_dora, use_rslora=use_rslora,
                             modules_to_save=_names(modules_to_save), task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise DpocliError(f"cannot be applied: {str(err).splitlines()[0]}",
                          field="--lora-target-modules / --lora-modules-to-save") from None


VLM_DEFAULT_TARGETS = ("q_proj", "v_proj")  # peft's default for Llama-style language models


def _language_model_only(model, targets):
    """A vision-language model's adapters go on its language model only: peft matches module
    names anywhere, so the vision tower's q_proj / v_proj (or all its linears) would get adapters
    too. The targets become the full names of the language model's matching Linear layers (peft's
    default there is q_proj, v_proj). A text-only model's targets are returned as given."""
    if getattr(model.config, "vision_config", None) is None:
        return targets
    import torch
    decoder = model.get_decoder()  # the language model (LLaVA: language_model, Idefics3: text_model)
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    linear = [f"{prefix}.{name}" for name, module in decoder.named_modules()
              if isinstance(module, torch.nn.Linear)]
    wanted = None if targets == "all-linear" else set(targets or VLM_DEFAULT_TARGETS)
    chosen = [name for name in linear if wanted is None or name.rsplit(".", 1)[-1] in wanted]
    if not chosen:
        raise DpocliError(f"matches no Linear layer of the language model ({', '.join(sorted(wanted))})",
                          field="--lora-target-modules")
    return chosen


def resume(model, folder: Path):
    """Base model + the trainable adapter saved in a checkpoint folder."""
    return _peft().PeftModel.from_pretrained(model, folder, is_trainable=True)


def base_model_path(folder: str | Path) -> str:
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise DpocliError("names no base model", file=Path(folder) / ADAPTER_CONFIG,
                          field="base_model_name_or_path")
    return base


def apply_for_inference(base_model, folder: str | Path, merge: bool = True):
    """Base model with the adapter merged in (plain module, fast forward), or beside it."""
    model = _peft(folder).PeftModel.from_pretrained(base_model, folder)
    return model.merge_and_unload() if merge else model


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_weights_in(p) for p in model.parameters())
    return f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"


def _weights_in(param) -> int:
    """Weights a parameter holds: bitsandbytes packs two 4-bit weights per byte of its storage
    (as peft's `get_nb_trainable_parameters` counts them)."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * getattr(getattr(param, "quant_storage", None), "itemsize", 1)
    return param.numel()

"""Quantized base weights (QLoRA) through bitsandbytes (optional extra: `pip install 'dpocli[qlora]'`).

The options are TRL's `ModelConfig` names (`load_in_4bit`, `load_in_8bit`, `bnb_4bit_quant_type`,
`use_bnb_nested_quant`) and give the `BitsAndBytesConfig` TRL's `get_quantization_config` builds,
with the 4-bit compute dtype = `--dtype`. The quantized weights are frozen, so training needs a
LoRA adapter on top.

Invariants:
* every refusal (no `--lora-r`, both widths, `--fsdp`, bitsandbytes or peft missing, a bitsandbytes
  without CPU kernels on a CPU run) is a `DpocliError` raised before any model is loaded or any
  file is written;
* the reference stays the cache, i.e. the unquantized model's values. TRL 1.16 instead scores the
  reference with the quantized base (adapter disabled). So the step-0 difference of a quantized
  policy is its quantization error: reported, never enforced (`policy.step0_check`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass

from dpocli.errors import DpocliError
from dpocli.model.devices import resolve_device

QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit data types (TRL's bnb_4bit_quant_type choices)
CPU_SINCE = (0, 46)  # bitsandbytes releases before 0.46 have CUDA kernels only
INSTALL_HINT = "pip install 'dpocli[qlora]'"


@dataclass(frozen=True)
class Quantization:
    """How the base weights are stored: `bits` 4 or 8; for 4 bits the data type (`nf4`, `fp4`)
    and whether the per-block scales are quantized too (`nested`, bitsandbytes' double quant)."""

    bits: int
    quant_type: str = "nf4"
    nested: bool = False

    @property
    def flag(self) -> str:
        return f"--load-in-{self.bits}bit"

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit (LLM.int8)"
        return f"4-bit {self.quant_type}" + (" with nested quantization" if self.nested else "")


def from_options(*, load_in_4bit: bool = False, load_in_8bit: bool = False, bnb_4bit_quant_type: str = "nf4",
                 use_bnb_nested_quant: bool = False) -> Quantization | None:
    """The quantization the flags ask for (None: full precision), refusing flags that contradict
    each other or would be ignored."""
    if bnb_4bit_quant_type not in QUANT_TYPES:
        raise DpocliError(f"'{bnb_4bit_quant_type}' is not one of {', '.join(QUANT_TYPES)}",
                          field="--bnb-4bit-quant-type")
    if load_in_4bit and load_in_8bit:
        raise DpocliError("cannot be combined with --load-in-8bit (choose one width)", field="--load-in-4bit")
    if not load_in_4bit:
        for flag, ignored in (("--bnb-4bit-quant-type", bnb_4bit_quant_type != "nf4"),
                              ("--use-bnb-nested-quant", use_bnb_nested_quant)):
            if ignored:
                raise DpocliError("only applies to --load-in-4bit", field=flag)
    if load_in_8bit:
        return Quantization(8)
    if load_in_4bit:
        return Quantization(4, bnb_4bit_quant_type, use_bnb_nested_quant)
    return None


def of_config(cfg) -> Quantization | None:
    """`from_options` on a config that has the four fields (TrainConfig)."""
    return from_options(load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit,
                        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                        use_bnb_nested_quant=cfg.use_bnb_nested_quant)


def check_train(cfg) -> None:
    """Refuse what a quantized `dpo train` cannot do, before anything is loaded."""
    quant = of_config(cfg)
    if quant is None:
        return
    if cfg.lora_r is None:
        raise DpocliError("freezes the quantized base weights, so it trains only with a LoRA adapter",
                          field=quant.flag, hint="add --lora-r N (QLoRA)")
    if cfg.fsdp:
        raise DpocliError("cannot be combined with --fsdp (bitsandbytes weights are not sharded)",
                          field=quant.flag, hint="drop --fsdp: under torchrun each rank holds the quantized "
                                                 "model (DDP)")
    check_installed(quant, cfg.device)


def check_installed(quant: Quantization | None, device: str | None) -> None:
    """bitsandbytes and peft importable, and bitsandbytes recent enough for a CPU run on `device`
    (the --device value)."""
    if quant is None:
        return
    for package in ("bitsandbytes", "peft"):
        if importlib.util.find_spec(package) is None:
            raise DpocliError(f"needs the {package} package", field=quant.flag, hint=INSTALL_HINT)
    if resolve_device(device).type == "cpu":
        version = bitsandbytes_version()
        if _release(version) < CPU_SINCE:
            raise DpocliError(f"needs a CUDA device with bitsandbytes {version} (CPU kernels came in "
                              f"{'.'.join(map(str, CPU_SINCE))})", field=quant.flag,
                              hint="pip install -U bitsandbytes, or run on a GPU (--device cuda)")


def bitsandbytes_version() -> str:
    return importlib.metadata.version("bitsandbytes")


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def bnb_config(quant: Quantization, compute_dtype):
    """transformers' `BitsAndBytesConfig`, as TRL's `get_quantization_config` builds it."""
    from transformers import BitsAndBytesConfig
    # LLM.int8 quantizes every input through float16 and bitsandbytes says so at every call of
    # every layer (hundreds of stderr lines per step); the README says it once.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_the_int8_cast_notice)
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=quant.nested)


def _not_the_int8_cast_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quantized_modules(model) -> dict[str, int]:
    """Counts of bitsandbytes layers in `model` by class name (Linear4bit, Linear8bitLt)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if type(module).__module__.startswith("bitsandbytes") and name.startswith("Linear"):
            counts[name] = counts.get(name, 0) + 1
    return counts

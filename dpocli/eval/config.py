"""What `dpo eval` takes: the cache, the models, then one field per flag of its option groups (each
declared once, in dpocli/options.py), checked once before anything is loaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dpocli.errors import DpocliError, check_at_least, check_seed, check_torchrun_launch
from dpocli.eval.options import EvalOpts
from dpocli.model import quantization
from dpocli.options import LoadOpts, LossOpts, QuantOpts, composed_fields

# `dpo eval`'s option groups, in the order the command declares them. EvalOpts' repeatable
# `--model` becomes the config's `models` (with the models given as arguments after it).
EVAL_GROUPS = (EvalOpts, LossOpts, LoadOpts, QuantOpts)


class _EvalChecks:
    """The methods of `EvalConfig` (its fields come from the option groups, below)."""

    def loss_options(self) -> dict:
        """The loss options as given (those not in `loss_given` may still come from the runs)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LossOpts)}

    def check(self) -> None:
        """Every check that needs no file or model; 0 keeps its documented meaning for --samples
        (none) and --temperature (greedy)."""
        EvalOpts.__post_init__(self)  # the group's own checks (dtype, --fsdp with --samples)
        check_torchrun_launch(self.fsdp, "eval")
        check_at_least({"--samples": self.samples, "--temperature": self.temperature}, 0)
        check_at_least({"--kl-samples": self.kl_samples, "--max-new-tokens": self.max_new_tokens,
                        "--max-tokens": self.max_tokens}, 1)
        check_seed(self.seed)
        quant = quantization.of_config(self)
        quantization.check_installed(quant, self.device)
        if self.fsdp and quant is not None:
            raise DpocliError("cannot be combined with --fsdp (FSDP2 shards plain weights)",
                              field="--load-in-4bit" if self.load_in_4bit else "--load-in-8bit")
        if self.per_example and Path(self.per_example).suffix not in (".parquet", ".jsonl", ".json"):
            raise DpocliError("must end in .parquet or .jsonl", file=self.per_example, field="--per-example")


# `loss_given`: the loss options the user set (command line or --config); the others come from the
# models' training runs (`evaluate.loss_options_from_runs`). None: use the fields as they are.
EvalConfig = dataclasses.make_dataclass(
    "EvalConfig",
    [("cache", str), ("models", tuple), *composed_fields(*EVAL_GROUPS, without=("model",)),
     ("loss_given", frozenset, dataclasses.field(default=None))],
    bases=(_EvalChecks,), frozen=True)
EvalConfig.__module__ = __name__

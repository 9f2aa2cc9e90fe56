"""What `dpo precompute-ref` takes: the input, then one field per flag of its option groups (each
declared once, in dpocli/options.py), checked once before anything is loaded or written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dpocli.cache.folder import existing_layout
from dpocli.data.batch_plan import Batching
from dpocli.errors import DpocliError, check_torchrun_launch
from dpocli.model import distributed, layouts
from dpocli.model.devices import resolve_device
from dpocli.model.packing import check_layout_flags
from dpocli.options import (
    LayoutOpts,
    LoadOpts,
    ModelOpts,
    OutputOpts,
    PrecomputeOpts,
    check_layout,
    composed_fields,
)

# `dpo precompute-ref`'s option groups, in the order the command declares them.
PRECOMPUTE_GROUPS = (PrecomputeOpts, ModelOpts, LayoutOpts, LoadOpts, OutputOpts)


class _PrecomputeChecks:
    """The methods of `PrecomputeConfig` (its fields come from the option groups, below)."""

    def batching(self) -> Batching:
        if self.batch_size is not None and self.max_tokens is not None:
            raise DpocliError("give --batch-size or --max-tokens, not both", field="--max-tokens")
        for flag, value in (("--batch-size", self.batch_size), ("--max-tokens", self.max_tokens)):
            if value is not None and value < 1:
                raise DpocliError(f"must be at least 1, got {value}", field=flag)
        max_tokens = 16384 if self.batch_size is None and self.max_tokens is None else self.max_tokens
        return Batching(batch_size=self.batch_size, max_tokens=max_tokens,
                        rows_per_shard=self.rows_per_shard, packing=self.packing,
                        prefix_sharing=self.prefix_sharing)

    def with_layout(self, model_dir):
        """This config with the layout that runs in its layout fields: auto keeps the layout of a
        cache already in --out (resumed or confirmed; not one --overwrite replaces), so an older
        default-flags cache is found as it was; else by device and model (model/layouts.py)."""
        keep = self.layout == layouts.AUTO and not self.overwrite
        started = existing_layout(Path(self.out)) if keep else None
        return layouts.apply(self, resolve_device(self.device).type, distributed.under_torchrun(),
                             layouts.read_model_config(model_dir), started)

    def check(self) -> None:
        """Every check that needs no file, model or device: run first, so a bad flag leaves nothing."""
        if self.max_length < 2:
            raise DpocliError("must be at least 2", field="--max-length")
        check_layout(self.layout, self.packing, self.prefix_sharing)
        check_layout_flags(self.prefix_sharing, self.packing, self.attn_implementation)
        if self.rows_per_shard < 1 or self.max_field_bytes < 1:
            raise DpocliError("must be at least 1", field="--rows-per-shard" if self.rows_per_shard < 1
                              else "--max-field-bytes")
        self.batching()
        check_torchrun_launch(self.fsdp, "precompute-ref")


# The input, then the groups' fields, flat (the manifest and config.resolved.toml key them so);
# `chunk_size` is the LM head's vocabulary chunk (no flag: eval replays precompute with the default).
PrecomputeConfig = dataclasses.make_dataclass(
    "PrecomputeConfig",
    [("input", str), *composed_fields(*PRECOMPUTE_GROUPS),
     ("chunk_size", int, dataclasses.field(default=1024))],
    bases=(_PrecomputeChecks,), frozen=True)
PrecomputeConfig.__module__ = __name__

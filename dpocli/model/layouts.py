"""Which batch layout a command runs: `--layout auto|padded|packed|shared|packed-shared`.

The four layouts compute the same log-probs (to rounding: they differ only in which pad tokens and
neighbours share a matmul, see `dpocli.packing`), so the choice is one of speed:

* padded:        2B rows per batch, padded to the longest (`batching.Batch`);
* packed:        `--packing`: every sequence end to end in one row, no pad token;
* shared:        `--prefix-sharing`: one row per pair, the prompt run once, a dense B·T² mask;
* packed-shared: both flags: one padding-free row, each pair's prompt run once.

`auto` (the default) is the fastest layout measured exact on the device (bench/RESULTS.md, "The
default layout"): packed-shared on CPU, padded elsewhere (CUDA is measured by the GPU benchmark
first). Auto also picks padded wherever packing was not measured or cannot run: a chosen
`--attn-implementation` other than sdpa, `--compile`, a torchrun launch, a model whose attention
packing does not support (logit soft-capping, attention sinks), a mixture of experts (its router loss
depends on the batch's tokens) or a vision-language model. On resume, auto keeps the layout
the run or cache was started with, so a cache or run made before `--layout` existed resumes
unchanged. The explicit `--packing` / `--prefix-sharing` flags keep their meaning.

This module imports no torch; the layouts' names are options.py's (`dpo --help` reads them).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from dpocli.data.hub import resolve_model
from dpocli.errors import DpocliError
from dpocli.options import LAYOUT_AUTO, LAYOUT_FLAGS, LAYOUTS, check_layout, layout_name

# The names live in options.py (no torch there, for `dpo --help`).
AUTO, FLAGS, LAYOUTS = LAYOUT_AUTO, LAYOUT_FLAGS, LAYOUTS
name_of, check = layout_name, check_layout
CPU_DEFAULT = "packed-shared"  # measured: bench/RESULTS.md, "The default layout"
OTHER_DEFAULT = "padded"


def packable(model_config: dict | None) -> bool:
    """Whether `dpocli.packing`'s attention supports this model (config.json as a dict; None when
    it could not be read: then not, so auto falls back to the layout every model runs)."""
    if not isinstance(model_config, dict):
        return False
    if "vision_config" in model_config:  # a vision-language model: image batches are padded (vision.py)
        return False
    # A mixture of experts: the router's load-balancing loss is a statistic of a batch's tokens,
    # and sharing the prompt changes which tokens a batch holds (TRL's aux_loss is the padded one's).
    if any(model_config.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        return False
    configs = [model_config, *(v for v in model_config.values() if isinstance(v, dict))]  # text_config etc.
    for c in configs:
        if c.get("attn_logit_softcapping") or c.get("model_type") == "gpt_oss":
            return False
    return True


def read_model_config(model_dir: Path | str | None) -> dict | None:
    """config.json of a local model folder, or None (absent, unreadable, not a folder)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None


def model_config(name_or_path: str, revision: str | None = None) -> dict | None:
    """config.json of --model (a local folder or a hub id in the local cache), or None when it
    cannot be found (the model's loader reports an unusable --model)."""
    try:
        return read_model_config(resolve_model(name_or_path, revision)[0])
    except DpocliError:
        return None


def choose(layout: str, packing: bool, prefix_sharing: bool, *, device_type: str,
           attn_implementation: str | None = None, compile: bool = False, torchrun: bool = False,
           model_config: dict | None = None, started_with: tuple[bool, bool] | None = None) -> str:
    """The layout to run. `started_with`: the (packing, prefix_sharing) of the run or cache being
    resumed (auto keeps it); the other arguments describe the device and the model (see the
    module docstring)."""
    check(layout, packing, prefix_sharing)
    if packing or prefix_sharing:
        return name_of(packing, prefix_sharing)
    if layout != AUTO:
        return layout
    if started_with is not None:
        return name_of(*started_with)
    measured = device_type == "cpu" and attn_implementation in (None, "sdpa") and not compile and not torchrun
    return CPU_DEFAULT if measured and packable(model_config) else OTHER_DEFAULT


def apply(cfg, device_type: str, torchrun: bool, model_config: dict | None,
          started_with: tuple[bool, bool] | None):
    """`cfg` (a TrainConfig or PrecomputeConfig) with the layout that runs (`choose`) in its three
    layout fields: `layout` its name, `packing` / `prefix_sharing` what it stands for."""
    name = choose(cfg.layout, cfg.packing, cfg.prefix_sharing, device_type=device_type,
                  attn_implementation=cfg.attn_implementation, compile=cfg.compile,
                  torchrun=torchrun, model_config=model_config, started_with=started_with)
    packing, prefix_sharing = FLAGS[name]
    return replace(cfg, layout=name, packing=packing, prefix_sharing=prefix_sharing)

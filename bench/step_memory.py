"""Where a `dpo train` step's peak RSS goes: runtime, cache, weights, gradients, Adam state,
activations and allocator slack (issue 25's table in bench/RESULTS.md).

    PYTHONPATH=. python bench/step_memory.py CACHE --model MODEL --out RUN [any other train flags]

Runs `dpo train CACHE --model MODEL --out RUN ...` unchanged in this process (the entry point
`dpocli.cli.app:main`), and reads /proc/self/status around the parts of every step: the resident set
(VmRSS) and its high-water mark (VmHWM), which is reset before each part (`echo 5 >
/proc/self/clear_refs`), so every part's own peak is known. It also counts the bytes of the
tensors that must exist: parameters, gradients (when clipping starts, all of them exist) and the
optimizer state (after the step). Prints one JSON object:

  runtime_mb        RSS before the cache and the model are loaded (Python, torch, transformers, dpocli)
  cache_mb          RSS growth while the cache loads
  weights_mb        parameter bytes;  grads_mb: gradient bytes;  adam_mb: optimizer-state bytes
  steps[k]          per step: peak_mb of forward, backward, optimizer (+ the RSS after each)
  peak_mb           the largest peak of any part of any step (the process's peak RSS once loaded;
                    ru_maxrss cannot be read here, the resets clear it)
  parts             the steady step's peak split: runtime + cache + weights + adam + grads at the
                    peak part + activations (bytes the forward saved for the backward, counted per
                    storage with torch.autograd.graph.saved_tensors_hooks) + slack (the rest of
                    the peak: temporaries of the backward and what the allocator kept)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MB = 2**20


def _status() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / MB
    return fields


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / MB


def main() -> None:
    from dpocli.cli import app as cli
    from dpocli.objective import metrics
    from dpocli.train import loop as train

    rec: dict = {"runtime_mb": _status()["VmRSS"], "steps": []}
    held: dict = {}
    step: dict = {}

    def wrap(module, name, before=None, after=None):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if before:
                before(*args)
            out = real(*args, **kwargs)
            if after:
                after(out)
            return out
        setattr(module, name, wrapper)

    def cache_before(*_):
        held["rss_before_cache"] = _status()["VmRSS"]

    def cache_after(_):
        rec["cache_mb"] = _status()["VmRSS"] - held["rss_before_cache"]

    def policy_after(out):
        held["model"] = out[0]

    def optimizer_after(opt):
        held["optimizer"] = opt

    def forward_before(*_):
        step.clear()
        step["rss_before_forward"] = _status()["VmRSS"]
        _reset_peak()

    def forward_after(_):
        s = _status()
        step.update(forward_peak_mb=s["VmHWM"], rss_after_forward=s["VmRSS"])
        _reset_peak()

    def clip_before(model, *_):
        s = _status()
        step.update(backward_peak_mb=s["VmHWM"], rss_after_backward=s["VmRSS"],
                    grads_mb=_tensor_mb(p.grad for p in model.parameters()))
        _reset_peak()

    wrap(train.shared_cache, "load_cache", cache_before, cache_after)
    wrap(train, "build_policy", after=policy_after)
    wrap(train, "make_optimizer", after=optimizer_after)
    wrap(train, "sequence_logps", forward_before, forward_after)
    real_logps = train.sequence_logps

    def counted(*args, **kwargs):
        # Bytes the forward saves for the backward: unique storages, parameters excluded.
        import torch
        params = {p.untyped_storage().data_ptr() for p in held["model"].parameters()}
        saved: dict = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params and st.device.type == "cpu":
                saved[st.data_ptr()] = st.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = real_logps(*args, **kwargs)
        step["saved_for_backward_mb"] = sum(saved.values()) / MB
        return out
    train.sequence_logps = counted
    wrap(train.distributed, "clip_grad_norm", clip_before)
    real_write = metrics.MetricsLog.write

    def write(self, record):
        if "loss" in record and step:
            s = _status()
            step.update(optimizer_peak_mb=s["VmHWM"], rss_after_step=s["VmRSS"])
            rec["steps"].append(dict(step))
            step.clear()
            _reset_peak()
        return real_write(self, record)

    metrics.MetricsLog.write = write
    sys.argv = ["dpo", "train", *sys.argv[1:]]
    try:
        cli.main()
    except SystemExit as exit_:
        if exit_.code:
            raise
    # ru_maxrss no longer holds the lifetime peak once VmHWM was reset: the largest part's peak does
    rec["peak_mb"] = max(s[f"{p}_peak_mb"] for s in rec["steps"] for p in ("forward", "backward", "optimizer"))
    model, opt = held["model"], held["optimizer"]
    rec["weights_mb"] = _tensor_mb(model.parameters())
    rec["adam_mb"] = _tensor_mb(v for st in opt.state.values() for v in st.values()
                                if hasattr(v, "numel") and v.dim() > 0)
    rec["parts"] = parts(rec)
    print(json.dumps(rec, indent=1))


def parts(rec: dict) -> dict:
    """The steady (last) step's peak, split (see the module docstring)."""
    last = rec["steps"][-1]
    phase = max(("forward", "backward", "optimizer"), key=lambda p: last[f"{p}_peak_mb"])
    peak = last[f"{phase}_peak_mb"]
    grads = last["grads_mb"] if phase != "forward" else 0.0
    fixed = rec["runtime_mb"] + rec["cache_mb"] + rec["weights_mb"] + rec["adam_mb"]
    # Activations: the bytes the forward saved for the backward (counted by storage).
    activations = last["saved_for_backward_mb"]
    slack = peak - fixed - grads - activations
    return {"peak_phase": phase, "peak_mb": peak, "runtime_mb": rec["runtime_mb"], "cache_mb": rec["cache_mb"],
            "weights_mb": rec["weights_mb"], "adam_mb": rec["adam_mb"], "grads_mb": grads,
            "activations_mb": activations, "slack_mb": slack}


if __name__ == "__main__":
    main()

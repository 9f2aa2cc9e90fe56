"""FSDP2 without whole models: sharded loading, sharded (DCP) checkpoints, streamed final weights.

The rule (DESIGN.md, "Scale"): no rank ever holds a whole model or a whole optimizer state that it
could hold a shard of.
* Loading: the model is built with its parameters on the meta device (buffers such as rotary
  tables stay real: they are small and computed, not stored), sharded with `fully_shard`, then
  each parameter is read from the safetensors files alone and cut to this rank's shard before the
  next is read. Peak: this rank's shard plus one full parameter.
* Checkpoints: model and optimizer go through `torch.distributed.checkpoint` (DCP); every rank
  writes only its own shards, and DCP reshards on load, so a run saved by N ranks resumes on M.
* The final model: one parameter at a time is all-gathered and appended by rank 0 to a
  safetensors file whose header was written first (shapes are known without gathering), so rank 0
  holds one full parameter at a time, never the model.

Assumptions:
* Every rank sees the same file system (DCP writes each rank's shards into one folder).
* Models with tied input/output embeddings take the full-load path (the tie must survive
  sharding, and FSDP2 sees it only on real parameters); they are logged as such.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from dpocli.errors import DpocliError

DCP_DIR = "dcp"  # inside a checkpoint folder: DCP's .metadata plus one or more __R_0.distcp files
MAX_SHARD_BYTES = 5 * 2**30  # per safetensors file of the final model (HF's historical default)
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                      torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@contextmanager
def params_on_meta():
    """Construct modules with parameters on the meta device and buffers real (accelerate's
    `init_empty_weights(include_buffers=False)` idea). Each parameter is allocated by its
    constructor as an untouched `torch.empty` and moved to meta at once, so nothing is initialised
    and the model never exists in host memory."""
    register = torch.nn.Module.register_parameter

    def to_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)
    torch.nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_on_meta(folder: Path, dtype: torch.dtype, attn_implementation: str | None,
                  trust_remote_code: bool):
    """The model of `folder`'s config.json with meta parameters (see `params_on_meta`)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the training dtype
    try:
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    finally:
        torch.set_default_dtype(default)
    return model


def has_tied_embeddings(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (sharded with an index, or one file)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file."""
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def _read_rows(path: Path, data_start: int, entry: dict, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) along dim 0 of one stored tensor, read with plain reads (not a memory
    map, whose touched pages would count in this process's resident memory)."""
    dtype = {v: k for k, v in SAFETENSORS_DTYPES.items()}[entry["dtype"]]
    shape = entry["shape"] or [1]
    row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
    out = torch.empty((max(stop - start, 0), *shape[1:]), dtype=dtype)
    if out.numel():
        with open(path, "rb") as f:
            f.seek(data_start + entry["data_offsets"][0] + start * row_bytes)
            f.readinto(out.view(-1).view(torch.uint8).numpy())
    return out if entry["shape"] else out.reshape(())


def _local_part(path: Path, data_start: int, entry: dict, target, device: torch.device):
    """This rank's part of one stored tensor, as the DTensor (or plain tensor) `target` expects.
    FSDP2 shards dim 0 as torch.chunk does: rank r holds rows [r*c, (r+1)*c), c = ceil(n / ranks)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    rows = entry["shape"][0] if entry["shape"] else 1
    if not isinstance(target, DTensor):
        return _read_rows(path, data_start, entry, 0, rows).to(device=device, dtype=target.dtype)
    mesh = target.device_mesh
    if mesh.ndim == 1 and tuple(target.placements) == (Shard(0),) and entry["shape"]:
        chunk = -(-rows // mesh.size())
        start = min(mesh.get_local_rank() * chunk, rows)
        local = _read_rows(path, data_start, entry, start, min(start + chunk, rows))
        return DTensor.from_local(local.to(device=device, dtype=target.dtype), mesh, target.placements,
                                  run_check=False, shape=target.shape, stride=target.stride())
    full = _read_rows(path, data_start, entry, 0, rows).to(device=device, dtype=target.dtype)
    return distribute_tensor(full, mesh, target.placements, src_data_rank=None)


def load_sharded_weights(model, folder: Path, device: torch.device) -> None:
    """Fill an FSDP2-sharded meta model from `folder`'s safetensors: each rank reads only its own
    rows of each parameter (no communication, no memory map), so it never holds more than its
    shard plus one parameter's part."""
    targets = model.state_dict()  # DTensors on meta: shapes and placements, no data
    loaded = {}
    for path in weight_files(folder):
        data_start, header = read_header(path)
        for name, entry in header.items():
            if name in targets:  # skips e.g. a stored rotary inv_freq: computed, not a parameter
                loaded[name] = _local_part(path, data_start, entry, targets[name], device)
    missing = sorted(set(k for k, v in targets.items() if v.device.type == "meta") - set(loaded))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DpocliError(f"holds no weights for {missing[0]!r}{more}", file=folder, field="weights",
                          hint="the weight files are incomplete or belong to another model")
    model.load_state_dict(loaded, strict=False, assign=True)


def materialize(model, device: torch.device) -> None:
    """Give meta parameters real (uninitialised) storage on `device`, keeping the real buffers
    (`to_empty` would wipe them); for a model whose weights then come from a DCP checkpoint."""
    buffers = {name: b.clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    for name, value in buffers.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._buffers[attr] = value.to(device)


def is_dcp_folder(folder: Path) -> bool:
    """A dpocli sharded checkpoint: its weights are in `dcp/`, not in safetensors."""
    return (folder / DCP_DIR / ".metadata").is_file()


def load_weights(model, folder: Path, device: torch.device) -> None:
    """Fill a meta model (FSDP2-sharded or not) from a model folder or a sharded checkpoint."""
    if is_dcp_folder(folder):
        materialize(model, device)
        load_dcp(folder / DCP_DIR, model)
    else:
        load_sharded_weights(model, folder, device)


def _options(trainable_only: bool):
    # Loading trainable parameters only cannot be strict (the frozen ones are "missing"); DCP's
    # own load still fails on any requested key that the checkpoint lacks.
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def save_dcp(folder: Path, model, optimizer, trainable_only: bool = False) -> None:
    """Model and optimizer state, each rank writing its own shards (a collective). With
    `trainable_only` (a LoRA run) the frozen base weights are left out: they are the base model's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=os.fspath(folder))


def load_dcp(folder: Path, model, optimizer=None, trainable_only: bool = False) -> None:
    """Load a DCP checkpoint written by any number of ranks into this run's layout (DCP reads
    each rank's part of every tensor). With `optimizer` None only the model is loaded; with
    `trainable_only` only the trainable parameters (as `save_dcp` wrote them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )
    options = _options(trainable_only)
    if optimizer is None:
        state = {"model": get_model_state_dict(model, options=options)}
        _quiet_dcp_load(dcp, state, folder)
        set_model_state_dict(model, state["model"], options=options)
        return
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optim_state}
    _quiet_dcp_load(dcp, state, folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=options)


def gather_trainable(model) -> dict:
    """The trainable parameters (a LoRA adapter: small) as whole CPU tensors on rank 0, an empty
    dict on the other ranks; every rank must call it (one all-gather per parameter)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))


def _quiet_dcp_load(dcp, state: dict, folder: Path) -> None:
    with warnings.catch_warnings():
        # Outside torchrun (dpo eval of a checkpoint, a 1-process resume) DCP warns that it loads
        # in one process: that is the intent, and the warning would reach the user's stderr.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=os.fspath(folder))


def _shard_plan(tensors: dict, max_bytes: int) -> list[list[str]]:
    """Names grouped into files of at most `max_bytes` (a larger single tensor gets its own)."""
    groups, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _header(tensors: dict, names: list[str]) -> bytes:
    """The safetensors header: 8-byte little-endian length, then JSON padded to 8 bytes."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        meta[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                      "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def stream_weights(folder: Path | None, model, max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `model`'s weights as HF safetensors (one file, or several plus an index) into
    `folder` on the rank that passes one; every rank must call it (each parameter is an
    all-gather). Returns the file names written. Tied duplicates are stored once, as
    `save_pretrained` does."""
    from torch.distributed.tensor import DTensor
    state = model.state_dict()  # sharded DTensors under FSDP: no gather here
    kept = {n for n, _ in model.named_parameters()}  # the first name of each tied parameter
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tensors = {n: t for n, t in state.items() if n in kept or n not in every}
    groups = _shard_plan(tensors, max_bytes)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for file_name, group in zip(names, groups):
        out = open(folder / file_name, "wb") if folder is not None else None
        try:
            if out is not None:
                out.write(_header(tensors, group))
            for name in group:
                t = tensors[name]
                full = t.full_tensor() if isinstance(t, DTensor) else t  # the one all-gather
                if out is not None:
                    # the array's own buffer, no extra bytes copy
                    out.write(full.detach().cpu().contiguous().view(torch.uint8).numpy())
                del full
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
        finally:
            if out is not None:
                out.close()
    if folder is not None and len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {n: f for f, g in zip(names, groups) for n in g}
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        names = names + ["model.safetensors.index.json"]
    return names


"""One code path for 1 process and N torchrun processes.

`current()` detects a torchrun launch (RANK / WORLD_SIZE / LOCAL_RANK in the environment),
initialises torch.distributed once (NCCL on GPU, gloo on CPU) and returns a `DistContext`. In a
plain single process every collective is a no-op that returns what one rank would, so drivers
call them unconditionally and never branch on "am I distributed".
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from dpocli.errors import DpocliError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_for(self, device: torch.device) -> torch.device:
        """Each rank gets its own GPU (by LOCAL_RANK); CPU stays CPU."""
        if device.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast_object(self, obj, src: int = 0):
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def on_main_then_broadcast(self, fn):
        """Run `fn` on rank 0 only and give every rank its result; an error it raises is raised
        on every rank, so no rank is left waiting in a collective when rank 0 refuses."""
        verdict = None
        if self.is_main:
            try:
                verdict = ("ok", fn())
            except DpocliError as err:
                verdict = ("error", err)
        verdict = self.broadcast_object(verdict)
        if verdict[0] == "error":
            raise verdict[1]
        return verdict[1]

    def collective_then_raise(self, fn):
        """Run `fn` on every rank (it may hold collectives, such as a sharded save); a
        `DpocliError` raised on any rank is then raised on all of them (the lowest rank's), so no
        rank returns to the loop while another has failed."""
        try:
            result, verdict = fn(), None
        except DpocliError as err:
            result, verdict = None, err
        errors = [e for e in self.all_gather_object(verdict) if e is not None]
        if errors:
            raise errors[0]
        return result

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def max_over_ranks(self, value: int) -> int:
        return max(self.all_gather_object(value))

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (a sync point); returns `tensor`."""
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor


_context: DistContext | None = None

# glibc raises its mmap threshold each time a large block is freed, after which buffers of a
# few MB (FSDP's per-layer all-gathers and gradient reduce-scatters, optimizer temporaries) come
# from the heap and stay resident after they are freed: measured +40% peak RSS per rank on a
# 160M model. A fixed threshold returns every block above it to the system when freed, at the
# cost of a page fault per large allocation. It is set under torchrun, and by `dpo train` in any
# process (`fix_mmap_threshold`): there a plain process's freed activations stayed resident between
# steps too, measured +8-10% peak RSS on a 58M Llama at batch 8 (bench/RESULTS.md, "Where the peak
# goes").
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold() -> None:
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD (fixed, no dynamic growth)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): their allocators return large blocks already


def under_torchrun() -> bool:
    """Launched by torchrun (also with one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1 or ("RANK" in os.environ and "MASTER_ADDR" in os.environ)


def current() -> DistContext:
    global _context
    if _context is not None:
        return _context
    # A 1-process torchrun launch also gets a process group: FSDP2 and sharded checkpoints need
    # one, and `torchrun --nproc-per-node 1 ... --fsdp` is how a sharded run resumes on one device.
    launched = under_torchrun()
    if launched:
        fix_mmap_threshold()  # a plain process keeps glibc's default unless it trains (train.py)
    if launched and not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("DPOCLI_BACKEND") != "gloo" \
            else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend=backend)
    if tdist.is_initialized():
        _context = DistContext(tdist.get_rank(), tdist.get_world_size(),
                               int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _context = DistContext()
    return _context


def shutdown(finished: bool = False) -> None:
    """Tear down the process group. `finished`: every rank completed the command, so they meet at
    a barrier first, and no rank destroys its group while a peer still has work in flight on it
    (gloo can abort a process whose group goes away under it). After an error there is no barrier:
    the other ranks may never arrive."""
    global _context
    if tdist.is_initialized():
        if finished and tdist.get_world_size() > 1:
            try:
                tdist.barrier()
            except Exception:  # a peer already gone: there is nothing left to wait for
                pass
        tdist.destroy_process_group()
    _context = None


def shard_model(model, scorer, mixed_precision: torch.dtype | None = None):
    """FSDP2: `fully_shard` every decoder layer (the classes the model lists in `_no_split_modules`),
    then the scorer as root, so embeddings / LM head / final norm form the root's group.
    Parameters become DTensors; the forward all-gathers one layer at a time."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32) \
        if mixed_precision else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(scorer, mp_policy=policy)
    return scorer


def decoder_layers(model) -> list:
    """The decoder layers of `model` (the classes it lists in `_no_split_modules`)."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise RuntimeError(f"{type(model).__name__} lists no decoder layer classes to shard")
    return layers


def shard_for_inference(model, scorer):
    """FSDP2 for forward-only scoring (precompute-ref, eval --fsdp), where no backward reuses the
    gathered weights. Every unit reshards right after its forward (the root too: FSDP2 keeps the
    root gathered by default, for the backward), and the units are small: each linear layer of a
    decoder layer, the decoder layer itself (its norms), the input embedding and the LM head
    (`CompletionScorer` gathers the head around its chunked product), then the root (final norm).
    A rank thus holds its shard plus about one linear layer's weight (times the collective's
    buffers), where per-layer units with a gathered root held the embedding, the head and two
    copies of a decoder layer: on 2 ranks that was about the whole model (issue 23). With tied
    embeddings the embedding and head stay in the root (the tie must survive sharding)."""
    from torch.distributed.fsdp import fully_shard
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, reshard_after_forward=True)
        fully_shard(layer, reshard_after_forward=True)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embed.weight:
        fully_shard(embed, reshard_after_forward=True)
        fully_shard(head, reshard_after_forward=True)
    fully_shard(scorer, reshard_after_forward=True)
    if tdist.get_backend() == "gloo":
        comm = InPlaceAllGather()
        for unit in scorer.modules():
            if callable(getattr(unit, "set_custom_all_gather", None)):  # an FSDPModule
                unit.set_custom_all_gather(comm)
    return scorer


class InPlaceAllGather:
    """FSDP2's all-gather (its `AllGather` interface: `allocate`, then a call) as one broadcast
    per rank into that rank's slice of the output, which FSDP2 allocated and into which it copied
    this rank's shard. Two things it saves on CPU/gloo:
    * gloo's `all_gather_into_tensor` gathers into a flat buffer of its own and copies it out
      (measured on 2 ranks: a 64 MiB gather raised the peak by 130 MiB; by broadcasts, 66 MiB);
    * it hands FSDP2 a `Work` to wait on, and FSDP2 then frees the gathered buffer as soon as it
      has copied the parameters out; after a synchronous gather in forward, FSDP2 keeps the
      buffer (a whole unit) alive until the next unit's gather, to overlap them on a GPU."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group,
                 async_op: bool = False):
        me = tdist.get_rank(group)
        works = []
        for rank, part in enumerate(output_tensor.chunk(tdist.get_world_size(group))):
            if rank == me and part.data_ptr() != input_tensor.data_ptr():
                part.copy_(input_tensor)
            works.append(tdist.broadcast(part, src=tdist.get_global_rank(group, rank), group=group,
                                         async_op=True))
        for work in works[:-1]:
            work.wait()
        return works[-1]  # FSDP2 waits on it, then frees the buffer at once


def load_optimizer_state(model, optimizer, state: dict, sharded: bool) -> None:
    """Load a full optimizer state dict (a whole-model checkpoint, or one written by dpocli
    before checkpoints were sharded) into this run's layout."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def wrap_for_training(scorer, model, device: torch.device, fsdp: bool,
                      mixed_precision: torch.dtype | None = None):
    """DDP under torchrun by default, FSDP2 with `fsdp`, the plain scorer in a single process."""
    if fsdp:
        return shard_model(model, scorer, mixed_precision)
    if not current().enabled:
        return scorer
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    # Buffers (rotary tables) are identical on every rank; skip their per-forward broadcast.
    return DistributedDataParallel(scorer, device_ids=ids, broadcast_buffers=False)


def grad_sync(scorer, last_micro_batch: bool):
    """Context for one micro-batch: gradients are reduced across ranks only on a step's last
    micro-batch (a no-op in one process, where there is nothing to reduce)."""
    sync = last_micro_batch or not current().enabled
    if hasattr(scorer, "set_requires_gradient_sync"):  # FSDP2: a flag on the module
        scorer.set_requires_gradient_sync(sync)
        return nullcontext()
    if hasattr(scorer, "no_sync") and not sync:  # DDP: a context manager
        return scorer.no_sync()
    return nullcontext()


def rank_rows(micro: list[int], dist: DistContext) -> tuple[list[int], bool]:
    """This rank's contiguous share of a global micro-batch. A rank left with nothing (a short last
    batch) scores one row with zero weight, because DDP needs every rank in every backward."""
    per = -(-len(micro) // dist.world_size)
    rows = micro[dist.rank * per:(dist.rank + 1) * per]
    return (rows, True) if rows else (micro[:1], False)


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the total gradient norm (0 = no clipping) and return it as a float (a sync point).
    Under FSDP the norm is a DTensor, reduced over ranks by `full_tensor`."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

"""One run across several processes (torchrun, ``accelerate launch``): data parallel through torch.distributed.

Every process builds the same session from the same seed (model, adapters, data order, channel), so the processes
differ only in which rows of each global batch they compute:

- the configured batch is the global batch; process k of W takes rows [k·B/W, (k+1)·B/W) of it, and its loss is
  weighted by W·B_k/B so that DDP's gradient average is the gradient of the global batch's mean loss, as one process
  would compute it;
- the allocator decides on rank 0 only (``MainDecides``): its decision is broadcast, so every process applies the same
  ranks and precisions at every step; the loss it learns from is the global batch's (all-reduced);
- DDP over gloo (CPU) or NCCL (GPU) averages the gradients of the adapters and the head. With ``train.distributed:
  fsdp`` the frozen base is sharded with FSDP2 ``fully_shard`` first; the trainable parameters stay whole, under DDP;
- evaluation batches are shared out round-robin and the correct/total counts summed;
- only rank 0 writes the run folder (``airlora.runner``).

Without a launcher (no WORLD_SIZE > 1 in the environment) nothing here does anything: a run is one process, as
before, with the same numbers bit for bit.

A process that dies ends the job: its peers' next collective fails at once (the socket closes), or after
``train.dist_timeout_s`` when it hangs; either becomes one ``DistributedFault`` line at the CLI (exit 1).
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from airlora.errors import AirloraError

MAIN_ONLY = frozenset({"airllm"})
"""Allocators that run on rank 0 alone: a policy that learns (costly, drawing random numbers, and nothing of it
touches the adapters). Every other allocator also runs on the other processes, fed the same contexts and outcomes
(the global loss, the all-reduced gradients), because some edit the adapters in ``observe`` (adalora masks λ in place)
and need their own ``allocate`` state for it; rank 0's decision is still the one every process applies."""


class DistributedFault(RuntimeError):
    """A process of the job died, hung past ``train.dist_timeout_s``, or failed while the others waited."""


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun and ``accelerate launch`` set it (1 without a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise AirloraError(f"WORLD_SIZE = {os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun "
                           "or accelerate launch") from None


def launched_rank() -> int:
    """RANK as the launcher set it (0 without one); readable after the process group is gone."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    """True inside a job of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on the process that decides and writes (rank 0, or the only process)."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def choose_backend(asked: str, device: str) -> str:
    """The process-group backend: 'auto' is NCCL when the run's device is CUDA, else gloo. NCCL without CUDA is a
    clear error (checked in a one-process run too, so a config that cannot run on this machine fails here)."""
    cuda = torch.cuda.is_available()
    if asked == "nccl" and not (cuda and dist.is_nccl_available()):
        raise AirloraError("train.dist_backend = 'nccl' but this machine has no CUDA device (NCCL runs on GPUs "
                           "only); use 'gloo' or 'auto'")
    if asked == "nccl" and device == "cpu":
        raise AirloraError("train.dist_backend = 'nccl' with train.device = 'cpu': NCCL moves CUDA tensors only; "
                           "use 'gloo' or a CUDA device")
    if asked != "auto":
        return asked
    on_cuda = device.startswith("cuda") or (device == "auto" and cuda)
    return "nccl" if on_cuda else "gloo"


def init(train: Any, batch_size: int) -> str:
    """Join the job the launcher started (env:// rendezvous) and return the backend; 'none' for one process.

    ``train`` is the run's TrainConfig (device, dist_backend, dist_timeout_s). On CUDA each process takes
    cuda:LOCAL_RANK, so ``train.device`` must not name one device for all of them.
    """
    backend = choose_backend(train.dist_backend, train.device)
    size = launched_world_size()
    if size <= 1:
        return "none"
    if batch_size < size:
        raise AirloraError(f"data.batch_size = {batch_size} is the global batch, split across the {size} processes; "
                           f"give at least {size} (one row each)")
    on_cuda = torch.cuda.is_available() and train.device != "cpu"
    if on_cuda and train.device.startswith("cuda:"):
        raise AirloraError(f"train.device = {train.device!r} under a launcher of {size} processes: each process "
                           "uses cuda:LOCAL_RANK; use 'auto' or 'cuda'")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    if backend == "nccl" and per_node > torch.cuda.device_count():
        raise AirloraError(f"train.dist_backend = 'nccl' runs one process per GPU; {per_node} processes on "
                           f"{torch.cuda.device_count()} GPU(s) here: start fewer or use 'gloo'")
    if on_cuda:  # 'cuda' is then this process's GPU (gloo may share one GPU among processes, NCCL may not)
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    if not active():
        dist.init_process_group(backend, timeout=timedelta(seconds=train.dist_timeout_s))
    return backend


def finish() -> None:
    """Wait for every process, then leave the job (after the run folder is complete)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def default_threads() -> int:
    """Intra-op threads when ``train.threads`` is unset: the cores shared by the processes of this machine."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // per_node)


def fault_message(err: BaseException) -> str | None:
    """One line for an error that means the job lost a process (None for any other error)."""
    if isinstance(err, DistributedFault):
        return str(err)
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if isinstance(err, (dist.DistError, RuntimeError)):
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return (f"process {rank()} of {dist.get_world_size()} lost the job ({first[:200]}); another process died or "
                f"hung past train.dist_timeout_s; resume with --resume from the last checkpoint")
    return None


def _collective(what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (RuntimeError, dist.DistError) as err:
        raise DistributedFault(fault_message(err) or f"{what} failed: {err}") from err


# ---- the decision, on rank 0, broadcast ----

def from_main(value: Any, error: BaseException | None = None) -> Any:
    """Rank 0's ``value`` on every process (``broadcast_object_list``). ``error``: rank 0 failed; every other process
    raises an AirloraError naming it, so no process waits for a broadcast that never comes."""
    if not active():
        return value
    box: list[Any] = [None]
    if is_main():
        box = [("error", f"{type(error).__name__}: {error}") if error is not None else ("ok", value)]
    _collective("broadcast from rank 0", dist.broadcast_object_list, box, 0)
    kind, payload = box[0]
    if kind == "error":
        if is_main() and error is not None:
            raise error
        raise AirloraError(f"rank 0 failed, so process {rank()} stops too: {payload}")
    return payload


def on_main(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` run on rank 0 only, its result (or its error) on every process."""
    if not active():
        return fn(*args)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args)
        except Exception as err:  # re-raised on rank 0 by from_main, reported by the others
            error = err
    return from_main(result, error)


class MainDecides:
    """An allocator whose decisions are rank 0's, broadcast; the trainer talks to it as to the allocator.

    ``allocate``, ``deliver`` and ``training_ranks``: every process gets rank 0's decision (or rank 0's error). The
    learners of MAIN_ONLY run on rank 0 alone; any other allocator runs on every process as well (see MAIN_ONLY), its
    own decisions there discarded. ``metric_rows``, ``state_dict`` and ``save`` are rank 0's: only it logs and writes.
    """

    def __init__(self, allocator: Any, name: str) -> None:
        self.inner = allocator
        self.replicated = name not in MAIN_ONLY

    def __getattr__(self, name: str) -> Any:  # first_deliverable_step, config, name …
        return getattr(self.inner, name)

    def _runs_here(self) -> bool:
        return is_main() or self.replicated

    def _decide(self, method: str, *args: Any) -> Any:
        result, error = None, None
        if self._runs_here():
            try:
                result = getattr(self.inner, method)(*args)
            except Exception as err:
                error = err
        if is_main():
            return from_main(result, error)
        decided = from_main(None)  # raises when rank 0 failed
        if error is not None:  # rank 0 did not: this process's copy went astray, so it stops
            raise error
        return decided

    def allocate(self, *args: Any) -> Any:
        return self._decide("allocate", *args)

    def deliver(self, *args: Any) -> Any:
        return self._decide("deliver", *args)

    def training_ranks(self, *args: Any) -> Any:  # the 'delivery' regime's ranks to train at: rank 0's too
        return self._decide("training_ranks", *args)

    def observe(self, *args: Any) -> Any:
        return self.inner.observe(*args) if self._runs_here() else None

    def metric_rows(self, *args: Any) -> Any:
        return self.inner.metric_rows(*args) if is_main() else []

    def save(self, *args: Any) -> Any:
        return self.inner.save(*args) if is_main() else {}


def main_decides(allocator: Any, name: str) -> Any:
    """``allocator`` itself in one process; wrapped in ``MainDecides`` in a job of several."""
    return MainDecides(allocator, name) if active() else allocator


# ---- the global batch, split; the loss, all-reduced ----

def local_rows(size: int) -> slice:
    """This process's rows of a global batch of ``size`` rows (contiguous, sizes differing by at most one)."""
    w, k = world_size(), rank()
    return slice(k * size // w, (k + 1) * size // w)


def local_batch(batch: Any) -> Any:
    """This process's part of the global ``batch`` (the whole batch in one process)."""
    if not active():
        return batch
    rows = local_rows(len(batch.labels))
    return replace(batch, inputs={k: v[rows] for k, v in batch.inputs.items()}, labels=batch.labels[rows],
                   indices=batch.indices[rows])


def _on_wire(values: list[float] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor NCCL (CUDA only) or gloo can send."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    return torch.tensor(values, dtype=dtype, device=device)


def global_mean(local_mean: float, local_rows_: int, global_rows: int) -> float:
    """The mean over the global batch of a per-row quantity whose mean over this process's rows is ``local_mean``."""
    if not active():
        return local_mean
    total = _on_wire([local_mean * local_rows_], torch.float64)
    _collective("all-reduce of the loss", dist.all_reduce, total)
    return float(total.item()) / global_rows


def gradient_weight(local_rows_: int, global_rows: int) -> float:
    """W·B_k/B: DDP averages the W processes' gradients, so this weight makes the average the global mean's."""
    return world_size() * local_rows_ / global_rows


def local_share(items: list[Any]) -> list[Any]:
    """This process's share of a list (round-robin), e.g. of evaluation batches."""
    return items[rank()::world_size()] if active() else items


def summed(*counts: int) -> tuple[int, ...]:
    """Counts summed over the processes (one all-reduce)."""
    if not active():
        return counts
    total = _on_wire(counts, torch.int64)
    _collective("all-reduce of the evaluation counts", dist.all_reduce, total)
    return tuple(int(v) for v in total.tolist())


def gathered(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order (rank 0's alone in one process)."""
    if not active():
        return [value]
    out: list[Any] = [None] * world_size()
    _collective("all-gather", dist.all_gather_object, out, value)
    return out


# ---- the model: FSDP2 for the frozen base, DDP for what trains ----

class TrainingLoss(nn.Module):
    """The training step's forward: the task loss of this process's rows and, with ``adapter.orth_reg_weight``, the
    adapters' orthogonality term, both inside one module so that DDP sees every trainable parameter that takes part
    (a module at rank 0 leaves its λ out of the graph, and DDP's unused-parameter search must know that)."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.model = session.model
        self.session = session

    def forward(self, batch: Any, weight: float, orth_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to differentiate, the task loss of these rows): the first is weight·loss + orth_weight·penalty."""
        with self.session.autocast():
            loss = self.model(**batch.inputs, labels=batch.labels).loss
        total = loss if weight == 1.0 else loss * weight
        if orth_weight:
            total = total + orth_weight * self.session.adapters.orthogonality()
        return total, loss


def wrap(session: Any) -> nn.Module:
    """The module the training step calls: ``TrainingLoss`` alone in one process, under DDP in a job of several.

    find_unused_parameters: the active triplets change with the decision, and a module whose rank is 0 computes
    nothing with its adapter, so the graph of a step may lack some parameters; DDP then marks them ready itself and
    leaves their gradient None, as one process would (AdamW skips them). forward_sync_buffers off: the only buffers that
    change are the active sets, which the broadcast decision already sets alike on every process.
    """
    module = TrainingLoss(session)
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    frozen = [f"model.{n}" for n, p in session.model.named_parameters() if not p.requires_grad]
    if session.config.train.distributed == "fsdp":  # sharded parameters are FSDP's; DDP must not touch them
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    device_ids = [torch.cuda.current_device()] if session.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True,
                                   forward_sync_buffers=False)


def place(model: nn.Module, device: torch.device, strategy: str) -> None:
    """Put the model on ``device``; with ``fsdp`` in a job of several, shard its frozen base first.

    FSDP2 ``fully_shard`` on each block of the model's ModuleLists (its transformer layers) and on the root, with the
    trainable parameters (adapters, head) ignored: each process keeps 1/W of every frozen weight and all-gathers a
    block's weights just before the block runs (forward and backward), then frees them. The cost: one all-gather of
    each block per forward and one per backward, on every step and every evaluation batch.
    """
    if strategy != "fsdp" or not active():
        model.to(device)
        return
    from torch.distributed.fsdp import fully_shard

    trainable = {p for p in model.parameters() if p.requires_grad}
    # the model is still on the CPU: fully_shard moves each process's shards to its device, so no device ever holds
    # the whole base (host memory does, once per process: loading straight into shards is not done here)
    for block in [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]:
        fully_shard(block, ignored_params=trainable)
    fully_shard(model, ignored_params=trainable)
    _move_unsharded(model, device)


def _move_unsharded(model: nn.Module, device: torch.device) -> None:
    """Move what FSDP does not own (the trainable parameters, every buffer) to ``device``, keeping each Parameter
    object (the optimiser and the adapters hold them)."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not isinstance(p, DTensor) and p.device != device:
                p.data = p.data.to(device)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)

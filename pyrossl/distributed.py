"""Data-parallel training on several processes with ``torch.distributed`` (launched by ``torchrun``).

Everything the trainer needs to know about the other processes lives here: with one process (no
``WORLD_SIZE`` above 1 in the environment) every function is a no-op and training is unchanged.

- :func:`setup` reads the environment ``torchrun`` (or a scheduler) sets — ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` — and joins the process group: ``gloo`` on CPU,
  ``nccl`` on CUDA with one device per process (``cuda:LOCAL_RANK``).
- :func:`shard` cuts one global batch of indices into this process's share; :func:`loss_scale`
  weighs its loss so that ``DistributedDataParallel``'s gradient average is the gradient of the
  global batch's mean loss, even when the shares are unequal or one is empty.
- :func:`wrap`: the loss module in ``DistributedDataParallel``, which averages the gradients.
- :func:`is_writer`: only rank 0 writes files and shows the progress bar.
- :func:`broadcast_object`, :func:`broadcast_state`, :func:`all_true`, :func:`all_true_each`,
  :func:`sum_over_processes`:
  what is computed once (on rank 0) reaches every process; decisions every process must share.
- :func:`sum_counts`: evaluation is split like training, each process counting on its share of a
  held-out set; the sums give the metrics of the whole set.
"""

from __future__ import annotations

import datetime
import inspect
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pyrossl.errors import ConfigError

#: Seconds a collective waits for the other processes before failing (``PYROSSL_DIST_TIMEOUT``).
DEFAULT_TIMEOUT = 600.0


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1


_context = Context()
_joined = False  # whether this process ever joined a process group (see end_process)


def environment() -> Context:
    """The process's place in the job, from the environment variables ``torchrun`` sets (none: one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Context(
        rank=int(os.environ.get("RANK", "0")), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def setup(device: torch.device) -> Context:
    """Join the process group when launched as one of several processes; returns the context.

    ``device``: the device asked for; on CUDA each process takes ``cuda:LOCAL_RANK`` (see :func:`device_for`).
    """
    global _context
    env = environment()
    if not env.active:
        _context = Context()
        return _context
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = float(os.environ.get("PYROSSL_DIST_TIMEOUT", DEFAULT_TIMEOUT))
        if device.type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        global _joined
        _joined = True
    _context = Context(env.rank, env.world_size, env.local_rank, backend)
    return _context


def teardown(completed: bool = False) -> None:
    """Leave the process group. After a ``completed`` run every process first waits for the others, so
    none closes its connections while a peer still talks to it (after a failure nobody waits)."""
    global _context
    if dist.is_initialized():
        if completed and _context.active:
            dist.barrier()
        dist.destroy_process_group()
    _context = Context()


def end_process(code: int) -> int:
    """Exit code ``code`` for a process that took part in a multi-process job, which ends it at once.

    ``DistributedDataParallel`` keeps the process group (and gloo's worker threads) alive after
    ``destroy_process_group``; they are freed only during interpreter shutdown, where a worker
    thread that needs the GIL aborts the process now and then (``terminate called without an active
    exception``, exit signal 6) after the run has finished and written everything. So a process of a
    job flushes its output and leaves with ``os._exit``. One process (no job): returns ``code``.
    """
    if not _joined:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def context() -> Context:
    return _context


def device_for(device: torch.device) -> torch.device:
    """One CUDA device per process (``LOCAL_RANK``); CPU stays CPU."""
    env = environment()
    if device.type == "cuda" and env.active:
        return torch.device("cuda", env.local_rank)
    return device


def wrap(module: torch.nn.Module, device: torch.device, find_unused_parameters: bool) -> torch.nn.Module:
    """``module`` in ``DistributedDataParallel``: its gradients are averaged over the processes.

    Buffers (label priors, mixtures, schedules) change only outside the gradient steps, where the
    trainer broadcasts them: DDP need not broadcast them before every forward pass. PyTorch 2.13 names
    that switch ``forward_sync_buffers`` (``broadcast_buffers`` is deprecated and warns); older
    versions know only ``broadcast_buffers``.
    """
    accepted = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    no_buffer_sync = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in accepted else {"broadcast_buffers": False}
    )
    return torch.nn.parallel.DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        **no_buffer_sync,
    )


def is_writer() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return _context.rank == 0


def shard(index: torch.Tensor | None) -> torch.Tensor | None:
    """This process's share of a global batch: near-equal contiguous parts, in rank order."""
    if index is None or not _context.active:
        return index
    return torch.tensor_split(index, _context.world_size)[_context.rank]


def loss_scale(local: int, total: int) -> float:
    """Weight of this process's mean loss over ``local`` of the batch's ``total`` examples.

    ``DistributedDataParallel`` averages gradients over the W processes; scaled by ``W * local / total``,
    their average is the gradient of the mean over all ``total`` examples (an empty share weighs 0).
    """
    if not _context.active or total == 0:
        return 1.0
    return _context.world_size * local / total


def shard_step(unlab: torch.Tensor | None, lab: torch.Tensor | None):
    """This process's share of one global step's (unlabelled, labelled) index batches and the weight of
    its loss (:func:`loss_scale`); with one process the whole step, weighted 1."""
    if not _context.active:
        return unlab, lab, 1.0
    main = unlab if unlab is not None else lab
    local_unlab, local_lab = shard(unlab), shard(lab)
    local_main = local_unlab if unlab is not None else local_lab
    scale = loss_scale(local_main.numel(), main.numel())
    if local_main.numel() == 0:  # fewer examples than processes: compute on the whole batch, weighted 0
        return unlab, lab, scale
    if local_lab is not None and local_lab.numel() == 0:
        local_lab = None
    return local_unlab, local_lab, scale


def has_unused_parameters(module: torch.nn.Module, losses, device: torch.device) -> bool:
    """Whether some trainable parameter of ``module`` gets no gradient from one of the ``losses`` (each a
    function computing a trial step's loss): DDP must then look for such parameters every step. The
    trial steps' side effects on the module's state and on the random streams are undone."""
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    params = [p for p in module.parameters() if p.requires_grad]
    unused = False
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for loss in losses:
            unused |= any(g is None for g in torch.autograd.grad(loss(), params, allow_unused=True))
    module.load_state_dict(saved)
    return unused


def barrier() -> None:
    if _context.active:
        dist.barrier()


def broadcast_object(value=None, source: int = 0):
    """``value`` from process ``source`` on every process (picklable objects: metrics, summaries)."""
    if not _context.active:
        return value
    box = [value if _context.rank == source else None]
    dist.broadcast_object_list(box, src=source, device=_collective_device())
    return box[0]


def gather_object(value, dest: int = 0) -> list | None:
    """Every process's ``value``, in rank order, on process ``dest`` (``None`` on the others)."""
    if not _context.active:
        return [value]
    gathered = [None] * _context.world_size if _context.rank == dest else None
    dist.gather_object(value, gathered, dst=dest)
    return gathered


def broadcast_state(module: torch.nn.Module, source: int = 0) -> None:
    """Every process loads ``module``'s state (parameters and buffers) of process ``source``:
    what a stage run once on rank 0 (a mixture fit) computed."""
    if not _context.active:
        return
    state = broadcast_object(
        {k: v.detach().cpu() for k, v in module.state_dict().items()} if _context.rank == source else None, source
    )
    if _context.rank != source:
        module.load_state_dict(state)


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (for decisions all must take together)."""
    return all_true_each([flag])[0]


def all_true_each(flags: list[bool]) -> list[bool]:
    """For each of ``flags``, whether it holds on every process (one exchange for all of them)."""
    if not _context.active:
        return list(flags)
    value = torch.tensor([1 if f else 0 for f in flags], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return [bool(v) for v in value.tolist()]


def sum_over_processes(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over the processes."""
    if not _context.active:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_counts(counts: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Key-wise sums of every process's ``counts`` (tensors of equal shapes; ``None``: nothing to count here)."""
    if not _context.active:
        return counts
    gathered: list = [None] * _context.world_size
    mine = None if counts is None else {k: torch.as_tensor(v).detach().cpu() for k, v in counts.items()}
    dist.all_gather_object(gathered, mine)
    present = [c for c in gathered if c is not None]
    return {k: sum(c[k] for c in present) for k in present[0]} if present else None


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective operation failing because another process is gone (gloo's
    "Connection closed by peer", NCCL's watchdog, a store that no longer answers)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe"))


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _context.backend == "nccl" else torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}' (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for, but CUDA is not available here (use --device auto or cpu)")
    return device

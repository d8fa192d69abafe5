"""The collectives the trainer runs itself (DDP runs the gradients'), written so that the process group can end.

A gloo worker thread drops its reference to a collective's work after running it (or later, from a barrier's work,
which holds the works before it). Where that is the last reference, the work's tensors go with it, and a tensor
with a Python object needs the GIL to go. At the group's end this went wrong two ways, both seen in the tests:
- the group's destructor joins its workers while holding the GIL (it runs from Python, when DDP's reducer goes):
  a worker waiting for the GIL deadlocked the process;
- a group left to the interpreter's shutdown: a worker asking for the GIL then is ended by Python with
  pthread_exit inside a C++ destructor, and the process aborted ("terminate called without an active exception").
So each gloo collective here keeps its work (``async_op=True``, then wait) until the process ends: the worker never
holds the last reference, and the works go on the main thread. Their tensors' storage is released at once. (The
works keep gloo's connections, and their thread, which never takes the GIL, to the end of the process.)
"""
from __future__ import annotations

import pickle
from collections import deque

import torch
import torch.distributed as dist

# Imported before any process group exists: its functions take the group of the moment as a default argument, and
# DDP imports it (through torch._dynamo); imported while a group exists, it kept that group alive past
# destroy_process_group, to be destroyed as the interpreter shuts down.
if dist.is_available():
    import torch.distributed.nn.functional  # noqa: F401

# Works are small once their tensors are emptied; the oldest go when more come (a worker has long dropped them).
_WORKS: deque = deque(maxlen=4096)


def _run(collective, *args) -> None:
    if dist.get_backend() != "gloo":  # (NCCL's works end in its own watchdog: run as torch runs them)
        collective(*args)
        return
    work = collective(*args, async_op=True)
    work.wait()
    _WORKS.append(work)


def _empty(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        tensor.set_()  # (the storage goes now; the tensor stays, held by its work)


def device_for(device: torch.device) -> torch.device:
    """Where a collective's tensors live: the process's GPU under NCCL, else the CPU (gloo)."""
    return device if device.type == "cuda" else torch.device("cpu")


def barrier() -> None:
    _run(dist.barrier)


def sum_over_processes(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum of ``tensor`` over the processes, a new CPU tensor (``tensor`` itself is left as it is)."""
    total = tensor.to(device_for(device), copy=True)
    _run(dist.all_reduce, total)
    result = total.cpu().clone()
    _empty(total)
    return result


def mean_over_processes(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value's mean over the processes, names kept in order."""
    total = sum_over_processes(torch.tensor(list(values.values()), dtype=torch.float64), device)
    return dict(zip(values, (total / dist.get_world_size()).tolist()))


def gather_objects(obj, device: torch.device) -> list:
    """Every process's ``obj``, in rank order (as ``dist.all_gather_object``, which drops its works)."""
    where, world = device_for(device), dist.get_world_size()
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], device=where)
    sizes = [torch.zeros(1, dtype=torch.long, device=where) for _ in range(world)]
    _run(dist.all_gather, sizes, size)
    lengths = [int(n) for n in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=where)
    padded[:data.numel()] = data.to(where)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    _run(dist.all_gather, gathered, padded)
    objects = [pickle.loads(part[:n].cpu().numpy().tobytes()) for part, n in zip(gathered, lengths)]
    _empty(size, *sizes, padded, *gathered)
    return objects

"""torch.distributed for tcache's commands under torchrun: which rank this is, the process group (NCCL on GPUs,
gloo on CPU), and the few collectives the training loop needs. Without torchrun (WORLD_SIZE unset or 1) every
function is the single-process identity, so nothing else branches on it."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device: cuda:LOCAL_RANK when the run is on
    GPUs, the device as given otherwise."""
    if world() == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank (a path, a decision)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any: a stop request must end every rank at the same step, or the
    others would wait in the next collective forever."""
    if world() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over the ranks in place, in one flat all-reduce (gradients once per optimizer step: with
    gradient accumulation that is one reduction per step, where DDP would reduce every micro-batch)."""
    if world() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])  # (sum numel,)
    dist.all_reduce(flat)
    flat /= world()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_(values: list[float], device: torch.device) -> list[float]:
    """Sums of Python numbers over the ranks (float64: a perplexity's summed NLL)."""
    if world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [type(v)(x) for v, x in zip(values, t.tolist())]


def sum_grad(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over the ranks, differentiable: its backward sums the ranks' gradients, so a loss that is not
    a mean over rows (the alignment's RMS over the whole batch) is the global batch's after gradients are averaged."""
    if world() == 1:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)

"""What one decode step launches: `kernels_per_step(decoder, ids)` runs one step of a decode.StaticDecoder under a
profiler and counts its kernels by kind, in total and per layer (benchmarks call it for their `kernels per step`
column; tests/test_fused_step.py compares the fused step's count with the earlier step's).

    CUDA  the device kernels of one step as the decoder runs it (the CUDA graph's replay when it captures), from
          torch.profiler (CUPTI), with their device time by kind; per layer: the kernels launched inside each
          layer's step in one uncaptured run of the same step function (the same compiled code, its launches
          attributed to the layer through a record_function range around decoder.layer_fn)
    CPU   the aten operators one step dispatches (a TorchDispatchMode), inside each layer and outside; views and
          allocations are left out (no data moves: a GPU launches nothing for them). A custom op (the mLSTM step,
          mlstm_step.py) counts as one: its own operators run below the mode

Kinds: gemm, attention, mlstm (the recurrent step), copy (copies, concatenations, index reads / writes, fills),
reduction, pointwise, sync (a value read on the host: a CUDA graph cannot hold one), other. The decoder's state is
restored after, so profiling a step does not advance generation.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("gemm", "attention", "mlstm", "copy", "reduction", "pointwise", "sync", "other")
RANGE = "tcache.layer"
"""The record_function range around each layer's step (CUDA per-layer counts)."""

_GEMM = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "_int_mm", "_scaled_mm"}
_COPY = {"copy_", "_to_copy", "clone", "cat", "stack", "index_copy", "index_copy_", "index_select", "index",
         "index_put_", "index_put", "repeat", "repeat_interleave", "constant_pad_nd", "flip", "roll", "gather",
         "scatter", "scatter_", "slice_scatter", "select_scatter", "fill_", "zero_", "zeros", "zeros_like", "new_zeros",
         "full", "full_like", "ones", "ones_like", "arange"}
_REDUCTION = {"sum", "mean", "amax", "amin", "max", "min", "_softmax", "_log_softmax", "_safe_softmax", "logsumexp",
              "norm", "linalg_vector_norm", "var", "prod", "any", "all", "argmax", "cumsum"}
_POINTWISE = {"where", "log_sigmoid_forward", "masked_fill", "masked_fill_"}  # pointwise, untagged
_FREE = {"_unsafe_view", "empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "lift_fresh",
         "detach", "alias", "_reshape_alias", "resize_"}


def op_kind(func) -> str | None:
    """The kind of an aten (or custom) operator, None for one that launches no kernel."""
    name = func._schema.name.split("::")[-1]
    if func.is_view or name in _FREE:
        return None
    if func.namespace == "tcache":
        return "mlstm" if "mlstm" in name else "other"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    if name == "_local_scalar_dense":
        return "sync"
    for kind, names in (("gemm", _GEMM), ("copy", _COPY), ("reduction", _REDUCTION)):
        if name in names:
            return kind
    return "pointwise" if name in _POINTWISE or torch.Tag.pointwise in func.tags else "other"


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, from its name (cuBLAS / cuBLASLt, PyTorch's own, inductor's triton_*, ours)."""
    n = name.lower()
    for kind, keys in (("mlstm", ("recurrent_step",)), ("attention", ("fmha", "flash", "attention", "attn")),
                       ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "splitk", "cublas")),
                       ("copy", ("memcpy", "memset", "copy", "cat", "index", "scatter", "gather", "fill")),
                       ("reduction", ("reduce", "softmax", "triton_red", "triton_per")),
                       ("pointwise", ("elementwise", "vectorized", "triton_poi", "unrolled"))):
        if any(k in n for k in keys):
            return kind
    return "other"


class _Ops(TorchDispatchMode):
    """Counts the kernel-launching operators dispatched, by kind, inside a layer's step and outside."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while a layer's step runs
        self.inside, self.outside = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = op_kind(func)
        if kind is not None:
            (self.inside if self.depth else self.outside)[kind] += 1
        return func(*args, **(kwargs or {}))


def _layers(decoder) -> int:
    return len(decoder.layers)


def _wrapped(decoder, enter, leave):
    fn = decoder.layer_fn

    def marked(*a, **k):
        enter()
        try:
            return fn(*a, **k)
        finally:
            leave()
    return fn, marked


def _cpu(decoder, ids: torch.Tensor) -> dict:
    mode = _Ops()
    fn, decoder.layer_fn = _wrapped(decoder, lambda: setattr(mode, "depth", mode.depth + 1),
                                    lambda: setattr(mode, "depth", mode.depth - 1))
    try:
        with mode, torch.no_grad():
            decoder.step(ids)
    finally:
        decoder.layer_fn = fn
    L = _layers(decoder)
    total = mode.inside + mode.outside
    return {"device": "cpu", "method": "aten operators dispatched (views and allocations left out)", "layers": L,
            "total": sum(total.values()), "per_layer": sum(mode.inside.values()) / L,
            "outside_layers": sum(mode.outside.values()), "by_kind": dict(total),
            "per_layer_by_kind": {k: v / L for k, v in mode.inside.items()}}


def _device_time(evt) -> float:
    return float(getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0.0) or 0.0)  # us


def _cuda(decoder, ids: torch.Tensor) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    decoder.step(ids)  # warm: captures the graph / compiles before the profiled step
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decoder.step(ids)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_kind, time = Counter(), Counter()
    for e in kernels:
        by_kind[kernel_kind(e.name)] += 1
        time[kernel_kind(e.name)] += _device_time(e)
    # per layer: the same step function without the graph, each layer inside a range
    fn, decoder.layer_fn = _wrapped(decoder, lambda: ranges.append(record_function(RANGE).__enter__()),
                                    lambda: ranges.pop().__exit__(None, None, None))
    ranges: list = []
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as layered, torch.no_grad():
            decoder.fn(ids)
            torch.cuda.synchronize()
    finally:
        decoder.layer_fn = fn

    def launched(evt) -> int:  # kernels launched by evt and everything under it
        return len(evt.kernels) + sum(launched(c) for c in evt.cpu_children)

    inside = sum(launched(e) for e in layered.events() if e.name == RANGE)
    L = _layers(decoder)
    return {"device": torch.cuda.get_device_name(), "method": "CUDA kernels of one step (torch.profiler)"
            + (", replayed from its CUDA graph" if decoder.capture else ""), "layers": L, "total": len(kernels),
            "per_layer": inside / L if inside else None, "by_kind": dict(by_kind),
            "time_us_by_kind": {k: round(v, 1) for k, v in time.items()}, "graph": decoder.capture}


def kernels_per_step(decoder, ids: torch.Tensor) -> dict:
    """Profile one step of `decoder` (a decode.StaticDecoder) for the next tokens ids (B, 1) and count what it
    launches: {"device", "method", "layers", "total", "per_layer", "by_kind", ...} (CUDA adds "time_us_by_kind",
    CPU "per_layer_by_kind" and "outside_layers"). per_layer is None where the profiler attributed no kernel to a
    layer. The decoder's state is as it was before the call."""
    from tcache.student.inference.decode import _clone, _copy

    saved = _clone(decoder._tensors())
    try:
        return _cuda(decoder, ids) if decoder.device.type == "cuda" else _cpu(decoder, ids)
    finally:
        _copy(decoder._tensors(), saved)

"""xlstm's CUDA sLSTM cell standing in for a student's vanilla cells in inference forwards over many tokens.

The exported student (student/inference/hf.py) builds its sLSTM blocks on xlstm's vanilla cell: it runs on every device,
its state dict is the checkpoint's, and its pointwise step is what the static decode captures (slstm_step.py).
But the vanilla cell loops over the positions in Python: at v1's seeds' shape on an H200 it prefills 2.1k tokens/s
per layer, so a 128k prompt takes minutes. xlstm's CUDA cell runs the same recurrence in its own kernels, 52k
tokens/s per layer at batch 1 and 4M at batch 64, with outputs within bf16 rounding of the vanilla cell's
(benchmarks/slstm_probe.py; benchmarks/results/distill-hybrid-h200/run2/slstm_probe.txt). It compiles with nvcc
when constructed (~22 s the first time; torch's extension builder caches it).

So forwards without gradients (prefill, `tcache eval`, generate without a cache) on a GPU of compute capability
>= 8.0 with nvcc swap in a CUDA twin of each vanilla cell for their duration. A twin gets the vanilla cell's
weights, converted to its layout, at every use, so it never goes stale. TCACHE_SLSTM_PREFILL=vanilla keeps the
vanilla cells. If the twin cannot be built (no working nvcc, a failed compile), a warning says so and the vanilla
cells run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings

import torch

ENV = "TCACHE_SLSTM_PREFILL"
TWIN = "_tcache_cuda_twin"
"""The attribute of a vanilla cell that holds its twin, set through __dict__ so that it is no submodule: not in
the state dict, not moved by .to(); it is rebuilt when the device or dtype changes."""
CUDA_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
"""The dtypes a twin is built for. fp32 models keep the vanilla cell: those who run one want its exact arithmetic,
and the CUDA build was validated in bf16 only."""
_FAILED: set = set()
"""(device, dtype) pairs whose twin failed to build in this process: not tried again."""


def _slstm_layers(model) -> list:
    blocks = getattr(getattr(model, "blocks", None), "blocks", [])
    return [blk.xlstm for blk in blocks if hasattr(getattr(blk, "xlstm", None), "slstm_cell")]


def usable(model, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this forward should run on CUDA twins: sLSTM blocks on vanilla cells, no gradients, a GPU of
    compute capability >= 8.0 with nvcc, a bf16 or fp16 model, and not switched off."""
    from tcache.student.models.xlstm import _nvcc_available

    if os.environ.get(ENV, "cuda") == "vanilla" or torch.is_grad_enabled() or device.type != "cuda":
        return False
    if dtype not in CUDA_DTYPES or (device, dtype) in _FAILED:
        return False
    layers = _slstm_layers(model)
    if not layers or any(type(layer.slstm_cell).__name__ != "sLSTMCell_vanilla" for layer in layers):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0) and _nvcc_available()


def twin_config(config, dtype: torch.dtype):
    """The CUDA twin's sLSTMCellConfig from its vanilla cell's: backend and dtype changed, and the internal input
    layout set back to the CUDA kernel's (gates within heads, SBNGH). The vanilla cell rewrites its config's layout to
    its own (SBGNH) when built, and xlstm's CUDA cell reads the layout from its config without setting it, so a copy
    of the vanilla config fed the kernel its gates in the wrong order (found by the GPU test of the twins, which
    compares a prefill with the vanilla cells')."""
    from xlstm.blocks.slstm.cell import sLSTMCellConfig

    layout = sLSTMCellConfig.__dataclass_fields__["internal_input_shape"].default  # SBNGH
    return dataclasses.replace(config, backend="cuda", dtype=CUDA_DTYPES[dtype], internal_input_shape=layout)


def _twin(cell, device: torch.device, dtype: torch.dtype):
    """The CUDA twin of a vanilla cell, on `device` in `dtype`, holding the cell's current weights."""
    from xlstm.blocks.slstm.cell import sLSTMCell_cuda

    twin = cell.__dict__.get(TWIN)
    if twin is None or twin._recurrent_kernel_.device != device or twin._recurrent_kernel_.dtype != dtype:
        config = twin_config(cell.config, dtype)
        with torch.device(device):
            twin = sLSTMCell_cuda(config).to(device, dtype).eval()  # compiles the extension (cached after)
        cell.__dict__[TWIN] = twin
    load_weights(twin, cell)
    return twin


def load_weights(twin, cell) -> None:
    """The vanilla cell's recurrent kernel and bias into its twin, in the twin's layout (xlstm's own converters)."""
    with torch.no_grad():
        twin._recurrent_kernel_.copy_(
            twin._recurrent_kernel_ext2int(cell._recurrent_kernel_int2ext(cell._recurrent_kernel_)))
        twin._bias_.copy_(twin._bias_ext2int(cell._bias_int2ext(cell._bias_)))


@contextlib.contextmanager
def cuda_cells(model, device: torch.device, dtype: torch.dtype):
    """For the block's duration, each sLSTM layer's vanilla cell replaced by its CUDA twin where usable();
    yields whether they were."""
    if not usable(model, device, dtype):
        yield False
        return
    layers = _slstm_layers(model)
    try:
        twins = [_twin(layer.slstm_cell, device, dtype) for layer in layers]
    except Exception as e:  # nvcc missing pieces, a compile error: the vanilla cells still compute the same
        _FAILED.add((device, dtype))
        warnings.warn(f"xlstm's CUDA sLSTM cell could not be built ({type(e).__name__}: {str(e)[:200]}); the "
                      f"vanilla cell runs (slow over long prompts). Set {ENV}=vanilla to skip the attempt.")
        yield False
        return
    vanilla = [layer.slstm_cell for layer in layers]
    for layer, twin in zip(layers, twins):
        layer._modules["slstm_cell"] = twin  # not setattr: the twin stays out of the vanilla cell's module tree
    try:
        yield True
    finally:
        for layer, cell in zip(layers, vanilla):
            layer._modules["slstm_cell"] = cell

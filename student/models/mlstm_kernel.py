"""The mLSTM kernel as every student calls it: `mlstm_kernel_fn(name)` adapts an mlstm_kernels kernel to xlstm's
backend signature (gates as (B, NH, S, 1), lengths padded to what the kernel takes), and trains through
mlstm_kernels' chunkwise mLSTM registered as PyTorch custom ops, so torch.compile traces through it without a graph
break.

mlstm_kernels calls its kernels through `torch.autograd.Function`s; dynamo cannot trace the Triton launches inside,
so every layer that calls one was cut into pieces (a graph break before and after each call, forward and backward:
7,257 kernels and 316 ms of host time per hybrid stage II step on the H200). Registered as opaque ops with a fake
(shape-only) implementation and their backward, the kernel is one node of the layer's graph, inductor fuses
everything around it, and a whole step can be compiled and captured.

    tcache::mlstm_chunkwise      (q, k, v, i, f) -> (h, n, m)      forward; n, m: the normaliser and stabiliser
    tcache::mlstm_chunkwise_bw   (q, k, v, i, f, n, m, dh) -> (dq, dk, dv, di, df)

Both dispatch on the device: mlstm_kernels' Triton XL-chunk kernels on CUDA (xLSTM-7B's), its native chunkwise
PyTorch twins on CPU (the same equations, fp32; `chunkwise--native_custbw`, for tests and opcheck: CPU training uses
the native code under autograd, which dynamo traces as it is). The chunk states are recomputed in the backward (no
(NC + 1) x DHQK x DHV states kept per head).

The backward is mlstm_kernels' own: it holds the normaliser max(|n.q|, e^-m) constant (dq, dk, di, df differ from
autograd's through the forward once |n.q| exceeds e^-m). That is what GPU training has always used (the Triton
kernel's autograd Function); the op changes how it is called, not what it computes. Shapes: q, k (B, NH, S, DHQK),
v (B, NH, S, DHV), i, f (B, NH, S) gate pre-activations in fp32; S a multiple of chunk_size (the adapter pads).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from tcache.errors import TcacheError

MIN_CHUNK = 16
"""Smallest chunk the chunkwise adapter runs (Triton's smallest matmul tile); shorter ones pad instead."""
OP_KERNELS = ("chunkwise--triton_xl_chunk", "chunkwise--native_custbw")
"""Kernels that run as the custom op below (mlstm_kernels' Triton XL-chunk kernel, and its native twin on CPU)."""
OP_ENV = "TCACHE_MLSTM_OP"
"""1 (default): OP_KERNELS train through the custom op, one node of a compiled graph; 0: the Triton kernel through
mlstm_kernels' autograd Function, as before (a graph break around every call under torch.compile). Measured on an
H200 (benchmarks/results/distill-step-h200): the hybrid's stage II 1.38x faster with the op and the whole step
compiled, CUDA tests of the op and the compiled step passed."""
KERNEL_DTYPE_ENV = "TCACHE_MLSTM_KERNEL_DTYPE"
"""auto (default) | fp32 | bf16 | fp16: the dtype q, k, v reach the chunkwise op in (its compute dtype; gates stay
fp32). auto: bf16 when they arrive in bf16 (a bf16 step on a GPU), fp32 otherwise (the CPU's fp32, and fp16: a T4's
half precision is not measured for quality)."""
CLOSED_GATE = 1e4
"""Gate pre-activation of padded positions: input gate -1e4 (exp: 0), forget gate +1e4 (sigmoid: 1), a no-op."""


def _fw(q, k, v, i, f, chunk_size: int, eps: float, qk_scale: float):
    if q.device.type == "cuda":
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk.fw import mlstm_chunkwise_fw

        h, n, m, _, _ = mlstm_chunkwise_fw(matQ=q, matK=k, matV=v, vecI=i, vecF=f, qk_scale=qk_scale,
                                           chunk_size=chunk_size, eps=eps, output_dtype=torch.float32)
        return h.to(q.dtype), n, m  # h in q's dtype, as the fake implementation says (a bf16 build's h is bf16)
    from mlstm_kernels.torch.chunkwise.native.fw import mlstm_chunkwise_fw

    # the native code mixes its inputs' dtype with fp32 gates: it runs in fp32 (CPU students train in fp32)
    h, n, m, _, _ = mlstm_chunkwise_fw(matQ=q.float(), matK=k.float(), matV=v.float(), vecI=i, vecF=f,
                                       qk_scale=qk_scale, chunk_size=chunk_size, eps=eps)
    return h.to(q.dtype), n.float(), m.float()


def _bw(q, k, v, i, f, n, m, dh, chunk_size: int, eps: float, qk_scale: float):
    if q.device.type == "cuda":
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk.bw import mlstm_chunkwise_bw

        return mlstm_chunkwise_bw(matQ=q, matK=k, matV=v, vecI=i, vecF=f, vecN_out=n, vecM_out=m,
                                  matDeltaH_out=dh, qk_scale=qk_scale, chunk_size=chunk_size, eps=eps)[:5]
    from mlstm_kernels.torch.chunkwise.native.bw import mlstm_chunkwise_bw

    grads = mlstm_chunkwise_bw(matQ=q.float(), matK=k.float(), matV=v.float(), vecI=i, vecF=f, vecN_out=n,
                               vecM_out=m, matDeltaH=dh.float(), qk_scale=qk_scale, CHUNK_SIZE=chunk_size, EPS=eps)
    return grads[:5]


@torch.library.custom_op("tcache::mlstm_chunkwise", mutates_args=())
def mlstm_chunkwise(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, chunk_size: int, eps: float,
                    qk_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """h (B, NH, S, DHV) in q's dtype, n and m (B, NH, S) fp32."""
    h, n, m = _fw(q.contiguous(), k.contiguous(), v.contiguous(), i.contiguous(), f.contiguous(), chunk_size,
                  eps, qk_scale)
    return h, n, m


@mlstm_chunkwise.register_fake
def _(q, k, v, i, f, chunk_size, eps, qk_scale):
    B, NH, S, _ = q.shape
    return (q.new_empty(B, NH, S, v.shape[-1]), q.new_empty(B, NH, S, dtype=torch.float32),
            q.new_empty(B, NH, S, dtype=torch.float32))


@torch.library.custom_op("tcache::mlstm_chunkwise_bw", mutates_args=())
def mlstm_chunkwise_bw(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, n: Tensor, m: Tensor, dh: Tensor,
                       chunk_size: int, eps: float, qk_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of mlstm_chunkwise's h with respect to q, k, v, i, f, each in its input's dtype."""
    dq, dk, dv, di, df = _bw(q.contiguous(), k.contiguous(), v.contiguous(), i.contiguous(), f.contiguous(),
                             n.contiguous(), m.contiguous(), dh.contiguous(), chunk_size, eps, qk_scale)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip((dq, dk, dv, di, df), (q, k, v, i, f)))


@mlstm_chunkwise_bw.register_fake
def _(q, k, v, i, f, n, m, dh, chunk_size, eps, qk_scale):
    # contiguous, whatever the inputs' strides: the real op's gradients are (gates arrive transposed)
    return tuple(t.new_empty(t.shape) for t in (q, k, v, i, f))


def _setup(ctx, inputs, output):
    q, k, v, i, f, chunk_size, eps, qk_scale = inputs
    _, n, m = output
    ctx.save_for_backward(q, k, v, i, f, n, m)
    ctx.args = (chunk_size, eps, qk_scale)


def _backward(ctx, dh, dn, dm):
    # n and m are the kernel's by-products (the backward's inputs), never a loss's: their gradients are None / 0
    q, k, v, i, f, n, m = ctx.saved_tensors
    dq, dk, dv, di, df = mlstm_chunkwise_bw(q, k, v, i, f, n, m, dh, *ctx.args)
    return dq, dk, dv, di, df, None, None, None


mlstm_chunkwise.register_autograd(_backward, setup_context=_setup)


def kernel_dtype(inputs: torch.dtype) -> torch.dtype:
    """The chunkwise kernel's compute dtype for q, k, v arriving in `inputs` (KERNEL_DTYPE_ENV)."""
    name = os.environ.get(KERNEL_DTYPE_ENV, "auto").lower()
    if name == "auto":
        return torch.bfloat16 if inputs == torch.bfloat16 else torch.float32
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in choices:
        raise TcacheError(f"{KERNEL_DTYPE_ENV}={name!r} is not one of auto, fp32, bf16, fp16; set one of them, "
                          "or unset it")
    return choices[name]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (mlstm_kernels registers its Triton kernels only when it imports)
        from mlstm_kernels.torch import get_mlstm_kernel

        get_mlstm_kernel("chunkwise--triton_xl_chunk")
        return True
    except Exception:
        return False


def pad_end(q, k, v, i, f, pad: int) -> tuple:
    """q, k, v (B, NH, S, DH) and the gate pre-activations i, f (B, NH, S) with `pad` positions appended. Exact: the
    mLSTM is causal, so positions < S never see the padding (its outputs are cut off), and the padded gates are a
    closed input gate and an open forget gate, so the state after the padding (a prefill's state) is the state
    after position S - 1."""
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, NH, S + pad, DH)
    return q, k, v, F.pad(i, (0, pad), value=-CLOSED_GATE), F.pad(f, (0, pad), value=CLOSED_GATE)


def padded_length(S: int, chunk_size: int = 64) -> int:
    """The length a sequence of S tokens pads to for the Triton XL-chunk kernel: the next multiple of chunk_size
    above it, else the next power of two >= MIN_CHUNK."""
    return -(-S // chunk_size) * chunk_size if S > chunk_size else max(MIN_CHUNK, 1 << (S - 1).bit_length())


def mlstm_kernel_fn(name: str, chunk_size: int = 64, eps: float = 1e-6):
    """An adapter with xlstm's classic backend signature over an `mlstm_kernels` sequence kernel.

    Both compute the same stabilised, normalised mLSTM (keys scaled by DH^-1/2, eps 1e-6); the
    classic cell passes gate pre-activations as (B, NH, S, 1), mlstm_kernels wants (B, NH, S).
    """
    from mlstm_kernels.torch import get_mlstm_kernel

    kernel = get_mlstm_kernel(name)
    as_op = name in OP_KERNELS and (name.startswith("chunkwise--native") or os.environ.get(OP_ENV, "1") == "1")

    def fn(queries, keys, values, igate_preact, fgate_preact, return_last_states: bool = False, **_):
        # (B, NH, S, DH) x3, (B, NH, S, 1) x2 -> (B, NH, S, DH) [, the state after the last position]
        S, in_dtype = queries.shape[2], queries.dtype
        i, f = igate_preact.squeeze(-1), fgate_preact.squeeze(-1)  # (B, NH, S) x2
        cs = chunk_size if S % chunk_size == 0 else math.gcd(S, chunk_size)
        pad = 0
        if "triton" in name and S % chunk_size:
            # mlstm_kernels' Triton XL-chunk kernel takes 16, 32, 64 or multiples of 64 tokens (its
            # select_heuristic_xl_chunk_kernel_params asserts it): a 40-token prompt padded to 48 failed on the H200
            # (tests/test_static_decode.py's twin test)
            pad = padded_length(S, chunk_size) - S
            cs = min(chunk_size, S + pad)
        elif cs < MIN_CHUNK:
            # An eval length like 131 would give chunks of 1 token (a Python loop over S chunks in the native
            # kernel; below Triton's smallest tile): the end is padded instead (pad_end: exact)
            pad = -S % MIN_CHUNK
            cs = math.gcd(S + pad, chunk_size)
        if pad:
            queries, keys, values, i, f = pad_end(queries, keys, values, i, f, pad)  # S + pad positions
        if return_last_states:
            # the state-returning build of the Triton kernel hit an LLVM assertion with bf16 inputs (H100, a bf16
            # exported model's prefill, benchmarks/speed.py): the decode path hands it fp32 (exact for bf16 values),
            # so it computes in fp32 unless TCACHE_MLSTM_KERNEL_DTYPE says otherwise
            queries, keys, values, i, f = (t.float() for t in (queries, keys, values, i, f))
        # bf16 inputs are computed in bf16 (kernel_dtype's auto): with triton 3.6.0 the bf16 build compiles, passes
        # its float64 test, trains stage II 1.078-1.09x faster (H200, H100: benchmarks/results/distill-step-h200-
        # prewarm, distill-step-h100-anchor), and its quality run equals the fp32 kernel's (32.17 vs 32.20 ppl,
        # benchmarks/results/issue32-quality-h100). Its builds had crashed Triton's compiler once (LLVM
        # SLPVectorizer assertion, triton 3.x, H100): TCACHE_MLSTM_KERNEL_DTYPE=fp32 is the way back.
        dtype = kernel_dtype(queries.dtype)
        if as_op and not return_last_states:  # training and eval: the custom op, one node of a compiled graph
            qk, v_ = (queries.to(dtype), keys.to(dtype)), values.to(dtype)
            h = mlstm_chunkwise(*qk, v_, i.float(), f.float(), cs, eps, queries.shape[-1] ** -0.5)[0]
            return (h[:, :, :S] if pad else h).to(in_dtype)  # (B, NH, S, DH)
        out = kernel(q=queries, k=keys, v=values, i=i, f=f, chunk_size=cs, autocast_kernel_dtype=dtype, eps=eps,
                     return_last_states=return_last_states)
        h, state = out if return_last_states else (out, None)
        h = (h[:, :, :S] if pad else h).to(in_dtype)  # (B, NH, S, DH)
        return (h, state) if return_last_states else h  # state: C (B, NH, DH, DH), n (B, NH, DH), m (B, NH, 1)

    return fn

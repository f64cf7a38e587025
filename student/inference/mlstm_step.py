"""The mLSTM's one-token step on a decode state's own buffers, as one op: `tcache::mlstm_step_` updates C, n, m in place
and returns the head outputs. With TCACHE_MLSTM_STEP=triton on CUDA it is mlstm_kernels' fused Triton step kernel (the
recurrent step xLSTM-7B decodes with: one launch per layer instead of ~25 small kernels), writing the new state over
the old; by default mlstm_kernels' native step, its result copied into the buffers. Registered as a custom op so the
decoder's torch.compile keeps it as one opaque node (dynamo cannot trace a Triton launch) and a CUDA graph holds it.

    q, k (B, NH, F) features, v (B, NH, d), i, f (B, NH, 1) gate pre-activations, all fp32
    C (B, NH, F, d), n (B, NH, F), m (B, NH, 1): fp32, contiguous (decode.StaticDecoder allocates them so)

`update_` is the state update alone with the forget gate already in log space, in place: the joint mix's linear state
(joint_state.py) takes the key leaving its window through it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

STEP_ENV = "TCACHE_MLSTM_STEP"
"""native (default): mlstm_kernels' native step on every device (compiled with the rest of the layer step); triton:
the Triton step kernel on CUDA where it applies (triton_fits). Triton stays opt-in until its CUDA test has passed on
a GPU here: mlstm_kernels' own triton_step.py says the kernel "fails in the tests" and should not be used."""


def triton_fits(F_: int, d: int) -> bool:
    """Whether mlstm_kernels' Triton step (triton/recurrent/fw_step_fused.py) computes this shape in place. It loads q,
    k, n and v in blocks of min(64, next_pow2(dim)) without a bounds mask, so F and d must be whole blocks; and with
    d <= 64 one program owns a head's whole C, n, m (one block of d), so writing the new state over the old is safe
    (with two blocks of d, one program would overwrite n and m while the other still reads them)."""
    def block(x):
        return min(64, 1 << (x - 1).bit_length())
    return d <= 64 and F_ % block(F_) == 0 and d % block(d) == 0


def _use_triton(q: Tensor, v: Tensor) -> bool:
    if q.device.type != "cuda" or os.environ.get(STEP_ENV, "native") != "triton":
        return False
    try:
        from mlstm_kernels.torch.recurrent.triton_step import mlstm_recurrent_step__triton_fw  # noqa: F401
    except ImportError:  # mlstm_kernels without triton
        return False
    return triton_fits(q.shape[-1], v.shape[-1])


@torch.library.custom_op("tcache::mlstm_step_", mutates_args=("c", "n", "m"))
def mlstm_step_(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, c: Tensor, n: Tensor, m: Tensor,
                eps: float) -> Tensor:
    """h (B, NH, d) fp32; C, n, m advanced in place."""
    if _use_triton(q, v):
        from mlstm_kernels.torch.recurrent.triton_step import mlstm_recurrent_step__triton_fw

        # the kernel's wrapper makes every argument contiguous: the buffers already are, so the "new" state it
        # writes is the buffers themselves (a copy would silently take the update)
        h, _ = mlstm_recurrent_step__triton_fw(c, n, m, q, k, v, i, f, matC_new=c, vecN_new=n, scaM_new=m, eps=eps)
        return h
    from mlstm_kernels.torch.recurrent.native_step import mlstm_recurrent_step__native

    h, new = mlstm_recurrent_step__native(q, k, v, i, f, c, n, m, eps=eps)
    for buf, t in zip((c, n, m), new):
        buf.copy_(t)
    return h


@mlstm_step_.register_fake
def _(q, k, v, i, f, c, n, m, eps):
    return v.new_empty(v.shape)


def step(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: tuple, r: int, eps: float = 1e-12) -> Tensor:
    """One step of the mLSTM over the H query heads: q (B, H, F), k (B, Hm, F), v (B, Hm, d), i, f (B, Hm, 1) fp32;
    `state` C, n, m over the Hm = H / r heads decode keeps (mixer.keep_state), advanced in place. h (B, H, d) fp32.
    With r > 1 (--mlstm-heads kv) the group's state is repeated to its query heads for the step and one copy kept, as
    mixer_step._mlstm does (the group's r states are equal)."""
    c, n, m = state
    if r == 1:
        if _use_triton(q, v) and not all(t.is_contiguous() for t in state):
            from tcache.errors import TcacheError

            raise TcacheError("the mLSTM step's state buffers are not contiguous, so the Triton step would update a "
                              "copy; allocate them with decode.StaticDecoder (it makes them contiguous)")
        return mlstm_step_(q, k, v, i, f, c, n, m, eps)
    heads = [t.repeat_interleave(r, 1) for t in (k, v, i, f, c, n, m)]  # (B, H, ...) each
    h = mlstm_step_(q, *heads, eps)
    for buf, t in zip(state, heads[4:]):
        buf.copy_(t[:, ::r])
    return h


def update_(c: Tensor, n: Tensor, m: Tensor, k: Tensor, v: Tensor, i: Tensor, lf: Tensor) -> None:
    """C, n, m <- the mLSTM update by one key k (B, NH, F), value v (B, NH, d), input gate i and log forget gate lf
    (B, NH, 1), in place: C = a C + b k v^T, n = a n + b k, a = exp(lf + m - m'), b = exp(i - m'), m' = max(lf + m, i).
    i = -inf with lf = 0 leaves the state exactly as it is (a = 1, b = 0): how a step with no key to add says so
    without a branch."""
    m_new = torch.maximum(lf + m, i)  # (B, NH, 1)
    a, b = torch.exp(lf + m - m_new), torch.exp(i - m_new)  # (B, NH, 1) x2
    bk = b * k  # (B, NH, F)
    c.mul_(a[..., None]).add_(bk[..., None] * v[:, :, None, :])  # (B, NH, F, d)
    n.mul_(a).add_(bk)
    m.copy_(m_new)


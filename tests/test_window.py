"""The blocked window + sinks attention (student/models/window.py) equals the hybrid's dense-mask SDPA, in float64, for T
below, at and far beyond the window, with and without sinks, values and gradients; so does the flex_attention form
(float32; its backward on CUDA only: flex_attention has none on the CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tcache.student.models.window import flex_window_attention, window_attention


def dense(q, k, v, q_sink, W, S, scaling):
    """An independent reference: every (query, key) pair scored, the mask built from the definitions."""
    T = q.shape[2]
    q_sink = q if q_sink is None else q_sink
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    win = (j <= i) & (i - j < W)  # (T, T)
    far = (j < S) & (i - j >= W)  # (T, T) sinks outside the window
    s = torch.where(win, q @ k.transpose(-1, -2), torch.where(far, q_sink @ k.transpose(-1, -2), float("-inf")))
    return F.softmax(s * scaling, -1) @ v


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("T, W, S", [(9, 8, 0), (130, 3, 1)])
def test_flex_window_equals_the_dense_reference(T, W, S, device):
    g = torch.Generator().manual_seed(T * 31 + W)
    # flex_attention has no backward on the CPU: there the forward alone
    q, k, v, qs = (torch.randn(2, 3, T, 16, generator=g).to(device).requires_grad_(device == "cuda") for _ in range(4))
    got = flex_window_attention(q, k, v, qs, W, S, 0.35)
    want = dense(q, k, v, qs, W, S, 0.35)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    if device == "cpu":
        return
    gg = torch.autograd.grad(got.square().sum(), (q, k, v, qs), allow_unused=True)
    gw = torch.autograd.grad(want.square().sum(), (q, k, v, qs), allow_unused=True)
    for x, a, b in zip((q, k, v, qs), gg, gw):
        a, b = (torch.zeros_like(x) if t is None else t for t in (a, b))
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("T, W, S, block", [(5, 8, 2, 4), (8, 8, 2, 3), (9, 8, 0, 4), (70, 8, 4, 16),
                                            (200, 16, 4, 32), (64, 64, 4, 128), (130, 3, 1, 7)])
def test_blocked_window_equals_the_dense_reference(T, W, S, block, device):
    g = torch.Generator().manual_seed(T * 31 + W)
    q, k, v, qs = (torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
                   for _ in range(4))
    use_sink = T > W
    got = window_attention(q, k, v, qs if use_sink else None, W, S, 0.35, block=block)
    want = dense(q, k, v, qs if use_sink else None, W, S, 0.35)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    gg = torch.autograd.grad(got.square().sum(), (q, k, v, qs), allow_unused=True)
    gw = torch.autograd.grad(want.square().sum(), (q, k, v, qs), allow_unused=True)
    for x, a, b in zip((q, k, v, qs), gg, gw):  # an input a path never reads has no gradient: zero
        a, b = (torch.zeros_like(x) if t is None else t for t in (a, b))
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("W, S", [(32, 4), (16, 4), (128, 4), (32, 0), (33, 2)])
def test_the_blocked_windows_gemms_span_multiples_of_8(W, S):
    """Every matmul of the blocked window's forward and backward (bf16 autocast, as a GPU step runs it) has M, N, K
    and its row strides a multiple of 8 at head dim 64, for any window and sink count: tensor-core GEMMs need it
    for aligned loads, and cuBLAS's fallback kernels for unaligned ones cost ~5 of a stage II step's 67 GPU ms
    (distill-step-h200). Before, the score GEMM spanned 100 keys at W = 32, S = 4 (a block of 64 and 36 before it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten, seen = torch.ops.aten, []

    class Gemms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default):
                a, b = args[-2:] if func in (aten.addmm.default, aten.baddbmm.default) else args[:2]
                seen.append((tuple(a.shape[-2:]) + tuple(b.shape[-1:]), a.stride()[-2:] + b.stride()[-2:]))
            return func(*args, **(kwargs or {}))

    q, k, v, qs = (torch.randn(2, 3, 300, 64, requires_grad=True) for _ in range(4))
    with Gemms(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = window_attention(q, k, v, qs, W, S, 0.125)
    with Gemms():
        out.float().square().sum().backward()
    assert len(seen) >= 4  # scores and values, forward and backward
    for dims, strides in seen:
        assert all(x % 8 == 0 for x in dims) and all(x % 8 == 0 for x in strides if x != 1), (dims, strides)


@pytest.mark.parametrize("kernel", ["blocked", "dense"])
def test_the_mixers_window_kernels_equal_the_dense_reference(kernel, monkeypatch):
    """HybridMixer.window_attention, blocked (the default on every device) and the dense-mask SDPA that
    TCACHE_WINDOW=dense keeps for benchmarks, equals the reference (float64, sinks far and near)."""
    monkeypatch.setenv("TCACHE_WINDOW", kernel)
    from transformers import LlamaConfig, LlamaForCausalLM

    from tcache.student.models.hybrid import HybridConfig, HybridStudent

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)).double()
    mx = HybridStudent(lm, HybridConfig(window=8, sinks=2)).mixers[0]
    T = 40
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, T, 8, generator=g, dtype=torch.float64) for _ in range(3))
    cos, sin = lm.model.rotary_emb(q, torch.arange(T)[None])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q_sink = mx.sink_queries(q, k, cos, sin, apply_rotary_pos_emb)
    got = mx.window_attention(q, k, v, q_sink)
    torch.testing.assert_close(got, dense(q, k, v, q_sink, 8, 2, mx.scaling), atol=1e-12, rtol=1e-10)

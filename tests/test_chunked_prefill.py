"""chunked_prefill (student/inference/chunked_prefill.py) equals decode.prefill on the whole prompt: every position's logits,
the state, and the greedy tokens and logits of decode.step continuing from it, for v1 (sLSTM + mLSTM blocks) and
v2 (mLSTM blocks) students, with chunks shorter than the conv kernel, dividing the prompt, not dividing it and
equal to it. Tiny random students on CPU (the native chunkwise kernel decode.prefill picks there)."""

from __future__ import annotations

import pytest
import torch

import decode_oracle
from tcache.errors import TcacheError
from tcache.student.inference import prefill
from tcache.student.inference.chunked_prefill import chunked_prefill
from tcache.student.models.xlstm import Student, StudentConfig

T, V, STEPS = 160, 64, 5
# max |logit difference| measured (logits ~ +-2.3), prompt / steps: fp32 8e-7 / 5e-7, fp64 3e-7 / 3e-7 (the mLSTM
# kernels compute in fp32 either way, as in mlstm_kernel.mlstm_kernel_fn). Dropping one kind of state between chunks (the
# mLSTM's, its m alone, either conv's, the sLSTM's, or the DH^-1/2 rescaling) moved the prompt's logits by 3e-2 to
# 1.1; padding with open gates, or unscaled n alone, left them but not the state (checked below) as they were
ATOL = {torch.float32: 1e-5, torch.float64: 1e-6}
RECIPES = {"v1": [0, 2], "v2": []}  # slstm_at of 4 blocks: v1 alternates sLSTM, mLSTM (sLSTM first)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on the 2-core CI box: two intra-op threads ran this file 10-30x slower while other processes were
    busy (measured: 0.2 s vs 5-7 s for one chunk-3 prefill); one thread keeps it steady."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _student(recipe: str, dtype: torch.dtype) -> Student:
    torch.manual_seed(0)
    cfg = StudentConfig(vocab_size=V, hidden_size=32, num_blocks=4, num_heads=4, slstm_at=RECIPES[recipe],
                        context_length=T)
    return Student(cfg).eval().to(dtype)


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))  # (B, T)


def _tensors(state: prefill.DecodeState) -> list[torch.Tensor]:
    return [t for layer in state.layers for key in sorted(layer) for t in layer[key]]


def _greedy(model, logits: torch.Tensor, state: prefill.DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS greedy tokens (B, STEPS) from the prompt's last logits and the state, and their step logits."""
    tok, toks, outs = logits[:, -1:].argmax(-1), [], []  # (B, 1)
    for _ in range(STEPS):
        out = decode_oracle.step(model, tok, state)  # (B, 1, V)
        tok = out.argmax(-1)
        toks.append(tok)
        outs.append(out)
    return torch.cat(toks, 1), torch.cat(outs, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_chunked_prefill_equals_the_one_shot_prefill(recipe, dtype):
    model, ids, atol = _student(recipe, dtype), _ids(), ATOL[dtype]
    ref, ref_state = prefill.prefill(model, ids)  # (B, T, V)
    ref_tensors = [t.clone() for t in _tensors(ref_state)]  # decode.step updates the state in place
    ref_toks, ref_steps = _greedy(model, ref, ref_state)
    # the tolerance is not vacuous: the last chunk prefilled from an empty state is far off
    alone, _ = prefill.prefill(model, ids[:, -20:])
    assert (alone - ref[:, -20:]).abs().max() > 1000 * atol
    # 3: shorter than the conv kernel (4), so its kept inputs span chunks; 32 divides T; 70 does not (chunks of 70
    # tokens pad to 128 for the kernel, the last, 20, to 32); T: one chunk (decode.prefill itself)
    for chunk in (3, 32, 70, T):
        logits, state = chunked_prefill(model, ids, chunk=chunk)
        assert logits.shape == ref.shape and state.pos == T
        torch.testing.assert_close(logits, ref, atol=atol, rtol=0, msg=f"logits, chunk {chunk}")
        for got, want in zip(_tensors(state), ref_tensors, strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, atol=atol, rtol=1e-5, msg=f"state, chunk {chunk}")
        toks, steps = _greedy(model, logits, state)
        assert torch.equal(toks, ref_toks), f"greedy tokens, chunk {chunk}"
        torch.testing.assert_close(steps, ref_steps, atol=atol, rtol=0, msg=f"step logits, chunk {chunk}")


@pytest.mark.parametrize("recipe", RECIPES)
def test_keep_returns_the_last_positions_across_chunks(recipe):
    model, ids = _student(recipe, torch.float32), _ids()
    ref, _ = prefill.prefill(model, ids)
    for keep in (1, 40, 80, T, T + 5):  # within the last chunk, spanning two, three, all, more than T
        logits, state = chunked_prefill(model, ids, keep=keep, chunk=32)
        assert logits.shape == (2, min(keep, T), V) and state.pos == T
        torch.testing.assert_close(logits, ref[:, -keep:], atol=ATOL[torch.float32], rtol=0)


def test_refuses_hybrid_students_and_empty_chunks():
    model = _student("v2", torch.float32)
    with pytest.raises(ValueError, match="chunk"):
        chunked_prefill(model, _ids(), chunk=0)
    model.family = "hybrid"
    with pytest.raises(TcacheError, match="xLSTM"):
        chunked_prefill(model, _ids())


def test_padded_lengths_are_lengths_the_triton_kernel_accepts():
    """Every prompt length pads (mlstm_kernel.padded_length, used by the prefill's kernel adapter on CUDA and by the chunked
    prefill's tails) to a length mlstm_kernels' Triton XL-chunk kernel takes, checked by that kernel's own parameter
    heuristic (pure Python, so on CPU too); a 40-token prompt padded to 48 failed its assertion on the H200."""
    from mlstm_kernels.triton.chunkwise.kernel_param_heuristics import select_heuristic_xl_chunk_kernel_params

    from tcache.student.models.mlstm_kernel import padded_length

    for S in range(1, 700):
        L = padded_length(S, 64)
        assert S <= L < S + 64
        select_heuristic_xl_chunk_kernel_params(L, target_chunk_size=min(64, L))  # raises on a length it refuses


@pytest.mark.parametrize("S", [40, 96, 144])
def test_the_kernel_adapter_pads_for_the_triton_kernel_exactly(S, monkeypatch):
    """mlstm_kernel.mlstm_kernel_fn given a Triton kernel's name hands the kernel only lengths it accepts (its own
    heuristic asserts them), and its outputs and last state equal the unpadded call's (float64). The Triton kernel
    needs a GPU, so its name is served here by the native chunkwise kernel, behind its heuristic's check."""
    import mlstm_kernels.torch as mk
    from mlstm_kernels.triton.chunkwise.kernel_param_heuristics import select_heuristic_xl_chunk_kernel_params

    from tcache.student.models.mlstm_kernel import mlstm_kernel_fn

    real, seen = mk.get_mlstm_kernel, []

    def checked(name):
        native = real("chunkwise--native_autograd")

        def kernel(q, **kw):
            seen.append(q.shape[2])
            select_heuristic_xl_chunk_kernel_params(q.shape[2], target_chunk_size=kw["chunk_size"])
            return native(q=q, **kw)
        return kernel

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, S, 16, generator=g, dtype=torch.float64) for _ in range(3))
    i, f = (torch.randn(2, 3, S, 1, generator=g, dtype=torch.float64) + 2 for _ in range(2))
    want, (c0, n0, m0) = mlstm_kernel_fn("chunkwise--native_autograd", chunk_size=S)(q, k, v, i, f,
                                                                                    return_last_states=True)
    monkeypatch.setattr(mk, "get_mlstm_kernel", checked)
    got, (c1, n1, m1) = mlstm_kernel_fn("chunkwise--triton_xl_chunk")(q, k, v, i, f, return_last_states=True)
    assert seen and seen[0] > S
    # the kernel computes in fp32 whatever its inputs (the adapter's autocast_kernel_dtype), and the two calls chunk
    # differently, so the outputs agree to fp32 rounding through the normaliser (~1e-3 here), the last state closer;
    # a padding that leaked into the state (an open input gate) would move C, n, m by O(1)
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-3, atol=2e-3)
    for a, b in ((c1, c0), (n1, n0), (m1, m0)):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)

"""The joint mix decodes from a recurrent state (student/inference/joint_state.py): after a prefill of any length
(inside the sinks, below, at and beyond the window), each static step gives the logits of the full parallel forward
(student/models/joint.py, itself held to the float64 equations in tests/test_hybrid.py); generate() of the exported
class gives the full forward's logits at every step, with one step per new token; the state does not grow with the
prefix."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tcache.student.inference.decode import StaticDecoder
from tcache.student.inference.prefill import prefill
from tcache.student.models.hybrid import HybridConfig, HybridStudent

W, S = 6, 2


def joint_student(heads: str = "query", rope: bool = False) -> HybridStudent:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    lm.config._attn_implementation = "sdpa"
    model = HybridStudent(lm, HybridConfig(window=W, sinks=S, mix="joint", mlstm_heads=heads,
                                           mlstm_rope=rope)).eval()
    model.set_kernel(torch.device("cpu"))
    with torch.no_grad():  # away from the init: the window's share per head, features, gates
        for mx in model.mixers:
            mx.ogate_b.normal_(0, 1.0), mx.phi_q.add_(torch.randn_like(mx.phi_q) * 0.3)
            mx.phi_k.add_(torch.randn_like(mx.phi_k) * 0.3)
            mx.fgate.bias.normal_(2.0, 1.0), mx.igate.bias.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("heads, rope", [("query", False), ("kv", False), ("query", True)])
@pytest.mark.parametrize("T", [1, W - 1, W + S, 2 * W + 3])  # inside the sinks, below, at + beyond, far beyond W
def test_static_joint_steps_equal_the_full_forward(T, heads, rope):
    model = joint_student(heads, rope)
    ids = torch.randint(0, 97, (2, T + 10), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        full, _ = model(ids)  # (2, T + 10, V): the parallel joint forward
        logits, state = prefill(model, ids[:, :T])
        torch.testing.assert_close(logits, full[:, :T], atol=1e-5, rtol=1e-5)
        dec = StaticDecoder(model, state, capture=False)
        for t in range(T, T + 10):
            got = dec.step(ids[:, t:t + 1])  # (2, 1, V): the logits after token t
            torch.testing.assert_close(got[:, 0], full[:, t], atol=1e-4, rtol=1e-4, msg=lambda m: f"t={t}: {m}")


@pytest.mark.parametrize("T", [1, W + S + 3])  # steps that fill the sinks and the ring, and steps past both
def test_generate_of_a_joint_export_gives_the_full_forwards_logits_and_keeps_a_bounded_state(T, monkeypatch):
    """generate() of the exported class: every generated step's logits are the full parallel forward's (float32,
    1e-4; greedy tokens alone let wrong ring slots through on a tiny random model), one static step per new token;
    the state does not grow with the prefix."""
    from tcache.student.inference.hf import to_hf
    from test_static_decode import full_logits, generated

    hf = to_hf(joint_student(), {"config": {"recipe": "hybrid"}}).eval()
    calls = {"step": 0}
    step = StaticDecoder._step

    def counted(*a, **k):
        calls["step"] += 1
        return step(*a, **k)

    monkeypatch.setattr(StaticDecoder, "_step", counted)
    prompt = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(5))
    got, steps = generated(hf, prompt, 12)
    assert calls["step"] == 11
    full = full_logits(hf, got)  # (2, T + 12, V)
    torch.testing.assert_close(steps, full[:, T - 1:-1], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[:, :T], prompt) and torch.equal(got[:, T:], full[:, T - 1:-1].argmax(-1))
    sizes = []
    for n in (W + 4, 5 * W):
        _, state = prefill(hf.student, torch.zeros(1, n, dtype=torch.long))
        dec = StaticDecoder(hf.student, state, capture=False)
        dec.step(torch.zeros(1, 1, dtype=torch.long))
        sizes.append((state.nbytes(), dec.nbytes()))
    assert sizes[0] == sizes[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run in the GPU call)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_captured_joint_step_replays_the_eager_one_on_cuda(dtype):
    model = joint_student().cuda().to(dtype)
    ids = torch.randint(0, 97, (2, 3 * W + 8), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        _, a = prefill(model, ids[:, :W + 3])
        _, b = prefill(model, ids[:, :W + 3])
    eager, graph = StaticDecoder(model, a, capture=False), StaticDecoder(model, b, capture=True)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for t in range(W + 3, ids.shape[1]):
        torch.testing.assert_close(graph.step(ids[:, t:t + 1]).float(), eager.step(ids[:, t:t + 1]).float(), **tol)
    assert graph.captures == 1

"""The hybrid's compiled step (--compile on: each decoder layer through torch.compile) computes the eager step:
the same loss and the same gradients for every trainable parameter, with and without activation checkpointing
(CPU, float32; the GPU call runs the same test on CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def hybrid(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tcache.student.hybrid import HybridConfig, HybridStudent

    torch.manual_seed(0)
    # head dim 16: mlstm_kernels' Triton kernel (CUDA) needs K >= 16 in its matrix products
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))  # 150 tokens: 3 window blocks
    model = HybridStudent(lm, HybridConfig(window=8, sinks=2)).to(device)
    with torch.no_grad():  # gates away from their init, so every branch carries gradient
        for mx in model.mixers:
            mx.ogate_w.normal_(0, 0.3), mx.phi_q.add_(torch.randn_like(mx.phi_q) * 0.1)
    model.set_kernel(torch.device(device))
    model.set_trainable("all")
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits, _ = model(ids)  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_give_the_eager_loss_and_gradients(device, checkpointing):
    torch._dynamo.reset()
    ids = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(1)).to(device)
    eager = hybrid(device)
    compiled = hybrid(device)
    compiled.load_state_dict(eager.state_dict())
    if checkpointing:
        eager.enable_checkpointing(), compiled.enable_checkpointing()
        eager.train(), compiled.train()
    for layer in compiled.lm.model.layers:
        layer.compile()
    want_loss, want = loss_and_grads(eager, ids)
    got_loss, got = loss_and_grads(compiled, ids)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)

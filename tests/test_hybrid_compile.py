"""The hybrid's compiled step (--compile on: each decoder layer through torch.compile) computes the eager step: the
same loss and the same gradients for every trainable parameter under activation checkpointing (CPU, float32; the GPU
call runs it on CUDA), and `tcache distill --compile on` follows the eager run's losses through both stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def hybrid(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tcache.student.models.hybrid import HybridConfig, HybridStudent

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


# With checkpointing only: the recompute path is the harder composition (it found an inductor bug the plain one did
# not), and test_distill_with_compile_on... covers compiled layers without checkpointing end to end.
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_layers_give_the_eager_loss_and_gradients_under_checkpointing(device):
    torch._dynamo.reset()
    ids = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(1)).to(device)
    eager = hybrid(device)
    compiled = hybrid(device)
    compiled.load_state_dict(eager.state_dict())
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


def test_distill_with_compile_on_follows_the_eager_run_through_both_stages(tmp_path, tiny_teacher, valid_jsonl):
    """`tcache distill --recipe hybrid --compile on` as a user runs it (the default on a GPU; forced here on CPU):
    it completes both stages, its loss at every step equals the --compile off run's, and the saved student
    evaluates."""
    from test_hybrid import metrics, run

    from conftest import build_cache

    cache = tmp_path / "cache"
    build_cache(cache, tiny_teacher, valid_jsonl, tokens=16 * 64, seq_len=64, top_k=8, batch_size=8)
    losses = {}
    for mode in ("off", "on"):
        out = tmp_path / f"run-{mode}"
        r = run("distill", cache, "--out", out, "--recipe", "hybrid", "--steps", 2, "--stage1-tokens", 256,
                "--batch-size", 2, "--grad-accum", 1, "--window", 16, "--sinks", 2, "--compile", mode)
        assert r.exit_code == 0, r.output
        losses[mode] = [m["loss"] for m in metrics(out)]
    assert len(losses["on"]) == len(losses["off"]) == 4  # two stage-I steps, two stage-II steps
    for got, want in zip(losses["on"], losses["off"]):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    r = run("eval", tmp_path / "run-on", "--data", valid_jsonl, "--tokens", 256, "--seq-len", 64, "--json")
    assert r.exit_code == 0, r.output

"""--window-dropout (issue 33: make the mLSTM carry the long range): each layer's window branch is dropped with the
given probability per micro-batch, the draw seeded (the same mask for the same seed); a dropped layer in training
computes its mLSTM branch alone; eval and generation are unchanged whatever was drawn; distill runs with it and the
option refuses what it cannot apply to."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tcache.errors import TcacheError
from tcache.student.models.hybrid import HybridConfig, HybridStudent


def student(layers: int = 2) -> HybridStudent:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    lm.config._attn_implementation = "sdpa"
    model = HybridStudent(lm, HybridConfig(window=6, sinks=2))
    model.set_kernel(torch.device("cpu"))
    with torch.no_grad():
        for mx in model.mixers:
            mx.ogate_w.normal_(0, 0.3), mx.phi_q.add_(torch.randn_like(mx.phi_q) * 0.1)
    return model


def test_the_drop_mask_has_the_asked_rate_and_follows_its_seed():
    model = student(layers=4)
    draws = []
    for seed in range(1500):
        model.drop_windows(0.3, seed)
        draws.append([bool(mx.drop_window) for mx in model.mixers])
    rate = sum(map(sum, draws)) / (4 * len(draws))
    assert abs(rate - 0.3) < 0.025, rate  # 6,000 Bernoulli draws: 4.7 standard errors
    model.drop_windows(0.3, 7)
    again = [bool(mx.drop_window) for mx in model.mixers]
    assert again == draws[7]


def test_a_dropped_layer_trains_on_its_mlstm_branch_alone_and_eval_ignores_the_draw():
    model = student()
    mx = model.mixers[0]
    B, T, H, d = 2, 20, mx.H, mx.head_dim
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, 32, generator=g)
    q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in range(3))
    model.train()
    model.drop_windows(0.999, 0)  # every layer dropped
    assert bool(mx.drop_window)
    got = mx.mix(x, q, k, v)
    mx.branches = "mlstm"  # the mLSTM branch alone, as the --branches mlstm ablation computes it
    want = mx.mix(x, q, k, v)
    mx.branches = "both"
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    model.drop_windows(0.0001, 0)  # none dropped: the gate's mix of both branches
    assert not torch.allclose(mx.mix(x, q, k, v), want)
    ids = torch.randint(0, 97, (2, 20), generator=g)
    model.eval()
    with torch.no_grad():
        model.drop_windows(0.999, 0)
        dropped = model(ids)[0]
        model.drop_windows(0.0001, 0)
        kept = model(ids)[0]
    torch.testing.assert_close(dropped, kept, atol=0, rtol=0)


def test_distill_with_window_dropout_runs_and_changes_training(tmp_path, hybrid_cache_small):
    from tcache.student.training.config import DistillConfig
    from tcache.student.training.train import distill
    import json

    losses = {}
    for p in (0.0, 0.5):
        out = tmp_path / f"p{p}"
        distill(DistillConfig(cache=str(hybrid_cache_small), out=str(out), recipe="hybrid", steps=3,
                              stage1_tokens="128", batch_size=2, grad_accum=1, window=8, sinks=2, device="cpu",
                              window_dropout=p, seed=0))
        losses[p] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses[0.0]) == len(losses[0.5]) and losses[0.0] != losses[0.5]


def test_a_scheduled_dropout_goes_linearly_from_its_start_to_its_final_over_the_runs_micro_batches(
        tmp_path, hybrid_cache_small, monkeypatch):
    """--window-dropout 0.5 --window-dropout-final 0.1: the Trainer draws each micro-batch's mask at the probability
    on the straight line from 0.5 (the first micro-batch) to 0.1 (the last), over both stages."""
    from tcache.student.models.hybrid import HybridStudent
    from tcache.student.training.config import DistillConfig
    from tcache.student.training.train import distill

    drawn = []
    draw = HybridStudent.drop_windows
    monkeypatch.setattr(HybridStudent, "drop_windows", lambda self, p, seed: drawn.append(p) or draw(self, p, seed))
    distill(DistillConfig(cache=str(hybrid_cache_small), out=str(tmp_path / "s"), recipe="hybrid", steps=3,
                          stage1_tokens="128", batch_size=2, grad_accum=2, window=8, sinks=2, device="cpu",
                          window_dropout=0.5, window_dropout_final=0.1, seed=0))
    n = len(drawn)
    assert n >= 4 and drawn == pytest.approx([0.5 - 0.4 * i / (n - 1) for i in range(n)])


@pytest.mark.parametrize("kw, words", [({"recipe": "v2", "window_dropout": 0.5}, "--recipe hybrid"),
                                       ({"recipe": "hybrid", "mix": "joint", "window_dropout": 0.5}, "--mix gate"),
                                       ({"recipe": "hybrid", "window_dropout": 1.0}, "[0, 1)"),
                                       ({"recipe": "hybrid", "window_dropout_final": 0.1}, "give --window-dropout"),
                                       ({"recipe": "hybrid", "window_dropout": 0.5, "window_dropout_final": 1.0},
                                        "[0, 1)")])
def test_window_dropout_refuses_what_it_cannot_apply_to(kw, words, tmp_path):
    from tcache.student.training.config import DistillConfig

    with pytest.raises(TcacheError, match=words.replace("[", r"\[").replace(")", r"\)")):
        DistillConfig(cache=str(tmp_path), out=str(tmp_path / "o"), **kw)


@pytest.fixture(scope="module")
def hybrid_cache_small(tmp_path_factory, tiny_teacher, valid_jsonl):
    from conftest import build_cache, text_head

    text = text_head(valid_jsonl, tmp_path_factory.mktemp("wd_text") / "t.jsonl", 6000)
    out = tmp_path_factory.mktemp("wd_cache") / "c"
    build_cache(out, tiny_teacher, text, tokens=8 * 32, seq_len=32, top_k=8, batch_size=8)
    return out

"""CPU memory options of distill: checkpointed xLSTM blocks and the chunked loss change memory, not results."""

from __future__ import annotations

import torch

from tcache.student.training.config import DistillConfig
from tcache.student.training.data import CacheRows
from tcache.student.training.train import setup


def _grads(cache, tmp_path, **overrides):
    cfg = DistillConfig(cache=str(cache), out=str(tmp_path / "r"), recipe="v1", steps=1, batch_size=2, seed=3,
                        **overrides)
    tr = setup(cfg)
    rows = CacheRows(str(cache), with_hidden=tr.plan.groups > 0)
    batch = {k: torch.stack([rows[i][k] for i in range(2)]) for k in rows[0]}
    terms = tr.micro_step(batch, tr.weights(0, 0))
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    return tr, terms, grads


def test_checkpointed_blocks_and_the_chunked_loss_give_the_same_step(shared_cache, tmp_path):
    """The CPU defaults (checkpointed blocks, loss in chunks of 1024 positions) against full activations
    and full logits: the same loss terms and gradients for a v1 student (sLSTM and mLSTM blocks)."""
    tr_new, t_new, g_new = _grads(shared_cache, tmp_path)
    assert tr_new.model.checkpointing and tr_new.chunk == 1024  # what auto resolves to on CPU
    tr_old, t_old, g_old = _grads(shared_cache, tmp_path, checkpointing="off", loss_chunk=0)
    assert not tr_old.model.checkpointing and tr_old.chunk == 0
    for term in ("ce", "kd", "align", "loss"):
        assert torch.allclose(t_new[term], t_old[term], rtol=1e-5, atol=1e-6), term
    assert g_new.keys() == g_old.keys() and len(g_new) > 10
    for n in g_new:
        assert torch.allclose(g_new[n], g_old[n], rtol=1e-4, atol=1e-6), (n, (g_new[n] - g_old[n]).abs().max())


def test_an_explicit_compile_wins_over_automatic_checkpointing(shared_cache, tmp_path):
    """On CPU checkpointing is automatic for the xLSTM recipes; asking for --compile on turns it off rather
    than failing, and asking for both is one clear refusal."""
    import pytest

    from tcache.errors import TcacheError

    base = dict(cache=str(shared_cache), out=str(tmp_path / "r"), recipe="v1", steps=1, batch_size=2)
    tr = setup(DistillConfig(compile="on", **base))
    assert not tr.model.checkpointing and tr.plan.info["compile"] == "on"
    tr = setup(DistillConfig(checkpointing="on", **base))
    assert tr.model.checkpointing and tr.plan.info["compile"] == "off"
    with pytest.raises(TcacheError, match="--checkpointing on with --compile on"):
        setup(DistillConfig(checkpointing="on", compile="on", **base))

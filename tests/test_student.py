"""Student construction: recipes, sizes, kernels, frozen parts."""

from __future__ import annotations

import pytest
import torch

from tcache.student.training.config import RECIPES
from tcache.student.models.xlstm import Student, StudentConfig, resolve_kernels
from tcache.student.training.runtime import resolve_precision
from tcache.errors import TcacheError


def test_recipe_sizes_for_the_shared_teacher():
    # 8 layers, 6 heads -> v1: floor(8/2) = 4 alternating blocks starting with sLSTM, roundup(6, 4) = 8 heads
    assert RECIPES["v1"].sizes(8, 6) == (4, 8, [0, 2])
    assert RECIPES["v2"].sizes(8, 6) == (8, 8, [])
    # SmolLM2-360M: 32 layers, 15 heads -> v2: 32 mLSTM blocks, 16 heads
    assert RECIPES["v2"].sizes(32, 15) == (32, 16, [])


def test_v2_student_reproduces_the_papers_parameter_count():
    """The v2 paper: 279M parameters of which 184M train, for the SmolLM2-360M teacher."""
    cfg = StudentConfig(vocab_size=49152, hidden_size=960, num_blocks=32, num_heads=16)
    with torch.device("meta"):
        counts = Student(cfg).param_counts()
    assert counts["trainable"] == pytest.approx(184e6, rel=0.01)
    assert counts["total"] == pytest.approx(279e6, rel=0.01)
    assert counts["frozen"] == 2 * 49152 * 960  # embedding and head, nothing else


def test_heads_must_divide_hidden():
    with pytest.raises(TcacheError, match="--heads 7"):
        StudentConfig(vocab_size=100, hidden_size=384, num_blocks=2, num_heads=7)
    with pytest.raises(TcacheError, match="--slstm-at"):
        StudentConfig(vocab_size=100, hidden_size=384, num_blocks=2, num_heads=8, slstm_at=[5])


def test_chunkwise_kernel_adapter_matches_parallel():
    """mlstm_kernels' chunkwise kernel behind xlstm's classic cell computes the same function."""
    cfg = StudentConfig(vocab_size=64, hidden_size=32, num_blocks=2, num_heads=4, context_length=128)
    torch.manual_seed(0)
    a = Student(cfg, mlstm_kernel="parallel")
    b = Student(cfg, mlstm_kernel="chunkwise--native_autograd")
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 64, (2, 128))
    la, lb = a(ids)[0], b(ids)[0]
    assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4)
    la.square().mean().backward()
    lb.square().mean().backward()
    ga = torch.cat([p.grad.ravel() for p in a.parameters() if p.grad is not None])
    gb = torch.cat([p.grad.ravel() for p in b.parameters() if p.grad is not None])
    assert torch.allclose(ga, gb, atol=1e-4, rtol=1e-3)


def test_kernel_choice_on_cpu():
    cfg = StudentConfig(vocab_size=64, hidden_size=32, num_blocks=2, num_heads=4, slstm_at=[0])
    assert resolve_kernels(cfg, torch.device("cpu")) == ("parallel", "vanilla")
    for bad in (dict(mlstm_kernel="chunkwise--triton_xl_chunk"), dict(slstm_backend="cuda")):
        c = StudentConfig(vocab_size=64, hidden_size=32, num_blocks=2, num_heads=4, **bad)
        with pytest.raises(TcacheError, match="GPU"):
            resolve_kernels(c, torch.device("cpu"))


def test_precision_checks(monkeypatch):
    assert resolve_precision("auto", torch.device("cpu")) is torch.float32
    with pytest.raises(TcacheError, match="--precision fp16 needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a T4
    with pytest.raises(TcacheError, match="bf16 is not supported by this GPU"):
        resolve_precision("bf16", torch.device("cuda"))
    assert resolve_precision("auto", torch.device("cuda")) is torch.float16


def test_student_hidden_mirrors_the_teacher_convention():
    """G = 1: mean of block outputs, the last one after the final norm; G = blocks: each block."""
    cfg = StudentConfig(vocab_size=64, hidden_size=32, num_blocks=4, num_heads=4, slstm_at=[0, 2],
                        context_length=16)
    torch.manual_seed(0)
    m = Student(cfg)
    ids = torch.randint(0, 64, (1, 16))
    outs, x = [], m.embed(ids)
    for blk in m.blocks.blocks:
        x = blk(x)
        outs.append(x)
    outs[-1] = m.norm(x)
    logits, h1 = m(ids, groups=1)
    _, h4 = m(ids, groups=4)
    assert torch.allclose(h1[:, :, 0], torch.stack(outs).mean(0), atol=1e-5)
    assert torch.allclose(h4, torch.stack(outs, dim=2), atol=1e-5)
    assert torch.allclose(logits, m.head(outs[-1]), atol=1e-5)

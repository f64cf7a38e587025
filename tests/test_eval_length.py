"""A student evaluated at lengths other than its training length: runs, reports its kernel, stays causal."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from tcache.cli.main import main
from conftest import build_cache, text_head
from tcache.student.models.io import load_student
from tcache.student.models.xlstm import PARALLEL_MAX_CONTEXT, Student, StudentConfig, resolve_kernels
from tcache.student.training.config import DistillConfig
from tcache.student.training.train import distill

T = 32  # the students' training length
CPU = torch.device("cpu")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def text(tmp_path_factory, valid_jsonl):
    """The head of three held-out books (~6k tokens): tokenising whole books would cost seconds a run."""
    return text_head(valid_jsonl, tmp_path_factory.mktemp("text") / "valid-head.jsonl", 8000)


@pytest.fixture(scope="module")
def short_cache(tmp_path_factory, tiny_teacher, text):
    out = tmp_path_factory.mktemp("caches") / f"seq{T}"
    build_cache(out, tiny_teacher, text, tokens=8 * T, seq_len=T, top_k=8, batch_size=8)
    return out


@pytest.fixture(scope="module")
def students(tmp_path_factory, short_cache):
    """recipe -> a student directory, distilled on first use for a few steps (so the gates are trained
    ones, not the init's). v1 of the tiny teacher: sLSTM, mLSTM blocks; v2: four mLSTM blocks."""
    made = {}

    def get(recipe: str):
        if recipe not in made:
            out = tmp_path_factory.mktemp(f"student-{recipe}") / "s"
            distill(DistillConfig(cache=str(short_cache), out=str(out), recipe=recipe, steps=3, batch_size=2,
                                  grad_accum=1, lr=3e-3, seed=0, device="cpu"))
            made[recipe] = out
        return made[recipe]

    return get


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("recipe", ["v1", "v2"])
@pytest.mark.parametrize("seq_len", [T // 4, T, 4 * T])
def test_eval_below_at_and_beyond_the_training_length(students, text, recipe, seq_len):
    student_dir = students(recipe)
    r = run("eval", student_dir, "--data", text, "--seq-len", seq_len, "--tokens", 2 * seq_len,
            "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)  # stdout alone is the JSON document
    assert res["seq_len"] == seq_len and res["windows"] == 2 and res["tokens_scored"] == 2 * (seq_len - 1)
    assert math.isfinite(res["perplexity"]) and res["perplexity"] > 1
    assert res["kernels"] == {"mlstm": "parallel", "slstm": "vanilla"}
    assert res["trained_seq_len"] == T


def test_eval_past_the_parallel_limit_takes_the_chunkwise_kernel(students, text):
    """1100 tokens on CPU: the pure-PyTorch chunkwise kernel (1100 = 4 x 275: the adapter pads to whole
    chunks); the table names it. v2 only: the kernel is the mLSTM's (v1's vanilla sLSTM would add 10 s)."""
    n, student_dir = 1100, students("v2")
    r = run("eval", student_dir, "--data", text, "--seq-len", n, "--tokens", n, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert f"kernels: mLSTM chunkwise--native_autograd, sLSTM vanilla (trained at {T} tokens)" in r.output
    assert f"1 x {n}" in r.output


@pytest.mark.parametrize("recipe", ["v1", "v2"])
def test_longer_forward_is_causal(students, recipe):
    """The first T logits of a 4T forward equal a T forward on those T tokens; a student loaded at its
    training length grows its mask for the 4T input and gives the 4T-built student's logits."""
    student_dir = students(recipe)
    torch.manual_seed(0)
    long, _ = load_student(student_dir, CPU, context_length=4 * T)
    short, doc = load_student(student_dir, CPU)
    assert doc["config"]["context_length"] == T and short.mask_length == T
    assert long.kernels["mlstm"] == "parallel" and long.mask_length == 4 * T
    ids = torch.randint(0, long.cfg.vocab_size, (2, 4 * T))  # (B, 4T)
    with torch.no_grad():
        la = long(ids)[0]  # (B, 4T, V)
        lb = short(ids[:, :T])[0]  # (B, T, V)
        assert rel_err(la[:, :T], lb) < 1e-4
        lc = short(ids)[0]  # (B, 4T, V): past the mask it was built with
    assert short.mask_length == 4 * T
    assert rel_err(lc, la) < 1e-4


@pytest.mark.parametrize("recipe", ["v1", "v2"])
@pytest.mark.parametrize("length", [4 * T, 4 * T + 3])
def test_parallel_and_chunkwise_kernels_agree_past_the_training_length(students, recipe, length):
    """Two independent forms of the mLSTM over the same weights: the parallel one, loaded at the training
    length and growing its S x S mask for the longer input, and the chunkwise one (no mask; 4T + 3 pads
    to whole chunks)."""
    a, _ = load_student(students(recipe), CPU)
    assert a.kernels["mlstm"] == "parallel" and a.mask_length == T
    b = Student(a.cfg, mlstm_kernel="chunkwise--native_autograd", slstm_backend="vanilla").eval()
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    ids = torch.randint(0, a.cfg.vocab_size, (2, length))  # (B, S)
    with torch.no_grad():
        assert rel_err(b(ids)[0], a(ids)[0]) < 1e-4
    assert a.mask_length == length


def test_cpu_kernel_rule_by_length():
    """Automatic: parallel up to PARALLEL_MAX_CONTEXT, chunkwise (PyTorch) beyond on CPU; an explicit
    choice stands. Chunkwise students keep no S x S masks."""
    def cfg(n, **kw):
        return StudentConfig(vocab_size=64, hidden_size=32, num_blocks=2, num_heads=4, context_length=n, **kw)

    assert resolve_kernels(cfg(PARALLEL_MAX_CONTEXT), CPU)[0] == "parallel"
    assert resolve_kernels(cfg(PARALLEL_MAX_CONTEXT + 1), CPU)[0] == "chunkwise--native_autograd"
    assert resolve_kernels(cfg(4096, mlstm_kernel="parallel"), CPU)[0] == "parallel"
    m = Student(cfg(4096), mlstm_kernel="chunkwise--native_autograd")
    assert all(c.causal_mask.numel() == 0 for c in m._mlstm_cells())
    assert m.mask_length == 0
    p = Student(cfg(64))
    assert all(c.causal_mask.shape == (64, 64) for c in p._mlstm_cells())


def test_hf_eval_reports_no_student_keys(tiny_teacher, text):
    r = run("eval", tiny_teacher, "--data", text, "--seq-len", 16, "--tokens", 32, "--device", "cpu",
            "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["kind"] == "hf" and "kernels" not in res and "trained_seq_len" not in res

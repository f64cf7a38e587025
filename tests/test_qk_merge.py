"""Step 3 (--qk-merge, student/models/qk_merge.py): the merged projections against the equations of the fold computed
here head by head in float64, the merged student equal to the unmerged one (forward and recurrent decode), the merge
placed between stage I and stage II of a real run, and its refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import assert_resumed_as_uninterrupted, build_cache
from tcache.cli.main import main
from tcache.errors import TcacheError
from tcache.student.models.hybrid import HybridConfig, HybridStudent
from tcache.student.models.io import load_student
from tcache.student.training.config import DistillConfig
from tcache.student.training.train import distill


def qwen_student(heads: str, fdim: int | None = None) -> HybridStudent:
    """A random two-layer Qwen2 (q / k / v biases, 4 query heads over 2 kv heads), converted, with stage-I-like
    feature maps (identity plus noise) and a live output gate."""
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    lm.config._attn_implementation = "sdpa"
    model = HybridStudent(lm, HybridConfig(window=6, sinks=2, mlstm_heads=heads, feature_dim=fdim)).eval()
    model.set_kernel(torch.device("cpu"))
    with torch.no_grad():
        for mx in model.mixers:
            mx.phi_q.add_(torch.randn_like(mx.phi_q) * 0.3)
            mx.phi_k.add_(torch.randn_like(mx.phi_k) * 0.3)
            mx.ogate_w.normal_(0, 0.3)
            mx.q_proj.bias.normal_(0, 0.5)
            mx.k_proj.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("heads, fdim", [("query", None), ("kv", 8)])
def test_merged_projections_are_the_feature_maps_folded_into_the_teachers(heads, fdim):
    """W'_q,h = A_h^T W_q,h and b'_q,h = A_h^T b_q,h per query head; the key maps over the kv head each reads (GQA:
    query head j reads kv head j // 2; --mlstm-heads kv: map j is kv head j): each row block checked in float64."""
    model = qwen_student(heads, fdim)
    d, H, Hkv = 8, 4, 2
    before = [{n: getattr(mx, n).detach().double().clone() for n in ("phi_q", "phi_k")}
              | {f"{p}.{w}": getattr(getattr(mx, p), w).detach().double().clone() for p in ("q_proj", "k_proj")
                 for w in ("weight", "bias")} for mx in model.mixers]
    model.merge_qk()
    assert model.cfg.qk_merged and all(not hasattr(mx, "phi_q") for mx in model.mixers)
    for mx, b in zip(model.mixers, before):
        half = b["phi_q"].shape[-1]
        for h in range(H):
            rows = slice(h * half, (h + 1) * half)
            wq = b["q_proj.weight"][h * d:(h + 1) * d]  # (d, D): head h's rows of W_q
            assert torch.allclose(mx.mq_proj.weight[rows].double(), b["phi_q"][h].T @ wq, atol=1e-6)
            assert torch.allclose(mx.mq_proj.bias[rows].double(), b["phi_q"][h].T @ b["q_proj.bias"][h * d:(h + 1) * d],
                                  atol=1e-6)
        maps = b["phi_k"].shape[0]
        assert maps == (H if heads == "query" else Hkv)
        for j in range(maps):
            kv = j // (H // Hkv) if heads == "query" else j
            rows = slice(j * half, (j + 1) * half)
            wk = b["k_proj.weight"][kv * d:(kv + 1) * d]
            assert torch.allclose(mx.mk_proj.weight[rows].double(), b["phi_k"][j].T @ wk, atol=1e-6)
            bk = b["k_proj.bias"][kv * d:(kv + 1) * d]
            assert torch.allclose(mx.mk_proj.bias[rows].double(), b["phi_k"][j].T @ bk, atol=1e-6)


@pytest.mark.parametrize("heads", ["query", "kv"])
def test_a_merged_student_computes_what_it_computed_before_and_decodes_as_its_forward(heads):
    """The fold changes no output: logits before and after agree to fp32 rounding; the merged student's recurrent
    decode (the static state) gives its own full forward's logits."""
    from tcache.student.inference import prefill
    from tcache.student.inference.decode import StaticDecoder

    model = qwen_student(heads)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = model(ids)
        model.merge_qk()
        full, _ = model(ids)
        torch.testing.assert_close(full, ref, atol=2e-5, rtol=1e-5)
        _, state = prefill.prefill(model, ids[:, :12])
        static = StaticDecoder(model, state, capture=False)
        for t in range(12, 20):
            torch.testing.assert_close(static.step(ids[:, t:t + 1])[:, 0], full[:, t], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tiny_teacher, valid_jsonl):
    out = tmp_path_factory.mktemp("caches") / "qk"
    build_cache(out, tiny_teacher, valid_jsonl, tokens=8 * 64, seq_len=64, top_k=8, batch_size=8)
    return out


def test_the_merge_runs_between_the_stages_and_costs_nothing_at_the_boundary(tmp_path, small_cache):
    """Two runs, with and without --qk-merge, same seed: stage I is the same run, and stage II's first loss (before
    any stage II update) is the same, since the fold is exact; the saved student is a merged one that loads, and
    a resume from a stage II checkpoint continues the merged run."""
    base = dict(cache=str(small_cache), recipe="hybrid", steps=2, stage1_tokens=2 * 2 * 64, batch_size=2,
                grad_accum=1, seed=3, lr=1e-3, ckpt_every=3)
    distill(DistillConfig(out=str(tmp_path / "plain"), **base))
    distill(DistillConfig(out=str(tmp_path / "qk"), qk_merge=True, **base))
    plain, qk = ([json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
                 for n in ("plain", "qk"))
    assert [r["stage"] for r in qk] == ["1", "1", "2", "2"]
    for a, b in zip(plain[:3], qk[:3]):
        for term in ("ce", "kd") if a["stage"] == "2" else ("match",):
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-7), (term, a, b)
    model, doc = load_student(tmp_path / "qk", torch.device("cpu"))
    assert doc["config"]["qk_merged"] is True and model.cfg.qk_merged
    keys = set(model.state_dict())
    assert any(k.endswith("mq_proj.weight") for k in keys) and not any("phi_q" in k for k in keys)
    # a run resumed from its stage II checkpoint (step 3, merged weights) ends as the uninterrupted one
    b = tmp_path / "resumed"
    b.mkdir()
    shutil.copytree(tmp_path / "qk" / "checkpoints" / "step-0000003", b / "checkpoints" / "step-0000003")
    shutil.copy(tmp_path / "qk" / ".tcache-output.json", b)
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qk[:3]))
    distill(DistillConfig(out=str(b), qk_merge=True, resume=True, **base))
    resumed = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert_resumed_as_uninterrupted(qk, resumed, 3, ("ce", "kd", "loss"), tmp_path / "qk", b)


@pytest.mark.parametrize("extra, says", [
    ({"mlstm_rope": True}, "without --mlstm-rope"),
    ({"train": "lora"}, "--train lora"),
    ({"stage": "1"}, "a stage II"),
    ({"recipe": "v2"}, "--recipe hybrid"),
    ({"branches": "window"}, "--branches"),
])
def test_qk_merge_refusals_are_one_line(tmp_path, small_cache, extra, says):
    base = {"cache": str(small_cache), "out": str(tmp_path / "x"), "recipe": "hybrid", "qk_merge": True}
    with pytest.raises(TcacheError, match="^--qk-merge") as e:
        DistillConfig(**{**base, **extra})
    assert says in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(main, ["distill", str(small_cache), "--out", str(tmp_path / "y"), "--recipe", "hybrid",
                                  "--qk-merge", "--mlstm-rope"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert [x for x in r.output.splitlines() if x.strip()] == [x for x in r.output.splitlines() if "--qk-merge" in x]

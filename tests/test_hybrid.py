"""The hybrid recipe (Hauzenberger et al. 2026): conversion is exact, the mixer computes its equations (float64
reference), stage I learns from the cache's teacher weights alone, and a two-stage run resumes exactly."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import decode_oracle
from promises import Case
from tcache.cli.main import main
from tcache.errors import TcacheError
from tcache.student.training.config import DistillConfig
from tcache.student.models.hybrid import HybridConfig, HybridStudent
from tcache.student.models.mixer import HybridMixer
from tcache.student.models.io import load_student
from tcache.student.training.train import distill
from conftest import assert_resumed_as_uninterrupted, build_cache


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hybrid_cache(tmp_path_factory, tiny_teacher, valid_jsonl):
    out = tmp_path_factory.mktemp("caches") / "hybrid"
    build_cache(out, tiny_teacher, valid_jsonl, tokens=16 * 64, seq_len=64, top_k=8, batch_size=8)
    return out


def _converted_equals_teacher(lm, T=48):
    """With the window covering the whole context and the mixing gate forced to the window branch, the
    converted model is the teacher: its logits equal transformers' own forward of the original."""
    torch.manual_seed(1)
    ids = torch.randint(0, lm.config.vocab_size, (2, T))
    with torch.no_grad():
        ref = lm(input_ids=ids).logits  # (B, T, V) before conversion
        student = HybridStudent(lm, HybridConfig(window=T, sinks=0))
        student.set_kernel(torch.device("cpu"))
        for m in student.mixers:
            m.ogate_b.fill_(-1e4)  # sigmoid -> 0: the window branch only
        got = student(ids)[0]
    # fp32 in a different summation order (SDPA there, the blocked window on CPU here: 1.9e-5 measured on logits
    # of up to ~8 after 8 layers); a conversion error is of the logits' own size
    assert torch.allclose(got, ref, atol=5e-5, rtol=1e-5), (got - ref).abs().max()


def test_conversion_is_exact_for_the_shared_llama_teacher(teacher_dir):
    lm = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, attn_implementation="sdpa")
    _converted_equals_teacher(lm)


def test_conversion_is_exact_for_a_qwen2_teacher():
    """Qwen2 family: bias on q, k, v."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    lm = Qwen2ForCausalLM(cfg).eval()
    assert lm.model.layers[0].self_attn.q_proj.bias is not None
    _converted_equals_teacher(lm)


def test_a_teacher_it_cannot_convert_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(TcacheError, match="Llama- and Qwen2-family"):
        HybridStudent(lm, HybridConfig())


def reference_mix(x, q, k, v, mixer: HybridMixer, q_sink=None, qm=None, km=None) -> torch.Tensor:
    """The mixer's equations in float64, written out step by step (a quadratic, unstabilised mLSTM with the
    xLSTM normaliser; each query's scores one by one): the test reference for HybridMixer.mix."""
    x, q, k, v = (t.double() for t in (x, q, k, v))
    B, H, T, d = q.shape
    s = torch.full((B, H, T, T), -math.inf, dtype=torch.float64)
    for i in range(T):
        for j in range(i + 1):
            if i - j < mixer.window:
                s[:, :, i, j] = (q[:, :, i] * k[:, :, j]).sum(-1) * mixer.scaling
            elif j < mixer.sinks:  # a sink outside the window: the query at its cache position, if given
                qi = q[:, :, i] if q_sink is None else q_sink[:, :, i].double()
                s[:, :, i, j] = (qi * k[:, :, j]).sum(-1) * mixer.scaling
    swa = torch.softmax(s, -1) @ v  # (B, H, T, d)

    def phi(t, w):
        z = torch.einsum("bhtd,hde->bhte", t, w.double())
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)

    qm = q if qm is None else qm.double()
    km = k if km is None else km.double()
    r = H // mixer.phi_k.shape[0]  # --mlstm-heads kv: the key map and the gates per kv head, shared by its group
    wi, bi, wf, bf = (t.double().repeat_interleave(r, 0) for t in (mixer.igate.weight, mixer.igate.bias,
                                                                    mixer.fgate.weight, mixer.fgate.bias))
    qf, kf = phi(qm, mixer.phi_q), phi(km, mixer.phi_k.repeat_interleave(r, 0))  # (B, H, T, F)
    i_pre = (x @ wi.T + bi).transpose(1, 2)  # (B, H, T)
    logf = F.logsigmoid((x @ wf.T + bf).transpose(1, 2))
    cum = torch.cumsum(logf, -1)  # (B, H, T)
    # D[i, j] = exp(sum_{j < t <= i} log f_t + i_j) for j <= i
    logD = cum[..., :, None] - cum[..., None, :] + i_pre[..., None, :]  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    Dm = torch.exp(logD.masked_fill(~causal, -math.inf))
    C = (qf @ kf.transpose(-1, -2)) / math.sqrt(qf.shape[-1]) * Dm  # (B, H, T, T)
    n = C.sum(-1, keepdim=True).abs().clamp(min=1.0)  # the normaliser max(|n^T q|, 1) (unstabilised form)
    m = (C @ v) / n  # (B, H, T, d)
    o = torch.sigmoid(torch.einsum("bhtc,hc->bht", torch.cat([qm, km, v], -1), mixer.ogate_w.double())
                      + mixer.ogate_b.double()[None, :, None]).unsqueeze(-1)
    return o * m + (1 - o) * swa


@pytest.mark.parametrize("T,window,sinks,fdim,heads", [(40, 8, 4, None, "query"), (64, 16, 0, None, "query"),
                                                       (33, 64, 2, None, "query"), (50, 4, 3, None, "query"),
                                                       (40, 8, 4, 16, "query"), (50, 4, 3, 48, "query"),
                                                       (40, 8, 4, None, "kv"), (50, 4, 3, 16, "kv")])
def test_mixer_matches_a_float64_reference(T, window, sinks, fdim, heads):
    """HybridMixer.mix (mlstm_kernels' chunkwise kernel, SDPA with the window mask) against the equations
    written out in float64: quadratic mLSTM with its normaliser, masked softmax, per-head output gate; at the
    default Hedgehog feature dim (2d = 32) and at --feature-dim 16 and 48 (a smaller / larger mLSTM state), with the
    mLSTM over the query heads and over the kv heads (--mlstm-heads kv: its keys the kv head's, as the layer gives)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    student = HybridStudent(LlamaForCausalLM(cfg), HybridConfig(window=window, sinks=sinks, feature_dim=fdim,
                                                                mlstm_heads=heads))
    assert student.mixers[0].phi_q.shape == (3, 16, (fdim or 32) // 2)
    assert student.mixers[0].phi_k.shape[0] == (1 if heads == "kv" else 3)
    student.set_kernel(torch.device("cpu"))
    m = student.mixers[0]
    with torch.no_grad():
        for p in m.new_parameters():  # away from the init, so every term matters
            p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(2, T, 48)
        q, k, v, q_sink, qm, km = (torch.randn(2, 3, T, 16) for _ in range(6))
        if heads == "kv":  # one kv head: the layer hands the mLSTM that head's keys repeated to its 3 query heads
            km = km[:, :1].expand(-1, 3, -1, -1)
        q_sink = q_sink if T > window + sinks - 1 and sinks else None  # sinks at StreamingLLM's cache positions
        got = m.mix(x, q, k, v, q_sink, qm, km)
    ref = reference_mix(x, q, k, v, m, q_sink, qm, km)
    assert ((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5



@pytest.mark.parametrize("mix", ["gate", "joint"])
def test_kv_head_mixer_under_gqa_matches_the_float64_references(mix):
    """--mlstm-heads kv with 2 kv heads for 4 query heads. The tests above have one kv head, where every head of km
    is that head's keys, so a key map reading the wrong head of a group (or gates repeated in the wrong order) went
    unseen; here each group's keys, features and gates must be its own, for the gate and the joint mix."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    student = HybridStudent(LlamaForCausalLM(cfg), HybridConfig(window=6, sinks=2, mlstm_heads="kv", mix=mix))
    student.set_kernel(torch.device("cpu"))
    m = student.mixers[0]
    assert (m.Hm, m.phi_k.shape[0], m.igate.out_features, m.fgate.out_features) == (2, 2, 2, 2)
    T = 24
    with torch.no_grad():
        for p in m.new_parameters():  # away from the init: every group's map and gates its own
            p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(2, T, 64)
        q, k, v, q_sink, qm = (torch.randn(2, 4, T, 16) for _ in range(5))
        # as the layer hands them over (mlstm_qk): kv head g's keys for query heads 2g and 2g + 1
        km = torch.randn(2, 2, T, 16).repeat_interleave(2, 1)  # (B, H, T, d)
        got = m.mix(x, q, k, v, q_sink, qm, km)
    ref = (reference_mix if mix == "gate" else reference_joint)(x, q, k, v, m, q_sink, qm, km)
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err


BF16_TOLERANCE = 3e-2
"""Largest |error| over max |reference| of the mixer under bf16 autocast. bf16's 8-bit mantissa rounds each value by up
to 2^-8 = 0.4% relative; the gate pre-activations come from bf16 Linear layers, so an input-gate bias of ~6 moves by
up to ~0.023, a factor of up to exp(0.023) = 1.024 on a token's weight in the mLSTM sum. The kernel accumulates in
fp32. Measured on CPU: 1.6e-2."""


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_mixer_under_bf16_autocast_stays_within_bf16_tolerance_of_float64(device):
    """The training path on a GPU: bf16 autocast, q, k, v into the mLSTM kernel in bf16 (student/models/hybrid.py's mix;
    on CUDA mlstm_kernels' Triton kernel, on CPU its native one), against the float64 equations (BF16_TOLERANCE);
    the fp32-input path (TCACHE_MLSTM_INPUTS=fp32) is measured beside it."""
    import os

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    student = HybridStudent(LlamaForCausalLM(cfg), HybridConfig(window=32, sinks=4)).to(device)
    student.set_kernel(torch.device(device))
    m = student.mixers[0]
    T = 256
    with torch.no_grad():
        for p in m.new_parameters():
            p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(2, T, 128, device=device)
        q, k, v, q_sink = (torch.randn(2, 2, T, 64, device=device).bfloat16() for _ in range(4))
        ref = reference_mix(x.cpu(), q.cpu(), k.cpu(), v.cpu(), m.cpu(), q_sink.cpu())
        m.to(device)
        errors = {}
        for inputs in ("bf16", "fp32"):
            os.environ["TCACHE_MLSTM_INPUTS"] = inputs
            try:
                with torch.autocast(device, dtype=torch.bfloat16):
                    got = m.mix(x.bfloat16(), q, k, v, q_sink)
            finally:
                del os.environ["TCACHE_MLSTM_INPUTS"]
            errors[inputs] = float((got.double().cpu() - ref).abs().max() / ref.abs().max())
    print(f"mixer on {device} under bf16 autocast, max error / max |ref|: {errors}")
    assert errors["bf16"] < BF16_TOLERANCE and errors["fp32"] < BF16_TOLERANCE, errors


def test_stage_one_matching_falls_on_the_shared_teacher(tmp_path, shared_cache):
    """Stage I alone (teacher-forced attention-output matching, new parameters only) lowers the loss, and
    touches no teacher weight."""
    cfg = DistillConfig(cache=str(shared_cache), out=str(tmp_path / "s1"), recipe="hybrid", stage="1", steps=8,
                        batch_size=4, grad_accum=1, seed=0)
    distill(cfg)
    m = metrics(tmp_path / "s1")
    assert [r["stage"] for r in m] == ["1"] * 8
    assert m[-1]["match"] < 0.6 * m[0]["match"], [r["match"] for r in m]
    student = load_student(tmp_path / "s1", torch.device("cpu"))[0]
    teacher = AutoModelForCausalLM.from_pretrained(shared_cache / "teacher", dtype=torch.float32)
    mixer, attn = student.mixers[0], teacher.model.layers[0].self_attn
    assert torch.equal(mixer.q_proj.weight, attn.q_proj.weight)
    assert torch.equal(student.lm.model.layers[3].mlp.down_proj.weight, teacher.model.layers[3].mlp.down_proj.weight)


def test_two_stage_run_resumes_exactly_across_the_stage_boundary(tmp_path, hybrid_cache):
    """Stage I (2 steps) then stage II (4 steps); a run interrupted at the boundary's checkpoint continues
    with the same losses and ends with the same weights."""
    base = dict(cache=str(hybrid_cache), recipe="hybrid", steps=4, stage1_tokens=2 * 2 * 64, batch_size=2,
                grad_accum=1, ckpt_every=2, seed=5, lr=1e-3)
    distill(DistillConfig(out=str(tmp_path / "a"), **base))
    full = metrics(tmp_path / "a")
    assert [r["stage"] for r in full] == ["1", "1", "2", "2", "2", "2"]
    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-0000002", b / "checkpoints" / "step-0000002")
    shutil.copy(tmp_path / "a" / ".tcache-output.json", b)  # tcache's marker: b is the run's own directory
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:2]))
    distill(DistillConfig(out=str(b), resume=True, **base))
    resumed = metrics(b)
    assert len(full) == 6
    assert_resumed_as_uninterrupted(full, resumed, 2, ("ce", "kd", "loss", "lr"), tmp_path / "a", b)


def test_cli_hybrid_then_eval_at_four_times_the_length(tmp_path, hybrid_cache, valid_jsonl):
    out = tmp_path / "h"
    args = ["distill", hybrid_cache, "--out", out, "--recipe", "hybrid", "--steps", 2, "--stage1-tokens", 256,
            "--batch-size", 2, "--grad-accum", 1, "--window", 16, "--sinks", 2]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "window 16 + 2 sinks + mLSTM" in r.output and "stages: 1 (match" in r.output
    # the first step's figures as soon as it ends (no waiting for the next one), the last step's at the end
    assert "step 1/4 stage 1 match" in r.output and "step 4/4 ce" in r.output, r.output
    assert (out / "config.json").is_file()  # the teacher's architecture, to rebuild the student
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by those it is shared with
    r = run(*args, "--overwrite")  # a hybrid run (with its config.json) is tcache's to replace
    assert r.exit_code == 0, r.output
    hf_dir = tmp_path / "hf-model"  # ...but a HF model directory, all of whose names a run also uses, is not
    hf_dir.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(out / f, hf_dir / f)
    user = Case(tmp_path, {})
    user.own_all(hf_dir)
    r = run(*args[:3], hf_dir, *args[4:], "--overwrite")
    assert r.exit_code == 1 and "holds files tcache did not write" in r.output, r.output
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    user.check_owned()
    r = run("eval", out, "--data", valid_jsonl, "--tokens", 2 * 256, "--seq-len", 256, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["trained_seq_len"] == 64 and res["seq_len"] == 256 and res["perplexity"] > 1
    # a student whose weights went missing or were cut short is one line naming the file, no traceback
    from test_cli_build import assert_clean_error

    for damage, says in (("truncate", "is unreadable or truncated"), ("delete", "is missing"),
                         ("config", "config.json")):
        broken = tmp_path / f"broken-{damage}"
        shutil.copytree(out, broken)
        if damage == "truncate":
            (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:100_000])
        else:
            (broken / ("model.safetensors" if damage == "delete" else "config.json")).unlink()
        r = run("eval", broken, "--data", valid_jsonl, "--tokens", 256, "--seq-len", 64)
        assert_clean_error(r, str(broken), says)


def test_a_cache_without_the_full_teacher_is_refused_in_one_line(tmp_path, hybrid_cache):
    """Caches built before the full weights were stored serve the xLSTM recipes, not the hybrid one."""
    old = tmp_path / "old"
    shutil.copytree(hybrid_cache, old)
    (old / "teacher" / "model.safetensors").unlink()
    m = json.loads((old / "manifest.json").read_text())
    del m["teacher_files"]["teacher/model.safetensors"]  # such a cache never listed them (a listed one missing is
    (old / "manifest.json").write_text(json.dumps(m))  # refused on open: tests/test_verify.py)
    r = run("distill", old, "--out", tmp_path / "h", "--recipe", "hybrid", "--steps", 1)
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [x for x in r.output.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and "no loadable teacher weights" in errors[0] and "rebuild" in errors[0], r.output


def _normaliser_floor_share(student: HybridStudent, ids: torch.Tensor) -> list[float]:
    """Per converted layer, the share of (head, position) pairs where the mLSTM normaliser's floor holds:
    |n . q| < 1 in the unstabilised form, recomputed in float64 from the features and gates the kernel gets."""
    shares = []

    def probe(fn):
        def wrapped(q, k, v, i, f, **kw):  # (B, H, T, F) x2, (B, H, T, d), (B, H, T, 1) x2
            q, k, i, f = (t.double() for t in (q, k, i, f))
            cum = torch.nn.functional.logsigmoid(f[..., 0]).cumsum(-1)  # (B, H, T)
            logD = cum[..., :, None] - cum[..., None, :] + i[..., 0][..., None, :]  # (B, H, T, T)
            causal = torch.ones(logD.shape[-1], logD.shape[-1], dtype=torch.bool).tril()
            C = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 * torch.exp(logD.masked_fill(~causal, -float("inf")))
            shares.append((C.sum(-1).abs() < 1).double().mean().item())
            return fn(q.float(), k.float(), v, i.float(), f.float(), **kw)
        return wrapped

    for m in student.mixers:
        m.mlstm_fn = probe(m.mlstm_fn)
    with torch.no_grad():
        student(ids)
    return shares


def test_input_gate_init_keeps_the_normaliser_floor_inactive(teacher_dir, valid_jsonl):
    """Hedgehog features give phi(q) . phi(k) ~ 2/d, so with xLSTM's input-gate bias ~0 the normaliser floor
    max(|n . q|, 1) holds almost everywhere (an unnormalised, nearly silent mLSTM); the default init
    ln(d sqrt(2d) / 2) lifts one token's share to ~1."""
    from transformers import AutoTokenizer

    texts = [json.loads(x)["text"] for x in open(valid_jsonl).read().splitlines()[:20]]
    ids = AutoTokenizer.from_pretrained(teacher_dir)("\n\n".join(texts), return_tensors="pt").input_ids
    ids = ids[:, :2 * 256].view(2, 256)
    shares = {}
    for bias in (None, 0.0):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, attn_implementation="sdpa")
        student = HybridStudent(lm, HybridConfig(igate_bias=bias))
        student.set_kernel(torch.device("cpu"))
        shares[bias] = _normaliser_floor_share(student, ids)
    assert max(shares[None]) < 0.05, shares[None]
    assert min(shares[0.0]) > 0.5, shares[0.0]  # xLSTM's init: the floor holds at most positions



@pytest.mark.parametrize("fdim, bias", [(None, None), (16, None), (64, None), (64, 1.5)])
def test_input_gate_bias_at_init_follows_the_feature_dim_formula(fdim, bias):
    """The input-gate bias starts at N(mean, 0.1) per mLSTM head with the mean init_igate_bias's docstring derives
    (student/models/mixer.py): one token's share ~1 needs exp(b) * 4/F * F^-1/2 ~ 1 with F Hedgehog features, so
    b = ln(F sqrt(F) / 4); the default F = 2d gives ln(d sqrt(2d) / 2); --igate-bias sets the mean itself. Head dim
    16: F = 16, 32 (default), 64 give 2.77, 3.81, 4.85, so a --feature-dim init that used the default's formula is
    ten standard deviations away."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16)
    student = HybridStudent(LlamaForCausalLM(cfg), HybridConfig(window=8, sinks=2, feature_dim=fdim, igate_bias=bias))
    d = 16
    want = bias if bias is not None else (math.log(d * math.sqrt(2 * d) / 2) if fdim is None
                                          else math.log(fdim * math.sqrt(fdim) / 4))
    got = torch.cat([m.igate.bias.detach() for m in student.mixers]).double()  # (2 layers x 8 heads,)
    assert got.numel() == 16 and torch.all(student.mixers[0].igate.weight == 0)
    assert (got - want).abs().max() < 0.4, (got, want)  # 4 standard deviations
    assert abs(got.mean().item() - want) < 0.1, (got.mean(), want)  # 4 standard deviations of a 16-sample mean

@pytest.mark.parametrize("mode", ["match", "hybrid"])
def test_gradient_checkpointing_leaves_the_gradients_unchanged(mode):
    """--checkpointing recomputes each decoder layer in the backward (transformers' gradient checkpointing):
    the same loss and gradients as keeping the activations, in stage I's matching and stage II's forward."""
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        student = HybridStudent(LlamaForCausalLM(cfg), HybridConfig(window=8, sinks=2))
        student.set_kernel(torch.device("cpu"))
        student.set_stage("new" if mode == "match" else "all", mode)
        if checkpointing:
            student.enable_checkpointing()
        student.train()
        logits = student(ids)[0]
        loss = student.match_loss() if mode == "match" else torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def test_stage_one_has_no_weight_decay_and_setup_trains_with_checkpointing_on_request(hybrid_cache, tmp_path):
    """Stage I trains identity-initialised feature maps at lr 1e-2: decay would pull them towards zero
    (LoLCATs' attention transfer uses none); stage II keeps the recipe's 0.1."""
    from tcache.student.training.train import setup

    tr = setup(DistillConfig(cache=str(hybrid_cache), out=str(tmp_path / "r"), recipe="hybrid", steps=2,
                             batch_size=2, grad_accum=1))
    assert [g["weight_decay"] for g in tr.opt.param_groups] == [0.0, 0.0]
    assert tr.model.training  # transformers' layers checkpoint only in training mode
    tr.begin_stage(tr.plan.stages[1])
    assert [g["weight_decay"] for g in tr.opt.param_groups] == [0.1, 0.0]
    assert not tr.model.lm.model.layers[0].gradient_checkpointing  # auto: off on CPU
    tr = setup(DistillConfig(cache=str(hybrid_cache), out=str(tmp_path / "r"), recipe="hybrid", steps=2,
                             batch_size=2, grad_accum=1, checkpointing="on"))
    assert tr.model.training and tr.model.lm.model.layers[0].gradient_checkpointing


def test_feature_dim_is_validated_in_one_line_naming_the_flag(tmp_path, shared_cache):
    """--feature-dim: a multiple of 16 for the hybrid recipe only; a bad value is one line naming the flag."""
    from tcache.student.training.config import DistillConfig

    base = dict(cache=str(shared_cache), out=str(tmp_path / "x"), recipe="hybrid")
    with pytest.raises(TcacheError, match=r"^--feature-dim must be a positive multiple of 16 .* got 24; "):
        DistillConfig(**base, feature_dim=24)
    with pytest.raises(TcacheError, match="^--feature-dim sets the hybrid recipe's .* the v2 recipe has none"):
        DistillConfig(**{**base, "recipe": "v2"}, feature_dim=32)
    assert DistillConfig(**base, feature_dim=32).feature_dim == 32
    r = CliRunner().invoke(main, ["distill", str(shared_cache), "--out", str(tmp_path / "y"), "--recipe", "hybrid",
                                  "--feature-dim", "20"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    errors = [x for x in r.output.splitlines() if "Error" in x]
    assert len(errors) == 1 and "--feature-dim" in errors[0], r.output


@pytest.mark.parametrize("fdim, heads", [(16, "query"), (None, "kv"), (16, "kv")])
def test_a_smaller_mlstm_state_decodes_as_its_full_forward(fdim, heads):
    """A hybrid at --feature-dim 16 (head dim 8: half the default state) and / or --mlstm-heads kv (2 states for 4
    query heads): its recurrent decode steps (decode.py and the static state) give its full forward's logits, and
    the kept mLSTM state is (Hm, F, d)."""
    from tcache.student.inference import prefill
    from tcache.student.inference.decode import StaticDecoder

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    lm.config._attn_implementation = "sdpa"
    model = HybridStudent(lm, HybridConfig(window=6, sinks=2, feature_dim=fdim, mlstm_heads=heads)).eval()
    model.set_kernel(torch.device("cpu"))
    with torch.no_grad():
        for mx in model.mixers:
            mx.ogate_w.normal_(0, 0.3), mx.phi_q.add_(torch.randn_like(mx.phi_q) * 0.1)
        ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
        full, _ = model(ids)  # (2, 20, V): the parallel forward (chunkwise mLSTM, blocked window)
        _, state = prefill.prefill(model, ids[:, :12])
        _, ref = prefill.prefill(model, ids[:, :12])
        assert state.layers[0].mlstm[0].shape[1:] == (2 if heads == "kv" else 4, fdim or 16, 8)
        static = StaticDecoder(model, state, capture=False)
        for t in range(12, 20):
            got = static.step(ids[:, t:t + 1])  # (2, 1, V): the logits after token t
            torch.testing.assert_close(got[:, 0], full[:, t], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(decode_oracle.step(model, ids[:, t:t + 1], ref)[:, 0], full[:, t], atol=1e-4,
                                       rtol=1e-4)


def reference_joint(x, q, k, v, mixer: HybridMixer, q_sink, qm, km) -> torch.Tensor:
    """--mix joint written out in float64, weight by weight (LoLCATs' hybrid attention with the mLSTM's decay as
    products of forget gates): y_t = sum_j w_tj v_j / sum_j w_tj."""
    x, q, k, v, qm, km = (t.double() for t in (x, q, k, v, qm, km))
    qs = q if q_sink is None else q_sink.double()
    B, H, T, d = q.shape
    r = H // mixer.phi_k.shape[0]

    def phi(t, w):
        z = torch.einsum("bhtd,hde->bhte", t, w.double())
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)

    qf, kf = phi(qm, mixer.phi_q), phi(km[:, ::r], mixer.phi_k).repeat_interleave(r, 1)  # (B, H, T, F)
    wi, bi, wf, bf = (t.double().repeat_interleave(r, 0) for t in (mixer.igate.weight, mixer.igate.bias,
                                                                    mixer.fgate.weight, mixer.fgate.bias))
    ig = (x @ wi.T + bi).transpose(1, 2)  # (B, H, T)
    fg = torch.sigmoid((x @ wf.T + bf).transpose(1, 2))  # (B, H, T)
    share = torch.sigmoid(mixer.ogate_b.double())[None, :]  # (1, H)
    out = torch.zeros(B, H, T, d, dtype=torch.float64)
    for t in range(T):
        num, den = torch.zeros(B, H, d, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)
        for j in range(t + 1):
            if t - j < mixer.window:
                w = share * torch.exp((q[:, :, t] * k[:, :, j]).sum(-1) * mixer.scaling)
            elif j < mixer.sinks:
                w = share * torch.exp((qs[:, :, t] * k[:, :, j]).sum(-1) * mixer.scaling)
            else:
                decay = torch.exp(ig[:, :, j]) * torch.prod(fg[:, :, j + 1:t + 1], -1)
                w = (1 - share) * (qf[:, :, t] * kf[:, :, j]).sum(-1) / math.sqrt(qf.shape[-1]) * decay
            num, den = num + w[..., None] * v[:, :, j], den + w
        out[:, :, t] = num / den[..., None]
    return out


@pytest.mark.parametrize("T,window,sinks,heads", [(40, 8, 4, "query"), (33, 6, 0, "query"), (20, 32, 2, "query"),
                                                  (70, 8, 3, "kv")])
def test_joint_mix_matches_a_float64_reference(T, window, sinks, heads):
    """--mix joint (student/models/joint.py, blocked over queries) against its equations written out weight by weight in
    float64, below and beyond the window, with and without sinks, over query and kv mLSTM heads; and it is a
    different function from the gate mix."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    student = HybridStudent(LlamaForCausalLM(cfg), HybridConfig(window=window, sinks=sinks, mix="joint",
                                                                mlstm_heads=heads))
    student.set_kernel(torch.device("cpu"))
    m = student.mixers[0]
    with torch.no_grad():
        for p in m.new_parameters():
            p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(2, T, 48)
        q, k, v, q_sink, qm, km = (torch.randn(2, 3, T, 16) for _ in range(6))
        km = km[:, :1].expand(-1, 3, -1, -1) if heads == "kv" else km
        q_sink = q_sink if T > window + sinks - 1 and sinks else None
        got = m.mix(x, q, k, v, q_sink, qm, km)
        m.mix_form = "gate"
        gate = m.mix(x, q, k, v, q_sink, qm, km)
    ref = reference_joint(x, q, k, v, m, q_sink, qm, km)
    assert ((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    if T > window:  # beyond the window the two forms differ
        assert ((gate.double() - ref).abs().max() / ref.abs().max()) > 1e-2


def test_joint_mix_trains_exports_and_generates_from_its_recurrent_state(tmp_path, hybrid_cache):
    """tcache distill --recipe hybrid --mix joint runs both stages and exports; the exported model generates from its
    recurrent state (tests/test_joint_decode.py holds the step to the full forward): its greedy tokens are the argmax
    of the saved student's own full forward, token by token."""
    from transformers import AutoModelForCausalLM

    from tcache.student.models.io import load_student

    out, hf_dir = tmp_path / "joint", tmp_path / "hf"
    r = run("distill", hybrid_cache, "--out", out, "--recipe", "hybrid", "--mix", "joint", "--steps", 2,
            "--stage1-tokens", 256, "--batch-size", 2, "--grad-accum", 1, "--window", 8, "--sinks", 2,
            "--export", hf_dir)
    assert r.exit_code == 0, r.output
    student, _ = load_student(out, torch.device("cpu"))
    assert student.cfg.mix == "joint" and student.recurrent
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=4, do_sample=False)[0, 12:]
        ids = prompt
        for _ in range(4):
            ids = torch.cat([ids, student(ids)[0][:, -1:].argmax(-1)], 1)
    assert got.tolist() == ids[0, 12:].tolist()


@pytest.mark.parametrize("T", [1, 5])
def test_the_fused_qkv_projection_equals_the_three_projections(T):
    """HybridMixer.qkv's one GEMM over the concatenated q / k / v weights (T > 1; T = 1 runs the three) equals the
    teacher's three projections in float64, biases included (Qwen2 has them)."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    student = HybridStudent(Qwen2ForCausalLM(cfg).double(), HybridConfig(window=4, sinks=1))
    m = student.mixers[0]
    x = torch.randn(2, T, 32, dtype=torch.float64)
    q, k, v = m.qkv(x)
    for got, proj, heads in ((q, m.q_proj, 4), (k, m.k_proj, 2), (v, m.v_proj, 2)):
        want = proj(x).view(2, T, heads, 8).transpose(1, 2)  # (B, heads, T, d)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)

"""Stage I's attention-weight objective (--match-loss weights, Hedgehog's): the chunked loss and its hand-written
gradient equal a float64 reference written out query by query, the default objective is still the output MSE,
a short stage-I run on the shared teacher lowers the new loss, and a bad value is one line naming the flag."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from tcache.cli.main import main
from tcache.errors import TcacheError
from tcache.student.training.config import DistillConfig
from tcache.student.training.data import CacheRows
from tcache.student.models.hybrid import HybridConfig, HybridStudent, load_hybrid
from tcache.student.models.mixer import hedgehog
from tcache.student.models.match_loss import attention_weights_ce
from tcache.student.models.io import load_student
from tcache.student.training.train import distill
from tcache.teachercache import schema


def phi64(x, w):
    """Hedgehog's feature map in float64 (hedgehog() computes in fp32): (B, H, T, d) -> (B, H, T, 2d)."""
    z = torch.einsum("bhtd,hde->bhte", x.double(), w.double())
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)


def reference_weights_ce(q, k, qm, km, phi_q, phi_k, scaling) -> torch.Tensor:
    """The objective in float64, one (query, key) pair at a time: the teacher's causal softmax weights A_ij,
    Hedgehog's features phi = [softmax(x W), softmax(-x W)] and their normalised scores Â_ij, and the mean over
    (b, h, i) of -sum_{j <= i} A_ij log Â_ij."""
    q, k, qm, km = (t.double() for t in (q, k, qm, km))
    B, H, T, _ = q.shape
    fq, fk = phi64(qm, phi_q), phi64(km, phi_k)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                logits = torch.stack([(q[b, h, i] * k[b, h, j]).sum() * scaling for j in range(i + 1)])
                A = torch.exp(logits - torch.logsumexp(logits, 0))  # (i + 1,)
                s = torch.stack([(fq[b, h, i] * fk[b, h, j]).sum() for j in range(i + 1)])
                for j in range(i + 1):
                    total = total - A[j] * torch.log(s[j] / s.sum())
    return total / (B * H * T)


def tiny_mixer(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=12)
    student = HybridStudent(LlamaForCausalLM(cfg), HybridConfig(window=4, sinks=1, **kw))
    student.set_kernel(torch.device("cpu"))
    with torch.no_grad():  # away from the identity init, so the maps' every entry matters
        for m in student.mixers:
            m.phi_q.add_(0.3 * torch.randn_like(m.phi_q)), m.phi_k.add_(0.3 * torch.randn_like(m.phi_k))
    return student


def inputs(B=2, H=2, T=9, d=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g) for _ in range(4)]  # q, k, qm, km (B, H, T, d) x4


@pytest.mark.parametrize("chunk", [1, 4, 128])
def test_the_loss_equals_a_float64_reference_in_any_chunking(chunk):
    m = tiny_mixer().mixers[0]
    q, k, qm, km = inputs()
    want = reference_weights_ce(q, k, qm, km, m.phi_q.detach(), m.phi_k.detach(), m.scaling)
    with torch.no_grad():
        got = attention_weights_ce(hedgehog(qm, m.phi_q), hedgehog(km, m.phi_k), q, k, m.scaling, chunk=chunk)
    assert got.dtype == torch.float32
    assert abs(got.double() - want) / want < 1e-5, (float(got), float(want))
    got64 = attention_weights_ce(phi64(qm, m.phi_q.detach()), phi64(km, m.phi_k.detach()), q.double(), k.double(),
                                 m.scaling, chunk=chunk)
    assert got64.dtype == torch.float64 and abs(got64 - want) < 1e-12 * want


def test_the_gradient_wrt_the_feature_maps_matches_gradcheck_and_the_reference():
    """The hand-written backward (chunked) against finite differences and against autograd through the float64
    reference's loops: finite, nonzero, equal; in fp32 through the library's hedgehog() too, to fp32's precision."""
    m = tiny_mixer().mixers[0]
    q, k, qm, km = (t.double() for t in inputs(B=1, T=7))
    wq, wk = (w.detach().double().requires_grad_(True) for w in (m.phi_q, m.phi_k))

    def loss(wq, wk):
        return attention_weights_ce(phi64(qm, wq), phi64(km, wk), q, k, m.scaling, chunk=3)

    assert torch.autograd.gradcheck(loss, (wq, wk), eps=1e-6, atol=1e-8, rtol=1e-6)
    got = torch.autograd.grad(loss(wq, wk), (wq, wk))
    want = torch.autograd.grad(reference_weights_ce(q, k, qm, km, wq, wk, m.scaling), (wq, wk))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() and g.abs().max() > 1e-6
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-9)
    ce = attention_weights_ce(hedgehog(qm.float(), m.phi_q), hedgehog(km.float(), m.phi_k), q.float(), k.float(),
                              m.scaling, chunk=3)
    for g, w in zip(torch.autograd.grad(ce, (m.phi_q, m.phi_k)), want):
        assert (g.double() - w).abs().max() < 1e-5 * w.abs().max()


def match_forward(student, ids, kind=None):
    student.set_stage("new", "match")
    if kind is not None:
        student.set_match_loss(kind)
    student(ids)
    return student.match_loss()


def test_default_is_the_output_mse_and_weights_uses_the_mlstm_q_k():
    """Unset (and "output"): the loss is the sum over layers of the MSE between the hybrid output and the teacher's
    attention, recomputed here from the mixer's own pieces; "weights" is the CE on the q, k the mLSTM gets
    (unrotated by default, rotated with mlstm_rope); "both" is their sum."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    for rope in (False, True):
        student = tiny_mixer(mlstm_rope=rope)
        m = student.mixers[0]
        seen = {}
        m.register_forward_pre_hook(lambda mod, args, kw: seen.update(x=kw["hidden_states"],
                                                                      pe=kw["position_embeddings"]),
                                    with_kwargs=True)
        default = match_forward(student, ids)
        with torch.no_grad():
            q, k, v = m.qkv(seen["x"])  # (B, H, T, d), (B, Hkv, T, d) x2
            qr, kr = apply_rotary_pos_emb(q, k, *seen["pe"])
            qr, kr, vr = qr, kr.repeat_interleave(2, 1), v.repeat_interleave(2, 1)  # (B, H, T, d) x3
            qm, km = (qr, kr) if rope else (q, k.repeat_interleave(2, 1))
            cos, sin = seen["pe"]
            h = m.mix(seen["x"], qr, kr, vr, m.sink_queries(q, k, cos, sin, apply_rotary_pos_emb), qm, km)
            full = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=m.scaling)
            mse = F.mse_loss(h, full)
            ce = attention_weights_ce(hedgehog(qm, m.phi_q), hedgehog(km, m.phi_k), qr, kr, m.scaling)
        assert torch.equal(default, mse) and m.last_weights_ce is None
        assert torch.equal(match_forward(student, ids, "output"), mse)
        assert torch.allclose(match_forward(student, ids, "weights"), ce, rtol=1e-6)
        assert torch.allclose(match_forward(student, ids, "both"), mse + ce, rtol=1e-6)
    with pytest.raises(ValueError, match="match loss must be one of"):
        student.set_match_loss("attention")


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stage_one_on_the_attention_weights_lowers_them_on_the_shared_teacher(tmp_path, shared_cache):
    """A short stage-I run through distill() with --match-loss weights: the logged matching loss is the weights'
    cross-entropy (summed over 8 layers, above their attention entropy: not an output MSE of ~1e-2 per layer) and
    falls, and on fixed rows the trained feature maps give a lower one than the identity maps of the conversion."""
    cfg = DistillConfig(cache=str(shared_cache), out=str(tmp_path / "w"), recipe="hybrid", stage="1", steps=4,
                        batch_size=2, grad_accum=1, seed=0, stage1_lr=3e-2, match_loss="weights")
    distill(cfg)
    logged = [r["match"] for r in metrics(tmp_path / "w")]
    assert len(logged) == 4 and all(math.isfinite(x) for x in logged) and logged[0] > 8.0, logged
    assert logged[-1] < logged[0], logged
    ids = torch.stack([CacheRows(str(shared_cache), with_targets=False)[i][schema.INPUT_IDS] for i in range(2)])
    fixed = {}
    for name, student in (("init", load_hybrid(str(shared_cache / schema.TEACHER_DIR), HybridConfig())),
                          ("trained", load_student(tmp_path / "w", torch.device("cpu"))[0])):
        student.set_kernel(torch.device("cpu"))
        with torch.no_grad():
            fixed[name] = float(match_forward(student, ids, "weights"))
    assert fixed["trained"] < 0.95 * fixed["init"], (fixed, logged)


def test_a_bad_match_loss_is_one_line_naming_the_flag(tmp_path, shared_cache):
    base = dict(cache=str(shared_cache), out=str(tmp_path / "x"), recipe="hybrid")
    with pytest.raises(TcacheError, match=r"^--match-loss 'attention' is unknown; use one of output, weights, both$"):
        DistillConfig(**base, match_loss="attention")
    with pytest.raises(TcacheError, match="^--match-loss weights .* the v1 recipe has no stage I"):
        DistillConfig(**{**base, "recipe": "v1"}, match_loss="weights")
    with pytest.raises(TcacheError, match="^--match-loss both .*--branches window"):
        DistillConfig(**base, match_loss="both", branches="window")
    assert DistillConfig(**base).match_loss == "output"
    r = CliRunner().invoke(main, ["distill", str(shared_cache), "--out", str(tmp_path / "y"), "--recipe", "hybrid",
                                  "--match-loss", "attention"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    errors = [x for x in r.output.splitlines() if "Error" in x]
    assert len(errors) == 1 and "--match-loss" in errors[0], r.output


@pytest.mark.parametrize("key, other", [("match_loss", {"match_loss": "weights"}), ("feature_dim", {"feature_dim": 32}),
                                        ("mlstm_heads", {"mlstm_heads": "kv"}), ("mix", {"mix": "joint"})])
def test_a_checkpoint_from_before_an_option_resumes_with_its_default(tmp_path, key, other):
    """A run saved before --match-loss / --feature-dim / --mlstm-heads / --mix existed (no key) resumes with the
    option's default, and is refused with another value."""
    import json

    from tcache.errors import TcacheError
    from tcache.student.training.checkpoint import CONFIG_FILE, _check_resume_config
    from tcache.student.training.config import DistillConfig

    cfg = DistillConfig(cache="c", out="o", recipe="hybrid")
    saved = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k != key}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    _check_resume_config(DistillConfig(cache="c", out="o", recipe="hybrid"), tmp_path)
    with pytest.raises(TcacheError, match="another configuration"):
        _check_resume_config(DistillConfig(cache="c", out="o", recipe="hybrid", **other), tmp_path)

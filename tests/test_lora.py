"""--train lora (student/models/lora.py): peft adapters on the converted teacher's projections in the hybrid's stage II.
Only the adapters and the new mixer parameters train, every adapter is in the forward path (the mixers call the
LoRA layers), the merged student computes what the adapted one did, the saved and exported students load without
peft, and a LoRA run resumes exactly from a checkpoint holding its adapters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import build_cache
from test_hybrid import metrics
from tcache.cli.main import main
from tcache.errors import TcacheError
from tcache.student.models import lora
from tcache.student.training.config import LORA_TARGETS, DistillConfig
from tcache.student.models.hybrid import HybridConfig, HybridStudent
from tcache.student.models.io import load_student
from tcache.student.training.train import distill, setup

CPU = torch.device("cpu")
TINY = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
                   num_key_value_heads=1, head_dim=16)


def tiny(full_attention_layers=(), rank: int | None = 4, seed: int = 0):
    """A 2-layer hybrid (window 8 + 2 sinks), with rank-`rank` adapters on every default target (None: none)."""
    torch.manual_seed(seed)
    student = HybridStudent(LlamaForCausalLM(TINY), HybridConfig(window=8, sinks=2,
                                                                 full_attention_layers=list(full_attention_layers)))
    student.set_kernel(CPU)
    if rank is not None:
        lora.add_adapters(student, rank, 2.0 * rank, 0.0, list(LORA_TARGETS))
    return student


def ids(n: int = 2, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (n, T), generator=torch.Generator().manual_seed(seed))


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def lora_cache(tmp_path_factory, tiny_teacher, valid_jsonl):
    out = tmp_path_factory.mktemp("caches") / "lora"
    build_cache(out, tiny_teacher, valid_jsonl, tokens=8 * 64, seq_len=64, top_k=8, batch_size=8)
    return out


def test_only_the_adapters_and_the_new_parameters_train():
    """By name and count: the adapters on every targeted projection and the mixers' new parameters; the teacher's
    weights (the LoRA layers' base layers, embedding, norms, head) frozen; stage I trains the new ones alone."""
    student = tiny(full_attention_layers=[1])
    student.set_stage("lora", "hybrid")
    new = {n for n, p in student.named_parameters() if any(p is q for q in student.new_parameters())}
    paths = [f"lm.model.layers.{i}.{m}" for i in range(2) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]
    adapters = {f"{p}.lora_{ab}.default.weight" for p in paths for ab in "AB"}
    assert trainable(student) == new | adapters  # layer 1 keeps full attention: adapters, no new parameters
    assert len(new) == 8  # layer 0's phi_q, phi_k, igate (w, b), fgate (w, b), ogate_w, ogate_b
    # r (d_in + d_out) per projection: q, o 48 -> 48; k, v 48 -> 16; gate, up 48 -> 64; down 64 -> 48
    per_layer = 4 * (2 * 96 + 2 * 64 + 3 * 112)
    counts = student.param_counts()
    assert counts["trainable"] == 2 * per_layer + counts["new"]
    frozen = {n for n, _ in student.named_parameters()} - trainable(student)
    assert {"lm.model.layers.0.self_attn.q_proj.base_layer.weight", "lm.model.layers.1.mlp.down_proj.base_layer.weight",
            "lm.model.embed_tokens.weight", "lm.model.norm.weight", "lm.lm_head.weight"} <= frozen
    student.set_stage("new", "match")  # stage I: the adapters wait
    assert trainable(student) == new


def test_the_trainer_optimises_exactly_those_in_stage_two(lora_cache, tmp_path):
    """setup() with --train lora: stage I's AdamW holds the new parameters, stage II's those and the adapters."""
    tr = setup(DistillConfig(cache=str(lora_cache), out=str(tmp_path / "r"), recipe="hybrid", train="lora", steps=2,
                             batch_size=2, grad_accum=1, lora_rank=4))
    names = {id(p): n for n, p in tr.model.named_parameters()}
    stage1 = {names[id(p)] for p in tr.params}
    assert stage1 == {n for n, p in tr.model.named_parameters() if any(p is q for q in tr.model.new_parameters())}
    tr.begin_stage(tr.plan.stages[1])
    stage2 = {names[id(p)] for g in tr.opt.param_groups for p in g["params"]}
    assert stage1 < stage2 and stage2 - stage1 == {n for n in names.values() if ".lora_A." in n or ".lora_B." in n}
    info = tr.plan.info["lora"]  # the tiny teacher: 4 layers, 7 projections each
    assert info["modules"] == 4 * 7 and sum(p.numel() for p in tr.params) == info["trainable"]


def test_trainable_counts_of_the_shared_teacher(teacher_dir):
    """The figures docs/hybrid.md gives: 19.3M parameters; --train lora at the defaults trains 1.31M of them."""
    from tcache.student.models.hybrid import load_hybrid

    student = load_hybrid(str(teacher_dir), HybridConfig())
    student.set_trainable("all")
    assert student.param_counts()["trainable"] == 19_320_336
    info = lora.add_adapters(student, 16, 32.0, 0.0, list(LORA_TARGETS))
    student.set_trainable("lora")
    assert (info["modules"], info["params"], student.param_counts()["new"]) == (56, 868_352, 439_440)
    assert student.param_counts()["trainable"] == info["trainable"] == 1_307_792


def test_every_adapter_is_in_the_forward_path():
    """Each mixer's q/k/v/o is the LoRA layer peft put at its path; an adapter's B moved alone moves the logits,
    in converted and full-attention layers alike; with B = 0 the student is exactly the one without adapters."""
    from peft.tuners.lora import LoraLayer

    student = tiny(full_attention_layers=[1]).eval()
    plain = tiny(full_attention_layers=[1], rank=None).eval()
    mixer, layer = student.mixers[0], student.lm.model.layers[0]
    assert mixer is layer.self_attn
    assert all(isinstance(getattr(mixer, n), LoraLayer) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    x = ids()
    with torch.no_grad():
        base = student(x)[0]
        assert torch.equal(base, plain(x)[0])
        found = lora.adapters(student)
        assert len(found) == 14
        for name, m in found:
            b = m.lora_B["default"].weight
            b.normal_(std=0.5)
            assert not torch.allclose(student(x)[0], base, atol=1e-4), name
            b.zero_()
        assert torch.equal(student(x)[0], base)


def test_the_merged_student_computes_what_the_adapted_one_did():
    student = tiny(full_attention_layers=[1])
    student.set_stage("lora", "hybrid")
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    for step in range(4):
        x = ids(seed=step)
        logits = student(x)[0]
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    assert all(m.lora_B["default"].weight.abs().max() > 1e-3 for _, m in lora.adapters(student))
    student.eval()
    x = ids(seed=99, T=40)
    teacher_q = student.mixers[0].q_proj.base_layer.weight.clone()
    with torch.no_grad():
        adapted = student(x)[0]
        assert lora.merge_adapters(student) == 14
        merged = student(x)[0]
    assert not lora.adapters(student)
    assert type(student.mixers[0].q_proj) is torch.nn.Linear
    assert student.mixers[0].q_proj is student.lm.model.layers[0].self_attn.q_proj
    assert not torch.allclose(student.mixers[0].q_proj.weight, teacher_q)  # the update is in the weight now
    assert student.state_dict().keys() == tiny(full_attention_layers=[1], rank=None).state_dict().keys()
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=1e-5), (merged - adapted).abs().max()



def by_hand(student, alpha_over_r: float) -> dict[str, torch.Tensor]:
    """Per adapted projection (its full name in the student), W + alpha / r * B A from its own base weight, A and B,
    in float64: the merge LoRA promises (Hu et al. 2021, eq. 3 with the alpha / r scale)."""
    return {name: m.base_layer.weight.double() + alpha_over_r * (m.lora_B["default"].weight.double()
                                                                 @ m.lora_A["default"].weight.double())
            for name, m in lora.adapters(student)}


def test_the_merged_weights_and_the_adapted_forward_are_w_plus_alpha_over_r_b_a():
    """--lora-alpha 6 at rank 4: the update is scaled by 1.5, which neither alpha = r (1) nor the default alpha = 2r
    (2) gives, so an adapter that ignored --lora-alpha differs. Checked against W + 1.5 B A computed here in
    float64 from each adapter's own A and B: each adapted layer's output, the whole student's logits (a plain
    student holding those weights), and the weights merge_adapters leaves."""
    rank, alpha = 4, 6.0
    student = tiny(full_attention_layers=[1], rank=None)
    lora.add_adapters(student, rank, alpha, 0.0, list(LORA_TARGETS))
    student.eval()
    with torch.no_grad():
        for _, m in lora.adapters(student):
            m.lora_B["default"].weight.normal_(std=0.5)  # B = 0 at init: nothing to scale
        want = by_hand(student, alpha / rank)
        for name, m in lora.adapters(student):
            x = torch.randn(2, 5, m.in_features)
            torch.testing.assert_close(m(x).double(), x.double() @ want[name].T, atol=1e-5, rtol=1e-5,
                                       msg=lambda e: f"{name}: {e}")
        ids_ = ids(T=40)
        adapted = student(ids_)[0]
        plain = tiny(full_attention_layers=[1], rank=None).eval()  # the same teacher and mixers (seed 0)
        for name, w in want.items():
            plain.get_submodule(name).weight.copy_(w.float())
        torch.testing.assert_close(plain(ids_)[0], adapted, atol=1e-5, rtol=1e-5)
        assert lora.merge_adapters(student) == len(want) == 14
        for name, w in want.items():
            torch.testing.assert_close(student.get_submodule(name).weight.double(), w, atol=1e-6, rtol=1e-6,
                                       msg=lambda e: f"{name}: {e}")


def test_lora_dropout_drops_the_adapters_input_in_training_only():
    """--lora-dropout p: in training, y = W x + alpha / r * B A dropout(x) (the base path undropped), a new mask per
    call; in eval the adapter sees x itself, the student equal to one built with dropout 0."""
    rank, alpha, p = 4, 8.0, 0.25
    students = []
    for dropout in (p, 0.0):
        s = tiny(rank=None)
        lora.add_adapters(s, rank, alpha, dropout, list(LORA_TARGETS))
        students.append(s)
    dropped, plain = students
    with torch.no_grad():
        for _, m in lora.adapters(dropped):
            m.lora_B["default"].weight.normal_(std=0.5)
        plain.load_state_dict(dropped.state_dict())
        name, m = lora.adapters(dropped)[0]
        A, B, W = (t.double() for t in (m.lora_A["default"].weight, m.lora_B["default"].weight, m.base_layer.weight))
        x = torch.randn(3, 7, m.in_features)
        m.train()
        torch.manual_seed(11)
        got = m(x).double()
        torch.manual_seed(11)  # the same draw: peft's layer draws nothing before its dropout
        kept = torch.nn.functional.dropout(x, p, training=True).double()  # zeros where dropped, x / (1 - p) elsewhere
        torch.testing.assert_close(got, x.double() @ W.T + alpha / rank * (kept @ A.T) @ B.T, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(m(x).double(), got, atol=1e-3)  # another call, another mask
        m.eval()
        torch.testing.assert_close(m(x).double(), x.double() @ W.T + alpha / rank * (x.double() @ A.T) @ B.T,
                                   atol=1e-5, rtol=1e-5)
        x = ids(T=24)
        dropped.eval(), plain.eval()
        base = plain(x)[0]
        assert torch.equal(dropped(x)[0], base)
        dropped.train(), plain.train()
        assert torch.equal(plain(x)[0], base)  # nothing else draws in training mode: what differs below is dropout
        a, b = dropped(x)[0], dropped(x)[0]
        assert not torch.allclose(a, b, atol=1e-3) and not torch.allclose(a, base, atol=1e-3)

def test_the_saved_and_exported_student_hold_merged_weights_and_load_without_peft(lora_cache, tmp_path, monkeypatch):
    """A CLI lora run: its student (and the export of it) is a plain hybrid whose logits are the adapted model's
    at the end of training."""
    from tcache.student.inference.hf import export_student

    x = ids(T=64)
    seen = {}
    merge = lora.merge_adapters

    def recording_merge(model):
        with torch.no_grad():
            seen["logits"] = model(x)[0]
        seen["b"] = max(m.lora_B["default"].weight.abs().max().item() for _, m in lora.adapters(model))
        return merge(model)

    monkeypatch.setattr(lora, "merge_adapters", recording_merge)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, [str(a) for a in (
        "distill", lora_cache, "--out", out, "--recipe", "hybrid", "--train", "lora", "--lora-rank", 4,
        "--lora-targets", "q_proj,v_proj,down_proj", "--steps", 3, "--stage1-tokens", 128, "--batch-size", 2,
        "--grad-accum", 1, "--lr", 1e-2)])
    assert r.exit_code == 0, r.output
    assert "stage II LoRA: rank 4, alpha 8 on q_proj,v_proj,down_proj (12 projections)" in r.output, r.output
    assert seen["b"] > 1e-3  # the adapters trained
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k or "base_layer" in k]
    doc = json.loads((out / "student.json").read_text())
    assert doc["lora"]["merged"] and doc["lora"]["rank"] == 4
    student = load_student(out, CPU)[0]
    assert not lora.adapters(student)
    with torch.no_grad():
        assert torch.allclose(student(x)[0], seen["logits"], atol=1e-5, rtol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(export_student(out, tmp_path / "hf"), trust_remote_code=True).eval()
    assert not lora.adapters(hf)
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, seen["logits"], atol=1e-5, rtol=1e-5)


def test_a_lora_run_resumes_exactly_from_a_checkpoint_of_its_adapters(tmp_path, lora_cache):
    """Stage I (2 steps) then stage II with adapters (4 steps). Continued from step 4's checkpoint (its adapters and
    new parameters, nothing of the teacher) or from step 2's at the boundary (no adapters yet: rebuilt from --seed),
    the run gives the same losses and the same student."""
    base = dict(cache=str(lora_cache), recipe="hybrid", train="lora", lora_rank=4, steps=4, stage1_tokens=2 * 2 * 64,
                batch_size=2, grad_accum=1, ckpt_every=2, seed=3, lr=1e-2)
    distill(DistillConfig(out=str(tmp_path / "a"), **base))
    full = metrics(tmp_path / "a")
    assert [r["stage"] for r in full] == ["1", "1", "2", "2", "2", "2"]
    new = {f"lm.model.layers.{i}.self_attn.{n}" for i in range(4) for n in
           ("phi_q", "phi_k", "igate.weight", "igate.bias", "fgate.weight", "fgate.bias", "ogate_w", "ogate_b")}
    with safe_open(str(tmp_path / "a" / "checkpoints" / "step-0000004" / "trainable.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert max(f.get_tensor(k).abs().max().item() for k in keys if ".lora_B." in k) > 1e-3
    assert {k for k in keys if ".lora_" not in k} == new and len(keys - new) == 4 * 7 * 2
    wa = load_student(tmp_path / "a", CPU)[0].state_dict()
    for step in (4, 2):
        b = tmp_path / f"b{step}"
        b.mkdir()
        ckpt = tmp_path / "a" / "checkpoints" / f"step-{step:07d}"
        shutil.copytree(ckpt, b / "checkpoints" / ckpt.name)
        shutil.copy(tmp_path / "a" / ".tcache-output.json", b)  # tcache's marker: b is the run's own directory
        (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:step]))
        distill(DistillConfig(out=str(b), resume=True, **base))
        resumed = metrics(b)
        assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
        for r_full, r_res in zip(full[step:], resumed[step:]):
            for term in ("ce", "kd", "loss", "lr"):
                assert r_res[term] == pytest.approx(r_full[term], rel=1e-5, abs=1e-7), (step, term, r_full, r_res)
        wb = load_student(b, CPU)[0].state_dict()
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), step
    with pytest.raises(TcacheError, match="lora_rank"):  # another rank is another model
        distill(DistillConfig(out=str(tmp_path / "b4"), resume=True, **{**base, "lora_rank": 8}))


def test_activation_checkpointing_leaves_the_adapters_gradients_unchanged():
    x = ids(T=40)
    grads = []
    for checkpointing in (False, True):
        student = tiny()
        student.set_stage("lora", "hybrid")
        if checkpointing:
            student.enable_checkpointing()
        student.train()
        logits = student(x)[0]
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any(".lora_A." in n for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("kw,says", [
    ({"lora_rank": 0}, "--lora-rank must be at least 1"),
    ({"lora_alpha": 0.0}, "--lora-alpha must be positive"),
    ({"lora_dropout": 1.0}, "--lora-dropout is a probability"),
    ({"lora_targets": "q_proj,,v_proj"}, "--lora-targets 'q_proj,,v_proj' is not"),
    ({"lora_targets": "q_proj,self_attn.v_proj"}, "--lora-targets"),
    ({"recipe": "v1"}, "--train lora adapts the hybrid recipe"),
    ({"train": "qlora"}, "--train 'qlora' is unknown"),
])
def test_bad_lora_options_are_refused_naming_the_flag(kw, says):
    with pytest.raises(TcacheError, match=says.replace("(", r"\(")):
        DistillConfig(**{"cache": "c", "out": "o", "recipe": "hybrid", "train": "lora", **kw})


def test_lora_options_resolve_and_a_target_the_teacher_lacks_is_named():
    cfg = DistillConfig(cache="c", out="o", recipe="hybrid", train="lora", lora_rank=8, lora_targets=" q_proj, v_proj")
    assert cfg.lora_alpha == 16.0 and cfg.lora_targets == ["q_proj", "v_proj"]
    assert DistillConfig(cache="c", out="o").lora_targets == list(LORA_TARGETS)
    with pytest.raises(TcacheError, match=r"--lora-targets qkv_proj: .* has q_proj,k_proj,v_proj,o_proj,gate_proj"):
        lora.add_adapters(tiny(rank=None), 4, 8.0, 0.0, ["q_proj", "qkv_proj"])
    with pytest.raises(TcacheError, match="--lora-targets igate: "):  # a new parameter trains in full
        lora.add_adapters(tiny(rank=None), 4, 8.0, 0.0, ["igate"])
    with pytest.raises(TcacheError, match="no LoRA adapters"):
        tiny(rank=None).set_trainable("lora")


def test_lora_options_do_not_block_resuming_another_run(tmp_path):
    """A checkpoint without LoRA (or from before its options existed) resumes whatever --lora-* say now."""
    from tcache.student.training.checkpoint import CONFIG_FILE, _check_resume_config

    cfg = DistillConfig(cache="c", out="o", recipe="hybrid")
    saved = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if not k.startswith("lora_")}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    _check_resume_config(DistillConfig(cache="c", out="o", recipe="hybrid", lora_rank=4), tmp_path)
    with pytest.raises(TcacheError, match="another configuration"):
        _check_resume_config(DistillConfig(cache="c", out="o", recipe="hybrid", train="lora"), tmp_path)

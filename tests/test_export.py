"""Students as transformers models: `tcache export` loads with AutoModelForCausalLM (remote code, a fresh process),
computes tcache's own logits, generates from the recurrent state exactly as the full forward would, keeps that
state bounded, and runs under lm-evaluation-harness."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import build_cache, text_head
from promises import Case
from test_cli_build import run
from tcache.student.training.config import DistillConfig
from tcache.student.models.io import load_student
from tcache.student.training.train import distill

T = 32  # the students' training length
CPU = torch.device("cpu")
RECIPES = ("v1", "v2", "hybrid")


@pytest.fixture(scope="module")
def text(tmp_path_factory, valid_jsonl):
    return text_head(valid_jsonl, tmp_path_factory.mktemp("text") / "valid-head.jsonl", 8000)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_teacher, text):
    out = tmp_path_factory.mktemp("caches") / "export"
    build_cache(out, tiny_teacher, text, tokens=8 * T, seq_len=T, top_k=8, batch_size=8)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache):
    """recipe -> (student dir, export dir): each recipe distilled 3 steps on the tiny teacher, then exported."""
    made = {}

    def get(recipe: str):
        if recipe not in made:
            root = tmp_path_factory.mktemp(f"export-{recipe}")
            extra = {"stage1_tokens": "128"} if recipe == "hybrid" else {}
            distill(DistillConfig(cache=str(cache), out=str(root / "s"), recipe=recipe, steps=3, batch_size=2,
                                  grad_accum=1, lr=3e-3, seed=0, device="cpu", **extra))
            r = run("export", root / "s", "--out", root / "hf")
            assert r.exit_code == 0, r.output
            made[recipe] = (root / "s", root / "hf")
        return made[recipe]

    return get


def test_exports_load_in_a_fresh_process_and_compute_tcache_logits(exported, tmp_path):
    """AutoModelForCausalLM with trust_remote_code in a process that never imported tcache: its logits equal the
    student's own forward as `tcache eval` loads it (fp32, CPU)."""
    dirs = {r: exported(r) for r in RECIPES}
    ids = torch.randint(0, 16384, (2, 3 * T), generator=torch.Generator().manual_seed(0))  # beyond training length
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        assert "tcache" not in sys.modules
        out = {{}}
        for recipe, path in {({r: str(d[1]) for r, d in dirs.items()})!r}.items():
            m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
            ids = torch.load({str(tmp_path / 'ids.pt')!r})
            out[recipe] = (type(m).__name__, m(ids[:, :{T}]).logits, m(ids).logits)  # at and beyond training length
        torch.save(out, {str(tmp_path / 'logits.pt')!r})
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    for recipe in RECIPES:
        name, short, long = got[recipe]
        assert name == "TcacheStudentForCausalLM"
        for logits, x in ((short, ids[:, :T]), (long, ids)):
            student, _ = load_student(dirs[recipe][0], CPU, context_length=x.shape[1])
            with torch.no_grad():
                want, _ = student(x)
            torch.testing.assert_close(logits, want, rtol=0, atol=0, msg=f"{recipe}: exported logits differ")


def _greedy_by_full_forward(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("recipe", RECIPES)
def test_generation_from_the_recurrent_state_equals_the_full_forward(exported, recipe):
    """Greedy tokens from generate() (prefill, then one recurrent step per token) equal those of re-running the
    whole growing prefix; the prompt (40 tokens) is longer than the hybrid's window + sinks (36), so far sinks and a
    full window are both exercised; sampled generation runs too."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported(recipe)[1], trust_remote_code=True).eval()
    ids = torch.randint(0, 16384, (2, 40), generator=torch.Generator().manual_seed(1))
    got = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, _greedy_by_full_forward(model, ids, 12))
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.9, pad_token_id=0,
                             eos_token_id=None)
    assert sampled.shape == (2, 46) and torch.equal(sampled[:, :40], ids)


@pytest.mark.parametrize("recipe", ["v1", "hybrid"])
def test_generation_state_does_not_grow_with_the_prefix(exported, recipe):
    from tcache.student.inference.decode import StaticDecoder
    from tcache.student.inference.prefill import prefill

    student, _ = load_student(exported(recipe)[0], CPU)
    sizes = []
    for n in (40, 120):
        _, state = prefill(student, torch.zeros(1, n, dtype=torch.long))
        dec = StaticDecoder(student, state)
        dec.step(torch.zeros(1, 1, dtype=torch.long))
        sizes.append((state.nbytes(), dec.nbytes()))
    assert sizes[0] == sizes[1] and min(sizes[0]) > 0


def test_export_refuses_a_directory_it_did_not_write_and_replaces_its_own(exported, tmp_path):
    student, hf = exported("v2")
    user = Case(tmp_path, {})
    foreign = user.user("mine/notes.txt", "keep me").parent
    user.user("notes-beside-mine.txt")
    for extra in ((), ("--overwrite",)):
        r = run("export", student, "--out", foreign, *extra)
        assert r.exit_code != 0 and "Traceback" not in r.output and "did not write (notes.txt)" in r.output
    r = run("export", student, "--out", hf)
    assert r.exit_code != 0 and "--overwrite" in r.output
    assert run("export", student, "--out", hf, "--overwrite").exit_code == 0
    user.check_owned()


def test_generate_command_prints_a_continuation(exported):
    r = run("generate", exported("hybrid")[0], "--prompt", "Once upon a time", "--max-new-tokens", "5",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Once upon a time") and "5 tokens in" in r.output


def _last_word_task(text, tmp_path) -> tuple[str, list[dict]]:
    """A LAMBADA-style local task: a held-out sentence, its last word among 3 others from other sentences."""
    rng = random.Random(0)
    sents = []
    for line in open(text):
        for s in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"]):
            w = s.split()
            if 8 <= len(w) <= 30 and w[-1].rstrip(".!?").isalpha():
                sents.append(w)
    sents = sents[:6]
    last = [w[-1].rstrip(".!?") for w in sents]
    docs = []
    for w, word in zip(sents, last):
        choices = [word] + rng.sample([x for x in last if x != word], 3)  # lm-eval puts " " in between
        rng.shuffle(choices)
        docs.append({"context": " ".join(w[:-1]), "choices": choices, "label": choices.index(word)})
    data = tmp_path / "lastword.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "lastword.yaml").write_text(textwrap.dedent(f"""\
        task: tcache_lastword
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{context}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    return "tcache_lastword", docs


def test_lm_eval_harness_scores_an_export_as_the_model_itself_does(exported, text, tmp_path):
    """lm-eval's `hf` backend on the exported hybrid, over a local multiple-choice task: its per-choice
    log-likelihoods equal the sums of the model's own token log-probs, and so does the accuracy."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = exported("hybrid")[1]
    task, docs = _last_word_task(text, tmp_path)
    r = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
                        tasks=[task], task_manager=TaskManager(include_path=str(tmp_path)), device="cpu",
                        batch_size=2, log_samples=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    correct = 0
    samples = sorted(r["samples"][task], key=lambda s: s["doc_id"])
    for doc, sample in zip(docs, samples):
        ctx = tok(doc["context"], add_special_tokens=False).input_ids
        lls = []
        for choice in doc["choices"]:
            cont = tok(doc["context"] + " " + choice, add_special_tokens=False).input_ids[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)  # (L - 1, V)
            lls.append(float(logp[len(ctx) - 1:].gather(1, torch.tensor(cont)[:, None]).sum()))
        theirs = [float(x[0]) for x in sample["filtered_resps"]]
        assert theirs == pytest.approx(lls, abs=1e-3)
        correct += int(max(range(4), key=lls.__getitem__) == doc["label"])
    assert r["results"][task]["acc,none"] == pytest.approx(correct / len(docs))


def test_distill_export_writes_the_model_and_refuses_a_bad_target_before_training(cache, tmp_path):
    foreign = tmp_path / "taken"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    r = run("distill", cache, "--recipe", "v2", "--out", tmp_path / "refused", "--steps", 1, "--export", foreign)
    assert r.exit_code != 0 and "--export" in r.output and not (tmp_path / "refused").exists()
    r = run("distill", cache, "--recipe", "v2", "--out", tmp_path / "s", "--steps", 2, "--batch-size", 2,
            "--grad-accum", 1, "--device", "cpu", "--export", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    student, _ = load_student(tmp_path / "s", CPU)
    ids = torch.randint(0, 16384, (1, T))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, student(ids)[0], rtol=0, atol=0)

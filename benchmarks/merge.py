"""Expert merging (issue 35): hybrid experts on two domains, their `tcache merge`, a student of the 50/50 mixture,
and step 3 (--qk-merge) against the same expert without it. One GPU call.

    python benchmarks/merge.py --teacher T --train BOOKS.jsonl.xz --valid VALID.jsonl --work DIR --out RESULTS
    python benchmarks/merge.py --smoke        # the whole pipeline at toy budgets on a CPU (minutes, not CI)

1. Domain B: benchmarks/data/train-mix.jsonl.xz (non-book English from Debian packages, disjoint from the books and
   every held-out set: benchmarks/data/README.md) split by document, one in --b-heldout-every (by the sha256 of its
   id) held out as B's own held-out set, the rest B's training text (split_domain_b: deterministic, disjoint ids).
2. Three caches of the teacher: books (--expert-cache-tokens of --train), B (all of B's training text) and the
   50/50 mixture of both (twice B's tokens, so neither source runs out before the other).
3. Concurrently on the one GPU: expert A (books), expert B, expert A with --qk-merge, each stage I --stage1-tokens
   + stage II --tokens; the mixture student with --mix-scale times both budgets (default 2: the two experts' total).
   Then `tcache merge A B --weights 0.5,0.5`.
4. Every model and the teacher: `tcache eval` at 512 on VALID (books), B's held-out set and each held-out set
   (--heldout), `tcache probe` at --probe-distances, and A / A-qk's decode speed (`tcache generate`, batch 1).
5. merge.json and merge.md: perplexity per set, x the teacher, the issue's targets (merge within 2% of each expert on
   its own domain and better than each on the other's; step 3 within 0.5% on every set) and parameters.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.env import ROOT, child_env, describe, tcache, workdirs  # noqa: E402
from harness.results import read_json_output, table, write_json  # noqa: E402
from harness.rows import Budget, run_row  # noqa: E402

SHARED = Path(os.environ.get("TCACHE_SHARED", ROOT.parent / "shared"))
DOMAIN_B = ROOT / "benchmarks" / "data" / "train-mix.jsonl.xz"
HELDOUT = sorted(str(p) for p in (ROOT / "benchmarks" / "data").glob("heldout-*.jsonl.xz"))
SMOKE = {"teacher": str(SHARED / "teacher"), "train": str(SHARED / "corpus" / "train.jsonl.xz"),
         "work": "/tmp/tcache-merge-smoke/work", "out": "/tmp/tcache-merge-smoke/out", "expert_cache_tokens": "16k",
         "stage1_tokens": "1k", "tokens": "2k", "batch": "2", "eval_tokens": "4k", "heldout_tokens": "4k",
         "b_docs": "60", "decode_tokens": "16", "deadline": 1800.0}
STUDENTS = ("a", "b", "a-qk", "mix")
"""Expert A (books), expert B, expert A with step 3, the mixture student; "merged" is A and B merged."""


def parse_args(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU toy run of the whole pipeline")
    for name in ("teacher", "train", "valid", "work", "out"):
        ap.add_argument(f"--{name}")
    ap.add_argument("--domain-b", default=str(DOMAIN_B), help="domain B's text, split into training and held-out")
    ap.add_argument("--b-heldout-every", type=int, default=10, help="one document in N is B's held-out set")
    ap.add_argument("--b-docs", type=int, default=0, help="use only B's first N documents (0: all; smoke runs)")
    ap.add_argument("--expert-cache-tokens", default="4M", help="the books cache (B's holds all of its text)")
    ap.add_argument("--stage1-tokens", default="1M")
    ap.add_argument("--tokens", default="3M", help="each expert's stage II budget")
    ap.add_argument("--mix-scale", type=float, default=2.0, help="the mixture student's budgets x the expert's")
    ap.add_argument("--batch", default="16", help="rows per step (no accumulation)")
    ap.add_argument("--weights", default="0.5,0.5", help="tcache merge --weights of A, B")
    ap.add_argument("--eval-tokens", default="2M", help="VALID's budget: more than it holds scores all of it")
    ap.add_argument("--heldout", default=",".join(HELDOUT), help="comma-separated held-out sets ('' for none)")
    ap.add_argument("--heldout-tokens", default="400k")
    ap.add_argument("--probe-distances", default="16,64,256")
    ap.add_argument("--decode-tokens", default="512", help="tokens A and A-qk generate for the decode speed")
    ap.add_argument("--deadline", type=float, default=540, help="seconds; unfinished jobs are killed")
    if "--smoke" in (argv if argv is not None else sys.argv[1:]):
        ap.set_defaults(**SMOKE)
    a = ap.parse_args(argv)
    a.valid_head = a.smoke and a.valid is None  # main() writes it: two books' heads
    if a.valid_head:
        a.valid = str(Path(a.work) / "valid-head.jsonl")
    missing = [f"--{k}" for k in ("teacher", "train", "valid", "work", "out") if getattr(a, k) is None]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)}")
    return a


def split_domain_b(src: Path, train: Path, heldout: Path, every: int = 10, limit: int = 0) -> dict:
    """Documents of JSONL `src` (.xz or plain) into `heldout` (sha256 of the id, or of the text without one, is 0 mod
    `every`) and `train` (the rest), in order; returns the counts. Same input, same files."""
    opener = lzma.open if str(src).endswith(".xz") else open
    n = {"train": 0, "heldout": 0, "train_chars": 0, "heldout_chars": 0}
    with opener(src, "rt") as f, open(train, "w") as tr, open(heldout, "w") as ho:
        for i, line in enumerate(f):
            if limit and i >= limit:
                break
            doc = json.loads(line)
            key = doc.get("id") or doc["text"]
            side = "heldout" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % every == 0 else "train"
            (ho if side == "heldout" else tr).write(json.dumps({"text": doc["text"]}) + "\n")
            n[side] += 1
            n[f"{side}_chars"] += len(doc["text"])
    return n


def count(text: str) -> float:
    from tcache.units import parse_count

    return float(parse_count(text, "budget"))


def main() -> None:
    a = parse_args()
    t0, budget, env = time.time(), Budget(a.deadline), child_env()
    work, out = workdirs(a)
    if a.smoke:  # heads of books: a whole book (~100k tokens) would fill a toy mixture cache before any of B
        heads = [(Path(a.train), work / "books-head.jsonl", 24, 4_000)]
        heads += [(SHARED / "corpus" / "valid.jsonl", Path(a.valid), 2, 40_000)] if a.valid_head else []
        for src, dst, docs, chars in heads:
            with (lzma.open if src.suffix == ".xz" else open)(src, "rt") as f:
                dst.write_text("".join(json.dumps({"text": json.loads(next(f))["text"][:chars]}) + "\n"
                                       for _ in range(docs)))
        a.train = str(work / "books-head.jsonl")
    b_train, b_held = work / "b-train.jsonl", work / "b-heldout.jsonl"
    split = split_domain_b(Path(a.domain_b), b_train, b_held, a.b_heldout_every, a.b_docs)
    sets = {"books": a.valid, "b-heldout": str(b_held),
            **{Path(p).name.removesuffix(".jsonl.xz"): p for p in a.heldout.split(",") if p}}

    def run(cmd, log: Path, stdout=None) -> int:
        left = budget.left()
        with open(log, "a") as lf:
            r = run_row([str(c) for c in cmd], None if left is None else max(left, 1), env, stdout or lf, lf)
        return -9 if r.timed_out else r.rc

    builds = {}

    def build(name: str, data: list, tokens: str) -> None:
        t = time.time()
        rc = run(tcache("build", "--teacher", a.teacher, *data, "--tokens", tokens, "--out", work / f"cache-{name}",
                        "--batch-size", "64", "--overwrite"), out / f"build-{name}.log")
        if rc != 0:
            raise SystemExit(f"build {name} exited {rc}: {out / f'build-{name}.log'}")
        m = json.loads((work / f"cache-{name}" / "manifest.json").read_text())
        builds[name] = {"tokens": m["tokens"], "wall_s": round(time.time() - t, 1), "dataset": m["dataset"]}
        print(f"cache {name}: {m['tokens']:,} tokens in {builds[name]['wall_s']} s", flush=True)

    with ThreadPoolExecutor(2) as pool:  # books and B at once; the mixture takes twice B's tokens (all of B)
        for f in [pool.submit(build, "books", ["--data", a.train], a.expert_cache_tokens),
                  # all of B: more tokens than its characters / 2.5 (the teacher's tokenizer reads ~3 per token
                  # on this text); a far larger budget would fail the build's disk-space check
                  pool.submit(build, "b", ["--data", b_train], str(int(split["train_chars"] / 2.5) + 1))]:
            f.result()
    build("mix", ["--data", a.train, "--data", b_train, "--data-weights", "0.5,0.5"], str(2 * builds["b"]["tokens"]))

    def evaluate(model: str, name: str) -> None:
        for s, path in sets.items():
            tokens = a.eval_tokens if s == "books" else a.heldout_tokens
            with open(work / f"{name}.eval-{s}.json.partial", "w") as f:
                if run(tcache("eval", model, "--data", path, "--tokens", tokens, "--seq-len", "512", "--batch-size",
                              "8", "--json"), out / f"{name}.log", stdout=f) == 0:
                    os.replace(f.name, work / f"{name}.eval-{s}.json")
        with open(work / f"{name}.probe.json.partial", "w") as f:
            if run(tcache("probe", model, "--distances", a.probe_distances, "--json"), out / f"{name}.log",
                   stdout=f) == 0:
                os.replace(f.name, work / f"{name}.probe.json")

    def decode_speed(name: str) -> None:
        with open(out / f"{name}.log", "a") as lf:
            left = budget.left()
            r = run_row(tcache("generate", work / name, "--prompt", "The", "--max-new-tokens", a.decode_tokens),
                        None if left is None else max(left, 1), env, lf, capture=True)
            lf.write(r.stderr or "")
        hit = re.search(r"(\d+) tokens in ([\d.]+) s \(([\d.]+) tok/s\) on (\S+)", r.stderr or "")
        if hit:
            write_json(work / f"{name}.decode.json", {"tokens": int(hit[1]), "seconds": float(hit[2]),
                                                      "tokens_per_s": float(hit[3]), "device": hit[4]})

    def student(name: str) -> None:
        scale = a.mix_scale if name == "mix" else 1.0
        cache = work / ("cache-books" if name.startswith("a") else f"cache-{name}")
        t = time.time()
        rc = run(tcache("distill", cache, "--out", work / name, "--recipe", "hybrid", "--seed", "0",
                        "--stage1-tokens", str(int(count(a.stage1_tokens) * scale)),
                        "--tokens", str(int(count(a.tokens) * scale)), "--batch-size", a.batch, "--grad-accum", "1",
                        "--workers", "1", "--overwrite", *(["--qk-merge"] if name.endswith("-qk") else [])),
                 out / f"{name}.log")
        if rc == 0:
            write_json(work / f"{name}.wall.json", {"distill_wall_s": round(time.time() - t, 1)})
            evaluate(str(work / name), name)
            if name in ("a", "a-qk"):
                decode_speed(name)

    def merged() -> None:
        rc = run(tcache("merge", work / "a", work / "b", "--out", work / "merged", "--weights", a.weights,
                        "--overwrite"), out / "merged.log")
        if rc == 0:
            evaluate(str(work / "merged"), "merged")

    with ThreadPoolExecutor(len(STUDENTS) + 1) as pool:
        jobs = {n: pool.submit(student, n) for n in STUDENTS}
        jobs["teacher"] = pool.submit(evaluate, a.teacher, "teacher")
        jobs["a"].result(), jobs["b"].result()
        jobs["merged"] = pool.submit(merged)
        for f in jobs.values():
            f.result()

    result = collect(work, list(sets), {"split": split, "builds": builds, "args": vars(a)}, time.time() - t0)
    write_json(out / "merge.json", result)
    text = report(result)
    (out / "merge.md").write_text(text + "\n")
    print(text)


def params_of(run_dir: Path) -> int | None:
    """Parameters in a student's model.safetensors (tied tensors stored once)."""
    from safetensors import safe_open

    f = run_dir / "model.safetensors"
    if not f.exists():
        return None
    with safe_open(str(f), "pt") as st:
        return sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())


def collect(work: Path, sets: list[str], info: dict, wall: float) -> dict:
    rows = {}
    for name in ("teacher", *STUDENTS, "merged"):
        r = {"ppl": {}, "probe": None}
        for s in sets:
            f = work / f"{name}.eval-{s}.json"
            if f.exists():
                r["ppl"][s] = read_json_output(f)["perplexity"]
        if (work / f"{name}.probe.json").exists():
            r["probe"] = read_json_output(work / f"{name}.probe.json")
        for extra in ("wall", "decode"):
            if (work / f"{name}.{extra}.json").exists():
                r[extra] = json.loads((work / f"{name}.{extra}.json").read_text())
        if (work / name / "student.json").exists():
            r["trained"] = json.loads((work / name / "student.json").read_text()).get("trained")
            r["params"] = params_of(work / name)
        rows[name] = r
    return {**describe(), "wall_s": round(wall, 1), **info, "sets": sets, "rows": rows, "targets": targets(rows)}


def targets(rows: dict) -> dict:
    """The issue's targets, each True / False (None where a number is missing)."""
    p = {n: r["ppl"] for n, r in rows.items()}

    def ratio(x, y, s):
        return p[x][s] / p[y][s] if s in p.get(x, {}) and s in p.get(y, {}) else None

    def check(v, ok):
        return None if v is None else {"ratio": round(v, 4), "met": ok(v)}

    t = {"merge within 2% of A on books": check(ratio("merged", "a", "books"), lambda v: v <= 1.02),
         "merge within 2% of B on B's held-out": check(ratio("merged", "b", "b-heldout"), lambda v: v <= 1.02),
         "merge better than A on B's held-out": check(ratio("merged", "a", "b-heldout"), lambda v: v < 1),
         "merge better than B on books": check(ratio("merged", "b", "books"), lambda v: v < 1)}
    sets = sorted(set(p.get("a", {})) & set(p.get("a-qk", {})))
    t.update({f"step 3 within 0.5% on {s}": check(ratio("a-qk", "a", s), lambda v: abs(v - 1) <= 0.005) for s in sets})
    t.update({f"merge vs mixture on {s}": check(ratio("merged", "mix", s), lambda v: v <= 1) for s in
              sorted(set(p.get("merged", {})) & set(p.get("mix", {})))})
    return t


def report(result: dict) -> str:
    sets, rows = result["sets"], result["rows"]
    teacher = rows["teacher"]["ppl"]
    lines = [f"# Expert merging ({result['device']}, {result['wall_s']} s)", "", f"`{result['command']}`", ""]
    body = []
    for name, r in rows.items():
        cells = [name]
        for s in sets:
            v = r["ppl"].get(s)
            cells.append("-" if v is None else f"{v:.2f}" + (f" ({v / teacher[s]:.3f}x)" if name != "teacher" and s in
                                                             teacher else ""))
        recall = (r.get("probe") or {}).get("accuracy") or {}
        cells += [" / ".join(f"{v:.2f}" for v in recall.values()) if isinstance(recall, dict) else "-",
                  f"{r['params']:,}" if r.get("params") else "-",
                  f"{r['decode']['tokens_per_s']:.0f}" if r.get("decode") else "-"]
        body.append(cells)
    lines += table(["model", *sets, "recall", "params", "decode tok/s"], body)
    lines += ["", *table(["target", "ratio", "met"], [[k, v["ratio"] if v else "-", v["met"] if v else "not measured"]
                                                      for k, v in result["targets"].items()])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

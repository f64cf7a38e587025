"""`tcache merge`: students distilled from one teacher with one recipe shape, combined in weight space into one run.

Hauzenberger et al. (2026) distil domain experts apart, each from the same initialisation, and merge them linearly
(their Eq. 14):

    theta_merge = sum_i lambda_i theta^(i),   lambda_i >= 0,   sum_i lambda_i = 1      (uniform by default)

Every floating-point tensor is the lambda-weighted sum of the runs' tensors, accumulated in float64 and stored in the
runs' dtype (so two copies of one run, or weights 1,0, give that run bit for bit); any other tensor must be equal in
every run. Students of another teacher, family or recipe shape are refused in one line naming the difference.
The merged run is a run like distill's (marker, student.json last, built beside --out and swapped in), with
`merge.json`: the runs, their weights, the hash of each one's weights and its cache's identity.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

import tcache
from tcache import locks, outdir, ownership
from tcache.errors import TcacheError
from tcache.fields import opt
from tcache.student.models.io import STUDENT_FILE, WEIGHTS_FILE, is_student_dir, load_student, save_student
from tcache.writefaults import write_error

MERGE_FILE = "merge.json"
EQUATION = "theta = sum_i w_i theta_i, w_i >= 0, sum_i w_i = 1 (Hauzenberger et al. 2026, Eq. 14)"
# what may differ between merged students: how they were computed, not what their weights mean
NOT_SHAPE = {"mlstm_kernel", "slstm_backend"}


@dataclass
class MergeConfig:
    out: str = opt()
    """The merged run's directory (a run: eval, export, generate and distill --init take it)."""
    runs: list[str] = field(default_factory=list, metadata={"cli": False})
    """The finished runs to merge (RUN_A RUN_B ...)."""
    weights: str | None = opt(None, text=True)
    """Comma-separated weight of each run, non-negative, summing to 1 (the paper's Eq. 14); default: uniform."""
    overwrite: bool = False
    """Replace the run at --out: the merge is built beside it and swapped in when complete."""


def read_doc(path: str | os.PathLike, what: str = "run") -> dict:
    """student.json of a finished run, or one line saying what `path` is instead."""
    path = Path(path)
    if not is_student_dir(path):
        raise TcacheError(f"{path} is not a finished tcache student (no {STUDENT_FILE}); pass a {what} that `tcache "
                          "distill` or `tcache merge` completed")
    try:
        doc = json.loads((path / STUDENT_FILE).read_text())
    except (OSError, ValueError):
        raise TcacheError(f"{path}/{STUDENT_FILE} is unreadable; pass a {what} that `tcache distill` "
                          "completed") from None
    if not isinstance(doc, dict) or doc.get("format") != "tcache-student":
        raise TcacheError(f"{path}/{STUDENT_FILE} is not a tcache student file; pass a run of `tcache distill`")
    return doc


def teacher_of(doc: dict) -> dict:
    """What identifies a student's teacher: its weights' hash where the run recorded it, its tokenizer, and (runs
    from before the hash) the teacher's name."""
    c = doc.get("cache") or {}
    if c.get("teacher_sha256"):
        return {"teacher weights": c["teacher_sha256"], "tokenizer": c.get("tokenizer_sha256")}
    return {"teacher": c.get("teacher"), "tokenizer": c.get("tokenizer_sha256")}


def config_of(doc: dict) -> dict:
    """A student's recipe config as JSON holds it, with the defaults of fields its tcache did not have yet."""
    from dataclasses import asdict

    from tcache.student.models.hybrid import HybridConfig
    from tcache.student.models.xlstm import StudentConfig

    cls = HybridConfig if doc.get("family", "xlstm") == "hybrid" else StudentConfig
    try:
        cfg = asdict(cls(**(doc.get("config") or {})))
    except TypeError as e:
        raise TcacheError(f"a student's config does not fit this tcache ({e}); re-run its `tcache distill`") from None
    return json.loads(json.dumps(cfg))  # tuples as lists, as student.json holds them


def first_difference(a: dict, b: dict, skip: set[str] = frozenset()) -> tuple[str, object, object] | None:
    """The first field (sorted) where the two students differ: family, teacher, then the recipe's config."""
    if a.get("family", "xlstm") != b.get("family", "xlstm"):
        return "family", a.get("family", "xlstm"), b.get("family", "xlstm")
    ta, tb = teacher_of(a), teacher_of(b)
    if set(ta) != set(tb):  # one run recorded the teacher's weights, the other only its name: compare the name
        ta, tb = ({"teacher": (d.get("cache") or {}).get("teacher"), "tokenizer": t["tokenizer"]}
                  for d, t in ((a, ta), (b, tb)))
    for k in sorted(ta):
        if ta[k] != tb[k]:
            return k, ta[k], tb[k]
    ca, cb = config_of(a), config_of(b)
    for k in sorted((set(ca) | set(cb)) - NOT_SHAPE - set(skip)):
        if ca.get(k) != cb.get(k):
            return k, ca.get(k), cb.get(k)
    return None


def check_same_shape(paths: list[str], docs: list[dict]) -> None:
    for p, d in zip(paths[1:], docs[1:]):
        diff = first_difference(docs[0], d)
        if diff is not None:
            k, va, vb = diff
            raise TcacheError(f"{p} differs from {paths[0]} in {k} ({vb!r} vs {va!r}); merge students distilled from "
                              "the same teacher with the same recipe shape")


def parse_weights(text: str | list | None, n: int) -> list[float]:
    """The merge weights: uniform when none are given; else n non-negative numbers summing to 1."""
    if text is None or text == "":
        return [1.0 / n] * n
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        w = [float(x) for x in items]
    except ValueError:
        raise TcacheError(f"--weights {text!r} is not a comma-separated list of numbers, e.g. 0.5,0.5") from None
    if len(w) != n:
        raise TcacheError(f"--weights gives {len(w)} weights for {n} runs; give one weight per run")
    if any(not math.isfinite(x) or x < 0 for x in w) or abs(sum(w) - 1) > 1e-6:
        raise TcacheError(f"--weights {text}: the merge is a convex combination; give non-negative weights that sum "
                          f"to 1 (these sum to {sum(w):g})")
    return w


def merge_states(states: list[dict[str, torch.Tensor]], weights: list[float], names: list[str]) -> dict:
    """sum_i w_i state_i per floating-point tensor (float64 accumulation, stored in the first state's dtype); other
    tensors must be equal in every state."""
    merged = {}
    for key, first in states[0].items():
        for s, name in zip(states[1:], names[1:]):
            if key not in s or s[key].shape != first.shape:
                got = tuple(s[key].shape) if key in s else "nothing"
                raise TcacheError(f"{name} holds {got} for {key}, {names[0]} {tuple(first.shape)}; merge students "
                                  "of one recipe shape")
        if first.is_floating_point():
            acc = torch.zeros(first.shape, dtype=torch.float64)
            for w, s in zip(weights, states):
                acc += w * s[key].detach().to("cpu", torch.float64)
            merged[key] = acc.to(first.dtype)
        else:
            if any(not torch.equal(s[key].cpu(), first.cpu()) for s in states[1:]):
                raise TcacheError(f"the runs differ in {key}, which is not a weight; merge students of one recipe "
                                  "shape")
            merged[key] = first.detach().cpu().clone()
    return merged


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seed_of(path: str | os.PathLike) -> int | None:
    """The --seed a run was distilled with (its distill_config.json; None for a merge or a run without one)."""
    try:
        return json.loads((Path(path) / "distill_config.json").read_text()).get("seed")
    except (OSError, ValueError, AttributeError):
        return None


def manifest_of(paths: list[str], docs: list[dict], weights: list[float]) -> dict:
    """merge.json: what was merged, with which weights, and what each run was distilled from."""
    runs = []
    for p, d, w in zip(paths, docs, weights):
        c = d.get("cache") or {}
        runs.append({"run": str(p), "weight": w, "seed": seed_of(p),
                     "weights_sha256": sha256_file(Path(p) / WEIGHTS_FILE),
                     "cache": {k: c.get(k) for k in ("path", "identity", "teacher", "teacher_sha256",
                                                     "tokenizer_sha256", "seq_len", "top_k")},
                     "trained": d.get("trained"), "merged": d.get("merged")})
    # The new mixer weights start from the seed (the input gate's bias, the feature projections): experts of one
    # seed start from one point, as the paper's do; other seeds merge weights that never shared a start
    seeds = {r["seed"] for r in runs if r["seed"] is not None}
    return {"format": "tcache-merge", "method": EQUATION, "runs": runs, "same_init": len(seeds) <= 1}


def check_out(out: Path, paths: list[str], overwrite: bool) -> str:
    """Refuse an --out that is an input, a file, anything tcache did not write, or a run without --overwrite."""
    for p in paths:
        if out.resolve() == Path(p).resolve():
            raise TcacheError(f"--out {out} is one of the runs being merged; choose another --out")
    k = outdir.classify(out, "run")
    if k == "run" and not overwrite:
        raise TcacheError(f"--out {out} already holds a run; pass --overwrite to replace it")
    return k


def merge_runs(runs: list[str], out: str | os.PathLike, weights: str | list | None = None,
               overwrite: bool = False) -> dict:
    """Merge the students at `runs` into a new run at `out`; returns its merge manifest."""
    if len(runs) < 2:
        raise TcacheError("tcache merge needs two runs or more; pass RUN_A RUN_B [...]")
    w = parse_weights(weights, len(runs))
    docs = [read_doc(p) for p in runs]
    check_same_shape(runs, docs)
    out = Path(out)
    check_out(out, runs, overwrite)
    outdir.check_writable(out)
    with locks.locked(out):
        k = check_out(out, runs, overwrite)  # again, now that no other command can change it
        models = [load_student(p, torch.device("cpu"))[0] for p in runs]
        state = merge_states([m.state_dict() for m in models], w, runs)
        model = models[0]
        model.load_state_dict(state, strict=True)
        manifest = manifest_of(runs, docs, w)
        meta = {"tcache_version": tcache.__version__, "params": docs[0].get("params"),
                "kernels": docs[0].get("kernels"), "final_metrics": None,
                "merged": {"runs": [str(p) for p in runs], "weights": w, "method": EQUATION, "manifest": MERGE_FILE},
                # the teacher they share; each run's own cache is in merge.json
                "cache": {k2: v for k2, v in (docs[0].get("cache") or {}).items() if k2 not in ("path", "identity")},
                "trained": _summed([d.get("trained") for d in docs])}
        work = outdir.fresh_staging(out, "run") if k == "run" else out
        try:
            ownership.claim(work, "run", (MERGE_FILE,))
            try:
                (work / MERGE_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            except OSError as e:
                raise write_error(out, e) or e from None
            save_student(work, model, meta, runs[0])
        except BaseException:
            if work != out or k == "missing":  # nothing of the user's there: what tcache wrote goes
                outdir.remove_ours(work)
            raise
        if work != out:
            outdir.swap_in(work, out)
    return manifest


def _summed(trained: list) -> dict | None:
    """What the merged student trained on in all: the runs' steps, tokens and seconds added."""
    if not all(isinstance(t, dict) for t in trained):
        return None
    return {k: sum(t.get(k) or 0 for t in trained) for k in ("steps", "tokens", "seconds")}


def load_init(model: torch.nn.Module, path: str | os.PathLike, manifest, hybrid_cfg) -> None:
    """--init: a saved hybrid student's weights (a merge, say) into the freshly converted `model`, which the cache's
    teacher must have produced with the same recipe shape; a merged (step 3) student merges `model` first."""
    from dataclasses import asdict

    doc = read_doc(path, "--init run")
    if doc.get("family") != "hybrid":
        raise TcacheError(f"--init {path} is a {doc.get('family', 'xlstm')} student; --init starts the hybrid recipe's "
                          "stage II from a hybrid student (a distill or merge output)")
    cache = {"family": "hybrid", "config": asdict(hybrid_cfg),
             "cache": {"teacher": manifest.teacher.get("name_or_path"),
                       "tokenizer_sha256": manifest.tokenizer.get("sha256"),
                       "teacher_sha256": teacher_fingerprint(manifest)}}
    diff = first_difference(cache, doc, skip={"qk_merged"})
    if diff is not None:
        k, mine, theirs = diff
        raise TcacheError(f"--init {path} differs from this run in {k} ({theirs!r} vs {mine!r}); pass the options it "
                          "was trained with and a cache of its teacher")
    if (doc.get("config") or {}).get("qk_merged") and not model.cfg.qk_merged:
        model.merge_qk()
    saved = load_student(path, torch.device("cpu"))[0]
    model.load_state_dict(saved.state_dict(), strict=True)


def teacher_fingerprint(manifest) -> str | None:
    """One hash of the teacher's weight files in a cache (their sha256s from the manifest), or None without them."""
    files = {k: v for k, v in sorted(manifest.teacher_files.items()) if k.endswith(".safetensors")}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest() if files else None

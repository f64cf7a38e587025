#!/usr/bin/env python3
"""A training mixture of non-book English, so students can be distilled on more than Project Gutenberg books.

The students train on books (`train.jsonl.xz`) and are scored out of domain on the held-out sets of
benchmarks/heldout.py. This mixture is other English to train on, built only from pinned Debian 12 packages
that no held-out set uses (none of them Python documentation; licences in benchmarks/data/README.md):

- `perl-doc`: programming documentation, Perl 5.36's manual (POD: tutorials, FAQs, reference, release notes);
- `debian-handbook`: system-administration prose, the Debian Administrator's Handbook (English HTML only);
- `debian-reference-en`: the Debian Reference, a system-administration guide (HTML);
- `debian-faq`: the Debian GNU/Linux FAQ (HTML);
- `fortunes`: short quotations, jokes, verse and anecdotes (the fortune-mod database, no offensive set);
- `wordnet-base`: general-English dictionary glosses (WordNet 3.0 synsets: "word, synonym: gloss; examples").

Usage (downloads the pinned .deb files into the cache and verifies their sha256; writes `train-mix.jsonl.xz`,
its manifest `train-mix.json` and the licence texts; about 3.5 minutes and 0.65 GB on a 2-core CPU):

    python benchmarks/mixture.py --out benchmarks/data [--cache /tmp/tcache-heldout]
        [--teacher ../shared/teacher] [--tokens 3M] [--seed 0]

Re-running gives byte-identical output. The file is JSONL, one {"text", "source" (package), "id"} per document;
`tcache build --data benchmarks/data/train-mix.jsonl.xz` reads its `text`.

Method:
1. Documents: one =head1 section of a POD page, one h2 section of an HTML page (both cut again at deeper
   headings, then at paragraphs, while over 20,000 characters), consecutive fortunes of one file joined until
   500 characters, 20 consecutive WordNet synsets (one line each). POD is converted by a small pure-Python
   converter (benchmarks/mixture_text.py), HTML by heldout_text's parser. Left out: tables of contents, index
   pages, licences, navigation, POD's acknowledgement / author / copyright / see-also sections, translations,
   Unicode property tables, the ASCII-art fortunes.
2. Per source, in a seeded fixed shuffle (sha256 of "mix<seed>:<package>:<id>"), heldout.py's dedup: repeated
   paragraphs, documents under 500 characters and near-duplicates (over half their word 8-grams seen) dropped,
   until the pool holds 1.5x the source's share.
3. Disjoint from what students are scored on and from the books: every 50-character normalised window (heldout.py's
   hash) of the pool is looked up among the windows of the three held-out sets, valid.jsonl and train.jsonl.xz.
   A paragraph (a WordNet line) holding a shared window is cut out and its document split there, so no new
   window is made; pieces under 500 characters, and pieces with a window shared across a paragraph boundary,
   are dropped. The manifest counts what each reference set caused to drop.
4. Balance: each source gets at most an equal share of --tokens (teacher tokens, no special tokens), taken in
   the shuffled order; a source that runs out gives less, and the total falls short (said in the manifest).
5. The chosen documents are checked again against every reference set (all of it), shuffled together
   (sha256 of "<seed>:<package>:<id>") and written as xz (preset 9, no timestamps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from heldout import MIN_CHARS, WINDOW, dedup, in_sorted, overlap, sha256_file, sorted_unique, window_hashes
from heldout_debian import MIRROR, PACKAGES as HELDOUT_PACKAGES, deb_files
from heldout_text import blocks_text, clean_text
from mixture_text import PACKAGES, docbook_documents, fetch, fortune_documents, pod_blocks, pod_documents, \
    wordnet_documents

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TCACHE_SHARED", ROOT.parent / "shared"))
DEFAULT_TOKENS = "3M"
MARGIN = 1.5
GPL2 = Path("/usr/share/common-licenses/GPL-2")
GPL2_SHA256 = "8177f97513213526df2cf6184d8ff986c675afb514d4e68a404010521b880643"
POD = "usr/share/perl/5.36.0/pod/"
HANDBOOK = "usr/share/doc/debian-handbook/html/en-US/"
REFERENCE = "usr/share/debian-reference/"
FAQ = "usr/share/doc/debian/FAQ/"

SOURCES = {
    "perl-doc": {
        "kind": "programming documentation: Perl 5.36's manual pages (POD), tutorials, FAQs, reference, release notes",
        "licence": "GPL-1+ or the Artistic License (Perl's terms); copyright 1987-2022 Larry Wall and others",
        "licence_files": ["LICENSE-Artistic-Perl.txt"]},
    "debian-handbook": {
        "kind": "system-administration prose: The Debian Administrator's Handbook (Debian 11), English HTML",
        "licence": "CC-BY-SA-3.0 (chosen of GPL-2.0+ or CC-BY-SA-3.0); copyright 2003-2015 Raphaël Hertzog, "
                   "Roland Mas, Freexian SARL",
        "licence_files": ["LICENSE-CC-BY-SA-3.0.txt", "LICENSE-GPL-2.txt"]},
    "debian-reference-en": {
        "kind": "system-administration guide: Debian Reference 2.100, HTML (prose, command sessions, tables)",
        "licence": "GPL-2+; copyright 2007-2013 Osamu Aoki",
        "licence_files": ["LICENSE-GPL-2.txt"]},
    "debian-faq": {
        "kind": "questions and answers: The Debian GNU/Linux FAQ, HTML",
        "licence": "verbatim copies and modified versions under an identical permission notice; copyright "
                   "1996-2003 Software in the Public Interest",
        "licence_files": ["LICENSE-Debian-FAQ.txt"]},
    "fortunes": {
        "kind": "short quotations, jokes, verse and anecdotes: the fortune-mod database (no offensive set)",
        "licence": "fortune-mod is BSD-licensed; the collected quotations have no licence of their own (the "
                   "package's Notes call them fair use), see the notice in the manifest",
        "licence_files": []},
    "wordnet-base": {
        "kind": "general-English dictionary glosses: WordNet 3.0 synsets (words, definition, usage examples)",
        "licence": "WordNet 3.0 licence (permissive; the notice must accompany copies); copyright 2006 Princeton "
                   "University",
        "licence_files": ["LICENSE-WordNet-3.0.txt"]},
}
# what each package's copyright file says that must travel with the text, quoted in the manifest
NOTICE_LINES = {"debian-faq": ("  Copyright (C) 1996", "in the original English."),
                "fortunes": ("This program falls under", "SUCH DAMAGE.")}


def keep_file(pkg: str, p: str) -> bool:
    if p.startswith(f"usr/share/doc/{pkg}/copyright"):
        return True
    return {"perl-doc": p.startswith(POD) and p.endswith(".pod"),
            "debian-handbook": p.startswith(HANDBOOK) and p.endswith(".html") and "/" not in p[len(HANDBOOK):],
            "debian-reference-en": p.startswith(REFERENCE) and p.endswith(".en.html"),
            "debian-faq": p.startswith(FAQ) and p.endswith(".en.html"),
            "fortunes": p.startswith("usr/share/games/fortunes/") and not p.endswith((".dat", ".u8")),
            "wordnet-base": p.startswith("usr/share/wordnet/data.")}[pkg]


def documents(pkg: str, files: dict[str, bytes]) -> list[tuple[str, str]]:
    files = {p: b for p, b in files.items() if "/doc/" + pkg + "/copyright" not in p}
    if pkg == "perl-doc":
        return pod_documents(files)
    if pkg in ("debian-handbook", "debian-reference-en", "debian-faq"):
        return docbook_documents(files, {"debian-handbook": HANDBOOK, "debian-reference-en": REFERENCE,
                                         "debian-faq": FAQ}[pkg])
    if pkg == "fortunes":
        return fortune_documents(files, MIN_CHARS)
    return wordnet_documents(files)


def copyright_stanza(text: str, head: str) -> str:
    """A machine-readable copyright file's "License: X" stanza, its " ." lines as blank lines."""
    lines = text.split("\n")
    i = lines.index(head)
    body = []
    for ln in lines[i + 1:]:
        if not ln.startswith(" "):
            break
        body.append("" if ln.strip() == "." else ln[1:])
    return clean_text("\n".join(body))


def rel(p) -> str:
    """A path as the manifest records it: relative to the checkout (../shared/... for the shared assets)."""
    return os.path.relpath(Path(p).resolve(), ROOT)


def unit_sep(pkg: str) -> str:
    return "\n" if pkg == "wordnet-base" else "\n\n"


def cut_around(pool: list, found: dict[str, np.ndarray], count) -> tuple[list, dict]:
    """Pool documents (id, source, text, tokens) without the paragraphs that share a window with a reference
    set, each split there into pieces (substrings of the document, so no new window appears). Returns the pieces
    and, per reference set, how many documents shared a window, paragraphs were cut and documents lost."""
    table = sorted_unique(np.concatenate(list(found.values())))
    stats = {name: {"pool_documents_sharing_a_window": 0, "paragraphs_dropped": 0, "documents_dropped": 0}
             for name in found}
    out, small, crossing = [], 0, 0
    for doc_id, src, text, n in pool:
        if not in_sorted(window_hashes(text), table).any():
            out.append((doc_id, src, text, n))
            continue
        sep = unit_sep(src)
        units = text.split(sep)
        hits = [{name: bool(in_sorted(h, t).any()) for name, t in found.items()}
                for h in map(window_hashes, units)]
        touched = {name for name in found if in_sorted(window_hashes(text), found[name]).any()}
        runs, cur = [], []
        for u, hit in zip(units, hits):
            for name, h in hit.items():
                stats[name]["paragraphs_dropped"] += h
            if any(hit.values()):
                runs.append(cur)
                cur = []
            else:
                cur.append(u)
        runs.append(cur)
        kept = 0
        for k, run in enumerate(r for r in runs if r):
            piece = sep.join(run)
            if len(piece) < MIN_CHARS:
                small += 1
            elif in_sorted(window_hashes(piece), table).any():
                crossing += 1  # a shared window across a paragraph boundary
            else:
                out.append((f"{doc_id}/{k}", src, piece, count(piece)))
                kept += 1
        for name in touched:
            stats[name]["pool_documents_sharing_a_window"] += 1
            stats[name]["documents_dropped"] += kept == 0
    return out, {"per_reference": stats, "pieces_dropped_small": small, "pieces_dropped_crossing": crossing}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/data", help="where train-mix.jsonl.xz and train-mix.json go")
    ap.add_argument("--cache", default="/tmp/tcache-heldout", help="download cache for the .deb files")
    ap.add_argument("--teacher", default=str(SHARED / "teacher"), help="tokenizer that counts the tokens")
    ap.add_argument("--tokens", default=DEFAULT_TOKENS, help="teacher tokens in all (an equal share per source)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fixed shuffles")
    ap.add_argument("--heldout", default=str(ROOT / "benchmarks" / "data"), help="the held-out sets to avoid")
    ap.add_argument("--train", default=str(SHARED / "corpus" / "train.jsonl.xz"), help="training books to avoid")
    ap.add_argument("--valid", default=str(SHARED / "corpus" / "valid.jsonl"), help="held-out books to avoid")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from tcache.units import parse_count

    assert not set(PACKAGES) & set(HELDOUT_PACKAGES), "a mixture package is a held-out set's"
    target = parse_count(args.tokens)
    cap = target // len(SOURCES)
    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    backend = AutoTokenizer.from_pretrained(args.teacher).backend_tokenizer

    def count(text: str) -> int:
        return len(backend.encode(text, add_special_tokens=False).ids)

    t0 = time.time()
    raw, meta, licences = {}, {}, {}
    for pkg in SOURCES:
        deb = fetch(pkg, cache)
        version, pool_path, sha, size = PACKAGES[pkg]
        files = deb_files(deb, lambda p, pkg=pkg: keep_file(pkg, p))
        cpath = f"usr/share/doc/{pkg}/copyright"
        ctext = files[cpath].decode("utf-8")
        raw[pkg] = [(f"{pkg}:{i}", pkg, t) for i, t in documents(pkg, files)]
        meta[pkg] = {"version": version, "url": f"{MIRROR}/{pool_path}", "sha256": sha, "size": size,
                     "copyright": "/" + cpath, "copyright_sha256": hashlib.sha256(files[cpath]).hexdigest(),
                     "files": sum(1 for p in files if p != cpath),
                     "files_sha256": hashlib.sha256("".join(f"{hashlib.sha256(b).hexdigest()}  {p}\n" for p, b
                                                            in files.items()).encode()).hexdigest()}
        if pkg in NOTICE_LINES:
            a, b = NOTICE_LINES[pkg]
            meta[pkg]["notice"] = clean_text(textwrap.dedent(ctext[ctext.index(a):ctext.index(b) + len(b)]))
        if pkg == "perl-doc":
            licences["LICENSE-Artistic-Perl.txt"] = clean_text(blocks_text(pod_blocks(
                files[POD + "perlartistic.pod"].decode("utf-8"))))
        elif pkg == "debian-handbook":
            licences["LICENSE-CC-BY-SA-3.0.txt"] = copyright_stanza(ctext, "License: CC-BY-SA-3.0")
        elif pkg == "debian-reference-en":
            meta[pkg]["notice"] = copyright_stanza(ctext, "License: GPL-2+")
        elif pkg == "debian-faq":
            licences["LICENSE-Debian-FAQ.txt"] = meta[pkg]["notice"]
        elif pkg == "wordnet-base":
            licences["LICENSE-WordNet-3.0.txt"] = copyright_stanza(ctext, "License: WordNet3.0")
        print(f"{pkg}: {len(raw[pkg])} candidate documents ({time.time() - t0:.0f}s)", file=sys.stderr)
    if GPL2.is_file() and hashlib.sha256(GPL2.read_bytes()).hexdigest() == GPL2_SHA256:
        licences["LICENSE-GPL-2.txt"] = GPL2.read_text()
    elif not (out / "LICENSE-GPL-2.txt").is_file():
        print(f"warning: {GPL2} (sha256 {GPL2_SHA256}) not found; LICENSE-GPL-2.txt not written", file=sys.stderr)

    heldout_dir = Path(args.heldout)
    refs = {f"heldout-{s}": heldout_dir / f"heldout-{s}.jsonl.xz" for s in ("gnuinfo", "pydocs", "foldoc")}
    refs.update(valid=Path(args.valid), train=Path(args.train))
    margin = MARGIN
    while True:
        pool, dedup_stats, exhausted = [], {}, {}
        for pkg in SOURCES:
            budget = int(cap * margin)
            kept, dedup_stats[pkg] = dedup(f"mix{args.seed}:{pkg}", raw[pkg], count, budget)
            exhausted[pkg] = sum(d[3] for d in kept) < budget
            pool += kept
        print(f"overlap check of {len(pool)} documents against {', '.join(refs)}", file=sys.stderr)
        pieces, cut_stats = cut_around(pool, overlap({"pool": pool}, refs), count)
        chosen, totals, short = [], {}, False
        for pkg in SOURCES:
            total = 0
            for d in pieces:
                if d[1] == pkg and total + d[3] <= cap:
                    chosen.append(d)
                    total += d[3]
            totals[pkg] = total
            short |= total < 0.995 * cap and not exhausted[pkg]
        if not short:
            break
        margin *= 1.5
        print(f"a source came out short of {cap} tokens; widening the pool ({margin:.2f}x)", file=sys.stderr)

    # The check itself, on what is written: no window of any chosen document in any reference set.
    while True:
        found = overlap({"mix": chosen}, refs)
        table = sorted_unique(np.concatenate(list(found.values())))
        if not len(table):
            break
        bad = {d[0] for d in chosen if in_sorted(window_hashes(d[2]), table).any()}
        print(f"recheck: dropping {len(bad)} documents", file=sys.stderr)
        cut_stats["dropped_at_recheck"] = cut_stats.get("dropped_at_recheck", 0) + len(bad)
        chosen = [d for d in chosen if d[0] not in bad]
    chosen.sort(key=lambda d: hashlib.sha256(f"{args.seed}:{d[1]}:{d[0]}".encode()).hexdigest())

    path = out / "train-mix.jsonl.xz"
    body = "".join(json.dumps({"text": d[2], "source": d[1], "id": d[0]}, ensure_ascii=False) + "\n"
                   for d in chosen).encode("utf-8")
    path.write_bytes(lzma.compress(body, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9))
    for name, text in sorted(licences.items()):
        (out / name).write_text(text.rstrip("\n") + "\n")
    tokens = sum(d[3] for d in chosen)
    manifest = {
        "generator": "benchmarks/mixture.py",
        "debian": "12 (bookworm) main, " + MIRROR,
        "file": path.name, "sha256": sha256_file(path), "jsonl_sha256": hashlib.sha256(body).hexdigest(),
        "bytes": path.stat().st_size, "record": {"text": "the document", "source": "its Debian package",
                                                 "id": "package:document id[/piece]"},
        "tokenizer": {"path": rel(args.teacher),
                      "tokenizer.json sha256": sha256_file(Path(args.teacher) / "tokenizer.json"),
                      "counting": "tokens without special tokens, per document; tokens_with_eos adds the one EOS "
                                  "per document that tcache's packing appends"},
        "target_tokens": target, "per_source_cap": cap, "documents": len(chosen),
        "characters": sum(len(d[2]) for d in chosen), "tokens": tokens, "tokens_with_eos": tokens + len(chosen),
        "short_of_target": (f"{target - tokens:,} tokens short of {target:,}: "
                            + ", ".join(p for p in SOURCES if exhausted[p] and totals[p] < 0.995 * cap)
                            + " ran out before reaching an equal share" if tokens < 0.995 * target else None),
        "method": {"seed": args.seed, "order": "sha256 of '<seed>:<package>:<id>'",
                   "pool_order": "sha256 of 'mix<seed>:<package>:<id>' per source", "pool_margin": margin,
                   "min_chars": MIN_CHARS, "near_duplicate": "heldout.py's dedup (duplicate paragraphs of 40+ "
                   "characters, more than half of the word 8-gram shingles seen)"},
        "overlap_check": {
            "window_chars": WINDOW,
            "normalisation": "NFKC, lower case, quotes and dashes unified, whitespace runs as one space",
            "hash": "64-bit polynomial hash of the window's code points (heldout.py)",
            "references": {n: {"path": rel(p), "sha256": sha256_file(p)} for n, p in refs.items()},
            "unit": "paragraph (WordNet: one synset line); its document is split where it is cut out",
            **cut_stats,
            "shared_windows_in_written_set": {n: int(len(v)) for n, v in found.items()},
        },
        "sources": {},
    }
    for pkg, spec in SOURCES.items():
        docs = [d for d in chosen if d[1] == pkg]
        n = sum(d[3] for d in docs)
        manifest["sources"][pkg] = {
            "package": pkg, **meta[pkg], "kind": spec["kind"], "licence": spec["licence"],
            "licence_files": spec["licence_files"], "documents": len(docs),
            "characters": sum(len(d[2]) for d in docs), "tokens": n, "tokens_with_eos": n + len(docs),
            "share_of_tokens": round(n / max(tokens, 1), 4), "ran_out": exhausted[pkg] and n < 0.995 * cap,
            "pool": {"candidates": dedup_stats[pkg]["candidates"], "dropped_small": dedup_stats[pkg]["small"],
                     "dropped_near_duplicate": dedup_stats[pkg]["near_duplicate"],
                     "duplicate_paragraphs_dropped": dedup_stats[pkg]["paragraphs_dropped"]},
        }
        print(f"{pkg}: {len(docs)} documents, {n:,} tokens, {manifest['sources'][pkg]['characters']:,} characters",
              file=sys.stderr)
    (out / "train-mix.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    print(f"done in {time.time() - t0:.0f}s: {len(chosen)} documents, {tokens:,} tokens, {path.stat().st_size:,} "
          f"bytes; shared windows in the written set: {manifest['overlap_check']['shared_windows_in_written_set']}",
          file=sys.stderr)


if __name__ == "__main__":
    main()

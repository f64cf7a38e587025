#!/usr/bin/env python3
"""Held-out sets of non-book English text, for scoring students out of domain (issue 24, item 1).

The students are distilled on Project Gutenberg books; these sets are other kinds of English, built only
from what pinned Debian packages ship (freely redistributable text, licences in benchmarks/data/README.md):

- `gnuinfo`: software reference manuals (explanatory prose, option tables, command lines, short examples),
  the GNU info manuals of 20 Debian packages (coreutils, findutils, grep, sed, bash, autoconf, m4, ...);
- `pydocs`: programming documentation (tutorial, HOWTOs, library and language reference, FAQs; prose with
  code blocks), the Python 3.11 HTML manual of Debian's `python3.11-doc`;
- `foldoc`: encyclopaedia-like dictionary articles on computing (concepts, languages, history, people,
  companies), FOLDOC, the Free On-line Dictionary of Computing, from Debian's `dict-foldoc`.

Usage (downloads the pinned .deb files into the cache, verifies their sha256, writes the sets, the
manifest `heldout.json` and the licence texts; about 2 minutes and 0.7 GB of memory on a 2-core CPU):

    python benchmarks/heldout.py --out benchmarks/data [--cache /tmp/tcache-heldout]
        [--teacher /work/shared/teacher] [--train /work/shared/corpus/train.jsonl.xz]
        [--valid /work/shared/corpus/valid.jsonl]

Re-running gives byte-identical output. A pinned version that the Debian mirror no longer carries (a
point release replaced it) can be put in the cache by hand (from snapshot.debian.org); its sha256 is checked.

Method, for every set:
1. Documents: one info node (GNU manuals), one HTML page section (Python manual: split at its h2 headings,
   sections over 20,000 characters split again at h3, then h4), one dictionary entry (FOLDOC). Indexes,
   menus, tables of contents, licence and copying sections, the Python changelog and FOLDOC entries taken
   from the Jargon File (which Project Gutenberg also publishes) are left out.
2. Cleaning to plain UTF-8 text: HTML through the stdlib `html.parser` (navigation, permalinks and
   tables of contents dropped; tables as tab-separated lines); info files without node headers, menus,
   cross-reference syntax (`*note X::` -> `X`), heading underlines and footnote rules; FOLDOC without
   its `{link}` braces, `<category>` tags and revision dates. Hard-wrapped prose is joined into one line
   per paragraph (a line joins the next when the next line's first word would not have fitted on it, the
   fill rule of makeinfo and dictfmt); code and tables stay as lines. Paragraphs are separated by a blank
   line, as in the book corpus.
3. Order: documents sorted by sha256 of "set:document id" (a fixed shuffle, so any prefix of a set mixes
   all its sources).
4. In that order: paragraphs of 40+ characters already in a kept document are dropped; documents then under
   500 characters are dropped; documents with more than half of their word 8-gram shingles in earlier
   kept documents are dropped.
5. Never trained on: every 50-character window (after NFKC, lower case, unified quotes and dashes,
   whitespace runs as one space) of every kept document is hashed (64-bit polynomial hash) and looked up
   among the windows of the training text (train.jsonl.xz, 54M characters, streamed one book at a time),
   and of valid.jsonl; a document with any shared window is dropped. The manifest records how many were.
6. Documents are taken until the set holds 400,000 teacher tokens (tokenised without special tokens, as
   `tcache` does; the manifest also gives the count with the one EOS per document that packing adds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np

from heldout_debian import MIRROR, PACKAGES, SETS, deb_files, fetch
from heldout_text import MAX_SECTION_CHARS, blocks_text, clean_text, foldoc_documents, html_blocks, info_manual, \
    pydoc_documents

TARGET_TOKENS = 400_000
MIN_CHARS = 500
DUP_PARAGRAPH_CHARS = 40
SHINGLE_WORDS = 8
NEAR_DUP_FRACTION = 0.5
WINDOW = 50


# ---------------------------------------------------------------------------------------------- windows

_QUOTES = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "“": '"', "”": '"', "„": '"', "«": '"',
                         "»": '"', "–": "-", "—": "-", "‐": "-", "‑": "-", "−": "-", "`": "'"})
_BASE = np.uint64(0x9E3779B97F4A7C15)


def normalise(s: str) -> str:
    """What the overlap check compares: NFKC, lower case, one kind of quote and dash, single spaces."""
    s = unicodedata.normalize("NFKC", s).lower().translate(_QUOTES)
    return re.sub(r"\s+", " ", s)


def window_hashes(s: str, n: int = WINDOW) -> np.ndarray:
    """uint64 polynomial hashes of every n-character window of normalise(s)'s code points."""
    cp = np.frombuffer(normalise(s).encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    m = len(cp) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h *= _BASE
            h += cp[k:k + m]
    return h


def sorted_unique(h: np.ndarray) -> np.ndarray:
    """np.unique, which numpy 2.x runs through a hash table 100x slower than a sort for uint64."""
    h = np.sort(h)
    return h[np.concatenate(([True], h[1:] != h[:-1]))] if len(h) else h


def in_sorted(h: np.ndarray, table: np.ndarray) -> np.ndarray:
    """For each hash in h, whether it is in `table` (sorted)."""
    if len(table) == 0 or len(h) == 0:
        return np.zeros(len(h), dtype=bool)
    idx = np.minimum(np.searchsorted(table, h), len(table) - 1)
    return table[idx] == h


def corpus_texts(path: Path):
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for ln in f:
            if ln.strip():
                yield json.loads(ln)["text"]


# ---------------------------------------------------------------------------------------------- build

def doc_key(set_name: str, doc_id: str) -> str:
    return hashlib.sha256(f"{set_name}:{doc_id}".encode()).hexdigest()


def shingles(text: str) -> set[bytes]:
    words = re.findall(r"\w+", text.lower())
    return {hashlib.blake2b(" ".join(words[i:i + SHINGLE_WORDS]).encode(), digest_size=8).digest()
            for i in range(max(0, len(words) - SHINGLE_WORDS + 1))}


def dedup(set_name: str, docs: list[tuple[str, str, str]], count, budget: int) -> tuple[list, dict]:
    """Docs (id, source, text) in fixed-shuffle order, duplicate paragraphs and near-duplicates dropped,
    until `budget` tokens are kept. Returns ([(id, source, text, tokens)], counts)."""
    seen_paras: set[str] = set()
    seen_sh: set[bytes] = set()
    kept, stats, total = [], {"candidates": len(docs), "small": 0, "near_duplicate": 0,
                              "paragraphs_dropped": 0}, 0
    for doc_id, source, text in sorted(docs, key=lambda d: doc_key(set_name, d[0])):
        paras, keys, dropped = [], set(), 0
        for p in text.split("\n\n"):
            key = re.sub(r"\s+", " ", p).strip()
            if len(key) >= DUP_PARAGRAPH_CHARS:
                if key in seen_paras or key in keys:
                    dropped += 1
                    continue
                keys.add(key)
            paras.append(p)
        text = clean_text("\n\n".join(paras))
        if len(text) < MIN_CHARS:
            stats["small"] += 1
            continue
        sh = shingles(text)
        if sh and len(sh & seen_sh) > NEAR_DUP_FRACTION * len(sh):
            stats["near_duplicate"] += 1
            continue
        # only what is kept counts as seen
        seen_sh |= sh
        seen_paras |= keys
        stats["paragraphs_dropped"] += dropped
        n = count(text)
        kept.append((doc_id, source, text, n))
        total += n
        if total >= budget:
            break
    return kept, stats


def overlap(sets: dict[str, list], corpora: dict[str, Path]) -> dict[str, np.ndarray]:
    """{corpus: sorted window hashes that occur both in some set document and in the corpus}. The corpora are
    streamed one document at a time; only the sets' hashes are held."""
    table = sorted_unique(np.concatenate([window_hashes(d[2]) for docs in sets.values() for d in docs]))
    found = {}
    for name, path in corpora.items():
        t0, hits, chars = time.time(), [np.zeros(0, dtype=np.uint64)], 0
        for text in corpus_texts(path):
            h = window_hashes(text)
            chars += len(text)
            hits.append(h[in_sorted(h, table)])
        found[name] = sorted_unique(np.concatenate(hits))
        print(f"  {name}: {chars:,} characters, {len(found[name])} shared window hashes "
              f"({time.time() - t0:.0f}s)", file=sys.stderr)
    return found


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/data", help="where the sets and heldout.json go")
    ap.add_argument("--cache", default="/tmp/tcache-heldout", help="download cache for the .deb files")
    ap.add_argument("--teacher", default="/work/shared/teacher", help="tokenizer that counts the tokens")
    ap.add_argument("--train", default="/work/shared/corpus/train.jsonl.xz", help="training text to avoid")
    ap.add_argument("--valid", default="/work/shared/corpus/valid.jsonl", help="held-out books to avoid too")
    ap.add_argument("--tokens", type=int, default=TARGET_TOKENS, help="teacher tokens per set")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.teacher)
    backend = tok.backend_tokenizer

    def count(text: str) -> int:
        return len(backend.encode(text, add_special_tokens=False).ids)

    t0 = time.time()
    raw: dict[str, list[tuple[str, str, str]]] = {}
    sources: dict[str, list[dict]] = {}
    licences: dict[str, str] = {}
    for set_name, spec in SETS.items():
        raw[set_name], sources[set_name] = [], []
        for pkg in spec["packages"]:
            deb = fetch(pkg, cache)
            version, pool, sha, size = PACKAGES[pkg]
            src = {"package": pkg, "version": version, "url": f"{MIRROR}/{pool}", "sha256": sha, "size": size,
                   "copyright": f"/usr/share/doc/{pkg}/copyright"}
            if set_name == "gnuinfo":
                files = deb_files(deb, lambda p: p.startswith("usr/share/info/") and ".info" in p)
                manuals: dict[str, dict[str, bytes]] = {}
                for p, b in files.items():
                    manuals.setdefault(re.sub(r"\.info(-\d+)?\.gz$", "", Path(p).name), {})[p] = b
                src["manuals"] = {}
                for man, mfiles in manuals.items():
                    notice, nodes, gfdl = info_manual(mfiles)
                    if gfdl and "GFDL" not in licences and pkg == "coreutils":
                        licences["GFDL"] = gfdl
                    src["manuals"][man] = {"files": {p: hashlib.sha256(b).hexdigest() for p, b in mfiles.items()},
                                           "notice": notice, "nodes": len(nodes)}
                    raw[set_name] += [(f"{man}:{name}", pkg, text) for name, text in nodes]
            elif set_name == "pydocs":
                root = "usr/share/doc/python3.11/html/"
                files = deb_files(deb, lambda p: p.startswith(root) and p.endswith(".html"))
                licences["PSF"] = "\n\n".join(blocks_text(html_blocks(files[root + page].decode("utf-8")))
                                               for page in ("copyright.html", "license.html"))
                docs = pydoc_documents(files, root)
                src["html_pages"] = len(files)
                src["files_sha256"] = hashlib.sha256("".join(
                    f"{hashlib.sha256(b).hexdigest()}  {p}\n" for p, b in files.items()).encode()).hexdigest()
                raw[set_name] += [(i, pkg, t) for i, t in docs]
            elif set_name == "foldoc":
                files = deb_files(deb, lambda p: p.startswith("usr/share/dictd/foldoc."))
                docs = foldoc_documents(files["usr/share/dictd/foldoc.index"],
                                        files["usr/share/dictd/foldoc.dict.dz"])
                src["files"] = {p: hashlib.sha256(b).hexdigest() for p, b in files.items()}
                raw[set_name] += [(i, pkg, t) for i, t in docs]
            sources[set_name].append(src)
        print(f"{set_name}: {len(raw[set_name])} candidate documents ({time.time() - t0:.0f}s)", file=sys.stderr)

    # Dedup with room to spare, drop what shares a window with the corpora, then cut to the budget.
    corpora = {"train": Path(args.train), "valid": Path(args.valid)}
    margin = 1.4
    while True:
        pools, stats = {}, {}
        for set_name in SETS:
            pools[set_name], stats[set_name] = dedup(set_name, raw[set_name], count, int(args.tokens * margin))
        print(f"overlap check against {', '.join(map(str, corpora.values()))}", file=sys.stderr)
        found = overlap(pools, corpora)
        table = sorted_unique(np.concatenate(list(found.values())))
        final, short = {}, False
        for set_name, docs in pools.items():
            kept, total, dropped = [], 0, []
            for d in docs:
                if total >= args.tokens:
                    break
                if in_sorted(window_hashes(d[2]), table).any():
                    dropped.append(d[0])
                    continue
                kept.append(d)
                total += d[3]
            stats[set_name]["shares_window_dropped"] = dropped
            short |= total < args.tokens
            final[set_name] = kept
        if not short:
            break
        margin *= 1.5
        print(f"a set came out short of {args.tokens} tokens; widening the pool ({margin:.2f}x)", file=sys.stderr)

    # The check itself, on what is written: no window of any kept document in either corpus.
    recheck = overlap(final, corpora)
    manifest = {
        "generator": "benchmarks/heldout.py",
        "debian": "12 (bookworm) main, " + MIRROR,
        "tokenizer": {"path": args.teacher,
                      "tokenizer.json sha256": sha256_file(Path(args.teacher) / "tokenizer.json"),
                      "counting": "tokens without special tokens, per document; tokens_with_eos adds the one EOS "
                                  "per document that tcache's packing appends"},
        "method": {"min_chars": MIN_CHARS, "duplicate_paragraph_min_chars": DUP_PARAGRAPH_CHARS,
                   "near_duplicate": f"more than {NEAR_DUP_FRACTION:.0%} of a document's word {SHINGLE_WORDS}-gram "
                                     "shingles in earlier kept documents",
                   "order": "sha256 of 'set:document id'", "max_section_chars": MAX_SECTION_CHARS,
                   "target_tokens": args.tokens},
        "overlap_check": {
            "window_chars": WINDOW,
            "normalisation": "NFKC, lower case, quotes and dashes unified, whitespace runs as one space",
            "hash": "64-bit polynomial hash of the window's code points",
            "corpora": {name: {"path": str(p), "sha256": sha256_file(p)} for name, p in corpora.items()},
            "documents_dropped": {s: len(stats[s]["shares_window_dropped"]) for s in SETS},
            "shared_windows_in_written_sets": {name: len(v) for name, v in recheck.items()},
        },
        "sets": {},
    }
    for set_name, docs in final.items():
        path = out / f"heldout-{set_name}.jsonl.xz"
        body = "".join(json.dumps({"text": d[2]}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
        path.write_bytes(lzma.compress(body, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9))
        per_source: dict[str, int] = {}
        for d in docs:
            per_source[d[1]] = per_source.get(d[1], 0) + 1
        st = stats[set_name]
        manifest["sets"][set_name] = {
            "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "jsonl_sha256": hashlib.sha256(body).hexdigest(), "bytes": path.stat().st_size,
            "kind": SETS[set_name]["kind"], "licence": SETS[set_name]["licence"],
            "documents": len(docs), "characters": sum(len(d[2]) for d in docs),
            "tokens": sum(d[3] for d in docs), "tokens_with_eos": sum(d[3] + 1 for d in docs),
            "documents_per_package": dict(sorted(per_source.items())),
            "pool": {"candidates": st["candidates"], "dropped_small": st["small"],
                     "dropped_near_duplicate": st["near_duplicate"],
                     "duplicate_paragraphs_dropped": st["paragraphs_dropped"],
                     "dropped_sharing_a_window": st["shares_window_dropped"]},
            "sources": sources[set_name],
            "document_ids": [d[0] for d in docs],
            "document_tokens": [d[3] for d in docs],
        }
        print(f"{set_name}: {len(docs)} documents, {manifest['sets'][set_name]['tokens']:,} tokens, "
              f"{manifest['sets'][set_name]['characters']:,} characters, {path.stat().st_size:,} bytes",
              file=sys.stderr)
    (out / "heldout.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    (out / "LICENSE-GFDL-1.3.txt").write_text(clean_text(licences["GFDL"]) + "\n")
    (out / "LICENSE-PSF.txt").write_text(licences["PSF"] + "\n")
    print(f"done in {time.time() - t0:.0f}s; shared windows in the written sets: "
          f"{manifest['overlap_check']['shared_windows_in_written_sets']}", file=sys.stderr)


if __name__ == "__main__":
    main()

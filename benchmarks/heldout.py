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
import gzip
import hashlib
import html.parser
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import time
import unicodedata
import urllib.request
from pathlib import Path

import numpy as np

MIRROR = "http://deb.debian.org/debian"
TARGET_TOKENS = 400_000
MIN_CHARS = 500
DUP_PARAGRAPH_CHARS = 40
SHINGLE_WORDS = 8
NEAR_DUP_FRACTION = 0.5
WINDOW = 50
MAX_SECTION_CHARS = 20_000

# name: (version, pool path, sha256, size) as in Debian 12 (bookworm) main's Packages index.
PACKAGES = {
    "coreutils": ("9.1-1", "pool/main/c/coreutils/coreutils_9.1-1_amd64.deb",
                  "61038f857e346e8500adf53a2a0a20859f4d3a3b51570cc876b153a2d51a3091", 2896560),
    "findutils": ("4.9.0-4", "pool/main/f/findutils/findutils_4.9.0-4_amd64.deb",
                  "5dd86bd0af4aa73f067dfd6b8339dd868f2dd84056aa79db29d1206d4fbc5e04", 635500),
    "diffutils": ("1:3.8-4", "pool/main/d/diffutils/diffutils_3.8-4_amd64.deb",
                  "8bdfedc14c1035e3750e9f055ac9c1ecd9b5d05d9e6dc6466c4e9237eef407dd", 351740),
    "grep": ("3.8-5", "pool/main/g/grep/grep_3.8-5_amd64.deb",
             "3264acea728df3c48a54f20e9291b965130e306b9d00adac76647049da7196df", 421444),
    "sed": ("4.9-1+deb12u1", "pool/main/s/sed/sed_4.9-1+deb12u1_amd64.deb",
            "fd557efeee8aae4619c2cb7f68aadccb804322ad4a99ab048aaae5901d253885", 329092),
    "gzip": ("1.12-1", "pool/main/g/gzip/gzip_1.12-1_amd64.deb",
             "eabec1dde2834f72540d7b93fc5df2625f52611c06d93d61f5cdb12480e0e6a3", 140364),
    "ed": ("1.19-1", "pool/main/e/ed/ed_1.19-1_amd64.deb",
           "eb009104f25267f6bddbf936afbfa2cb23b6c1685b2d4c60027c4513feb17745", 58056),
    "wget": ("1.21.3-1+deb12u1", "pool/main/w/wget/wget_1.21.3-1+deb12u1_amd64.deb",
             "b389052d1d8a8cacec4f0380d9ee54e8082bfbebe374299be95b5286c9380f80", 937340),
    "m4": ("1.4.19-3", "pool/main/m/m4/m4_1.4.19-3_amd64.deb",
           "b2dd7bfca426712416e651bb5ff6dabe7d05e4caebbac61d714dbe261b31e4c3", 286836),
    "automake": ("1:1.16.5-1.3", "pool/main/a/automake-1.16/automake_1.16.5-1.3_all.deb",
                 "f9a5758d87b5389bf2dbb00cc9c48e0cf59bb0ac842c5ce25d41e4bfa3f2f962", 822960),
    "autoconf-doc": ("2.71-3", "pool/main/a/autoconf/autoconf-doc_2.71-3_all.deb",
                     "99f1cc643908a46068dc17bcbd64dbdcdbdb8c3f67058ae20e8d6b6b26fa7731", 2908392),
    "gnu-standards": ("2022.03.23-0.1", "pool/main/g/gnu-standards/gnu-standards_2022.03.23-0.1_all.deb",
                      "2087dda531c69d8505856a45e0334746f3f25211a237c95d375eed13a7d8c201", 1428712),
    "bash-doc": ("5.2.15-2", "pool/main/b/bash/bash-doc_5.2.15-2_all.deb",
                 "2c1a353f7004d14ba81db19c253b958d2dd9582027650739c530fd50376a9d8b", 1962432),
    "units": ("2.22-2", "pool/main/u/units/units_2.22-2_amd64.deb",
              "6e7a5b80176819c8a13e6e539df03a9a3565300001d72048190c98e627208978", 266944),
    "libtool-doc": ("2.4.7-7~deb12u1", "pool/main/libt/libtool/libtool-doc_2.4.7-7~deb12u1_all.deb",
                    "1caf319d637d91150f4f74123433e028eaeabd5ac09002a4ffb8761c54f0b43d", 591800),
    "sharutils": ("1:4.15.2-9", "pool/main/s/sharutils/sharutils_4.15.2-9_amd64.deb",
                  "381cf504e10105283b76789bd6ec02fa96e65914993d60f6187fb67efe6e0698", 261760),
    "parted-doc": ("3.5-3", "pool/main/p/parted/parted-doc_3.5-3_all.deb",
                   "4cafe270c47f5157af21e185fb58b11ddbf6d190fb97148c4b0ecd3db27d92f8", 226460),
    "time": ("1.9-0.2", "pool/main/t/time/time_1.9-0.2_amd64.deb",
             "10257c6fe888e6578550b1f20705d282dd630b76f8df0c006aec3031fefe5e23", 50776),
    "dc": ("1.07.1-3+b1", "pool/main/b/bc/dc_1.07.1-3+b1_amd64.deb",
           "4440b6964af7911a7994d9d863ae0f74efe5b354aad0753b3ea96a6d25555b2f", 72384),
    "mtools": ("4.0.33-1+really4.0.32-1", "pool/main/m/mtools/mtools_4.0.33-1+really4.0.32-1_amd64.deb",
               "972e0857ff43dbfc4c9255844c97b5d2cb0287720216d04c95b4e7fa483aec99", 201972),
    "python3.11-doc": ("3.11.2-6+deb12u8", "pool/main/p/python3.11/python3.11-doc_3.11.2-6+deb12u8_all.deb",
                       "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b", 12642400),
    "dict-foldoc": ("20230119-1", "pool/main/d/dict-foldoc/dict-foldoc_20230119-1_all.deb",
                    "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3", 2408824),
}

GNUINFO_PACKAGES = ["coreutils", "findutils", "diffutils", "grep", "sed", "gzip", "ed", "wget", "m4",
                    "automake", "autoconf-doc", "gnu-standards", "bash-doc", "units", "libtool-doc",
                    "sharutils", "parted-doc", "time", "dc", "mtools"]

SETS = {
    "gnuinfo": {
        "kind": "software reference manuals (GNU info): explanatory prose, option tables, command lines, short "
                "examples",
        "packages": GNUINFO_PACKAGES,
        "licence": "GNU Free Documentation License 1.3 or later (dc: 1.2 or later), no Invariant Sections, no "
                   "Front- or Back-Cover Texts; copyright Free Software Foundation and the manuals' authors",
    },
    "pydocs": {
        "kind": "programming documentation (the Python 3.11 manual): tutorial, HOWTOs, library and language "
                "reference, FAQs, C API; prose with code blocks",
        "packages": ["python3.11-doc"],
        "licence": "Python Software Foundation License Version 2 (code examples also Zero-Clause BSD); "
                   "copyright 2001-2023 Python Software Foundation",
    },
    "foldoc": {
        "kind": "encyclopaedia-like dictionary articles on computing: concepts, languages, history, people, "
                "companies, standards",
        "packages": ["dict-foldoc"],
        "licence": "GNU Free Documentation License 1.1 or later, no Invariant Sections, no Front- or Back-Cover "
                   "Texts; copyright Denis Howe (editor) and contributors",
    },
}


# ---------------------------------------------------------------------------------------------- sources

def fetch(name: str, cache: Path) -> Path:
    """The pinned .deb of package `name` in `cache`, downloaded from the Debian mirror when absent."""
    version, pool, sha, size = PACKAGES[name]
    path = cache / Path(pool).name
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        try:
            with urllib.request.urlopen(f"{MIRROR}/{pool}", timeout=120) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except OSError as e:  # the mirror by plain HTTP failed: ask apt, which may sit behind a proxy
            print(f"  {MIRROR}/{pool}: {e}; trying apt-get download", file=sys.stderr)
            subprocess.run(["apt-get", "download", "-q", f"{name}={version}"], cwd=cache, check=True)
            got = sorted(cache.glob(f"{name}_*.deb"))
            if path not in got:
                sys.exit(f"apt-get download {name}={version} did not give {path.name}")
        else:
            tmp.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha:
        sys.exit(f"{path}: sha256 {digest} is not the pinned {sha} ({name} {version}); delete it or put "
                 f"the pinned file there (snapshot.debian.org keeps every version)")
    return path


def deb_files(path: Path, keep) -> dict[str, bytes]:
    """{path inside the package: bytes} of the regular files of a .deb's data archive with keep(path)."""
    raw = path.read_bytes()
    assert raw[:8] == b"!<arch>\n", path
    pos, data = 8, None
    while pos < len(raw):
        head = raw[pos:pos + 60]
        member, size = head[:16].decode().strip().rstrip("/"), int(head[48:58])
        if member.startswith("data.tar"):
            data = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    if data is None:
        sys.exit(f"{path}: no data.tar member")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar:
            name = m.name.lstrip("./")
            if m.isfile() and keep(name):
                out[name] = tar.extractfile(m).read()
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------- text

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")
_BULLET = re.compile(r"(\* |• |- |\d+\. |\(\d+\) |[a-z]\. )")
_CODE_END = ("\\", "{", ";", "&&", "||", "(")
_CODEY = re.compile(r"[;{}=$<>|\\]|^\S+\(|^[-‘'\"]")


def clean_text(s: str) -> str:
    """NFC, no control characters, no trailing spaces, at most one blank line between paragraphs."""
    s = unicodedata.normalize("NFC", s).replace("\xa0", " ")
    s = _CONTROL.sub("", s.replace("\r\n", "\n").replace("\r", "\n"))
    s = "\n".join(ln.rstrip() for ln in s.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", s).strip("\n")


def _looks_like_sentence(t: str) -> bool:
    return len(t.split()) >= 5 and t[-1:] in ".:;!?)" and not _CODEY.search(t)


def reflow(block: list[str], width: int) -> list[str]:
    """Paragraphs of one blank-line-separated block of filled text: a line joins the previous one when the
    previous line was full (this line's first word would not have fitted on it) and the indentation
    continues it (same indent, a paragraph's first-line indent, or a list item's hanging indent). Runs of
    lines that do not join (code, tables, option lists) stay as lines, dedented."""
    runs: list[list] = []  # [indents a continuation line may have, [raw lines]]
    for raw in block:
        ind = len(raw) - len(raw.lstrip(" "))
        text = raw.strip()
        if runs:
            cont, lines = runs[-1]
            prev = lines[-1].rstrip()
            full = len(prev) + 2 + len(text.split(" ", 1)[0]) > width and not prev.endswith(_CODE_END)
            ok = ind in cont if len(lines) == 1 else ind == cont[0]
            if full and ok:
                runs[-1][0] = (ind,)
                lines.append(raw)
                continue
        m = _BULLET.match(text)
        # a second line may keep the indent, drop a paragraph's 3-space first-line indent, or hang under a
        # list item's text (a bullet, a number, or the first word of a two-column table row)
        cont = {ind, ind - 3} | ({ind + len(m.group(0))} if m else set()) | set(range(ind + 2, ind + 9))
        runs.append([cont, [raw]])
    out, group = [], []

    def flush_group():
        if group:
            cut = min(len(g) - len(g.lstrip(" ")) for g in group)
            out.append("\n".join(g[cut:].rstrip() for g in group))
            group.clear()

    for _, lines in runs:
        if len(lines) > 1 or _looks_like_sentence(lines[0].strip()):
            flush_group()
            out.append(re.sub(r"\s+", " ", " ".join(ln.strip() for ln in lines)))
        else:
            group.append(lines[0])
    flush_group()
    return out


def blocks_of(lines: list[str]) -> list[list[str]]:
    blocks, cur = [], []
    for ln in lines:
        if ln.strip():
            cur.append(ln)
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


# ---------------------------------------------------------------------------------------------- GNU info

_XREF = re.compile(r"(\(?)\*([Nn])ote[ \n]+((?:\([^)\s]*\))?[^:*]+?)(?:::|:[ \n]+(?:\([^)\s]*\))?[^.,*:]*?([.,]))",
                   re.S)
_UNDERLINE = re.compile(r"^[*=\-.]+$")
_SKIP_NODE = re.compile(r"index|licen[cs]e|copying|\bfdl\b|\bgpl\b|^top$|history of |^(concept|option|command)s? ",
                        re.I)


def _xref(m: re.Match) -> str:
    paren, n, label, punct = m.groups()
    label = re.sub(r"\s+", " ", re.sub(r"^\([^)]*\)", "", label)).strip()
    see = "See " if n == "N" else ("see " if paren else "")
    return f"{paren}{see}{label}{punct or ''}"


def info_manual(files: dict[str, bytes]) -> tuple[str, list[tuple[str, str]], str | None]:
    """(permission notice, [(node name, text)], GFDL text) of one info manual given as its .info[-N].gz
    files."""
    def part(p):
        m = re.search(r"\.info-(\d+)\.gz$", p)
        return int(m.group(1)) if m else 0
    raw = "".join(gzip.decompress(files[p]).decode("utf-8") for p in sorted(files, key=part))
    chunks = raw.split("\x1f")
    notice = ""
    m = re.search(r"(Permission is granted.*?)(?:\n\n|\nINFO-DIR|$)", chunks[0], re.S)
    if m:
        notice = re.sub(r"\s+", " ", m.group(1)).strip()
    nodes, gfdl = [], None
    for chunk in chunks[1:]:
        chunk = chunk.lstrip("\n")
        head, _, body = chunk.partition("\n")
        m = re.search(r"Node: ([^,\n]+)", head)
        if not head.startswith("File:") or not m:
            continue  # Tag Table, Indirect, End Tag Table
        name = m.group(1).strip()
        if re.search(r"free documentation license|\bfdl\b", name, re.I) and gfdl is None:
            gfdl = body
        if _SKIP_NODE.search(name) or "Permission is granted to" in body:
            continue
        nodes.append((name, info_node_text(body)))
    return notice, nodes, gfdl


def info_node_text(body: str) -> str:
    lines = body.split("\n")
    for i, ln in enumerate(lines):
        if ln.startswith("* Menu:"):
            rest = lines[i:]
            foot = next((j for j, r in enumerate(rest) if re.match(r"^\s*-{5,} Footnotes -{5,}\s*$", r)), None)
            lines = lines[:i] + (rest[foot:] if foot is not None else [])
            break
    lines = [ln for ln in lines if not re.match(r"^\s*-{5,} Footnotes -{5,}\s*$", ln)
             and not re.match(r"^\s*\[image src=", ln)]
    paras: list[str] = []
    body_lines: list[str] = []

    def flush():
        for b in blocks_of(body_lines):
            paras.extend(reflow(b, 72))
        body_lines.clear()

    i = 0
    while i < len(lines):
        ln = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if ln.strip() and _UNDERLINE.match(nxt.strip()) and len(nxt.strip()) == len(ln.strip()):
            flush()
            paras.append(ln.strip())
            i += 2
            continue
        body_lines.append(ln)
        i += 1
    flush()
    text = "\n\n".join(paras)
    return _XREF.sub(_xref, text)


# ---------------------------------------------------------------------------------------------- HTML

_VOID = {"br", "img", "hr", "input", "meta", "link", "wbr", "col", "area", "base", "source"}
_BLOCK = {"p", "li", "dt", "dd", "blockquote", "div", "section", "ul", "ol", "dl", "table", "figure",
          "figcaption", "caption", "pre", "tr", "thead", "tbody", "h1", "h2", "h3", "h4", "h5", "h6", "article"}
_SKIP_CLASS = {"headerlink", "toctree-wrapper", "contents", "sphinxsidebar", "related", "footer", "linenos",
               "mobile-nav", "copybutton"}


class SphinxText(html.parser.HTMLParser):
    """The main body of a Sphinx HTML page as blocks: ("h", level, text), ("p", 0, text), ("pre", 0, text),
    ("row", 0, cells joined by tabs)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skip, main)
        self.blocks: list[tuple[str, int, str]] = []
        self.buf: list[str] = []
        self.pre = 0
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.heading = 0

    def _skip(self):
        return bool(self.stack) and self.stack[-1][1]

    def _main(self):
        return bool(self.stack) and self.stack[-1][2]

    def flush(self):
        text = "".join(self.buf)
        self.buf = []
        if self.pre:
            return
        text = re.sub(r"\s+", " ", text).strip()
        if text:
            self.blocks.append(("h", self.heading, text) if self.heading else ("p", 0, text))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = self._skip() or tag in ("script", "style", "nav", "form") or bool(classes & _SKIP_CLASS) \
            or (tag == "a" and "headerlink" in classes)
        main = self._main() or (tag == "div" and a.get("role") == "main")
        if tag in _VOID:
            if tag == "br" and main and not skip:
                (self.cell if self.cell is not None else self.buf).append("\n" if self.pre else " ")
            return
        if main and not skip:
            if tag in ("td", "th") and self.row is not None:
                self.cell = []
            elif tag == "tr":
                self.flush()
                self.row = []
            elif self.row is not None:
                (self.cell if self.cell is not None else self.buf).append(" ")
            elif tag == "pre":
                self.flush()
                self.pre += 1
            elif tag in _BLOCK and not self.pre:
                self.flush()
                if re.fullmatch(r"h[1-6]", tag):
                    self.heading = int(tag[1])
        self.stack.append((tag, skip, main))

    def handle_endtag(self, tag):
        if tag in _VOID or not any(t == tag for t, _, _ in self.stack):
            return
        while self.stack:
            t, skip, main = self.stack.pop()
            if main and not skip:
                self._close(t)
            if t == tag:
                break

    def _close(self, tag):
        if tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.append(re.sub(r"\s+", " ", "".join(self.cell)).strip())
            self.cell = None
        elif tag == "tr" and self.row is not None:
            if any(self.row):
                self.blocks.append(("row", 0, "\t".join(self.row)))
            self.row = None
        elif tag == "pre" and self.pre:
            text = "".join(self.buf)
            self.buf = []
            self.pre -= 1
            lines = [ln.rstrip() for ln in text.split("\n")]
            while lines and not lines[0]:
                lines.pop(0)
            while lines and not lines[-1]:
                lines.pop()
            if lines:
                self.blocks.append(("pre", 0, "\n".join(lines)))
        elif tag in _BLOCK and not self.pre and self.row is None:
            self.flush()
            if re.fullmatch(r"h[1-6]", tag):
                self.heading = 0

    def handle_data(self, data):
        if self._main() and not self._skip():
            (self.cell if self.cell is not None else self.buf).append(data)


def html_blocks(raw: str) -> list[tuple[str, int, str]]:
    p = SphinxText()
    p.feed(raw)
    p.close()
    return [(k, lv, t.replace("¶", "").strip() if k != "pre" else t) for k, lv, t in p.blocks]


def blocks_text(blocks) -> str:
    paras: list[str] = []
    prev = None
    for kind, _, text in blocks:
        if kind == "row" and prev == "row":
            paras[-1] += "\n" + text
        elif text:
            paras.append(text)
        prev = kind
    return "\n\n".join(paras)


def split_sections(blocks, level: int = 2) -> list[list]:
    """Blocks cut before every heading of `level` or above; parts over MAX_SECTION_CHARS cut again one level
    deeper (to h4)."""
    parts: list[list] = [[]]
    for b in blocks:
        if b[0] == "h" and b[1] <= level and parts[-1]:
            parts.append([])
        parts[-1].append(b)
    out = []
    for part in parts:
        if level < 4 and len(blocks_text(part)) > MAX_SECTION_CHARS:
            out.extend(split_sections(part, level + 1))
        else:
            out.append(part)
    return out


_PYDOC_SKIP = re.compile(r"^(genindex(-\w+)?|py-modindex|search|contents|index|copyright|license|bugs|about|download)"
                         r"\.html$|^whatsnew/changelog\.html$|^(_[a-z]+|includes)/")


def pydoc_documents(files: dict[str, bytes], root: str) -> list[tuple[str, str]]:
    docs = []
    for path, raw in files.items():
        rel = path[len(root):]
        if _PYDOC_SKIP.search(rel):
            continue
        for i, part in enumerate(split_sections(html_blocks(raw.decode("utf-8")))):
            docs.append((f"{rel}#{i}", blocks_text(part)))
    return docs


# ---------------------------------------------------------------------------------------------- FOLDOC

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64.index(c)
    return v


def foldoc_documents(index: bytes, dictz: bytes) -> list[tuple[str, str]]:
    data = gzip.decompress(dictz)
    spans = {}
    for ln in index.decode("utf-8").splitlines():
        word, off, length = ln.split("\t")
        spans.setdefault((_b64(off), _b64(length)), word)
    docs = []
    for (off, length), word in sorted(spans.items()):
        if word.startswith("00-database") or word.startswith("00database"):
            continue
        entry = data[off:off + length].decode("utf-8")
        if "Jargon File" in entry:
            continue  # the Jargon File is also a Project Gutenberg e-text
        lines = entry.split("\n")
        head = []
        while lines and lines[0].strip():
            head.append(lines.pop(0).strip())
        paras = [head[0]] if head else []
        for b in blocks_of(lines):
            # dictfmt's line breaks do not follow the text as printed ({links} and URLs were removed after
            # filling), so a block at one indent is one paragraph; deeper-indented blocks are examples
            indents = {len(ln) - len(ln.lstrip(" ")) for ln in b}
            one = [re.sub(r"\s+", " ", " ".join(ln.strip() for ln in b))] if len(indents) == 1 else None
            for p in one or reflow(b, 65):
                if re.fullmatch(r"\(\d{4}-\d{2}-\d{2}\)", p.strip()):
                    continue
                p = re.sub(r"^((?:\d+\. )?)<[^<>\n]{1,60}>\s*", r"\1", p)
                paras.append(p.replace("{", "").replace("}", ""))
        docs.append((f"{off}:{word}", "\n\n".join(paras)))
    return docs


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

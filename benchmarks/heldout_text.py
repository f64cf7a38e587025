"""The held-out sets' documents as plain text: GNU info nodes, the Python manual's HTML sections and FOLDOC entries,
cleaned and reflowed (benchmarks/heldout.py's step 2; its docstring has the rules)."""

from __future__ import annotations

import gzip
import html.parser
import re
import unicodedata

MAX_SECTION_CHARS = 20_000



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

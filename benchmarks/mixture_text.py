"""The training mixture's sources as plain-text documents: the pinned Debian packages, POD (Perl's
documentation), DocBook HTML (the Debian handbook, reference and FAQ), fortune files and WordNet's glosses
(benchmarks/mixture.py builds the mixture from them; its docstring has the rules)."""

from __future__ import annotations

import hashlib
import html.entities
import re
import sys
import urllib.request
from pathlib import Path

from heldout_debian import MIRROR
from heldout_text import MAX_SECTION_CHARS, SphinxText, blocks_text, clean_text, reflow, split_sections

# name: (version, pool path, sha256, size) as in Debian 12 (bookworm) main's Packages index. None of them is a
# held-out set's package (benchmarks/heldout_debian.py), and none is Python documentation.
PACKAGES = {
    "perl-doc": ("5.36.0-7+deb12u3", "pool/main/p/perl/perl-doc_5.36.0-7+deb12u3_all.deb",
                 "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591", 7909200),
    "debian-handbook": ("11.20220922", "pool/main/d/debian-handbook/debian-handbook_11.20220922_all.deb",
                        "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa", 34758056),
    "debian-reference-en": ("2.100", "pool/main/d/debian-reference/debian-reference-en_2.100_all.deb",
                            "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f", 1704872),
    "debian-faq": ("11.1", "pool/main/d/debian-faq/debian-faq_11.1_all.deb",
                   "427426e0cfa6888622fc1d72631071cb4b5a1f86ccde722e7820bcef284de5d0", 499508),
    "fortunes": ("1:1.99.1-7.3", "pool/main/f/fortune-mod/fortunes_1.99.1-7.3_all.deb",
                 "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5", 848988),
    "wordnet-base": ("1:3.0-37", "pool/main/w/wordnet/wordnet-base_3.0-37_all.deb",
                     "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752", 6467132),
}


def fetch(name: str, cache: Path) -> Path:
    """The pinned .deb of `name` in `cache`, downloaded when absent; its size and sha256 are checked (as
    heldout_debian.fetch does for the held-out sets' packages)."""
    version, pool, sha, size = PACKAGES[name]
    path = cache / Path(pool).name
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        with urllib.request.urlopen(f"{MIRROR}/{pool}", timeout=120) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        tmp.replace(path)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha or len(raw) != size:
        sys.exit(f"{path}: sha256 {digest}, {len(raw)} bytes, is not the pinned {sha}, {size} bytes ({name} "
                 f"{version}); delete it or put the pinned file there (snapshot.debian.org keeps every version)")
    return path


def chunks(blocks: list, limit: int = MAX_SECTION_CHARS) -> list[list]:
    """Blocks cut at block boundaries into parts of at most about `limit` characters."""
    parts, size = [[]], 0
    for b in blocks:
        if parts[-1] and size + len(b[2]) > limit:
            parts.append([])
            size = 0
        parts[-1].append(b)
        size += len(b[2]) + 2
    return parts


def sections(blocks: list, level: int) -> list[str]:
    """Texts of `blocks` cut at headings of `level` (deeper while over MAX_SECTION_CHARS), then at block
    boundaries."""
    return [blocks_text(c) for part in split_sections(blocks, level) for c in chunks(part)]


# ---------------------------------------------------------------------------------------------- POD
# Perl's documentation is POD (perlpodspec). Perl's own converter, Pod::Text, is Perl and has no Python port;
# the pod2text a build machine may have depends on the Pod::Text version installed there and wraps to its own
# width. This small converter follows perlpodspec and gives the same text on any machine with Python.

_CODE = re.compile(r"([A-Z])(<+)")
_POD_SKIP_FILES = re.compile(r"^perl(toc|gpl|artistic|cn|jp|ko|tw|uniprops|hist)\.pod$")
_POD_SKIP_HEADS = re.compile(r"^(acknowledg[e]?ments?|reporting bugs|give thanks|see also|authors?|copyright|"
                             r"licen[cs]e|author and copyright|copyright and licen[cs]e|maintainers?)$", re.I)


def _entity(name: str) -> str:
    named = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}
    if name in named:
        return named[name]
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", name):
            return chr(int(name, 16))
        if re.fullmatch(r"0[0-7]+", name):
            return chr(int(name, 8))
        if name.isdigit():
            return chr(int(name))
    except (ValueError, OverflowError):
        return ""
    return chr(html.entities.name2codepoint[name]) if name in html.entities.name2codepoint else ""


def _codes(s: str, i: int = 0, close: str = "") -> tuple[str, int]:
    """Render formatting codes in s from i up to `close` (">", or whitespace then ">>..." for the multi-bracket
    form; "" for the end of s); returns (text, index after the closer)."""
    out = []
    while i < len(s):
        if close == ">" and s[i] == ">":
            return "".join(out), i + 1
        if len(close) > 1:
            m = re.compile(r"\s+" + close[1:]).match(s, i)
            if m:
                return "".join(out), m.end()
        m = _CODE.match(s, i)
        if m:
            n = len(m.group(2))
            j = m.end()
            if n > 1 and j < len(s) and s[j].isspace():
                start = j
                while start < len(s) and s[start].isspace():
                    start += 1
                inner, i = _codes(s, start, " " + ">" * n)
                raw = s[start:re.compile(r"\s+" + ">" * n).search(s, start).start()] if m.group(1) == "L" else ""
            else:  # single brackets (a run of "<"s without the space is read as one "<" and literal "<"s)
                j = m.start(2) + 1
                inner, i = _codes(s, j, ">")
                raw = s[j:i - 1] if s[i - 1:i] == ">" else s[j:i]
            out.append(_render(m.group(1), inner, raw))
            continue
        out.append(s[i])
        i += 1
    return "".join(out), i


def _render(code: str, inner: str, raw: str) -> str:
    if code in "XZ":
        return ""
    if code == "E":
        return _entity(inner.strip())
    if code != "L":
        return inner  # I, B, C, F, S: the words without their emphasis, code font, file name or no-break space
    # L<text|target>, L<name/"section">, L</section>, L<name>, L<scheme:...>: what Pod::Text shows of it
    depth, bar = 0, -1
    for k, c in enumerate(raw):
        depth += c == "<"
        depth -= c == ">" and depth > 0
        if c == "|" and depth == 0:
            bar = k
            break
    if bar >= 0:
        return _codes(raw[:bar])[0]
    text = _codes(raw)[0]
    if re.match(r"\w+:[^:\s]\S*$", text):
        return text
    if "/" in text and not text.startswith('"'):
        name, sec = text.split("/", 1)
    elif text.startswith('"') or " " in text:  # L<"section">, and the old L<section with spaces>
        name, sec = "", text
    else:
        return text  # L<name>: a manual page
    sec = sec.strip('"')
    return f'"{sec}" in {name}' if name else f'"{sec}"'


def pod_blocks(text: str) -> list[tuple[str, int, str]]:
    """POD as blocks ("h", level, text) / ("p", 0, text) / ("pre", 0, text) (heldout_text's block kinds):
    headings, ordinary paragraphs with formatting codes rendered as plain text and lines joined, verbatim
    paragraphs dedented. List items become "* " / "N. " / their term as a paragraph; =begin/=for regions of other
    formats than text, and everything outside POD (=cut to the next command), are dropped."""
    paras, cur, in_pod = [], [], False
    for ln in text.expandtabs(8).split("\n"):
        if not in_pod and re.match(r"=[a-zA-Z]", ln):
            in_pod = True
        if not in_pod:
            continue
        if ln.strip():
            cur.append(ln)
            continue
        if cur:
            paras.append(cur)
            cur = []
        if paras and re.match(r"=cut\b", paras[-1][0]):
            in_pod = False
    if cur:
        paras.append(cur)
    blocks, skip_until, bullet = [], None, ""
    for lines in paras:
        first = lines[0]
        cmd = re.match(r"=([a-zA-Z]\w*)\s*", first)
        if skip_until:
            if cmd and cmd.group(1) == "end" and first[cmd.end():].split()[:1] == [skip_until]:
                skip_until = None
            continue
        if cmd:
            name, rest = cmd.group(1), re.sub(r"\s+", " ", " ".join([first[cmd.end():]] + lines[1:])).strip()
            fmt = rest.split(" ", 1)[0] if rest else ""
            if re.fullmatch(r"head[1-6]", name):
                blocks.append(("h", int(name[4]), _codes(rest)[0].strip()))
            elif name == "item":
                m = re.match(r"(\*|\d+\.?)(?:\s+|$)", rest)
                if m:
                    marker = "* " if m.group(1) == "*" else m.group(1).rstrip(".") + ". "
                    if rest[m.end():]:
                        blocks.append(("p", 0, marker + _codes(rest[m.end():])[0].strip()))
                    else:
                        bullet = marker
                elif rest:
                    blocks.append(("p", 0, re.sub(r"\s+", " ", _codes(rest)[0]).strip()))
            elif name == "begin":
                if fmt.lstrip(":") != "text":
                    skip_until = fmt
            elif name == "for" and fmt.lstrip(":") == "text":
                blocks.append(("pre", 0, rest.split(" ", 1)[1] if " " in rest else ""))
            continue
        if lines[0][:1] in " \t":
            cut = min(len(ln) - len(ln.lstrip(" ")) for ln in lines)
            if bullet:
                blocks.append(("p", 0, bullet.strip()))
                bullet = ""
            blocks.append(("pre", 0, "\n".join(ln[cut:].rstrip() for ln in lines)))
        else:
            blocks.append(("p", 0, bullet + re.sub(r"\s+", " ", _codes(" ".join(lines))[0]).strip()))
            bullet = ""
    return [b for b in blocks if b[2]]


def pod_text(text: str) -> str:
    return clean_text(blocks_text(pod_blocks(text)))


def pod_documents(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """One document per =head1 section of each .pod (cut deeper while over MAX_SECTION_CHARS), without the
    table of contents, licences, translations' pages, the Unicode property tables, the release history and
    sections of acknowledgements, bug reporting, authors, copyright and cross-references."""
    docs = []
    for path, raw in files.items():
        name = Path(path).name
        if _POD_SKIP_FILES.match(name):
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")  # perlpodspec: a document without =encoding that is not UTF-8
        blocks = pod_blocks(text)
        for i, part in enumerate(split_sections(blocks, 1)):
            if part and part[0][0] == "h" and _POD_SKIP_HEADS.match(part[0][2]):
                continue
            for j, c in enumerate(chunks(part)):
                docs.append((f"{name}#{i}.{j}", blocks_text(c)))
    return docs


# ---------------------------------------------------------------------------------------------- DocBook HTML

_DOCBOOK_SKIP = {"navheader", "navfooter", "docnav", "toc", "list-of-tables", "list-of-figures", "list-of-examples",
                 "indexterm", "legalnotice", "revhistory"}


class DocBookText(SphinxText):
    """A DocBook XSL or Publican page's body as heldout_text's blocks: the page furniture (navigation bars, tables
    of contents, index terms, the handbook's banner and logo line) is mapped onto what SphinxText already skips,
    and <body> is the main part."""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            tag, attrs = "div", [("role", "main")]
        elif set((a.get("class") or "").split()) & _DOCBOOK_SKIP or a.get("id") in ("banner", "title"):
            attrs = [(k, v) for k, v in attrs if k != "class"] + [("class", "headerlink")]
        super().handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        super().handle_endtag("div" if tag == "body" else tag)


def docbook_documents(files: dict[str, bytes], root: str) -> list[tuple[str, str]]:
    """One document per h2 section of each page (cut deeper while over MAX_SECTION_CHARS); index pages (the
    tables of contents) are left out."""
    docs = []
    for path, raw in files.items():
        rel = path[len(root):]
        if re.match(r"index(\.\w+)?\.html$", rel):
            continue
        p = DocBookText()
        p.feed(raw.decode("utf-8"))
        p.close()
        for i, t in enumerate(sections(p.blocks, 2)):
            docs.append((f"{rel}#{i}", t))
    return docs


# ---------------------------------------------------------------------------------------------- fortunes, WordNet

FORTUNE_SKIP = {"ascii-art"}  # pictures, not text; Debian ships the offensive fortunes apart (fortunes-off)


def fortunes(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """(id, text) of every fortune, file by file (sorted by name) in file order: overstrikes removed, lines
    dedented and filled prose rejoined (heldout_text.reflow, 70 columns), so poems keep their lines."""
    out = []
    for path, raw in files.items():
        name = Path(path).name
        if name in FORTUNE_SKIP:
            continue
        text = re.sub(".\x08", "", raw.decode("utf-8"))
        for k, f in enumerate(re.split(r"\n%\n", text.strip("\n%") + "\n")):
            paras = []
            for block in re.split(r"\n\s*\n", f.strip("\n")):
                lines = [ln.strip() for ln in block.split("\n") if ln.strip()]
                if lines:
                    paras.append("\n".join(reflow(lines, 70)))
            t = clean_text("\n\n".join(paras))
            if t:
                out.append((f"{name}:{k}", t))
    return out


def fortune_documents(files: dict[str, bytes], min_chars: int) -> list[tuple[str, str]]:
    """Consecutive fortunes of one file joined (blank line between) until a document has `min_chars`."""
    docs, cur = [], []
    for fid, t in fortunes(files) + [("", "")]:
        if cur and (not fid or fid.split(":")[0] != cur[0][0].split(":")[0]):
            docs.append((f"{cur[0][0]}+{len(cur)}", "\n\n".join(x[1] for x in cur)))
            cur = []
        if fid:
            cur.append((fid, t))
            if sum(len(x[1]) + 2 for x in cur) >= min_chars:
                docs.append((f"{cur[0][0]}+{len(cur)}", "\n\n".join(x[1] for x in cur)))
                cur = []
    return docs


def wordnet_documents(files: dict[str, bytes], per_doc: int = 20) -> list[tuple[str, str]]:
    """WordNet's synsets as "word, synonym: gloss; examples" lines (data.noun, .verb, .adj, .adv, in file order),
    `per_doc` to a document; the licence header lines are left out."""
    docs = []
    for pos in ("noun", "verb", "adj", "adv"):
        lines = []
        for ln in files[f"usr/share/wordnet/data.{pos}"].decode("utf-8").split("\n"):
            if not ln or ln.startswith(" ") or "|" not in ln:
                continue
            head, gloss = ln.split("|", 1)
            f = head.split()
            words = [re.sub(r"\([a-z]+\)$", "", f[4 + 2 * k]).replace("_", " ") for k in range(int(f[3], 16))]
            lines.append((f[0], f"{', '.join(dict.fromkeys(words))}: {gloss.strip()}"))
        for k in range(0, len(lines), per_doc):
            group = lines[k:k + per_doc]
            docs.append((f"{pos}:{group[0][0]}", "\n".join(t for _, t in group)))
    return docs

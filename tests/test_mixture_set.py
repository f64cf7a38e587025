"""The committed training mixture of non-book text (benchmarks/mixture.py, benchmarks/data/train-mix.jsonl.xz):
the manifest matches the file, no 50-character window is shared with a held-out set or valid.jsonl (checked here
with plain strings, independently of the script's hashes, on a sample of the mixture), the POD converter renders
POD as perlpodspec says. No network. (`tcache build` reading .jsonl.xz files is held by the tests that build from
the shared corpus; quality.py --smoke --runs hybrid-mix builds from this file.)"""

from __future__ import annotations

import hashlib
import json
import lzma
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
MIX = DATA / "train-mix.jsonl.xz"
MANIFEST = json.loads((DATA / "train-mix.json").read_text(encoding="utf-8"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import mixture_text  # noqa: E402

WINDOW = 50
SAMPLE_EVERY = 5  # every 5th mixture document (by position) has its windows checked: about 1.4M windows


@pytest.fixture(scope="module")
def records() -> list[dict]:
    raw = lzma.decompress(MIX.read_bytes()).decode("utf-8")  # strict UTF-8
    assert raw.endswith("\n")
    return [json.loads(line) for line in raw.split("\n")[:-1]]


_UNIFY = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "`": "'", "“": '"', "”": '"', "„": '"',
                        "«": '"', "»": '"', "–": "-", "—": "-", "‐": "-", "‑": "-", "−": "-"})


def norm(s: str) -> str:
    """The overlap check's normal form, written out again here: NFKC, lower case, one quote and one dash,
    whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", s).lower().translate(_UNIFY).split())


def windows(s: str) -> set[str]:
    s = norm(s)
    return {s[i:i + WINDOW] for i in range(len(s) - WINDOW + 1)}


def first_shared(table: set[str], texts) -> str | None:
    for t in texts:
        s = norm(t)
        for i in range(len(s) - WINDOW + 1):
            if s[i:i + WINDOW] in table:
                return s[i:i + WINDOW]
    return None


def reference_texts(valid_jsonl: Path):
    for name in ("gnuinfo", "pydocs", "foldoc"):
        with lzma.open(DATA / f"heldout-{name}.jsonl.xz", "rt", encoding="utf-8") as f:
            yield from (json.loads(line)["text"] for line in f)
    with open(valid_jsonl, encoding="utf-8") as f:
        yield from (json.loads(line)["text"] for line in f if line.strip())


def test_manifest_matches_the_file(records):
    assert hashlib.sha256(MIX.read_bytes()).hexdigest() == MANIFEST["sha256"]
    assert MIX.stat().st_size == MANIFEST["bytes"] < 6_000_000
    assert len(records) == MANIFEST["documents"]
    assert all(list(r) == ["text", "source", "id"] for r in records)
    assert len({r["id"] for r in records}) == len(records) and len({r["text"] for r in records}) == len(records)
    assert min(len(r["text"]) for r in records) >= 500
    sources = MANIFEST["sources"]
    for pkg, meta in sources.items():
        texts = [r["text"] for r in records if r["source"] == pkg]
        assert len(texts) == meta["documents"] and sum(map(len, texts)) == meta["characters"], pkg
        assert meta["tokens"] <= MANIFEST["per_source_cap"], pkg
        assert len(meta["sha256"]) == 64 and meta["version"] and meta["licence"], pkg
    assert sum(m["tokens"] for m in sources.values()) == MANIFEST["tokens"]
    assert set(sources) == set(mixture_text.PACKAGES)
    # disjoint from the held-out sets' packages
    from heldout_debian import PACKAGES as HELDOUT

    assert not set(sources) & set(HELDOUT)
    assert set(MANIFEST["overlap_check"]["shared_windows_in_written_set"].values()) == {0}
    # mixed: every source among the first 200 documents
    assert {r["source"] for r in records[:200]} == set(sources)


def test_token_counts_of_one_source(records, teacher_dir):
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(teacher_dir / "tokenizer.json"))  # what AutoTokenizer's fast backend loads
    texts = [r["text"] for r in records if r["source"] == "debian-faq"]
    got = sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
    assert got == MANIFEST["sources"]["debian-faq"]["tokens"]


def test_no_window_shared_with_heldout_sets_or_valid(records, valid_jsonl):
    table: set[str] = set()
    for r in records[::SAMPLE_EVERY]:
        table |= windows(r["text"])
    hit = first_shared(table, reference_texts(valid_jsonl))
    assert hit is None, f"the mixture shares a window with a held-out set or valid.jsonl: {hit!r}"
    # the check can fail: a 50-character passage of valid.jsonl, re-cased and re-wrapped, is found
    with open(valid_jsonl, encoding="utf-8") as f:
        book = json.loads(f.readline())["text"]
    planted = "Some text. " + book[5000:5000 + WINDOW].upper().replace(" ", "\n  ") + " More."
    assert first_shared(windows(book), [planted]) is not None
    assert first_shared(windows(book), ["Some text. " + book[5000:5000 + WINDOW - 1] + "#"]) is None


POD = """\
=encoding utf8

=head1 NAME

demo - a I<small> example

=head2 Usage

Call C<< $x <=> $y >> or see L<perlfunc/open>, L<the manual|perlpod>,
L<Pod::Text> and L</"Options">.
E<lt>tagE<gt> X<index>is S<fine> in F<file.pod>.

    my $x = 1;
      print $x;

=over 4

=item *

First B<bold> point.

=item 2.

Second.

=item --verbose

Says more.

=back

=begin html

<p>dropped</p>

=end html

=for comment dropped too

=cut

sub not_pod { 1 }

=pod

Back in POD: E<eacute>, E<0x41> and E<66>.
"""

# written by hand from perlpodspec: codes I/B/C/F/S keep their text, X and Z vanish, E is the character,
# L shows its text or '"section" in page'; verbatim paragraphs keep their lines (dedented), ordinary ones are
# one line; =over/=item become list paragraphs; =begin html ... =end html, =for comment and code after =cut
# up to the next command are dropped
POD_TEXT = """\
NAME

demo - a small example

Usage

Call $x <=> $y or see "open" in perlfunc, the manual, Pod::Text and "Options". <tag> is fine in file.pod.

my $x = 1;
  print $x;

* First bold point.

2. Second.

--verbose

Says more.

Back in POD: é, A and B."""


def test_pod_converter():
    assert mixture_text.pod_text(POD) == POD_TEXT
    blocks = mixture_text.pod_blocks(POD)
    assert [b[:2] for b in blocks[:4]] == [("h", 1), ("p", 0), ("h", 2), ("p", 0)]
    assert ("pre", 0, "my $x = 1;\n  print $x;") in blocks


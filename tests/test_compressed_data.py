"""A compressed --data that cannot be decompressed is named with what is wrong (tcache.datalines, issue 34): truncated,
not of its suffix's format at all, or corrupt inside; each with the lines read whole before it. The commands' one
line for it is held by rows 34.3 of tests/test_reliability.py."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pytest

from tcache.datalines import first_bad_line

LINES = 300
TEXT = "".join(json.dumps({"text": f"document {i} " + "word " * 20}) + "\n" for i in range(LINES)).encode()
COMPRESS = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress}
KIND = {".gz": "gzip", ".xz": "xz", ".bz2": "bzip2"}


@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_truncated(tmp_path, suffix):
    packed = COMPRESS[suffix](TEXT)
    path = tmp_path / f"d.jsonl{suffix}"
    path.write_bytes(packed[:len(packed) * 3 // 4])
    problem = first_bad_line(str(path), "json", "text")
    assert problem.endswith("(Compressed file ended before the end-of-stream marker was reached); "
                            "re-download or recompress it"), problem
    assert problem.startswith("truncated")
    if suffix != ".bz2":  # bzip2 decompresses whole 900 kB blocks: nothing comes out of a cut first block
        lines = int(problem.split("after line ")[1].split()[0])
        assert 0 < lines < LINES


@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_plain_text_under_a_compressed_name(tmp_path, suffix):
    path = tmp_path / f"d.jsonl{suffix}"
    path.write_bytes(TEXT)
    problem = first_bad_line(str(path), "json", "text")
    assert problem.startswith(f"not a {KIND[suffix]} file (") and problem.endswith(
        f"); if it is plain text, name it without {suffix}, else re-download or recompress it"), problem


def test_corrupt_inside(tmp_path):
    packed = bytearray(gzip.compress(TEXT))
    packed[len(packed) // 2] ^= 0xFF
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(bytes(packed))
    problem = first_bad_line(str(path), "json", "text")
    assert problem.startswith("corrupt gzip data") and problem.endswith("; re-download or recompress it"), problem


def test_a_bad_line_before_the_cut_is_still_the_line(tmp_path):
    packed = gzip.compress(b'{"text": "fine"}\n{"text": 123}\n' + TEXT)
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(packed[:len(packed) // 2])
    assert first_bad_line(str(path), "json", "text").startswith('line 2: "text" is an int')


def test_a_zstd_file_is_not_scanned_as_text(tmp_path):
    """No zstd reader in the standard library: its bytes are not reported as lines that are not UTF-8."""
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(256)))
    assert first_bad_line(str(path), "json", "text") is None

"""The held-out sets' sources: the pinned Debian 12 packages each set is built from, fetched and verified by sha256,
and the files inside a .deb (benchmarks/heldout.py builds the sets from them)."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"

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

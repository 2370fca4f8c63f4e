"""Public-domain long texts for perplexity: Jane Austen's novels from Debian's r-cran-janeaustenr.

The package stores them as an R lazy-load database (`Rdata.rdb`): records of a 4-byte length and
a zlib stream holding an R XDR character vector, one element per line. Read here without R.
`scripts/setup.sh` (with tests) unpacks it to `.venv/share/janeaustenr`; an installed package
(`/usr/lib/R/site-library/janeaustenr`) works too.
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

# The database's order (the package's data sets, alphabetical).
TITLES = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
R_CHARACTER_VECTOR = 16
PLACES = (
    Path(sys.prefix) / "share" / "janeaustenr" / "Rdata.rdb",
    Path("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"),
)


class TextsMissing(RuntimeError):
    pass


def _character_vector(raw: bytes) -> list[str] | None:
    """An R XDR-serialised character vector (format 2 or 3), else None."""
    if raw[:2] != b"X\n":
        return None
    (version,) = struct.unpack(">i", raw[2:6])
    at = 14  # format version, R version, minimal R version
    if version == 3:
        (n,) = struct.unpack(">i", raw[at : at + 4])
        at += 4 + n  # native encoding name
    (flags,) = struct.unpack(">i", raw[at : at + 4])
    if flags & 0xFF != R_CHARACTER_VECTOR:
        return None
    (length,) = struct.unpack(">i", raw[at + 4 : at + 8])
    at += 8
    lines = []
    for _ in range(length):
        _, size = struct.unpack(">ii", raw[at : at + 8])
        at += 8
        if size == -1:  # NA
            lines.append("")
            continue
        lines.append(raw[at : at + size].decode("utf-8", "replace"))
        at += size
    return lines


def austen_books(path: Path | None = None) -> dict[str, str]:
    """Title -> full text of each novel."""
    found = path or next((p for p in PLACES if p.is_file()), None)
    if found is None:
        raise TextsMissing(
            "the perplexity texts come from Debian's r-cran-janeaustenr: run `ROPESERVE_WITH_TESTS=1 bash "
            "scripts/setup.sh`, or `apt-get install r-cran-janeaustenr`"
        )
    data = found.read_bytes()
    books, at = [], 0
    while at < len(data):
        stream = zlib.decompressobj()
        raw = stream.decompress(data[at + 4 :])
        at = len(data) - len(stream.unused_data)
        lines = _character_vector(raw)
        if lines:
            books.append("\n".join(lines))
    return dict(zip(TITLES, books, strict=True))

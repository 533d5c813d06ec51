"""The tables of docs/conformance.md, generated from the code's own tables, so the conformance
statement says what the code does: the SOP classes and transfer syntaxes accepted, the query
keys, the statuses. Each table sits between ``<!-- generated: NAME -->`` and
``<!-- end generated -->`` in the document; ``tests/server/dimse/test_conformance.py`` fails
when they differ, and ``python -m server.dimse.conformance`` rewrites them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from pydicom.uid import UID

from server.dimse.ae import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION_SYNTAXES
from server.dimse.identifier import INFORMATION_MODEL
from server.dimse.statuses import C_STORE_STATUSES, QUERY_RETRIEVE_STATUSES, StatusUse
from storage.query import COMPUTED_KEYS, QUERY_KEYS, UNIQUE_KEYS, QueryLevel

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
_BLOCK = re.compile(
    r"(<!-- generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S
)


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def transfer_syntaxes() -> str:
    rows = [
        (str(n), UID(uid).name, f"`{uid}`", "yes" if uid in VERIFICATION_SYNTAXES else "")
        for n, uid in enumerate(TRANSFER_SYNTAXES, 1)
    ]
    return _table(["#", "Transfer Syntax", "UID", "also Verification, Q/R"], rows)


def storage_sop_classes() -> str:
    rows = [(UID(uid).name, f"`{uid}`") for uid in STORAGE_SOP_CLASSES]
    return f"{len(rows)} storage SOP classes.\n\n" + _table(["SOP Class", "UID"], rows)


def query_retrieve_sop_classes() -> str:
    rows = [(UID(uid).name, f"`{uid}`") for uid in INFORMATION_MODEL]
    return _table(["SOP Class", "UID"], rows)


def query_keys() -> str:
    rows = []
    for level in QueryLevel:
        keys = [key.keyword for key in QUERY_KEYS.values() if key.level == level]
        named = [
            f"{keyword} (unique)" if keyword == UNIQUE_KEYS[level] else keyword
            for keyword in sorted(keys, key=lambda k: (k in COMPUTED_KEYS, k != UNIQUE_KEYS[level]))
        ]
        rows.append((level.value, ", ".join(named)))
    return _table(["level", "attributes"], rows)


def _statuses(uses: Iterable[StatusUse], with_services: bool) -> str:
    header = (
        ["status", "service", "meaning", "when"] if with_services else ["status", "meaning", "when"]
    )
    rows = [
        [f"`0x{use.status:04X}`", *([use.services] if with_services else []), use.meaning, use.when]
        for use in uses
    ]
    return _table(header, rows)


GENERATED: dict[str, Callable[[], str]] = {
    "transfer-syntaxes": transfer_syntaxes,
    "storage-sop-classes": storage_sop_classes,
    "query-retrieve-sop-classes": query_retrieve_sop_classes,
    "query-keys": query_keys,
    "c-store-statuses": lambda: _statuses(C_STORE_STATUSES, with_services=False),
    "query-retrieve-statuses": lambda: _statuses(QUERY_RETRIEVE_STATUSES, with_services=True),
}


def regenerate(text: str) -> str:
    """``text`` with every generated block replaced by what the code says now."""

    def replace(match: re.Match[str]) -> str:
        body = GENERATED[match["name"]]()
        return match.group(1) + body + match.group(4)

    return _BLOCK.sub(replace, text)


def blocks(text: str) -> dict[str, str]:
    return {match["name"]: match["body"] for match in _BLOCK.finditer(text)}


if __name__ == "__main__":
    DOCUMENT.write_text(regenerate(DOCUMENT.read_text()))
    print(f"{DOCUMENT}: {len(blocks(DOCUMENT.read_text()))} tables regenerated", file=sys.stderr)

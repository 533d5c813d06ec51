"""docs/conformance.md says what the code does: its generated tables equal what the code's own
tables give now (regenerate with ``python -m server.dimse.conformance``)."""

from __future__ import annotations

from server.dimse.conformance import DOCUMENT, GENERATED, blocks


def test_every_generated_table_of_the_conformance_statement_matches_the_code() -> None:
    found = blocks(DOCUMENT.read_text())
    assert set(found) == set(GENERATED), "a generated table is missing from the document"
    stale = [name for name, render in GENERATED.items() if found[name] != render()]
    assert stale == [], f"run `python -m server.dimse.conformance`: {stale} differ"

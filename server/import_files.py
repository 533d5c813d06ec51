"""``hilum import PATH...``: bulk import of files and folders through the one ingest path."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from server.context import cli_context
from storage.archive import Archive
from storage.audit import AuditEvent, Transfer
from storage.errors import StorageError
from storage.ingest import IngestOutcome, Origin, Received, ingest_files


@dataclass
class ImportSummary:
    outcomes: Counter[IngestOutcome] = field(default_factory=Counter)
    failures: list[tuple[Path, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        stored = self.outcomes[IngestOutcome.STORED] + self.outcomes[IngestOutcome.REPLACED]
        duplicates = (
            self.outcomes[IngestOutcome.DUPLICATE] + self.outcomes[IngestOutcome.KEPT_EXISTING]
        )
        lines = [f"{stored} stored, {duplicates} duplicate, {len(self.failures)} failed"]
        lines += [f"  failed: {path}: {reason}" for path, reason in self.failures]
        return lines


def walk(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for dirpath, dirnames, files in os.walk(path):
                dirnames.sort()
                for name in sorted(files):
                    yield Path(dirpath) / name
        else:
            yield path


def import_files(
    archive: Archive, paths: list[Path], *, workers: int = 4, show_progress: bool = True
) -> ImportSummary:
    summary = ImportSummary()
    files = list(walk(paths))
    requestor = cli_context("hilum import")
    # Audited per study as it begins and, in one Data Import record, when the import ends.
    transfer = Transfer(requestor, AuditEvent.IMPORT, "hilum import")

    def one(path: Path) -> tuple[Path, IngestOutcome | str]:
        if not path.is_file():
            return path, "no such file"
        try:
            received = Received(path, Origin(), requestor=requestor, transfer=transfer)
            (outcome,) = ingest_files(archive, [received])
            if isinstance(outcome, StorageError):
                return path, str(outcome)
            return path, outcome.outcome
        except StorageError as error:
            return path, str(error)
        except OSError as error:
            return path, f"cannot read: {error.strerror or error}"

    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(files), unit="file", disable=not show_progress) as bar,
    ):
        for path, outcome in pool.map(one, files):
            if isinstance(outcome, IngestOutcome):
                summary.outcomes[outcome] += 1
            else:
                summary.failures.append((path, outcome))
            bar.update(1)
    archive.record(requestor, *transfer.completion_entries())
    return summary

"""Local copies of stored blobs for the work that needs a whole file (transcoding, decoding a
file without recorded frame ranges): in memory up to a size, then in ``<data_dir>/tmp`` — never
the system's ``/tmp``, which under ``hilum web`` may be small or shared."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import IO

from storage.archive import Archive

# Above this size a copy moves from memory to a file in the spool folder.
IN_MEMORY_BYTES = 64 << 20
_CHUNK = 1 << 20


class Spool:
    def __init__(self, data_dir: Path) -> None:
        self.folder = (data_dir / "tmp").resolve()
        self.folder.mkdir(parents=True, exist_ok=True)

    def copy_of(self, archive: Archive, blob_key: str, tier: str = "") -> IO[bytes]:
        """The blob's bytes (in storage tier ``tier``, as the index says) in a file positioned
        at 0; the caller closes it (which removes it: a spooled file on disk is unlinked from
        the start)."""
        spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (returned to the caller)
            max_size=IN_MEMORY_BYTES, dir=str(self.folder)
        )
        try:
            with archive.blobs.open(blob_key, tier=tier) as blob:
                while chunk := blob.read(_CHUNK):
                    spool.write(chunk)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return spool  # type: ignore[return-value]

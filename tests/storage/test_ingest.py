"""The one ingest path: validation, duplicates, the overwrite/keep policy, concurrency."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from config import Settings
from storage.archive import Archive, open_archive
from storage.blobs import PutsMade
from storage.delete import delete_instance
from storage.errors import InvalidInstance, SOPClassMismatch, StorageUnavailable
from storage.frame_table import PackedFrameTable
from storage.index.models import Instance, Patient, Series, Study
from storage.ingest import IngestOutcome, Origin, Received, ingest_file, ingest_files
from storage.verify import verify_archive
from tests.factories import ct_instance, dataset_bytes, write_part10
from tests.racing import IndexThenHook


def _count(archive: Archive, model: type) -> int:
    with archive.index.read() as session:
        return session.execute(select(func.count()).select_from(model)).scalar_one()


def _instance(archive: Archive, sop_uid: str) -> Instance:
    with archive.index.read() as session:
        return session.execute(
            select(Instance).where(Instance.sop_instance_uid == sop_uid)
        ).scalar_one()


def _in_threads(work: Callable[[Any], None], arguments: list[Any]) -> list[BaseException]:
    """``work(argument)`` for each argument, each in its own thread, all at once: what they
    raised."""
    errors: list[BaseException] = []

    def run(argument: Any) -> None:
        try:
            work(argument)
        except BaseException as error:  # noqa: BLE001 (returned to the test)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(argument,)) for argument in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_stores_blob_and_index_rows(archive: Archive, tmp_path: Path) -> None:
    ds = ct_instance()
    path = write_part10(ds, tmp_path / "a.dcm")

    result = ingest_file(archive, path, Origin(calling_ae_title="CT01"))

    assert result.outcome is IngestOutcome.STORED
    row = _instance(archive, ds.SOPInstanceUID)
    content = path.read_bytes()
    assert row.sha256 == hashlib.sha256(content).hexdigest() == result.sha256
    assert row.size == len(content)
    assert row.calling_ae_title == "CT01"
    assert row.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    with archive.blobs.open(row.blob_key) as stream:
        assert stream.read() == content
    # The header's DICOM JSON, pixel data as a BulkDataURI, never inline.
    assert row.metadata_json["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}
    assert row.metadata_json["7FE00010"]["BulkDataURI"] == "bulkdata/7FE00010"
    # The recorded frame range holds exactly the pixel data.
    assert row.frame_table is not None and row.frame_ranges is None
    [(offset, length)] = PackedFrameTable(row.frame_table).byte_ranges(1)
    assert archive.blobs.get_range(row.blob_key, offset, length) == ds.PixelData
    with archive.index.read() as session:
        study = session.execute(select(Study)).scalar_one()
        assert (study.study_date, study.accession_number, study.modalities_in_study) == (
            "20260115", "ACC1", "CT",
        )  # fmt: skip
        patient = session.execute(select(Patient)).scalar_one()
        assert (patient.patient_id, patient.patient_name_upper) == ("PAT-1", "DOE^JANE")
        assert session.execute(select(Series.modality)).scalar_one() == "CT"


def test_identical_resend_stores_nothing_new(archive: Archive, tmp_path: Path) -> None:
    path = write_part10(ct_instance(), tmp_path / "a.dcm")
    first = ingest_file(archive, path)
    keys_before = sorted(archive.blobs.list_keys())

    second = ingest_file(archive, path)

    assert (first.outcome, second.outcome) == (IngestOutcome.STORED, IngestOutcome.DUPLICATE)
    assert sorted(archive.blobs.list_keys()) == keys_before
    assert _count(archive, Instance) == 1


def test_the_same_data_set_under_another_file_meta_is_a_duplicate(
    archive: Archive, tmp_path: Path
) -> None:
    """PS3.10 7.1: the File Meta Information describes the file, not the instance. The same
    instance from another sender (or over C-STORE and then STOW-RS) stores nothing new and
    keeps the first file."""
    ds = ct_instance()
    first = write_part10(ds, tmp_path / "first.dcm")
    ds.file_meta.ImplementationVersionName = "OTHER_SENDER"
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY2"
    second = write_part10(ds, tmp_path / "second.dcm")
    assert first.read_bytes() != second.read_bytes()
    assert dataset_bytes(first) == dataset_bytes(second)
    ingest_file(archive, first)
    keys_before = sorted(archive.blobs.list_keys())

    result = ingest_file(archive, second)

    assert result.outcome is IngestOutcome.DUPLICATE
    assert sorted(archive.blobs.list_keys()) == keys_before
    row = _instance(archive, ds.SOPInstanceUID)
    with archive.blobs.open(row.blob_key) as stream:
        assert stream.read() == first.read_bytes()
    report = verify_archive(archive)
    assert report.ok and report.instances == 1, report


def test_the_same_instance_in_another_transfer_syntax_replaces(
    archive: Archive, tmp_path: Path
) -> None:
    """Other bytes of the data set (another encoding) are new content: the policy applies."""
    ds = ct_instance()
    explicit = write_part10(ds, tmp_path / "explicit.dcm")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = write_part10(ds, tmp_path / "implicit.dcm")
    assert dataset_bytes(explicit) != dataset_bytes(implicit)
    ingest_file(archive, explicit)

    result = ingest_file(archive, implicit)

    assert result.outcome is IngestOutcome.REPLACED
    assert _instance(archive, ds.SOPInstanceUID).transfer_syntax_uid == ImplicitVRLittleEndian


def test_a_longer_data_set_under_another_file_meta_replaces(
    archive: Archive, tmp_path: Path
) -> None:
    """Equal up to where the shorter one ends is not equal."""
    ds = ct_instance()
    first = write_part10(ds, tmp_path / "first.dcm")
    ds.file_meta.ImplementationVersionName = "OTHER_SENDER"
    ds.add_new(0x7FE1_0010, "LO", "HILUM TEST")  # a private creator after Pixel Data
    second = write_part10(ds, tmp_path / "second.dcm")
    assert dataset_bytes(second).startswith(dataset_bytes(first))
    ingest_file(archive, first)

    assert ingest_file(archive, second).outcome is IngestOutcome.REPLACED


@pytest.mark.parametrize("policy", ["overwrite", "keep"])
def test_different_content_resend_follows_policy(
    settings: Settings, tmp_path: Path, policy: str
) -> None:
    settings.storage.on_duplicate = policy  # type: ignore[assignment]
    archive = open_archive(settings, migrate=True)
    try:
        sop = generate_uid()
        old = write_part10(ct_instance(sop_uid=sop, seed=1), tmp_path / "old.dcm")
        new = write_part10(ct_instance(sop_uid=sop, seed=2), tmp_path / "new.dcm")
        ingest_file(archive, old)
        old_key = _instance(archive, sop).blob_key

        result = ingest_file(archive, new)

        row = _instance(archive, sop)
        kept = old if policy == "keep" else new
        assert result.outcome is (
            IngestOutcome.KEPT_EXISTING if policy == "keep" else IngestOutcome.REPLACED
        )
        assert row.sha256 == hashlib.sha256(kept.read_bytes()).hexdigest()
        with archive.blobs.open(row.blob_key) as stream:
            assert stream.read() == kept.read_bytes()
        # The replaced blob is gone; exactly one blob remains.
        assert list(archive.blobs.list_keys()) == [row.blob_key]
        assert (row.blob_key == old_key) is (policy == "keep")
        assert _count(archive, Instance) == 1
    finally:
        archive.close()


def _write_invalid(tmp_path: Path, **changes: object) -> Path:
    ds = ct_instance()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return write_part10(ds, tmp_path / "bad.dcm")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"SOPInstanceUID": None}, "lacks SOPInstanceUID"),
        ({"StudyInstanceUID": None}, "lacks StudyInstanceUID"),
        ({"SOPInstanceUID": "../../etc/passwd"}, "is not a valid UID"),
        ({"SeriesInstanceUID": "1.2/3.4"}, "is not a valid UID"),
        ({"StudyInstanceUID": "1.02.3"}, "is not a valid UID"),  # PS3.5 9.1: no leading zero
        ({"SOPInstanceUID": "1." + "2" * 70}, "is not a valid UID"),  # longer than 64
        ({"SOPClassUID": "1.2.840.10008.1.1"}, "is not a storage SOP class"),  # Verification
    ],
)
def test_invalid_instances_are_refused_and_nothing_is_written(
    archive: Archive, tmp_path: Path, changes: dict, reason: str
) -> None:
    path = _write_invalid(tmp_path, **changes)
    with pytest.raises(InvalidInstance, match=reason):
        ingest_file(archive, path)
    assert _count(archive, Instance) == 0
    assert list(archive.blobs.list_keys()) == []


def test_truncated_pixel_data_is_refused(archive: Archive, tmp_path: Path) -> None:
    path = write_part10(ct_instance(size=64), tmp_path / "full.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InvalidInstance, match="truncated"):
        ingest_file(archive, truncated)
    assert _count(archive, Instance) == 0


def test_garbage_file_is_refused(archive: Archive, tmp_path: Path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 10)
    with pytest.raises(InvalidInstance):
        ingest_file(archive, path)


def test_announced_sop_class_must_match_the_data_set(archive: Archive, tmp_path: Path) -> None:
    path = write_part10(ct_instance(), tmp_path / "a.dcm")
    mr_image_storage = "1.2.840.10008.5.1.4.1.1.4"
    with pytest.raises(SOPClassMismatch):
        ingest_file(archive, path, Origin(announced_sop_class_uid=mr_image_storage))
    assert _count(archive, Instance) == 0


def test_concurrent_ingest_of_one_study_loses_nothing(archive: Archive, tmp_path: Path) -> None:
    """Eight threads store one study's instances at once, each re-sending one instance that
    another thread also sends: hierarchy rows are created once, no instance is lost."""
    study, series = generate_uid(), generate_uid()
    shared = write_part10(ct_instance(study, series, seed=999), tmp_path / "shared.dcm")
    files = [
        [write_part10(ct_instance(study, series, seed=t * 100 + i), tmp_path / f"{t}-{i}.dcm")
         for i in range(10)] + [shared]
        for t in range(8)
    ]  # fmt: skip

    def send(paths: list[Path]) -> None:
        for path in paths:
            ingest_file(archive, path)

    assert _in_threads(send, files) == []
    assert _count(archive, Instance) == 81
    assert (_count(archive, Study), _count(archive, Series), _count(archive, Patient)) == (1, 1, 1)
    assert len(list(archive.blobs.list_keys())) == 81
    with archive.index.read() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.blob_key)).all()
    sent = {p.name: p for paths in files for p in paths}
    by_uid = {}
    for path in sent.values():
        from pydicom import dcmread

        by_uid[dcmread(path, stop_before_pixels=True).SOPInstanceUID] = path
    for uid, key in rows:
        with archive.blobs.open(key) as stream:
            stored = stream.read()
        assert stored == by_uid[uid].read_bytes()
    assert dataset_bytes(shared)  # the shared file is a readable Part 10 file


def test_racing_senders_of_one_instance_with_temporary_files(
    archive: Archive, tmp_path: Path
) -> None:
    """Eight threads store different content under one SOP Instance UID at once, each from a
    temporary file the blob store may hard-link (as C-STORE does); the losers of each round
    retry. Every call succeeds, one version is stored, and no blob is left without a row."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    received = [
        write_part10(ct_instance(study, series, sop, seed=n), tmp_path / f"received-{n}.dcm")
        for n in range(8)
    ]
    contents = {path.read_bytes() for path in received}
    barrier = threading.Barrier(len(received))

    def send(path: Path) -> None:
        barrier.wait()
        ingest_file(archive, path, temporary=True)
        path.unlink()  # what pynetdicom does after the handler

    assert _in_threads(send, received) == []
    assert _count(archive, Instance) == 1
    (key,) = archive.blobs.list_keys()
    with archive.blobs.open(key) as stream:
        assert stream.read() in contents
    assert verify_archive(archive).ok


class _RacingBlobStore:
    """The real blob store; right after the blobs of A's group are written, ``on_put`` runs
    for each of their files (there B stores the same instance)."""

    def __init__(self, inner: object, on_put: Callable[[Path], None]) -> None:
        self._inner, self._on_put = inner, on_put

    def start_put_all(self, blobs: list) -> PutsMade:
        refusals = self._inner.put_all(blobs)  # type: ignore[attr-defined]
        for _key, path, _may_link in blobs:
            self._on_put(path)
        return PutsMade(refusals)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def test_retry_after_a_lost_race_writes_the_blob_again(archive: Archive, tmp_path: Path) -> None:
    """A writes its blob, B commits the same content (same blob key) first, so A's insert
    finds B's row; the instance is deleted (blob included) before A retries: the retry must
    write the blob again rather than trust that it is still there."""
    ds = ct_instance()
    a_path = write_part10(ds, tmp_path / "a.dcm")
    b_path = tmp_path / "b.dcm"
    b_path.write_bytes(a_path.read_bytes())
    a_puts: list[Path] = []
    deleted: list[int] = []

    def after_put(path: Path) -> None:
        if path == a_path:
            a_puts.append(path)
            if len(a_puts) == 1:
                assert ingest_file(archive, b_path).outcome is IngestOutcome.STORED

    def after_write() -> None:
        if len(a_puts) == 1 and not deleted:  # A's first round has lost to B
            deleted.append(
                delete_instance(
                    archive, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
                ).instances
            )

    racing = dataclasses.replace(
        archive,
        blobs=_RacingBlobStore(archive.blobs, after_put),
        index=IndexThenHook(archive.index, after_write),  # type: ignore[arg-type]
    )
    assert ingest_file(racing, a_path, temporary=True).outcome is IngestOutcome.STORED
    assert deleted == [1]
    assert len(a_puts) == 2  # A lost the first round and wrote its blob again
    report = verify_archive(archive)
    assert report.ok and report.instances == 1, report


def test_a_group_is_stored_file_by_file_in_one_transaction(
    archive: Archive, tmp_path: Path
) -> None:
    """ingest_files: each file gets its own outcome, in order; a refused file (unparseable, or
    an instance sent twice) does not hold the others back; every stored row has its blob."""
    study, series, resent = generate_uid(), generate_uid(), generate_uid()
    files = [write_part10(ct_instance(study, series, seed=n), tmp_path / f"{n}.dcm")
             for n in range(5)]  # fmt: skip
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not DICOM at all")
    first = write_part10(ct_instance(study, series, resent, seed=10), tmp_path / "first.dcm")
    again = write_part10(ct_instance(study, series, resent, seed=11), tmp_path / "again.dcm")
    other_series = write_part10(ct_instance(study, seed=12, modality="MR"), tmp_path / "mr.dcm")
    group = [*files[:2], garbage, first, files[2], again, other_series, *files[3:]]

    outcomes = ingest_files(archive, [Received(path) for path in group])

    assert isinstance(outcomes[2], InvalidInstance)
    kinds = [o.outcome for o in outcomes if not isinstance(o, Exception)]
    # The same SOP Instance UID twice: the later copy replaces the earlier (overwrite policy).
    stored, replaced = IngestOutcome.STORED, IngestOutcome.REPLACED
    assert kinds == [stored] * 4 + [replaced] + [stored] * 3
    assert _count(archive, Instance) == 7
    assert (_count(archive, Study), _count(archive, Series)) == (1, 2)
    with archive.index.read() as session:
        assert session.execute(select(Study.modalities_in_study)).scalar_one() == "CT\\MR"
    with archive.blobs.open(_instance(archive, resent).blob_key) as stream:
        assert stream.read() == again.read_bytes()
    report = verify_archive(archive)
    assert report.ok and report.instances == 7, report


def test_a_lost_race_in_a_group_retries_that_file_only(archive: Archive, tmp_path: Path) -> None:
    """Another sender commits one of the group's instances between the group's look-up and its
    write: that file's insert is skipped (ON CONFLICT DO NOTHING) and it is stored again in the
    next round (replacing the other sender's version); the rest is stored in the first."""
    study, series = generate_uid(), generate_uid()
    files = [write_part10(ct_instance(study, series, seed=n), tmp_path / f"{n}.dcm")
             for n in range(4)]  # fmt: skip
    racer = tmp_path / "racer.dcm"
    raced = dcmread_uid(files[2])
    write_part10(ct_instance(study, series, raced, seed=99), racer)
    puts: list[Path] = []

    def after_put(path: Path) -> None:
        puts.append(path)
        if path == files[3] and puts.count(path) == 1:  # after the group's last blob
            assert ingest_file(archive, racer).outcome is IngestOutcome.STORED

    racing = dataclasses.replace(archive, blobs=_RacingBlobStore(archive.blobs, after_put))
    outcomes = ingest_files(racing, [Received(path) for path in files])

    assert [o.outcome for o in outcomes] == [  # type: ignore[union-attr]
        IngestOutcome.STORED, IngestOutcome.STORED, IngestOutcome.REPLACED, IngestOutcome.STORED
    ]  # fmt: skip
    assert puts.count(files[2]) == 2 and puts.count(files[0]) == 1  # only the loser retried
    with archive.blobs.open(_instance(archive, raced).blob_key) as stream:
        assert stream.read() == files[2].read_bytes()
    report = verify_archive(archive)
    assert report.ok and report.instances == 4, report


def dcmread_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_group_the_index_refuses_whole_is_retried_then_refused(
    archive: Archive, tmp_path: Path
) -> None:
    """An IntegrityError no statement expects (here: a partition with no row, which every
    row's foreign key needs) rolls the whole group back; its files are tried again, then
    refused as unavailable, their blobs removed. It was an UnboundLocalError."""
    path = write_part10(ct_instance(), tmp_path / "a.dcm")
    nowhere = archive.scoped("no-such-partition")

    (outcome,) = ingest_files(nowhere, [Received(path)])

    assert isinstance(outcome, StorageUnavailable)
    assert "attempts" in str(outcome)
    assert _count(archive, Instance) == 0
    report = verify_archive(archive)
    assert report.ok and report.instances == 0, report


class _RefusingBlobStore:
    """The real blob store, refusing the blob of one file the first time it is put (a full
    disk, an S3 error)."""

    def __init__(self, inner: object, refused: Path) -> None:
        self._inner, self._refused = inner, refused
        self.puts: list[Path] = []

    def start_put_all(self, blobs: list) -> PutsMade:
        self.puts += [path for _key, path, _may_link in blobs]
        refuse = self._refused if self.puts.count(self._refused) == 1 else None
        put = iter(self._inner.put_all([b for b in blobs if b[1] != refuse]))  # type: ignore[attr-defined]
        return PutsMade(
            [
                StorageUnavailable("no space left on the device") if path == refuse else next(put)
                for _key, path, _may_link in blobs
            ]
        )

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def test_a_refused_blob_rolls_its_group_back_and_the_rest_is_stored(
    archive: Archive, tmp_path: Path
) -> None:
    """The rows are written while the blobs are; one blob refused: the group's transaction is
    rolled back (no row may name a blob that is not stored), that file gets the refusal, the
    others are stored in the next round; no row without its blob, no blob without its row."""
    study, series = generate_uid(), generate_uid()
    files = [write_part10(ct_instance(study, series, seed=n), tmp_path / f"{n}.dcm")
             for n in range(3)]  # fmt: skip
    refusing = _RefusingBlobStore(archive.blobs, files[1])

    outcomes = ingest_files(
        dataclasses.replace(archive, blobs=refusing), [Received(path) for path in files]
    )

    assert isinstance(outcomes[1], StorageUnavailable)
    assert [o.outcome for o in (outcomes[0], outcomes[2])] == [IngestOutcome.STORED] * 2  # type: ignore[union-attr]
    assert refusing.puts == [*files, files[0], files[2]]  # the others put again, then stored
    assert _count(archive, Instance) == 2
    report = verify_archive(archive)
    assert report.ok and report.instances == 2, report
    assert sorted(archive.blobs.list_keys()) == sorted(
        _instance(archive, dcmread_uid(path)).blob_key for path in (files[0], files[2])
    )

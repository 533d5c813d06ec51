"""Small factories for test data: synthetic instances written as DICOM Part 10 files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from storage.data_set_structure import skip_file_meta
from storage.index.database import Index
from storage.partitions import create_partition, partition_exists

DCMTK_STORESCU = "/usr/bin/storescu"  # not pynetdicom's script of the same name in the venv


def ct_instance(
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    size: int = 32,
    seed: int = 0,
    patient_id: str = "PAT-1",
    modality: str = "CT",
) -> Dataset:
    """A small, valid CT Image Storage instance with random pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "DOE^JANE"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20260115"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = seed + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    pixels = np.random.default_rng(seed).integers(0, 4096, (size, size), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def write_part10(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The bytes of the data set after the preamble and file meta information."""
    with open(path, "rb") as f:
        past_meta = skip_file_meta(f)
        assert past_meta is not None, f"{path} is not a Part 10 file"
        return past_meta + f.read()


def data_set_differences(sent: Dataset, received: Dataset) -> list[str]:
    """Tags whose values differ, comparing as DICOM does rather than byte for byte.

    These are not differences: Group Length elements (gggg,0000), which PS3.5 7.2 makes
    optional and DCMTK recomputes; Data Set Trailing Padding (FFFC,FFFC), which PS3.10 7.2
    says has no meaning and DCMTK drops; OB versus OW on encapsulated Pixel Data (PS3.5 A.4
    requires OB; DCMTK corrects files that say OW).
    """

    def compared(ds: Dataset) -> set:
        return {e.tag for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC}

    differences = []
    tags = compared(sent) | compared(received)
    for tag in sorted(tags):
        if tag not in sent or tag not in received:
            differences.append(f"{tag} present in only one")
            continue
        a, b = sent[tag], received[tag]
        if a.VR == "SQ":
            if len(a.value) != len(b.value):
                differences.append(f"{tag} item count")
            for item_a, item_b in zip(a.value, b.value, strict=False):
                differences += [f"{tag}>{d}" for d in data_set_differences(item_a, item_b)]
        elif a.value != b.value or (a.VR != b.VR and tag != 0x7FE00010):
            differences.append(str(tag))
    return differences


def ensure_partition(index: Index, name: str) -> None:
    """Partition ``name``, created with ``storage.partitions`` (no AE title) unless it exists."""
    if not partition_exists(index, name):
        create_partition(index, name, [], reserved_ae_title="HILUM")

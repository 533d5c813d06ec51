"""Synthetic phantoms with ground truth: what the reference models are trained on and tested with.

Nothing here resembles a patient. A CT phantom is an elliptical soft-tissue body with a fat rim,
a bright "vertebra" and a few bright round lesions; a WSI phantom is an H&E-like texture (pink
stroma, purple nuclei) with blob-shaped regions of denser, darker "abnormal tissue". Both are
valid DICOM (CT Image Storage; VL Whole Slide Microscopy Image Storage, TILED_FULL, JPEG
baseline) so that they travel the same path as a scanner's images. The same ``seed`` always gives
the same pixels and UIDs.
"""

from __future__ import annotations

import io
from datetime import date

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)

_ROOT = "synthetic-phantom"  # entropy prefix of every UID made here
_DATE = date(2026, 1, 15).strftime("%Y%m%d")


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=[_ROOT, str(seed), *map(str, parts)])


def _patient_and_study(ds: Dataset, seed: int, kind: str) -> None:
    ds.PatientName = f"PHANTOM^{kind}^{seed}"
    ds.PatientID = f"PHANTOM-{kind}-{seed}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid(seed, kind, "study")
    ds.StudyDate = _DATE
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = f"SYN{seed:05d}"[:16]
    ds.StudyID = str(seed)[:16]
    ds.StudyDescription = f"Synthetic {kind} phantom (not a patient)"
    ds.Manufacturer = "Hilum synthetic phantom"
    ds.ManufacturerModelName = "inference.phantoms"
    ds.SoftwareVersions = "1"
    ds.DeviceSerialNumber = "0"


# --- CT ---------------------------------------------------------------------------------------


def ct_phantom_volume(
    seed: int, *, slices: int = 16, size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Hounsfield units (slices, size, size) int16 and the lesion mask (same shape) bool."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:slices, 0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    a, b = size * rng.uniform(0.40, 0.46), size * rng.uniform(0.30, 0.38)
    body = ((x - c) / a) ** 2 + ((y - c) / b) ** 2
    hu = np.full(z.shape, -1000.0, np.float32)
    hu[body <= 1.0] = -90.0  # fat rim
    hu[body <= 0.80] = 50.0  # soft tissue
    # A bright round "vertebra" at the back: bright like a lesion, but not one.
    vy, vx, vr = c + b * 0.62, c + rng.uniform(-4, 4), size * 0.06
    hu[(x - vx) ** 2 + (y - vy) ** 2 <= vr**2] = 500.0
    mask = np.zeros(z.shape, bool)
    for _ in range(int(rng.integers(2, 5))):
        r = size * rng.uniform(0.05, 0.10)
        for _attempt in range(50):
            lx, ly = c + rng.uniform(-0.6, 0.6) * a, c + rng.uniform(-0.6, 0.5) * b
            lz = rng.uniform(0, slices - 1)
            if ((lx - c) / a) ** 2 + ((ly - c) / b) ** 2 < 0.55 and (lx - vx) ** 2 + (
                ly - vy
            ) ** 2 > (r + vr + 4) ** 2:
                break
        rz = r * rng.uniform(0.15, 0.35)  # slices are thicker than pixels
        lesion = ((x - lx) / r) ** 2 + ((y - ly) / r) ** 2 + ((z - lz) / rz) ** 2 <= 1.0
        hu[lesion] = rng.uniform(130.0, 170.0)
        mask |= lesion
    hu += rng.normal(0.0, 12.0, (slices, size, size)).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.int16), mask


def synthetic_ct_series(
    seed: int, *, slices: int = 16, size: int = 128, pixel_spacing_mm: float = 1.5
) -> tuple[list[Dataset], np.ndarray]:
    """One synthetic CT series (CT Image Storage, one study) and its lesion mask
    (slices, size, size) bool, slice i of the mask belonging to ``datasets[i]``."""
    hu, mask = ct_phantom_volume(seed, slices=slices, size=size)
    series_uid = _uid(seed, "ct", "series")
    frame_of_reference = _uid(seed, "ct", "frame-of-reference")
    thickness = 5.0
    datasets = []
    for index in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = _uid(seed, "ct", "instance", index)
        _patient_and_study(ds, seed, "CT")
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = _DATE
        ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
        ds.SeriesDescription = "Synthetic CT phantom"
        ds.Modality = "CT"
        ds.BodyPartExamined = "ABDOMEN"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [
            -pixel_spacing_mm * (size - 1) / 2,
            -pixel_spacing_mm * (size - 1) / 2,
            index * thickness,
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
        ds.SliceThickness = thickness
        ds.SliceLocation = index * thickness
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 50
        ds.WindowWidth = 400
        ds.PixelData = hu[index].tobytes()
        datasets.append(ds)
    return datasets, mask


# --- whole slide ------------------------------------------------------------------------------

_STROMA = np.array([236, 172, 204], np.float32)  # eosin pink
_ABNORMAL_STROMA = np.array([196, 142, 206], np.float32)  # hematoxylin-heavy purple
_NUCLEUS = np.array([88, 52, 140], np.float32)
_GLASS = np.array([244, 242, 246], np.float32)


def _blob(
    shape: tuple[int, int], rng: np.random.Generator, cy: float, cx: float, r: float
) -> np.ndarray:
    """A wobbly round region: radius modulated by a few random harmonics."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    angle = np.arctan2(y - cy, x - cx)
    radius = np.full_like(angle, r)
    for harmonic in (2, 3, 5):
        radius += r * rng.uniform(0.03, 0.12) * np.cos(harmonic * angle + rng.uniform(0, 6.3))
    return (y - cy) ** 2 + (x - cx) ** 2 <= radius**2


def wsi_phantom_image(seed: int, *, size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like RGB image (size, size, 3) uint8 and its abnormal-tissue mask (size, size)."""
    rng = np.random.default_rng(seed)
    shape = (size, size)
    c = size / 2
    tissue = _blob(shape, rng, c + rng.uniform(-20, 20), c + rng.uniform(-20, 20), size * 0.46)
    abnormal = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 4))):
        r = size * rng.uniform(0.08, 0.2)
        cy, cx = rng.uniform(c - size * 0.25, c + size * 0.25, 2)
        abnormal |= _blob(shape, rng, cy, cx, r)
    abnormal &= tissue
    image = np.empty((*shape, 3), np.float32)
    image[:] = _GLASS
    image[tissue] = _STROMA
    image[abnormal] = _ABNORMAL_STROMA
    # Smooth staining variation, then nuclei: small and sparse in normal tissue, large, dense
    # and dark where abnormal.
    coarse = rng.normal(0, 1, (size // 64 + 1, size // 64 + 1)).astype(np.float32)
    low = np.asarray(Image.fromarray(coarse, "F").resize(shape, Image.Resampling.BICUBIC))
    image[tissue] += 6.0 * low[tissue][:, None]
    for region, count, radii, darkness in (
        (tissue & ~abnormal, size * size // 900, (2.0, 3.5), 0.55),
        (abnormal, size * size // 500, (3.5, 6.0), 0.85),
    ):
        ys, xs = np.nonzero(region)
        if len(ys) == 0:
            continue
        picks = rng.integers(0, len(ys), max(1, int(count * len(ys) / (size * size))))
        for y0, x0 in zip(ys[picks], xs[picks], strict=True):
            r = rng.uniform(*radii)
            top, left = int(max(0, y0 - r)), int(max(0, x0 - r))
            bottom, right = int(min(size, y0 + r + 1)), int(min(size, x0 + r + 1))
            yy, xx = np.mgrid[top:bottom, left:right]
            disk = (yy - y0) ** 2 + (xx - x0) ** 2 <= r * r
            patch = image[top:bottom, left:right]
            patch[disk] = patch[disk] * (1 - darkness) + _NUCLEUS * darkness
    image += rng.normal(0, 5.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), abnormal


def jpeg_baseline(rgb: np.ndarray, quality: int = 90) -> bytes:
    """One JPEG baseline (PS3.5 A.4.1) frame, YCbCr with 4:2:0 chroma subsampling."""
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, "JPEG", quality=quality, subsampling=2)
    return buffer.getvalue()


def synthetic_wsi(
    seed: int, *, size: int = 1024, tile_size: int = 256, pixel_spacing_mm: float = 0.0005
) -> tuple[Dataset, np.ndarray]:
    """A VL Whole Slide Microscopy Image (PS3.3 A.32.8), TILED_FULL, JPEG baseline frames, and
    its abnormal-tissue mask over the total pixel matrix (size, size) bool."""
    rgb, mask = wsi_phantom_image(seed, size=size)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = _uid(seed, "wsi", "instance")
    _patient_and_study(ds, seed, "WSI")
    ds.SeriesInstanceUID = _uid(seed, "wsi", "series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Synthetic H&E-like slide"
    ds.Modality = "SM"
    ds.BodyPartExamined = "BREAST"
    ds.FrameOfReferenceUID = _uid(seed, "wsi", "frame-of-reference")
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.InstanceNumber = 1
    ds.ContentDate = ds.SeriesDate = _DATE
    ds.ContentTime = ds.SeriesTime = "101500"
    ds.AcquisitionDateTime = _DATE + "101500"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.BurnedInAnnotation = "NO"
    ds.SpecimenLabelInImage = "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = 10
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.AcquisitionContextSequence = []
    # PS3.3 C.8.12.4: geometry of the total pixel matrix on the slide.
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixRows = ds.TotalPixelMatrixColumns = size
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.Rows = ds.Columns = tile_size
    ds.ImagedVolumeWidth = ds.ImagedVolumeHeight = size * pixel_spacing_mm
    ds.ImagedVolumeDepth = 0.001
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 20.0
    origin.YOffsetInSlideCoordinateSystem = 40.0
    ds.TotalPixelMatrixOriginSequence = [origin]
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    measures = Dataset()
    measures.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    measures.SliceThickness = 0.001
    measures.SpacingBetweenSlices = 0.001
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    path_id = Dataset()
    path_id.OpticalPathIdentifier = "1"
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
    shared.OpticalPathIdentificationSequence = [path_id]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.DimensionOrganizationSequence = [Dataset()]
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = _uid(seed, "wsi", "dimension")
    # Specimen module (PS3.3 C.7.6.22): one slide, one specimen.
    ds.ContainerIdentifier = f"SLIDE-{seed}"
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    specimen = Dataset()
    specimen.SpecimenIdentifier = f"SPECIMEN-{seed}"
    specimen.SpecimenUID = _uid(seed, "wsi", "specimen")
    specimen.IssuerOfTheSpecimenIdentifierSequence = []
    specimen.SpecimenPreparationSequence = []
    ds.SpecimenDescriptionSequence = [specimen]
    # Optical Path module (PS3.3 C.8.12.5): brightfield, white light.
    ds.NumberOfOpticalPaths = 1
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.IlluminationTypeCodeSequence = [_code("111744", "DCM", "Brightfield illumination")]
    path.IlluminationColorCodeSequence = [_code("414298005", "SCT", "Full Spectrum")]
    path.ICCProfile = _srgb_profile()
    ds.OpticalPathSequence = [path]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    frames = []
    for top in range(0, size, tile_size):
        for left in range(0, size, tile_size):
            tile = np.full((tile_size, tile_size, 3), 255, np.uint8)
            part = rgb[top : top + tile_size, left : left + tile_size]
            tile[: part.shape[0], : part.shape[1]] = part
            frames.append(jpeg_baseline(tile))
    ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds, mask


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _srgb_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()

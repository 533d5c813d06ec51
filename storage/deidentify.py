"""De-identification of one data set: PS3.15 Annex E, the Basic Application Level
Confidentiality Profile with the Retain Longitudinal Temporal Information with Modified Dates
Option (E.3.6) and the Clean Descriptors Option (E.3.5).

A pure transform (no database, no blob store): every attribute is handled as its row of
Table E.1-1 (``storage.confidentiality_profile``) says, in sequence items too. What the table
leaves to the implementer is decided here, once:

- UIDs (U) become ``2.25.<integer>`` (PS3.5 B.2), the integer a UUID built from an HMAC-SHA256 of
  the original UID under the project's secret: the same UID always maps to the same new UID in a
  project, so studies, series, instances and the references between them keep their structure,
  and another project (another secret) gets other UIDs. UIDs the table does not list are mapped
  the same way, except those naming a class, a transfer syntax, a coding scheme or a template,
  and well-known UIDs of the standard.
- Dates move by a whole number of days, the same for every date of one patient (the HMAC of the
  patient's identity: Issuer of Patient ID and Patient ID), 1 to 3650 days into the past: the
  Modified Dates option keeps intervals. Times are then unchanged. Dates the table does not list
  move too, so that none is left to undo the shift. Birth date: emptied (the table's Z).
- Patient ID (Z/D) and Patient's Name (Z) become the project's pseudonym of the patient.
- Compound actions take their last alternative (X/Z -> Z, X/D and X/Z/D and Z/D -> D, X/Z/U* ->
  the sequence with its UIDs replaced): always allowed by the IOD whatever the attribute's type,
  and none keeps the original value.
- D writes a dummy value of the attribute's VR; on a sequence (e.g. Content Sequence) the items
  stay, each de-identified by the same rules, and a Text Value in an SR content item is replaced
  by a dummy.
- C of Clean Descriptors keeps the text less every identifier the data set itself carries
  (patient and other person names, IDs, accession number, birth date) and every run of 5 or more
  digits; C of the Modified Dates option is the date shift.
- Private attributes (odd groups) are removed (the Retain Safe Private option is not offered);
  so are overlay groups (60xx, whose Overlay Data the table removes) and curves (50xx).

Images that may show identity in the pixels are held back, not released: Burned In Annotation
(0028,0301) YES, Recognizable Visual Features (0028,0302) YES, or a modality of
``[research] held_back_modalities``. Pixel data are never touched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import date, timedelta

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from storage.confidentiality_profile import row_for
from storage.errors import StorageError

# The options claimed, as named in storage.confidentiality_profile.OPTIONS.
OPTIONS = frozenset({"retain_modified_dates", "clean_descriptors"})
# PS3.16 CID 7050 De-identification Method, scheme DCM.
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113105", "Clean Descriptors Option"),
)
METHOD = "PS3.15 E Basic Profile, Modified Dates, Clean Descriptors"  # LO: 64 at most
MAX_SHIFT_DAYS = 3650

CONTENT_SEQUENCE = 0x0040A730
TEXT_VALUE = 0x0040A160
_DUMMY_TEXT = "ANONYMIZED"
# Unlisted UI attributes that name a kind of thing, not an instance: kept as they are.
_CLASS_UID = re.compile(
    r"(ClassUID|ClassesInStudy|ClassesInSeries|ClassesSupported|ClassUIDInFile|SyntaxUID"
    r"|SyntaxUIDInFile|CodingSchemeUID|CreatorUID|CreatorVersionUID|MappingResourceUID"
    r"|ContextUID|TemplateUID)$"
)
# Pixel Data, Float and Double Float Pixel Data: not in Table E.1-1, never changed.
_PIXELS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_DIGIT_RUN = re.compile(r"\d{5,}")


class HeldBack(StorageError):
    """An instance de-identification does not release: text or a face may be in its pixels.
    The message says why; it is kept for review, never copied."""


@dataclass(frozen=True)
class PatientIdentity:
    issuer: str
    patient_id: str


@dataclass(frozen=True)
class Deidentifier:
    """The keyed functions of one project: new UIDs, pseudonyms and date shifts all derive from
    ``secret`` (never logged), each under its own label so that none reveals another."""

    project: str
    secret: bytes = field(repr=False)
    held_back_modalities: frozenset[str] = frozenset()

    def _mac(self, label: str, value: str) -> bytes:
        message = f"{label}\0{self.project}\0{value}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def new_uid(self, uid: str) -> str:
        """``2.25.`` and the integer of a UUID (RFC 9562 version 8: custom) made of the HMAC
        of ``uid``: at most 44 characters."""
        raw = bytearray(self._mac("uid", uid)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80  # version 8
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
        return f"2.25.{int.from_bytes(raw, 'big')}"

    def pseudonym(self, identity: PatientIdentity) -> str:
        digest = self._mac("patient", f"{identity.issuer}\\{identity.patient_id}").hex()
        return f"{self.project[:40]}-{digest[:20].upper()}"

    def date_shift(self, identity: PatientIdentity) -> timedelta:
        digest = self._mac("dates", f"{identity.issuer}\\{identity.patient_id}")
        return -timedelta(days=1 + int.from_bytes(digest[:8], "big") % MAX_SHIFT_DAYS)


@dataclass(frozen=True)
class Deidentified:
    """What one call changed, for the mapping kept in the clinical partition."""

    original: PatientIdentity
    original_study_instance_uid: str
    pseudonym: str
    study_instance_uid: str
    date_shift_days: int


def patient_identity(ds: Dataset) -> PatientIdentity:
    """The patient a data set belongs to. Without a Patient ID, its study stands for the
    patient, so that two unidentified patients are never merged."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not patient_id:
        return PatientIdentity("", f"study:{ds.get('StudyInstanceUID', '')}")
    return PatientIdentity(str(ds.get("IssuerOfPatientID", "") or "").strip(), patient_id)


def held_back_reason(ds: Dataset, held_back_modalities: Collection[str]) -> str | None:
    """Why ``ds`` must not leave de-identified (its pixels may identify), or None."""
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "Burned In Annotation (0028,0301) is YES: text in the pixels"
    if str(ds.get("RecognizableVisualFeatures", "")).upper() == "YES":
        return "Recognizable Visual Features (0028,0302) is YES: a face may be in the pixels"
    modality = str(ds.get("Modality", "")).upper()
    if modality in held_back_modalities:
        return (
            f"modality {modality} often carries text burned into the pixels "
            "([research] held_back_modalities)"
        )
    return None


def deidentify(ds: Dataset, deidentifier: Deidentifier) -> Deidentified:
    """De-identify ``ds`` in place (its File Meta Information too); raises :class:`HeldBack`
    for an instance whose pixels may identify the patient."""
    reason = held_back_reason(ds, deidentifier.held_back_modalities)
    if reason is not None:
        raise HeldBack(reason)
    identity = patient_identity(ds)
    pseudonym = deidentifier.pseudonym(identity)
    shift = deidentifier.date_shift(identity)
    original_study = str(ds.get("StudyInstanceUID", ""))
    run = _Run(deidentifier, shift, _identifiers(ds))
    run.dataset(ds, in_content=False)
    ds.PatientID = pseudonym
    ds.PatientName = f"{pseudonym}^"  # the family name component (PS3.5 6.2.1.1)
    # PS3.15 E.1.1: record what was done (PS3.3 C.7.1.1).
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    ds.DeidentificationMethodCodeSequence = Sequence(
        [_code(value, "DCM", meaning) for value, meaning in METHOD_CODES]
    )
    ds.LongitudinalTemporalInformationModified = "MODIFIED"  # PS3.3 C.7.6.1.1.1 (0028,0303)
    _new_file_meta(ds)
    return Deidentified(
        original=identity,
        original_study_instance_uid=original_study,
        pseudonym=pseudonym,
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        date_shift_days=shift.days,
    )


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _new_file_meta(ds: Dataset) -> None:
    """File Meta Information rebuilt from the de-identified data set (PS3.10 7.1): its old
    elements (Source Application Entity Title, private information) are not carried."""
    old = getattr(ds, "file_meta", None)
    meta = FileMetaDataset()
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if old is not None and "TransferSyntaxUID" in old:
        meta.TransferSyntaxUID = old.TransferSyntaxUID
    ds.file_meta = meta


# Identifying values a descriptor may repeat (Clean Descriptors removes them from the text).
_IDENTIFIER_KEYWORDS = (
    "PatientID",
    "OtherPatientIDs",
    "AccessionNumber",
    "IssuerOfPatientID",
    "AdmissionID",
    "MedicalRecordLocator",
    "PatientBirthDate",
    "PatientBirthName",
    "PatientMotherBirthName",
    "StudyID",
)


def _identifiers(ds: Dataset) -> list[str]:
    """Every identifying string of ``ds`` (person names, by component, and IDs), longest
    first, for Clean Descriptors."""
    found: set[str] = set()

    def collect(dataset: Dataset) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value or ():
                    collect(item)
            elif element.VR == "PN" or element.keyword in _IDENTIFIER_KEYWORDS:
                for value in _values(element):
                    for part in re.split(r"[\^=\s,]+", str(value)):
                        if len(part) >= 2:
                            found.add(part)
                    if element.keyword == "PatientBirthDate" and len(str(value)) == 8:
                        v = str(value)
                        found.update((f"{v[:4]}-{v[4:6]}-{v[6:]}", f"{v[6:]}.{v[4:6]}.{v[:4]}"))

    collect(ds)
    return sorted(found, key=len, reverse=True)


def _values(element: DataElement) -> list[object]:
    if element.value is None or element.value == "":
        return []
    if isinstance(element.value, MultiValue | list):
        return list(element.value)
    return [element.value]


@dataclass
class _Run:
    deidentifier: Deidentifier
    shift: timedelta
    identifiers: list[str]

    def dataset(self, ds: Dataset, *, in_content: bool) -> None:
        for tag in list(ds.keys()):
            if tag in _PIXELS:
                continue  # kept as they are, and never read here (deferred in a large file)
            element = ds[tag]
            self.element(ds, element, in_content=in_content)

    def element(self, ds: Dataset, element: DataElement, *, in_content: bool) -> None:
        tag = int(element.tag)
        group = tag >> 16
        if group % 2 == 1 or tag & 0xFFFF == 0:  # private; group lengths (stale after this)
            del ds[tag]
            return
        if 0x6000 <= group <= 0x601E:  # an overlay: Overlay Data is X, the rest means nothing
            del ds[tag]
            return
        if in_content and tag == TEXT_VALUE:
            element.value = _DUMMY_TEXT
            return
        row = row_for(tag)
        if row is None:
            self.unlisted(ds, element, in_content=in_content)
            return
        action = row.action(OPTIONS)
        if action == "X":
            del ds[tag]
        elif action == "Z" or action == "X/Z":
            element.value = Sequence() if element.VR == "SQ" else None
        elif action in ("D", "Z/D", "X/D", "X/Z/D"):
            self.dummy(element, in_content=in_content)
        elif action in ("U", "X/Z/U*"):
            if element.VR == "SQ":
                self.items(element, in_content=in_content)
            else:
                element.value = self.uids(element)
        elif action == "K":
            if element.VR == "SQ":
                self.items(element, in_content=in_content)
        elif action == "C":
            self.clean(element, in_content=in_content)
        else:  # pragma: no cover - the table is checked when parsed
            raise ValueError(f"unknown action {action!r} for {row.name}")

    def unlisted(self, ds: Dataset, element: DataElement, *, in_content: bool) -> None:
        if element.VR == "SQ":
            self.items(element, in_content=in_content)
        elif element.VR == "UI" and not _CLASS_UID.search(element.keyword or ""):
            element.value = self.uids(element)
        elif element.VR in ("DA", "DT"):
            element.value = self.shifted(element)

    def items(self, element: DataElement, *, in_content: bool) -> None:
        inside = in_content or int(element.tag) == CONTENT_SEQUENCE
        for item in element.value or ():
            self.dataset(item, in_content=inside)

    def uids(self, element: DataElement) -> object:
        def mapped(uid: str) -> str:
            uid = uid.strip("\0 ")
            if not uid or uid in UID_dictionary:
                return uid
            return self.deidentifier.new_uid(uid)

        values = [mapped(str(v)) for v in _values(element)]
        return values if len(values) > 1 else (values[0] if values else None)

    def dummy(self, element: DataElement, *, in_content: bool) -> None:
        """D: a non-zero-length value of the VR that says nothing of the patient."""
        vr = element.VR
        if vr == "SQ":
            self.items(element, in_content=in_content)
        elif vr == "UI":
            element.value = self.uids(element) or self.deidentifier.new_uid(str(element.tag))
        elif vr in ("DA", "DT"):
            element.value = self.shifted(element) or "19000101"
        elif vr == "TM":
            element.value = element.value or "000000"
        elif vr == "PN":
            element.value = "ANONYMOUS"
        elif vr in ("IS", "DS"):
            element.value = "0"
        elif vr == "AS":
            element.value = "000Y"
        elif vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
            element.value = 0
        elif vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            element.value = b"\0\0"
        else:  # AE, CS, LO, LT, SH, ST, UC, UR, UT
            element.value = _DUMMY_TEXT

    def clean(self, element: DataElement, *, in_content: bool) -> None:
        vr = element.VR
        if vr == "SQ":
            self.items(element, in_content=in_content)
        elif vr in ("DA", "DT"):
            element.value = self.shifted(element)
        elif vr == "TM":
            return  # a shift by whole days leaves times as they are
        elif vr in ("LO", "SH", "LT", "ST", "UT", "UC", "CS", "PN"):
            values = [self.cleaned_text(str(v)) for v in _values(element)]
            element.value = values if len(values) > 1 else (values[0] if values else None)
        else:
            self.dummy(element, in_content=in_content)

    def cleaned_text(self, text: str) -> str:
        for identifier in self.identifiers:
            text = re.sub(re.escape(identifier), "", text, flags=re.IGNORECASE)
        text = _DIGIT_RUN.sub("", text)
        return re.sub(r"\s{2,}", " ", text).strip()

    def shifted(self, element: DataElement) -> object:
        values = [_shift(str(v), element.VR, self.shift) for v in _values(element)]
        return values if len(values) > 1 else (values[0] if values else None)


def _shift(value: str, vr: str, shift: timedelta) -> str:
    """``value`` (DA, DA range, or DT) moved by ``shift``, at its own precision; "" when it is
    no date (an unparseable value could be anything)."""
    value = value.strip()
    if vr == "DA" and "-" in value:  # a range (PS3.4 C.2.2.2.5) in a query-like attribute
        return "-".join(_shift(part, vr, shift) if part else "" for part in value.split("-"))
    digits = value[:8]
    if not re.fullmatch(r"\d{4}(\d{2}(\d{2})?)?", digits):
        return ""
    year = int(digits[:4])
    month = int(digits[4:6] or 1)
    day = int(digits[6:8] or 1)
    try:
        moved = date(year, month, day) + shift
    except ValueError:
        return ""
    text = moved.strftime("%Y%m%d")[: len(digits)]
    return text + value[len(digits) :] if vr == "DT" else text

"""The Identifier of a Query/Retrieve request (PS3.4 C.4.1.1.3, C.4.2.1.4) and its responses.

A C-FIND request Identifier becomes a :class:`storage.query.Query` (:func:`query_request`); a row
of :func:`storage.query.search` becomes a response Identifier holding every key the SCU sent, with
the value the index holds or empty (PS3.4 C.4.1.1.3.2: keys the SCP does not support are returned
zero-length). A C-MOVE or C-GET Identifier becomes a Query on unique keys only
(:func:`retrieve_request`, PS3.4 C.4.2.2.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from server.dimse.association import Association, Message
from storage.errors import InvalidQuery
from storage.query import QUERY_KEYS, UNIQUE_KEYS, InformationModel, Query, QueryLevel

# PS3.4 C.6.1 and C.6.2: the information model a Query/Retrieve SOP class works on.
INFORMATION_MODEL: dict[str, InformationModel] = {
    PatientRootQueryRetrieveInformationModelFind: InformationModel.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelMove: InformationModel.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: InformationModel.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: InformationModel.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelMove: InformationModel.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: InformationModel.STUDY_ROOT,
}

FIND_SOP_CLASSES = frozenset(
    {PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind}
)

# PS3.4 C.6.1.1 / C.6.2.1: the levels of each information model, from the top.
LEVELS: dict[InformationModel, tuple[QueryLevel, ...]] = {
    InformationModel.PATIENT_ROOT: (
        QueryLevel.PATIENT,
        QueryLevel.STUDY,
        QueryLevel.SERIES,
        QueryLevel.IMAGE,
    ),
    InformationModel.STUDY_ROOT: (QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE),
}

QUERY_RETRIEVE_LEVEL = Tag(0x0008, 0x0052)
SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
RETRIEVE_AE_TITLE = Tag(0x0008, 0x0054)
# PS3.5 6.1.2.3: UTF-8, used in a response holding any non-ASCII value.
UTF8 = "ISO_IR 192"
# PS3.5 6.2: the VRs Hilum returns as text.
TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI"}
    | {"UR", "UT"}
)


@dataclass(frozen=True)
class RequestedKey:
    """One attribute of the request Identifier, to be returned in every response."""

    tag: BaseTag
    vr: str
    keyword: str  # "" for a private or unknown attribute


@dataclass(frozen=True)
class QueryRequest:
    query: Query
    requested: tuple[RequestedKey, ...]


def request_identifier(assoc: Association, message: Message) -> Dataset | None:
    """The decoded request Identifier, or None when there is none or it cannot be decoded."""
    if message.data is None:
        return None
    try:
        return assoc.decode_data_set(message)
    except Exception:  # noqa: BLE001 (pydicom raises many kinds on malformed bytes)
        return None


def query_request(
    identifier: Dataset | None,
    sop_class_uid: str,
    *,
    case_insensitive_person_names: bool,
) -> QueryRequest:
    """Translate a request Identifier; raise :class:`InvalidQuery` when it cannot be answered."""
    if identifier is None:
        raise InvalidQuery("the Identifier cannot be decoded")
    model = _information_model(sop_class_uid)
    level = _query_retrieve_level(identifier)
    matching: dict[str, str] = {}
    requested: list[RequestedKey] = []
    for element in _elements(identifier):
        tag = element.tag
        if tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET) or tag.group in (0, 2):
            continue
        keyword = "" if tag.is_private else keyword_for_tag(tag)
        requested.append(RequestedKey(tag, _vr(element), keyword))
        if keyword in QUERY_KEYS and element.VR != "SQ":
            matching[keyword] = _match_value(element, keyword)
    query = Query(
        level=level,
        matching=matching,
        model=model,
        case_insensitive_person_names=case_insensitive_person_names,
    )
    return QueryRequest(query, tuple(requested))


def retrieve_request(identifier: Dataset | None, sop_class_uid: str) -> Query:
    """The instances a C-MOVE or C-GET Identifier names; raise :class:`InvalidQuery` otherwise.

    PS3.4 C.4.2.2.1, hierarchical retrieve: the unique key of the retrieve level holds one UID
    (or ID) or a list of them, never empty and never a wild card; the unique keys of the levels
    above may hold one value each and are matched; every other key is ignored, never matched.
    """
    if identifier is None:
        raise InvalidQuery("the Identifier cannot be decoded")
    model = _information_model(sop_class_uid)
    level = _query_retrieve_level(identifier)
    levels = LEVELS[model]
    if level not in levels:
        raise InvalidQuery(f"the {model.value} model has no {level.value} level")
    matching: dict[str, str] = {}
    for above in levels[: levels.index(level) + 1]:
        keyword = UNIQUE_KEYS[above]
        value = _unique_key_value(identifier, keyword)
        values = value.split("\\")
        if above == level and not value:
            raise InvalidQuery(f"{keyword} is required at the {level.value} level")
        if not value:
            continue  # a higher level's key may be absent or empty
        if "*" in value or "?" in value:
            raise InvalidQuery(f"{keyword}: no wild cards in a retrieve")
        if not all(values):
            raise InvalidQuery(f"{keyword}: an empty value in the list")
        if above != level and len(values) > 1:
            raise InvalidQuery(f"{keyword}: one value only above the retrieve level")
        matching[keyword] = value
    return Query(level=level, matching=matching, model=model)


def response_identifier(
    request: QueryRequest, row: Mapping[str, Any], retrieve_ae_title: str
) -> Dataset:
    """The Identifier of one pending C-FIND response (PS3.4 C.4.1.1.3.2)."""
    ds = Dataset()
    non_ascii = False
    for key in request.requested:
        if key.tag == RETRIEVE_AE_TITLE:
            ds.add(DataElement(key.tag, "AE", retrieve_ae_title))
            continue
        value = _dicom_value(row.get(key.keyword), key.vr)
        non_ascii = non_ascii or (isinstance(value, str) and not value.isascii())
        non_ascii = non_ascii or any(isinstance(v, str) and not v.isascii() for v in _list(value))
        ds.add(DataElement(key.tag, key.vr, value))
    ds.QueryRetrieveLevel = request.query.level.value
    # PS3.4 C.4.1.1.3.2: the response names the character set of its values; the index keeps
    # them as Unicode, so any non-ASCII value is sent as UTF-8.
    if non_ascii:
        ds.SpecificCharacterSet = UTF8
    return ds


def _elements(identifier: Dataset) -> Iterable[DataElement]:
    for tag in sorted(identifier.keys()):  # the tags, without converting values
        try:
            yield identifier[tag]
        except Exception as error:  # noqa: BLE001 (pydicom raises many kinds on a bad value)
            name = keyword_for_tag(tag) or str(tag)
            raise InvalidQuery(f"{name}: the value cannot be read ({error})") from error


def _information_model(sop_class_uid: str) -> InformationModel:
    try:
        return INFORMATION_MODEL[sop_class_uid]
    except KeyError:
        raise InvalidQuery(f"SOP Class {sop_class_uid} is not a supported Q/R model") from None


def _unique_key_value(identifier: Dataset, keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in identifier:
        return ""
    try:
        element = identifier[tag]
    except Exception as error:  # noqa: BLE001 (pydicom raises many kinds on a bad value)
        raise InvalidQuery(f"{keyword}: the value cannot be read ({error})") from error
    return _match_value(element, keyword)


def _query_retrieve_level(identifier: Dataset) -> QueryLevel:
    # PS3.4 C.4.1.1.3.1: Query/Retrieve Level is required in every request Identifier.
    value = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not value:
        raise InvalidQuery("Query/Retrieve Level (0008,0052) is missing")
    try:
        return QueryLevel(value)
    except ValueError:
        raise InvalidQuery(f"unknown Query/Retrieve Level {value!r}") from None


def _vr(element: DataElement) -> str:
    if element.VR not in ("UN", "") or element.tag.is_private:
        return str(element.VR)
    try:
        return str(dictionary_VR(element.tag)).split(" or ")[0]
    except KeyError:
        return "UN"


def _match_value(element: DataElement, keyword: str) -> str:
    """The value in DICOM string form: backslash between values, as PS3.4 C.2.2.2 reads it."""
    value = element.value
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        raise InvalidQuery(f"{keyword}: a {element.VR} value cannot be a matching key")
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    text = "\\".join("" if v is None else str(v) for v in values)
    if element.VR in TEXT_VRS:
        text = text.strip(" \x00")
    return text


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []


def _dicom_value(value: Any, vr: str) -> Any:
    if vr == "SQ":
        return Sequence()  # PS3.4 C.2.2.1.3: sequence matching is not supported; empty
    if value is None:
        return None
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, int) and vr in TEXT_VRS:
        return str(value)
    return value

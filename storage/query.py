"""DICOM matching (PS3.4 C.2.2.2) translated to SQL once, for C-FIND and QIDO-RS.

A :class:`Query` names a level, matching keys in their DICOM string form and return keys.
:func:`search` answers it with one SQL statement on indexed columns, streamed from a database
cursor; :func:`locate_instances` turns the same query into the stored instances beneath the
matched entities (for C-MOVE, C-GET and WADO-RS).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydicom.datadict import tag_for_keyword
from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    and_,
    bindparam,
    exists,
    func,
    null,
    or_,
    select,
)
from sqlalchemy.orm import aliased

from storage.dicom_file import is_valid_uid
from storage.errors import InvalidQuery
from storage.frame_table import FrameTable, stored_frame_table
from storage.index.database import database_errors
from storage.index.models import Instance, Patient, Series, Study

if TYPE_CHECKING:
    from storage.archive import Archive
    from storage.audit import AuditEntry, Requestor

# Rows fetched from the cursor at a time: results stream, whatever their number.
_BATCH = 500


class QueryLevel(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class InformationModel(StrEnum):
    PATIENT_ROOT = "PATIENT_ROOT"
    STUDY_ROOT = "STUDY_ROOT"


_DEPTH = {QueryLevel.PATIENT: 0, QueryLevel.STUDY: 1, QueryLevel.SERIES: 2, QueryLevel.IMAGE: 3}
_TABLES = (Patient, Study, Series, Instance)
# PS3.4 C.6.1.1 / C.6.2.1: the unique key of each level.
UNIQUE_KEYS = {
    QueryLevel.PATIENT: "PatientID",
    QueryLevel.STUDY: "StudyInstanceUID",
    QueryLevel.SERIES: "SeriesInstanceUID",
    QueryLevel.IMAGE: "SOPInstanceUID",
}


@dataclass(frozen=True)
class QueryKey:
    """An attribute the index can match and return (PS3.4 C.6.1.1 / C.6.2.1 tables)."""

    keyword: str
    tag: int
    vr: str
    level: QueryLevel
    multi_valued: bool = False


@dataclass(frozen=True)
class Query:
    level: QueryLevel
    # keyword -> value in DICOM string form: "" universal, "DOE*" wild card, "20260101-" range,
    # "1.2\\1.3" list of values (PS3.4 C.2.2.2).
    matching: Mapping[str, str]
    return_keys: Sequence[str] = ()
    model: InformationModel = InformationModel.STUDY_ROOT
    case_insensitive_person_names: bool = True
    limit: int | None = None
    offset: int = 0


@dataclass(frozen=True)
class StoredInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int
    number_of_frames: int
    # Where each frame lies in the stored file (storage.frame_table); None when not
    # range-readable, or not asked for.
    frame_ranges: FrameTable | None
    # DICOM JSON (PS3.18 F.2) of the header, only when asked for.
    metadata: dict[str, Any] | None = None
    # The storage tier that holds the blob ("" the primary store): pass it to every read.
    tier: str = ""


# Attributes stored as columns: keyword -> (level, column).
_STORED: dict[str, tuple[QueryLevel, Any]] = {
    "PatientName": (QueryLevel.PATIENT, Patient.patient_name),
    "PatientID": (QueryLevel.PATIENT, Patient.patient_id),
    "IssuerOfPatientID": (QueryLevel.PATIENT, Patient.issuer_of_patient_id),
    "PatientBirthDate": (QueryLevel.PATIENT, Patient.patient_birth_date),
    "PatientSex": (QueryLevel.PATIENT, Patient.patient_sex),
    "StudyInstanceUID": (QueryLevel.STUDY, Study.study_instance_uid),
    "StudyDate": (QueryLevel.STUDY, Study.study_date),
    "StudyTime": (QueryLevel.STUDY, Study.study_time),
    "AccessionNumber": (QueryLevel.STUDY, Study.accession_number),
    "StudyID": (QueryLevel.STUDY, Study.study_id),
    "StudyDescription": (QueryLevel.STUDY, Study.study_description),
    "ReferringPhysicianName": (QueryLevel.STUDY, Study.referring_physician_name),
    "ModalitiesInStudy": (QueryLevel.STUDY, Study.modalities_in_study),
    "SeriesInstanceUID": (QueryLevel.SERIES, Series.series_instance_uid),
    "Modality": (QueryLevel.SERIES, Series.modality),
    "SeriesNumber": (QueryLevel.SERIES, Series.series_number),
    "SeriesDescription": (QueryLevel.SERIES, Series.series_description),
    "BodyPartExamined": (QueryLevel.SERIES, Series.body_part_examined),
    "SeriesDate": (QueryLevel.SERIES, Series.series_date),
    "SeriesTime": (QueryLevel.SERIES, Series.series_time),
    "SOPInstanceUID": (QueryLevel.IMAGE, Instance.sop_instance_uid),
    "SOPClassUID": (QueryLevel.IMAGE, Instance.sop_class_uid),
    "InstanceNumber": (QueryLevel.IMAGE, Instance.instance_number),
    "NumberOfFrames": (QueryLevel.IMAGE, Instance.number_of_frames),
}


# count(*), not count(id): PostgreSQL can then count from the foreign-key index alone (an index-only
# scan, once VACUUM has marked the pages all-visible).


def _count_patient_studies() -> Any:
    s = aliased(Study)
    return select(func.count()).select_from(s).where(s.patient_pk == Patient.id).scalar_subquery()


def _count_patient_series() -> Any:
    s, se = aliased(Study), aliased(Series)
    return (
        select(func.count())
        .select_from(se)
        .join(s, se.study_pk == s.id)
        .where(s.patient_pk == Patient.id)
        .scalar_subquery()
    )


def _count_patient_instances() -> Any:
    s, se, i = aliased(Study), aliased(Series), aliased(Instance)
    return (
        select(func.count())
        .select_from(i)
        .join(se, i.series_pk == se.id)
        .join(s, se.study_pk == s.id)
        .where(s.patient_pk == Patient.id)
        .scalar_subquery()
    )


def _count_study_series() -> Any:
    se = aliased(Series)
    return select(func.count()).select_from(se).where(se.study_pk == Study.id).scalar_subquery()


def _count_study_instances() -> Any:
    se, i = aliased(Series), aliased(Instance)
    return (
        select(func.count())
        .select_from(i)
        .join(se, i.series_pk == se.id)
        .where(se.study_pk == Study.id)
        .scalar_subquery()
    )


def _count_series_instances() -> Any:
    i = aliased(Instance)
    return select(func.count()).select_from(i).where(i.series_pk == Series.id).scalar_subquery()


# Attributes computed from the levels below (PS3.4 C.3.4): keyword -> (level, expression factory).
_COMPUTED: dict[str, tuple[QueryLevel, Callable[[], Any]]] = {
    "NumberOfPatientRelatedStudies": (QueryLevel.PATIENT, _count_patient_studies),
    "NumberOfPatientRelatedSeries": (QueryLevel.PATIENT, _count_patient_series),
    "NumberOfPatientRelatedInstances": (QueryLevel.PATIENT, _count_patient_instances),
    "NumberOfStudyRelatedSeries": (QueryLevel.STUDY, _count_study_series),
    "NumberOfStudyRelatedInstances": (QueryLevel.STUDY, _count_study_instances),
    "NumberOfSeriesRelatedInstances": (QueryLevel.SERIES, _count_series_instances),
}
# Return keys only: counted at query time, never matched.
COMPUTED_KEYS = frozenset(_COMPUTED)
# Depends on the dialect (distinct string aggregation); built in _sop_classes_in_study.
_SOP_CLASSES_IN_STUDY = "SOPClassesInStudy"

_VR = {
    "PatientName": "PN",
    "PatientID": "LO",
    "IssuerOfPatientID": "LO",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "StudyInstanceUID": "UI",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "AccessionNumber": "SH",
    "StudyID": "SH",
    "StudyDescription": "LO",
    "ReferringPhysicianName": "PN",
    "ModalitiesInStudy": "CS",
    "SOPClassesInStudy": "UI",
    "SeriesInstanceUID": "UI",
    "Modality": "CS",
    "SeriesNumber": "IS",
    "SeriesDescription": "LO",
    "BodyPartExamined": "CS",
    "SeriesDate": "DA",
    "SeriesTime": "TM",
    "SOPInstanceUID": "UI",
    "SOPClassUID": "UI",
    "InstanceNumber": "IS",
    "NumberOfFrames": "IS",
}
_MULTI_VALUED = {"ModalitiesInStudy", "SOPClassesInStudy"}


def _query_keys() -> dict[str, QueryKey]:
    levels = {k: level for k, (level, _) in {**_STORED, **_COMPUTED}.items()}
    levels[_SOP_CLASSES_IN_STUDY] = QueryLevel.STUDY
    return {
        keyword: QueryKey(
            keyword,
            tag_for_keyword(keyword) or 0,
            _VR.get(keyword, "IS"),
            level,
            keyword in _MULTI_VALUED,
        )
        for keyword, level in levels.items()
    }


QUERY_KEYS: dict[str, QueryKey] = _query_keys()

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def entity_query(study: str, series: str | None = None, instances: Sequence[str] = ()) -> Query:
    """The query naming one study, one of its series, or instances (one or a list) by UID."""
    matching = {"StudyInstanceUID": study}
    level = QueryLevel.STUDY
    if series is not None:
        matching["SeriesInstanceUID"] = series
        level = QueryLevel.SERIES
    if instances:
        matching["SOPInstanceUID"] = "\\".join(instances)
        level = QueryLevel.IMAGE
    return Query(level=level, matching=matching)


def search(
    archive: Archive, query: Query, audit: tuple[Requestor, AuditEntry] | None = None
) -> Generator[dict[str, Any]]:
    """Yield one dict per matching entity: keyword -> value.

    Values are ``str``, ``int`` (counts and IS attributes), ``list[str]`` (multi-valued) or
    ``None`` (empty). The dict holds the unique keys of the level and the levels above, and
    every matching and return key the index holds at or above the level; keys it does not
    hold are absent. Rows are streamed; closing the generator closes the cursor.

    ``audit``: the search's own audit record (who asks, the Query entry), committed when the
    first row is asked for, before the statement runs, on the connection the statement then
    runs on (``Archive.record``; on SQLite the search keeps its page cache); a failure to write
    it is raised (``storage.audit.AuditUnavailable``) and nothing is searched.
    """
    _check_level(query)
    depth = _DEPTH[query.level]
    dialect = archive.index.dialect
    wanted = _returned_keys(query, depth)
    columns = [_expression(keyword, dialect).label(keyword) for keyword in wanted]
    statement = _join(select(*columns), depth, archive.partition)
    statement = statement.where(*_conditions(query, depth, dialect))
    if query.limit is not None or query.offset:
        statement = statement.order_by(_TABLES[depth].id).offset(query.offset or None)
        statement = statement.limit(query.limit)
    with database_errors(), archive.index.read_connection() as connection:
        if audit is not None:
            archive.record(audit[0], audit[1], connection=connection)
        result = connection.execute(statement.execution_options(yield_per=_BATCH))
        # Rows are read by position: a lookup by name costs each of thousands of rows more than
        # its SQL.
        for row in result:
            yield {key: _value(key, value) for key, value in zip(wanted, row, strict=True)}


def where_studies_match(statement: Select, archive: Archive, query: Query) -> Select:
    """``statement`` over ``patient ⋈ study`` in the archive's partition, restricted to the
    studies that ``query`` (a STUDY-level query) matches: the same translation to SQL as
    :func:`search`, for callers that select other columns (the web worklist)."""
    if query.level != QueryLevel.STUDY:
        raise InvalidQuery("where_studies_match takes a STUDY-level query")
    _check_level(query)
    depth = _DEPTH[QueryLevel.STUDY]
    statement = _join(statement, depth, archive.partition)
    return statement.where(*_conditions(query, depth, archive.index.dialect))


def locate_instances(
    archive: Archive,
    query: Query,
    *,
    with_metadata: bool = False,
    with_frame_ranges: bool = False,
) -> Generator[StoredInstance]:
    """Every stored instance beneath the entities ``query`` matches, streamed in order of
    study, series (number) and instance (number).

    The metadata and the frame ranges (one entry per frame: large for a whole-slide image)
    are read only when asked for.
    """
    _check_level(query)
    depth = _DEPTH[query.level]
    uids = _entity_uids(query, depth)
    if uids is not None:  # what WADO-RS asks on every request: a prebuilt statement
        statement = _entity_statement(tuple(uids), with_frame_ranges, with_metadata)
        parameters = {"partition": archive.partition, **uids}
    else:
        statement = _join(
            _locate_columns(with_frame_ranges, with_metadata),
            _DEPTH[QueryLevel.IMAGE],
            archive.partition,
        )
        statement = statement.where(*_conditions(query, depth, archive.index.dialect))
        statement = statement.order_by(*_LOCATE_ORDER).execution_options(yield_per=_BATCH)
        parameters = {}
    with database_errors(), archive.index.read() as session:
        for row in session.connection().execute(statement, parameters):
            (study, series, sop, sop_class, syntax, key, size, frames, packed, legacy, meta,
             tier) = row  # fmt: skip
            table = stored_frame_table(packed, legacy, key)
            yield StoredInstance(
                study, series, sop, sop_class, syntax, key, size, frames, table, meta, tier
            )


_LOCATE_ORDER = (Study.id, Series.series_number, Series.id, Instance.instance_number, Instance.id)


def _locate_columns(with_frame_ranges: bool, with_metadata: bool) -> Select:
    return select(
        Study.study_instance_uid,
        Series.series_instance_uid,
        Instance.sop_instance_uid,
        Instance.sop_class_uid,
        Instance.transfer_syntax_uid,
        Instance.blob_key,
        Instance.size,
        Instance.number_of_frames,
        Instance.frame_table if with_frame_ranges else null(),
        Instance.frame_ranges if with_frame_ranges else null(),
        Instance.metadata_json if with_metadata else null(),
        Instance.tier,
    )


def _entity_uids(query: Query, depth: int) -> dict[str, str] | None:
    """The query's UIDs when it names entities by their unique keys alone, one valid UID each
    (what :func:`entity_query` makes of a WADO-RS URL); None for any other query."""
    unique = [UNIQUE_KEYS[level] for level in (QueryLevel.STUDY, QueryLevel.SERIES,
                                                QueryLevel.IMAGE)][:depth]  # fmt: skip
    if not query.matching or any(key not in unique for key in query.matching):
        return None
    if not all(is_valid_uid(uid) for uid in query.matching.values()):
        return None  # a list, a wild card or a malformed UID: the general path says which
    return dict(query.matching)


@functools.cache
def _entity_statement(
    keys: tuple[str, ...], with_frame_ranges: bool, with_metadata: bool
) -> Select:
    """The statement of :func:`locate_instances` for unique keys ``keys``, values bound at
    execution: built once instead of on every request."""
    statement = _join(
        _locate_columns(with_frame_ranges, with_metadata),
        _DEPTH[QueryLevel.IMAGE],
        bindparam("partition"),
    )
    statement = statement.where(*(_STORED[key][1] == bindparam(key) for key in keys))
    # The execution options too: a copy made per call would be compiled, or at least have its
    # cache key computed and its result columns matched to the cached ones, on every request.
    return statement.order_by(*_LOCATE_ORDER).execution_options(yield_per=_BATCH)


def _check_level(query: Query) -> None:
    if not isinstance(query.level, QueryLevel):
        raise InvalidQuery(f"unknown query level {query.level!r}")
    # PS3.4 C.6.2: the Study Root model has no PATIENT level.
    if query.model == InformationModel.STUDY_ROOT and query.level == QueryLevel.PATIENT:
        raise InvalidQuery("the Study Root information model has no PATIENT level")
    if query.limit is not None and query.limit < 0 or query.offset < 0:
        raise InvalidQuery("limit and offset must not be negative")
    for keyword, value in query.matching.items():
        # PS3.5 6.1.2: NUL is no character of any DICOM string (only UI padding), and
        # PostgreSQL refuses it in a text parameter.
        if "\x00" in value:
            raise InvalidQuery(f"{keyword}: the matching value contains a NUL character")


def _visible(keyword: str, depth: int) -> bool:
    key = QUERY_KEYS.get(keyword)
    return key is not None and _DEPTH[key.level] <= depth


def _returned_keys(query: Query, depth: int) -> list[str]:
    unique = [UNIQUE_KEYS[level] for level, d in _DEPTH.items() if d <= depth]
    wanted = dict.fromkeys([*unique, *query.matching, *query.return_keys])
    return [keyword for keyword in wanted if _visible(keyword, depth)]


def _join(statement: Select, depth: int, partition: str | BindParameter[str]) -> Select:
    """FROM patient JOIN study JOIN series JOIN instance, down to ``depth``, in ``partition``."""
    statement = statement.select_from(Patient).where(Patient.partition == partition)
    parents = {Study: Study.patient_pk == Patient.id, Series: Series.study_pk == Study.id}
    parents[Instance] = Instance.series_pk == Series.id
    for table in _TABLES[1 : depth + 1]:
        statement = statement.join(table, parents[table]).where(table.partition == partition)
    return statement


@functools.cache
def _expression(keyword: str, dialect: str) -> Any:
    # Built once per key and dialect: SQLAlchemy expressions are immutable, and building the
    # aliased sub-queries costs milliseconds that every search would otherwise pay.
    if keyword in _STORED:
        return _STORED[keyword][1]
    if keyword == _SOP_CLASSES_IN_STUDY:
        return _sop_classes_in_study(dialect)
    return _COMPUTED[keyword][1]()


def _sop_classes_in_study(dialect: str) -> Any:
    se, i = aliased(Series), aliased(Instance)
    if dialect == "postgresql":
        aggregate = func.string_agg(i.sop_class_uid.distinct(), ",")
    else:
        aggregate = func.group_concat(i.sop_class_uid.distinct())  # separator ","
    return (
        select(aggregate)
        .join(se, i.series_pk == se.id)
        .where(se.study_pk == Study.id)
        .scalar_subquery()
    )


def _value(keyword: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if keyword == "ModalitiesInStudy":
        return value.split("\\")
    if keyword == _SOP_CLASSES_IN_STUDY:
        return sorted(value.split(","))
    return value


def _conditions(query: Query, depth: int, dialect: str) -> list[ColumnElement[bool]]:
    conditions = []
    for keyword, value in query.matching.items():
        # PS3.4 C.2.2.1.2: a key the SCP cannot match on (unknown, below the level, or a
        # computed count) is treated as a return key.
        if not value or not _visible(keyword, depth) or keyword in _COMPUTED:
            continue
        alternatives = value.split("\\")
        if keyword == "ModalitiesInStudy":
            conditions.append(_modalities_in_study(alternatives, query, dialect))
        elif keyword == _SOP_CLASSES_IN_STUDY:
            conditions.append(_sop_classes_match(alternatives))
        else:
            condition = _match(keyword, _STORED[keyword][1], alternatives, query, dialect)
            if condition is not None:
                conditions.append(condition)
    return conditions


def _modalities_in_study(values: list[str], query: Query, dialect: str) -> ColumnElement[bool]:
    # PS3.4 C.6.2.1.2: a study matches when any of its series has one of the modalities.
    se = aliased(Series)
    condition = _match("Modality", se.modality, values, query, dialect)
    if condition is None:
        return exists().where(se.study_pk == Study.id)
    return exists().where(se.study_pk == Study.id, condition)


def _sop_classes_match(values: list[str]) -> ColumnElement[bool]:
    se, i = aliased(Series), aliased(Instance)
    uids = _uids("SOPClassesInStudy", values)
    if uids is None:
        return exists().where(se.study_pk == Study.id)
    return exists().where(se.study_pk == Study.id, i.series_pk == se.id, i.sop_class_uid.in_(uids))


def _match(
    keyword: str, column: Any, values: list[str], query: Query, dialect: str
) -> ColumnElement[bool] | None:
    """The condition for one key; None for universal matching."""
    vr = _VR[keyword]
    if vr == "UI":
        uids = _uids(keyword, values)
        return None if uids is None else column.in_(uids)
    conditions = []
    for value in values:
        if value == "*":  # PS3.4 C.2.2.2.3: a lone "*" is universal matching
            return None
        if vr in ("DA", "TM"):
            conditions.append(_range(keyword, column, vr, value))
        elif vr == "IS":
            conditions.append(column == _integer(keyword, value))
        else:
            conditions.append(_string(keyword, column, vr, value, query, dialect))
    return conditions[0] if len(conditions) == 1 else or_(*conditions)


def _uids(keyword: str, values: list[str]) -> list[str] | None:
    # PS3.4 C.2.2.2.2: UIDs match by single value or list, never by wild card.
    if values == ["*"]:
        return None
    for uid in values:
        if not is_valid_uid(uid):
            raise InvalidQuery(f"{keyword}: {uid!r} is not a valid UID")
    return values


def _integer(keyword: str, value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise InvalidQuery(f"{keyword}: {value[:40]!r} is not an integer string (IS)") from None
    # PS3.5 6.2: an IS value lies in -2^31 .. 2^31 - 1 (also the index column's range).
    if not -(2**31) <= number < 2**31:
        raise InvalidQuery(f"{keyword}: {value[:40]!r} is outside the range of an IS value")
    return number


def _range(keyword: str, column: Any, vr: str, value: str) -> ColumnElement[bool]:
    """PS3.4 C.2.2.2.5: single value, ``a-b``, ``a-`` or ``-b`` on DA and TM."""
    pattern = _DATE if vr == "DA" else _TIME
    low, dash, high = (part.strip().replace(":", "") for part in value.partition("-"))
    for bound in (low, high):
        if bound and not pattern.match(bound):
            raise InvalidQuery(f"{keyword}: {value!r} is not a valid {vr} value or range")
    if not dash:
        return column == low if vr == "DA" else column.startswith(low, autoescape=True)
    if not low and not high:
        raise InvalidQuery(f"{keyword}: {value!r} is a range without bounds")
    conditions = [column != ""]  # an empty value lies in no range
    if low:
        conditions.append(column >= low)
    if high:
        # A time bound covers the whole of its last component: "1200" includes 12:00:30.
        conditions.append(column <= (high if vr == "DA" else high.ljust(16, "9")))
    return and_(*conditions)


def _string(
    keyword: str, column: Any, vr: str, value: str, query: Query, dialect: str
) -> ColumnElement[bool]:
    # PS3.4 C.2.2.2.1.1: Person Name matching may ignore case; other VRs match exactly.
    if vr == "PN" and query.case_insensitive_person_names:
        value = value.upper()
        column = Patient.patient_name_upper if keyword == "PatientName" else func.upper(column)
    if "*" not in value and "?" not in value:
        return column == value
    # PS3.4 C.2.2.2.4: "*" any sequence of characters, "?" any single character; the match stays
    # case-sensitive, so SQLite uses GLOB (its LIKE ignores case) and PostgreSQL LIKE.
    if dialect == "sqlite":
        return column.op("GLOB")(value.replace("[", "[[]"))
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


__all__ = [
    "COMPUTED_KEYS",
    "QUERY_KEYS",
    "entity_query",
    "UNIQUE_KEYS",
    "InformationModel",
    "InvalidQuery",
    "Query",
    "QueryKey",
    "QueryLevel",
    "StoredInstance",
    "locate_instances",
    "search",
    "where_studies_match",
]

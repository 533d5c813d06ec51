"""Partition -> Patient -> Study -> Series -> Instance.

Each level keeps the attributes PS3.4 Annex C lists as required or commonly used matching and
return keys at that level. Every row carries its partition (tenant), and every unique key and
index starts with it, so every query is scoped by it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DEFAULT_PARTITION = "default"

JSONType = JSON().with_variant(JSONB(), "postgresql")
# PS3.5 6.2: maximum lengths of the value representations stored here.
UI, LO, SH, CS, PN, DA, TM, AE, IS = 64, 64, 16, 16, 324, 8, 16, 16, 12


class Base(DeclarativeBase):
    pass


class Partition(Base):
    __tablename__ = "partition"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (
        UniqueConstraint("partition", "patient_id", "issuer_of_patient_id"),
        Index("ix_patient_name", "partition", "patient_name_upper"),
        # PostgreSQL: serves prefix wild cards (LIKE 'DOE%') whatever the collation (0003).
        Index(
            "ix_patient_name_pattern",
            "partition",
            "patient_name_upper",
            postgresql_ops={"patient_name_upper": "varchar_pattern_ops"},
        ).ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    partition: Mapped[str] = mapped_column(ForeignKey("partition.name"))
    patient_id: Mapped[str] = mapped_column(String(LO), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(LO), default="")
    patient_name: Mapped[str] = mapped_column(String(PN), default="")
    # Upper-cased copy for case-insensitive Person Name matching on both databases.
    patient_name_upper: Mapped[str] = mapped_column(String(PN), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(DA), default="")
    patient_sex: Mapped[str] = mapped_column(String(CS), default="")


class Study(Base):
    __tablename__ = "study"
    __table_args__ = (
        UniqueConstraint("partition", "study_instance_uid"),
        Index("ix_study_date", "partition", "study_date"),
        Index("ix_study_accession", "partition", "accession_number"),
        Index("ix_study_patient", "patient_pk"),
        # The AI side's stability scan (migration 0002).
        Index("ix_study_last_instance", "partition", "last_instance_at"),
        # The worklist's default order: STAT first, newest first (migration 0004).
        Index("ix_study_worklist", "partition", "ai_priority", "created_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    partition: Mapped[str] = mapped_column(ForeignKey("partition.name"))
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"))
    study_instance_uid: Mapped[str] = mapped_column(String(UI))
    study_date: Mapped[str] = mapped_column(String(DA), default="")
    study_time: Mapped[str] = mapped_column(String(TM), default="")
    accession_number: Mapped[str] = mapped_column(String(SH), default="")
    study_id: Mapped[str] = mapped_column(String(SH), default="")
    study_description: Mapped[str] = mapped_column(String(LO), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(PN), default="")
    # Backslash-separated distinct Modality values of the study's series (PS3.4 C.6.2.1.2).
    modalities_in_study: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # When an instance of the study was last read from a colder storage tier; with
    # last_instance_at, what `hilum tiers apply` ages the study by (migration 0005).
    last_read_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, default=None
    )
    last_instance_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The last_instance_at the study had when the AI side last marked it stable; a study whose
    # last_instance_at differs (a newer instance arrived) is unstable again. Migration 0002.
    stable_last_instance_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, default=None
    )
    # Why no model applies to the study (inference.rules.why_no_model), written by the stability
    # scan when it queues nothing; "" otherwise. Migration 0004.
    ai_note: Mapped[str] = mapped_column(Text, default="", server_default="")
    # The highest priority its AI jobs were queued with (STAT: [inference.priority]); the
    # worklist lists STAT studies first from this column's index. Migration 0004.
    ai_priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (
        UniqueConstraint("partition", "series_instance_uid"),
        Index("ix_series_study", "study_pk"),
        Index("ix_series_modality", "partition", "modality"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    partition: Mapped[str] = mapped_column(ForeignKey("partition.name"))
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"))
    series_instance_uid: Mapped[str] = mapped_column(String(UI))
    modality: Mapped[str] = mapped_column(String(CS), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(LO), default="")
    body_part_examined: Mapped[str] = mapped_column(String(CS), default="")
    series_date: Mapped[str] = mapped_column(String(DA), default="")
    series_time: Mapped[str] = mapped_column(String(TM), default="")


class Instance(Base):
    __tablename__ = "instance"
    __table_args__ = (
        UniqueConstraint("partition", "sop_instance_uid"),
        Index("ix_instance_series", "series_pk"),
        Index("ix_instance_sop_class", "partition", "sop_class_uid"),
        Index("ix_instance_blob_key", "blob_key"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    partition: Mapped[str] = mapped_column(ForeignKey("partition.name"))
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_instance_uid: Mapped[str] = mapped_column(String(UI))
    sop_class_uid: Mapped[str] = mapped_column(String(UI))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UI))
    blob_key: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # The storage tier ([[storage.tiers]] name) that holds the blob; "" the primary blob store.
    tier: Mapped[str] = mapped_column(String(32), default="", server_default="")
    # The tier a move took the blob from, while its copy there may not be deleted yet (a move
    # interrupted between its index update and the delete); the next `hilum tiers apply`
    # deletes that copy and clears this. None: no copy elsewhere.
    tier_copy: Mapped[str | None] = mapped_column(String(32), nullable=True, default=None)
    calling_ae_title: Mapped[str] = mapped_column(String(AE), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # DICOM JSON (PS3.18 F.2) of the header, bulk data replaced by BulkDataURIs.
    metadata_json: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # Where each frame lies in the stored file, packed (storage.frame_table, migration 0013);
    # null when frames cannot be read by range (deflated syntax, no pixel data).
    frame_table: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # Rows from before migration 0013: per frame, the [offset, length] of its fragments as
    # JSON; still read (storage.frame_table.stored_frame_table), no longer written.
    frame_ranges: Mapped[list[list[list[int]]] | None] = mapped_column(JSONType, nullable=True)


class InferenceJob(Base):
    """One model run on one series (migration 0002). The row is the queue: a worker claims a
    queued job, or a running one whose lease expired, and moves it to done or failed.

    One row per (partition, series, model name): a re-run or a re-queue after new instances
    resets the row and bumps its ``generation``. The UIDs of the job's SEG and SR derive from
    ``job_key`` and ``generation``: a retry or a re-claim after a killed worker (same generation)
    stores the same UIDs again, a run on new input (next generation) stores new ones.
    """

    __tablename__ = "inference_job"
    __table_args__ = (
        UniqueConstraint("partition", "series_instance_uid", "model_name"),
        Index("ix_inference_job_claim", "state", "priority", "id"),
        Index("ix_inference_job_study", "partition", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    partition: Mapped[str] = mapped_column(ForeignKey("partition.name"))
    study_instance_uid: Mapped[str] = mapped_column(String(UI))
    series_instance_uid: Mapped[str] = mapped_column(String(UI))
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    job_key: Mapped[str] = mapped_column(String(255))
    # Bumped by a re-queue on new input and by a re-run, never by a claim or a retry.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16))  # queued | running | done | failed
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Newest received_at of the series' instances when the job was queued: a later one means
    # the input changed and the job is queued again.
    input_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # retry backoff
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    worker: Mapped[str] = mapped_column(String(128), default="")
    # The last failure (of a retried attempt, or the final one of a failed job).
    reason: Mapped[str] = mapped_column(Text, default="")
    # SOP Instance UIDs of the SEG / SR the job stored.
    outputs: Mapped[list[str] | None] = mapped_column(JSONType, nullable=True)
    # How many findings the job's SR reports present; null until done (migration 0004).
    findings: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)


class FindingReview(Base):
    """A person's decision on one AI finding (migration 0004): the queryable copy of the review
    SR stored in the study (``review_sop_instance_uid``). The latest row of a finding is its
    current decision; earlier ones stay, as the history of labels for retraining."""

    __tablename__ = "finding_review"
    __table_args__ = (
        Index("ix_finding_review_study", "partition", "study_instance_uid"),
        Index("ix_finding_review_decided", "partition", "decided_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    partition: Mapped[str] = mapped_column(ForeignKey("partition.name"))
    study_instance_uid: Mapped[str] = mapped_column(String(UI))
    job_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), nullable=True
    )
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    # The model's TID 1500 SR and the finding's Tracking UID (TID 4108) in it.
    report_sop_instance_uid: Mapped[str] = mapped_column(String(UI))
    tracking_uid: Mapped[str] = mapped_column(String(UI))
    finding: Mapped[str] = mapped_column(String(255))  # e.g. "Lesion in Abdomen"
    decision: Mapped[str] = mapped_column(String(16))  # accepted | rejected
    reviewer: Mapped[str] = mapped_column(String(PN))
    comment: Mapped[str] = mapped_column(Text, default="")
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    review_sop_instance_uid: Mapped[str] = mapped_column(String(UI))


class AIFinding(Base):
    """One finding of a done AI job (migration 0004), as its TID 1500 SR reports it: what
    (Finding), where (Finding Site), how big, the SEG segment and SR it came from. Replaced with
    the job's next results; the model and version are the job's."""

    __tablename__ = "ai_finding"
    __table_args__ = (
        Index("ix_ai_finding_job", "job_id"),
        Index("ix_ai_finding_study", "partition", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    partition: Mapped[str] = mapped_column(ForeignKey("partition.name"))
    job_id: Mapped[int] = mapped_column(ForeignKey("inference_job.id"))
    study_instance_uid: Mapped[str] = mapped_column(String(UI))
    report_sop_instance_uid: Mapped[str] = mapped_column(String(UI))
    tracking_uid: Mapped[str] = mapped_column(String(UI))
    tracking_identifier: Mapped[str] = mapped_column(String(LO))
    finding: Mapped[str] = mapped_column(String(LO))  # code meaning, e.g. "Lesion"
    finding_code: Mapped[str] = mapped_column(String(64))  # "SCT:52988006"
    site: Mapped[str] = mapped_column(String(LO))  # "" when none
    present: Mapped[bool] = mapped_column(Boolean)  # False: reported "Absent"
    size: Mapped[float | None] = mapped_column(Float, nullable=True)
    size_unit: Mapped[str] = mapped_column(String(16))  # UCUM: "mm3", "mm2"
    segment_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    segmentation_sop_instance_uid: Mapped[str] = mapped_column(String(UI))


class AuditRecord(Base):
    """One audited action (migration 0009, ``storage/audit.py``): who, from where, what, when,
    the outcome, and the SHA-256 chaining it to the record before it. Rows are only added: no
    code path updates or deletes them, and on PostgreSQL and SQLite a trigger refuses it."""

    __tablename__ = "audit_record"
    __table_args__ = (
        Index("ix_audit_patient", "partition", "patient_id", "id"),
        Index("ix_audit_principal", "principal_name", "id"),
        Index("ix_audit_recorded", "recorded_at", "id"),
    )

    # Given by the writer (the previous record's id + 1, under the chain lock), never by a
    # sequence: a gap is a missing record.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    # ISO 8601 UTC with microseconds, as hashed (a string hashes the same on every database).
    recorded_at: Mapped[str] = mapped_column(String(32))
    event: Mapped[str] = mapped_column(String(32))  # storage.audit.AuditEvent
    action: Mapped[str] = mapped_column(String(1))  # PS3.15 A.5.1 EventActionCode C R U D E
    outcome: Mapped[int] = mapped_column(Integer)  # EventOutcomeIndicator 0 4 8 12
    reason: Mapped[str] = mapped_column(Text, default="")
    principal_kind: Mapped[str] = mapped_column(String(16))
    principal_name: Mapped[str] = mapped_column(String(255))
    token_id: Mapped[str] = mapped_column(String(64), default="")
    address: Mapped[str] = mapped_column(String(64), default="")
    transport: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str] = mapped_column(String(64), default="")
    partition: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(LO), default="")
    # Study Instance UIDs, backslash-separated (a DICOM multi-value); "" when none.
    study_uids: Mapped[str] = mapped_column(Text, default="")
    instances: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str] = mapped_column(Text, default="")  # canonical JSON object
    previous_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class PartitionAETitle(Base):
    """A Called AE Title that selects a partition over DIMSE (migration 0007): an association
    addressed to it works in that partition only. ``[dimse] ae_title`` is the default
    partition's and is not stored; each title belongs to one partition."""

    __tablename__ = "partition_ae_title"

    ae_title: Mapped[str] = mapped_column(String(AE), primary_key=True)
    partition: Mapped[str] = mapped_column(ForeignKey("partition.name"), index=True)


class AEPermission(Base):
    """What one calling AE title may do in one partition over DIMSE (migration 0007): store
    (C-STORE), query (C-FIND), retrieve (C-MOVE, C-GET), optionally only from some networks.
    Seeded from ``[dimse] ae_permissions`` / ``allowed_calling_ae_titles`` on first start."""

    __tablename__ = "ae_permission"

    calling_ae_title: Mapped[str] = mapped_column(String(AE), primary_key=True)
    partition: Mapped[str] = mapped_column(ForeignKey("partition.name"), primary_key=True)
    store: Mapped[bool] = mapped_column(Boolean)
    query: Mapped[bool] = mapped_column(Boolean)
    retrieve: Mapped[bool] = mapped_column(Boolean)
    # CIDR networks ("10.1.2.0/24") the association may come from; empty: any address.
    networks: Mapped[list[str]] = mapped_column(JSONType)


class MoveDestination(Base):
    """A C-MOVE destination (PS3.4 C.4.2.1.2) (migration 0007): seeded from
    ``[[dimse.peers]]`` on first start, then managed with ``hilum peers``."""

    __tablename__ = "move_destination"

    ae_title: Mapped[str] = mapped_column(String(AE), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean)


class CorsOrigin(Base):
    """An origin whose browser pages may call the HTTP API (migration 0011; server/cors.py):
    seeded from ``[http] cors_allowed_origins`` on first start, then managed with ``hilum
    cors`` and the admin API."""

    __tablename__ = "cors_origin"

    origin: Mapped[str] = mapped_column(String(255), primary_key=True)


class SettingsSeed(Base):
    """Which parts of the settings file were copied into the index on first start (migration
    0007): copied once, so that what an administrator removed at run time stays removed."""

    __tablename__ = "settings_seed"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)


class DeidentifiedStudy(Base):
    """The way back from a de-identified study to the original (migration 0008): written in the
    partition the original lives in (the clinical one), whenever a study of it is exported or
    copied de-identified under a project, and read only through the admin API. The research
    side never holds it: its copies carry only the pseudonym and the new UIDs."""

    __tablename__ = "deidentified_study"
    __table_args__ = (
        UniqueConstraint("partition", "project", "study_instance_uid"),
        Index("ix_deidentified_pseudonym", "partition", "project", "pseudonym"),
        Index("ix_deidentified_new_study", "partition", "project", "deidentified_study_uid"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    partition: Mapped[str] = mapped_column(ForeignKey("partition.name"))
    project: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(LO))  # the original identity
    issuer_of_patient_id: Mapped[str] = mapped_column(String(LO), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(UI))
    pseudonym: Mapped[str] = mapped_column(String(LO))
    deidentified_study_uid: Mapped[str] = mapped_column(String(UI))
    date_shift_days: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Account(Base):
    """A person or client who may use Hilum over HTTP (migration 0006; storage/accounts.py)."""

    __tablename__ = "account"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(32))  # a role of server.access.ROLE_ACTIONS
    # The partitions this account may see; empty: every partition.
    partitions: Mapped[list[str]] = mapped_column(JSONType, default=list)
    # argon2id (PHC string); None: no password login, API tokens only.
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    """An API token of an account: only the SHA-256 of its secret is kept (migration 0006)."""

    __tablename__ = "api_token"
    __table_args__ = (Index("ix_api_token_account", "account_name"),)

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # shown, never secret
    account_name: Mapped[str] = mapped_column(ForeignKey("account.name"))
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Event(Base):
    """One entry of the change feed (migration 0010): written in the transaction of the state
    change it reports (the transactional outbox, ``storage/events.py``). ``id`` is the feed's
    sequence: ids are handed out in commit order (``storage/events.py`` says how), and never
    reused (SQLite AUTOINCREMENT), so a reader's cursor is the last id it has seen."""

    __tablename__ = "event"
    __table_args__ = (
        Index("ix_event_partition", "partition", "id"),
        Index("ix_event_created", "created_at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    type: Mapped[str] = mapped_column(String(32))  # "instance.stored", "study.stable", …
    partition: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(UI), default="")
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class EventSubscriber(Base):
    """A consumer of the change feed that Hilum delivers to (a webhook, the FHIR push): how
    far it got, who delivers to it now (a lease, so that any number of delivery loops share
    the work without delivering twice), and the back-off of its next event (migration 0010)."""

    __tablename__ = "event_subscriber"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The id of the last event handled (delivered, skipped by the filter, or dead-lettered).
    position: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Failed attempts at the event after ``position``, and when the next one may start.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str] = mapped_column(Text, default="")
    delivered: Mapped[int] = mapped_column(BigInteger, default=0)  # events delivered, all time


class EventDeadLetter(Base):
    """An event a subscriber did not take after ``max_attempts`` (migration 0010): the cursor
    moved past it; an administrator may replay it (state ``replay``, delivered ahead of the
    cursor's next event; ``replayed`` once taken)."""

    __tablename__ = "event_dead_letter"
    __table_args__ = (Index("ix_event_dead_letter_subscriber", "subscriber", "state", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    subscriber: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))  # dead | replay | replayed
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text, default="")
    dead_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    replayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PerformedProcedureStep(Base):
    """A Modality Performed Procedure Step (PS3.4 F.7) a modality created and updated
    (migration 0010): what it performed, and whether it is done. A COMPLETED step whose
    referenced images are all stored makes its study stable at once."""

    __tablename__ = "performed_procedure_step"
    __table_args__ = (
        UniqueConstraint("partition", "sop_instance_uid"),
        Index("ix_performed_procedure_step_status", "partition", "status", "updated_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    partition: Mapped[str] = mapped_column(ForeignKey("partition.name"))
    sop_instance_uid: Mapped[str] = mapped_column(String(UI))
    # (0040,0252) Performed Procedure Step Status: IN PROGRESS, DISCONTINUED, COMPLETED.
    status: Mapped[str] = mapped_column(String(16))
    study_instance_uid: Mapped[str] = mapped_column(String(UI), default="")
    # SeriesInstanceUID -> the SOP Instance UIDs the step lists in its Performed Series Sequence.
    series: Mapped[dict[str, list[str]]] = mapped_column(JSONType)
    calling_ae_title: Mapped[str] = mapped_column(String(AE), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

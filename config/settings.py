"""The one ``Settings`` object, built once at start-up and passed down.

Precedence (lowest to highest): the defaults below, a TOML file (``--config PATH`` or the
``HILUM_CONFIG`` environment variable), then ``HILUM_*`` environment variables with ``__``
between nested keys (``HILUM_DIMSE__PORT=4242``). ``config/default.toml`` documents every key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# PS3.5 6.2: an AE title is up to 16 characters of the default repertoire, not all spaces,
# and may not contain a backslash or control characters.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no '\\')")
    return value.strip()


# A partition's name is part of URLs (/partitions/{name}/dicomweb) and of blob keys: lower-case
# letters, digits, "-" and "_", starting with a letter or digit, at most 64 characters.
_PARTITION_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def check_partition_name(value: str) -> str:
    if not _PARTITION_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a valid partition name (1-64 characters: a-z, 0-9, '-', '_', "
            "starting with a letter or digit)"
        )
    return value


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored line.
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    data_dir: Path = Path("./hilum-data")
    # Largest instance (stored file or decoded pixel data) given in another transfer syntax than
    # stored, by C-MOVE / C-GET and WADO-RS / WADO-URI: transcoding decodes it in memory.
    transcode_max_bytes: int = Field(512 * 1024**2, ge=0)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class DimsePeer(_Section):
    """A known Move Destination (PS3.4 C.4.2.1.2): where C-MOVE may send instances."""

    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    # DICOM TLS (PS3.15 B.9, BCP 195) to this peer, with [dimse] tls_* as Hilum's identity.
    tls: bool = False

    @field_validator("ae_title")
    @classmethod
    def _check_title(cls, value: str) -> str:
        return check_ae_title(value)


class AEPermissionSeed(_Section):
    """``[[dimse.ae_permissions]]``: what one calling AE title may do over DIMSE in one
    partition, copied into the index on first start (then ``hilum ae`` manages it)."""

    ae_title: str
    partition: str = "default"
    store: bool = True  # C-STORE
    query: bool = True  # C-FIND
    retrieve: bool = True  # C-MOVE, C-GET
    # CIDR networks the association may come from ("10.1.2.0/24", "10.1.2.7"); empty: any.
    networks: list[str] = Field(default_factory=list)

    @field_validator("ae_title")
    @classmethod
    def _check_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("partition")
    @classmethod
    def _check_partition(cls, value: str) -> str:
        return check_partition_name(value)

    @field_validator("networks")
    @classmethod
    def _check_networks(cls, values: list[str]) -> list[str]:
        return [check_network(v) for v in values]


def check_network(value: str) -> str:
    """A CIDR network (an address alone is a network of one), written the canonical way."""
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not a network (e.g. 10.1.2.0/24 or 10.1.2.7)") from None


class DimseSettings(_Section):
    ae_title: str = "HILUM"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(32, ge=1)
    # Receiving processes sharing the DIMSE port(s) (SO_REUSEPORT; the kernel spreads new
    # associations across them): each has its own interpreter lock, so a host's C-STORE rate
    # grows with its cores. max_associations applies to each.
    processes: int = Field(1, ge=1, le=64)
    # PS3.8 D.1.1 Maximum Length Received: the largest P-DATA-TF PDU a peer may send. Large
    # PDUs cut the per-PDU work of receiving an image. PDUs are streamed through a fixed buffer,
    # so the length costs no memory; the bound keeps "0 = unlimited" out.
    max_pdu_length: int = Field(262144, ge=4096, le=16 * 1024 * 1024)
    # Reject associations whose Called AE Title is neither ``ae_title`` (the default
    # partition) nor a partition's AE title (``hilum partitions``); false: those go to default.
    require_called_ae_title: bool = False
    # Seeds of the AE permissions stored in the index (copied on first start, then managed
    # with ``hilum ae``): ``allowed_calling_ae_titles`` is the short form (every service in
    # the default partition, from any address). Once any AE permission is stored, only the
    # calling AE titles it names may associate. With none stored: any calling AE while bound
    # to loopback; bound to another address, ``accept_any_calling_ae = true`` must say so.
    ae_permissions: list[AEPermissionSeed] = Field(default_factory=list)
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    accept_any_calling_ae: bool = False
    # Seconds of silence before a stalled peer's association is aborted.
    network_timeout_s: float = Field(60.0, gt=0)
    # Move Destinations, copied into the index on first start (then ``hilum peers`` manages
    # them): C-MOVE to any other AE title is refused with 0xA801.
    peers: list[DimsePeer] = Field(default_factory=list)
    # DICOM TLS (PS3.15 B.9, BCP 195): a second port for TLS associations (0: none), Hilum's
    # certificate and key (PEM), the CA certificates that peers' certificates must chain to,
    # and whether a peer must present one (mutual authentication).
    tls_port: int = Field(0, ge=0, le=65535)
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_ca_certificates: Path | None = None
    tls_require_client_certificate: bool = True

    @field_validator("ae_title")
    @classmethod
    def _check_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _check_titles(cls, values: list[str]) -> list[str]:
        return [check_ae_title(v) for v in values]

    @field_validator("ae_permissions")
    @classmethod
    def _check_unique_permissions(cls, seeds: list[AEPermissionSeed]) -> list[AEPermissionSeed]:
        keys = [(seed.ae_title, seed.partition) for seed in seeds]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(
                f"[[dimse.ae_permissions]] (ae_title, partition) must be unique; repeated: "
                f"{duplicates}"
            )
        return seeds

    @field_validator("peers")
    @classmethod
    def _check_unique_peers(cls, peers: list[DimsePeer]) -> list[DimsePeer]:
        titles = [peer.ae_title for peer in peers]
        duplicates = sorted({t for t in titles if titles.count(t) > 1})
        if duplicates:
            raise ValueError(f"[[dimse.peers]] ae_title must be unique; repeated: {duplicates}")
        return peers

    @model_validator(mode="after")
    def _check_tls(self) -> DimseSettings:
        uses_tls = self.tls_port or any(peer.tls for peer in self.peers)
        if uses_tls and not (self.tls_certificate and self.tls_private_key):
            raise ValueError("DICOM TLS needs [dimse] tls_certificate and tls_private_key")
        if self.tls_port and self.tls_require_client_certificate and not self.tls_ca_certificates:
            raise ValueError(
                "[dimse] tls_require_client_certificate needs tls_ca_certificates (the CA that "
                "signs the modalities' certificates), or set it to false"
            )
        return self

    @property
    def ae_permission_seeds(self) -> list[AEPermissionSeed]:
        """``ae_permissions`` and the short form ``allowed_calling_ae_titles``, as one list."""
        listed = {(seed.ae_title, seed.partition) for seed in self.ae_permissions}
        return self.ae_permissions + [
            AEPermissionSeed(ae_title=title)
            for title in self.allowed_calling_ae_titles
            if (title, "default") not in listed
        ]


# An origin as browsers send it (RFC 6454 6.1): scheme, host, optional port.
_ORIGIN = re.compile(r"https?://[^/\s?#]+")


def check_origin(origin: str) -> str:
    """``origin`` if it is one CORS may list: scheme://host[:port], or "*"; never "null"."""
    if origin == "null":
        raise ValueError(
            '"null" is not an origin (sandboxed frames and file: pages send it): '
            "list the viewer's real origin, e.g. https://viewer.example.org"
        )
    if origin != "*" and not _ORIGIN.fullmatch(origin):
        raise ValueError(
            f"{origin!r} is not an origin: scheme://host[:port], no path or trailing "
            'slash (e.g. https://viewer.example.org), or "*"'
        )
    return origin


class HttpSettings(_Section):
    port: int = Field(8042, ge=1, le=65535)
    # Reverse proxies (TLS terminators, load balancers) in front of Hilum whose
    # X-Forwarded-For/-Proto/-Host/-Port/-Prefix headers are trusted, so that the URLs Hilum
    # writes (RetrieveURL, BulkDataURI, Location) are the ones clients use; 0: none trusted.
    trusted_proxies: int = Field(0, ge=0, le=8)
    # Origins (e.g. "https://viewer.example.org") whose browser pages may call the HTTP API
    # (read, store, delete); "*": any page may read (GET/HEAD) only, without credentials, and
    # only while [auth] is off; empty: no CORS headers, same-origin pages only
    # (server/cors.py). Copied into the index on first start; then `hilum cors` manages them.
    cors_allowed_origins: list[str] = Field(default_factory=list)
    # Largest STOW-RS request body in bytes; a larger one is refused with 413.
    stow_max_bytes: int = Field(16 * 1024**3, ge=1)
    # `hilum web`: gunicorn worker processes and threads per worker; `hilum serve`: its HTTP
    # server's threads.
    workers: int = Field(4, ge=1)
    threads: int = Field(8, ge=1)
    # Largest request body of every route but STOW-RS (JSON API, forms); larger: 413.
    body_max_bytes: int = Field(1024**2, ge=1)
    # Deadlines on each request, `hilum serve` and `hilum web` (server/request_deadlines.py):
    # seconds a client may take to send a request's line and headers, in all (the servers'
    # own timeouts are per read, renewed by every byte: slowloris); how many requests one
    # client address may have sending their headers at once (the others get 503), so that one
    # address cannot hold every thread; a body must arrive within body_timeout_s plus one
    # second per body_min_bytes_per_s bytes; each piece of a response must be taken by the
    # client within send_timeout_s.
    header_timeout_s: float = Field(10.0, gt=0)
    header_reads_per_client: int = Field(4, ge=1)
    body_timeout_s: float = Field(60.0, gt=0)
    body_min_bytes_per_s: int = Field(1024, ge=1)
    send_timeout_s: float = Field(60.0, gt=0)
    # Open connections per process (each gunicorn worker under `hilum web`), in all and from
    # one client address (server/open_connections.py); those over either are answered 503 and
    # closed. A browser opens at most 6 per host; behind a reverse proxy every client has the
    # proxy's address.
    max_connections: int = Field(1000, ge=1)
    connections_per_client: int = Field(256, ge=1)

    @field_validator("cors_allowed_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        return [check_origin(origin) for origin in origins]

    # HTTPS for `hilum serve` (cheroot) and `hilum web` (gunicorn): PEM files, the certificate
    # (chain) and its private key; both or neither. Unset: plain HTTP (behind a TLS-terminating
    # proxy, with trusted_proxies). With HTTPS, responses carry HSTS.
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None

    @model_validator(mode="after")
    def _check_tls(self) -> HttpSettings:
        if bool(self.tls_certificate) != bool(self.tls_private_key):
            raise ValueError(
                "HTTPS needs both [http] tls_certificate and tls_private_key (PEM files)"
            )
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_certificate else "http"

    # DELETE of studies, series and instances over DICOMweb. There is no authentication in
    # front of the API, so it is off unless asked for; refused with 403 when off.
    # DELETE of studies, series and instances over DICOMweb: off unless asked for (refused with
    # 403); on, it needs the "delete" permission once [auth] is enabled.
    allow_delete: bool = False


class MetricsSettings(_Section):
    # Port of the Prometheus /metrics endpoint that `hilum dimse` and `hilum worker` serve on
    # [server] host (they have no HTTP server of their own); 0: none. `hilum serve` and
    # `hilum web` serve /metrics on [http] port.
    port: int = Field(0, ge=0, le=65535)


class LogSettings(_Section):
    # "text": one line per event for a person; "json": one JSON object per line for a log
    # collector, each with the request, association or job id it is about (config/logging.py).
    format: Literal["text", "json"] = "text"


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


# Secrets that example files ship (.env.example, vendor quick-starts). A service reachable from
# the network must never run with one of them; compared lower-cased, without punctuation.
PLACEHOLDER_SECRETS = frozenset(
    {"changeme", "changemetoo", "placeholder", "password", "secret", "minioadmin", "minio123"}
)


def is_placeholder_secret(value: str) -> bool:
    normalised = re.sub(r"[^a-z0-9]", "", value.lower())
    return normalised in PLACEHOLDER_SECRETS or normalised.startswith("changeme")


# S3 storage classes whose objects are read at once (AWS S3's, MinIO's STANDARD and
# REDUCED_REDUNDANCY), and those that need a restore first: not for a tier, whose studies must
# come back when someone opens them.
READABLE_STORAGE_CLASSES = frozenset(
    {"STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
     "GLACIER_IR"}
)  # fmt: skip
ARCHIVAL_STORAGE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})


class StorageTier(_Section):
    """A cheaper blob store that studies move to once they are ``after_days`` old (days since an
    instance of the study was last received, or last read from a tier)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    blob_url: str = Field(min_length=1)  # file:///path or s3://BUCKET?endpoint=...
    s3_access_key: str = ""
    s3_secret_key: str = ""
    # The S3 storage class of the objects written to this tier (x-amz-storage-class on each
    # PUT), e.g. "STANDARD_IA"; empty: the bucket's default.
    s3_storage_class: str = ""
    after_days: float = Field(gt=0)

    @field_validator("s3_storage_class")
    @classmethod
    def _check_storage_class(cls, value: str) -> str:
        if value in ARCHIVAL_STORAGE_CLASSES:
            raise ValueError(
                f"{value!r} is an archival storage class: its objects cannot be read until "
                "restored, but a study on a tier must open when someone asks for it; use one "
                f"read at once ({', '.join(sorted(READABLE_STORAGE_CLASSES))})"
            )
        if value and value not in READABLE_STORAGE_CLASSES:
            raise ValueError(
                f"{value!r} is not an S3 storage class Hilum knows: one of "
                f"{', '.join(sorted(READABLE_STORAGE_CLASSES))}"
            )
        return value

    @model_validator(mode="after")
    def _storage_class_on_s3(self) -> StorageTier:
        if self.s3_storage_class and not self.blob_url.startswith("s3://"):
            raise ValueError(
                f"s3_storage_class is for S3 tiers; tier {self.name}'s blob_url is not s3://"
            )
        return self


class StorageSettings(_Section):
    # Empty: SQLite at <data_dir>/index.sqlite; or postgresql+psycopg://user@host/db
    database_url: str = ""
    # Empty: files under <data_dir>/blobs; or s3://BUCKET?endpoint=http://host:9000
    blob_url: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    # What a re-sent SOP Instance UID with different content does: replace the stored
    # instance ("overwrite") or keep the first one and discard the new one ("keep").
    on_duplicate: Literal["keep", "overwrite"] = "overwrite"
    # Colder blob stores, by increasing after_days (`hilum tiers apply` moves the blobs).
    tiers: list[StorageTier] = Field(default_factory=list)
    # The orphan janitor (storage/janitor.py): blobs no index row references (a store whose
    # database died between the blob write and the commit) are removed once last written over
    # orphan_grace_s ago, every orphan_sweep_interval_s by `hilum serve` and `hilum worker`
    # (one at a time: a PostgreSQL advisory lock), and by `hilum verify --repair`. The margin
    # must exceed the longest store in progress; 0 for the interval: no periodic sweep.
    orphan_grace_s: float = Field(3600.0, gt=0)
    orphan_sweep_interval_s: float = Field(3600.0, ge=0)
    # Hours between two runs of the tier moves in `hilum worker` (and `hilum serve`'s worker),
    # the first at its start; 0: only `hilum tiers apply` moves blobs.
    tiers_interval_h: float = Field(24.0, ge=0)

    @field_validator("tiers")
    @classmethod
    def _check_tiers(cls, tiers: list[StorageTier]) -> list[StorageTier]:
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"[[storage.tiers]] names must be unique: {names}")
        ages = [tier.after_days for tier in tiers]
        if ages != sorted(set(ages)):
            raise ValueError(f"[[storage.tiers]] after_days must increase tier by tier: {ages}")
        return tiers


class LimitsSettings(_Section):
    """What one received object may cost; each is checked before the work it bounds, and a
    refusal names the key (``limits.<key>``). Ingest (C-STORE, STOW-RS, ``hilum import``)
    checks all of them; every decode of pixel data (rendered, thumbnails, frames in another
    syntax, the AI worker) checks ``frame_max_bytes`` first."""

    # Largest stored file (the Part 10 bytes as received).
    instance_max_bytes: int = Field(16 * 1024**3, ge=1)
    # Largest decoded pixel data of one instance: Rows x Columns x SamplesPerPixel x
    # BitsAllocated / 8 x NumberOfFrames. A tiled whole-slide level is large by design.
    decoded_max_bytes: int = Field(256 * 1024**3, ge=1)
    # Largest decoded frame (Rows x Columns x SamplesPerPixel x BitsAllocated / 8): decoding
    # holds one frame in memory, so this is what a decode may allocate.
    frame_max_bytes: int = Field(1024**3, ge=1)
    # Largest data set after inflating a Deflated Explicit VR Little Endian file (PS3.5 A.5),
    # inflated as a stream and refused as soon as it passes this.
    inflated_max_bytes: int = Field(256 * 1024**2, ge=1)
    # Deepest nesting of sequences (PS3.5 7.5); a structured report's content tree is ~10.
    sequence_max_depth: int = Field(64, ge=1)
    # Most data elements in one data set, counting those in sequence items, the items
    # themselves and the fragments of encapsulated Pixel Data.
    elements_max: int = Field(1_000_000, ge=1)
    # Largest Number of Frames (0028,0008); each frame has a byte range in the index.
    frames_max: int = Field(500_000, ge=1)
    # Processes that decode, render and transcode pixel data (storage.decoder_pool), each under
    # the two limits below and replaced when one dies; 0 decodes in the requesting process,
    # without either limit (a benchmark's comparison, not for a server).
    decoder_processes: int = Field(2, ge=0)
    # Memory one decoder process may use for a decode (address space on top of its own
    # interpreter); a decode that needs more fails its request, and the process is replaced.
    decode_memory_mb: int = Field(2048, ge=16)
    # Seconds one decode may take (the process is then stopped and replaced), and a request may
    # wait for a free decoder process (then 503, DIMSE: a failed sub-operation).
    decode_timeout_s: float = Field(120.0, gt=0)


class QuerySettings(_Section):
    # PS3.4 C.2.2.2.1.1: Person Name matching may be case-insensitive; radiologists expect it.
    case_insensitive_person_names: bool = True


# Where the reference models live, found without importing ``inference`` (and torch).
REFERENCE_MODELS_DIR = Path(__file__).resolve().parent.parent / "inference" / "reference_models"


class InferenceRule(_Section):
    """Runs ``model`` on the series that match every non-empty list (and that the model's own
    manifest accepts). Values are compared with the series' attributes as stored."""

    model: str = "*"  # a model name, or "*" for every installed model
    modalities: list[str] = Field(default_factory=list)  # (0008,0060) Modality
    sop_class_uids: list[str] = Field(default_factory=list)  # (0008,0016) SOP Class UID
    body_parts_examined: list[str] = Field(default_factory=list)  # (0018,0015)


class InferencePriority(_Section):
    """Which studies are STAT: their jobs are claimed before every routine job."""

    # (0040,1003) Requested Procedure Priority values (PS3.3 C.4.11: STAT, HIGH, ROUTINE, …).
    stat_requested_procedure_priorities: list[str] = Field(default_factory=lambda: ["STAT"])
    # Calling AE titles whose studies are STAT (e.g. the emergency department's CT).
    stat_calling_ae_titles: list[str] = Field(default_factory=list)
    stat_priority: int = 100  # routine jobs have priority 0; higher is claimed first


class InferenceSettings(_Section):
    # A study with no new instance for this long becomes stable and its jobs are queued.
    stable_after_s: float = Field(30.0, ge=0)
    # A study is stable as soon as every series holds the number of instances its first instance
    # announces in Images in Acquisition (0020,1002), without waiting stable_after_s.
    announced_completion: bool = True
    models_dirs: list[Path] = Field(default_factory=lambda: [REFERENCE_MODELS_DIR])
    rules: list[InferenceRule] = Field(default_factory=lambda: [InferenceRule()])
    priority: InferencePriority = Field(default_factory=InferencePriority)
    # A running job whose worker has not renewed its lease for this long is claimed again.
    lease_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    retry_backoff_s: float = Field(30.0, ge=0)  # doubled after each failed attempt
    poll_interval_s: float = Field(2.0, gt=0)
    device: str = ""  # empty: "cuda" when torch sees a GPU, else "cpu"
    serve_worker: bool = True  # `hilum serve` runs one worker thread in-process


class WebSettings(_Section):
    """The browser UI (``web/``)."""

    # Verifying Organization (0040,A027) of the SR that records a reviewer's decision.
    verifying_organization: str = Field("Hilum", min_length=1, max_length=64)
    # Where the OHIF viewer is installed (index.html inside); empty: <data_dir>/viewers/ohif.
    ohif_dir: Path | None = None


class AuditSettings(_Section):
    """The audit trail (``storage/audit.py``, docs/operations.md *Audit trail*)."""

    # Off: nothing is recorded (a benchmark's comparison; never in clinical use).
    enabled: bool = True
    # The JSON lines copy (PS3.15 A.5 messages): "" <data_dir>/audit.jsonl, "-" standard
    # output (containers), "off" none, else a file path.
    json_lines: str = ""
    # The record of a read (query, retrieve, view) is committed before the answer; true: also
    # flushed to disk before it (one fsync per query); false: by the next flush (it survives a
    # crash of Hilum; an OS crash or power loss may lose the last ones).
    fsync_reads: bool = False


class ResearchProject(_Section):
    """A de-identification project (PS3.15 Annex E): its secret keys the new UIDs, the patient
    pseudonyms and the per-patient date shifts, so that the same study always gets the same new
    UIDs within the project and different ones in another. The secret comes from a file
    (``secret_file``) or an environment variable (``secret_env``, its name); it is read once
    here, never logged, never shown in a message."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    secret_file: Path | None = None
    secret_env: str = ""
    _secret: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _load_secret(self) -> ResearchProject:
        if bool(self.secret_file) == bool(self.secret_env):
            raise ValueError(
                f"research project {self.name!r}: set exactly one of secret_file and secret_env"
            )
        if self.secret_file:
            try:
                secret = self.secret_file.read_bytes().strip()
            except OSError as error:
                raise ValueError(
                    f"research project {self.name!r}: cannot read secret_file "
                    f"{self.secret_file}: {error.strerror}"
                ) from None
        else:
            secret = os.environ.get(self.secret_env, "").strip().encode()
            if not secret:
                raise ValueError(
                    f"research project {self.name!r}: the environment variable "
                    f"{self.secret_env} (secret_env) is not set"
                )
        if len(secret) < 16 or is_placeholder_secret(secret.decode("utf-8", "replace")):
            raise ValueError(
                f"research project {self.name!r}: the secret must be at least 16 characters and "
                "no placeholder (e.g. `openssl rand -hex 32`)"
            )
        self._secret = secret
        return self

    @property
    def secret(self) -> bytes:
        return self._secret


class ResearchCopy(_Section):
    """Copies every matching study of partition ``from``, de-identified under ``project``, into
    partition ``to`` once it is stable (the AI worker's job queue, with its retries): ``all``
    studies, those with an AI finding present (``ai-positive``), or those a reviewer has
    decided on (``reviewed``). A study that receives more instances (the AI's SEG and SR, a
    review) is copied again; the copies keep their UIDs, so nothing is duplicated."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_partition: str = Field("default", alias="from", min_length=1, max_length=64)
    to: str = Field(min_length=1, max_length=64)
    project: str
    when: Literal["all", "ai-positive", "reviewed"] = "all"

    @property
    def job_name(self) -> str:
        """The name of its jobs in the job queue (in place of a model's name)."""
        return f"research-copy:{self.project}:{self.to}"


class ResearchSettings(_Section):
    """De-identified export (``hilum export --deidentify``), research copies, and projects."""

    projects: list[ResearchProject] = Field(default_factory=list)
    copies: list[ResearchCopy] = Field(default_factory=list)
    # Modalities whose images often carry text burned into the pixels (ultrasound, secondary
    # capture, photographs, endoscopy, documents): de-identification holds them back, as it
    # holds back every instance with Burned In Annotation (0028,0301) YES or Recognizable
    # Visual Features (0028,0302) YES. Empty: only those two attributes decide.
    held_back_modalities: list[str] = Field(
        default_factory=lambda: ["US", "SC", "XC", "ES", "GM", "DOC", "OT"]
    )

    @field_validator("projects")
    @classmethod
    def _unique_projects(cls, projects: list[ResearchProject]) -> list[ResearchProject]:
        names = [project.name for project in projects]
        if len(set(names)) != len(names):
            raise ValueError(f"[[research.projects]] names must be unique: {names}")
        return projects

    @model_validator(mode="after")
    def _check_copies(self) -> ResearchSettings:
        names = {project.name for project in self.projects}
        for copy in self.copies:
            if copy.project not in names:
                raise ValueError(
                    f"[[research.copies]] project {copy.project!r} is not one of the "
                    f"[[research.projects]] ({', '.join(sorted(names)) or 'none'})"
                )
            if copy.to == copy.from_partition:
                raise ValueError("[[research.copies]] `to` must be another partition than `from`")
            if len(copy.job_name) > 64:
                raise ValueError(f"[[research.copies]] {copy.job_name!r}: over 64 characters")
        jobs = [copy.job_name for copy in self.copies]
        if len(set(jobs)) != len(jobs):
            raise ValueError("[[research.copies]]: one rule per (project, to)")
        return self

    def project(self, name: str) -> ResearchProject | None:
        return next((project for project in self.projects if project.name == name), None)

    def copy_rule(self, job_name: str) -> ResearchCopy | None:
        return next((copy for copy in self.copies if copy.job_name == job_name), None)


class OidcSettings(_Section):
    """An OpenID Connect provider whose bearer JWTs Hilum accepts (``[auth.oidc]``)."""

    # The provider's issuer URL, compared exactly with the token's "iss"; empty: OIDC off.
    issuer: str = ""
    # What the token's "aud" must contain (the client id Hilum is registered under).
    audience: str = ""
    # The provider's JSON Web Key Set; empty: from the issuer's discovery document
    # (<issuer>/.well-known/openid-configuration, its "jwks_uri").
    jwks_url: str = ""
    # Claim holding the user's Hilum roles (a list or one string); dots walk into objects,
    # e.g. "realm_access.roles". Names that are not Hilum roles are ignored.
    roles_claim: str = "roles"
    # Claim holding the partitions the user may see; empty, or the claim absent: all.
    partitions_claim: str = ""
    # Claim naming the user in logs and reviews ("sub" when the claim is absent).
    username_claim: str = "preferred_username"
    # Signature algorithms accepted (never "none", never a symmetric one with a public key).
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "PS256"])
    # Seconds of clock difference tolerated on "exp", "nbf" and "iat".
    leeway_s: float = Field(30.0, ge=0)
    # The browser UI's "Log in with your organisation's account" (authorization-code flow with
    # PKCE, OpenID Connect Core 3.1): Hilum's client id at the provider (default: audience),
    # and its client secret for a confidential client (HILUM_AUTH__OIDC__CLIENT_SECRET).
    browser_login: bool = False
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")

    @property
    def enabled(self) -> bool:
        return bool(self.issuer)

    @property
    def browser_client_id(self) -> str:
        return self.client_id or self.audience

    @model_validator(mode="after")
    def _check(self) -> OidcSettings:
        if self.issuer and not self.audience:
            raise ValueError("[auth.oidc] issuer needs audience (Hilum's client id)")
        if self.browser_login and not self.issuer:
            raise ValueError("[auth.oidc] browser_login needs issuer")
        if any(a.lower() == "none" or a.upper().startswith("HS") for a in self.algorithms):
            raise ValueError("[auth.oidc] algorithms must be asymmetric (RS*, PS*, ES*, EdDSA)")
        return self


class AuthSettings(_Section):
    """Who may use the HTTP interfaces (``server/authentication.py``)."""

    # Off: whoever reaches the HTTP port may do everything (allowed on loopback only).
    enabled: bool = False
    # Serve beyond loopback with authentication off (a warning at every start). Only for a
    # network where something else in front of Hilum authenticates.
    insecure_allow_unauthenticated: bool = False
    # The key that signs browser session cookies: this value (usually from the environment,
    # HILUM_AUTH__SESSION_SECRET), else the contents of session_secret_file, else a random
    # key kept in <data_dir>/auth/session-secret (made at first start; every `hilum web`
    # host behind one load balancer must share it). Never logged.
    session_secret: SecretStr = SecretStr("")
    session_secret_file: Path | None = None
    # How long a browser login lasts.
    session_lifetime_s: float = Field(12 * 3600.0, gt=0)
    # Seconds a verified API token or OIDC token is remembered by a process: a revoked token
    # or a disabled user is refused at the latest this long after.
    token_cache_ttl_s: float = Field(30.0, ge=0)
    # Failed logins per user name, and per source address, within login_window_s before
    # further attempts are refused (429) until the window has passed.
    login_max_failures_per_user: int = Field(5, ge=1)
    login_max_failures_per_address: int = Field(20, ge=1)
    login_window_s: float = Field(900.0, gt=0)
    oidc: OidcSettings = Field(default_factory=OidcSettings)

    @field_validator("session_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and len(value.get_secret_value()) < 32:
            raise ValueError("session_secret must be at least 32 characters (openssl rand -hex 32)")
        return value

    def secret_for_sessions(self, data_dir: Path) -> bytes:
        """The session-signing key (see ``session_secret``)."""
        if self.session_secret.get_secret_value():
            return self.session_secret.get_secret_value().encode()
        if self.session_secret_file is not None:
            try:
                secret = self.session_secret_file.read_bytes().strip()
            except OSError as error:
                raise ConfigError(
                    f"[auth] session_secret_file cannot be read: {error.strerror}"
                ) from None
            if len(secret) < 32:
                raise ConfigError(
                    f"[auth] session_secret_file {self.session_secret_file} holds fewer than "
                    "32 bytes: write a long random key into it (e.g. openssl rand -hex 32)"
                )
            return secret
        path = data_dir / "auth" / "session-secret"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # made once, readable by its owner only; a concurrent first start reads it
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:
            pass
        return path.read_bytes().strip()


class Webhook(_Section):
    """A receiver of the change feed (``[[events.webhooks]]``): each event whose type matches
    ``events`` is POSTed to ``url`` as JSON, signed with HMAC-SHA256 (docs/integration.md), in
    order, at least once."""

    # The subscriber's name: its cursor, lease and dead letters are kept under it.
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,47}$")
    url: str = Field(pattern=r"^https?://")
    # Event types, or patterns of them ("ai.*", "*"); docs/integration.md lists the types.
    events: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    # Partitions whose events it receives; empty: every partition.
    partitions: list[str] = Field(default_factory=list)
    # The signing secret, from an environment variable or a file (never in the TOML file,
    # never logged): exactly one of the two.
    secret_env: str = ""
    secret_file: Path | None = None
    _secret: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _read_secret(self) -> Webhook:
        if bool(self.secret_env) == (self.secret_file is not None):
            raise ValueError(f"webhook {self.name}: set exactly one of secret_env and secret_file")
        if self.secret_env:
            secret = os.environ.get(self.secret_env, "")
            where = f"the environment variable {self.secret_env}"
        else:
            assert self.secret_file is not None
            try:
                secret = self.secret_file.read_text().strip()
            except OSError as error:
                raise ValueError(
                    f"webhook {self.name}: cannot read secret_file {self.secret_file}: "
                    f"{error.strerror}"
                ) from None
            where = f"secret_file {self.secret_file}"
        if len(secret) < 16:
            raise ValueError(
                f"webhook {self.name}: the secret in {where} is missing or shorter than 16 "
                "characters"
            )
        self._secret = secret
        return self

    @property
    def secret(self) -> str:
        return self._secret


class EventsSettings(_Section):
    """The change feed (``GET /api/changes``) and its deliveries (webhooks, FHIR push)."""

    keep_days: float = Field(7.0, gt=0)  # events older than this are pruned
    webhooks: list[Webhook] = Field(default_factory=list)
    # `hilum serve` runs the delivery loop in a thread; `hilum events` runs it on its own.
    serve_delivery: bool = True
    poll_interval_s: float = Field(0.5, gt=0)  # how often an idle loop looks for new events
    lease_s: float = Field(30.0, gt=0)  # a subscriber whose loop stops renewing is taken over
    # Attempts at one event before it is dead-lettered (the cursor moves on; replayable).
    max_attempts: int = Field(20, ge=1)
    retry_backoff_s: float = Field(1.0, ge=0)  # doubled after each failed attempt…
    max_backoff_s: float = Field(600.0, ge=0)  # …up to this
    timeout_s: float = Field(10.0, gt=0)  # one delivery's HTTP request

    @field_validator("webhooks")
    @classmethod
    def _unique_names(cls, webhooks: list[Webhook]) -> list[Webhook]:
        names = [webhook.name for webhook in webhooks]
        if len(set(names)) != len(names) or "fhir-push" in names:
            raise ValueError(f"[[events.webhooks]] names must be unique (not fhir-push): {names}")
        return webhooks


class FhirSettings(_Section):
    """FHIR R4 (``/fhir``, read-only) and the push to the hospital's FHIR server."""

    # Hilum's base URL as the hospital reaches it (https://pacs.example.org): the ImagingStudy
    # endpoint (<public_url>/dicomweb) and the pushed resources use it. Empty: the request's
    # own URL when served; http://[server] host:[http] port when pushed.
    public_url: str = ""
    # A FHIR server to PUT ImagingStudy, DiagnosticReport, Observation and Patient resources
    # to (e.g. https://fhir.example.org/fhir), through the change feed with retries; empty: none.
    push_url: str = Field("", pattern=r"^(https?://.*)?$")


class RoutingRule(_Section):
    """Forward what ``match`` matches to ``destination`` (``[[routing.rules]]``), by C-STORE,
    through the change feed (in order, retried, dead-lettered like a webhook)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,41}$")
    # DICOM matching as C-FIND's (PS3.4 C.2.2.2) on the index's keys, e.g. {Modality = "CT"},
    # {BodyPartExamined = "CHEST", StudyDescription = "*THORAX*"}; empty: everything.
    match: dict[str, str] = Field(default_factory=dict)
    # A C-MOVE destination's AE title (`hilum peers`); unknown when sending: the delivery
    # fails with that reason and is retried, then dead-lettered.
    destination: str
    # "instance": each matching instance once stored; "study": the study's matching instances
    # once it is stable (again after each change: the destination receives it anew).
    level: Literal["instance", "study"] = "instance"
    partitions: list[str] = Field(default_factory=list)  # empty: every partition


class RoutingSettings(_Section):
    rules: list[RoutingRule] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: list[RoutingRule]) -> list[RoutingRule]:
        names = [rule.name for rule in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"[[routing.rules]] names must be unique: {names}")
        return rules


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HILUM_", env_nested_delimiter="__", extra="forbid"
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    dimse: DimseSettings = Field(default_factory=DimseSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    query: QuerySettings = Field(default_factory=QuerySettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    research: ResearchSettings = Field(default_factory=ResearchSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    fhir: FhirSettings = Field(default_factory=FhirSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def database_url(self) -> str:
        if self.storage.database_url:
            return self.storage.database_url
        return f"sqlite:///{(self.server.data_dir / 'index.sqlite').resolve()}"

    @property
    def database_url_for_display(self) -> str:
        """The database URL with any password masked, for logs and messages."""
        from sqlalchemy.engine import make_url

        return make_url(self.database_url).render_as_string(hide_password=True)

    @property
    def blob_url(self) -> str:
        if self.storage.blob_url:
            return self.storage.blob_url
        return f"file://{(self.server.data_dir / 'blobs').resolve()}"

    @model_validator(mode="after")
    def _no_placeholder_secret_beyond_loopback(self) -> Settings:
        """Refuse a placeholder secret (``change-me`` of .env.example) once Hilum listens beyond
        loopback: whoever copied the example without setting the secrets would otherwise run an
        archive of patient data whose database or object store anyone can log in to."""
        if self.server.is_loopback:
            return self
        from sqlalchemy.engine import make_url

        secrets = {
            "storage.s3_secret_key": self.storage.s3_secret_key,
            "auth.session_secret": self.auth.session_secret.get_secret_value(),
        }
        for tier in self.storage.tiers:
            secrets[f"the s3_secret_key of tier {tier.name}"] = tier.s3_secret_key
        if self.storage.database_url:
            password = make_url(self.storage.database_url).password
            secrets["the password in storage.database_url"] = str(password or "")
        for where, value in secrets.items():
            if value and is_placeholder_secret(value):
                raise ValueError(
                    f"{where} is the placeholder {value!r} and [server] host is "
                    f"{self.server.host!r}, not a loopback address: set a real secret (in .env "
                    "for docker compose) before Hilum listens on the network"
                )
        return self


def load_settings(config_path: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings once at start-up.

    ``config_path`` falls back to ``$HILUM_CONFIG``; ``overrides`` take precedence over all
    sources (used by tests and by command-line flags).
    """
    path = config_path or os.environ.get("HILUM_CONFIG") or None
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"configuration file {path} does not exist")

    class _Settings(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})

    try:
        loaded = _Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, overrides)) from exc
    except Exception as exc:  # a TOML syntax error
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return loaded


def _describe(error: ValidationError, path: Path | str | None, overrides: dict) -> str:
    """One line per invalid key: the key, what is wrong, and where the value came from (an
    environment variable, the file, or the caller), never the value itself (it may be a
    secret)."""
    lines = []
    for problem in error.errors(include_url=False):
        location = [str(part) for part in problem["loc"]]
        if problem["type"] == "extra_forbidden":
            what = "unknown key (misspelt?)" if len(location) > 1 else "unknown section"
        else:
            what = problem["msg"].removeprefix("Value error, ")
        lines.append(
            f"  {'.'.join(location) or 'settings'}: {what}{_source(location, path, overrides)}"
        )
    return "invalid configuration:\n" + "\n".join(lines)


def _source(location: list[str], path: Path | str | None, overrides: dict) -> str:
    if not location:
        return ""
    variable = "HILUM_" + "__".join(location[:2]).upper()
    if any(name.upper() == variable for name in os.environ):
        return f" (from the environment variable {variable})"
    if location[0] in overrides:
        return " (given on the command line)"
    if path is not None:
        return f" (from {path})"
    return ""

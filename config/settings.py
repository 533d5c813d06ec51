"""The one ``Settings`` object, built once at start-up and passed down.

Precedence (lowest to highest): the defaults below, a TOML file (``--config PATH`` or the
``HILUM_CONFIG`` environment variable), then ``HILUM_*`` environment variables with ``__``
between nested keys (``HILUM_DIMSE__PORT=4242``). ``config/default.toml`` documents every key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
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


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no '\\')")
    return value.strip()


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
        return _check_ae_title(value)


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
    # Reject associations whose Called AE Title is not ``ae_title``.
    require_called_ae_title: bool = False
    # Calling AE titles allowed to associate. Empty: any calling AE while bound to loopback;
    # bound to another address, ``accept_any_calling_ae = true`` must say so explicitly.
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    accept_any_calling_ae: bool = False
    # Seconds of silence before a stalled peer's association is aborted.
    network_timeout_s: float = Field(60.0, gt=0)
    # Move Destinations: C-MOVE to any other AE title is refused with 0xA801.
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
        return _check_ae_title(value)

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _check_titles(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]

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

    def peer(self, ae_title: str) -> DimsePeer | None:
        """The Move Destination called ``ae_title`` (trailing spaces ignored), if known."""
        wanted = ae_title.strip()
        return next((peer for peer in self.peers if peer.ae_title == wanted), None)


class HttpSettings(_Section):
    port: int = Field(8042, ge=1, le=65535)
    # Reverse proxies (TLS terminators, load balancers) in front of Hilum whose
    # X-Forwarded-For/-Proto/-Host/-Port/-Prefix headers are trusted, so that the URLs Hilum
    # writes (RetrieveURL, BulkDataURI, Location) are the ones clients use; 0: none trusted.
    trusted_proxies: int = Field(0, ge=0, le=8)
    # Origins (e.g. "https://viewer.example.org", or "*") whose browser pages may call the
    # DICOMweb API; empty: no CORS headers, same-origin pages only.
    cors_allowed_origins: list[str] = Field(default_factory=list)
    # Largest STOW-RS request body in bytes; a larger one is refused with 413.
    stow_max_bytes: int = Field(16 * 1024**3, ge=1)
    # `hilum web`: gunicorn worker processes and threads per worker; `hilum serve`: its HTTP
    # server's threads.
    workers: int = Field(4, ge=1)
    threads: int = Field(8, ge=1)
    # `hilum serve`: seconds a client may take to send a request's line and headers, in all
    # (cheroot's own timeout is per read, renewed by every byte: slowloris); and how many
    # requests one client address may have sending their headers at once (the others get
    # 503), so that one address cannot hold every thread.
    header_timeout_s: float = Field(10.0, gt=0)
    header_reads_per_client: int = Field(4, ge=1)
    # DELETE of studies, series and instances over DICOMweb. There is no authentication in
    # front of the API, so it is off unless asked for; refused with 403 when off.
    allow_delete: bool = False


class MetricsSettings(_Section):
    # Port of the Prometheus /metrics endpoint that `hilum dimse` and `hilum worker` serve on
    # [server] host (they have no HTTP server of their own); 0: none. `hilum serve` and
    # `hilum web` serve /metrics on [http] port.
    port: int = Field(0, ge=0, le=65535)


# Secrets that example files ship (.env.example, vendor quick-starts). A service reachable from
# the network must never run with one of them; compared lower-cased, without punctuation.
PLACEHOLDER_SECRETS = frozenset(
    {"changeme", "changemetoo", "placeholder", "password", "secret", "minioadmin", "minio123"}
)


def is_placeholder_secret(value: str) -> bool:
    normalised = re.sub(r"[^a-z0-9]", "", value.lower())
    return normalised in PLACEHOLDER_SECRETS or normalised.startswith("changeme")


class StorageTier(_Section):
    """A cheaper blob store that studies move to once they are ``after_days`` old (days since an
    instance of the study was last received, or last read from a tier)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    blob_url: str = Field(min_length=1)  # file:///path or s3://BUCKET?endpoint=...
    s3_access_key: str = ""
    s3_secret_key: str = ""
    after_days: float = Field(gt=0)


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
    destination: str  # the AE title of a [[dimse.peers]] entry
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
    query: QuerySettings = Field(default_factory=QuerySettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    web: WebSettings = Field(default_factory=WebSettings)
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
    def _routing_destinations_are_peers(self) -> Settings:
        for rule in self.routing.rules:
            if self.dimse.peer(rule.destination) is None:
                raise ValueError(
                    f"routing rule {rule.name}: destination {rule.destination!r} is not a "
                    "[[dimse.peers]] ae_title"
                )
        return self

    @model_validator(mode="after")
    def _no_placeholder_secret_beyond_loopback(self) -> Settings:
        """Refuse a placeholder secret (``change-me`` of .env.example) once Hilum listens beyond
        loopback: whoever copied the example without setting the secrets would otherwise run an
        archive of patient data whose database or object store anyone can log in to."""
        if self.server.is_loopback:
            return self
        from sqlalchemy.engine import make_url

        secrets = {"storage.s3_secret_key": self.storage.s3_secret_key}
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


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


def load_settings(config_path: Path | str | None = None, **overrides: object) -> Settings:
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

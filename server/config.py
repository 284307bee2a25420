"""The server's configuration: parsed once, from four layers, into frozen typed objects.

Layers, later ones winning: built-in defaults < a TOML file (`--config FILE` or `MEDRELAY_CONFIG`)
< environment variables (`MEDRELAY_<SECTION>_<KEY>`, e.g. `MEDRELAY_SERVER_PORT=9000`) <
command-line flags (`--data-dir`, `--port`, `--metrics-port`). Every value is checked here, and a
bad one is a `ConfigError` whose text is one line naming the key:

    relay.queue_cap: must be a positive integer

Unknown sections and keys are errors too (a typo must not silently leave a default in force),
in the file and in the environment (a `MEDRELAY_<SECTION>_...` variable of a known section).
Secrets are never read inline: the clinic root-key passphrase comes from
`keys.root_passphrase_path` or `MEDRELAY_ROOT_PASSPHRASE` (see `medrelay.server.clinic`).

Relative paths are resolved against the working directory (`./var` by default), so
`make run` in a checkout keeps everything under `./var/`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from medrelay.crypto.identity import check_id
from medrelay.crypto.passwords import (
    MAX_MEMORY_COST_KIB,
    MAX_PARALLELISM,
    MAX_TIME_COST,
    PasswordParams,
)
from medrelay.protocol.limits import (
    MAX_AUTOREPLY_BYTES,
    MAX_EMERGENCY_NUMBERS,
    MAX_FRAME_SIZE,
    MAX_INDICATION_CODE_BYTES,
    MAX_INDICATIONS,
    MAX_NAME_BYTES,
    MAX_UNAUTHENTICATED_FRAME_SIZE,
)
from medrelay.protocol.messages import Indication
from medrelay.server.availability.offhours import AvailabilityConfig, OffHoursPolicy
from medrelay.server.availability.schedule import Schedule, ScheduleError
from medrelay.server.relay.service import RelayConfig

ENV_PREFIX: Final = "MEDRELAY_"
CONFIG_ENV: Final = "MEDRELAY_CONFIG"
MAX_CONFIG_FILE_BYTES: Final = 1024 * 1024
DEFAULT_DATA_DIR: Final = Path("var")
DATABASE_FILE: Final = "medrelay.db"
MAX_BLOB_SIZE_CEILING: Final = 256 * 1024 * 1024
"""Blobs are held in memory while they pass through the server; beyond this, refuse the config."""


_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.Enum)


class ConfigError(Exception):
    """A configuration value the server refuses; `str()` is one line naming the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class LogFormat(enum.Enum):
    JSON = "json"
    TEXT = "text"


class LogLevelName(enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"
    CRITICAL = "critical"


# --- the typed configuration ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSection:
    clinic_id: str = "medrelay.local"
    host: str = "127.0.0.1"
    port: int = 8448
    public_url: str | None = None
    """The URL clients use (behind a reverse proxy, say); only informative for now."""
    tls_certificate_path: Path | None = None
    """PEM certificate (chain first the server's own) for TLS in this process."""
    tls_key_path: Path | None = None
    trust_x_forwarded_for: int = 0
    """How many reverse proxies in front of us append to X-Forwarded-For (0: trust none)."""

    @property
    def tls(self) -> bool:
        return self.tls_certificate_path is not None


@dataclass(frozen=True, slots=True)
class MetricsSection:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class StorageSection:
    data_dir: Path
    database_url: str


@dataclass(frozen=True, slots=True)
class KeysSection:
    dir: Path
    """Where the clinic keys live (default `<data_dir>/keys`)."""
    root_passphrase_path: Path | None = None
    """A file holding the root-key passphrase, for `init` without a prompt."""


@dataclass(frozen=True, slots=True)
class EnrollmentSection:
    code_ttl_hours: int = 72
    max_attempts: int = 10
    """Wrong codes before an account's code is burned."""
    certificate_validity_days: int = 730


@dataclass(frozen=True, slots=True)
class BlobsSection:
    max_size_bytes: int = 25 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LoggingSection:
    level: LogLevelName = LogLevelName.INFO
    format: LogFormat = LogFormat.JSON


# --- [visits] (medrelay.server.visits) ----------------------------------------------------------


class ConsentMode(enum.Enum):
    """How a visit's patient agrees to the thread being saved in their record."""

    NOTICE = "notice"
    """The patient is told in the thread that it will be saved."""
    EXPLICIT = "explicit"
    """The patient confirms in the thread before anything is saved."""


_INDICATION_CODE: Final = re.compile(r"[a-z][a-z0-9_-]*")


def check_indication_code(code: str) -> str:
    """`code` if it is a lowercase identifier of at most MAX_INDICATION_CODE_BYTES (ValueError
    otherwise)."""
    if not _INDICATION_CODE.fullmatch(code):
        raise ValueError("must be a lowercase identifier (a-z, then a-z, 0-9, - or _)")
    if len(code) > MAX_INDICATION_CODE_BYTES:
        raise ValueError(f"must be at most {MAX_INDICATION_CODE_BYTES} characters")
    return code


def check_indication_name(name: str) -> str:
    """`name` if it is one line of 1..MAX_NAME_BYTES bytes of UTF-8 (ValueError otherwise)."""
    if not name.strip():
        raise ValueError("must not be empty")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        raise ValueError("must be one line without control characters")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ValueError(f"must be at most {MAX_NAME_BYTES} bytes of UTF-8")
    return name


@dataclass(frozen=True, slots=True)
class IndicationConfig:
    """One reason the clinic allows a teleconsultation for."""

    code: str
    name: str

    def __post_init__(self) -> None:
        check_indication_code(self.code)
        check_indication_name(self.name)


DEFAULT_INDICATIONS: Final = (
    IndicationConfig("test-results", "Interpreting test results after ordered diagnostics"),
    IndicationConfig("sick-leave-closing", "Closing a sick-leave certificate"),
    IndicationConfig("chronic-stable-eprescription", "Stable chronic disease: e-prescriptions"),
    IndicationConfig("dispensary-observation", "Dispensary (follow-up) observation"),
    IndicationConfig("therapy-control", "Control of drug therapy or specialised treatment"),
    IndicationConfig("treatment-questions", "Questions about the prescribed treatment"),
)
"""The repeat-teleconsultation indications regions use (../shared/DESIGN.md, "The problem")."""


@dataclass(frozen=True, slots=True)
class VisitsConfig:
    """`[visits]`: the clinic's allowed indications and its consent mode."""

    indications: tuple[IndicationConfig, ...] = DEFAULT_INDICATIONS
    consent: ConsentMode = ConsentMode.NOTICE

    def __post_init__(self) -> None:
        if not 1 <= len(self.indications) <= MAX_INDICATIONS:
            raise ValueError(f"must list 1 to {MAX_INDICATIONS} indications")
        codes = [i.code for i in self.indications]
        if len(set(codes)) != len(codes):
            raise ValueError("indication codes must be unique")

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(i.code for i in self.indications)

    def wire_indications(self) -> tuple[Indication, ...]:
        return tuple(Indication(i.code, i.name) for i in self.indications)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerSection
    metrics: MetricsSection
    storage: StorageSection
    keys: KeysSection
    relay: RelayConfig
    enrollment: EnrollmentSection
    blobs: BlobsSection
    passwords: PasswordParams
    """Argon2id costs for enrollment codes."""
    logging: LoggingSection
    availability: AvailabilityConfig = dataclass_field(default_factory=AvailabilityConfig)
    visits: VisitsConfig = dataclass_field(default_factory=VisitsConfig)
    source: Path | None = None
    """The TOML file read, if any."""


# --- value readers ------------------------------------------------------------------------------


class _FromEnv(str):
    """A value that came from an environment variable (always text, converted leniently)."""

    __slots__ = ("variable",)
    variable: str


def _env_value(text: str, variable: str) -> _FromEnv:
    value = _FromEnv(text)
    value.variable = variable
    return value


def _int(key: str, value: object) -> int:
    if isinstance(value, _FromEnv):
        try:
            return int(value.strip(), 10)
        except ValueError:
            raise ConfigError(key, "must be an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, "must be an integer")
    return value


def _positive_int(key: str, value: object, *, maximum: int | None = None) -> int:
    number = _int_or_positive_error(key, value)
    if number <= 0:
        raise ConfigError(key, "must be a positive integer")
    if maximum is not None and number > maximum:
        raise ConfigError(key, f"must be at most {maximum}")
    return number


def _int_or_positive_error(key: str, value: object) -> int:
    try:
        return _int(key, value)
    except ConfigError:
        raise ConfigError(key, "must be a positive integer") from None


def _port(key: str, value: object) -> int:
    number = _int(key, value)
    if not 0 <= number <= 65535:
        raise ConfigError(key, "must be a port number (0-65535; 0 picks a free port)")
    return number


def _positive_number(key: str, value: object) -> float:
    if isinstance(value, _FromEnv):
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(key, "must be a positive number") from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, "must be a positive number")
    else:
        number = float(value)
    if not number > 0 or number == float("inf"):
        raise ConfigError(key, "must be a positive number")
    return number


def _bool(key: str, value: object) -> bool:
    if isinstance(value, _FromEnv):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, "must be true or false")
    if not isinstance(value, bool):
        raise ConfigError(key, "must be true or false")
    return value


def _text(key: str, value: object, *, max_chars: int = 1024) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, "must be a string")
    text = str(value)
    if not text.strip():
        raise ConfigError(key, "must not be empty")
    if len(text) > max_chars or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ConfigError(key, "must be one short line of text")
    return text


def _optional_text(key: str, value: object) -> str | None:
    if isinstance(value, str) and not value.strip():
        return None  # an empty environment variable unsets an optional value
    return _text(key, value)


def _path(key: str, value: object, cwd: Path) -> Path:
    path = Path(_text(key, value, max_chars=4096)).expanduser()
    return path if path.is_absolute() else cwd / path


def _optional_path(key: str, value: object, cwd: Path) -> Path | None:
    if isinstance(value, str) and not value.strip():
        return None
    return _path(key, value, cwd)


def _choice(key: str, value: object, choices: type[_E]) -> _E:
    allowed = [c.value for c in choices]
    if isinstance(value, str):
        text = value.strip().lower()
        for choice in choices:
            if choice.value == text:
                return choice
    raise ConfigError(key, f"must be one of {', '.join(allowed)}")


def _host(key: str, value: object) -> str:
    host = _text(key, value, max_chars=253)
    if any(c.isspace() or c in "/[]" for c in host):
        raise ConfigError(key, "must be a host name or IP address (no brackets, no port)")
    return host


def _clinic_id(key: str, value: object) -> str:
    text = _text(key, value)
    try:
        return check_id(text, "clinic id")
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _public_url(key: str, value: object) -> str | None:
    text = _optional_text(key, value)
    if text is None:
        return None
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (parses the port: a bad one raises ValueError)
    except ValueError:
        raise ConfigError(key, "must be an http:// or https:// URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, "must be an http:// or https:// URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(key, "must name only the scheme, host and port")
    return text.rstrip("/")


def _database_url(key: str, value: object) -> str:
    text = _text(key, value, max_chars=4096)
    scheme = text.split(":", 1)[0].lower()
    if scheme not in ("sqlite", "sqlite+pysqlite", "postgresql", "postgres", "postgresql+psycopg"):
        raise ConfigError(key, "must be a sqlite:/// or postgresql:// URL")
    return text


# --- the schema ---------------------------------------------------------------------------------

_SECTIONS: Final[dict[str, frozenset[str]]] = {
    "server": frozenset(f.name for f in dataclasses.fields(ServerSection)),
    "metrics": frozenset(f.name for f in dataclasses.fields(MetricsSection)),
    "storage": frozenset(f.name for f in dataclasses.fields(StorageSection)),
    "keys": frozenset(f.name for f in dataclasses.fields(KeysSection)),
    "relay": frozenset(f.name for f in dataclasses.fields(RelayConfig)) - {"clinic_id"},
    "enrollment": frozenset(f.name for f in dataclasses.fields(EnrollmentSection)),
    "blobs": frozenset(f.name for f in dataclasses.fields(BlobsSection)),
    "passwords": frozenset({"time_cost", "memory_cost_kib", "parallelism"}),
    "logging": frozenset(f.name for f in dataclasses.fields(LoggingSection)),
    "availability": frozenset(f.name for f in dataclasses.fields(AvailabilityConfig)),
    "visits": frozenset(f.name for f in dataclasses.fields(VisitsConfig)),
}
_SECRET_KEYS: Final = frozenset(
    {"root_passphrase", "passphrase", "password", "secret", "tls_key", "private_key"}
)

# [relay]: how each RelayConfig field is read. Float fields are durations in seconds.
_RELAY_INT_MAXIMA: Final[dict[str, int | None]] = {
    "ttl_s": 10 * 365 * 24 * 3600,
    "queue_cap": 10_000_000,
    "session_ttl_s": 10 * 365 * 24 * 3600,
    "window_items": 256,
    "window_bytes": 64 * 1024 * 1024,
    "max_frame_size": MAX_FRAME_SIZE,
    "prekey_low_water": 200,
    "prekey_target": 200,
    "expiry_batch": 100_000,
}


@dataclass(frozen=True, slots=True)
class Overrides:
    """Command-line flags (the last layer); None leaves the value to the other layers."""

    data_dir: Path | None = None
    port: int | None = None
    metrics_port: int | None = None


Raw = dict[str, dict[str, object]]


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str],
    cwd: Path,
    overrides: Overrides | None = None,
) -> Config:
    """Read the TOML file (`path`, else `$MEDRELAY_CONFIG`, else none), the environment and the
    flags, and build the `Config`; `ConfigError` names the first bad key."""
    if path is None and environ.get(CONFIG_ENV, "").strip():
        path = Path(environ[CONFIG_ENV].strip())
    if path is not None and not path.is_absolute():
        path = cwd / path
    raw: Raw = read_toml(path) if path is not None else {}
    _merge(raw, environment_layer(environ))
    overrides = overrides or Overrides()
    if overrides.data_dir is not None:
        # The default database and keys directory follow the data dir (unless set explicitly).
        raw.setdefault("storage", {})["data_dir"] = str(overrides.data_dir)
    if overrides.port is not None:
        raw.setdefault("server", {})["port"] = overrides.port
    if overrides.metrics_port is not None:
        raw.setdefault("metrics", {})["port"] = overrides.metrics_port
    config = build_config(raw, cwd=cwd)
    return dataclasses.replace(config, source=path)


def read_toml(path: Path) -> Raw:
    """The sections of a TOML configuration file, with every section and key checked against
    the schema (values are checked later)."""
    where = str(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(where, f"cannot read the configuration file ({exc.strerror})") from None
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(where, "the configuration file is too large")
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(where, f"not valid TOML ({exc})") from None
    raw: Raw = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            raise ConfigError(section, "settings belong in a [section] table")
        if section not in _SECTIONS:
            raise ConfigError(section, "unknown section")
        for key, value in table.items():
            _check_known(section, key)
            raw.setdefault(section, {})[key] = value
    return raw


def environment_layer(environ: Mapping[str, str]) -> Raw:
    """`MEDRELAY_<SECTION>_<KEY>` variables of the known sections (other MEDRELAY_ variables,
    like MEDRELAY_ROOT_PASSPHRASE, are not configuration keys and are left alone)."""
    raw: Raw = {}
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX):
            continue
        rest = variable[len(ENV_PREFIX) :].lower()
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                try:
                    _check_known(section, key)
                except ConfigError as exc:
                    raise ConfigError(variable, exc.problem) from None
                raw.setdefault(section, {})[key] = _env_value(environ[variable], variable)
                break
    return raw


def _check_known(section: str, key: str) -> None:
    if key in _SECTIONS[section]:
        return
    if key in _SECRET_KEYS or key.endswith(("passphrase", "password", "secret")):
        raise ConfigError(
            f"{section}.{key}",
            "secrets are never read from the configuration; give a *_path file or use "
            "the environment (MEDRELAY_ROOT_PASSPHRASE)",
        )
    raise ConfigError(f"{section}.{key}", "unknown setting")


def _merge(base: Raw, layer: Raw) -> None:
    for section, values in layer.items():
        base.setdefault(section, {}).update(values)


def build_config(raw: Raw, *, cwd: Path) -> Config:
    """The typed configuration from merged raw values (defaults fill the rest)."""

    def label(section: str, key: str) -> str:
        """How errors name a key: with the environment variable it came from, if it did."""
        value = raw.get(section, {}).get(key)
        if isinstance(value, _FromEnv):
            return f"{section}.{key} (from {value.variable})"
        return f"{section}.{key}"

    def get(section: str, key: str) -> tuple[str, object] | None:
        values = raw.get(section, {})
        if key not in values:
            return None
        return label(section, key), values[key]

    def read(section: str, key: str, reader: Callable[[str, object], _T], default: _T) -> _T:
        found = get(section, key)
        if found is None:
            return default
        return reader(*found)

    for section, values in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(section, "unknown section")
        for key in values:
            _check_known(section, key)

    d_server = ServerSection()
    server = ServerSection(
        clinic_id=read("server", "clinic_id", _clinic_id, d_server.clinic_id),
        host=read("server", "host", _host, d_server.host),
        port=read("server", "port", _port, d_server.port),
        public_url=read("server", "public_url", _public_url, None),
        tls_certificate_path=read(
            "server", "tls_certificate_path", lambda k, v: _optional_path(k, v, cwd), None
        ),
        tls_key_path=read("server", "tls_key_path", lambda k, v: _optional_path(k, v, cwd), None),
        trust_x_forwarded_for=read(
            "server", "trust_x_forwarded_for", _proxy_count, d_server.trust_x_forwarded_for
        ),
    )
    if (server.tls_certificate_path is None) != (server.tls_key_path is None):
        missing = "tls_key_path" if server.tls_key_path is None else "tls_certificate_path"
        raise ConfigError(
            label("server", missing),
            "must be set together with server.tls_certificate_path and server.tls_key_path",
        )

    d_metrics = MetricsSection()
    metrics = MetricsSection(
        enabled=read("metrics", "enabled", _bool, d_metrics.enabled),
        host=read("metrics", "host", _host, d_metrics.host),
        port=read("metrics", "port", _port, d_metrics.port),
    )

    data_dir = read("storage", "data_dir", lambda k, v: _path(k, v, cwd), cwd / DEFAULT_DATA_DIR)
    storage = StorageSection(
        data_dir=data_dir,
        database_url=read(
            "storage", "database_url", _database_url, f"sqlite:///{data_dir / DATABASE_FILE}"
        ),
    )
    keys = KeysSection(
        dir=read("keys", "dir", lambda k, v: _path(k, v, cwd), data_dir / "keys"),
        root_passphrase_path=read(
            "keys", "root_passphrase_path", lambda k, v: _optional_path(k, v, cwd), None
        ),
    )

    relay = _relay(server.clinic_id, read, label)

    d_enrollment = EnrollmentSection()
    enrollment = EnrollmentSection(
        code_ttl_hours=read(
            "enrollment",
            "code_ttl_hours",
            lambda k, v: _positive_int(k, v, maximum=24 * 365),
            d_enrollment.code_ttl_hours,
        ),
        max_attempts=read(
            "enrollment",
            "max_attempts",
            lambda k, v: _positive_int(k, v, maximum=1000),
            d_enrollment.max_attempts,
        ),
        certificate_validity_days=read(
            "enrollment",
            "certificate_validity_days",
            lambda k, v: _positive_int(k, v, maximum=3650),
            d_enrollment.certificate_validity_days,
        ),
    )
    blobs = BlobsSection(
        max_size_bytes=read(
            "blobs",
            "max_size_bytes",
            lambda k, v: _positive_int(k, v, maximum=MAX_BLOB_SIZE_CEILING),
            BlobsSection().max_size_bytes,
        )
    )
    passwords = _passwords(read, label)
    d_logging = LoggingSection()
    logging = LoggingSection(
        level=read("logging", "level", lambda k, v: _choice(k, v, LogLevelName), d_logging.level),
        format=read("logging", "format", lambda k, v: _choice(k, v, LogFormat), d_logging.format),
    )
    return Config(
        availability=_availability(read),
        visits=_visits(read),
        server=server,
        metrics=metrics,
        storage=storage,
        keys=keys,
        relay=relay,
        enrollment=enrollment,
        blobs=blobs,
        passwords=passwords,
        logging=logging,
    )


def _proxy_count(key: str, value: object) -> int:
    number = _int(key, value)
    if not 0 <= number <= 16:
        raise ConfigError(key, "must be the number of trusted proxies (0-16)")
    return number


def _time_zone(key: str, value: object) -> str:
    name = _text(key, value, max_chars=64)
    try:
        Schedule(time_zone=name, intervals=())
    except ScheduleError:
        raise ConfigError(key, f"{name!r} is not a time zone this server knows") from None
    return name


def _emergency_numbers(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, _FromEnv):
        items: list[object] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise ConfigError(key, "must be a list of telephone numbers")
    if not 1 <= len(items) <= MAX_EMERGENCY_NUMBERS:
        raise ConfigError(key, f"must list 1 to {MAX_EMERGENCY_NUMBERS} numbers")
    numbers: list[str] = []
    for item in items:
        if not isinstance(item, str) or not _PHONE.fullmatch(item):
            raise ConfigError(key, "each number is digits, +, spaces or dashes (at most 16)")
        numbers.append(item)
    return tuple(numbers)


_PHONE: Final = re.compile(r"(?=.*\d)[0-9+ -]{1,16}")


def _availability(read: Any) -> AvailabilityConfig:
    d = AvailabilityConfig()
    return AvailabilityConfig(
        time_zone=read("availability", "time_zone", _time_zone, d.time_zone),
        policy=read("availability", "policy", lambda k, v: _choice(k, v, OffHoursPolicy), d.policy),
        emergency_numbers=read(
            "availability", "emergency_numbers", _emergency_numbers, d.emergency_numbers
        ),
        autoreply=read(
            "availability",
            "autoreply",
            lambda k, v: _text(k, v, max_chars=MAX_AUTOREPLY_BYTES // 2),
            d.autoreply,
        ),
        release_check_s=read(
            "availability", "release_check_s", _positive_number, d.release_check_s
        ),
    )


def _indications(key: str, value: object) -> tuple[IndicationConfig, ...]:
    if isinstance(value, _FromEnv):
        raise ConfigError(key, "set it in the configuration file, as [[visits.indications]] tables")
    if not isinstance(value, list):
        raise ConfigError(key, "must be an array of tables {code, name} ([[visits.indications]])")
    if not 1 <= len(value) <= MAX_INDICATIONS:
        raise ConfigError(key, f"must list 1 to {MAX_INDICATIONS} indications")
    found: list[IndicationConfig] = []
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(where, "must be a table {code, name}")
        unknown = sorted(set(item) - {"code", "name"})
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]}", "unknown setting (an indication has code and name)"
            )
        for field in ("code", "name"):
            if not isinstance(item.get(field), str):
                raise ConfigError(f"{where}.{field}", "must be a string")
        code, name = str(item["code"]), str(item["name"])
        try:
            check_indication_code(code)
        except ValueError as exc:
            raise ConfigError(f"{where}.code", str(exc)) from None
        try:
            check_indication_name(name)
        except ValueError as exc:
            raise ConfigError(f"{where}.name", str(exc)) from None
        if any(other.code == code for other in found):
            raise ConfigError(f"{where}.code", f"{code!r} is listed twice")
        found.append(IndicationConfig(code, name))
    return tuple(found)


def _visits(read: Any) -> VisitsConfig:
    d = VisitsConfig()
    return VisitsConfig(
        indications=read("visits", "indications", _indications, d.indications),
        consent=read("visits", "consent", lambda k, v: _choice(k, v, ConsentMode), d.consent),
    )


def _relay(clinic_id: str, read: Any, label: Callable[[str, str], str]) -> RelayConfig:
    defaults = RelayConfig(clinic_id=clinic_id)
    values: dict[str, Any] = {"clinic_id": clinic_id}
    for field in dataclasses.fields(RelayConfig):
        name = field.name
        if name == "clinic_id":
            continue
        default = getattr(defaults, name)
        if isinstance(default, float):
            values[name] = read("relay", name, _positive_number, default)
        else:
            maximum = _RELAY_INT_MAXIMA.get(name)
            values[name] = read(
                "relay", name, lambda k, v, m=maximum: _positive_int(k, v, maximum=m), default
            )
    if values["max_frame_size"] < MAX_UNAUTHENTICATED_FRAME_SIZE:
        raise ConfigError(
            label("relay", "max_frame_size"), f"must be at least {MAX_UNAUTHENTICATED_FRAME_SIZE}"
        )
    if values["prekey_low_water"] > values["prekey_target"]:
        raise ConfigError(label("relay", "prekey_low_water"), "must not exceed relay.prekey_target")
    return RelayConfig(**values)


def _passwords(read: Any, label: Callable[[str, str], str]) -> PasswordParams:
    defaults = PasswordParams()
    time_cost = read(
        "passwords",
        "time_cost",
        lambda k, v: _positive_int(k, v, maximum=MAX_TIME_COST),
        defaults.time_cost,
    )
    parallelism = read(
        "passwords",
        "parallelism",
        lambda k, v: _positive_int(k, v, maximum=MAX_PARALLELISM),
        defaults.parallelism,
    )
    memory = read(
        "passwords",
        "memory_cost_kib",
        lambda k, v: _positive_int(k, v, maximum=MAX_MEMORY_COST_KIB),
        defaults.memory_cost_kib,
    )
    if memory < 8 * parallelism:
        raise ConfigError(
            label("passwords", "memory_cost_kib"),
            "must be at least 8 KiB per lane (8 * parallelism)",
        )
    return PasswordParams(time_cost=time_cost, memory_cost_kib=memory, parallelism=parallelism)

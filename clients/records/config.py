"""The gateway's configuration file (TOML), all keys optional:

    sink = "directory"            # or "fhir"
    data_dir = "./var/records-gateway"   # the outbox lives here (outbox.sqlite3)
    outbox = "./var/records-gateway/outbox.sqlite3"   # overrides data_dir's default

    [directory]
    path = "./var/records"        # one <mirror id>.json per mirror

    [fhir]
    base_url = "https://ehr.example/fhir"
    authorization_env = "MEDRELAY_FHIR_AUTHORIZATION"  # the env var holding the whole header
    timeout_s = 60

Relative paths are relative to the working directory.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

DEFAULT_DIRECTORY: Final = Path("var/records")
DEFAULT_DATA_DIR: Final = Path("var/records-gateway")
DEFAULT_AUTHORIZATION_ENV: Final = "MEDRELAY_FHIR_AUTHORIZATION"
SINKS: Final = ("directory", "fhir")


class ConfigError(Exception):
    """The configuration is unusable; the message is one line."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    sink: str = "directory"
    directory: Path = DEFAULT_DIRECTORY
    data_dir: Path = DEFAULT_DATA_DIR
    outbox: Path | None = None
    fhir_base_url: str | None = None
    authorization_env: str = DEFAULT_AUTHORIZATION_ENV
    timeout_s: float = 60.0

    @property
    def outbox_path(self) -> Path:
        return self.outbox if self.outbox is not None else self.data_dir / "outbox.sqlite3"

    def authorization(self) -> str | None:
        """The Authorization header value, from the environment (never from the file)."""
        value = os.environ.get(self.authorization_env)
        return value or None


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _text(table: dict[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}{key} must be a string")
    return value


def load_config(path: Path | None) -> GatewayConfig:
    if path is None:
        return GatewayConfig()
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc})") from None
    known = {"sink", "data_dir", "outbox", "directory", "fhir"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    sink = _text(data, "sink", "") or "directory"
    if sink not in SINKS:
        raise ConfigError(f"sink must be one of {', '.join(SINKS)}, not {sink!r}")
    directory = _table(data, "directory")
    fhir = _table(data, "fhir")
    timeout = fhir.get("timeout_s", 60.0)
    if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise ConfigError("[fhir] timeout_s must be a number of seconds (0 to 3600)")
    data_dir = _text(data, "data_dir", "")
    outbox = _text(data, "outbox", "")
    config = GatewayConfig(
        sink=sink,
        directory=Path(_text(directory, "path", "[directory] ") or DEFAULT_DIRECTORY),
        data_dir=Path(data_dir) if data_dir else DEFAULT_DATA_DIR,
        outbox=Path(outbox) if outbox else None,
        fhir_base_url=_text(fhir, "base_url", "[fhir] "),
        authorization_env=_text(fhir, "authorization_env", "[fhir] ") or DEFAULT_AUTHORIZATION_ENV,
        timeout_s=float(timeout),
    )
    if config.sink == "fhir":
        url = config.fhir_base_url
        if not url or not url.startswith(("http://", "https://")):
            raise ConfigError('sink = "fhir" needs [fhir] base_url (http:// or https://)')
    return config

"""Where mirrors go: a directory of Bundle files (default) or a FHIR server's base URL.

A sink's `deliver(mirror_id, bundle_json)` returns the record ids (`Type/id`) or fails with
`DeliveryError`; `permanent` says whether retrying can help (a refusal) or not (a timeout, a
5xx, a full disk). Error messages are one line with no content.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from medrelay.clients.engine.errors import ClientError
from medrelay.clients.engine.http import AgentHttpClient, HttpClient
from medrelay.clients.records.fhir_mapping import FHIR_JSON

_RECORD_ID: Final = re.compile(r"[A-Za-z]{1,64}/[A-Za-z0-9.-]{1,64}")
RETRYABLE_STATUSES: Final = frozenset({408, 429})
MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024


class DeliveryError(Exception):
    """A delivery that did not happen; `permanent` when a retry would be refused again."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class Sink(Protocol):
    name: str

    def deliver(self, mirror_id: str, bundle: bytes) -> Deferred[list[str]]: ...


def _bundle_ids(bundle: Mapping[str, Any]) -> list[str]:
    """`Type/<uuid>` for each entry of a Bundle we built (the uuid of its urn:uuid fullUrl)."""
    ids = []
    for entry in bundle.get("entry", []):
        full = str(entry.get("fullUrl", ""))
        resource_type = str(entry.get("resource", {}).get("resourceType", ""))
        identity = full.removeprefix("urn:uuid:")
        if _RECORD_ID.fullmatch(f"{resource_type}/{identity}"):
            ids.append(f"{resource_type}/{identity}")
    return ids


class DirectorySink:
    """One `<mirror id>.json` per mirror, written atomically (temp file in the same directory,
    fsync, rename, fsync the directory); a replay rewrites the same file with the same bytes.
    The record ids are the Bundle's own (`Encounter/<uuid of its fullUrl>`)."""

    name = "directory"

    def __init__(self, path: Path) -> None:
        self.path = path

    def file_for(self, mirror_id: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", mirror_id):
            raise ValueError("a mirror id is a short file-name-safe word")
        return self.path / f"{mirror_id}.json"

    def deliver(self, mirror_id: str, bundle: bytes) -> Deferred[list[str]]:
        target = self.file_for(mirror_id)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomically(target, bundle)
        except OSError as exc:
            raise DeliveryError(
                f"cannot write the Bundle file ({exc.strerror or type(exc).__name__})",
                permanent=False,
            ) from None
        return succeed(_bundle_ids(json.loads(bundle)))


def write_atomically(target: Path, data: bytes) -> None:
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FhirSink:
    """POST the transaction to the FHIR base URL; the record ids come from the
    transaction-response's `entry.response.location` (`Type/id[/_history/v]`)."""

    name = "fhir"

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime,
        base_url: str,
        *,
        authorization: str | None = None,
        timeout_s: float = 60.0,
        http: HttpClient | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("the FHIR base URL must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        # The engine's client: timeouts, and an answer bounded before it is buffered.
        self._http = http or AgentHttpClient(reactor, clock, timeout_s=timeout_s)
        self._authorization = authorization

    def deliver(self, mirror_id: str, bundle: bytes) -> Deferred[list[str]]:
        return Deferred.fromCoroutine(self._deliver(bundle))

    async def _deliver(self, bundle: bytes) -> list[str]:
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
        if self._authorization:
            headers["Authorization"] = self._authorization
        try:
            response = await self._http.request(
                "POST",
                self.base_url + "/",
                headers=headers,
                body=bundle,
                max_response_bytes=MAX_RESPONSE_BYTES,
            )
        except ClientError as exc:
            raise DeliveryError(
                f"the FHIR server did not answer ({exc.code.value})", permanent=False
            ) from None
        return parse_transaction_response(response.status, response.body)


def _outcome_reason(body: Any) -> str | None:
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return None
    for issue in body.get("issue", []):
        if isinstance(issue, dict) and issue.get("severity") in {"error", "fatal"}:
            return str(issue.get("code", "error"))
    return None


def parse_transaction_response(status: int, body: bytes) -> list[str]:
    """Record ids from a transaction-response, or a `DeliveryError`: permanent for a 4xx other
    than 408/429 or an OperationOutcome error, temporary for anything else."""
    try:
        parsed: Any = json.loads(body) if body else None
    except ValueError:
        parsed = None
    outcome = _outcome_reason(parsed)
    if status >= 400:
        permanent = 400 <= status < 500 and status not in RETRYABLE_STATUSES
        detail = f" ({outcome})" if outcome else ""
        raise DeliveryError(
            f"the FHIR server refused the Bundle: HTTP {status}{detail}", permanent=permanent
        )
    if outcome is not None:
        raise DeliveryError(f"the FHIR server refused the Bundle ({outcome})", permanent=True)
    if not isinstance(parsed, dict) or parsed.get("resourceType") != "Bundle":
        raise DeliveryError("the FHIR server's answer is not a Bundle", permanent=False)
    if parsed.get("type") != "transaction-response":
        raise DeliveryError(
            "the FHIR server's answer is not a transaction-response", permanent=False
        )
    ids = []
    for entry in parsed.get("entry", []):
        response = entry.get("response", {}) if isinstance(entry, dict) else {}
        entry_status = str(response.get("status", ""))
        code = entry_status.split(" ", 1)[0]
        if not code.startswith("2"):
            reason = _outcome_reason(response.get("outcome")) or "error"
            raise DeliveryError(
                f"the FHIR server refused an entry: HTTP {code or '?'} ({reason})", permanent=True
            )
        location = str(response.get("location", ""))
        parts = location.split("/_history/", maxsplit=1)[0].rstrip("/").split("/")
        if len(parts) >= 2 and _RECORD_ID.fullmatch(f"{parts[-2]}/{parts[-1]}"):
            ids.append(f"{parts[-2]}/{parts[-1]}")
    return ids

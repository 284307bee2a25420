"""Readiness (`/readyz`): whether this process can do its work now, for a load balancer or an
orchestrator deciding to send it traffic. `/healthz` says only that the process is alive.

Three checks, each named in the answer with "ok" or a short reason (never a secret or a path):
- `database`: a transaction reaches the database within `TIMEOUT_S`;
- `migrations`: the schema is at the revision this relay ships (an operator who rolled back the
  database, or a second node of a newer version that migrated it, shows here);
- `keys`: the clinic's issuing and log key certificates are valid now (an expired issuing
  certificate means new devices and notices cannot be certified).
"""

from __future__ import annotations

from typing import Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from medrelay.server.clinic import ClinicKeys
from medrelay.server.storage.database import Database
from medrelay.server.storage.migrate import current_revision, head_revision

TIMEOUT_S: Final = 5.0
OK: Final = "ok"

Report = dict[str, object]


class Readiness:
    def __init__(self, *, database: Database, keys: ClinicKeys, clock: IReactorTime) -> None:
        self._database = database
        self._keys = keys
        self._clock = clock
        self._head = head_revision()

    def check(self) -> Deferred[Report]:
        """`{"status": "ready" | "not_ready", "checks": {name: "ok" | reason}}`; never fails."""
        return Deferred.fromCoroutine(self._check())

    async def _check(self) -> Report:
        checks: dict[str, str] = {}
        lookup = self._database.run_interaction("readiness", current_revision)
        lookup.addTimeout(TIMEOUT_S, self._clock)
        try:
            revision = await lookup
        except Exception:
            checks["database"] = "unreachable"
            checks["migrations"] = "unknown"
        else:
            checks["database"] = OK
            checks["migrations"] = (
                OK
                if revision == self._head
                else f"schema at {revision or 'none'}, this relay needs {self._head}"
            )
        checks["keys"] = self._keys_state()
        ready = all(state == OK for state in checks.values())
        return {"status": "ready" if ready else "not_ready", "checks": checks}

    def _keys_state(self) -> str:
        now_ms = int(self._clock.seconds() * 1000)
        for name, certificate in (
            ("issuing", self._keys.issuing_certificate),
            ("log", self._keys.log_certificate),
        ):
            if not certificate.not_before_ms <= now_ms < certificate.not_after_ms:
                return f"the clinic {name} key certificate is not valid now"
        return OK

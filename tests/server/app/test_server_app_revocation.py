"""Revocation: one transaction makes the device (or account) inactive, logs a clinic-signed
revocation and audits it; the watcher of a serving process closes the connections it names at
its next poll (fake time), and closes them again for a while in case a login raced it; the admin
commands refuse what does not exist, with one line and nothing changed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from server_app_support import (
    CHEAP_ENV,
    NOW_S,
    IdentityWorld,
    identity_world,
    value,
)

from medrelay.crypto.rng import seeded_rng
from medrelay.crypto.sealing import SealParams
from medrelay.crypto.transparency import ClinicTrust, LogEvent, replay_user_events
from medrelay.protocol.errors import ErrorCode
from medrelay.server.audit import OPERATOR, list_audit_txn
from medrelay.server.main import Environment, cli
from medrelay.server.revocation import (
    RECENT_S,
    WATCH_INTERVAL_S,
    RevocationError,
    RevocationWatcher,
    revoke_account_txn,
    revoke_device_txn,
)
from medrelay.server.storage import transparency as log_store
from medrelay.server.transparency import verify_log_txn


@dataclass
class FakeRelay:
    """What the watcher uses of RelayService: it records the devices it was told to close."""

    closed: list[tuple[int, ErrorCode]] = field(default_factory=list)

    def disconnect_device(self, device_pk: int, code: ErrorCode, message: str) -> None:
        self.closed.append((device_pk, code))


@dataclass
class World(IdentityWorld):
    def device_pk(self, username: str) -> int:
        with self.database.engine.connect() as conn:
            pk: int = conn.execute(
                sa.text(
                    "SELECT d.pk FROM devices d JOIN accounts a ON a.pk = d.account_pk "
                    "WHERE a.username = :u"
                ),
                {"u": username},
            ).scalar_one()
        return pk

    def chain(self, username: str) -> list[LogEvent]:
        def read(conn: sa.Connection) -> list[LogEvent]:
            return [
                LogEvent.decode(data) for _, data in log_store.user_entries_txn(conn, username, 100)
            ]

        return value(self.database.run_interaction("chain", read))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    base = identity_world(tmp_path, b"revocation tests")
    yield World(**vars(base))
    base.database.close()


def trust(world: World) -> ClinicTrust:
    return ClinicTrust.build(
        world.keys.clinic_id, world.keys.root_key, world.keys.all_certificates()
    )


def revoke_device(world: World, username: str, device_id: str) -> None:
    value(
        world.database.run_interaction(
            "revoke",
            lambda conn: revoke_device_txn(
                conn,
                keys=world.keys,
                username=username,
                device_id=device_id,
                actor=OPERATOR,
                now_ms=int(world.clock.seconds() * 1000),
            ),
        )
    )


def test_a_revoked_device_leaves_the_log_state_and_the_audit_says_who(world: World) -> None:
    device_id = world.enroll("dr.ivanova").device.identity.device_id
    revoke_device(world, "dr.ivanova", device_id)
    state = replay_user_events("dr.ivanova", world.chain("dr.ivanova"), trust(world))
    assert state.devices == {} and not state.revoked
    result = value(world.database.run_interaction("verify", verify_log_txn, world.keys))
    assert result.problem is None
    (entry,) = [
        e
        for e in value(world.database.run_interaction("audit", list_audit_txn))
        if e.record.action == "device_revoke"
    ]
    assert (entry.record.actor, entry.record.target, entry.record.result) == (
        OPERATOR,
        f"dr.ivanova/{device_id}",
        "ok",
    )


def test_a_revoked_account_is_revoked_in_the_log_with_all_its_devices(world: World) -> None:
    world.enroll("dr.ivanova")
    revoked = value(
        world.database.run_interaction(
            "revoke",
            lambda conn: revoke_account_txn(
                conn, keys=world.keys, username="dr.ivanova", actor=OPERATOR, now_ms=1
            ),
        )
    )
    assert revoked.logged and len(revoked.device_ids) == 1
    state = replay_user_events("dr.ivanova", world.chain("dr.ivanova"), trust(world))
    assert state.revoked and state.devices == {}
    result = value(world.database.run_interaction("verify", verify_log_txn, world.keys))
    assert result.problem is None


def test_revoking_what_is_not_active_is_refused_and_changes_nothing(world: World) -> None:
    device_id = world.enroll("dr.ivanova").device.identity.device_id
    revoke_device(world, "dr.ivanova", device_id)
    size = len(world.chain("dr.ivanova"))
    for target in (("dr.ivanova", device_id), ("dr.ivanova", "other"), ("nobody", "d")):
        with pytest.raises(RevocationError):
            revoke_device(world, *target)
    assert len(world.chain("dr.ivanova")) == size


def test_the_watcher_closes_a_revoked_device_at_its_next_poll(world: World) -> None:
    device_id = world.enroll("dr.ivanova").device.identity.device_id
    world.enroll("nurse.petrova")
    relay = FakeRelay()
    watcher = RevocationWatcher(
        database=world.database,
        relay=relay,  # type: ignore[arg-type]
        clock=world.clock,
    )
    watcher.startService()
    revoke_device(world, "dr.ivanova", device_id)
    assert relay.closed == []
    world.clock.advance(WATCH_INTERVAL_S)
    pk = world.device_pk("dr.ivanova")
    assert relay.closed == [(pk, ErrorCode.DEVICE_REVOKED)]
    # Closed again on the following polls (a racing login), then forgotten.
    world.clock.advance(WATCH_INTERVAL_S)
    assert relay.closed.count((pk, ErrorCode.DEVICE_REVOKED)) == 2
    for _ in range(int(RECENT_S / WATCH_INTERVAL_S) + 2):
        world.clock.advance(WATCH_INTERVAL_S)
    before = len(relay.closed)
    world.clock.advance(WATCH_INTERVAL_S)
    assert len(relay.closed) == before
    assert all(closed_pk == pk for closed_pk, _ in relay.closed)
    value(watcher.stopService())


# --- the admin commands -------------------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str, input: str | None = None) -> Result:
    env = Environment(
        environ={**CHEAP_ENV, "MEDRELAY_SERVER_PORT": "0", "MEDRELAY_METRICS_PORT": "0"},
        cwd=tmp_path,
        rng=seeded_rng(b"revocation cli tests"),
        now=lambda: NOW_S,
        seal_params=SealParams.for_tests(),
    )
    return CliRunner().invoke(cli, list(args), obj=env, input=input)


def test_revoke_commands_confirm_then_revoke(world: World, tmp_path: Path) -> None:
    device_id = world.enroll("dr.ivanova").device.identity.device_id
    world.enroll("nurse.petrova")
    declined = run_cli(tmp_path, "admin", "revoke-device", "dr.ivanova", device_id, input="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    done = run_cli(tmp_path, "admin", "revoke-device", "dr.ivanova", device_id, "--yes")
    assert done.exit_code == 0, done.output
    assert f"revoked dr.ivanova: devices {device_id}" in done.output
    account = run_cli(tmp_path, "admin", "revoke-user", "nurse.petrova", "--yes", "--json")
    assert account.exit_code == 0, account.output
    assert '"username": "nurse.petrova"' in account.output
    assert run_cli(tmp_path, "log", "verify").exit_code == 0


def test_revoke_commands_refuse_unknown_targets_in_one_line(world: World, tmp_path: Path) -> None:
    world.enroll("dr.ivanova")
    for args in (("revoke-device", "dr.ivanova", "nope"), ("revoke-user", "nobody")):
        result = run_cli(tmp_path, "admin", *args, "--yes")
        assert result.exit_code == 1
        assert len(result.output.strip().splitlines()) == 1
        assert "Traceback" not in result.output


def test_revoke_refuses_names_that_cannot_exist(world: World, tmp_path: Path) -> None:
    result = run_cli(tmp_path, "admin", "revoke-user", "bad\nname", "--yes")
    assert result.exit_code == 1 and "not a valid username" in result.output
    assert "Traceback" not in result.output

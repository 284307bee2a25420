"""The identity log as the server keeps and serves it: enrollment appends the user's events in
its own transaction, `log_get` answers verify with the client-side checks (checkpoint signed by a
root-certified log key, inclusion and consistency proofs, the user's replayed chain)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from server_app_support import (
    CHEAP_ENV,
    NOW_MS,
    NOW_S,
    IdentityWorld,
    cheap_config,
    failure_of,
    identity_world,
    table_counts,
    value,
)

from medrelay.crypto import merkle
from medrelay.crypto.certificates import ClinicKeyCertificate
from medrelay.crypto.checkpoint import Checkpoint, NoteVerifier, verify_checkpoint
from medrelay.crypto.rng import seeded_rng
from medrelay.crypto.sealing import SealParams
from medrelay.crypto.transparency import (
    ClinicTrust,
    LogEvent,
    UserState,
    log_origin,
    replay_user_events,
)
from medrelay.protocol.errors import ErrorCode
from medrelay.protocol.messages import LogAnswer, LogGet
from medrelay.server.clinic import load_clinic_keys
from medrelay.server.main import ROOT_PASSPHRASE_ENV, Environment, cli
from medrelay.server.relay.errors import RelayError
from medrelay.server.transparency import TransparencyLog

PASSPHRASE = "a passphrase for the tests"  # what server_app_support.make_keys seals with


@dataclass
class World(IdentityWorld):
    log: TransparencyLog

    def ask(self, user: str | None = None, sizes: tuple[int, ...] = ()) -> LogAnswer:
        return value(self.log.answer(LogGet(rid=7, sizes=sizes, user=user)))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    base = identity_world(tmp_path, b"transparency tests")
    log = TransparencyLog(database=base.database, keys=base.keys, clock=base.clock)
    value(log.start())
    yield World(**vars(base), log=log)
    base.database.close()


def verify(world: World, answer: LogAnswer) -> tuple[Checkpoint, UserState | None]:
    """What a client does with an answer; returns the checkpoint and the user's state."""
    certificates = [ClinicKeyCertificate.decode(data) for data in answer.clinic_keys]
    trust = ClinicTrust.build("clinic.test", world.keys.root_key, certificates)
    checkpoint = trust.open_checkpoint(answer.checkpoint)
    if answer.user is None:
        return checkpoint, None
    for leaf in answer.events:
        merkle.verify_inclusion(
            merkle.leaf_hash(leaf.event),
            leaf.index,
            checkpoint.size,
            leaf.proof,
            checkpoint.root_hash,
        )
    events = [LogEvent.decode(leaf.event) for leaf in answer.events]
    return checkpoint, replay_user_events(answer.user, events, trust)


def test_the_clinic_keys_are_logged_once_at_start(world: World) -> None:
    checkpoint, _ = verify(world, world.ask())
    assert checkpoint.size == 2  # the issuing and the log key certificates
    value(world.log.start())  # a restart logs nothing twice
    assert verify(world, world.ask())[0] == checkpoint


def test_enrollment_logs_the_user_and_the_device(world: World) -> None:
    device = world.enroll("dr.ivanova")
    checkpoint, state = verify(world, world.ask("dr.ivanova"))
    assert checkpoint.size == 4
    assert state is not None and list(state.devices) == [device.device.identity.device_id]
    assert state.certificate.identity_key == device.identity_key.verify_key
    assert table_counts(world.database)["devices"] == 1


def test_consistency_proofs_link_old_checkpoints_to_the_new_one(world: World) -> None:
    world.enroll("dr.ivanova")
    old, _ = verify(world, world.ask())
    world.enroll("dr.petrov")
    world.enroll("nurse.sidorova")
    answer = world.ask("dr.petrov", sizes=(old.size, 1))
    new, state = verify(world, answer)
    assert new.size == old.size + 4
    assert state is not None and state.events == 2
    for proof in answer.consistency:
        known = old if proof.old_size == old.size else None
        if known is not None:
            merkle.verify_consistency(
                known.size, new.size, known.root_hash, new.root_hash, proof.proof
            )
    assert [p.old_size for p in answer.consistency] == [old.size, 1]


def test_an_unknown_user_has_an_empty_chain(world: World) -> None:
    answer = world.ask("nobody")
    assert answer.events == ()


@pytest.mark.parametrize("size", [0, 999])
def test_sizes_outside_the_log_are_refused(world: World, size: int) -> None:
    error = failure_of(world.log.answer(LogGet(rid=1, sizes=(size,))))
    assert isinstance(error, RelayError) and error.code is ErrorCode.INVALID_FIELD


# --- `medrelay-server log verify` and `log checkpoint` -------------------------------------------


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    environment = Environment(
        environ={
            **CHEAP_ENV,
            "MEDRELAY_SERVER_PORT": "0",
            "MEDRELAY_METRICS_PORT": "0",
            **(env or {}),
        },
        cwd=tmp_path,
        rng=seeded_rng(b"log cli tests"),
        now=lambda: NOW_S,
        seal_params=SealParams.for_tests(),
    )
    return CliRunner().invoke(cli, list(args), obj=environment)


def execute(world: World, statement: str, **params: object) -> None:
    with world.database.engine.begin() as conn:
        conn.execute(sa.text(statement), params)


def test_log_verify_replays_an_intact_log(world: World, tmp_path: Path) -> None:
    world.enroll("dr.ivanova")
    world.enroll("nurse.petrova")
    result = run_cli(tmp_path, "log", "verify")
    assert result.exit_code == 0, result.output
    assert "identity log verified: 6 events, 2 users, 2 active devices" in result.output
    answer = json.loads(run_cli(tmp_path, "log", "verify", "--json").output)
    checkpoint, _ = verify(world, world.ask())
    assert answer["ok"] is True and answer["root"] == checkpoint.root_hash.hex()


def test_log_checkpoint_prints_the_signed_tree_head(world: World, tmp_path: Path) -> None:
    world.enroll("dr.ivanova")
    result = run_cli(tmp_path, "log", "checkpoint")
    assert result.exit_code == 0, result.output
    verifier = NoteVerifier(log_origin("clinic.test"), world.keys.log_key.verify_key)
    printed = verify_checkpoint(result.output, verifier, log_origin("clinic.test"))
    assert printed == verify(world, world.ask())[0]


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (
            "UPDATE log_entries SET event = :junk WHERE leaf_index = 3",
            "leaf 3 is not a log event",
        ),
        ("DELETE FROM log_entries WHERE leaf_index = 4", "leaf 4 is missing"),
        (
            "UPDATE devices SET certificate = :junk WHERE device_id = (SELECT min(device_id) "
            "FROM devices)",
            "active devices of",
        ),
        (
            "UPDATE accounts SET user_certificate = :junk WHERE username = 'dr.ivanova'",
            "the certificate of dr.ivanova is not the logged one",
        ),
        ("DELETE FROM log_entries WHERE leaf_index >= 2", "leaves but its head records"),
    ],
    ids=["edited-event", "deleted-event", "unlogged-device", "unlogged-certificate", "truncated"],
)
def test_log_verify_finds_what_was_changed_behind_the_log(
    world: World, tmp_path: Path, tamper: str, problem: str
) -> None:
    world.enroll("dr.ivanova")
    world.enroll("nurse.petrova")
    execute(world, tamper, junk=b"\x01junk")
    result = run_cli(tmp_path, "log", "verify")
    assert result.exit_code == 1
    assert "identity log NOT verified" in result.output and problem in result.output
    assert "Traceback" not in result.output


def test_log_verify_without_keys_says_what_to_do(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "empty", "log", "verify")
    assert result.exit_code == 1
    assert "medrelay-server init" in result.output


# --- rotating the clinic's online keys ------------------------------------------------------------


def test_rotated_keys_are_logged_and_old_certificates_stay_verifiable(
    world: World, tmp_path: Path
) -> None:
    old_device = world.enroll("dr.ivanova")
    for which in ("issuing", "log"):
        result = run_cli(tmp_path, "keys", "rotate", which, env={ROOT_PASSPHRASE_ENV: PASSPHRASE})
        assert result.exit_code == 0, result.output
        assert f"rotated the {which} key" in result.output
    # A restarted server: the new keys, the retired certificates, the log catching up.
    config = cheap_config(tmp_path)
    keys = load_clinic_keys(config.keys.dir, clinic_id="clinic.test", now_ms=NOW_MS)
    assert len(keys.retired) == 2
    assert keys.issuing_certificate != world.keys.issuing_certificate
    restarted = TransparencyLog(database=world.database, keys=keys, clock=world.clock)
    value(restarted.start())
    world.use_keys(keys)
    world.log = restarted
    world.enroll("nurse.petrova")  # certified by the new issuing key
    answer = world.ask("dr.ivanova")
    assert len(answer.clinic_keys) == 4
    _, state = verify(world, answer)
    origin = log_origin("clinic.test")
    verify_checkpoint(answer.checkpoint, NoteVerifier(origin, keys.log_key.verify_key), origin)
    assert state is not None and list(state.devices) == [old_device.device.identity.device_id]
    assert verify(world, world.ask("nurse.petrova"))[1] is not None
    assert run_cli(tmp_path, "log", "verify").exit_code == 0


def test_rotation_needs_the_root_passphrase(world: World, tmp_path: Path) -> None:
    result = run_cli(
        tmp_path, "keys", "rotate", "issuing", env={ROOT_PASSPHRASE_ENV: "not the passphrase"}
    )
    assert result.exit_code == 1
    assert "wrong passphrase" in result.output

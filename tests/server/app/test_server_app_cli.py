"""The `medrelay-server` command line through click's CliRunner: `admin add-user` (text and
--json, refusals as one line), `init` (passphrase from the environment, a file or a prompt; no
overwrite; --reseal), `migrate`, and configuration errors. Every command finds its data like
`serve`: ./var under the working directory unless told otherwise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from server_app_support import (
    CHEAP_ENV,
    CHEAP_HASHER,
    NOW_S,
    HttpHarness,
    clock_at,
    enrollment_body,
    make_keys,
    open_database,
    services,
    table_counts,
)

from medrelay.crypto.rng import seeded_rng
from medrelay.crypto.sealing import SealParams
from medrelay.server.clinic import AUTO_PASSPHRASE, ensure_clinic_keys, open_root_key
from medrelay.server.config import load_config
from medrelay.server.enrollment import normalize_code
from medrelay.server.main import Environment, cli
from medrelay.server.relay.store import InMemoryRelayStore

CODE = re.compile(r"[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}")
ROOT_PASSPHRASE = "a long root passphrase"


def environment(tmp_path: Path, **env: str) -> Environment:
    return Environment(
        environ={**CHEAP_ENV, **env},
        cwd=tmp_path,
        rng=seeded_rng(b"cli tests"),
        now=lambda: NOW_S,
        seal_params=SealParams.for_tests(),
    )


def run(tmp_path: Path, *args: str, input: str | None = None, **env: str) -> Result:
    return CliRunner().invoke(cli, list(args), obj=environment(tmp_path, **env), input=input)


def stored_code_hash(tmp_path: Path, username: str, data_dir: str = "var") -> str:
    config = load_config(
        environ={**CHEAP_ENV, "MEDRELAY_STORAGE_DATA_DIR": str(tmp_path / data_dir)},
        cwd=tmp_path,
    )
    database = open_database(config)
    try:
        with database.engine.connect() as conn:
            value: str = conn.exec_driver_sql(
                "SELECT c.code_hash FROM enrollment_codes c JOIN accounts a "
                "ON a.pk = c.account_pk WHERE a.username = ?",
                (username,),
            ).scalar_one()
        return value
    finally:
        database.close()


# --- admin add-user -----------------------------------------------------------------------------


def test_add_user_prints_a_one_time_code(tmp_path: Path) -> None:
    """On a fresh directory: the database appears under ./var, the account exists, and only
    an Argon2id hash of the code is stored."""
    result = run(
        tmp_path,
        "admin",
        "add-user",
        "dr.ivanova",
        "--role",
        "doctor",
        "--name",
        "Dr. Ivanova",
        "--specialty",
        "cardiology",
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "created doctor account dr.ivanova"
    match = CODE.search(lines[1])
    assert match is not None and lines[1].startswith("enrollment code: ")
    assert "2025-11-26T08:00:00Z" in lines[2]  # 72 hours after NOW
    assert (tmp_path / "var" / "medrelay.db").exists()
    stored = stored_code_hash(tmp_path, "dr.ivanova")
    assert stored.startswith("$argon2id$") and match.group(0) not in stored
    assert CHEAP_HASHER.verify(stored, normalize_code(match.group(0)))


def test_add_user_json(tmp_path: Path) -> None:
    result = run(
        tmp_path, "admin", "add-user", "pat.1", "--role", "patient", "--name", "P", "--json"
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["username"] == "pat.1"
    assert CODE.fullmatch(answer["enrollment_code"])
    assert answer["role"] == "patient"
    assert answer["expires_at"] == "2025-11-26T08:00:00Z"


def test_add_user_code_ttl_follows_the_configuration(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        "admin",
        "add-user",
        "n",
        "--role",
        "nurse",
        "--name",
        "N",
        "--json",
        MEDRELAY_ENROLLMENT_CODE_TTL_HOURS="1",
    )
    assert json.loads(result.stdout)["expires_at"] == "2025-11-23T09:00:00Z"


def test_the_printed_code_enrolls_exactly_once(tmp_path: Path) -> None:
    """The code as printed (dashes and all) works through the enrollment endpoint, once."""
    result = run(
        tmp_path, "admin", "add-user", "alice", "--role", "doctor", "--name", "A", "--json"
    )
    code = json.loads(result.stdout)["enrollment_code"]
    config = load_config(environ=dict(CHEAP_ENV), cwd=tmp_path)
    database = open_database(config)
    try:
        rng = seeded_rng(b"cli enroll")
        keys = make_keys(config, rng)
        clock = clock_at()
        enrollment, blobs, _ = services(
            config, database, keys, InMemoryRelayStore(), clock=clock, rng=rng
        )
        http = HttpHarness(enrollment=enrollment, blobs=blobs, clock=clock)
        body, _ = enrollment_body("alice", code, rng)
        assert http.post_json("/v1/enroll", body).status == 200
        again, _ = enrollment_body("alice", code, rng)
        assert http.post_json("/v1/enroll", again).status == 403
        assert table_counts(database)["devices"] == 1
    finally:
        database.close()


def test_add_user_refuses_an_existing_username(tmp_path: Path) -> None:
    first = run(tmp_path, "admin", "add-user", "bob", "--role", "nurse", "--name", "Bob")
    assert first.exit_code == 0
    second = run(tmp_path, "admin", "add-user", "bob", "--role", "nurse", "--name", "Bob")
    assert second.exit_code == 1
    assert second.stderr == "medrelay-server: an account named 'bob' already exists\n"
    as_json = run(tmp_path, "admin", "add-user", "bob", "--role", "nurse", "--name", "B", "--json")
    assert json.loads(as_json.stderr)["error"]["message"].startswith("an account named")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bad\tname", "--name", "X"], "username contains control characters"),
        ([" padded", "--name", "X"], "username must not start or end with spaces"),
        (["u" * 65, "--name", "X"], "username is longer than 64 bytes"),
        (["ok", "--name", ""], "display name must not be empty"),
        (["ok", "--name", "a\u202eb"], "display name contains control or bidirectional"),
        (["ok", "--name", "x" * 201], "display name is longer than 200 characters"),
    ],
)
def test_add_user_refuses_what_no_certificate_could_carry(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run(tmp_path, "admin", "add-user", *args, "--role", "doctor")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"medrelay-server: {message}")
    assert result.stderr.count("\n") == 1


def test_add_user_role_must_be_one_of_the_client_roles(tmp_path: Path) -> None:
    result = run(tmp_path, "admin", "add-user", "x", "--role", "clinic", "--name", "X")
    assert result.exit_code == 2
    assert "'clinic' is not one of" in result.stderr


def test_add_user_creates_the_records_gateway_account(tmp_path: Path) -> None:
    result = run(tmp_path, "admin", "add-user", "records", "--role", "records", "--name", "R")
    assert result.exit_code == 0, result.stderr
    assert "records" in result.stdout


def test_add_user_honours_data_dir_and_config(tmp_path: Path) -> None:
    data = tmp_path / "elsewhere"
    result = run(
        tmp_path,
        "admin",
        "add-user",
        "x",
        "--role",
        "admin",
        "--name",
        "X",
        "--data-dir",
        str(data),
    )
    assert result.exit_code == 0, result.output
    assert (data / "medrelay.db").exists() and not (tmp_path / "var").exists()
    config_file = tmp_path / "medrelay.toml"
    config_file.write_text(f'[storage]\ndata_dir = "{tmp_path / "fromfile"}"\n')
    result = run(
        tmp_path,
        "admin",
        "add-user",
        "y",
        "--role",
        "registrar",
        "--name",
        "Y",
        "--config",
        str(config_file),
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fromfile" / "medrelay.db").exists()


def test_config_errors_are_one_line_with_exit_status_2(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        "admin",
        "add-user",
        "x",
        "--role",
        "doctor",
        "--name",
        "X",
        MEDRELAY_RELAY_QUEUE_CAP="0",
    )
    assert result.exit_code == 2
    assert result.stderr == (
        "config error: relay.queue_cap (from MEDRELAY_RELAY_QUEUE_CAP): must be a positive "
        "integer\n"
    )
    assert not (tmp_path / "var").exists()


# --- init ---------------------------------------------------------------------------------------


def test_init_takes_the_passphrase_from_the_environment(tmp_path: Path) -> None:
    result = run(tmp_path, "init", MEDRELAY_ROOT_PASSPHRASE=ROOT_PASSPHRASE)
    assert result.exit_code == 0, result.output
    keys_dir = tmp_path / "var" / "keys"
    root = open_root_key(keys_dir, ROOT_PASSPHRASE)
    assert f"root key: {root.verify_key.to_text()}" in result.stdout
    assert not (keys_dir / AUTO_PASSPHRASE).exists()


def test_init_prompts_for_the_passphrase_twice(tmp_path: Path) -> None:
    result = run(tmp_path, "init", input=f"{ROOT_PASSPHRASE}\n{ROOT_PASSPHRASE}\n")
    assert result.exit_code == 0, result.output
    open_root_key(tmp_path / "var" / "keys", ROOT_PASSPHRASE)
    assert ROOT_PASSPHRASE not in result.stdout


def test_init_reads_a_passphrase_file(tmp_path: Path) -> None:
    secret = tmp_path / "root-pass"
    secret.write_text(ROOT_PASSPHRASE + "\n")
    result = run(tmp_path, "init", MEDRELAY_KEYS_ROOT_PASSPHRASE_PATH=str(secret))
    assert result.exit_code == 0, result.output
    open_root_key(tmp_path / "var" / "keys", ROOT_PASSPHRASE)


def test_init_refuses_a_short_passphrase(tmp_path: Path) -> None:
    result = run(tmp_path, "init", MEDRELAY_ROOT_PASSPHRASE="short")
    assert result.exit_code == 1
    assert "at least 12 characters" in result.stderr
    assert not (tmp_path / "var" / "keys").exists()


def test_init_refuses_to_overwrite_existing_keys(tmp_path: Path) -> None:
    assert run(tmp_path, "init", MEDRELAY_ROOT_PASSPHRASE=ROOT_PASSPHRASE).exit_code == 0
    before = (tmp_path / "var" / "keys" / "issuing.key").read_bytes()
    again = run(tmp_path, "init", MEDRELAY_ROOT_PASSPHRASE=ROOT_PASSPHRASE + "x")
    assert again.exit_code == 1
    assert "refusing to overwrite" in again.stderr
    assert (tmp_path / "var" / "keys" / "issuing.key").read_bytes() == before


def test_init_after_a_first_start_points_to_reseal_which_keeps_the_keys(tmp_path: Path) -> None:
    keys_dir = tmp_path / "var" / "keys"
    keys, _ = ensure_clinic_keys(
        keys_dir,
        clinic_id="clinic.test",
        now_ms=int(NOW_S * 1000),
        rng=seeded_rng(b"first start"),
        seal_params=SealParams.for_tests(),
    )
    refused = run(tmp_path, "init", MEDRELAY_ROOT_PASSPHRASE=ROOT_PASSPHRASE)
    assert refused.exit_code == 1 and "init --reseal" in refused.stderr
    resealed = run(tmp_path, "init", "--reseal", MEDRELAY_ROOT_PASSPHRASE=ROOT_PASSPHRASE)
    assert resealed.exit_code == 0, resealed.output
    assert open_root_key(keys_dir, ROOT_PASSPHRASE).verify_key == keys.root_key
    assert not (keys_dir / AUTO_PASSPHRASE).exists()


# --- migrate ------------------------------------------------------------------------------------


def test_migrate_then_up_to_date(tmp_path: Path) -> None:
    first = run(tmp_path, "migrate")
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("migrated the database from revision none to ")
    second = run(tmp_path, "migrate")
    assert second.stdout.startswith("the database is up to date (revision ")


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = run(tmp_path, "--help")
    for command in ("serve", "init", "migrate", "admin"):
        assert command in result.stdout
    sub = run(tmp_path, "admin", "--help")
    assert "add-user" in sub.stdout


def test_every_operator_command_speaks_json(tmp_path: Path) -> None:
    created = run(tmp_path, "init", "--json", MEDRELAY_ROOT_PASSPHRASE=ROOT_PASSPHRASE)
    assert created.exit_code == 0, created.output
    keys = json.loads(created.output)
    assert keys["clinic"] == "clinic.test" and keys["root_key"].startswith("ed25519-v1:")
    migrated = json.loads(run(tmp_path, "migrate", "--json").output)
    assert migrated["to"] is not None
    note = json.loads(run(tmp_path, "log", "checkpoint", "--json").output)["checkpoint"]
    assert note.startswith("medrelay/clinic.test/identity-log\n")

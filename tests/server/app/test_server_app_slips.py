"""Enrollment slips: `admin add-user --slip FILE` writes the printable slip with the code the
command printed, readable by its owner only; a path that cannot be used is refused before the
account exists, so no code is ever lost."""

from __future__ import annotations

import itertools
import json
import stat
from pathlib import Path

from click.testing import CliRunner, Result
from server_app_support import CHEAP_ENV, NOW_MS, NOW_S, enrollment_body, identity_world

from medrelay.crypto.rng import seeded_rng
from medrelay.crypto.sealing import SealParams
from medrelay.server.config import ServerSection
from medrelay.server.main import Environment, cli
from medrelay.server.slips import Slip, render, server_url

_RUNS = itertools.count()


def run(tmp_path: Path, *args: str, **env: str) -> Result:
    environment = Environment(
        environ={**CHEAP_ENV, **env},
        cwd=tmp_path,
        rng=seeded_rng(b"slip tests %d" % next(_RUNS)),  # each command its own draws
        now=lambda: NOW_S,
        seal_params=SealParams.for_tests(),
    )
    return CliRunner().invoke(cli, list(args), obj=environment)


def add_patient(tmp_path: Path, *extra: str, **env: str) -> Result:
    return run(
        tmp_path, "admin", "add-user", "petrov", "--role", "patient", "--name", "P", *extra, **env
    )


def test_the_slip_holds_the_printed_code_and_the_public_address(tmp_path: Path) -> None:
    slip = tmp_path / "petrov-slip.txt"
    result = add_patient(
        tmp_path,
        "--slip",
        str(slip),
        "--json",
        MEDRELAY_SERVER_PUBLIC_URL="https://relay.clinic.example",
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    text = slip.read_text(encoding="utf-8")
    assert answer["enrollment_code"] in text and answer["slip"] == str(slip)
    assert "https://relay.clinic.example" in text
    assert (
        f"medrelay enroll https://relay.clinic.example petrov {answer['enrollment_code']}" in text
    )
    assert stat.S_IMODE(slip.stat().st_mode) == 0o600


def test_an_existing_slip_file_is_refused_before_the_account_exists(tmp_path: Path) -> None:
    slip = tmp_path / "taken.txt"
    slip.write_text("someone else's slip")
    refused = add_patient(tmp_path, "--slip", str(slip))
    assert refused.exit_code == 1 and "already exists" in refused.output
    assert slip.read_text() == "someone else's slip"
    # The account was not created: the same command with a good path works.
    assert add_patient(tmp_path, "--slip", str(tmp_path / "new.txt")).exit_code == 0


def test_a_slip_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    refused = add_patient(tmp_path, "--slip", str(tmp_path / "no" / "such" / "dir.txt"))
    assert refused.exit_code == 1 and "cannot write into" in refused.output


def test_the_listening_address_stands_in_for_a_missing_public_url() -> None:
    assert server_url(ServerSection()) == "http://127.0.0.1:8448"
    assert server_url(ServerSection(host="::1", port=9000)) == "http://[::1]:9000"
    slip = Slip("petrov", "patient", "ABCD-EFGH-JKMN", NOW_MS, "http://127.0.0.1:8448")
    assert "ABCD-EFGH-JKMN" in render(slip) and "UTC" in render(slip)


def test_reset_code_replaces_a_lost_code_until_the_account_enrolls(tmp_path: Path) -> None:
    world = identity_world(tmp_path, b"reset code tests")
    try:
        first = json.loads(add_patient(tmp_path, "--json").output)["enrollment_code"]
        slip = tmp_path / "again.txt"
        reset = run(tmp_path, "admin", "reset-code", "petrov", "--slip", str(slip), "--json")
        assert reset.exit_code == 0, reset.output
        second = json.loads(reset.output)["enrollment_code"]
        assert second != first and second in slip.read_text(encoding="utf-8")
        body, _ = enrollment_body("petrov", first, world.rng)
        assert world.http.post_json("/v1/enroll", body).status == 403  # the old code is dead
        world.enroll_with("petrov", second)
        refused = run(tmp_path, "admin", "reset-code", "petrov")
        assert refused.exit_code == 1 and "already enrolled" in refused.output
        unknown = run(tmp_path, "admin", "reset-code", "nobody")
        assert unknown.exit_code == 1 and "no account named" in unknown.output
        audited = run(tmp_path, "audit", "show", "--action", "enrollment_code_issue", "--json")
        results = [record["result"] for record in json.loads(audited.output)["records"]]
        assert results == ["ok", "refused", "refused"]
    finally:
        world.database.close()

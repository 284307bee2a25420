"""The `medrelay` CLI through click's CliRunner: every command's text and JSON output, the
passphrase, and errors as one line with a non-zero status. Commands run the real engine against
the in-memory fake relay (`WorldApp`), or an app that fails on purpose."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from click.testing import CliRunner
from client_support import WorldApp, enrolled, medrelay, one_line_error
from twisted.internet.defer import Deferred, fail

from medrelay.clients.cli.app import EngineApi, Interrupted
from medrelay.clients.cli.main import cli, safe_file_name
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.testing import TEST_SERVER_URL, ClientWorld

_T = TypeVar("_T")

COMMANDS = [
    ["enroll"],
    ["send"],
    ["inbox"],
    ["listen"],
    ["devices"],
    ["safety-number"],
    ["attachment", "save"],
    ["whoami"],
]


@pytest.fixture
def world(tmp_path: Path) -> ClientWorld:
    return ClientWorld(tmp_path / "profiles")


@pytest.fixture
def app(world: ClientWorld) -> WorldApp:
    return WorldApp(world)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_profile_and_json(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "--profile" in result.stdout and "--json" in result.stdout
    description = result.stdout.split("Options:")[0]
    assert len(description.split()) > 8


def test_enroll_asks_for_a_new_passphrase_twice(app: WorldApp, world: ClientWorld) -> None:
    world.relay.add_user("alice", "CODE")
    result = medrelay(
        app, world, "alice", "enroll", TEST_SERVER_URL, "alice", "CODE", "--json",
        passphrase=None, stdin="s3cret\ns3cret\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "New passphrase" in result.stderr and "Repeat for confirmation" in result.stderr
    answer = json.loads(result.stdout)
    assert (answer["user"], answer["clinic"]) == ("alice", "clinic.test")
    assert medrelay(app, world, "alice", "devices", passphrase="s3cret").exit_code == 0


def test_enroll_refuses_an_empty_passphrase(app: WorldApp, world: ClientWorld) -> None:
    world.relay.add_user("alice", "CODE")
    result = medrelay(
        app, world, "alice", "enroll", TEST_SERVER_URL, "alice", "CODE", passphrase=""
    )
    assert "empty passphrase" in one_line_error(result)


def test_send_then_inbox_shows_the_message_once(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "alice", "bob")
    sent = medrelay(app, world, "alice", "send", "bob", "Take 5 mg tonight", "--json")
    assert sent.exit_code == 0, sent.stderr
    sent_json = json.loads(sent.stdout)
    assert sent_json["to"] == "bob" and sent_json["devices"] == 1

    result = medrelay(app, world, "bob", "inbox", "--json")
    assert result.exit_code == 0, result.stderr
    (message,) = json.loads(result.stdout)
    assert message["id"] == sent_json["id"]
    assert (message["from"], message["text"], message["attachments"]) == (
        "alice",
        "Take 5 mg tonight",
        [],
    )
    assert message["sent_at"].endswith("Z") and message["sent_at"].startswith("2025-11-23T")
    again = medrelay(app, world, "bob", "inbox")
    assert again.exit_code == 0 and again.stdout.strip() == "no new messages"


def test_inbox_text_output_escapes_control_characters(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "alice", "bob")
    medrelay(app, world, "alice", "send", "bob", "hi\x1b[2Jthere")
    result = medrelay(app, world, "bob", "inbox")
    assert "\x1b" not in result.stdout
    assert "alice: hi\\x1b[2Jthere" in result.stdout


def test_send_reads_the_text_from_standard_input(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "alice", "bob")
    assert medrelay(app, world, "alice", "send", "bob", "-", stdin="from stdin\n").exit_code == 0
    (message,) = json.loads(medrelay(app, world, "bob", "inbox", "--json").stdout)
    assert message["text"] == "from stdin\n"


def test_attachments_are_sent_listed_and_saved(
    app: WorldApp, world: ClientWorld, tmp_path: Path
) -> None:
    enrolled(app, world, "alice", "bob")
    report = tmp_path / "lab results.pdf"
    report.write_bytes(b"%PDF creatinine 80" * 500)
    sent = medrelay(app, world, "alice", "send", "bob", "results", "--file", str(report), "--json")
    assert sent.exit_code == 0, sent.stderr
    (message,) = json.loads(medrelay(app, world, "bob", "inbox", "--json").stdout)
    assert message["attachments"] == [
        {"index": 0, "name": "lab results.pdf", "media_type": "application/pdf", "size": 9000}
    ]
    out = tmp_path / "saved"
    for expected in ("lab results.pdf", "lab results (1).pdf"):
        saved = medrelay(
            app, world, "bob", "attachment", "save", message["id"], "--out", str(out), "--json"
        )
        assert saved.exit_code == 0, saved.stderr
        (entry,) = json.loads(saved.stdout)
        assert Path(entry["path"]).name == expected
        assert Path(entry["path"]).read_bytes() == report.read_bytes()
        assert Path(entry["path"]).stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        (".bashrc", "bashrc"),
        ("a\x1b[31mb.txt", "a[31mb.txt"),
        ("..", "attachment-3"),
        ("", "attachment-3"),
    ],
)
def test_a_peers_file_name_cannot_escape_the_output_directory(name: str, safe: str) -> None:
    assert safe_file_name(name, 3) == safe


def test_attachment_save_refuses_a_malformed_id(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "alice")
    result = medrelay(app, world, "alice", "attachment", "save", "xyz")
    assert "32 hexadecimal digits" in one_line_error(result)


def test_listen_prints_one_json_object_per_line_and_ctrl_c_exits_cleanly(
    app: WorldApp, world: ClientWorld
) -> None:
    enrolled(app, world, "alice", "bob")
    medrelay(app, world, "alice", "send", "bob", "first")
    medrelay(app, world, "alice", "send", "bob", "second")
    result = medrelay(app, world, "bob", "listen", "--json")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [m["text"] for m in lines] == ["first", "second"]
    assert "connected" in result.stderr


def test_listen_stops_with_an_error_when_the_device_is_refused(
    app: WorldApp, world: ClientWorld
) -> None:
    enrolled(app, world, "alice")
    world.relay.users["alice"].devices.clear()
    result = medrelay(app, world, "alice", "listen")
    assert result.exit_code == 1
    assert "auth_failed" in result.stderr or "refused" in result.stderr


def test_listen_keeps_retrying_while_the_server_is_down(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "alice")
    world.relay.down = True
    result = medrelay(app, world, "alice", "listen")
    assert result.exit_code == 0
    assert result.stderr.count("reconnecting in") >= 3


def test_devices_marks_this_device(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "alice")
    world.link_device("alice", "laptop")
    result = medrelay(app, world, "alice", "devices", "--json")
    listed = json.loads(result.stdout)
    assert len(listed) == 2
    assert sum(d["this_device"] for d in listed) == 1
    text = medrelay(app, world, "alice", "devices").stdout
    assert text.count("(this device)") == 1


def test_safety_numbers_match_on_both_sides_in_twelve_groups(
    app: WorldApp, world: ClientWorld
) -> None:
    enrolled(app, world, "alice", "bob")
    a = json.loads(medrelay(app, world, "alice", "safety-number", "bob", "--json").stdout)
    b = json.loads(medrelay(app, world, "bob", "safety-number", "alice", "--json").stdout)
    assert a["user"] == "bob" and a["safety_number"] == b["safety_number"]
    assert len(a["safety_number"]) == 60 and a["safety_number"].isdigit()
    text = medrelay(app, world, "alice", "safety-number", "bob").stdout
    assert len(text.splitlines()[1].split()) == 12


def test_whoami_needs_no_passphrase(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "alice")
    result = medrelay(app, world, "alice", "whoami", "--json", passphrase=None)
    assert result.exit_code == 0, result.stderr
    who = json.loads(result.stdout)
    assert (who["user"], who["clinic"], who["server"]) == ("alice", "clinic.test", TEST_SERVER_URL)


# --- errors -----------------------------------------------------------------------------------


def test_a_wrong_passphrase_is_one_line(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "alice")
    result = medrelay(app, world, "alice", "inbox", passphrase="nope")
    assert one_line_error(result) == "medrelay: wrong passphrase for this profile"


def test_errors_are_json_on_stderr_with_json(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "alice")
    result = medrelay(app, world, "alice", "inbox", "--json", passphrase="nope")
    error = json.loads(one_line_error(result))
    assert error == {
        "error": {"code": "wrong_passphrase", "message": "wrong passphrase for this profile"}
    }
    assert result.stdout == ""


def test_a_missing_profile_says_to_enroll(app: WorldApp, world: ClientWorld) -> None:
    result = medrelay(app, world, "nobody", "inbox")
    assert "medrelay enroll" in one_line_error(result)


def test_an_unknown_user_is_one_line(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "alice")
    result = medrelay(app, world, "alice", "send", "mallory", "hi", "--json")
    assert json.loads(one_line_error(result))["error"]["code"] == "unknown_user"


def test_an_unreachable_server_is_one_line(app: WorldApp, world: ClientWorld) -> None:
    enrolled(app, world, "alice")
    world.relay.down = True
    assert "cannot connect" in one_line_error(medrelay(app, world, "alice", "inbox"))


def test_a_bad_url_is_one_line(app: WorldApp, world: ClientWorld) -> None:
    result = medrelay(app, world, "alice", "enroll", "relay:8448", "alice", "CODE")
    assert "bad server URL" in one_line_error(result)


def test_an_unconfirmed_send_times_out_with_a_clear_message(
    app: WorldApp, world: ClientWorld
) -> None:
    enrolled(app, world, "alice", "bob")
    medrelay(app, world, "alice", "send", "bob", "warm up")  # sessions and device lists
    world.relay.lose_sends = True
    app.max_steps = 2000
    result = medrelay(app, world, "alice", "send", "bob", "lost")
    assert "did not confirm" in one_line_error(result)


class BrokenApp(WorldApp):
    def open_engine(self, profile_dir: Path, passphrase: str) -> Deferred[EngineApi]:
        return fail(RuntimeError("a bug"))


def test_a_bug_is_one_line_without_a_traceback(world: ClientWorld) -> None:
    app = BrokenApp(world)
    enrolled(app, world, "alice")
    result = medrelay(app, world, "alice", "inbox")
    assert one_line_error(result) == "medrelay: internal error (RuntimeError): a bug"


def test_an_interrupted_command_exits_with_130(world: ClientWorld) -> None:
    app = WorldApp(world)
    enrolled(app, world, "alice")

    class Interrupting(WorldApp):
        def run(self, main: Callable[[], Deferred[_T]]) -> _T:
            raise Interrupted()

    result = medrelay(Interrupting(world), world, "alice", "devices")
    assert result.exit_code == 130


def test_client_errors_keep_their_code_through_the_cli(world: ClientWorld) -> None:
    class Locked(WorldApp):
        def open_engine(self, profile_dir: Path, passphrase: str) -> Deferred[EngineApi]:
            return fail(ClientError(LocalCode.PROFILE_LOCKED, "the profile is busy"))

    app = Locked(world)
    enrolled(app, world, "alice")
    result = medrelay(app, world, "alice", "devices", "--json")
    assert json.loads(one_line_error(result))["error"]["code"] == "profile_locked"

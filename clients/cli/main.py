"""`medrelay`, the reference command-line client.

Every command takes `--profile DIR` (default: the platform's user data directory,
`medrelay/profiles/default`; also `MEDRELAY_PROFILE`) and `--json`. The passphrase that unlocks
the profile comes from `MEDRELAY_PASSPHRASE` or a hidden prompt (asked twice when enrolling).

Errors are one line on stderr (`medrelay: ...`, or a JSON object `{"error": {"code",
"message"}}` with `--json`) and a non-zero exit status: 1 for a refused or failed operation,
2 for a usage error, 130 when interrupted. Never a traceback (set `MEDRELAY_DEBUG=1` to see one).
"""

from __future__ import annotations

import datetime
import mimetypes
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import click
import platformdirs
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.internet.defer import CancelledError, Deferred, DeferredLock

from medrelay.clients.cli import output
from medrelay.clients.cli.app import App, EngineApi, Interrupted, RealApp
from medrelay.clients.engine.availability import (
    AbsenceView,
    AvailabilityView,
    ScheduleChange,
    ShiftView,
)
from medrelay.clients.engine.errors import ClientError, LocalCode
from medrelay.clients.engine.linking import LinkCheck, LinkCode
from medrelay.clients.engine.record_messages import RECORDS_USER, RecordRequest
from medrelay.clients.engine.store import ProfileInfo
from medrelay.clients.engine.views import (
    KIND_SECURITY,
    ConnectionStatus,
    DeviceView,
    Event,
    MessageView,
    NoticeView,
    OutgoingFile,
    SavedAttachment,
    SentMessage,
    Whoami,
)
from medrelay.crypto.identity import check_id
from medrelay.crypto.linking import normalize_sas, same_sas
from medrelay.protocol.errors import ProtocolError
from medrelay.protocol.hours import HoursSyntaxError, parse_hours, parse_time
from medrelay.protocol.limits import MAX_INDICATION_CODE_BYTES
from medrelay.protocol.messages import HoursInterval, VisitList, encode_body

PASSPHRASE_ENV: Final = "MEDRELAY_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
PROFILE_ENV: Final = "MEDRELAY_PROFILE"
DEBUG_ENV: Final = "MEDRELAY_DEBUG"
SEND_TIMEOUT_S: Final = 60.0
EXIT_FAILED: Final = 1
EXIT_INTERRUPTED: Final = 130

_T = TypeVar("_T")


def default_profile() -> Path:
    return platformdirs.user_data_path("medrelay", appauthor=False) / "profiles" / "default"


# --- plumbing ---------------------------------------------------------------------------------


class Options:
    """The options every command shares, and the app they run in."""

    def __init__(self, app: App, profile: Path | None, json_mode: bool) -> None:
        self.app = app
        self.profile = profile if profile is not None else default_profile()
        self.json = json_mode

    def fail(self, code: str, message: str, exit_code: int = EXIT_FAILED) -> NoReturn:
        if self.json:
            click.echo(output.dumps({"error": {"code": code, "message": message}}), err=True)
        else:
            click.echo(f"medrelay: {message}", err=True)
        sys.exit(exit_code)

    def emit(self, value: object, text: str) -> None:
        click.echo(output.dumps(value) if self.json else text)

    def run(self, main: Callable[[], Deferred[_T]]) -> _T:
        """Run `main` in the app, turning every failure into one line and an exit status."""
        try:
            return self.app.run(main)
        except ClientError as exc:
            self.fail(exc.code.value, exc.message)
        except Interrupted:
            self.fail("interrupted", "interrupted", EXIT_INTERRUPTED)
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            self.fail("internal_error", f"internal error ({type(exc).__name__}): {exc}")

    def with_engine(
        self, use: Callable[[EngineApi], Deferred[_T]], *, passphrase: str | None = None
    ) -> _T:
        """Unlock the profile, run `use(engine)`, and close the engine whatever happens."""
        secret = passphrase if passphrase is not None else read_passphrase(confirm=False)
        app = self.app
        profile = self.profile

        async def main() -> _T:
            engine = await app.open_engine(profile, secret)
            # Security warnings are loud whatever the command: on stderr, as they happen.
            engine.subscribe(_shout_security_warnings)
            try:
                result = await use(engine)
            except GeneratorExit:
                # Abandoned after Ctrl-C stopped the reactor: the app's shutdown trigger
                # closes the engine; awaiting here would be ignored anyway.
                raise
            except BaseException:
                await engine.close()
                raise
            await engine.close()
            return result

        return self.run(lambda: Deferred.fromCoroutine(main()))


def _shout_security_warnings(event: Event) -> None:
    if isinstance(event, NoticeView) and event.kind == KIND_SECURITY:
        click.echo(f"medrelay: !!! {output.safe(event.reason)}", err=True)


def read_passphrase(*, confirm: bool) -> str:
    value = os.environ.get(PASSPHRASE_ENV)
    if value is not None:
        return value
    prompted: str = click.prompt(
        "Passphrase" if not confirm else "New passphrase for this profile",
        hide_input=True,
        confirmation_prompt=confirm,
        err=True,
    )
    return prompted


def common(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add `--profile` and `--json` to a command."""
    command = click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")(
        command
    )
    return click.option(
        "--profile",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=PROFILE_ENV,
        default=None,
        help="Profile directory (default: the user data directory, medrelay/profiles/default).",
    )(command)


def _options(ctx: click.Context, profile: Path | None, json_mode: bool) -> Options:
    app = ctx.obj if ctx.obj is not None else RealApp()
    return Options(app, profile, json_mode)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """medrelay: end-to-end encrypted messages between a clinic's doctors, nurses and patients.

    Enroll once with the code the clinic gave you, then send, read and listen. Your keys stay
    on this device, sealed by your passphrase.
    """


# --- commands ---------------------------------------------------------------------------------


@cli.command()
@click.argument("server_url")
@click.argument("username")
@click.argument("code")
@common
@click.pass_context
def enroll(
    ctx: click.Context,
    *,
    server_url: str,
    username: str,
    code: str,
    profile: Path | None,
    json_mode: bool,
) -> None:
    """Enroll this device as USERNAME with the one-time CODE from the clinic.

    SERVER_URL is the relay's address, like http://127.0.0.1:8448. The keys are generated here
    and sealed with a new passphrase; only public keys leave this device.
    """
    options = _options(ctx, profile, json_mode)
    passphrase = read_passphrase(confirm=True)
    if not passphrase:
        options.fail(LocalCode.INVALID_ARGUMENT, "an empty passphrase would leave your keys open")
    app = options.app
    info = options.run(lambda: app.enroll(options.profile, passphrase, server_url, username, code))
    options.emit(
        {
            "user": info.user_id,
            "device": info.device_id,
            "clinic": info.clinic_id,
            "server": info.server_url,
            "profile": str(options.profile),
        },
        f"enrolled {info.user_id} (device {info.device_id}) at clinic {info.clinic_id}\n"
        f"profile: {options.profile}",
    )


def _read_files(options: Options, paths: Sequence[Path]) -> list[OutgoingFile]:
    files = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            options.fail(LocalCode.INVALID_ARGUMENT, f"cannot read {path}: {exc.strerror}")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        files.append(OutgoingFile(path.name, media_type, data))
    return files


@cli.command()
@click.argument("username")
@click.argument("text")
@click.option(
    "--urgent",
    is_flag=True,
    help="It cannot wait: if USERNAME is away, the clinician on call receives it now too.",
)
@click.option(
    "--file",
    "file_paths",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Attach a file (encrypted before upload). May be given several times.",
)
@common
@click.pass_context
def send(
    ctx: click.Context,
    *,
    username: str,
    text: str,
    urgent: bool,
    file_paths: tuple[Path, ...],
    profile: Path | None,
    json_mode: bool,
) -> None:
    """Send TEXT (use - to read it from standard input) to USERNAME.

    The message goes to every device of USERNAME and to your other devices. It is stored
    locally before it is sent, and resent on the next connection if the relay's confirmation
    does not arrive. Outside a clinician's hours it may wait for them: the answer says when
    they will read it. With --urgent, the clinician on call gets it at once, or, if nobody is
    on call, you are told to call the emergency numbers.
    """
    options = _options(ctx, profile, json_mode)
    if text == "-":
        text = sys.stdin.read()
    files = _read_files(options, file_paths)
    app = options.app

    async def use(engine: EngineApi) -> tuple[SentMessage, list[NoticeView]]:
        sending = engine.send_message(username, text, files, urgent=urgent)
        sent = await app_timeout(app, sending, SEND_TIMEOUT_S)
        notices: list[NoticeView] = []
        if urgent or sent.held or sent.reads_at_ms is not None:
            # The clinic answers at once (an automatic reply, where an urgent message went):
            # show its signed notice now rather than at the next `inbox`.
            await engine.sync()
            notices = await engine.clinic_notices(sent.message_id)
        return sent, notices

    sent, notices = options.with_engine(lambda engine: Deferred.fromCoroutine(use(engine)))
    options.emit(
        {**output.sent_json(sent), "notices": [output.notice_json(n) for n in notices]},
        "\n".join([output.sent_line(sent), *(output.notice_line(n) for n in notices)]),
    )


def app_timeout(app: App, d: Deferred[_T], seconds: float) -> Deferred[_T]:
    """`d`, failed with NOT_SENT if it has not fired after `seconds` (the message stays queued)."""

    def timed_out(failure: Any) -> Any:
        if failure.check(CancelledError, defer.TimeoutError, internet_error.TimeoutError):
            raise ClientError(
                LocalCode.NOT_SENT,
                f"the relay did not confirm the message within {seconds:.0f} s; once queued, "
                "a message is resent the next time this profile connects",
            )
        return failure

    return app.timeout(d, seconds).addErrback(timed_out)


@cli.command()
@common
@click.pass_context
def inbox(ctx: click.Context, profile: Path | None, json_mode: bool) -> None:
    """Fetch what the relay holds for this device, then print the new messages.

    Each message is stored (sealed) before the relay is told it may delete it. Messages that
    could not be decrypted or verified are reported, never shown as messages.
    """
    options = _options(ctx, profile, json_mode)

    async def use(engine: EngineApi) -> list[MessageView | NoticeView]:
        await engine.sync()
        return await engine.unread()

    items = options.with_engine(lambda engine: Deferred.fromCoroutine(use(engine)))
    if options.json:
        click.echo(output.dumps([output.item_json(item) for item in items]))
    elif not items:
        click.echo("no new messages")
    else:
        for item in items:
            click.echo(output.item_line(item))


@cli.command()
@common
@click.pass_context
def listen(ctx: click.Context, profile: Path | None, json_mode: bool) -> None:
    """Stay connected and print messages as they arrive (Ctrl-C to stop).

    With --json, one JSON object per line. The connection is re-established after a loss.
    """
    options = _options(ctx, profile, json_mode)

    async def use(engine: EngineApi) -> None:
        stopped: Deferred[None] = Deferred()
        lock = DeferredLock()

        async def show() -> None:
            for item in await engine.unread():
                if options.json:
                    click.echo(output.dumps(output.item_json(item)))
                else:
                    click.echo(output.item_line(item))
                sys.stdout.flush()

        def show_later() -> None:
            lock.run(lambda: Deferred.fromCoroutine(show())).addErrback(
                lambda f: None if stopped.called else stopped.errback(f)
            )

        def on_event(event: Event) -> None:
            if isinstance(event, ConnectionStatus):
                _status(event)
                fatal = not event.connected and event.retry_in_s is None and event.detail
                if fatal and not stopped.called:
                    stopped.errback(ClientError(LocalCode.CONNECTION_LOST, event.detail))
            else:
                show_later()

        engine.subscribe(on_event)
        show_later()
        engine.start()
        await stopped

    try:
        options.with_engine(lambda engine: Deferred.fromCoroutine(use(engine)))
    except SystemExit as exit_:
        if exit_.code == EXIT_INTERRUPTED:
            sys.exit(0)  # Ctrl-C is how listening ends
        raise


def _status(event: ConnectionStatus) -> None:
    if event.connected:
        click.echo("medrelay: connected", err=True)
    elif event.retry_in_s is not None:
        detail = f"{event.detail}; " if event.detail else ""
        click.echo(f"medrelay: {detail}reconnecting in {event.retry_in_s:.1f} s", err=True)


@cli.group(invoke_without_command=True)
@common
@click.pass_context
def devices(ctx: click.Context, profile: Path | None, json_mode: bool) -> None:
    """List this account's devices (each verified against the clinic's certificates).

    `medrelay devices link` adds a new device (a phone, a laptop) to your account from this one.
    """
    if ctx.invoked_subcommand is not None:
        return
    options = _options(ctx, profile, json_mode)
    listed = options.with_engine(lambda engine: engine.devices())
    options.emit(output.devices_json(listed), output.devices_lines(listed))


class CliLinkUi:
    """The `LinkUi` of both link commands: the code and the digits on standard output (one JSON
    object per line with --json), progress on standard error, and the question on standard
    error too. `expected` (--yes-if-sas) answers the question instead: yes only when it equals
    the digits this device computed; "-" reads the digits to compare from standard input when
    they are needed (a script that read them off the other device's output)."""

    def __init__(self, options: Options, expected: str | None) -> None:
        self._options = options
        self._expected = expected

    def show_code(self, code: LinkCode) -> None:
        self._options.emit(output.link_code_json(code), output.link_code_lines(code))

    def status(self, text: str) -> None:
        if self._options.json:
            click.echo(output.dumps({"event": "status", "text": text}))
        else:
            click.echo(f"medrelay: {text}...", err=True)

    def confirm(self, check: LinkCheck) -> Deferred[bool]:
        self._options.emit(output.link_check_json(check), output.link_check_lines(check))
        if self._expected is None:
            try:
                answer: bool = click.confirm(
                    f"Do both screens show {check.display}?", default=False, err=True
                )
            except click.Abort:  # end of input: nobody said yes
                click.echo(err=True)  # end the question's line
                answer = False
            return defer.succeed(answer)
        expected = sys.stdin.readline() if self._expected == "-" else self._expected
        try:
            matches = same_sas(normalize_sas(expected.strip()), check.sas)
        except ValueError:
            matches = False
        if not matches:
            click.echo(
                f"medrelay: this device shows {check.display}, not the digits given", err=True
            )
        return defer.succeed(matches)


def _check_expected_sas(options: Options, expected: str | None) -> None:
    if expected is None or expected == "-":
        return
    try:
        normalize_sas(expected)
    except ValueError as exc:
        options.fail(LocalCode.INVALID_ARGUMENT, str(exc), exit_code=2)


_YES_IF_SAS_HELP: Final = (
    "For scripts and tests: answer the question yes only if this device shows these digits "
    "(- reads them from standard input when they are needed)."
)


@devices.command("link")
@click.option("--yes-if-sas", "expected", default=None, hidden=True, help=_YES_IF_SAS_HELP)
@common
@click.pass_context
def devices_link(
    ctx: click.Context, expected: str | None, profile: Path | None, json_mode: bool
) -> None:
    """Link a new device to your account from this one.

    Shows a one-time code: on the new device, run `medrelay link SERVER_URL CODE`. Both devices
    then show six digits; answer yes on each only if both screens show the same digits.
    Different digits mean someone is in the middle: answer no and tell clinic IT. The new
    device receives your keys only after both answers.
    """
    options = _options(ctx, profile, json_mode)
    _check_expected_sas(options, expected)
    ui = CliLinkUi(options, expected)
    result = options.with_engine(lambda engine: engine.link_device(ui))
    options.emit(output.linked_json(result), output.linked_line(result))


@cli.command("link")
@click.argument("server_url")
@click.argument("code")
@click.option("--yes-if-sas", "expected", default=None, hidden=True, help=_YES_IF_SAS_HELP)
@common
@click.pass_context
def link(
    ctx: click.Context,
    *,
    server_url: str,
    code: str,
    expected: str | None,
    profile: Path | None,
    json_mode: bool,
) -> None:
    """Make this device one of your account's devices, with the CODE your existing device shows.

    Run `medrelay devices link` on a device where you are enrolled; it shows the code and the
    SERVER_URL. Both devices then show six digits: answer yes only if both screens show the
    same digits. The keys are sealed here with a new passphrase.
    """
    options = _options(ctx, profile, json_mode)
    _check_expected_sas(options, expected)
    passphrase = read_passphrase(confirm=True)
    if not passphrase:
        options.fail(LocalCode.INVALID_ARGUMENT, "an empty passphrase would leave your keys open")
    app = options.app
    ui = CliLinkUi(options, expected)
    profile_text = str(options.profile)

    async def main() -> tuple[ProfileInfo, list[DeviceView]]:
        info = await app.link(options.profile, passphrase, server_url, code, ui)
        # Log in once as the new device: the relay accepts it and the identity log shows it.
        try:
            engine = await app.open_engine(options.profile, passphrase)
            engine.subscribe(_shout_security_warnings)
            try:
                listed = await engine.devices()
            except GeneratorExit:
                raise
            except BaseException:
                await engine.close()
                raise
            await engine.close()
        except ClientError as exc:
            raise ClientError(
                exc.code,
                f"this device is linked (profile {profile_text}), but logging in failed: "
                f"{exc.message}",
            ) from None
        return info, listed

    info, listed = options.run(lambda: Deferred.fromCoroutine(main()))
    options.emit(
        output.joined_json(info, profile_text, listed),
        output.joined_lines(info, profile_text, listed),
    )


@cli.command()
@click.argument("query", default="")
@click.option("--specialty", default=None, help="Only people whose specialty contains this.")
@click.option("--department", default=None, help="Only people whose department contains this.")
@common
@click.pass_context
def directory(
    ctx: click.Context,
    *,
    query: str,
    specialty: str | None,
    department: str | None,
    profile: Path | None,
    json_mode: bool,
) -> None:
    """Find people by part of their name or username (and specialty, department).

    Clinicians find colleagues; a patient sees their care team. Every name shown is the clinic's
    signed certificate, checked against the clinic's identity log.
    """
    options = _options(ctx, profile, json_mode)
    people = options.with_engine(
        lambda engine: engine.search_directory(query, specialty=specialty, department=department)
    )
    options.emit(output.people_json(people), output.people_lines(people))


@cli.group()
def account() -> None:
    """Accounts (registrars create patients, admins create staff)."""


@account.command("add")
@click.argument("username")
@click.option(
    "--role",
    type=click.Choice(["patient", "doctor", "nurse", "registrar", "admin"]),
    default="patient",
    show_default=True,
    help="The new account's role.",
)
@click.option("--name", "display_name", required=True, help="Display name, as on their ID.")
@click.option("--specialty", default=None, help="Specialty (clinicians).")
@click.option("--department", default=None, help="Department (clinicians).")
@common
@click.pass_context
def account_add(
    ctx: click.Context,
    *,
    username: str,
    role: str,
    display_name: str,
    specialty: str | None,
    department: str | None,
    profile: Path | None,
    json_mode: bool,
) -> None:
    """Create an account and print its one-time enrollment code, to hand over in person."""
    options = _options(ctx, profile, json_mode)
    created = options.with_engine(
        lambda engine: engine.create_account(
            username, role, display_name, specialty=specialty, department=department
        )
    )
    options.emit(output.new_account_json(created), output.new_account_lines(created))


@cli.group()
def care() -> None:
    """Care links between patients and clinicians (registrars, doctors and admins)."""


@care.command("link")
@click.argument("patient")
@click.argument("clinician")
@click.option("--visit-date", required=True, help="The in-person visit, YYYY-MM-DD.")
@click.option("--until", default=None, help="The link's last day, YYYY-MM-DD (default: a year).")
@common
@click.pass_context
def care_link(
    ctx: click.Context,
    *,
    patient: str,
    clinician: str,
    visit_date: str,
    until: str | None,
    profile: Path | None,
    json_mode: bool,
) -> None:
    """Let PATIENT and CLINICIAN write to each other, after an in-person visit."""
    options = _options(ctx, profile, json_mode)
    link = options.with_engine(
        lambda engine: engine.create_care_link(patient, clinician, visit_date, until)
    )
    options.emit(output.care_link_json(link), output.care_link_lines(link))


@care.command("end")
@click.argument("patient")
@click.argument("clinician")
@common
@click.pass_context
def care_end(
    ctx: click.Context, patient: str, clinician: str, profile: Path | None, json_mode: bool
) -> None:
    """End the care link of PATIENT and CLINICIAN now (messages already sent still arrive)."""
    options = _options(ctx, profile, json_mode)
    link = options.with_engine(lambda engine: engine.end_care_link(patient, clinician))
    options.emit(output.care_link_json(link), output.care_link_lines(link))


@cli.command("safety-number")
@click.argument("username")
@common
@click.pass_context
def safety_number(ctx: click.Context, username: str, profile: Path | None, json_mode: bool) -> None:
    """Show the safety number between you and USERNAME (60 digits in 12 groups).

    Both of you see the same number; compare it in person to be sure nobody stands between you.
    """
    options = _options(ctx, profile, json_mode)
    number = options.with_engine(lambda engine: engine.safety_number(username))
    options.emit(output.safety_json(username, number), output.safety_lines(username, number))


@cli.group()
def attachment() -> None:
    """Work with the attachments of received messages."""


@attachment.command("save")
@click.argument("message_id")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to write the files to.",
)
@common
@click.pass_context
def attachment_save(
    ctx: click.Context, message_id: str, out_dir: Path, profile: Path | None, json_mode: bool
) -> None:
    """Download, verify and decrypt the attachments of MESSAGE_ID (hex, as `inbox` shows it)."""
    options = _options(ctx, profile, json_mode)
    try:
        raw_id = bytes.fromhex(message_id)
    except ValueError:
        raw_id = b""
    if len(raw_id) != 16:
        options.fail(LocalCode.INVALID_ARGUMENT, "a message id is 32 hexadecimal digits")
    attachments = options.with_engine(lambda engine: engine.attachments(raw_id))
    saved = [(a, str(_write_attachment(options, out_dir, a, i))) for i, a in enumerate(attachments)]
    options.emit(output.saved_json(saved), output.saved_lines(saved))


def safe_file_name(name: str, index: int) -> str:
    """A name a peer chose, made harmless: no directories, no control characters, not hidden."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip().lstrip(".")
    return base[:200] or f"attachment-{index}"


def _write_attachment(options: Options, out_dir: Path, item: SavedAttachment, index: int) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        options.fail(LocalCode.INVALID_ARGUMENT, f"cannot create {out_dir}: {exc.strerror}")
    name = safe_file_name(item.file_name, index)
    stem, dot, suffix = name.rpartition(".")
    if not stem:
        stem, dot, suffix = name, "", ""
    for n in range(1000):
        candidate = out_dir / (name if n == 0 else f"{stem} ({n}){dot}{suffix}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            options.fail(LocalCode.INVALID_ARGUMENT, f"cannot write {candidate}: {exc.strerror}")
        with os.fdopen(fd, "wb") as f:
            f.write(item.data)
        return candidate
    options.fail(LocalCode.INVALID_ARGUMENT, f"too many files named {name} in {out_dir}")


@cli.command()
@common
@click.pass_context
def whoami(ctx: click.Context, profile: Path | None, json_mode: bool) -> None:
    """Show who this profile is: user, device, clinic and server (no passphrase needed)."""
    options = _options(ctx, profile, json_mode)
    app = options.app
    info = options.run(lambda: app.read_info(options.profile))
    cert = info.user_certificate
    who = Whoami(
        user_id=info.user_id,
        device_id=info.device_id,
        display_name=cert.display_name,
        role=cert.role.value,
        clinic_id=info.clinic_id,
        server_url=info.server_url,
        enrolled_at_ms=info.enrolled_at_ms,
    )
    options.emit(output.whoami_json(who), output.whoami_lines(who))


# --- hours, absences, automatic replies and the on-call roster --------------------------------

_USER_HELP: Final = "Whose schedule (default: yours; admins may change any clinician's)."


def _moment(options: Options, text: str, what: str, now_ms: int) -> int:
    """A moment typed by a person: "now", or YYYY-MM-DD HH:MM in this computer's time zone (or
    with an explicit offset, 2026-11-24T09:00+03:00)."""
    if text.strip().lower() == "now":
        return now_ms
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        options.fail(
            LocalCode.INVALID_ARGUMENT,
            f"{what}: {text!r} is not a time (expected YYYY-MM-DD HH:MM or now)",
            exit_code=2,
        )
    if moment.tzinfo is None:
        moment = moment.astimezone()  # this computer's zone, as `date` reads it
    return int(moment.timestamp() * 1000)


def next_clock_time(minute: int, zone: str, now_ms: int) -> int:
    """The next moment after now at which the clock in `zone` reads `minute` minutes after
    midnight (today's or tomorrow's). A time that occurs twice is its first occurrence; one
    that does not exist (spring forward) is read with the offset before the jump."""
    tz = output.zone_or_utc(zone)
    today = datetime.datetime.fromtimestamp(now_ms / 1000, tz=tz).date()
    for day in (today, today + datetime.timedelta(days=1), today + datetime.timedelta(days=2)):
        wall = datetime.datetime.combine(day, datetime.time()) + datetime.timedelta(minutes=minute)
        at_ms = int(wall.replace(tzinfo=tz).timestamp() * 1000)
        if at_ms > now_ms:
            return at_ms
    raise AssertionError("a clock time recurs within two days")


def _date(options: Options, text: str, what: str) -> str:
    try:
        return datetime.date.fromisoformat(text.strip()).isoformat()
    except ValueError:
        options.fail(
            LocalCode.INVALID_ARGUMENT, f"{what}: {text!r} is not a date (YYYY-MM-DD)", exit_code=2
        )


def _show_availability(options: Options, view: AvailabilityView) -> None:
    options.emit(output.availability_json(view), output.availability_lines(view))


def _change_schedule(
    options: Options,
    user: str | None,
    change: Callable[[EngineApi, str], Deferred[ScheduleChange]] | ScheduleChange,
    show: Callable[[AvailabilityView], str] = output.availability_lines,
) -> None:
    """Apply `change` (or what it computes from the engine) to `user`'s schedule (default:
    the profile's own), then show the schedule as the relay now has it."""

    async def use(engine: EngineApi) -> AvailabilityView:
        target = user or engine.whoami().user_id
        wanted = change if isinstance(change, ScheduleChange) else await change(engine, target)
        return await engine.set_schedule(target, wanted)

    view = options.with_engine(lambda e: Deferred.fromCoroutine(use(e)))
    options.emit(output.availability_json(view), show(view))


@cli.group()
def hours() -> None:
    """Clinicians' hours: see whether someone is available, set your own.

    Outside their hours a clinician does not get patients' messages (they wait, or arrive
    without a notification, as the clinic decided), and patients get an automatic reply saying
    when they will be read and what to do if it cannot wait.
    """


@hours.command("show")
@click.argument("username", required=False)
@common
@click.pass_context
def hours_show(
    ctx: click.Context, username: str | None, profile: Path | None, json_mode: bool
) -> None:
    """Show USERNAME's hours (default: yours), whether they are available now and until when,
    their absences, and who is on call while they are away. Times are in your time zone."""
    options = _options(ctx, profile, json_mode)

    def use(engine: EngineApi) -> Deferred[AvailabilityView]:
        return engine.availability(username or engine.whoami().user_id)

    _show_availability(options, options.with_engine(use))


@hours.command("set")
@click.argument("spec")
@click.option(
    "--tz",
    "time_zone",
    default=None,
    help="The hours' time zone (IANA, e.g. Europe/Moscow; default: yours or the clinic's).",
)
@click.option("--user", default=None, help=_USER_HELP)
@common
@click.pass_context
def hours_set(
    ctx: click.Context,
    *,
    spec: str,
    time_zone: str | None,
    user: str | None,
    profile: Path | None,
    json_mode: bool,
) -> None:
    """Set weekly hours, replacing the old ones.

    SPEC is days then times, groups separated by ";", for example
    "mon-fri 09:00-13:00,14:00-18:00; sat 10:00-12:00". An end before the start runs overnight
    (22:00-06:00). "none" means no hours at all: patients' messages always wait.
    """
    options = _options(ctx, profile, json_mode)
    intervals: tuple[HoursInterval, ...] = ()
    if spec.strip().lower() != "none":
        try:
            intervals = parse_hours(spec)
        except HoursSyntaxError as exc:
            options.fail(LocalCode.INVALID_ARGUMENT, str(exc), exit_code=2)
    _change_schedule(options, user, ScheduleChange(time_zone=time_zone, hours=intervals))


@hours.command("available-until")
@click.argument("until")
@click.option("--user", default=None, help=_USER_HELP)
@common
@click.pass_context
def hours_available_until(
    ctx: click.Context, *, until: str, user: str | None, profile: Path | None, json_mode: bool
) -> None:
    """Declare yourself available now until UNTIL (HH:MM in your hours' time zone, within the
    next 24 hours), whatever your hours say; "off" ends it now. Messages waiting for you arrive
    at once."""
    options = _options(ctx, profile, json_mode)
    minute: int | None = None
    if until.strip().lower() != "off":
        try:
            minute = parse_time(until, "until")
        except HoursSyntaxError as exc:
            options.fail(LocalCode.INVALID_ARGUMENT, str(exc), exit_code=2)

    async def change(engine: EngineApi, target: str) -> ScheduleChange:
        if minute is None:
            return ScheduleChange(available_until_ms=0)
        zone = (await engine.availability(target)).time_zone
        return ScheduleChange(available_until_ms=next_clock_time(minute, zone, engine.now_ms()))

    _change_schedule(options, user, lambda e, t: Deferred.fromCoroutine(change(e, t)))


@cli.command()
@click.argument("first")
@click.argument("last", required=False)
@click.option(
    "--reason",
    type=click.Choice(["vacation", "sick", "other"]),
    default="vacation",
    show_default=True,
    help="Why (patients are only told that you are away).",
)
@click.option("--cancel", is_flag=True, help="Remove the absence that starts on FIRST instead.")
@click.option("--user", default=None, help=_USER_HELP)
@common
@click.pass_context
def away(
    ctx: click.Context,
    *,
    first: str,
    last: str | None,
    reason: str,
    cancel: bool,
    user: str | None,
    profile: Path | None,
    json_mode: bool,
) -> None:
    """Be away from FIRST to LAST (whole days, YYYY-MM-DD, both included; LAST defaults to
    FIRST): vacation, sick leave. Patients' messages wait for your return, and the on-call
    clinician of your department answers urgent ones."""
    options = _options(ctx, profile, json_mode)
    first_day = _date(options, first, "FIRST")
    last_day = _date(options, last, "LAST") if last is not None else first_day
    if last_day < first_day:
        options.fail(
            LocalCode.INVALID_ARGUMENT, f"LAST ({last_day}) is before FIRST ({first_day})", 2
        )

    async def change(engine: EngineApi, target: str) -> ScheduleChange:
        current = (await engine.availability(target)).absences
        if cancel:
            kept = tuple(a for a in current if a.first != first_day)
            if len(kept) == len(current):
                raise ClientError(
                    LocalCode.NOT_FOUND, f"no absence of {target} starts on {first_day}"
                )
        else:
            kept = (*current, AbsenceView(first_day, last_day, reason))
        return ScheduleChange(absences=kept)

    _change_schedule(options, user, lambda e, t: Deferred.fromCoroutine(change(e, t)))


@cli.group()
def autoreply() -> None:
    """Your automatic reply: what patients who write outside your hours are told."""


@autoreply.command("set")
@click.argument("text")
@click.option("--user", default=None, help=_USER_HELP)
@common
@click.pass_context
def autoreply_set(
    ctx: click.Context, *, text: str, user: str | None, profile: Path | None, json_mode: bool
) -> None:
    """Set your automatic reply to TEXT (- reads it from standard input).

    It may use {clinician}, {reads_at} (when you will read the message, in the patient's time
    zone), {emergency} (the clinic's emergency numbers) and {on_call}. Never put health data in
    it: the clinic signs it and sends it without encryption to any patient who writes.
    """
    options = _options(ctx, profile, json_mode)
    if text == "-":
        text = sys.stdin.read()
    if not text.strip():
        options.fail(
            LocalCode.INVALID_ARGUMENT, "empty text (use `medrelay autoreply clear`)", exit_code=2
        )
    _change_schedule(options, user, ScheduleChange(autoreply=text))


@autoreply.command("clear")
@click.option("--user", default=None, help=_USER_HELP)
@common
@click.pass_context
def autoreply_clear(
    ctx: click.Context, *, user: str | None, profile: Path | None, json_mode: bool
) -> None:
    """Go back to the clinic's default automatic reply."""
    options = _options(ctx, profile, json_mode)
    _change_schedule(options, user, ScheduleChange(autoreply=""))


@cli.command()
@click.argument("zone")
@click.option("--user", default=None, help=_USER_HELP)
@common
@click.pass_context
def timezone(
    ctx: click.Context, *, zone: str, user: str | None, profile: Path | None, json_mode: bool
) -> None:
    """Set your time zone (IANA, e.g. Asia/Novosibirsk): clinicians' hours are in it, and
    automatic replies tell patients times in theirs."""
    options = _options(ctx, profile, json_mode)
    _change_schedule(
        options,
        user,
        ScheduleChange(time_zone=zone),
        show=lambda view: f"{view.user_id}: time zone {view.time_zone}",
    )


@cli.group()
def oncall() -> None:
    """The on-call roster: who answers patients' urgent messages for a department while its
    clinicians are away (registrars and admins edit it; staff can read it)."""


def _show_shifts(options: Options, shifts: list[ShiftView]) -> None:
    options.emit(output.shifts_json(shifts), output.shifts_lines(shifts, None))


@oncall.command("add")
@click.argument("clinician")
@click.option("--department", required=True, help="The department they answer for.")
@click.option(
    "--from",
    "starts",
    required=True,
    help="Start: YYYY-MM-DD HH:MM (this computer's time zone) or now.",
)
@click.option(
    "--to", "ends", required=True, help="End: YYYY-MM-DD HH:MM (at most 14 days after the start)."
)
@common
@click.pass_context
def oncall_add(
    ctx: click.Context,
    *,
    clinician: str,
    department: str,
    starts: str,
    ends: str,
    profile: Path | None,
    json_mode: bool,
) -> None:
    """Put CLINICIAN on call for a department from --from to --to."""
    options = _options(ctx, profile, json_mode)

    def use(engine: EngineApi) -> Deferred[list[ShiftView]]:
        now = engine.now_ms()
        return engine.roster_add(
            clinician,
            department,
            _moment(options, starts, "--from", now),
            _moment(options, ends, "--to", now),
        )

    _show_shifts(options, options.with_engine(use))


@oncall.command("remove")
@click.argument("shift_id", type=click.IntRange(min=0))
@common
@click.pass_context
def oncall_remove(ctx: click.Context, shift_id: int, profile: Path | None, json_mode: bool) -> None:
    """Remove shift SHIFT_ID (the number `medrelay oncall list` shows)."""
    options = _options(ctx, profile, json_mode)
    _show_shifts(options, options.with_engine(lambda engine: engine.roster_remove(shift_id)))


@oncall.command("list")
@common
@click.pass_context
def oncall_list(ctx: click.Context, profile: Path | None, json_mode: bool) -> None:
    """The shifts that have not ended yet, in this computer's time zone."""
    options = _options(ctx, profile, json_mode)
    _show_shifts(options, options.with_engine(lambda engine: engine.roster()))


# --- teleconsultation visits and the medical record ----------------------------------------

_INDICATION: Final = re.compile(r"[a-z][a-z0-9_-]*")
"""What the clinic's indication codes look like (server configuration)."""
SAVE_TIMEOUT_S: Final = 300.0
"""A record bundle may be large: its upload and the relay's confirmation get longer."""


def _check_visit_id(options: Options, visit: str) -> None:
    try:
        encode_body(VisitList(rid=1, visit=visit))
        RecordRequest(visit).encode()  # the ids a record can name
    except (ProtocolError, ValueError):
        options.fail(LocalCode.INVALID_ARGUMENT, f"{visit!r} is not a visit id", exit_code=2)


def _check_username(options: Options, user: str, what: str) -> None:
    try:
        check_id(user, what)
    except (TypeError, ValueError) as exc:
        options.fail(LocalCode.INVALID_ARGUMENT, str(exc), exit_code=2)


def _iso_moment(options: Options, text: str, what: str) -> int:
    """An ISO 8601 date and time (2026-11-24T09:00, with an offset or in this computer's zone)."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        options.fail(
            LocalCode.INVALID_ARGUMENT,
            f"{what}: {text!r} is not a date and time (expected YYYY-MM-DDTHH:MM)",
            exit_code=2,
        )
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return int(moment.timestamp() * 1000)


@cli.group()
def visit() -> None:
    """Teleconsultation visits: a doctor opens one for a patient seen in person, talks in its
    thread, and closes it with a conclusion; the visit can then be saved in the patient's
    medical record (`medrelay record save`)."""


@visit.command("open")
@click.argument("patient")
@click.option(
    "--indication",
    required=True,
    help="Why, as one of the clinic's indication codes (`medrelay visit list` shows them).",
)
@common
@click.pass_context
def visit_open(
    ctx: click.Context, *, patient: str, indication: str, profile: Path | None, json_mode: bool
) -> None:
    """Open a teleconsultation visit with PATIENT (doctors, with an active care link).

    The patient is told in the visit's thread that the conversation will be saved in their
    medical record (or, if the clinic asks for explicit consent, that nothing is saved until
    they agree). Your messages to PATIENT then go in the visit's thread.
    """
    options = _options(ctx, profile, json_mode)
    _check_username(options, patient, "PATIENT")
    if len(indication) > MAX_INDICATION_CODE_BYTES or not _INDICATION.fullmatch(indication):
        options.fail(
            LocalCode.INVALID_ARGUMENT, f"{indication!r} is not an indication code", exit_code=2
        )
    app = options.app
    opened = options.with_engine(
        lambda engine: app_timeout(app, engine.open_visit(patient, indication), SEND_TIMEOUT_S)
    )
    options.emit(output.visit_json(opened), output.visit_opened_lines(opened))


@visit.command("close")
@click.argument("visit_id", metavar="VISIT")
@click.option(
    "--conclusion", required=True, help="The visit's conclusion (- reads it from standard input)."
)
@click.option(
    "--file",
    "file_paths",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Attach a file to the conclusion (encrypted before upload). May be given several times.",
)
@common
@click.pass_context
def visit_close(
    ctx: click.Context,
    *,
    visit_id: str,
    conclusion: str,
    file_paths: tuple[Path, ...],
    profile: Path | None,
    json_mode: bool,
) -> None:
    """Close VISIT with a conclusion: it is sent to the patient in the visit's thread, then the
    visit closes. Running it again after a failure reuses a conclusion already sent."""
    options = _options(ctx, profile, json_mode)
    _check_visit_id(options, visit_id)
    if conclusion == "-":
        conclusion = sys.stdin.read()
    if not conclusion.strip():
        options.fail(LocalCode.INVALID_ARGUMENT, "the conclusion is empty", exit_code=2)
    for path in file_paths:
        if not path.is_file():
            options.fail(LocalCode.INVALID_ARGUMENT, f"no file {path}", exit_code=2)
    files = _read_files(options, file_paths)
    app = options.app
    closed = options.with_engine(
        lambda engine: app_timeout(
            app, engine.close_visit(visit_id, conclusion, files), SEND_TIMEOUT_S
        )
    )
    options.emit(output.visit_json(closed), output.visit_closed_lines(closed))


@visit.command("list")
@click.option("--open", "open_only", is_flag=True, help="Only the visits still open.")
@common
@click.pass_context
def visit_list(
    ctx: click.Context, *, open_only: bool, profile: Path | None, json_mode: bool
) -> None:
    """Your visits, newest first (as clinician or patient), and the clinic's indications."""
    options = _options(ctx, profile, json_mode)
    listed = options.with_engine(lambda engine: engine.visits(open_only=open_only))
    options.emit(output.visits_json(listed), output.visits_lines(listed))


@visit.command("consent")
@click.argument("visit_id", metavar="VISIT")
@common
@click.pass_context
def visit_consent(
    ctx: click.Context, *, visit_id: str, profile: Path | None, json_mode: bool
) -> None:
    """Agree (as the patient) that VISIT is saved in your medical record: your doctor gets
    your consent in the visit's thread. Only while the visit is open."""
    options = _options(ctx, profile, json_mode)
    _check_visit_id(options, visit_id)
    app = options.app
    sent = options.with_engine(
        lambda engine: app_timeout(app, engine.consent_to_visit(visit_id), SEND_TIMEOUT_S)
    )
    options.emit(output.consent_json(visit_id, sent), output.consent_line(visit_id, sent))


@cli.group()
def record() -> None:
    """The patient's medical record: save a closed visit, or a conversation's time range."""


@record.command("save")
@click.option("--visit", "visit_id", default=None, help="The closed visit to save.")
@click.option(
    "--with", "with_user", default=None, help="Save the conversation with this patient instead."
)
@click.option(
    "--from", "starts", default=None, help="With --with: from YYYY-MM-DDTHH:MM (ISO 8601)."
)
@click.option("--to", "ends", default=None, help="With --with: to YYYY-MM-DDTHH:MM (ISO 8601).")
@click.option("--records-user", default=RECORDS_USER, hidden=True, help="The records account.")
@common
@click.pass_context
def record_save(
    ctx: click.Context,
    *,
    visit_id: str | None,
    with_user: str | None,
    starts: str | None,
    ends: str | None,
    records_user: str,
    profile: Path | None,
    json_mode: bool,
) -> None:
    """Send a closed visit (--visit) or the conversation with a patient between two moments
    (--with, --from, --to) to the clinic's records gateway, end to end encrypted.

    The messages go exactly as they were signed, with the certificates and identity-log proofs
    that let anyone check them later; the bundle is checked here before it leaves. The
    gateway's receipt arrives in the visit's thread for you and the patient.
    """
    options = _options(ctx, profile, json_mode)
    _check_username(options, records_user, "--records-user")
    from_ms: int | None = None
    to_ms: int | None = None
    if (visit_id is None) == (with_user is None):
        options.fail(LocalCode.INVALID_ARGUMENT, "give either --visit or --with", exit_code=2)
    if visit_id is not None:
        _check_visit_id(options, visit_id)
        if starts is not None or ends is not None:
            options.fail(
                LocalCode.INVALID_ARGUMENT, "--from and --to go with --with only", exit_code=2
            )
    else:
        assert with_user is not None  # noqa: S101 (checked above)
        _check_username(options, with_user, "--with")
        if starts is None or ends is None:
            options.fail(LocalCode.INVALID_ARGUMENT, "--with needs --from and --to", exit_code=2)
        from_ms = _iso_moment(options, starts, "--from")
        to_ms = _iso_moment(options, ends, "--to")
        if to_ms < from_ms:
            options.fail(LocalCode.INVALID_ARGUMENT, "--to is before --from", exit_code=2)
    app = options.app
    saved = options.with_engine(
        lambda engine: app_timeout(
            app,
            engine.save_record(
                visit=visit_id,
                with_user=with_user,
                from_ms=from_ms,
                to_ms=to_ms,
                records_user=records_user,
            ),
            SAVE_TIMEOUT_S,
        )
    )
    options.emit(output.record_sent_json(saved), output.record_sent_line(saved))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="medrelay")

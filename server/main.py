"""`medrelay-server`: the operator's command line, and the process's composition root.

    medrelay-server serve  [--config FILE] [--data-dir DIR] [--port N] [--metrics-port N]
    medrelay-server init   [--config FILE] [--data-dir DIR] [--reseal]
    medrelay-server migrate [--config FILE] [--data-dir DIR]
    medrelay-server admin add-user USERNAME --role ROLE --name NAME [--specialty S]
                                   [--department D] [--config FILE] [--data-dir DIR] [--json]
    medrelay-server admin link PATIENT CLINICIAN --visit-date YYYY-MM-DD [--until YYYY-MM-DD]
                                   [--json]
    medrelay-server admin unlink PATIENT CLINICIAN [--json]
    medrelay-server admin links USERNAME [--json]
    medrelay-server admin holiday add DATE NAME [--json]
    medrelay-server admin holiday remove DATE [--json]
    medrelay-server admin holiday list [--json]
    medrelay-server audit verify [--anchor N:HEX] [--json]
    medrelay-server audit show [--since ISO] [--until ISO] [--actor A] [--action X]
                               [--target T] [--limit N] [--json]

Every command finds its configuration and data the same way (`medrelay.server.config`): the
TOML file of `--config` or `$MEDRELAY_CONFIG`, `MEDRELAY_<SECTION>_<KEY>` variables, then the
flags; with none of them, `./var/` under the working directory. A bad value stops the command
with one line: `config error: <key>: <problem>`.

The real reactor, clock and random source enter here and nowhere else: the reactor is imported
only inside `serve`, and the other commands take their clock and rng from the `Environment`
in the click context (tests pass their own).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import click
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from medrelay.crypto.certificates import ClinicKeyPurpose, Role
from medrelay.crypto.passwords import PasswordHasher
from medrelay.crypto.rng import Rng, system_rng
from medrelay.crypto.sealing import SealParams
from medrelay.server import admin, audit
from medrelay.server.admin import resolved
from medrelay.server.audit import OPERATOR, AuditAction, AuditResult, append_audit_txn
from medrelay.server.clinic import (
    AUTO_PASSPHRASE,
    ClinicKeyError,
    ClinicKeys,
    clinic_keys_exist,
    create_clinic_keys,
    load_clinic_keys,
    read_auto_passphrase,
    reseal_root_key,
    rotate_clinic_key,
)
from medrelay.server.config import Config, ConfigError, Overrides, load_config
from medrelay.server.enrollment import CLIENT_ROLES
from medrelay.server.policy import Relationship, last_day
from medrelay.server.revocation import (
    RevocationError,
    Revoked,
    revoke_account_txn,
    revoke_device_txn,
)
from medrelay.server.slips import Slip, write_slip
from medrelay.server.slips import server_url as slip_server_url
from medrelay.server.storage.database import Database
from medrelay.server.storage.transparency import log_clinic_certificates_txn
from medrelay.server.transparency import signed_checkpoint_txn, verify_log_txn

ROOT_PASSPHRASE_ENV: Final = "MEDRELAY_ROOT_PASSPHRASE"  # noqa: S105 (a variable name)
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class Environment:
    """What the commands take from the outside world (tests pass their own)."""

    environ: Mapping[str, str]
    cwd: Path
    rng: Rng
    now: Callable[[], float]
    """Seconds since the epoch."""
    seal_params: SealParams | None = None


def real_environment() -> Environment:
    return Environment(environ=os.environ, cwd=Path.cwd(), rng=system_rng, now=time.time)


def _environment(ctx: click.Context) -> Environment:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Environment) else real_environment()


def fail(message: str, exit_code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"medrelay-server: {message}", err=True)
    sys.exit(exit_code)


def _load(env: Environment, config_path: Path | None, overrides: Overrides) -> Config:
    try:
        return load_config(config_path, environ=env.environ, cwd=env.cwd, overrides=overrides)
    except ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


def _location_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--config` and `--data-dir`, shared by every command."""
    command = click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where the database and keys live (default ./var; storage.data_dir).",
    )(command)
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="TOML configuration file (default: $MEDRELAY_CONFIG, else built-in defaults).",
    )(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """medrelay-server: the clinic's end-to-end encrypted message relay.

    Start with `serve` (creates ./var/ on first start), then create accounts with
    `admin add-user` and hand out the enrollment codes in person.
    """


# --- serve --------------------------------------------------------------------------------------


@cli.command()
@_location_options
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Clients' port.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, help="Metrics port.")
@click.pass_context
def serve(
    ctx: click.Context,
    config_path: Path | None,
    data_dir: Path | None,
    port: int | None,
    metrics_port: int | None,
) -> None:
    """Run the relay until SIGTERM or Ctrl-C."""
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir, port, metrics_port))
    run_server(config, env)


def run_server(config: Config, env: Environment) -> None:
    """Run the server on the global reactor until a signal stops it; exits the process."""
    from twisted.internet import reactor as global_reactor  # noqa: PLC0415 (composition root)
    from twisted.internet import task  # noqa: PLC0415

    from medrelay.server.app import StartupError, make_service  # noqa: PLC0415
    from medrelay.server.logs import start_logging  # noqa: PLC0415

    start_logging(config.logging, sys.stdout)

    async def main(reactor: Any) -> None:
        # Start once the reactor runs: its SIGTERM/SIGINT handlers are installed by then, so a
        # signal arriving as soon as the ports are open already stops the server in order.
        running: Deferred[None] = Deferred()
        reactor.callWhenRunning(running.callback, None)
        await running
        try:
            service = make_service(
                config,
                reactor=reactor,
                rng=env.rng,
                registry=CollectorRegistry(),
                seal_params=env.seal_params,
            )
        except (StartupError, ConfigError) as exc:
            click.echo(f"medrelay-server: {exc}", err=True)
            raise SystemExit(EXIT_FAILED) from None
        service.startService()
        try:
            await service.web.when_listening()
            if service.metrics is not None:
                await service.metrics.when_listening()
        except Exception as exc:
            click.echo(f"medrelay-server: cannot listen: {_reason(exc)}", err=True)
            await service.stopService()
            raise SystemExit(EXIT_FAILED) from None
        # SIGTERM and SIGINT stop the reactor; before it stops, the service shuts down in order
        # (ports, relay drain, database) and the reactor waits for that.
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        await Deferred()  # until the reactor stops

    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)), _reactor=global_reactor)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --- init ---------------------------------------------------------------------------------------


def _passphrase_from_environment(config: Config, env: Environment) -> str | None:
    value = env.environ.get(ROOT_PASSPHRASE_ENV)
    if value:
        return value
    path = config.keys.root_passphrase_path
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"keys.root_passphrase_path: cannot read {path} ({exc})")
        return text.rstrip("\r\n")
    return None


def _new_passphrase(config: Config, env: Environment) -> str:
    passphrase = _passphrase_from_environment(config, env)
    if passphrase is not None:
        return passphrase
    prompted: str = click.prompt(
        "Passphrase for the clinic root key", hide_input=True, confirmation_prompt=True, err=True
    )
    return prompted


@cli.command()
@_location_options
@click.option(
    "--reseal",
    is_flag=True,
    help="Keep the existing keys, but seal the root key under a new passphrase (for keys "
    "created automatically on a first start).",
)
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def init(
    ctx: click.Context,
    config_path: Path | None,
    data_dir: Path | None,
    reseal: bool,
    json_mode: bool,
) -> None:
    """Create the clinic keys (root key sealed by a passphrase, issuing key, log key).

    The passphrase comes from $MEDRELAY_ROOT_PASSPHRASE, keys.root_passphrase_path, or a prompt.
    """
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir=data_dir))
    keys_dir = config.keys.dir
    try:
        if reseal:
            _reseal(config, env)
            if json_mode:
                click.echo(json.dumps({"resealed": True, "keys_dir": str(keys_dir)}))
            else:
                click.echo(f"the root key in {keys_dir} is now sealed under the new passphrase")
            return
        if clinic_keys_exist(keys_dir):
            hint = (
                " (they were created automatically on a first start: `init --reseal` seals "
                "their root key under your own passphrase)"
                if (keys_dir / AUTO_PASSPHRASE).exists()
                else ""
            )
            fail(f"clinic keys already exist in {keys_dir}; refusing to overwrite them{hint}")
        passphrase = _new_passphrase(config, env)
        keys = create_clinic_keys(
            keys_dir,
            clinic_id=config.server.clinic_id,
            passphrase=passphrase,
            now_ms=int(env.now() * 1000),
            rng=env.rng,
            seal_params=env.seal_params,
        )
    except ClinicKeyError as exc:
        fail(str(exc))
    if json_mode:
        summary = {"clinic": keys.clinic_id, "keys_dir": str(keys_dir)}
        click.echo(json.dumps({**summary, "root_key": keys.root_key.to_text()}))
        return
    click.echo(f"created the keys of clinic {keys.clinic_id} in {keys_dir}")
    click.echo(f"root key: {keys.root_key.to_text()}")
    click.echo(
        "keep a copy of root-key.sealed and its passphrase offline; the server needs only "
        "the other files"
    )


def _reseal(config: Config, env: Environment) -> None:
    keys_dir = config.keys.dir
    old = read_auto_passphrase(keys_dir)
    if old is None:
        old = click.prompt("Current passphrase of the clinic root key", hide_input=True, err=True)
    new = _new_passphrase(config, env)
    reseal_root_key(
        keys_dir,
        old_passphrase=old,
        new_passphrase=new,
        rng=env.rng,
        seal_params=env.seal_params,
    )


# --- migrate ------------------------------------------------------------------------------------


@cli.command()
@_location_options
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def migrate(
    ctx: click.Context, config_path: Path | None, data_dir: Path | None, json_mode: bool
) -> None:
    """Bring the database schema to this version (serve also does it at start)."""
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir=data_dir))
    try:
        before, now = admin.migrate(config)
    except admin.AdminError as exc:
        fail(str(exc))
    if json_mode:
        click.echo(json.dumps({"from": before, "to": now}))
    elif before == now:
        click.echo(f"the database is up to date (revision {now})")
    else:
        click.echo(f"migrated the database from revision {before or 'none'} to {now}")


# --- admin --------------------------------------------------------------------------------------


_slip_option = click.option(
    "--slip",
    "slip_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a printable enrollment slip (code, server, instructions) to this new file.",
)


@cli.group(name="admin")
def admin_group() -> None:
    """Accounts, enrollment codes, care links and the clinic's holidays."""


@admin_group.command(name="add-user")
@click.argument("username")
@click.option(
    "--role",
    type=click.Choice([r.value for r in CLIENT_ROLES]),
    required=True,
    help="The account's role.",
)
@click.option("--name", "display_name", required=True, help='Display name, e.g. "Dr. Ivanova".')
@click.option("--specialty", default=None, help="Specialty, e.g. cardiology (optional).")
@click.option("--department", default=None, help="Department (optional).")
@_slip_option
@_location_options
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def add_user(
    ctx: click.Context,
    *,
    username: str,
    role: str,
    display_name: str,
    specialty: str | None,
    department: str | None,
    slip_path: Path | None,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """Create an account and print its one-time enrollment code.

    Hand the code to the person in person; it works once and expires (72 hours by default).
    With --slip, print that file and hand it over (it holds the live code: readable by you
    only, and never overwritten).
    """
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir=data_dir))
    if slip_path is not None:
        _check_slip_path(slip_path)
    try:
        database = admin.open_admin_database(config)
        try:
            account = admin.add_user(
                database,
                username=username,
                role=Role(role),
                display_name=display_name,
                specialty=specialty,
                department=department,
                now_ms=int(env.now() * 1000),
                code_ttl_hours=config.enrollment.code_ttl_hours,
                hasher=PasswordHasher(config.passwords),
                rng=env.rng,
            )
        finally:
            database.close()
    except admin.AdminError as exc:
        if json_mode:
            error = {"error": {"code": "refused", "message": str(exc)}}
            click.echo(json.dumps(error), err=True)
            sys.exit(EXIT_FAILED)
        fail(str(exc))
    _hand_over(account, config, slip_path, json_mode, f"created {account.role.value} account")


def _hand_over(
    account: admin.NewAccount,
    config: Config,
    slip_path: Path | None,
    json_mode: bool,
    what: str,
) -> None:
    """Print a new enrollment code (and write its slip): the one time it is ever shown."""
    expires = datetime.datetime.fromtimestamp(account.expires_ms / 1000, tz=datetime.UTC)
    expires_text = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    if slip_path is not None:
        slip = Slip(
            account.username,
            account.role.value,
            account.enrollment_code,
            account.expires_ms,
            slip_server_url(config.server),
        )
        try:
            write_slip(slip_path, slip)
        except OSError as exc:
            fail(
                f"{account.username}: could not write the slip {slip_path} ({exc.strerror}); "
                "issue a new code with `admin reset-code`"
            )
    if json_mode:
        click.echo(
            json.dumps(
                {
                    "username": account.username,
                    "role": account.role.value,
                    "enrollment_code": account.enrollment_code,
                    "expires_at": expires_text,
                    "slip": None if slip_path is None else str(slip_path),
                }
            )
        )
        return
    click.echo(f"{what} {account.username}")
    click.echo(f"enrollment code: {account.enrollment_code}")
    click.echo(f"valid once, until {expires_text}; hand it to the person in person")


@admin_group.command(name="reset-code")
@click.argument("username")
@_slip_option
@_location_options
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def reset_code(
    ctx: click.Context,
    *,
    username: str,
    slip_path: Path | None,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """Give an account that has not enrolled yet a new one-time code (a lost or expired slip);
    the old code stops working."""
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir=data_dir))
    if slip_path is not None:
        _check_slip_path(slip_path)
    try:
        database = admin.open_admin_database(config)
        try:
            account = admin.reset_code(
                database,
                username=username,
                now_ms=int(env.now() * 1000),
                code_ttl_hours=config.enrollment.code_ttl_hours,
                hasher=PasswordHasher(config.passwords),
                rng=env.rng,
            )
        finally:
            database.close()
    except admin.AdminError as exc:
        fail(str(exc))
    _hand_over(account, config, slip_path, json_mode, f"new code for {account.role.value} account")


def _check_slip_path(path: Path) -> None:
    """Refuse a slip path before the account exists, so a bad path loses no code."""
    if path.exists():
        fail(f"--slip: {path} already exists; choose a new file (slips hold live codes)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        fail(f"--slip: cannot write into {parent}")


# --- admin: care links ---------------------------------------------------------------------------


def _utc_text(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _link_json(view: admin.LinkView) -> dict[str, object]:
    link = view.link
    return {
        "patient": link.patient,
        "clinician": link.clinician,
        "visit_date": link.visit_date,
        "state": view.state.value,
        "created_at": _utc_text(link.created_ms),
        "created_by": link.created_by,
        "until": last_day(link.ends_ms),
        "ends_at": _utc_text(link.ends_ms),
        "ended_at": _utc_text(link.ended_ms) if link.ended_ms is not None else None,
        "ended_by": link.ended_by,
    }


def _link_text(view: admin.LinkView) -> str:
    link = view.link
    if link.ended_ms is not None and link.ended_ms < link.ends_ms:
        end = f"ended on {last_day(link.ended_ms)} by {link.ended_by}"
    elif view.state is Relationship.ACTIVE:
        end = f"until {last_day(link.ends_ms)}"
    else:
        end = f"ended on {last_day(link.ends_ms)}"
    return (
        f"{link.patient} - {link.clinician}: {view.state.value}, visit {link.visit_date}, "
        f"{end} (created by {link.created_by})"
    )


def _admin_failed(exc: admin.AdminError, json_mode: bool) -> NoReturn:
    if json_mode:
        click.echo(json.dumps({"error": {"code": "refused", "message": str(exc)}}), err=True)
        sys.exit(EXIT_FAILED)
    fail(str(exc))


def _with_admin_database(
    ctx: click.Context,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
    action: Callable[[Database, int], _R],
) -> _R:
    """Run `action(database, now_ms)` on the configured database; errors are one line."""
    return _with_admin_config(
        ctx, config_path, data_dir, json_mode, lambda _config, db, now_ms: action(db, now_ms)
    )


def _with_admin_config(
    ctx: click.Context,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
    action: Callable[[Config, Database, int], _R],
) -> _R:
    """`_with_admin_database` for an action that also reads the configuration."""
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir=data_dir))
    try:
        database = admin.open_admin_database(config)
        try:
            return action(config, database, int(env.now() * 1000))
        finally:
            database.close()
    except admin.AdminError as exc:
        _admin_failed(exc, json_mode)


_json_option = click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")


@admin_group.command(name="link")
@click.argument("patient")
@click.argument("clinician")
@click.option(
    "--visit-date",
    required=True,
    metavar="YYYY-MM-DD",
    help="The date of the in-person visit the link follows (not in the future).",
)
@click.option(
    "--until",
    default=None,
    metavar="YYYY-MM-DD",
    help="The link's last day, inclusive, UTC (default: 365 days from now).",
)
@_location_options
@_json_option
@click.pass_context
def link_command(
    ctx: click.Context,
    *,
    patient: str,
    clinician: str,
    visit_date: str,
    until: str | None,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """Let PATIENT write to CLINICIAN (a doctor or nurse), and back, after an in-person visit.

    The link ends after its last day, or earlier with `admin unlink`.
    """
    view = _with_admin_database(
        ctx,
        config_path,
        data_dir,
        json_mode,
        lambda database, now_ms: admin.link(
            database,
            patient=patient,
            clinician=clinician,
            visit_date=visit_date,
            until=until,
            now_ms=now_ms,
        ),
    )
    if json_mode:
        click.echo(json.dumps(_link_json(view)))
        return
    click.echo(
        f"linked patient {view.link.patient} to {view.link.clinician} "
        f"until {last_day(view.link.ends_ms)} (visit {view.link.visit_date})"
    )


@admin_group.command(name="unlink")
@click.argument("patient")
@click.argument("clinician")
@_location_options
@_json_option
@click.pass_context
def unlink_command(
    ctx: click.Context,
    *,
    patient: str,
    clinician: str,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """End the active care link of PATIENT and CLINICIAN now.

    New messages between them are refused from now on; messages already sent are still
    delivered.
    """
    view = _with_admin_database(
        ctx,
        config_path,
        data_dir,
        json_mode,
        lambda database, now_ms: admin.unlink(
            database, patient=patient, clinician=clinician, now_ms=now_ms
        ),
    )
    if json_mode:
        click.echo(json.dumps(_link_json(view)))
        return
    click.echo(
        f"ended the care link of {view.link.patient} with {view.link.clinician}; "
        "messages already sent are still delivered"
    )


@admin_group.command(name="links")
@click.argument("username")
@_location_options
@_json_option
@click.pass_context
def links_command(
    ctx: click.Context,
    *,
    username: str,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """List the care links (active and past) of a patient, doctor or nurse."""
    views = _with_admin_database(
        ctx,
        config_path,
        data_dir,
        json_mode,
        lambda database, now_ms: admin.links(database, username=username, now_ms=now_ms),
    )
    if json_mode:
        click.echo(json.dumps({"username": username, "links": [_link_json(v) for v in views]}))
        return
    if not views:
        click.echo(f"{username} has no care links")
    for view in views:
        click.echo(_link_text(view))


# --- admin: holidays ----------------------------------------------------------------------------


@admin_group.group(name="holiday")
def holiday_group() -> None:
    """The clinic's public holidays: days closed for every clinician who keeps hours."""


def _holiday_day(text: str, json_mode: bool) -> datetime.date:
    """DATE, checked before the database is opened (a typo creates nothing)."""
    try:
        return admin.parse_holiday_day(text)
    except admin.AdminError as exc:
        _admin_failed(exc, json_mode)


@holiday_group.command(name="add")
@click.argument("day", metavar="DATE")
@click.argument("name")
@_location_options
@_json_option
@click.pass_context
def holiday_add(
    ctx: click.Context,
    *,
    day: str,
    name: str,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """Make DATE (YYYY-MM-DD) a holiday called NAME (renames one already on that date).

    Every doctor and nurse who keeps hours is closed that whole day, in their own time zone:
    patients' messages wait for the next opening and get the automatic reply. Clinicians who
    set no hours stay always available, and one who declared "available until" stays so until
    then. NAME, e.g. "New Year" (at most 100 characters), is shown to operators only.
    """
    date = _holiday_day(day, json_mode)
    try:
        clean = admin.check_holiday_name(name)
    except admin.AdminError as exc:
        _admin_failed(exc, json_mode)
    renamed = _with_admin_database(
        ctx,
        config_path,
        data_dir,
        json_mode,
        lambda database, now_ms: admin.add_holiday(database, day=date, name=clean, now_ms=now_ms),
    )
    if json_mode:
        click.echo(json.dumps({"day": date.isoformat(), "name": clean, "renamed": renamed}))
        return
    what = "renamed the holiday on" if renamed else "added the holiday"
    click.echo(f"{what} {date.isoformat()}: {clean}; clinicians with hours are closed that day")


@holiday_group.command(name="remove")
@click.argument("day", metavar="DATE")
@_location_options
@_json_option
@click.pass_context
def holiday_remove(
    ctx: click.Context,
    *,
    day: str,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """Make DATE (YYYY-MM-DD) an ordinary day again (exit 1 if it is not a holiday).

    A running server delivers the messages it held because of the holiday at its next check
    of held messages (every availability.release_check_s seconds, 30 by default).
    """
    date = _holiday_day(day, json_mode)
    holiday, check_s = _with_admin_config(
        ctx,
        config_path,
        data_dir,
        json_mode,
        lambda config, database, now_ms: (
            admin.remove_holiday(database, day=date, now_ms=now_ms),
            config.availability.release_check_s,
        ),
    )
    if json_mode:
        click.echo(json.dumps({"day": holiday.day.isoformat(), "name": holiday.name}))
        return
    click.echo(f"removed the holiday on {holiday.day.isoformat()}: {_printable(holiday.name)}")
    click.echo(
        f"a running server delivers messages held because of it within {check_s:g} s "
        "(availability.release_check_s)"
    )


@holiday_group.command(name="list")
@_location_options
@_json_option
@click.pass_context
def holiday_list(
    ctx: click.Context, *, config_path: Path | None, data_dir: Path | None, json_mode: bool
) -> None:
    """List every holiday, past and coming, in date order."""
    found = _with_admin_database(
        ctx, config_path, data_dir, json_mode, lambda database, _now_ms: admin.holidays(database)
    )
    if json_mode:
        click.echo(
            json.dumps({"holidays": [{"day": h.day.isoformat(), "name": h.name} for h in found]})
        )
        return
    if not found:
        click.echo("no holidays")
    for holiday in found:
        click.echo(f"{holiday.day.isoformat()}  {_printable(holiday.name)}")


def _printable(text: str) -> str:
    # What the database holds was checked when written, unless someone edited it since: never
    # let it send terminal escapes to the operator's screen.
    return text if text.isprintable() else ascii(text)


# --- audit ---------------------------------------------------------------------------------------


@cli.group(name="audit")
def audit_group() -> None:
    """The hash-chained audit log of admin, registrar and identity actions."""


def _audit_failed(message: str, json_mode: bool, code: str = "refused") -> NoReturn:
    if json_mode:
        click.echo(json.dumps({"error": {"code": code, "message": message}}), err=True)
        sys.exit(EXIT_FAILED)
    fail(message)


def _utc_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    try:
        return None if value is None else audit.parse_utc(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _anchor_option(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> audit.AuditAnchor | None:
    try:
        return None if value is None else audit.AuditAnchor.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@audit_group.command(name="verify")
@click.option(
    "--anchor",
    default=None,
    metavar="N:HEX",
    callback=_anchor_option,
    help="A head printed by an earlier verify: also check that the log still extends it.",
)
@_location_options
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def audit_verify(
    ctx: click.Context,
    *,
    anchor: audit.AuditAnchor | None,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """Replay the audit chain; exit 1 naming the first edited, deleted or reordered record.

    Note the printed head (N:HEX) somewhere outside this server: only a head kept elsewhere
    (`--anchor`) detects a chain rewritten or cut together with its head.
    """
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir=data_dir))
    try:
        database = admin.open_admin_database(config)
        try:
            report = admin.verify_audit(database, anchor=anchor)
        finally:
            database.close()
    except admin.AdminError as exc:
        _audit_failed(str(exc), json_mode, "failed")
    head = f"{report.count}:{report.head_hash.hex()}"
    problem = report.problem
    if json_mode:
        answer: dict[str, object] = {
            "intact": problem is None,
            "records": report.count,
            "head": report.head_hash.hex(),
        }
        if problem is None:
            answer["anchor"] = head
        else:
            answer["problem"] = {"seq": problem.seq, "reason": problem.reason}
        click.echo(json.dumps(answer))
        sys.exit(0 if problem is None else EXIT_FAILED)
    if problem is not None:
        fail(f"audit log broken at record {problem.seq}: {problem.reason}")
    click.echo(f"audit log intact: {report.count} records, head {report.head_hash.hex()}")
    click.echo(f"note this anchor elsewhere and check it later with --anchor {head}")


@audit_group.command(name="show")
@click.option(
    "--since",
    "since_ms",
    default=None,
    metavar="ISO",
    callback=_utc_option,
    help="From this time (inclusive; UTC unless it has an offset).",
)
@click.option(
    "--until",
    "until_ms",
    default=None,
    metavar="ISO",
    callback=_utc_option,
    help="Before this time (exclusive; UTC unless it has an offset).",
)
@click.option("--actor", default=None, help="Only records by this actor (a username, operator).")
@click.option(
    "--action",
    type=click.Choice([a.value for a in audit.AuditAction]),
    default=None,
    help="Only records of this action.",
)
@click.option("--target", default=None, help='Only records about this target ("user/device").')
@click.option(
    "--limit",
    type=click.IntRange(1, audit.MAX_LIST_LIMIT),
    default=100,
    show_default=True,
    help="At most this many records (the newest).",
)
@_location_options
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def audit_show(
    ctx: click.Context,
    *,
    since_ms: int | None,
    until_ms: int | None,
    actor: str | None,
    action: str | None,
    target: str | None,
    limit: int,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """Print audit records, oldest first (times are UTC ISO-8601). Run `verify` to check them."""
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir=data_dir))
    try:
        database = admin.open_admin_database(config)
        try:
            entries = admin.list_audit(
                database,
                since_ms=since_ms,
                until_ms=until_ms,
                actor=actor,
                action=action,
                target=target,
                limit=limit,
            )
        finally:
            database.close()
    except admin.AdminError as exc:
        _audit_failed(str(exc), json_mode, "failed")
    if json_mode:
        click.echo(json.dumps({"records": [audit.entry_json(entry) for entry in entries]}))
        return
    if not entries:
        click.echo("no audit records match")
    for entry in entries:
        click.echo(audit.entry_text(entry))


# --- the identity log --------------------------------------------------------------------------


@cli.group(name="log")
def log_group() -> None:
    """The identity transparency log: verify it as an auditor would."""


def _open_for_log(
    env: Environment, config_path: Path | None, data_dir: Path | None
) -> tuple[ClinicKeys, Database]:
    config = _load(env, config_path, Overrides(data_dir=data_dir))
    try:
        keys = load_clinic_keys(
            config.keys.dir, clinic_id=config.server.clinic_id, now_ms=int(env.now() * 1000)
        )
        database = admin.open_admin_database(config)
    except (ClinicKeyError, admin.AdminError) as exc:
        fail(str(exc))
    return keys, database


@log_group.command(name="verify")
@_location_options
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def log_verify(
    ctx: click.Context, config_path: Path | None, data_dir: Path | None, json_mode: bool
) -> None:
    """Replay the whole identity log: every event, per-user chain, signature and the tree, and
    check that the database serves exactly the certificates and devices the log shows.

    Exits 0 when everything verifies, 1 with the first problem otherwise.
    """
    env = _environment(ctx)
    keys, database = _open_for_log(env, config_path, data_dir)
    try:
        result = resolved(database.run_interaction("log_verify", verify_log_txn, keys))
    finally:
        database.close()
    audit = result.audit
    summary = {
        "ok": result.problem is None,
        "problem": result.problem,
        "size": None if audit is None else audit.size,
        "root": None if audit is None else audit.root_hash.hex(),
        "users": None if audit is None else audit.users,
        "active_devices": None if audit is None else audit.active_devices,
        "revoked_users": None if audit is None else audit.revoked_users,
    }
    if json_mode:
        click.echo(json.dumps(summary))
        if result.problem is not None:
            sys.exit(EXIT_FAILED)
        return
    if result.problem is not None or audit is None:
        fail(f"identity log NOT verified: {result.problem}")
    click.echo(
        f"identity log verified: {audit.size} events, {audit.users} users, "
        f"{audit.active_devices} active devices, {audit.revoked_users} revoked accounts"
    )
    click.echo(f"root {audit.root_hash.hex()}")


@log_group.command(name="checkpoint")
@_location_options
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def log_checkpoint(
    ctx: click.Context, config_path: Path | None, data_dir: Path | None, json_mode: bool
) -> None:
    """Print the log's current checkpoint, signed by the log key (compare it with what clients
    and auditors hold: two different checkpoints of one size prove a forked log)."""
    env = _environment(ctx)
    keys, database = _open_for_log(env, config_path, data_dir)
    try:
        note = resolved(database.run_interaction("log_checkpoint", signed_checkpoint_txn, keys))
    finally:
        database.close()
    if json_mode:
        click.echo(json.dumps({"checkpoint": note}))
    else:
        click.echo(note, nl=False)


# --- admin: revocation ---------------------------------------------------------------------------


def _revoke(
    ctx: click.Context,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
    revoke: Callable[[Connection, ClinicKeys, int], Revoked],
) -> None:
    env = _environment(ctx)
    keys, database = _open_for_log(env, config_path, data_dir)
    try:
        revoked = resolved(database.run_interaction("revoke", revoke, keys, int(env.now() * 1000)))
    except RevocationError as exc:
        fail(str(exc))
    finally:
        database.close()
    if json_mode:
        click.echo(json.dumps({"username": revoked.username, "devices": list(revoked.device_ids)}))
        return
    devices = ", ".join(revoked.device_ids) or "none enrolled"
    click.echo(f"revoked {revoked.username}: devices {devices}")
    click.echo("live connections close within a second; the revocation is in the identity log")


@admin_group.command(name="revoke-device")
@click.argument("username")
@click.argument("device_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_location_options
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def revoke_device(
    ctx: click.Context,
    *,
    username: str,
    device_id: str,
    yes: bool,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """Revoke one device of USERNAME (a lost phone): it is disconnected within a second, can
    no longer log in, and every client stops encrypting to it. This cannot be undone."""
    if not yes:
        click.confirm(f"Revoke device {device_id} of {username}? This cannot be undone", abort=True)
    _revoke(
        ctx,
        config_path,
        data_dir,
        json_mode,
        lambda conn, keys, now_ms: revoke_device_txn(
            conn, keys=keys, username=username, device_id=device_id, actor=OPERATOR, now_ms=now_ms
        ),
    )


@admin_group.command(name="revoke-user")
@click.argument("username")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_location_options
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def revoke_user(
    ctx: click.Context,
    *,
    username: str,
    yes: bool,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """Revoke the account USERNAME and all its devices (someone leaves the clinic). Messages
    already sent to it are discarded; nobody can write to it any more. This cannot be undone."""
    if not yes:
        click.confirm(f"Revoke the account {username}? This cannot be undone", abort=True)
    _revoke(
        ctx,
        config_path,
        data_dir,
        json_mode,
        lambda conn, keys, now_ms: revoke_account_txn(
            conn, keys=keys, username=username, actor=OPERATOR, now_ms=now_ms
        ),
    )


# --- clinic keys ---------------------------------------------------------------------------------


@cli.group(name="keys")
def keys_group() -> None:
    """The clinic's online keys: rotate them with the root key."""


@keys_group.command(name="rotate")
@click.argument("which", type=click.Choice(["issuing", "log"]))
@_location_options
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def keys_rotate(
    ctx: click.Context,
    which: str,
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """Replace the issuing or the log key with a new one certified by the root key.

    Needs the root key's passphrase ($MEDRELAY_ROOT_PASSPHRASE, keys.root_passphrase_path, or
    a prompt). The old certificate is kept under keys/retired/ so what it signed stays
    verifiable; the new one is appended to the identity log at once, and clients follow it on
    their next log answer. Restart the server to sign with the new key.
    """
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir=data_dir))
    purpose = ClinicKeyPurpose(which)
    now_ms = int(env.now() * 1000)
    passphrase = _passphrase_from_environment(config, env) or read_auto_passphrase(config.keys.dir)
    if passphrase is None:
        passphrase = click.prompt("Passphrase of the clinic root key", hide_input=True, err=True)
    try:
        cert = rotate_clinic_key(
            config.keys.dir, purpose, passphrase=passphrase, now_ms=now_ms, rng=env.rng
        )
        keys = load_clinic_keys(config.keys.dir, clinic_id=config.server.clinic_id, now_ms=now_ms)
        database = admin.open_admin_database(config)
    except (ClinicKeyError, admin.AdminError) as exc:
        fail(str(exc))
    try:
        resolved(database.run_interaction("log_rotation", _log_rotation_txn, keys, which, now_ms))
    finally:
        database.close()
    fingerprint = cert.key.to_text()
    if json_mode:
        click.echo(json.dumps({"rotated": which, "key": fingerprint, "serial": cert.serial}))
        return
    click.echo(f"rotated the {which} key: {fingerprint}")
    click.echo("restart the server to use it; clients follow the rotation on their own")


def _log_rotation_txn(conn: Connection, keys: ClinicKeys, which: str, now_ms: int) -> None:
    log_clinic_certificates_txn(conn, [c.encode() for c in keys.all_certificates()], now_ms)
    append_audit_txn(
        conn,
        actor=OPERATOR,
        action=AuditAction.CLINIC_KEY_ROTATE,
        target="",
        result=AuditResult.OK,
        now_ms=now_ms,
        detail=f"{which} key",
    )


def main() -> None:
    """The `medrelay-server` console script."""
    cli(prog_name="medrelay-server")

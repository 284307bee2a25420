"""`medrelay-server`: the operator's command line, and the process's composition root.

    medrelay-server serve  [--config FILE] [--data-dir DIR] [--port N] [--metrics-port N]
    medrelay-server init   [--config FILE] [--data-dir DIR] [--reseal]
    medrelay-server migrate [--config FILE] [--data-dir DIR]
    medrelay-server admin add-user USERNAME --role ROLE --name NAME [--specialty S]
                                   [--department D] [--config FILE] [--data-dir DIR] [--json]

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
from typing import Any, Final, NoReturn

import click
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred

from medrelay.crypto.certificates import Role
from medrelay.crypto.passwords import PasswordHasher
from medrelay.crypto.rng import Rng, system_rng
from medrelay.crypto.sealing import SealParams
from medrelay.server import admin
from medrelay.server.clinic import (
    AUTO_PASSPHRASE,
    ClinicKeyError,
    clinic_keys_exist,
    create_clinic_keys,
    read_auto_passphrase,
    reseal_root_key,
)
from medrelay.server.config import Config, ConfigError, Overrides, load_config
from medrelay.server.enrollment import CLIENT_ROLES

ROOT_PASSPHRASE_ENV: Final = "MEDRELAY_ROOT_PASSPHRASE"  # noqa: S105 (a variable name)
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2


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
@click.pass_context
def init(ctx: click.Context, config_path: Path | None, data_dir: Path | None, reseal: bool) -> None:
    """Create the clinic keys (root key sealed by a passphrase, issuing key, log key).

    The passphrase comes from $MEDRELAY_ROOT_PASSPHRASE, keys.root_passphrase_path, or a prompt.
    """
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir=data_dir))
    keys_dir = config.keys.dir
    try:
        if reseal:
            _reseal(config, env)
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
    click.echo(f"the root key in {keys_dir} is now sealed under the new passphrase")


# --- migrate ------------------------------------------------------------------------------------


@cli.command()
@_location_options
@click.pass_context
def migrate(ctx: click.Context, config_path: Path | None, data_dir: Path | None) -> None:
    """Bring the database schema to this version (serve also does it at start)."""
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir=data_dir))
    try:
        before, now = admin.migrate(config)
    except admin.AdminError as exc:
        fail(str(exc))
    if before == now:
        click.echo(f"the database is up to date (revision {now})")
    else:
        click.echo(f"migrated the database from revision {before or 'none'} to {now}")


# --- admin --------------------------------------------------------------------------------------


@cli.group(name="admin")
def admin_group() -> None:
    """Accounts and enrollment codes."""


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
    config_path: Path | None,
    data_dir: Path | None,
    json_mode: bool,
) -> None:
    """Create an account and print its one-time enrollment code.

    Hand the code to the person in person; it works once and expires (72 hours by default).
    """
    env = _environment(ctx)
    config = _load(env, config_path, Overrides(data_dir=data_dir))
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
    expires = datetime.datetime.fromtimestamp(account.expires_ms / 1000, tz=datetime.UTC)
    expires_text = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    if json_mode:
        click.echo(
            json.dumps(
                {
                    "username": account.username,
                    "role": account.role.value,
                    "enrollment_code": account.enrollment_code,
                    "expires_at": expires_text,
                }
            )
        )
        return
    click.echo(f"created {account.role.value} account {account.username}")
    click.echo(f"enrollment code: {account.enrollment_code}")
    click.echo(f"valid once, until {expires_text}; hand it to the person in person")


def main() -> None:
    """The `medrelay-server` console script."""
    cli(prog_name="medrelay-server")

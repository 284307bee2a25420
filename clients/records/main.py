"""`medrelay-records`, the records gateway's command.

    medrelay-records run --profile DIR [--config FILE]
    medrelay-records status [--profile DIR] [--config FILE]

`run` unlocks the records account's profile (passphrase from `MEDRELAY_PASSPHRASE`, or a hidden
prompt), drains the outbox, handles every record request received since the last run, and
keeps going until interrupted. `status` prints the outbox's counts by state (no passphrase
needed). Errors are one line on stderr (`medrelay-records: ...`) and exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Final, NoReturn

import click

from medrelay.clients.records.config import ConfigError, GatewayConfig, load_config
from medrelay.clients.records.outbox import Outbox
from medrelay.clients.records.sinks import DirectorySink, FhirSink, Sink

PASSPHRASE_ENV: Final = "MEDRELAY_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
POLL_S: Final = 30.0
"""Besides reacting to each new message, the gateway looks for missed ones this often."""


def fail(message: str) -> NoReturn:
    click.echo(f"medrelay-records: {message}", err=True)
    sys.exit(1)


def _config(path: Path | None) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc))


def make_sink(config: GatewayConfig, reactor: Any) -> Sink:
    if config.sink == "fhir":
        assert config.fhir_base_url is not None  # noqa: S101 (checked by load_config)
        return FhirSink(
            reactor,
            reactor,
            config.fhir_base_url,
            authorization=config.authorization(),
            timeout_s=config.timeout_s,
        )
    return DirectorySink(config.directory)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """The clinic's records gateway: verifies record bundles sent to the `records` account,
    saves each visit as a FHIR R4 transaction Bundle (in a directory or on a FHIR server), and
    posts a receipt into the visit's thread. See docs/records.md."""


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML configuration (sink, [directory] path, [fhir] base_url...).",
)


@cli.command()
@click.option(
    "--profile",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    envvar="MEDRELAY_PROFILE",
    help="The records account's enrolled client profile.",
)
@_config_option
def run(profile: Path, config_path: Path | None) -> None:
    """Run the gateway until interrupted (Ctrl-C)."""
    config = _config(config_path)
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase is None:
        passphrase = click.prompt("Passphrase", hide_input=True, err=True)
    from medrelay.clients.records.runner import run_gateway  # noqa: PLC0415 (reactor import)

    problem = run_gateway(profile, passphrase, config, poll_s=POLL_S, sink_factory=make_sink)
    if problem is not None:
        fail(problem)


@cli.command()
@_config_option
@click.option("--json", "json_mode", is_flag=True, help="Print JSON.")
def status(config_path: Path | None, json_mode: bool) -> None:
    """The outbox's mirrors and receipts by state."""
    config = _config(config_path)
    path = config.outbox_path
    if not path.exists():
        fail(f"no outbox at {path} (the gateway has not run with this configuration)")
    outbox = Outbox(path)
    try:
        counts = outbox.counts()
    finally:
        outbox.close()
    if json_mode:
        click.echo(json.dumps(counts, sort_keys=True))
        return
    mirrors = counts["mirrors"]
    receipts = counts["receipts"]
    click.echo(
        f"mirrors: {mirrors['pending']} pending, {mirrors['delivered']} delivered, "
        f"{mirrors['failed']} failed"
    )
    click.echo(f"receipts: {receipts['pending']} to send, {receipts['sent']} sent")
    click.echo(f"record requests handled: {counts['intake']['handled']}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="medrelay-records")

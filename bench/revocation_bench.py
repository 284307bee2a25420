"""Revocation latency: from the commit of `admin revoke-device` to the revoked device's live
connection being closed by the server.

    .venv/bin/python bench/revocation_bench.py [--runs 7]

Starts `medrelay-server serve` on 127.0.0.1 with a fresh SQLite database, seeds one device per
run, logs each in over the real protocol, runs the real `medrelay-server admin revoke-device`
command, and times from the command's exit (its transaction committed) until the server's
`device_revoked` error arrives. The server notices revocations by polling the identity log's
head every 0.25 s, so the expected figure is under that plus a round trip; the issue's bound is
one second. Prints the median and the worst of `--runs`. Everything is on 127.0.0.1, every wait
is bounded, and only the server this script started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadclient import Device, seed, username
from relay_bench import start_medrelay

from medrelay.protocol.messages import Error
from medrelay.server.admin import open_admin_database, resolved
from medrelay.server.audit import OPERATOR
from medrelay.server.clinic import load_clinic_keys
from medrelay.server.config import load_config
from medrelay.server.revocation import revoke_device_txn

CLINIC = "bench.clinic"


async def one_run(port: int, data_dir: Path, index: int) -> float:
    device = await Device.login(index, port, CLINIC)
    config = load_config(
        environ={"MEDRELAY_STORAGE_DATA_DIR": str(data_dir), "MEDRELAY_SERVER_CLINIC_ID": CLINIC},
        cwd=data_dir,
    )
    keys = load_clinic_keys(config.keys.dir, clinic_id=CLINIC, now_ms=int(time.time() * 1000))
    database = open_admin_database(config)
    try:
        # What `admin revoke-device` runs; the clock starts when its transaction has committed.
        resolved(
            database.run_interaction(
                "revoke",
                lambda conn: revoke_device_txn(
                    conn,
                    keys=keys,
                    username=username(index),
                    device_id="d",
                    actor=OPERATOR,
                    now_ms=int(time.time() * 1000),
                ),
            )
        )
        committed = time.monotonic()
    finally:
        database.close()
    try:
        while True:
            for message in await asyncio.wait_for(device.messages(), 10):
                if isinstance(message, Error) and message.code == "device_revoked":
                    return time.monotonic() - committed
    finally:
        device.ws.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medrelay-revocation-") as tmp:
        data_dir = Path(tmp)
        seed(f"sqlite:///{data_dir / 'medrelay.db'}", args.runs)
        server = start_medrelay(data_dir, CLINIC)
        try:
            latencies = [
                asyncio.run(one_run(server.port, data_dir, index)) for index in range(args.runs)
            ]
        finally:
            server.stop()
    ms = sorted(latency * 1000 for latency in latencies)
    print(
        f"revocation to disconnect over {args.runs} runs: median {statistics.median(ms):.0f} ms, "
        f"worst {ms[-1]:.0f} ms (bound: 1000 ms; poll interval 250 ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real FHIR R4 server on 127.0.0.1 for the records gateway tests: Medplum's FHIR router with
its in-memory repository behind tests/support/fhir_server/server.mjs.

`FhirServer.start()` installs the pinned npm packages into a gitignored cache
(`<repo>/.cache/fhir-server/`, reinstalled only when package.json, the lock file or server.mjs
change; a file lock keeps parallel test workers from installing twice), starts
`node --experimental-websocket server.mjs` on a free port, and waits until it answers;
`stop()` ends that process by its PID. Without node/npm, or when the npm registry cannot be
reached, `unavailable()` gives the reason and the tests skip.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "fhir_server"
REPO = SOURCE.parents[2]
CACHE = REPO / ".cache" / "fhir-server"
FILES = ("package.json", "package-lock.json", "server.mjs")
READY_TIMEOUT_S = 30.0
INSTALL_TIMEOUT_S = 300.0


class Unavailable(Exception):
    """The FHIR test server cannot run here; the message says why."""


def _stamp() -> str:
    digest = hashlib.sha256()
    for name in FILES:
        digest.update((SOURCE / name).read_bytes())
    return digest.hexdigest()


def install() -> Path:
    """The cache directory with node_modules installed (once per change of the sources)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise Unavailable("node and npm are not installed")
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE.parent / "fhir-server.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp_file = CACHE / ".stamp"
        stamp = _stamp()
        if stamp_file.exists() and stamp_file.read_text() == stamp:
            return CACHE
        for name in FILES:
            shutil.copyfile(SOURCE / name, CACHE / name)
        command = ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"]
        try:
            done = subprocess.run(
                command,
                cwd=CACHE,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Unavailable("npm ci timed out (is the npm registry reachable?)") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"npm ci failed (is the npm registry reachable?): {last}")
        stamp_file.write_text(stamp)
    return CACHE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FhirServer:
    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> FhirServer:
        directory = install()
        self.port = port or free_port()
        self.process = subprocess.Popen(
            ["node", "--experimental-websocket", "server.mjs"],
            cwd=directory,
            env={**os.environ, "PORT": str(self.port)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise Unavailable(f"the FHIR test server exited: {error.strip()[-300:]}")
            try:
                self.get("Encounter")
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
                continue
            return self
        self.stop()
        raise Unavailable("the FHIR test server did not answer in time")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.base_url}/{path}", timeout=5) as answer:
            return json.loads(answer.read())

    def count(self, resource_type: str, identifier: str | None = None) -> int:
        """How many resources of a type (with that `system|value` identifier) the server holds."""
        query = "" if identifier is None else "?identifier=" + urllib.parse.quote(identifier)
        bundle = self.get(resource_type + query)
        return len(bundle.get("entry", []))

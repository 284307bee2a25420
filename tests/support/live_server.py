"""The real medrelay server and the real `medrelay` CLI, as processes on 127.0.0.1, for
integration tests. Only processes started here are ever stopped, by their PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadclient import free_port

SERVER_MAIN = "from medrelay.server.main import main; main()"
CLIENT_MAIN = "from medrelay.clients.cli.main import main; main()"
PASSPHRASE = "integration test passphrase"
START_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 120.0


@dataclass
class LiveServer:
    """`medrelay-server serve` on a data directory; can be killed and started again on it."""

    data_dir: Path
    database_url: str | None = None
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDRELAY_")}
        env["MEDRELAY_SERVER_CLINIC_ID"] = "clinic.test"
        if self.database_url:
            env["MEDRELAY_STORAGE_DATABASE_URL"] = self.database_url
        return env

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A `medrelay-server` command on this server's data (e.g. admin add-user)."""
        return subprocess.run(
            [sys.executable, "-c", SERVER_MAIN, *args, "--data-dir", str(self.data_dir)],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )

    def add_user(self, username: str, role: str = "doctor", *extra: str) -> str:
        """`extra`: more add-user options, e.g. "--department", "cardiology"."""
        done = self.command(
            "admin",
            "add-user",
            username,
            "--role",
            role,
            "--name",
            f"Name {username}",
            "--json",
            *extra,
        )
        assert done.returncode == 0, done.stderr
        code: str = json.loads(done.stdout)["enrollment_code"]
        return code

    def link(self, patient: str, clinician: str, visit_date: str = "2025-01-10") -> None:
        """A care link, so that the patient and the clinician may write to each other."""
        done = self.command("admin", "link", patient, clinician, "--visit-date", visit_date)
        assert done.returncode == 0, done.stderr

    def _serve_flags(self) -> list[str]:
        return [
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
        ]

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER_MAIN, "serve", *self._serve_flags()],
            env=self.env(),
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError("server did not answer /healthz in time")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.process = None


@dataclass
class Person:
    """A CLI profile enrolled with a live server."""

    name: str
    profile: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDRELAY_")}
        env["MEDRELAY_PASSPHRASE"] = PASSPHRASE
        done = subprocess.run(
            [sys.executable, "-c", CLIENT_MAIN, *args, "--profile", str(self.profile)],
            env=env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"medrelay {' '.join(args)} failed: {done.stderr}")
        return done

    def send(self, to: str, text: str, *extra: str) -> None:
        self.run("send", to, text, *extra)

    def inbox(self) -> list[dict[str, Any]]:
        return [i for i in self.inbox_all() if i.get("type") == "message"]

    def inbox_all(self) -> list[dict[str, Any]]:
        """Messages and notices."""
        items: list[dict[str, Any]] = json.loads(self.run("inbox", "--json").stdout)
        return items

    def json(self, *args: str) -> Any:
        """Run a command with --json and parse what it printed."""
        return json.loads(self.run(*args, "--json").stdout)


def enroll(
    server: LiveServer, directory: Path, name: str, role: str = "doctor", *extra: str
) -> Person:
    code = server.add_user(name, role, *extra)
    person = Person(name, directory / f"profile-{name}")
    person.run("enroll", server.url, name, code)
    return person

"""The enrollment slip: what the front desk prints and hands over in person with a new account's
one-time code (the code is shown once and stored only as a hash, so this is its one copy).

Plain text, so any printer prints it; Russian and English, short. It carries no health data.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from medrelay.server.config import ServerSection


@dataclass(frozen=True, slots=True)
class Slip:
    username: str
    role: str
    code: str
    expires_ms: int
    server_url: str


def server_url(section: ServerSection) -> str:
    """The address clients enroll with: the configured public URL, or the listening address."""
    if section.public_url is not None:
        return section.public_url.rstrip("/")
    host = f"[{section.host}]" if ":" in section.host else section.host
    return f"{'https' if section.tls else 'http'}://{host}:{section.port}"


def _utc(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def render(slip: Slip) -> str:
    expires = _utc(slip.expires_ms)
    command = f"medrelay enroll {slip.server_url} {slip.username} {slip.code}"
    return "\n".join(
        [
            "medrelay - enrollment / регистрация",
            "=" * 40,
            f"Account / учётная запись:  {slip.username} ({slip.role})",
            f"Server / сервер:           {slip.server_url}",
            f"One-time code / код:       {slip.code}",
            f"Valid until / действует до: {expires}",
            "",
            "Enroll your device with / зарегистрируйте устройство командой:",
            f"    {command}",
            "",
            "The code works once. Keep this slip private until you have enrolled, then",
            "destroy it. Nobody from the clinic will ever ask you for this code.",
            "Код действует один раз. Не показывайте его никому до регистрации, затем",
            "уничтожьте этот листок. Сотрудники клиники никогда не спросят у вас этот код.",
            "",
        ]
    )


def write_slip(path: Path, slip: Slip) -> None:
    """Write the slip readable by its owner only (it holds a live code); never overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(render(slip))

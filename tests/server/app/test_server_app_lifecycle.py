"""Small pieces of the composition root, without a reactor: children stop in order and one at a
time (the relay drains before the database closes), the log observer writes filtered JSON (or
text) lines, and the WebSocket URL autobahn is given."""

from __future__ import annotations

import io
import json
from pathlib import Path

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from medrelay.server.app import SequentialMultiService, websocket_url
from medrelay.server.config import LogFormat, LoggingSection, LogLevelName, load_config
from medrelay.server.logs import make_log_observer


class Recorder(Service):
    def __init__(self, name: str, log: list[str], stopping: Deferred[None] | None = None):
        self._label = name
        self._log = log
        self._stopping = stopping

    def stopService(self) -> Deferred[None] | None:  # noqa: N802 (IService)
        super().stopService()  # type: ignore[no-untyped-call]
        self._log.append(self._label)
        return self._stopping


def test_children_stop_last_first_each_waiting_for_the_previous() -> None:
    """The relay's drain (an unfired Deferred) holds back the database's close until it fires;
    a child that fails to stop does not keep the rest running."""
    order: list[str] = []
    drained: Deferred[None] = Deferred()
    parent = SequentialMultiService()
    for child in (
        Recorder("database", order),
        Recorder("relay", order, drained),
        Recorder("broken", order, Deferred.fromCoroutine(_fail())),
        Recorder("web", order),
    ):
        child.setServiceParent(parent)  # type: ignore[no-untyped-call]
    parent.startService()
    stopped = parent.stopService()
    assert order == ["web", "broken", "relay"]
    assert not stopped.called
    drained.callback(None)
    assert order == ["web", "broken", "relay", "database"]
    assert stopped.called


async def _fail() -> None:
    raise RuntimeError("cannot stop")


def test_json_log_lines_are_filtered_by_level() -> None:
    stream = io.StringIO()
    observer = make_log_observer(LoggingSection(LogLevelName.INFO, LogFormat.JSON), stream)
    log = Logger(observer=observer)
    log.debug("hidden {request_id}", request_id="r1")
    log.info("http {request_id} done", request_id="r2")
    log.warn("careful")
    events = [json.loads(line) for line in stream.getvalue().split("\x1e") if line.strip()]
    assert [e["log_format"] for e in events] == ["http {request_id} done", "careful"]
    assert events[0]["request_id"] == "r2"


def test_text_log_format() -> None:
    stream = io.StringIO()
    observer = make_log_observer(LoggingSection(LogLevelName.WARN, LogFormat.TEXT), stream)
    log = Logger(observer=observer, namespace="medrelay.test")
    log.info("quiet")
    log.error("loud {what}", what="thing")
    text = stream.getvalue()
    assert "quiet" not in text
    assert "[medrelay.test#error] loud thing" in text


def test_websocket_url(tmp_path: Path) -> None:
    plain = load_config(environ={}, cwd=tmp_path).server
    assert websocket_url(plain) == "ws://127.0.0.1:8448/v1/ws"
    ephemeral = load_config(environ={"MEDRELAY_SERVER_PORT": "0"}, cwd=tmp_path).server
    assert websocket_url(ephemeral) == "ws://127.0.0.1/v1/ws"
    v6 = load_config(environ={"MEDRELAY_SERVER_HOST": "::1"}, cwd=tmp_path).server
    assert websocket_url(v6) == "ws://[::1]:8448/v1/ws"
    public = load_config(
        environ={"MEDRELAY_SERVER_PUBLIC_URL": "https://relay.example:8443"}, cwd=tmp_path
    ).server
    assert websocket_url(public) == "wss://relay.example:8443/v1/ws"

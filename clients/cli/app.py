"""The CLI's composition root: the only place that touches the real reactor, the real clock and
the system random source, and runs the reactor for one command.

Commands talk to an `App` (and the `EngineApi` it opens), never to Twisted directly, so the tests
drive every command through click's `CliRunner` with a fake app and a fake engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred

from medrelay.clients.engine.availability import AvailabilityView, ScheduleChange, ShiftView
from medrelay.clients.engine.client import open_engine
from medrelay.clients.engine.enrollment import enroll
from medrelay.clients.engine.http import AgentHttpClient
from medrelay.clients.engine.linking import LinkResult, LinkUi, join_link
from medrelay.clients.engine.staff import CareLinkView, NewAccountView, PersonView
from medrelay.clients.engine.store import ProfileInfo, ThreadRunner, read_public_info
from medrelay.clients.engine.views import (
    DeviceView,
    Event,
    MessageView,
    NoticeView,
    OutgoingFile,
    RecordSent,
    SavedAttachment,
    SentMessage,
    VisitsView,
    VisitView,
    Whoami,
)
from medrelay.crypto.rng import system_rng

_T = TypeVar("_T")


class Interrupted(Exception):
    """The reactor stopped before the command finished (Ctrl-C)."""


class EngineApi(Protocol):
    """What the commands use of `medrelay.clients.engine.client.Engine`."""

    def whoami(self) -> Whoami: ...

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]: ...

    def start(self) -> None: ...

    def connect(self) -> Deferred[None]: ...

    def sync(self, settle_s: float = ...) -> Deferred[None]: ...

    def send_message(
        self,
        to_user: str,
        text: str,
        files: Sequence[OutgoingFile] = (),
        *,
        urgent: bool = False,
    ) -> Deferred[SentMessage]: ...

    def unread(self, *, mark_read: bool = True) -> Deferred[list[MessageView | NoticeView]]: ...

    def clinic_notices(self, message_id: bytes) -> Deferred[list[NoticeView]]: ...

    def devices(self) -> Deferred[list[DeviceView]]: ...

    def safety_number(self, user_id: str) -> Deferred[str]: ...

    def search_directory(
        self, query: str, *, specialty: str | None = None, department: str | None = None
    ) -> Deferred[list[PersonView]]: ...

    def create_account(
        self,
        username: str,
        role: str,
        name: str,
        *,
        specialty: str | None = None,
        department: str | None = None,
    ) -> Deferred[NewAccountView]: ...

    def create_care_link(
        self, patient: str, clinician: str, visit_date: str, until: str | None = None
    ) -> Deferred[CareLinkView]: ...

    def end_care_link(self, patient: str, clinician: str) -> Deferred[CareLinkView]: ...

    def link_device(self, ui: LinkUi) -> Deferred[LinkResult]: ...

    def attachments(self, message_id: bytes) -> Deferred[list[SavedAttachment]]: ...

    def availability(self, user_id: str) -> Deferred[AvailabilityView]: ...

    def set_schedule(self, user_id: str, change: ScheduleChange) -> Deferred[AvailabilityView]: ...

    def roster_add(
        self, clinician: str, department: str, starts_ms: int, ends_ms: int
    ) -> Deferred[list[ShiftView]]: ...

    def roster_remove(self, shift_id: int) -> Deferred[list[ShiftView]]: ...

    def roster(self, after_ms: int | None = None) -> Deferred[list[ShiftView]]: ...

    def visits(
        self, *, visit: str | None = None, open_only: bool = False
    ) -> Deferred[VisitsView]: ...

    def open_visit(self, patient: str, indication: str) -> Deferred[VisitView]: ...

    def close_visit(
        self, visit: str, conclusion_text: str, files: Sequence[OutgoingFile] = ()
    ) -> Deferred[VisitView]: ...

    def consent_to_visit(self, visit: str) -> Deferred[SentMessage]: ...

    def save_record(
        self,
        *,
        visit: str | None = None,
        with_user: str | None = None,
        from_ms: int | None = None,
        to_ms: int | None = None,
        records_user: str = ...,
    ) -> Deferred[RecordSent]: ...

    def now_ms(self) -> int: ...

    def close(self) -> Deferred[None]: ...


class App(Protocol):
    def run(self, main: Callable[[], Deferred[_T]]) -> _T:
        """Run `main` to completion (the reactor, in the real app); raise what it raised, or
        `Interrupted`."""
        ...

    def open_engine(self, profile_dir: Path, passphrase: str) -> Deferred[EngineApi]: ...

    def read_info(self, profile_dir: Path) -> Deferred[ProfileInfo]: ...

    def enroll(
        self, profile_dir: Path, passphrase: str, server_url: str, username: str, code: str
    ) -> Deferred[ProfileInfo]: ...

    def link(
        self, profile_dir: Path, passphrase: str, server_url: str, code: str, ui: LinkUi
    ) -> Deferred[ProfileInfo]:
        """Make a new profile a device of the account whose device shows `code`."""
        ...

    def timeout(self, d: Deferred[_T], seconds: float) -> Deferred[_T]:
        """`d`, cancelled if it has not fired after `seconds`."""
        ...


class RealApp:
    """The production app: the global reactor (imported only when a command runs)."""

    def __init__(self) -> None:
        from twisted.internet import reactor  # noqa: PLC0415 (composition root, at run time)

        self._reactor: Any = reactor
        self._runner: ThreadRunner | None = None

    def _thread_runner(self) -> ThreadRunner:
        if self._runner is None:
            self._runner = ThreadRunner(self._reactor)
            self._reactor.addSystemEventTrigger("after", "shutdown", self._runner.stop)
        return self._runner

    def timeout(self, d: Deferred[_T], seconds: float) -> Deferred[_T]:
        return d.addTimeout(seconds, self._reactor)

    def run(self, main: Callable[[], Deferred[_T]]) -> _T:
        reactor = self._reactor
        outcome: list[object] = []

        def start() -> None:
            d = maybeDeferred(main)

            def finished(result: object) -> None:
                outcome.append(result)
                if reactor.running:
                    reactor.stop()

            d.addBoth(finished)

        reactor.callWhenRunning(start)
        reactor.run()
        if not outcome:
            raise Interrupted()
        result = outcome[0]
        from twisted.python.failure import Failure  # noqa: PLC0415

        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[return-value]

    def open_engine(self, profile_dir: Path, passphrase: str) -> Deferred[EngineApi]:
        reactor = self._reactor

        def opened(engine: Any) -> EngineApi:
            # On Ctrl-C the reactor stops: close the profile and the connection first.
            reactor.addSystemEventTrigger("before", "shutdown", engine.close)
            return engine  # type: ignore[no-any-return]

        d = open_engine(
            profile_dir,
            passphrase,
            reactor=reactor,
            clock=reactor,
            rng=system_rng,
            runner=self._thread_runner(),
        )
        return d.addCallback(opened)

    def read_info(self, profile_dir: Path) -> Deferred[ProfileInfo]:
        return read_public_info(profile_dir, runner=self._thread_runner())

    def enroll(
        self, profile_dir: Path, passphrase: str, server_url: str, username: str, code: str
    ) -> Deferred[ProfileInfo]:
        reactor = self._reactor
        return enroll(
            profile_dir=profile_dir,
            passphrase=passphrase,
            server_url=server_url,
            username=username,
            code=code,
            http=AgentHttpClient(reactor, reactor),
            clock=reactor,
            rng=system_rng,
            runner=self._thread_runner(),
        )

    def link(
        self, profile_dir: Path, passphrase: str, server_url: str, code: str, ui: LinkUi
    ) -> Deferred[ProfileInfo]:
        reactor = self._reactor
        return join_link(
            profile_dir=profile_dir,
            passphrase=passphrase,
            server_url=server_url,
            code=code,
            http=AgentHttpClient(reactor, reactor),
            clock=reactor,
            rng=system_rng,
            runner=self._thread_runner(),
            ui=ui,
        )

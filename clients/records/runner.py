"""The gateway's composition root: the real reactor, the engine, the outbox and the sink."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.python.failure import Failure

from medrelay.clients.engine.client import open_engine
from medrelay.clients.engine.errors import ClientError
from medrelay.clients.records.config import GatewayConfig
from medrelay.clients.records.engine_adapter import EngineAdapter
from medrelay.clients.records.gateway import RecordsGateway
from medrelay.clients.records.outbox import Outbox
from medrelay.clients.records.sinks import Sink
from medrelay.crypto.rng import system_rng

_log = Logger()


def run_gateway(
    profile: Path,
    passphrase: str,
    config: GatewayConfig,
    *,
    poll_s: float,
    sink_factory: Callable[[GatewayConfig, Any], Sink],
) -> str | None:
    """Run until the reactor stops; returns a one-line problem, or None after a clean stop."""
    import sys  # noqa: PLC0415

    from twisted.internet import reactor as _reactor  # noqa: PLC0415 (composition root)

    reactor: Any = _reactor
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stderr)], redirectStandardIO=False)
    problems: list[str] = []
    jitter = random.SystemRandom().random

    async def main() -> None:
        engine = await open_engine(
            profile, passphrase, reactor=reactor, clock=reactor, rng=system_rng
        )
        reactor.addSystemEventTrigger("before", "shutdown", engine.close)
        adapter = EngineAdapter(engine)
        outbox = Outbox(config.outbox_path)
        gateway = RecordsGateway(
            adapter, outbox, sink_factory(config, reactor), clock=reactor, jitter=jitter
        )

        def shutdown() -> None:
            gateway.stop()
            outbox.close()

        reactor.addSystemEventTrigger("before", "shutdown", shutdown)

        def on_event(_event: object) -> None:
            gateway.poll()

        engine.subscribe(on_event)
        engine.start()
        _log.info("records gateway started (sink: {sink})", sink=config.sink)
        await gateway.start()
        LoopingCall(gateway.poll).start(poll_s, now=False)

    def failed(failure: Failure) -> None:
        error = failure.value
        if isinstance(error, (ClientError, OSError)):
            problems.append(str(getattr(error, "message", None) or error))
        else:
            problems.append(f"internal error ({type(error).__name__})")
            _log.failure("the records gateway failed to start", failure)
        if reactor.running:
            reactor.stop()

    def start() -> None:
        Deferred.fromCoroutine(main()).addErrback(failed)

    reactor.callWhenRunning(start)
    reactor.run()
    return problems[0] if problems else None

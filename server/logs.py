"""The server's log output: twisted.logger events as JSON lines (or text) on a stream, filtered
by level.

JSON is the default because the process runs under systemd or a container runtime that collects
stdout; each line is one event (`jsonFileLogObserver`: record separator, then JSON). What goes
into events is decided where they are emitted: connection ids (`c12`) and request ids (`r34`),
never a username, a name, a token, a key or content.
"""

from __future__ import annotations

from typing import IO, Final

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)

from medrelay.server.config import LogFormat, LoggingSection, LogLevelName

LEVELS: Final = {
    LogLevelName.DEBUG: LogLevel.debug,
    LogLevelName.INFO: LogLevel.info,
    LogLevelName.WARN: LogLevel.warn,
    LogLevelName.ERROR: LogLevel.error,
    LogLevelName.CRITICAL: LogLevel.critical,
}


def make_log_observer(section: LoggingSection, stream: IO[str]) -> ILogObserver:
    """An observer writing events at `section.level` or above to `stream`."""
    if section.format is LogFormat.JSON:
        observer = jsonFileLogObserver(stream)
    else:
        observer = textFileLogObserver(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[section.level])
    return FilteringLogObserver(observer, [predicate])


def start_logging(section: LoggingSection, stream: IO[str]) -> None:
    """Send the process's log events to `stream` (the composition root calls this once)."""
    globalLogBeginner.beginLoggingTo([make_log_observer(section, stream)], redirectStandardIO=False)

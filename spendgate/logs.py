"""structlog set-up shared by every spendgate process.

Production (``log_json: true``, the default) writes one JSON object per line;
``spendgate up`` / ``make run`` sets ``SPENDGATE_LOG_JSON=false`` for its
children, which then write readable console lines. Libraries that log through
the standard ``logging`` module (asyncio, grpc, alembic, httpx) come out in the
same format, so a JSON log stays JSON line by line.

Every string value is made safe on the way out (``bounded``): control
characters escaped visibly (``\x1b``), so a client-chosen model name cannot
forge a log line or drive a terminal, and values clipped at
MAX_LOG_VALUE_CHARS with a marker, so a 5 MB value costs a line, not 5 MB.

What is never logged: API keys, bearer tokens, webhook secrets and routing
keys, Authorization headers, webhook URLs (Slack's carry a token).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from spendgate.domain.limits import MAX_LOG_VALUE_CHARS
from spendgate.visible import visible

# The standard library's loggers stay at WARNING whatever log_level says:
# httpx logs every request's URL at INFO, and a webhook URL may carry a token.
STDLIB_LEVEL = logging.WARNING


def bounded(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """structlog processor: string values escaped and clipped (a traceback,
    ``exception``, keeps its lines and its length)."""
    for key, value in event.items():
        if isinstance(value, str) and key != "exception":
            event[key] = visible(value, MAX_LOG_VALUE_CHARS)
    return event


def configure(*, json: bool, level: str = "info", stream: TextIO | None = None) -> None:
    """JSON lines for machines (production) or readable console lines.

    Logs go to ``stream``, by default stderr; stdout stays free for command
    output (and, under ``spendgate up``, Envoy's access log).
    """
    out = stream or sys.stderr
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, bounded, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per line, newline included: print() writes the newline
        # apart, and stderr writes through, so the lines of processes sharing
        # it (ext_proc --workers) interleaved mid-line.
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                bounded,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(STDLIB_LEVEL)

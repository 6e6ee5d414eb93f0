"""Logs of the server commands: a short console for people, everything in files under data_dir/logs.

Every line is redacted (core.redaction) as it is formatted: URL query strings and user info,
API-key secrets and `password=`-style values never reach a log file or the console.

Ray, gRPC's C core, torch and friends write INFO chatter straight to file descriptors 1 and 2,
not through `logging`; only moving those keeps it off the console. So, unless `verbose`, both
point at `output.log` and the console writes to a copy of the original stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from core.redaction import redact_text

# Ray's log record factory adds `_ray_timestamp_ns` to every record.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "_ray_timestamp_ns",
}

# Loggers whose INFO lines a person running the service wants to see; the libraries' show ERROR and up.
OWN_LOGGERS = frozenset({"loraserve", "gateway", "serving", "storage", "__main__"})

# What core/tracing.py adds to records made inside a span: for the JSON log (finding a line from a trace),
# too long for a person's console.
TRACE_FIELDS = frozenset({"trace_id", "span_id"})

LOG_FILE = "loraserve.log"
OUTPUT_FILE = "output.log"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # Each value before encoding: cutting inside the JSON text could cut an escape in half.
        entry = {k: redact_text(v) if isinstance(v, str) else v for k, v in entry.items()}
        return json.dumps(entry, default=lambda value: redact_text(str(value)))


class ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS [LEVEL] message key=value`; a traceback only when asked (it is in the log file anyway)."""

    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__()
        self._tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        parts = [time.strftime("%H:%M:%S", time.localtime(record.created))]
        if record.levelno >= logging.WARNING:
            parts.append(record.levelname)
        parts.append(record.getMessage())
        parts.extend(f"{k}={v}" for k, v in _extras(record).items() if k not in TRACE_FIELDS)
        line = " ".join(parts)
        if record.exc_info and record.exc_info[1] is not None:
            if self._tracebacks:
                line += "\n" + self.formatException(record.exc_info)
            else:
                line += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        return redact_text(line)


def redact_log_records() -> None:
    """Redacts each record's message as it is made, in this process, whatever handler later writes it.

    For processes whose handlers are not ours (Ray Serve replicas log through Serve's own);
    wraps the current record factory (Ray's adds a timestamp), once.
    """
    current = logging.getLogRecordFactory()
    if getattr(current, "redacts", False):
        return

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        message = record.getMessage()
        shown = redact_text(message)
        if shown != message:
            record.msg, record.args = shown, None
        return record

    make.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make)


class _OwnOrError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".", 1)[0] in OWN_LOGGERS


@dataclass(frozen=True)
class LogSetup:
    log_file: Path
    # Where fd 2 now goes; None when verbose (it stays on the console).
    output_file: Path | None
    console: TextIO


def setup_logging(data_dir: Path, level: str = "INFO", *, verbose: bool = False) -> LogSetup:
    """Console: this service's INFO lines and everyone's errors (everything when `verbose`);
    data_dir/logs/loraserve.log: every log record as JSON; data_dir/logs/output.log: whatever else was
    written to stderr."""
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    output_file: Path | None = None
    if verbose:
        console: TextIO = sys.stderr
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        console = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        output_file = log_dir / OUTPUT_FILE
        fd = os.open(output_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    to_file = logging.FileHandler(log_dir / LOG_FILE, encoding="utf-8")
    to_file.setFormatter(JsonFormatter())
    to_console = logging.StreamHandler(console)
    to_console.setFormatter(ConsoleFormatter(tracebacks=verbose))
    if not verbose:
        to_console.addFilter(_OwnOrError())
    redact_log_records()
    root = logging.getLogger()
    root.handlers[:] = [to_file, to_console]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    return LogSetup(log_file=log_dir / LOG_FILE, output_file=output_file, console=console)


class RequestLines:
    """Log lines that follow each request through a gateway: started, each quarter of its steps, the end.

    A line per step would bury everything else; the worker's progress events may skip steps, so the
    quarter reached is kept per running request (`forget` when its run ends).
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._quarters: dict[str, int] = {}

    def started(self, request_id: str, attempt: int) -> None:
        self._quarters[request_id] = 0
        self._log.info("request started", extra={"request_id": request_id, "attempt": attempt})

    def progress(self, request_id: str, step: int, total: int) -> None:
        quarter = step * 4 // total if total > 0 else 0
        if quarter > self._quarters.get(request_id, 0):
            self._quarters[request_id] = quarter
            self._log.info("request progress", extra={"request_id": request_id, "step": f"{step}/{total}"})

    def completed(self, request_id: str, inference_seconds: float) -> None:
        self._log.info("request completed", extra={"request_id": request_id, "seconds": round(inference_seconds, 2)})

    def failed(self, request_id: str, error: str) -> None:
        self._log.warning("request failed", extra={"request_id": request_id, "error": error})

    def back_in_queue(self, request_id: str, why: str) -> None:
        self._log.info("request back in the queue", extra={"request_id": request_id, "why": why})

    def forget(self, request_id: str) -> None:
        self._quarters.pop(request_id, None)

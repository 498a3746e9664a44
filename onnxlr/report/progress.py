"""Progress of long work: a bar with rate and ETA on a terminal, a log line every few seconds
otherwise (so a job run under nohup or CI still says where it is)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("onnxlr")

#: Seconds between log lines when stderr is not a terminal.
LOG_EVERY_S = 10.0
#: Work shorter than this shows no progress at all.
QUIET_FOR_S = 2.0


class Progress:
    """``update(done, what)`` as work advances, ``close()`` at the end; silent for work that
    ends within :data:`QUIET_FOR_S`."""

    def __init__(self, label: str, total: int | None, unit: str = "", tty: bool | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.started = self.last = time.perf_counter()
        self.shown = False
        self.done = 0

    def line(self, done: int, what: str = "") -> str:
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        count = f"{done}/{self.total}" if self.total else f"{done}"
        eta = ""
        if self.total and rate > 0 and done < self.total:
            eta = f", ETA {(self.total - done) / rate:.0f} s"
        tail = f" {what}" if what else ""
        return f"onnxlr: {self.label}: {count}{unit} ({rate:.2f}{unit}/s, {elapsed:.0f} s{eta}){tail}"

    def update(self, done: int, what: str = "") -> None:
        self.done = done
        now = time.perf_counter()
        if now - self.started < QUIET_FOR_S and (self.total is None or done < self.total):
            return
        if self.tty:
            if now - self.last >= 0.2 or done == self.total:
                sys.stderr.write("\r\033[K" + self.line(done, what))
                sys.stderr.flush()
                self.shown, self.last = True, now
        elif now - self.last >= LOG_EVERY_S:
            log.warning(self.line(done, what).removeprefix("onnxlr: "))
            self.last = now

    def close(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()

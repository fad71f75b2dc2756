"""What ``ctrl run`` shows while kfp.local runs the pipeline: one progress bar per step, nothing else.

kfp.local prints each task's stdout line by line as the task runs, with its own log records (task started, the
executor's outputs) and warnings around them. Under :class:`RunConsole` every such line goes to the run's log
file; the steps' progress events (ctrl_core/progress.py) are drawn as bars, and a line per finished task says how
long it took. ``--verbose`` prints kfp.local's stream unchanged instead. When a task fails, the end of its log is
printed with the log file's path.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import TextIO

from ctrl_core.progress import Renderer, parse

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
#: lines of a failed task's log printed with the error
TAIL_LINES = 40


class _Lines(io.TextIOBase):
    """A text stream that hands each complete line to ``on_line``."""

    def __init__(self, on_line):
        self.on_line, self.pending = on_line, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.on_line(line)
        return len(text)

    def flush(self) -> None:  # lines are handed on as they complete
        pass


class RunConsole:
    """``with RunConsole(log_path, verbose): pipeline(...)``; ``out`` is where the bars are drawn (default: the
    terminal's stdout at entry)."""

    def __init__(self, log_path: str | Path, verbose: bool = False, out: TextIO | None = None):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.out = out
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.started: dict[str, float] = {}

    def __enter__(self) -> RunConsole:
        self.out = self.out or sys.stdout
        self.renderer = Renderer(self.out)
        self.log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self.stack = contextlib.ExitStack()
        if not self.verbose:
            self.stack.enter_context(contextlib.redirect_stdout(_Lines(self._line)))
            self.stack.enter_context(contextlib.redirect_stderr(_Lines(self._line)))
            caught = self.stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            self.caught = caught
        return self

    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip()
        self.log.write(line + "\n")
        self.log.flush()
        ev = parse(line)
        if ev is not None:
            self.renderer.update(ev)
            return
        if m := _STARTED.search(line):
            self.started[m.group(1)] = time.monotonic()
            self.tail.clear()
            return
        if m := _FINISHED.search(line):
            name, status = m.group(1), m.group(2)
            secs = time.monotonic() - self.started.get(name, time.monotonic())
            mark = "ok" if status == "SUCCESS" else status
            self.renderer.note(f"{name.replace('-', '_'):<34} {mark:<6} {secs:6.1f}s")
            return
        if line.strip():
            self.tail.append(line)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.verbose:
            for w in self.caught:
                self.log.write(f"warning: {w.category.__name__}: {w.message}\n")
        self.stack.close()
        self.renderer.close()
        if exc_type is not None and not self.verbose:
            print(f"\nthe failed step's last lines ({self.log_path} has the whole log):", file=self.out)
            for line in self.tail:
                print("    " + line, file=self.out)
        self.log.close()

"""Progress of a running step, as events: one line each on stderr, and in-process sinks.

A step reports ``emit(step, phase, done, total, metrics)`` as it goes (an iteration, a batch of value paths, an
evaluation cell). The event is printed as one line, ``ctrl-progress {json}``, so it leaves the step's process the
way its logs do: kfp.local streams a task's output (stderr with stdout) line by line to ``ctrl run``, which draws
it as a bar (:class:`Renderer`); torchrun passes rank 0's stderr through; on a cluster the line is in the pod's
log. stdout stays the program's own output (``ctrl step`` prints its result there as JSON). In the
same process, sinks (``add_sink``) receive the event as a dict: the KFP shells log its metrics to the MLflow run
as they come (components/tracking.py).

:class:`Bar` draws the same bars in-process, for the long benchmarks (``bench.*``).

Standard library only: the engine, the components and the CLI all import this.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

#: the marker that starts an event line
PREFIX = "ctrl-progress "

_sinks: list[Callable[[dict], None]] = []


def add_sink(fn: Callable[[dict], None]) -> None:
    """``fn(event)`` is called for every event emitted in this process (after the line is printed)."""
    _sinks.append(fn)


def remove_sink(fn: Callable[[dict], None]) -> None:
    if fn in _sinks:
        _sinks.remove(fn)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def event(
    step: str,
    phase: str,
    done: int,
    total: int,
    metrics: dict[str, Any] | None = None,
    show: Iterable[str] = (),
) -> dict:
    """The event's dict: ``metrics`` keeps its finite numbers only; ``show`` names the ones a bar displays."""
    numbers = {k: n for k, v in (metrics or {}).items() if (n := _number(v)) is not None}
    return {
        "step": step,
        "phase": phase,
        "done": int(done),
        "total": int(total),
        "metrics": numbers,
        "show": [k for k in show if k in numbers],
    }


def emit(
    step: str,
    phase: str,
    done: int,
    total: int,
    metrics: dict[str, Any] | None = None,
    show: Iterable[str] = (),
    stream: TextIO | None = None,
) -> dict:
    """Report that ``done`` of ``total`` units of ``step``'s ``phase`` are finished, with their ``metrics``.
    Printed as one line on ``stream`` (default stderr, flushed) and passed to every sink."""
    ev = event(step, phase, done, total, metrics, show)
    out = stream if stream is not None else sys.stderr
    print(PREFIX + json.dumps(ev, separators=(",", ":")), file=out, flush=True)
    for sink in list(_sinks):
        sink(ev)
    return ev


def parse(line: str) -> dict | None:
    """The event of a printed line (leading indentation allowed), else None."""
    text = line.strip()
    if not text.startswith(PREFIX):
        return None
    try:
        ev = json.loads(text[len(PREFIX) :])
    except ValueError:
        return None
    if not isinstance(ev, dict) or not {"step", "phase", "done", "total"} <= set(ev):
        return None
    return ev


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _elapsed(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


class Renderer:
    """Draws events as one bar per (step, phase). On a terminal the bar is redrawn in place; elsewhere (a CI
    log, a pipe) a line is printed when a phase starts, at every tenth of it, and when it ends."""

    WIDTH = 24

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, min_interval: float = 0.1):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.min_interval = min_interval
        self.key: tuple[str, str] | None = None
        self.mark = time.monotonic()  # when the last phase or note ended: the next phase's start
        self.started = 0.0
        self.last_draw = 0.0
        self.last_tenth = -1
        self.line_open = False
        self.last: dict | None = None

    def _line(self, ev: dict) -> str:
        done, total = ev["done"], ev["total"]
        frac = min(done / total, 1.0) if total > 0 else 1.0
        fill = int(round(frac * self.WIDTH))
        shown = " ".join(f"{k} {_fmt(ev['metrics'][k])}" for k in ev.get("show", []) if k in ev["metrics"])
        label = f"{ev['step']} · {ev['phase']}"
        bar = "#" * fill + "-" * (self.WIDTH - fill)
        return f"{label:<34} [{bar}] {done}/{total} {_elapsed(time.monotonic() - self.started):>7}" + (
            f"  {shown}" if shown else ""
        )

    def update(self, ev: dict) -> None:
        key = (ev["step"], ev["phase"])
        if key != self.key:
            self.close()
            self.key, self.started, self.last_tenth = key, self.mark, -1
        self.last = ev
        finished = ev["total"] > 0 and ev["done"] >= ev["total"]
        now = time.monotonic()
        if self.tty:
            if finished or now - self.last_draw >= self.min_interval:
                cols = shutil.get_terminal_size((160, 24)).columns - 1  # one line: \r redraws only that
                self.stream.write("\r\033[K" + self._line(ev)[:cols])
                self.stream.flush()
                self.line_open, self.last_draw = True, now
            if finished:
                self.close()
        else:
            tenth = int(10 * ev["done"] / ev["total"]) if ev["total"] > 0 else 10
            if tenth > self.last_tenth or finished:
                self.stream.write(self._line(ev) + "\n")
                self.stream.flush()
                self.last_tenth = tenth
            if finished:
                self.key, self.mark = None, now

    def note(self, text: str) -> None:
        """A line of its own (a step started or ended), below any open bar."""
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()
        self.mark = time.monotonic()

    def close(self) -> None:
        if self.line_open:
            self.stream.write("\n")
            self.stream.flush()
            self.mark = time.monotonic()
        self.line_open, self.key = False, None


class Bar:
    """An in-process bar: ``with Bar("bench.frontier", "points", total) as bar: ... bar.update(i, gain=...)``.
    Draws through a :class:`Renderer` on stderr (stdout stays the program's output, e.g. JSON)."""

    def __init__(
        self, step: str, phase: str, total: int, stream: TextIO | None = None, show: Iterable[str] = ()
    ):
        self.step, self.phase, self.total, self.show = step, phase, total, tuple(show)
        self.renderer = Renderer(stream)

    def __enter__(self) -> Bar:
        self.renderer.update(event(self.step, self.phase, 0, self.total))
        return self

    def update(self, done: int, **metrics: Any) -> None:
        self.renderer.update(event(self.step, self.phase, done, self.total, metrics, self.show or metrics))

    def __exit__(self, *exc) -> None:
        self.renderer.close()


def train(
    trainer, label: str, show: Iterable[str] = ("reward_mean", "kl", "value_loss", "critic_loss")
) -> list:
    """``trainer.train()`` with a :class:`Bar` of its iterations (a benchmark's training run); returns its
    history. ``label`` names the bar."""
    with Bar(label, "iterations", trainer.cfg.iterations, show=show) as bar:
        return trainer.train(lambda st: bar.update(st.iteration + 1, **vars(st)))

"""Progress events (ctrl_core/progress.py), the console of `ctrl run` (pipelines/console.py) and the live MLflow
run the steps report into (components/tracking.py), against a real sqlite tracking store."""

from __future__ import annotations

import io
import math

import pytest

from ctrl_core import progress
from ctrl_core.params import load
from pipelines.console import RunConsole


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_an_event_is_one_parseable_line_and_reaches_the_sinks():
    seen, out = [], io.StringIO()
    progress.add_sink(seen.append)
    try:
        ev = progress.emit("ctrl_optimize", "ctrl", 3, 20, {"reward_mean": 0.5, "kl": math.nan, "n": True},
                           show=["reward_mean", "kl"], stream=out)  # fmt: skip
    finally:
        progress.remove_sink(seen.append)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and progress.parse("    " + lines[0]) == ev == seen[0]
    # non-finite and non-numeric values are dropped (MLflow and JSON both refuse NaN), and so is their display
    assert ev["metrics"] == {"reward_mean": 0.5} and ev["show"] == ["reward_mean"]
    assert progress.parse("reward 0.5") is None and progress.parse(progress.PREFIX + "{not json") is None


def test_off_a_terminal_a_bar_prints_a_line_per_tenth_and_the_last():
    out = io.StringIO()
    r = progress.Renderer(out, tty=False)
    for i in range(1, 101):
        r.update(progress.event("s", "p", i, 100, {"loss": 1.0 / i}, show=["loss"]))
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].split("]")[1].split()[0] == "100/100" and "loss 0.01" in lines[-1]
    assert "\r" not in out.getvalue()


def test_on_a_terminal_a_bar_is_redrawn_in_place_and_ends_with_a_newline():
    out = _Tty()
    r = progress.Renderer(out, min_interval=0.0)
    for i in range(1, 4):
        r.update(progress.event("s", "p", i, 3))
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 3 and text.endswith("\n") and text.count("\n") == 1


def _kfp_like_task(name: str, fail: bool = False) -> None:
    # what kfp.local prints for a task (its log records, the task's streamed stdout with 4 spaces of indent)
    print(f"00:00:00.000 - INFO - Executing task \x1b[96m'{name}'\x1b[0m")
    print("    some executor JSON noise")
    print("    " + progress.PREFIX + '{"step":"x","phase":"it","done":1,"total":2,"metrics":{},"show":[]}')
    print("    " + progress.PREFIX + '{"step":"x","phase":"it","done":2,"total":2,"metrics":{},"show":[]}')
    if fail:
        print("    ValueError: the real reason")
        raise RuntimeError("Pipeline failed")
    print(f"00:00:01.000 - INFO - Task \x1b[96m'{name}'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")


def test_the_console_shows_bars_and_finished_tasks_and_logs_the_rest(tmp_path):
    out = io.StringIO()
    with RunConsole(tmp_path / "run.log", out=out):
        _kfp_like_task("pretrain-value")
    shown = out.getvalue()
    assert "x · it" in shown and "2/2" in shown and "pretrain_value" in shown and " ok " in shown
    assert "noise" not in shown and "Executing" not in shown
    log = (tmp_path / "run.log").read_text()
    assert "some executor JSON noise" in log and "\x1b[" not in log


def test_a_failed_task_prints_its_last_lines_and_the_log(tmp_path):
    out = io.StringIO()
    with pytest.raises(RuntimeError), RunConsole(tmp_path / "run.log", out=out):
        _kfp_like_task("ctrl-optimize", fail=True)
    shown = out.getvalue()
    assert "ValueError: the real reason" in shown and str(tmp_path / "run.log") in shown


def test_verbose_passes_the_stream_through(tmp_path, capsys):
    with RunConsole(tmp_path / "run.log", verbose=True):
        _kfp_like_task("evaluate")
    assert "some executor JSON noise" in capsys.readouterr().out


def test_a_steps_events_reach_the_live_mlflow_run_as_they_come(tmp_path, monkeypatch):
    import mlflow

    from components import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.RUN_ID_ENV, raising=False)
    params = load(None, ["run.name=live-test"])
    with tracking.LiveRun(params) as live:
        for i in (1, 2, 3):
            progress.emit("ctrl_optimize", "ctrl", i, 3, {"reward_mean": 0.1 * i}, stream=io.StringIO())
    client = mlflow.MlflowClient(uri)
    run = client.get_run(live.run_id)
    assert run.info.status == "RUNNING" and run.data.tags[tracking.TAG_PARAMS] == params.digest()
    history = client.get_metric_history(live.run_id, "ctrl_optimize/reward_mean")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    # the next step of the same pipeline finds the same run (on a cluster: by the parameters' digest)
    with tracking.LiveRun(params) as again:
        progress.emit("evaluate", "cells", 1, 1, {"gain/sde/4": 0.2}, stream=io.StringIO())
    assert again.run_id == live.run_id


def test_live_logging_never_fails_the_step(tmp_path, monkeypatch, capsys):
    from components import tracking

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")  # unusable
    monkeypatch.delenv(tracking.RUN_ID_ENV, raising=False)
    with tracking.LiveRun(load(None, [])):
        progress.emit("ctrl_optimize", "ctrl", 1, 2, {"reward_mean": 0.1}, stream=io.StringIO())
    assert "live MLflow logging stopped" in capsys.readouterr().err
    monkeypatch.setenv(tracking.ENABLE_ENV, "0")
    assert not tracking.LiveRun(load(None, [])).active

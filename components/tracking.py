"""The pipeline's live MLflow run: a step's progress events become metrics while the step runs.

One MLflow run follows a pipeline run from its start: ``ctrl run`` opens it before the first step and names it
to the steps in ``$CTRL_MLFLOW_RUN_ID``; on a cluster (or under ``dvc repro``) the first step that reports finds
the RUNNING run of the experiment tagged with the parameters' digest, or opens it. Each step's events
(ctrl_core/progress.py: an iteration's reward, KL and losses; a value link's held-out MSE; an evaluation cell's
gain) are logged as ``<step>/<metric>`` at the event's step number, so the MLflow UI draws the curves as they
grow; the evaluate step adds its sample grids. The register step then logs the final parameters, metrics and the
model into the same run and closes it (pipelines/registry.py).

Logging happens on a background thread (a slow tracking server never slows the step) and can never fail a
step: an MLflow error is reported once on stderr and the rest of the step's events are dropped. With no
tracking URI (neither ``$MLFLOW_TRACKING_URI`` nor ``$CTRL_MLFLOW_RUN_ID``) or with ``$CTRL_LIVE_TRACKING=0``
nothing is logged.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from typing import Any

#: the live run's id, set by ``ctrl run`` for its steps
RUN_ID_ENV = "CTRL_MLFLOW_RUN_ID"
#: ``0`` turns live logging off
ENABLE_ENV = "CTRL_LIVE_TRACKING"
#: tags of a live run: it was opened by a pipeline, and for which parameters
TAG_LIVE = "ctrl.live"
TAG_PARAMS = "ctrl.params_hash"
#: how long a step waits at its end for its last metrics to reach MLflow
FLUSH_TIMEOUT_S = 60.0


def enabled() -> bool:
    if os.environ.get(ENABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return bool(os.environ.get(RUN_ID_ENV) or os.environ.get("MLFLOW_TRACKING_URI"))


def client():
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created by a concurrent step or pipeline
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(client, params) -> str | None:
    """``$CTRL_MLFLOW_RUN_ID``, else the newest RUNNING live run of ``params``' experiment and digest."""
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    exp = client.get_experiment_by_name(params.run.name)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=(
            f"tags.`{TAG_LIVE}` = 'true' AND tags.`{TAG_PARAMS}` = '{params.digest()}' "
            "AND attributes.status = 'RUNNING'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def create_run(client, params, run_name: str | None = None, tags: dict[str, str] | None = None) -> str:
    """A new RUNNING live run for ``params`` (tagged with their digest) in their experiment."""
    all_tags = {TAG_LIVE: "true", TAG_PARAMS: params.digest(), "ctrl.model_name": params.register.model_name}
    run = client.create_run(experiment_id(client, params.run.name), tags={**all_tags, **(tags or {})},
                            run_name=run_name)  # fmt: skip
    return run.info.run_id


def open_run(client, params) -> str:
    """The live run of ``params`` (``find_run``), else a new one."""
    found = find_run(client, params)
    return found if found is not None else create_run(client, params)


class LiveRun:
    """``with LiveRun(params): steps.optimize(...)``: the step's progress events go to the live run as metrics.
    ``log_artifacts(folder, path)`` queues a folder for the run (the evaluation's grids)."""

    def __init__(self, params, active: bool = True):
        self.params = params
        self.active = active and enabled()
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.run_id: str | None = None
        self.failed = False

    def __enter__(self) -> LiveRun:
        if self.active:
            from ctrl_core import progress

            progress.add_sink(self._sink)
            self.thread = threading.Thread(target=self._work, name="ctrl-live-mlflow", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.thread is None:
            return
        from ctrl_core import progress

        progress.remove_sink(self._sink)
        self.queue.put(None)
        self.thread.join(FLUSH_TIMEOUT_S)
        if self.thread.is_alive():
            print(
                f"live MLflow logging: not flushed after {FLUSH_TIMEOUT_S:.0f}s; left behind", file=sys.stderr
            )

    def _sink(self, ev: dict) -> None:
        if ev.get("metrics"):
            self.queue.put(("metrics", ev))

    def log_artifacts(self, folder: str, artifact_path: str) -> None:
        if self.thread is not None:
            self.queue.put(("artifacts", folder, artifact_path))

    def _work(self) -> None:
        mlflow = None
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.failed:
                continue
            try:
                if mlflow is None:
                    mlflow = client()
                    self.run_id = open_run(mlflow, self.params)
                self._log(mlflow, item)
            except Exception as err:  # never fail the step for its live metrics
                self.failed = True
                print(
                    f"live MLflow logging stopped: {type(err).__name__}: {err}", file=sys.stderr, flush=True
                )

    def _log(self, client, item: tuple[Any, ...]) -> None:
        from mlflow.entities import Metric

        if item[0] == "artifacts":
            client.log_artifacts(self.run_id, item[1], artifact_path=item[2])
            return
        ev = item[1]
        now = int(time.time() * 1000)
        metrics = [Metric(f"{ev['step']}/{k}", v, now, int(ev["done"])) for k, v in ev["metrics"].items()]
        client.log_batch(self.run_id, metrics=metrics)

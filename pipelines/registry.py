"""MLflow registration and promotion gate for the pipeline's final ``register`` step.

MLflow 3 deprecates stages, so promotion is expressed with registered-model *aliases*
(``challenger`` / ``champion``) and model-version *tags* only.

Guarantees:

* **Idempotent on ``run_key``**: the run and the model version are tagged ``ctrl.run_key``; a retry reuses
  them instead of creating duplicates, and converges aliases left unset by a crash.
* **Concurrency-safe for one ``run_key``**: racing callers may each create a version, then keep the lowest
  version number and delete their own losing version (and run), so exactly one version survives.
* **Never promote a worse model**: ``champion`` moves only when :func:`evaluation_gate` passes against the
  current champion's evaluation, or on an explicit, audited ``promote(..., force=True, reason=...)``.
* **No half-written version**: with ``logged_model``, the version's source is an MLflow LoggedModel (pyfunc,
  ``pipelines.mlflow_model``) of the run, created, uploaded and finalised READY before the run is marked
  FINISHED, and the version is only created from a FINISHED run: a crash in between leaves a run that a retry
  does not reuse, never a version whose model is missing.

Only the standard library is imported at module level so importing this module stays cheap; MLflow is
imported lazily inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "GateConfig",
    "RegisterResult",
    "champion",
    "evaluation_gate",
    "promote",
    "register_run",
]

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

TAG_RUN_KEY = "ctrl.run_key"
TAG_MODEL_NAME = "ctrl.model_name"
TAG_DUPLICATE_OF = "ctrl.duplicate_of"
TAG_MODEL_ID = "ctrl.model_id"  # run tag: the LoggedModel of the run, set once that model is READY
LOGGED_MODEL_NAME = "model"
TAG_EVALUATION = "ctrl.evaluation"
# Set once the aliases of a freshly created version have been applied. A retry only re-applies aliases while
# it is absent, so a later retry never undoes history made since (newer challengers, forced promotions).
TAG_ALIASES_DONE = "ctrl.aliases_applied"
TAG_GATE_PASSED = "gate.passed"
TAG_GATE_REASON = "gate.reason"
TAG_FORCED = "promotion.forced"
TAG_FORCE_REASON = "promotion.reason"
EVALUATION_ARTIFACT = "evaluation.json"
EVAL_FIELDS = ("base", "tuned", "gain", "kl", "kl_thm31", "kl_exact")  # kl = kl_thm31 (its old name)

# MLflow's limits (mlflow.utils.validation). Kept as module constants so tests can shrink them.
_PARAM_VALUE_LIMIT = 6000
_PARAM_KEY_LIMIT = 250
_TAG_VALUE_LIMIT = 8000  # run tags; refined to the registry limit lazily in _version_tag_limit()
_VERSION_TAG_VALUE_LIMIT: int | None = None  # None -> use MLflow's MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH
_PARAMS_PER_BATCH = 100
_GATE_REFRESHES = 3  # re-gate at most this often when the champion moves while we decide
_METRICS_PER_BATCH = 1000

#: Test-only crash hook: ``CTRL_FAULT_INJECT=after_create_version`` (comma-separated point names) makes the
#: process SIGKILL itself at that point, so tests and ``bench.faults`` can check that a retry converges after
#: a crash anywhere in the registration. Unset in production; the points are listed in ``FAULT_POINTS``.
FAULT_ENV = "CTRL_FAULT_INJECT"
FAULT_POINTS = (
    "after_model_artifacts",
    "after_create_run",
    "after_create_version",
    "after_gate_tags",
    "after_challenger_alias",
)

_RUN_KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


@dataclass
class GateConfig:
    """Promotion gate thresholds.

    Attributes:
        min_gain: required ``tuned - base`` gain at *every* evaluated (sampler, steps) cell.
        require_no_worse_than_champion: also require, on every cell shared with the current champion,
            ``tuned >= champion_tuned - tolerance``.
        tolerance: allowed shortfall versus the champion's tuned reward per cell.
    """

    min_gain: float = 0.0
    require_no_worse_than_champion: bool = True
    tolerance: float = 0.0


@dataclass
class RegisterResult:
    """Outcome of :func:`register_run`.

    ``created`` is False when an earlier identical registration (same ``run_key``) was reused, including
    when a concurrent caller won the race. ``promoted`` is True when the version holds ``champion`` at the
    end of the call; ``gate_passed``/``gate_reason`` are the gate decision recorded on the version.
    """

    run_id: str
    name: str
    version: int
    aliases: list[str]
    promoted: bool
    gate_passed: bool
    gate_reason: str
    created: bool
    model_id: str | None = None  # the version's LoggedModel (``models:/<model_id>``), when it has one


# --------------------------------------------------------------------------------------------- the gate


def _steps_sort_key(steps: str) -> tuple[int, float, str]:
    try:
        return (0, float(steps), steps)
    except (TypeError, ValueError):
        return (1, 0.0, str(steps))


def _cells(evaluation: dict) -> list[tuple[str, str, dict]]:
    """Flatten ``{sampler: {steps: cell}}`` into a deterministically ordered list of cells."""
    out = []
    for sampler in sorted(evaluation, key=str):
        per_steps = evaluation[sampler]
        if not isinstance(per_steps, dict):
            raise ValueError(
                f"evaluation[{sampler!r}] must be a dict of steps -> cell, got {type(per_steps)}"
            )
        for steps in sorted(per_steps, key=lambda s: _steps_sort_key(str(s))):
            cell = per_steps[steps]
            if not isinstance(cell, dict):
                raise ValueError(f"evaluation[{sampler!r}][{steps!r}] must be a dict, got {type(cell)}")
            out.append((str(sampler), str(steps), cell))
    return out


def _num(cell: dict, key: str) -> float:
    value = cell.get(key)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _gain(cell: dict) -> float:
    if "gain" in cell:
        return _num(cell, "gain")
    # Older evaluation dicts may carry only base/tuned; the gain is then derived.
    return _num(cell, "tuned") - _num(cell, "base")


def _name(sampler: str, steps: str) -> str:
    return f"{sampler}@{steps} steps"


def evaluation_gate(evaluation: dict, champion_evaluation: dict | None, gate: GateConfig) -> tuple[bool, str]:
    """Decide whether ``evaluation`` may be promoted over the current champion.

    Args:
        evaluation: ``{sampler: {steps_str: {"base", "tuned", "gain", "kl", ...}}}`` of the candidate.
        champion_evaluation: the current champion's evaluation in the same format, or None when there is no
            champion (then only the ``min_gain`` criterion applies).
        gate: thresholds.

    Returns:
        ``(passed, reason)`` where ``reason`` is a human-readable sentence naming the failing cell(s).
        Passes iff every cell has ``gain >= min_gain`` and, when a champion exists and the comparison is
        required, every cell shared with the champion has ``tuned >= champion_tuned - tolerance``. A
        champion with no shared cell is not comparable, which fails (never promote blind).
    """
    cells = _cells(evaluation or {})
    if not cells:
        return False, "evaluation has no (sampler, steps) cells; nothing to gate on"

    # NaN compares False against everything, so "not (x >= y)" also rejects NaN/missing values.
    low_gain = [
        f"{_name(s, k)}: gain {_gain(c):.4g} < min_gain {gate.min_gain:.4g}"
        for s, k, c in cells
        if not _gain(c) >= gate.min_gain
    ]
    if low_gain:
        return False, f"gain below min_gain at {len(low_gain)}/{len(cells)} cell(s): " + "; ".join(low_gain)
    passed = f"gain >= {gate.min_gain:.4g} at all {len(cells)} cell(s)"

    if champion_evaluation is None or not gate.require_no_worse_than_champion:
        suffix = "no champion to compare with" if champion_evaluation is None else "champion check disabled"
        return True, f"{passed}; {suffix}"

    champ = {(s, k): c for s, k, c in _cells(champion_evaluation)}
    shared = [(s, k, c, champ[(s, k)]) for s, k, c in cells if (s, k) in champ]
    if not shared:
        return False, (
            "not comparable with the champion: no (sampler, steps) cell in common "
            f"(candidate: {', '.join(_name(s, k) for s, k, _ in cells)}; "
            f"champion: {', '.join(_name(s, k) for s, k in champ) or 'none'})"
        )
    worse = [
        f"{_name(s, k)}: tuned {_num(c, 'tuned'):.4g} < champion {_num(cc, 'tuned'):.4g}"
        f" - tolerance {gate.tolerance:.4g}"
        for s, k, c, cc in shared
        if not _num(c, "tuned") >= _num(cc, "tuned") - gate.tolerance
    ]
    if worse:
        return False, f"worse than the champion at {len(worse)}/{len(shared)} shared cell(s): " + "; ".join(
            worse
        )
    return (
        True,
        f"{passed}; no worse than the champion on {len(shared)} shared cell(s) (tolerance {gate.tolerance:.4g})",
    )


# ----------------------------------------------------------------------------------------- MLflow helpers


def _resolve_uri(tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _client(tracking_uri: str | None):
    """An MlflowClient bound to one URI for tracking *and* registry (no global mlflow state touched)."""
    # The pipeline runs in sandboxes without egress; telemetry would only add latency and noise.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    uri = _resolve_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _fault_point(name: str) -> None:
    """SIGKILL this process here when ``$CTRL_FAULT_INJECT`` names this point (tests only; see FAULT_ENV)."""
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted and name in wanted.split(","):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


def _quote(value: str) -> str:
    """Quote a value for an MLflow filter string (its grammar has no escape for the quote itself)."""
    if "'" in value:
        raise ValueError(f"value {value!r} must not contain a single quote (MLflow filter strings)")
    return f"'{value}'"


def _safe_key(key: str) -> str:
    # MLflow accepts alphanumerics, _ - . space / : in param/metric/tag keys; anything else would 400.
    return _BAD_KEY_CHARS.sub("_", str(key))[:_PARAM_KEY_LIMIT]


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = "...[truncated]"
    return value[: limit - len(marker)] + marker


def _flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; non-dict values become JSON (lists) or str."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{full}."))
            continue
        if isinstance(value, list | tuple | dict):
            text = json.dumps(value, sort_keys=True, default=str)
        else:
            text = str(value)
        flat[_safe_key(full)] = _truncate(text, _PARAM_VALUE_LIMIT)
    return flat


def _eval_metrics(evaluation: dict) -> dict[str, float]:
    metrics = {}
    for sampler, steps, cell in _cells(evaluation):
        for key in EVAL_FIELDS:
            # kl_exact is None for a deterministic sampler (it has no path KL): not logged, rather than as NaN
            if key in cell and not (key == "kl_exact" and cell[key] is None):
                metrics[_safe_key(f"eval/{sampler}/steps{steps}/{key}")] = _num(cell, key)
    return metrics


def _version_tag_limit() -> int:
    if _VERSION_TAG_VALUE_LIMIT is not None:
        return _VERSION_TAG_VALUE_LIMIT
    try:
        from mlflow.utils.validation import MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH as limit
    except ImportError:  # pragma: no cover - older MLflow
        limit = 5000
    return int(limit)


def _get_or_create_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception as exc:  # a concurrent caller created it first
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _ensure_registered_model(client, name: str) -> dict[str, int]:
    """Create the registered model if missing; return its current aliases (one round trip when it exists)."""
    aliases = _aliases(client, name)
    if aliases is not None:
        return aliases
    try:
        client.create_registered_model(name)
    except Exception as exc:  # created concurrently by another caller: fine
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
    return _aliases(client, name) or {}


def _runs_for_key(client, experiment_id: str, model_name: str, run_key: str) -> list:
    """Active runs of ``model_name`` tagged with ``run_key``, oldest first (ties broken by run id)."""
    from mlflow.entities import ViewType

    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_RUN_KEY}` = {_quote(run_key)} and tags.`{TAG_MODEL_NAME}` = {_quote(model_name)}",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1000,
    )
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _versions_for_key(client, name: str, run_key: str) -> list:
    """Live model versions of ``name`` tagged with ``run_key``, lowest version number first."""
    found = client.search_model_versions(
        f"name = {_quote(name)} and tags.`{TAG_RUN_KEY}` = {_quote(run_key)}", max_results=1000
    )
    return sorted(found, key=lambda v: int(v.version))


def _aliases(client, name: str) -> dict[str, int] | None:
    """``{alias: version}`` of a registered model, or None if the model does not exist."""
    try:
        model = client.get_registered_model(name)
    except Exception as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return {alias: int(version) for alias, version in (model.aliases or {}).items()}


def _evaluation_of(client, version) -> dict | None:
    """A version's evaluation: its ``ctrl.evaluation`` tag (JSON, or a pointer) else the run artifact."""
    tag = (version.tags or {}).get(TAG_EVALUATION)
    if tag and tag.lstrip().startswith("{"):
        return json.loads(tag)
    run_id = version.run_id
    path = EVALUATION_ARTIFACT
    if tag and tag.startswith("runs:/"):  # pointer written when the JSON exceeded the tag limit
        run_id, _, path = tag[len("runs:/") :].partition("/")
    if not run_id:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, path, tmp)
            with open(local, encoding="utf-8") as fh:
                return json.load(fh)
    except Exception:  # missing artifact: the caller treats None as "no evaluation"
        return None


def _champion_evaluation(client, name: str, current: int | None) -> dict | None:
    """Evaluation of champion version ``current``: None if there is no champion, ``{}`` if unreadable.

    ``{}`` (rather than None) makes the gate fail as "not comparable": an unreadable champion must block
    automatic promotion instead of waving every candidate through.
    """
    if current is None:
        return None
    evaluation = _evaluation_of(client, client.get_model_version(name, str(current)))
    return evaluation if evaluation is not None else {}


def _gate_vs(
    evaluation: dict, current: int | None, champ_eval: dict | None, gate: GateConfig
) -> tuple[bool, str]:
    passed, reason = evaluation_gate(evaluation, champ_eval, gate)
    reason = f"vs champion v{current}: {reason}" if current is not None else reason
    return passed, _truncate(reason, _TAG_VALUE_LIMIT)


def _evaluation_tag(evaluation: dict, run_id: str) -> str:
    compact = json.dumps(evaluation, sort_keys=True, separators=(",", ":"), allow_nan=True)
    if len(compact) <= _version_tag_limit():
        return compact
    return f"runs:/{run_id}/{EVALUATION_ARTIFACT}"


def _apply_aliases(
    client,
    name: str,
    version,
    gate: GateConfig,
    evaluation: dict,
    known_champion: tuple[int | None, dict | None] | None = None,
) -> tuple[bool, str, dict[str, int]]:
    """Give ``version`` (a ModelVersion) ``challenger`` and, if the gate passes, ``champion``.

    The gate is re-evaluated against the champion *now* (it may have changed since the version was
    created; ``known_champion`` = ``(champion version, its evaluation)`` saves a round trip when it has
    not). The decision goes to the version's ``gate.*`` tags *before* any alias moves, so a champion alias
    is never observed without its justification. Returns ``(passed, reason, aliases after the call)``.
    """
    number = int(version.version)
    tags = dict(version.tags or {})
    aliases = _aliases(client, name) or {}
    for _ in range(_GATE_REFRESHES):
        current = aliases.get(CHAMPION)
        if current == number:
            passed, reason = True, "already the champion"
        else:
            if known_champion is not None and known_champion[0] == current:
                champ_eval = known_champion[1]
            else:
                champ_eval = _champion_evaluation(client, name, current)
            passed, reason = _gate_vs(evaluation, current, champ_eval, gate)
        if tags.get(TAG_GATE_PASSED) != ("true" if passed else "false"):
            client.set_model_version_tag(name, str(number), TAG_GATE_PASSED, "true" if passed else "false")
            tags[TAG_GATE_PASSED] = "true" if passed else "false"
        if tags.get(TAG_GATE_REASON) != reason:
            client.set_model_version_tag(name, str(number), TAG_GATE_REASON, reason)
            tags[TAG_GATE_REASON] = reason
        _fault_point("after_gate_tags")
        # MLflow aliases have no compare-and-set: re-read just before moving "champion" and re-gate if another
        # registration promoted meanwhile, which narrows the read-decide-write window to one round trip.
        fresh = _aliases(client, name) or {}
        if fresh.get(CHAMPION) == current:
            aliases = fresh
            break
        aliases = fresh
    else:
        passed, reason = False, "the champion kept changing during the gate; not promoted (retry or promote)"
        client.set_model_version_tag(name, str(number), TAG_GATE_PASSED, "false")
        client.set_model_version_tag(name, str(number), TAG_GATE_REASON, reason)

    # A retry of an older registration must not steal "challenger" from a newer version.
    if aliases.get(CHALLENGER) is None or aliases[CHALLENGER] <= number:
        client.set_registered_model_alias(name, CHALLENGER, str(number))
        aliases[CHALLENGER] = number
    _fault_point("after_challenger_alias")
    if passed and current != number:
        client.set_registered_model_alias(name, CHAMPION, str(number))
        aliases[CHAMPION] = number
    client.set_model_version_tag(name, str(number), TAG_ALIASES_DONE, "true")
    return passed, reason, aliases


def _log_run(
    client,
    run_id: str,
    *,
    params: dict,
    metrics: dict[str, float],
    evaluation: dict,
    artifacts: dict[str, str],
    model_dir: str | None,
) -> None:
    import time

    from mlflow.entities import Metric, Param

    flat = _flatten(params)
    items = sorted(flat.items())
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + _PARAMS_PER_BATCH]])

    now = int(time.time() * 1000)
    all_metrics = {_safe_key(k): float(v) for k, v in metrics.items()}
    all_metrics.update(_eval_metrics(evaluation))
    mitems = sorted(all_metrics.items())
    for i in range(0, len(mitems), _METRICS_PER_BATCH):
        client.log_batch(
            run_id, metrics=[Metric(k, v, now, 0) for k, v in mitems[i : i + _METRICS_PER_BATCH]]
        )

    for key, path in sorted(artifacts.items()):
        if os.path.isdir(path):
            client.log_artifacts(run_id, path, artifact_path=key)
        else:
            client.log_artifact(run_id, path, artifact_path=key)
    client.log_dict(run_id, evaluation, EVALUATION_ARTIFACT)
    if model_dir is not None:
        client.log_artifacts(run_id, model_dir, artifact_path="model")


def _create_run(
    client,
    experiment_id: str,
    *,
    model_name: str,
    run_key: str,
    params: dict,
    metrics: dict[str, float],
    evaluation: dict,
    artifacts: dict[str, str],
    lineage: dict[str, str],
    model_dir: str | None,
    logged_model: Callable[[str, Any], None] | None = None,
    live_run_id: str | None = None,
) -> tuple[Any, str | None]:
    """Create and fully log a run, with its LoggedModel when ``logged_model`` builds one; returns (RunInfo, the
    model's id or None). With ``live_run_id`` (the pipeline's run, holding its training curves) that run is
    completed instead of a new one being created, when it can be (``_adopt_live_run``). On failure the run (and
    model) are marked FAILED (never reused) and the error re-raised."""
    tags = {TAG_RUN_KEY: run_key, TAG_MODEL_NAME: model_name}
    tags.update({_safe_key(f"lineage.{k}"): _truncate(str(v), _TAG_VALUE_LIMIT) for k, v in lineage.items()})
    run = _adopt_live_run(client, live_run_id, experiment_id, tags) if live_run_id else None
    if run is None:
        run = client.create_run(experiment_id, tags=tags, run_name=f"{model_name}-{run_key[:12]}")
    run_id = run.info.run_id
    try:
        _log_run(
            client,
            run_id,
            params=params,
            metrics=metrics,
            evaluation=evaluation,
            artifacts=artifacts,
            model_dir=model_dir,
        )
        model_id = None
        if logged_model is not None:
            model_id = _log_model(client, experiment_id, run_id, run_key, logged_model)
            client.set_tag(run_id, TAG_MODEL_ID, model_id)  # only READY models are named here
    except BaseException:
        # Best effort: the original error matters more than a failure to mark the run.
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run.info, model_id


def _adopt_live_run(client, run_id: str, experiment_id: str, tags: dict[str, str]):
    """The live run (opened when the pipeline started; components/tracking.py), tagged as this registration's,
    or None to create a new run: when it is not RUNNING in this experiment, or an earlier registration attempt
    already tagged it (that attempt died mid-log: the run is marked FAILED, like any run of a failed attempt)."""
    from mlflow.entities import RunTag

    try:
        run = client.get_run(run_id)
    except Exception as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if run.info.status != "RUNNING" or run.info.experiment_id != experiment_id:
        return None
    if TAG_RUN_KEY in run.data.tags:
        client.set_terminated(run_id, status="FAILED")
        return None
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())])
    return run


def _close_live_run(client, run_id: str, survivor_run_id: str) -> None:
    """A live run that did not become the version's run (the parameters were registered before, or a racer
    won) is finished, pointing at the run that holds the version."""
    with contextlib.suppress(Exception):  # deleted by the race resolution, or already closed: nothing to do
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, TAG_DUPLICATE_OF, survivor_run_id)
            client.set_terminated(run_id, status="FINISHED")


def _log_model(
    client, experiment_id: str, run_id: str, run_key: str, build: Callable[[str, Any], None]
) -> str:
    """The run's LoggedModel, as ``mlflow.pyfunc.log_model`` makes one, through this client only (no global
    tracking URI or active run): create it, link it to the run as an output, let ``build(path, mlflow_model)``
    write the MLflow model folder (``mlflow_model``: a ``mlflow.models.Model`` carrying the model's id, run id
    and artifact location, for ``save_model(..., mlflow_model=...)``), upload the folder, finalise READY.
    Any failure finalises it FAILED and re-raises. Returns the model id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    model = client.create_logged_model(experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id,
                                       tags={TAG_RUN_KEY: run_key})  # fmt: skip
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        with tempfile.TemporaryDirectory(prefix="ctrl-model-") as tmp:
            path = os.path.join(tmp, LOGGED_MODEL_NAME)
            build(path, Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                              model_id=model.model_id))  # fmt: skip
            if not os.path.isfile(os.path.join(path, "MLmodel")):
                raise FileNotFoundError(f"logged_model wrote no MLflow model (no MLmodel in {path})")
            client.log_model_artifacts(model.model_id, path)
        _fault_point("after_model_artifacts")
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    return model.model_id


def _version_source(run_info, model_id: str | None) -> str:
    """The version's source: its LoggedModel's URI ``models:/<model_id>`` (what MLflow 3's UI links to the
    model), else the run's ``model/`` folder."""
    if model_id is None:
        return f"{run_info.artifact_uri.rstrip('/')}/model"
    return f"models:/{model_id}"


def _model_id_of(version) -> str | None:
    source = version.source or ""
    return getattr(version, "model_id", None) or (
        source[len("models:/") :] if source.startswith("models:/m-") else None
    )


def _registry_resolves_with(uri: str):
    """MLflow's SQL registry store resolves a ``models:/<model_id>`` source with a client on the *global* tracking
    URI (sqlalchemy_store.create_model_version); point it at this client's store for the call. A server resolves
    it against its own store, which this changes nothing for."""
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover - a later MLflow without it
        return contextlib.nullcontext()
    return _use_tracking_uri(uri)


def _safe_delete(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # already deleted by a concurrent caller
        if _error_code(exc) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise


# ------------------------------------------------------------------------------------------ public API


def register_run(
    *,
    model_name: str,
    run_key: str,
    params: dict,
    metrics: dict[str, float],
    evaluation: dict,
    artifacts: dict[str, str],
    lineage: dict[str, str],
    gate: GateConfig,
    tracking_uri: str | None = None,
    experiment: str = "ctrl-pipeline",
    model_dir: str | None = None,
    logged_model: Callable[[str, Any], None] | None = None,
    live_run_id: str | None = None,
) -> RegisterResult:
    """Log a pipeline run to MLflow, register it as a model version and apply the promotion gate.

    Args:
        model_name: registered model name.
        run_key: deterministic hash of params + checkpoint; the idempotency key.
        params: run parameters; nested dicts are flattened to dotted keys, long values truncated.
        metrics: scalar metrics.
        evaluation: ``{sampler: {steps: {"base", "tuned", "gain", "kl", ...}}}``; logged as
            ``evaluation.json`` and as ``eval/{sampler}/steps{K}/{field}`` metrics, and gated on.
        artifacts: ``{artifact_path: local file or directory}`` logged under ``artifact_path``.
        lineage: logged as run tags ``lineage.<key>``.
        gate: promotion thresholds.
        tracking_uri: MLflow URI (tracking and registry); default ``$MLFLOW_TRACKING_URI`` else
            ``sqlite:///mlflow.db`` in the current directory.
        experiment: experiment name (created if missing).
        model_dir: local directory (e.g. a LoRA adapter) logged under ``model/``; the version's source is
            ``<run artifact uri>/model``.
        logged_model: instead of ``model_dir``, ``build(path, mlflow_model)`` writing an MLflow model folder
            at ``path`` (e.g. ``pipelines.mlflow_model.build_model``); it becomes the run's LoggedModel and the
            version's model: source its artifact location, ``model_id`` its id, so
            ``mlflow.pyfunc.load_model("models:/NAME@champion")`` loads it.
        live_run_id: the pipeline's live run (its training curves, components/tracking.py): the registration
            is logged into it when it is still RUNNING and untouched by an earlier attempt, else into a new
            run; a live run that does not become the version's run is finished with a ``duplicate_of`` tag.

    Returns:
        The surviving registration. Calling again with the same ``run_key`` returns the same version with
        ``created=False`` and converges aliases that a crash may have left unset.

    Raises:
        FileNotFoundError / NotADirectoryError: an artifact path or ``model_dir`` does not exist (checked
            before anything is written to MLflow).
        Any MLflow error while logging: the run is marked FAILED and no version is created.
    """
    if not _RUN_KEY_RE.match(run_key):
        raise ValueError(f"run_key {run_key!r} must match {_RUN_KEY_RE.pattern}")
    _quote(model_name)
    # Validate inputs up front so a bad call leaves no trace in MLflow at all.
    for key, path in artifacts.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"artifact {key!r}: {path} does not exist")
    if model_dir is not None and not os.path.isdir(model_dir):
        raise NotADirectoryError(f"model_dir {model_dir} is not a directory")
    if logged_model is not None and (model_dir is not None or not callable(logged_model)):
        raise ValueError("logged_model must be a callable build(path, mlflow_model), and excludes model_dir")
    _cells(evaluation)  # shape check
    # Normalise once: numpy scalars -> float, int step keys -> str, exactly as it will read back from JSON.
    evaluation = json.loads(json.dumps(evaluation, default=float))

    client = _client(tracking_uri)
    experiment_id = _get_or_create_experiment(client, experiment)
    aliases = _ensure_registered_model(client, model_name)

    versions = _versions_for_key(client, model_name, run_key)
    created = False
    known_champion = None
    if versions:
        survivor = versions[0]
    else:
        finished = [
            r
            for r in _runs_for_key(client, experiment_id, model_name, run_key)
            if r.info.status == "FINISHED"
        ]
        own_run: str | None = None
        if finished:  # a previous attempt logged the run but died before creating the version
            run_info, model_id = finished[0].info, finished[0].data.tags.get(TAG_MODEL_ID)
        else:
            run_info, model_id = _create_run(
                client, experiment_id, model_name=model_name, run_key=run_key, params=params,
                metrics=metrics, evaluation=evaluation, artifacts=artifacts, lineage=lineage,
                model_dir=model_dir, logged_model=logged_model, live_run_id=live_run_id,
            )  # fmt: skip
            own_run = run_info.run_id
            _fault_point("after_create_run")
        # Initial gate decision, recorded atomically with the version; _apply_aliases refreshes it.
        known_champion = (
            aliases.get(CHAMPION),
            _champion_evaluation(client, model_name, aliases.get(CHAMPION)),
        )
        passed, reason = _gate_vs(evaluation, *known_champion, gate)
        with _registry_resolves_with(client.tracking_uri) if model_id else contextlib.nullcontext():
            mine = client.create_model_version(
                model_name,
                source=_version_source(run_info, model_id),
                run_id=run_info.run_id,
                model_id=model_id,
                tags={
                    TAG_RUN_KEY: run_key,
                    TAG_GATE_PASSED: "true" if passed else "false",
                    TAG_GATE_REASON: reason,
                    TAG_EVALUATION: _evaluation_tag(evaluation, run_info.run_id),
                },
            )
        _fault_point("after_create_version")
        # Race resolution: version numbers only grow, so the lowest live version for this key never
        # changes once it exists; every racer agrees on it and each loser deletes only what it created.
        versions = _versions_for_key(client, model_name, run_key)
        survivor = versions[0] if versions else mine
        if int(survivor.version) == int(mine.version):
            created, survivor = True, mine
            # Orphan runs of earlier crashed attempts: marked, not deleted (a racer may still be using one).
            for dup in finished[1:]:
                client.set_tag(dup.info.run_id, TAG_DUPLICATE_OF, run_info.run_id)
        else:
            _safe_delete(client.delete_model_version, model_name, str(mine.version))
            if own_run is not None and own_run != survivor.run_id:
                _safe_delete(client.delete_run, own_run)
                if model_id is not None:
                    _safe_delete(client.delete_logged_model, model_id)

    if live_run_id is not None and live_run_id != survivor.run_id:
        _close_live_run(client, live_run_id, survivor.run_id)
    version = int(survivor.version)
    tags = survivor.tags or {}
    if tags.get(TAG_ALIASES_DONE) != "true":
        # Fresh version, or a crash left it without aliases: converge now.
        stored_eval = evaluation if created else _evaluation_of(client, survivor)
        passed, reason, aliases = _apply_aliases(
            client,
            model_name,
            survivor,
            gate,
            stored_eval if stored_eval is not None else evaluation,
            known_champion,
        )
    else:
        passed, reason = tags.get(TAG_GATE_PASSED) == "true", tags.get(TAG_GATE_REASON, "")
        aliases = _aliases(client, model_name) or {}

    return RegisterResult(
        run_id=survivor.run_id,
        name=model_name,
        version=version,
        aliases=sorted(a for a, v in aliases.items() if v == version),
        promoted=aliases.get(CHAMPION) == version,
        gate_passed=passed,
        gate_reason=reason,
        created=created,
        model_id=_model_id_of(survivor),
    )


def promote(
    model_name: str,
    version: int,
    *,
    force: bool = False,
    reason: str | None = None,
    gate: GateConfig = GateConfig(),  # noqa: B008 - immutable in practice, part of the public signature
    tracking_uri: str | None = None,
) -> tuple[bool, str]:
    """Move the ``champion`` alias to ``version`` if it passes the gate against the current champion.

    Args:
        model_name: registered model name.
        version: version to promote.
        force: promote even if the gate fails; requires ``reason`` and tags the version
            ``promotion.forced=true`` / ``promotion.reason=<reason>`` for the audit trail.
        reason: why a forced promotion is justified.
        gate: thresholds.
        tracking_uri: as in :func:`register_run`.

    Returns:
        ``(promoted, message)``. Promoting the current champion again is a no-op success.

    Raises:
        ValueError: ``force=True`` without a non-empty ``reason``.
    """
    if force and not (reason and reason.strip()):
        raise ValueError("promote(force=True) requires a non-empty reason")
    client = _client(tracking_uri)
    version = int(version)
    current = (_aliases(client, model_name) or {}).get(CHAMPION)
    if current == version:
        return True, f"v{version} is already the champion"
    mv = client.get_model_version(model_name, str(version))
    champ_eval = _champion_evaluation(client, model_name, current)

    evaluation = _evaluation_of(client, mv)
    if evaluation is None:
        passed, gate_reason = False, f"v{version} has no evaluation to gate on"
    else:
        passed, gate_reason = evaluation_gate(evaluation, champ_eval, gate)
    versus = f"v{version} vs champion v{current}" if current is not None else f"v{version} (no champion)"

    if not passed and not force:
        return False, f"refused: {versus}: {gate_reason}"
    if force:
        # Audit tags first: a forced champion is never visible without its justification.
        client.set_model_version_tag(model_name, str(version), TAG_FORCED, "true")
        client.set_model_version_tag(
            model_name, str(version), TAG_FORCE_REASON, _truncate(reason, _TAG_VALUE_LIMIT)
        )
    client.set_registered_model_alias(model_name, CHAMPION, str(version))
    if force:
        return True, f"forced: {versus}: {reason} (gate {'passed' if passed else 'failed'}: {gate_reason})"
    return True, f"promoted: {versus}: {gate_reason}"


def champion(model_name: str, tracking_uri: str | None = None) -> int | None:
    """The version number holding the ``champion`` alias, or None (no champion / no such model)."""
    return (_aliases(_client(tracking_uri), model_name) or {}).get(CHAMPION)

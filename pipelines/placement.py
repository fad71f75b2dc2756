"""Where each pipeline step runs on Kubernetes: the one place that turns the Helm chart's values into KFP
task settings.

Placement is compile-time configuration, not a run parameter: it is read from the chart's values
(``charts/ctrl-pipeline/values.yaml`` plus ``-f`` override files, merged as Helm merges them and checked
against the chart's ``values.schema.json``), so the cluster's node pools are declared once, for ``helm
install`` and for ``ctrl compile`` alike. It never enters ``Params`` (the KFP runtime parameters) nor
``Params.digest()`` (run identity): the same parameters on other hardware are the same experiment.

Per step, :func:`apply` sets on the KFP task

* the image (``image.repository`` + tag or digest, or ``--image``),
* CPU/memory requests and limits (the pool's, overridden per step),
* the accelerator type and count (``nvidia.com/gpu`` × ``gpus``) -- both the current and the deprecated
  accelerator fields of the IR, so old and new KFP backends schedule the GPUs (kfp #11374),
* the pool's node selector (e.g. ``nvidia.com/gpu.product``) and tolerations (``nvidia.com/gpu``,
  NoSchedule),
* a memory-backed ``/dev/shm`` (emptyDir, medium Memory) of ``shmSize``,
* the model/HF cache PVC at ``modelCache.mountPath`` (``HF_HOME`` and ``CTRL_CHECKPOINT_ROOT`` point into it),
* S3/MLflow credentials from Kubernetes Secrets as environment variables (names only; never values),
* ``CTRL_NUM_PROCESSES`` = the step's GPU count (1 on CPU): how many processes a multi-GPU step launches,
  and ``CTRL_LAUNCHER`` = the step's ``launcher`` (torchrun | accelerate; else ``pipeline.env``'s, else torchrun),
* caching off for steps that read mutable state (``register`` reads the registry's current champion),
* KFP's retry policy (``retry``: count, backoff, factor, maxDuration): a preempted or failed pod is started
  again and resumes from its step's checkpoints.

A data-parallel step (pretrain_value, ctrl_optimize) placed on ``nodes`` > 1 runs as a Kubeflow Trainer TrainJob
(components/trainjob.py): its KFP task becomes a light launcher (``pipeline.trainJob.launcherResources``, no GPU,
the cache PVC) and everything above except the retry policy goes into the TrainJob, built here at compile time
from the Trainer API's published models and handed to the task as ``$CTRL_TRAINJOB``: ``nodes`` nodes of the
pool, each with ``gpus`` GPUs (one process per GPU), the step's resources, node selector, tolerations, /dev/shm,
the cache PVC, environment and Secrets. The nodes share the step's folders through the cache PVC, so it must be
ReadWriteMany.

With no values (``ctrl run``, kfp.local, the plain ``ctrl compile``) only the caching rule applies.

Errors (:class:`PlacementError`) name the offending key: values that fail the schema, a step placed on a
pool the values do not define, zero GPUs for a step on a GPU pool (the CUDA image would otherwise see every
GPU of the node without having requested one), more GPUs than a node of the pool has (the pod would never
schedule), a Secret reference without a name, a cache mount without a PVC; several nodes for a step that is not
data-parallel, without the cache, or with a cache PVC that is not ReadWriteMany.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# CTRL_NUM_PROCESSES (a step's processes, one per GPU) and CTRL_LAUNCHER (what starts them), as the launcher reads them
from components import trainjob
from ctrl_core.launch import LAUNCHER_ENV, LAUNCHERS, NUM_PROCESSES_ENV

#: the pipeline's steps in DAG order, with whether they read mutable state (caching off)
STEPS: dict[str, bool] = {
    "resolve_params": False,
    "fetch_checkpoint": False,
    "pretrain_value": False,
    "ctrl_optimize": False,
    "evaluate": False,
    "register": True,  # reads the registry's current champion: a cached result would be stale
}
#: the data-parallel steps, which may run on several nodes, and the ``ctrl step`` each is
MULTI_NODE_STEPS = {"pretrain_value": "pretrain_value", "ctrl_optimize": "optimize"}

#: the chart used when ``ctrl compile -f FILE`` names no ``--chart`` (the image sets it to its copy)
CHART_ENV = "CTRL_CHART"
DEFAULT_CHART = "charts/ctrl-pipeline"


class PlacementError(ValueError):
    """Invalid cluster placement; the message names the offending values key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Toleration(_Model):
    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None
    tolerationSeconds: int | None = None


class ResourceAmounts(_Model):
    cpu: str | None = None
    memory: str | None = None

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


class Resources(_Model):
    requests: ResourceAmounts = Field(default_factory=ResourceAmounts)
    limits: ResourceAmounts = Field(default_factory=ResourceAmounts)


class Gpu(_Model):
    type: str = ""  # the extended resource, e.g. nvidia.com/gpu
    count: int = 0  # GPUs per node of the pool


class NodePool(_Model):
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    gpu: Gpu = Field(default_factory=Gpu)
    resources: Resources = Field(default_factory=Resources)


class Retry(_Model):
    count: int = 0  # retries of a failed pod (0: none)
    backoff: str = "60s"  # before the first retry; each next waits `factor` times longer
    factor: float = 2.0
    maxDuration: str = "24h"  # no retry starts after this long


class StepPlacement(_Model):
    pool: str
    gpus: int = 0
    nodes: int = Field(default=1, ge=1)  # > 1: a TrainJob of `nodes` nodes with `gpus` GPUs each
    resources: Resources | None = None
    shmSize: str = ""
    cache: bool = False
    launcher: str = (
        ""  # torchrun | accelerate for a multi-GPU step (CTRL_LAUNCHER); "": pipeline.env's, else torchrun
    )
    secrets: list[str] = Field(default_factory=list)
    retry: Retry = Field(default_factory=Retry)


class SecretRef(_Model):
    name: str = ""
    env: dict[str, str] = Field(default_factory=dict)  # ENV_VAR -> key in the Secret
    optional: bool = False


class ModelCache(_Model):
    create: bool = True
    claimName: str = ""
    mountPath: str = "/cache"
    storageClassName: str = ""
    accessModes: list[str] = Field(default_factory=lambda: ["ReadWriteMany"])
    size: str = "100Gi"


class SecurityContext(_Model):
    runAsUser: int | None = None
    runAsGroup: int | None = None
    runAsNonRoot: bool | None = None


class TrainJobValues(_Model):
    runtime: str = "torch-distributed"  # the ClusterTrainingRuntime of the multi-node steps
    launcherResources: Resources = Field(default_factory=Resources)  # of the task that follows the TrainJob
    pollSeconds: int = Field(default=10, ge=1)
    maxRestarts: int = Field(default=0, ge=0, le=100)  # > 0: the chart's TrainingRuntime elasticRuntime
    elasticRuntime: str = "ctrl-torch-elastic"

    def runtime_ref(self) -> tuple[str, str]:
        """(kind, name) of the runtime the TrainJobs reference: the chart's restarting TrainingRuntime when
        ``maxRestarts`` > 0 (templates/trainingruntime.yaml), else the ClusterTrainingRuntime ``runtime``."""
        if self.maxRestarts > 0:
            return "TrainingRuntime", self.elasticRuntime
        return "ClusterTrainingRuntime", self.runtime


class PipelineValues(_Model):
    steps: dict[str, StepPlacement]
    trainJob: TrainJobValues = Field(default_factory=TrainJobValues)
    env: dict[str, str] = Field(default_factory=dict)
    securityContext: SecurityContext | None = None


@dataclass(frozen=True)
class StepSettings:
    """What :func:`apply` sets on one task (resolved and checked)."""

    step: str
    pool: str
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    accelerator_type: str
    gpus: int
    cpu_request: str | None
    cpu_limit: str | None
    memory_request: str | None
    memory_limit: str | None
    shm_size: str
    cache_claim: str
    cache_mount: str
    secrets: list[SecretRef]
    env: dict[str, str]
    retry: Retry
    nodes: int = 1
    #: for nodes > 1: the TrainJob (without name and command) its launcher creates, and the launcher's resources
    trainjob: dict | None = None
    launcher_resources: Resources | None = None
    poll_seconds: int = 10


@dataclass(frozen=True)
class Placement:
    """The cluster settings of one compile: image, service account and every step's placement."""

    image: str
    service_account: str
    steps: dict[str, StepSettings]
    security_context: SecurityContext | None

    def gpus(self, step: str) -> int:
        return self.steps[step].gpus


# --- values: load, merge, check -----------------------------------------------------------------------


def deep_merge(base: dict, override: dict) -> dict:
    """Helm's merge of values files: maps merge recursively, anything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_chart_dir() -> Path:
    return Path(os.environ.get(CHART_ENV) or DEFAULT_CHART)


def load_values(chart_dir: str | Path | None = None, value_files: tuple[str, ...] | list[str] = ()) -> dict:
    """The chart's values.yaml merged with ``value_files`` (later wins) and checked against its schema."""
    chart = Path(chart_dir) if chart_dir else default_chart_dir()
    base_file, schema_file = chart / "values.yaml", chart / "values.schema.json"
    if not base_file.is_file() or not schema_file.is_file():
        raise PlacementError(
            f"{chart}: not the ctrl-pipeline chart (needs values.yaml and values.schema.json); "
            f"pass --chart or set {CHART_ENV}"
        )
    values = _read_yaml(base_file)
    for f in value_files:
        values = deep_merge(values, _read_yaml(Path(f)))
    check_schema(
        values,
        json.loads(schema_file.read_text()),
        source=", ".join([str(base_file), *map(str, value_files)]),
    )
    return values


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise PlacementError(f"values file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PlacementError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise PlacementError(f"{path}: values must be a mapping")
    return data


def check_schema(values: dict, schema: dict, source: str = "values") -> None:
    """Validate against values.schema.json (what ``helm install`` does); every violation names its key."""
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(values), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [
            f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            # a rule across keys (the schema's allOf) says why in its description
            + (
                f" ({e.schema['description']})"
                if e.validator == "contains" and "description" in e.schema
                else ""
            )
            for e in errors
        ]
        raise PlacementError(f"values do not match the chart's schema ({source}):\n  " + "\n  ".join(lines))


def image_reference(values: dict) -> str:
    img = values.get("image") or {}
    repo = img.get("repository", "")
    if not repo:
        raise PlacementError("image.repository: must name the project image")
    if img.get("digest"):
        return f"{repo}@{img['digest']}"
    if not img.get("tag"):
        raise PlacementError("image.tag: set a tag or image.digest (never an implicit :latest)")
    return f"{repo}:{img['tag']}"


def _pool_settings(
    name: str,
    sp: StepPlacement,
    pools: dict[str, NodePool],
    secrets: dict[str, SecretRef],
    cache: ModelCache,
    env: dict[str, str],
) -> StepSettings:
    key = f"pipeline.steps.{name}"
    if sp.pool not in pools:
        raise PlacementError(
            f"{key}.pool: node pool {sp.pool!r} is not defined in nodePools "
            f"(defined: {sorted(pools) or 'none'}); refusing to compile a step without a placement"
        )
    pool = pools[sp.pool]
    gpu_pool = pool.gpu.count > 0
    if gpu_pool and not pool.gpu.type:
        raise PlacementError(
            f"nodePools.{sp.pool}.gpu.type: a pool with GPUs must name the resource (nvidia.com/gpu)"
        )
    if gpu_pool and sp.gpus < 1:
        raise PlacementError(
            f"{key}.gpus: zero GPUs for a step on GPU pool {sp.pool!r}; request at least 1 "
            "(a container without a GPU request on a GPU node sees every GPU of the node) "
            "or place the step on a CPU pool"
        )
    if not gpu_pool and sp.gpus > 0:
        raise PlacementError(
            f"{key}.gpus: {sp.gpus} GPUs requested on pool {sp.pool!r}, which has none "
            f"(nodePools.{sp.pool}.gpu.count is 0)"
        )
    if sp.gpus > pool.gpu.count:
        raise PlacementError(
            f"{key}.gpus: {sp.gpus} GPUs, but a node of pool {sp.pool!r} has "
            f"{pool.gpu.count}; the pod would never schedule"
        )
    refs = []
    for ref in sp.secrets:
        if ref not in secrets:
            raise PlacementError(
                f"{key}.secrets: {ref!r} is not defined under secrets (defined: {sorted(secrets)})"
            )
        s = secrets[ref]
        if not s.name.strip():
            raise PlacementError(
                f"secrets.{ref}.name: missing Secret name (used by step {name}); name the existing "
                "Kubernetes Secret, or drop the reference from the step"
            )
        if not s.env:
            raise PlacementError(
                f"secrets.{ref}.env: map at least one environment variable to a key of Secret {s.name!r}"
            )
        if len(set(s.env.values())) < len(s.env):
            raise PlacementError(
                f"secrets.{ref}.env: each key of Secret {s.name!r} can feed one variable only"
            )
        refs.append(s)
    if sp.cache and not cache.claimName.strip():
        raise PlacementError(f"modelCache.claimName: missing PVC name (step {name} mounts the model cache)")
    if sp.nodes > 1:
        if name not in MULTI_NODE_STEPS:
            raise PlacementError(
                f"{key}.nodes: {sp.nodes} nodes, but only the data-parallel steps "
                f"{sorted(MULTI_NODE_STEPS)} run on several nodes"
            )
        if not sp.cache:
            raise PlacementError(
                f"{key}.cache: a step on {sp.nodes} nodes shares its folders through the cache PVC; set cache: true"
            )
        if "ReadWriteMany" not in cache.accessModes:
            raise PlacementError(
                f"modelCache.accessModes: {sp.nodes} nodes of step {name} ({key}.nodes) share its folders "
                f"through the cache PVC, which must be ReadWriteMany (it is {cache.accessModes})"
            )
    res = sp.resources or pool.resources
    step_env = dict(env)
    step_env[NUM_PROCESSES_ENV] = str(max(sp.gpus, 1))
    if sp.launcher:
        step_env[LAUNCHER_ENV] = sp.launcher
    # checked here, else the pod fails after its GPUs were scheduled ("" is unset, as `ctrl step` reads it)
    if (step_env.get(LAUNCHER_ENV) or "torchrun") not in LAUNCHERS:
        where = f"{key}.launcher" if sp.launcher else f"pipeline.env.{LAUNCHER_ENV}"
        raise PlacementError(
            f"{where}: {step_env[LAUNCHER_ENV]!r} is not a launcher; choose one of {LAUNCHERS}"
        )
    if sp.cache:
        step_env.setdefault("HF_HOME", f"{cache.mountPath.rstrip('/')}/huggingface")
        step_env.setdefault("CTRL_CHECKPOINT_ROOT", f"{cache.mountPath.rstrip('/')}/checkpoints")
    return StepSettings(
        step=name,
        pool=sp.pool,
        node_selector=dict(pool.nodeSelector),
        tolerations=[t.model_dump(exclude_none=True) for t in pool.tolerations],
        accelerator_type=pool.gpu.type if sp.gpus else "",
        gpus=sp.gpus,
        cpu_request=res.requests.cpu,
        cpu_limit=res.limits.cpu,
        memory_request=res.requests.memory,
        memory_limit=res.limits.memory,
        shm_size=sp.shmSize,
        cache_claim=cache.claimName if sp.cache else "",
        cache_mount=cache.mountPath,
        secrets=refs,
        env=step_env,
        retry=sp.retry,
        nodes=sp.nodes,
    )


def from_values(values: dict, image: str | None = None) -> Placement:
    """Resolve and check every step's placement from merged chart values (see :func:`load_values`)."""
    try:
        pools = {k: NodePool.model_validate(v) for k, v in (values.get("nodePools") or {}).items()}
        secrets = {k: SecretRef.model_validate(v) for k, v in (values.get("secrets") or {}).items()}
        cache = ModelCache.model_validate(values.get("modelCache") or {})
        pipe = PipelineValues.model_validate(values.get("pipeline") or {})
    except ValidationError as err:
        raise PlacementError(
            "invalid values:\n  "
            + "\n  ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        ) from None
    missing = [s for s in STEPS if s not in pipe.steps]
    unknown = [s for s in pipe.steps if s not in STEPS]
    if missing or unknown:
        raise PlacementError(
            f"pipeline.steps: every step needs a placement (missing: {missing}, unknown: {unknown})"
        )
    env = dict(pipe.env)
    mlflow = values.get("mlflow") or {}
    if mlflow.get("enabled") and "MLFLOW_TRACKING_URI" not in env:
        env["MLFLOW_TRACKING_URI"] = (
            f"http://{mlflow.get('name', 'ctrl-mlflow')}:{(mlflow.get('service') or {}).get('port', 5000)}"
        )
    steps = {name: _pool_settings(name, pipe.steps[name], pools, secrets, cache, env) for name in STEPS}
    image = image or image_reference(values)
    for name, s in steps.items():
        if s.nodes > 1:
            steps[name] = _with_trainjob(s, image, pipe)
    sa = (values.get("serviceAccount") or {}).get("name", "")
    return Placement(
        image=image,
        service_account=sa,
        steps=steps,
        security_context=pipe.securityContext,
    )


def _with_trainjob(s: StepSettings, image: str, pipe: PipelineValues) -> StepSettings:
    """``s`` with the TrainJob that runs it on ``s.nodes`` nodes (validated by the Trainer API's models)."""
    import dataclasses

    sc = pipe.securityContext
    doc = trainjob.template(
        step=MULTI_NODE_STEPS[s.step],
        image=image,
        runtime=pipe.trainJob.runtime_ref(),
        nodes=s.nodes,
        gpus=s.gpus,
        accelerator=s.accelerator_type,
        requests={"cpu": s.cpu_request, "memory": s.memory_request},
        limits={"cpu": s.cpu_limit, "memory": s.memory_limit},
        node_selector=s.node_selector,
        tolerations=s.tolerations,
        shm_size=s.shm_size,
        cache_claim=s.cache_claim,
        cache_mount=s.cache_mount,
        # under torchrun each process is one rank: `ctrl step` runs the step itself, launching nothing
        env={**s.env, NUM_PROCESSES_ENV: "1"},
        secret_env=[(var, ref.name, key, ref.optional) for ref in s.secrets for var, key in ref.env.items()],
        security_context=sc.model_dump(exclude_none=True) if sc is not None else None,
    )
    return dataclasses.replace(
        s,
        trainjob=doc,
        launcher_resources=pipe.trainJob.launcherResources,
        poll_seconds=pipe.trainJob.pollSeconds,
    )


def load(
    chart_dir: str | Path | None = None,
    value_files: tuple[str, ...] | list[str] = (),
    image: str | None = None,
) -> Placement:
    """``ctrl compile --chart DIR -f FILE --image REF``: merged, schema-checked values -> :class:`Placement`."""
    return from_values(load_values(chart_dir, value_files), image)


# --- applying it to a KFP task --------------------------------------------------------------------------


def apply(task, step: str, placement: Placement | None = None, image: str | None = None):
    """Set ``step``'s caching and, when ``placement`` is given, everything of its cluster placement on ``task``;
    ``image`` (else the placement's) replaces the component's ``base_image``."""
    if step not in STEPS:
        raise PlacementError(f"unknown step {step!r}; steps: {list(STEPS)}")
    task.set_caching_options(not STEPS[step])
    image = image or (placement.image if placement else None)
    if image:
        task.container_spec.image = image  # what base_image sets, chosen at compile time
    if placement is None:
        return task
    from kfp import kubernetes

    s = placement.steps[step]
    if s.nodes > 1:
        return _apply_launcher(task, s, placement)
    if s.cpu_request:
        task.set_cpu_request(s.cpu_request)
    if s.cpu_limit:
        task.set_cpu_limit(s.cpu_limit)
    if s.memory_request:
        task.set_memory_request(s.memory_request)
    if s.memory_limit:
        task.set_memory_limit(s.memory_limit)
    if s.gpus:
        task.set_accelerator_type(s.accelerator_type)
        task.set_accelerator_limit(s.gpus)
    for label, value in s.node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for t in s.tolerations:
        kubernetes.add_toleration(
            task,
            key=t.get("key"),
            operator=t.get("operator"),
            value=t.get("value"),
            effect=t.get("effect"),
            toleration_seconds=t.get("tolerationSeconds"),
        )
    if s.shm_size:
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=s.shm_size
        )
    if s.cache_claim:
        kubernetes.mount_pvc(task, pvc_name=s.cache_claim, mount_path=s.cache_mount)
    for ref in s.secrets:
        kubernetes.use_secret_as_env(
            task,
            secret_name=ref.name,
            secret_key_to_env={k: e for e, k in ref.env.items()},
            optional=ref.optional,
        )
    for name, value in s.env.items():
        task.set_env_variable(name, value)
    _set_retry_and_security_context(task, s.retry, placement.security_context)
    return task


def _apply_launcher(task, s: StepSettings, placement: Placement):
    """A multi-node step's task: the launcher of its TrainJob (components/trainjob.py). It needs no GPU and no
    Secret, only the cache PVC (it copies the step's inputs and outputs through it), its pod's identity (the
    TrainJob's namespace and owner) and the TrainJob's template."""
    from kfp import kubernetes

    res = s.launcher_resources or Resources()
    for setter, amount in (
        (task.set_cpu_request, res.requests.cpu),
        (task.set_cpu_limit, res.limits.cpu),
        (task.set_memory_request, res.requests.memory),
        (task.set_memory_limit, res.limits.memory),
    ):
        if amount:
            setter(amount)
    kubernetes.mount_pvc(task, pvc_name=s.cache_claim, mount_path=s.cache_mount)
    for env, field_path in (
        (trainjob.NAMESPACE_ENV, "metadata.namespace"),
        (trainjob.POD_NAME_ENV, "metadata.name"),
        (trainjob.POD_UID_ENV, "metadata.uid"),
    ):
        kubernetes.use_field_path_as_env(task, env_name=env, field_path=field_path)
    task.set_env_variable(trainjob.TRAINJOB_ENV, json.dumps(s.trainjob, sort_keys=True))
    task.set_env_variable(trainjob.WORKDIR_ENV, f"{s.cache_mount.rstrip('/')}/trainjobs")
    task.set_env_variable(trainjob.POLL_ENV, str(s.poll_seconds))
    # a retried launcher starts a new TrainJob, which resumes from the step's checkpoints
    _set_retry_and_security_context(task, s.retry, placement.security_context)
    return task


def _set_retry_and_security_context(task, retry: Retry, sc: SecurityContext | None) -> None:
    from kfp import kubernetes

    if retry.count:
        task.set_retry(
            num_retries=retry.count,
            backoff_duration=retry.backoff,
            backoff_factor=retry.factor,
            backoff_max_duration=retry.maxDuration,
        )
    if sc is not None and any(v is not None for v in (sc.runAsUser, sc.runAsGroup, sc.runAsNonRoot)):
        kubernetes.set_security_context(
            task, run_as_user=sc.runAsUser, run_as_group=sc.runAsGroup, run_as_non_root=sc.runAsNonRoot
        )

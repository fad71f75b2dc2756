"""A pipeline step on several nodes: its KFP task is a thin launcher of a Kubeflow Trainer TrainJob.

A step placed with ``nodes: N`` (charts/ctrl-pipeline values, pipelines/placement.py) compiles to a light task
(components/trainjob_launcher) that runs the step as a ``trainer.kubeflow.org/v1alpha1`` TrainJob on the
``torch-distributed`` ClusterTrainingRuntime, N nodes × ``gpus`` processes:

1. the TrainJob's template is built at compile time from the step's placement (:func:`template`: image, number
   of nodes and processes per node, the resources of one node, its node selector and tolerations, /dev/shm,
   the cache PVC, the environment and Secret-backed variables) and reaches the task as ``$CTRL_TRAINJOB``;
2. the task copies its input artifacts (checkpoint, value net) into a work folder on the cache PVC, which the
   nodes mount at the same path (ReadWriteMany), and writes the parameters there;
3. it creates the TrainJob with the command ``torchrun --no-python ctrl step NAME --params ... --checkpoint ...``
   on those folders: the runtime sets PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK / PET_MASTER_ADDR /
   PET_MASTER_PORT, which torchrun reads, and ``ctrl step`` under torchrun (RANK / WORLD_SIZE set) runs the
   step itself; rank 0 writes the outputs and the checkpoints (``CTRL_CHECKPOINT_ROOT``, also on the PVC);
4. it follows the TrainJob until its ``Complete`` or ``Failed`` condition, printing rank 0's log (the pod of
   the JobSet's ``node`` job with completion index 0) as it comes;
5. complete: it copies the output folder into the task's output artifact and returns the step's result, as
   ``ctrl_core.launch.run_step_data_parallel`` does on one node; failed: it raises :class:`TrainJobFailed`
   with the condition's reason and message.

The TrainJob is deleted whenever the launcher stops following it — completed, cancelled (SIGTERM/SIGINT, what
a cancelled KFP run's pod gets) or on any launcher-side error — except when it Failed: a failed TrainJob holds
no GPUs (its pods have ended) and is kept for ``kubectl describe``. Every TrainJob names the launcher's pod as
its owner, so Kubernetes garbage-collects it with that pod in any case. The work folder on the PVC is removed
at the end; resumable checkpoints live under ``CTRL_CHECKPOINT_ROOT``, so a retried task's new TrainJob
resumes where the last one stopped.

Standard library only at module level: the Trainer API's published models (``kubeflow-trainer-api``) and the
Kubernetes client are imported by the functions that use them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

#: the TrainJob template (JSON) the placement compiles for a multi-node step
TRAINJOB_ENV = "CTRL_TRAINJOB"
#: the folder on the cache PVC that holds the TrainJobs' work folders (same path in the launcher and the nodes)
WORKDIR_ENV = "CTRL_TRAINJOB_WORKDIR"
#: the launcher pod's namespace, name and uid (downward API): where the TrainJob goes and who owns it
NAMESPACE_ENV, POD_NAME_ENV, POD_UID_ENV = "CTRL_POD_NAMESPACE", "CTRL_POD_NAME", "CTRL_POD_UID"
#: seconds between two reads of the TrainJob's status
POLL_ENV = "CTRL_TRAINJOB_POLL_S"

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
#: the torch runtimes' replicated job and container that run the trainer
NODE = "node"
#: the owner of this project's entry in spec.runtimePatches
PATCH_MANAGER = "ctrl-pipeline.io/launcher"
#: labels JobSet and the Job controller put on every pod: which JobSet (named as the TrainJob), which replicated
#: job, which completion index (the node rank)
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
STEP_LABEL = "ctrl-pipeline.io/step"
#: torchrun reads these (set by the Torch plugin); a TrainJob's env must not set them (the webhook refuses it)
TORCHRUN_RESERVED = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)
#: the steps that run on several nodes (data-parallel) and the ``ctrl step`` option naming their output folder
MULTI_NODE_STEPS = {"pretrain_value": "--value", "optimize": "--optimize-dir"}


class TrainJobFailed(RuntimeError):
    """The TrainJob ended with its Failed condition; the message carries its reason and message."""


class Cancelled(BaseException):
    """The launcher was told to stop (SIGTERM / SIGINT): a BaseException, so no ``except Exception`` eats it."""


# --- the TrainJob, from the Trainer API's published models ----------------------------------------------


def template(
    *,
    step: str,
    image: str,
    runtime: str | tuple[str, str],
    nodes: int,
    gpus: int,
    accelerator: str,
    requests: dict[str, str],
    limits: dict[str, str],
    node_selector: dict[str, str],
    tolerations: list[dict[str, Any]],
    shm_size: str,
    cache_claim: str,
    cache_mount: str,
    env: dict[str, str],
    secret_env: list[tuple[str, str, str, bool]],
    security_context: dict[str, Any] | None = None,
) -> dict:
    """The TrainJob of a multi-node ``step`` without its name and command (what :func:`trainjob` adds at run
    time), as the API's JSON. ``requests`` / ``limits``: one node's cpu and memory (the GPUs are added);
    ``secret_env``: (variable, Secret, key, optional). Built from the published models, so a field the API
    does not have or a value of the wrong type fails here, at compile time."""
    from kubeflow_trainer_api import models as m

    if step not in MULTI_NODE_STEPS:
        raise ValueError(f"{step}: only {sorted(MULTI_NODE_STEPS)} run on several nodes")
    # runtime: a ClusterTrainingRuntime's name, or (kind, name): the chart's restarting TrainingRuntime
    runtime_kind, runtime_name = (
        runtime if isinstance(runtime, tuple) else ("ClusterTrainingRuntime", runtime)
    )
    reserved = sorted(set(env) & set(TORCHRUN_RESERVED))
    if reserved:
        raise ValueError(f"{reserved}: set by the Trainer's torch runtime for torchrun; not a step's env")

    def quantities(amounts: dict[str, str]) -> dict:
        return {k: m.IoK8sApimachineryPkgApiResourceQuantity(str(v)) for k, v in amounts.items() if v}

    gpu = {accelerator: str(gpus)} if gpus else {}
    env_vars = [m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in env.items()]
    env_vars += [
        m.IoK8sApiCoreV1EnvVar(
            name=var,
            value_from=m.IoK8sApiCoreV1EnvVarSource(
                secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(name=secret, key=key, optional=optional)
            ),
        )
        for var, secret, key, optional in secret_env
    ]
    volumes, mounts = [], []
    if shm_size:  # NCCL's shared memory between the processes of a node
        volumes.append(
            m.IoK8sApiCoreV1Volume(
                name="dshm",
                empty_dir=m.IoK8sApiCoreV1EmptyDirVolumeSource(
                    medium="Memory", size_limit=m.IoK8sApimachineryPkgApiResourceQuantity(shm_size)
                ),
            )
        )
        mounts.append(m.IoK8sApiCoreV1VolumeMount(name="dshm", mount_path="/dev/shm"))
    volumes.append(
        m.IoK8sApiCoreV1Volume(
            name="cache",
            persistent_volume_claim=m.IoK8sApiCoreV1PersistentVolumeClaimVolumeSource(claim_name=cache_claim),
        )
    )
    mounts.append(m.IoK8sApiCoreV1VolumeMount(name="cache", mount_path=cache_mount))
    pod = m.TrainerV1alpha1PodSpecPatch(
        node_selector=dict(node_selector) or None,
        tolerations=[m.IoK8sApiCoreV1Toleration.from_dict(t) for t in tolerations] or None,
        volumes=volumes,
        containers=[m.TrainerV1alpha1ContainerPatch(name=NODE, volume_mounts=mounts)],
        security_context=m.IoK8sApiCoreV1PodSecurityContext.from_dict(security_context)
        if security_context
        else None,
    )
    patch = m.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(
                spec=m.TrainerV1alpha1JobSetSpecPatch(
                    replicated_jobs=[
                        m.TrainerV1alpha1ReplicatedJobPatch(
                            name=NODE,
                            template=m.TrainerV1alpha1JobTemplatePatch(
                                spec=m.TrainerV1alpha1JobSpecPatch(
                                    template=m.TrainerV1alpha1PodTemplatePatch(spec=pod)
                                )
                            ),
                        )
                    ]
                )
            )
        ),
    )
    job = m.TrainerV1alpha1TrainJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            labels={"app.kubernetes.io/part-of": "ctrl-pipeline", STEP_LABEL: step.replace("_", "-")}
        ),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtime_ref=m.TrainerV1alpha1RuntimeRef(api_group=GROUP, kind=runtime_kind, name=runtime_name),
            trainer=m.TrainerV1alpha1Trainer(
                image=image,
                num_nodes=nodes,
                num_proc_per_node=max(gpus, 1),
                resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(
                    requests=quantities({**requests, **gpu}) or None,
                    limits=quantities({**limits, **gpu}) or None,
                ),
                env=env_vars or None,
            ),
            runtime_patches=[patch],
        ),
    )
    return job.to_dict()


def validated(document: dict) -> dict:
    """``document`` read through the published models and written back: the same document, or a ValueError
    naming what differs (the models drop a field they do not know, and refuse a value of the wrong type)."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    again = TrainerV1alpha1TrainJob.from_dict(document).to_dict()
    if again != document:
        raise ValueError(f"not a {API_VERSION} TrainJob: {_first_difference(document, again)}")
    return again


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a.keys() | b.keys():
            if k not in b:
                return f"{path}{k}: not a field of the API"
            if k not in a or a[k] != b[k]:
                return _first_difference(a.get(k), b[k], f"{path}{k}.")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}{i}.")
    return f"{path.rstrip('.')}: {a!r} read back as {b!r}"


def command(step: str, work: Path, with_value: bool) -> list[str]:
    """``ctrl step`` on the work folder's inputs and output, under torchrun (which reads the runtime's PET_*
    variables: nodes, processes per node, this node's rank, the master's address and port)."""
    out = work / "out"
    argv = ["torchrun", "--no-python", "ctrl", "step", step, "--params", str(work / "params.yaml")]
    argv += ["--checkpoint", str(work / "checkpoint")]
    if step == "pretrain_value":
        argv += ["--value", str(out)]
    else:
        argv += ["--value", str(work / "value") if with_value else "", "--optimize-dir", str(out)]
    return argv


def trainjob(
    template_doc: dict, name: str, namespace: str, argv: list[str], owner: dict[str, str] | None = None
) -> dict:
    """The template completed with the run's name, namespace, command and owner (the launcher pod)."""
    from kubeflow_trainer_api import models as m

    job = m.TrainerV1alpha1TrainJob.from_dict(validated(template_doc))
    job.metadata.name = name
    job.metadata.namespace = namespace
    if owner:  # garbage-collected with the launcher pod; no blockOwnerDeletion (it needs more RBAC)
        job.metadata.owner_references = [
            m.IoK8sApimachineryPkgApisMetaV1OwnerReference(
                api_version="v1", kind="Pod", name=owner["name"], uid=owner["uid"]
            )
        ]
    job.spec.trainer.command = argv
    return validated(job.to_dict())


def job_name(step: str) -> str:
    """A fresh RFC 1035 name (the CRD's rule; at most 63 characters): ``ctrl-<step>-<8 hex>``."""
    return f"ctrl-{step.replace('_', '-')}-{uuid.uuid4().hex[:8]}"


def terminal_condition(job: dict) -> dict | None:
    """The TrainJob's true ``Complete`` or ``Failed`` condition (JobSet's, renamed by the Trainer), else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond
    return None


# --- the launcher ----------------------------------------------------------------------------------------


def api_client():
    """In a pod: its ServiceAccount's credentials; elsewhere: the kubeconfig (``$KUBECONFIG``)."""
    from kubernetes import config
    from kubernetes.client import ApiClient

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return ApiClient()


def _namespace() -> str:
    ns = os.environ.get(NAMESPACE_ENV)
    sa_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if not ns and sa_file.is_file():
        ns = sa_file.read_text().strip()
    if not ns:
        raise RuntimeError(f"no namespace for the TrainJob: set {NAMESPACE_ENV}")
    return ns


class _LogFollower:
    """Prints the log of rank 0's pod as it comes (one thread per pod: a restarted JobSet makes new pods)."""

    def __init__(self, core, namespace: str, name: str, out) -> None:
        self.core, self.namespace, self.out = core, namespace, out
        self.selector = f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={NODE},{COMPLETION_INDEX_LABEL}=0"
        self.followed: set[str] = set()
        self.threads: list[threading.Thread] = []

    def poll(self) -> None:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
        for pod in pods:
            started = pod.status is not None and pod.status.phase in ("Running", "Succeeded", "Failed")
            if started and pod.metadata.name not in self.followed:
                self.followed.add(pod.metadata.name)
                t = threading.Thread(target=self._follow, args=(pod.metadata.name,), daemon=True)
                t.start()
                self.threads.append(t)

    def _follow(self, pod: str) -> None:
        try:
            print(f"--- rank 0: pod {pod} ---", file=self.out, flush=True)
            resp = self.core.read_namespaced_pod_log(
                pod, self.namespace, container=NODE, follow=True, _preload_content=False
            )
            for chunk in resp.stream(4096):
                self.out.write(chunk.decode("utf-8", "replace"))
                self.out.flush()
        except Exception as err:  # noqa: BLE001 - a lost log stream never fails the step
            print(f"(log of {pod} interrupted: {err})", file=self.out, flush=True)

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)


def run_step(
    step: str,
    params_json: str,
    checkpoint: str,
    out_dir: str,
    value_dir: str | None = None,
    *,
    template_doc: dict | None = None,
    workdir: str | None = None,
    client=None,
    poll_s: float | None = None,
    out=None,
) -> dict:
    """Run ``ctrl step STEP`` as a TrainJob on several nodes and return the step's result, as
    ``run_step_data_parallel`` does on one node. ``template_doc`` / ``workdir`` default to ``$CTRL_TRAINJOB`` /
    ``$CTRL_TRAINJOB_WORKDIR`` (the compiled placement); ``client``: a ``kubernetes.client.ApiClient``
    (default: :func:`api_client`)."""
    import yaml
    from kubernetes.client import CoreV1Api, CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    from ctrl_core.launch import check_split
    from ctrl_core.params import from_json

    out = out or sys.stdout
    doc = template_doc if template_doc is not None else json.loads(os.environ[TRAINJOB_ENV])
    trainer = doc["spec"]["trainer"]
    world = trainer["numNodes"] * trainer["numProcPerNode"]
    check_split(from_json(params_json), step, world)  # refused before anything is created
    poll_s = poll_s if poll_s is not None else float(os.environ.get(POLL_ENV, "10"))
    client = client or api_client()
    custom, core = CustomObjectsApi(client), CoreV1Api(client)
    namespace, name = _namespace(), job_name(step)
    work = Path(workdir or os.environ[WORKDIR_ENV]) / name

    # inputs onto the shared PVC, where every node reads them
    shutil.copytree(checkpoint, work / "checkpoint")
    if value_dir:
        shutil.copytree(value_dir, work / "value")
    (work / "out").mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(json.loads(params_json)))
    owner = (
        {"name": os.environ[POD_NAME_ENV], "uid": os.environ[POD_UID_ENV]}
        if os.environ.get(POD_UID_ENV)
        else None
    )
    body = trainjob(doc, name, namespace, command(step, work, value_dir is not None), owner)

    def cancel(signum, _frame):
        raise Cancelled(f"signal {signal.Signals(signum).name}")

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, cancel) for s in (signal.SIGTERM, signal.SIGINT)}
    created = failed = False
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        created = True
        print(
            f"TrainJob {namespace}/{name}: {trainer['numNodes']} nodes × {trainer['numProcPerNode']} "
            f"processes, runtime {doc['spec']['runtimeRef']['name']}",
            file=out,
            flush=True,
        )
        logs = _LogFollower(core, namespace, name, out)
        while True:
            job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            logs.poll()
            cond = terminal_condition(job)
            if cond is not None:
                break
            time.sleep(poll_s)
        logs.join(timeout=30)
        if cond["type"] == "Failed":
            failed = True
            raise TrainJobFailed(
                f"TrainJob {namespace}/{name} failed: {cond.get('reason', '')}: {cond.get('message', '')} "
                f"(kept for `kubectl describe trainjob {name} -n {namespace}`)"
            )
        print(f"TrainJob {namespace}/{name} complete", file=out, flush=True)
        shutil.copytree(work / "out", out_dir, dirs_exist_ok=True)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if created and not failed:
            try:
                custom.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground"
                )
            except ApiException as err:
                if err.status != 404:
                    print(f"could not delete TrainJob {name}: {err.reason}", file=sys.stderr, flush=True)
        shutil.rmtree(work, ignore_errors=True)
    if step == "pretrain_value":
        return json.loads((Path(out_dir) / "link.json").read_text())
    return json.loads((Path(out_dir) / "metrics.json").read_text())["summary"]

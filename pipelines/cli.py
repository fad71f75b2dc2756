"""The ``ctrl`` command: run the DAG locally, compile, submit/schedule on Kubeflow Pipelines, promote models.

\b
    ctrl run [--params params.yaml] [--set block.key=value ...] [--summary-out PATH]
    ctrl params [--markdown]          (every parameter: key, type, default, description)
    ctrl compile --out pipeline.yaml [--chart DIR] [-f values.yaml] [--image REF] [--no-placement]
    ctrl submit --host URL [-f values.yaml]     (upload as a version named by the git SHA, then start a run)
    ctrl schedule --host URL --cron "0 3 * * 1" (a KFP recurring run: max concurrency 1, no catch-up)
    ctrl sweep --set optimize.beta=[0.003,0.01] --set run.seed=[0,1] (--local | --out FILE | --host URL)
    ctrl promote NAME VERSION [--force --reason TEXT]
    ctrl step NAME ...                (one step, for dvc.yaml)
    ctrl export --fused OUT [--checkpoint DIR --adapter DIR | --run outputs/RUN_ID]  (LoRA merged, for diffusers)

compile, submit and schedule place every step on its node pool from the Helm chart's values ($CTRL_CHART, which
the image sets, else the repository's charts/ctrl-pipeline); --no-placement compiles a generic pipeline.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import click

from ctrl_core.launch import LAUNCHERS, LaunchError, check_split, launch_data_parallel, launcher_name
from ctrl_core.params import ParamsError, flatten, load

DEFAULT_PARAMS = "params.yaml"


def _default_params_path() -> str | None:
    return DEFAULT_PARAMS if Path(DEFAULT_PARAMS).is_file() else None


def _load_params(params_path: str | None, overrides: tuple[str, ...]):
    path = params_path if params_path is not None else _default_params_path()
    try:
        return load(path, overrides)
    except ParamsError as err:
        raise click.UsageError(str(err)) from None


def _default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path('mlflow.db').resolve()}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return uri


@click.group(help=__doc__)
def main() -> None:
    pass


@main.command("params")
@click.option("--markdown", is_flag=True, help="as a markdown table (docs/params.md)")
def params_cmd(markdown: bool) -> None:
    """Every run parameter of params.yaml: key, type, default and description (from ctrl_core/config.py)."""
    from ctrl_core.config import markdown_table, text_table

    click.echo(markdown_table() if markdown else text_table(), nl=False)


params_option = click.option(
    "--params",
    "params_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="params.yaml (default: ./params.yaml when present, else built-in defaults)",
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="BLOCK.KEY=VALUE", help="override a parameter (repeatable)"
)


@main.command()
@params_option
@set_option
@click.option(
    "--summary-out", type=click.Path(dir_okay=False), default=None, help="write the JSON summary here"
)
@click.option("--output-dir", type=click.Path(file_okay=False), default="outputs", show_default=True)
@click.option("--verbose", is_flag=True, help="print kfp.local's own stream instead of progress bars")
def run(params_path, overrides, summary_out, output_dir, verbose) -> None:
    """Run the whole DAG locally through kfp.local (no cluster, no GPU, no network)."""
    params = _load_params(params_path, overrides)  # validated before anything is written
    tracking_uri = _default_tracking_uri()
    from kfp import local

    from .console import RunConsole
    from .pipeline import build_pipeline
    from .register_step import git_sha

    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    root = Path(output_dir).resolve() / run_id
    root.mkdir(parents=True, exist_ok=True)
    click.echo(f"ctrl run {run_id}: outputs in {root}, MLflow at {tracking_uri}")
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"), raise_on_error=True
    )
    pipeline = build_pipeline(params, git_sha())
    t0 = time.perf_counter()
    live = None
    try:
        with RunConsole(root / "run.log", verbose=verbose):  # (MLflow's own log lines go to run.log too)
            live = _open_live_run(params, run_id)  # the MLflow run the steps report to while they run
            task = pipeline(**flatten(params))
    except BaseException:
        _close_live_run(live, "FAILED")
        raise
    outs = {
        k: json.loads(task.outputs[k]) for k in ("fetch", "value", "optimize", "evaluation", "registered")
    }
    summary = {
        "run_id": run_id,
        "outputs_dir": str(root),
        "mlflow": {"tracking_uri": tracking_uri, "run_id": outs["registered"]["run_id"]},
        "checkpoint": {
            "source": outs["fetch"]["manifest"]["source"],
            "sha256": outs["fetch"]["manifest"]["sha256"],
        },
        "link": {"chosen": outs["value"]["chosen"], "mse": outs["value"]["mse"]},
        "train": {
            k: outs["optimize"][k]
            for k in (
                "algorithm",
                "iterations",
                "first_reward",
                "final_reward",
                "final_kl",
                "seconds_per_iteration",
            )
        },
        "evaluation": outs["evaluation"]["evaluation"],
        "robustness_ratio": outs["evaluation"]["robustness_ratio"],
        "report": str(Path(outs["evaluation"]["artifacts_dir"]) / "report.html"),
        "registered": {
            k: outs["registered"][k]
            for k in ("name", "version", "aliases", "promoted", "gate_passed", "gate_reason", "created")
        },
        "wall_s": {
            "fetch_checkpoint": outs["fetch"]["wall_s"],
            "pretrain_value": outs["value"]["wall_s"],
            "ctrl_optimize": outs["optimize"]["wall_s"],
            "evaluate": outs["evaluation"]["wall_s"],
            "register": outs["registered"]["wall_s"],
            "total": round(time.perf_counter() - t0, 2),
        },
    }
    text = json.dumps(summary, indent=2)
    (root / "summary.json").write_text(text + "\n")
    if summary_out:
        Path(summary_out).parent.mkdir(parents=True, exist_ok=True)
        Path(summary_out).write_text(text + "\n")
    _print_summary(summary)
    click.echo(
        f"\nnext: mlflow ui --backend-store-uri {tracking_uri}   (run {summary['mlflow']['run_id']}: curves, "
        f"grids, model)\n      open {summary['report']}\n      log: {root / 'run.log'}"
    )


def _open_live_run(params, run_id: str) -> str | None:
    """Open the pipeline's MLflow run now and name it to the steps ($CTRL_MLFLOW_RUN_ID); None when live
    tracking is off (components/tracking.py)."""
    from components import tracking

    os.environ.pop(tracking.RUN_ID_ENV, None)  # a run of our own, not an outer one's
    if not tracking.enabled():
        return None
    name = f"{params.register.model_name}-{run_id}"
    live = tracking.create_run(tracking.client(), params, run_name=name, tags={"ctrl.local_run": run_id})
    os.environ[tracking.RUN_ID_ENV] = live
    return live


def _close_live_run(live: str | None, status: str) -> None:
    if live is None:
        return
    from components import tracking

    try:
        client = tracking.client()
        if client.get_run(live).info.status == "RUNNING":
            client.set_terminated(live, status=status)
    except Exception as err:  # the pipeline's own error matters more
        click.echo(f"(could not mark MLflow run {live} {status}: {err})", err=True)


def _print_summary(s: dict) -> None:
    click.echo(
        f"\nlink function: {s['link']['chosen']}  (validation MSE: "
        + ", ".join(f"{k} {v:.4g}" for k, v in s["link"]["mse"].items())
        + ")"
    )
    click.echo("       sampler steps      base     tuned      gain (95% CI)  KL exact  KL Thm3.1")
    for smp, cells in s["evaluation"].items():
        for n in sorted(cells, key=int):
            c = cells[n]
            exact = "—" if c.get("kl_exact") is None else f"{c['kl_exact']:.4f}"
            click.echo(
                f"{smp:>14} {n:>5} {c['base']:9.4f} {c['tuned']:9.4f} {c['gain']:+9.4f} ± {c['gain_ci']:.4f} "
                f"{exact:>9} {c.get('kl_thm31', c['kl']):10.4f}"
            )
    click.echo(
        "KL exact: the discrete chain's path KL (— for ode/heun: a deterministic sampler has none); KL Thm3.1: "
        "Theorem 3.1's running-reward sum (on ode/heun rows not a path KL)"
    )
    ratio = s["robustness_ratio"]
    click.echo(
        "robustness ratio: "
        + ("n/a (no gain at the training step count)" if ratio is None else f"{ratio:.3f}")
    )
    r = s["registered"]
    click.echo(f"registered {r['name']} v{r['version']} aliases={r['aliases']} ({r['gate_reason']})")
    click.echo(f"report: {s['report']}\nwall time: {s['wall_s']['total']:.0f}s")


# --- cluster: compile with placement, submit, schedule -------------------------------------------------

chart_option = click.option(
    "--chart",
    "chart_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="the Helm chart whose values place the steps on node pools (default: $CTRL_CHART, "
    "else the repository's charts/ctrl-pipeline)",
)
values_option = click.option(
    "-f",
    "--values",
    "value_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="chart values file merged over the chart's values.yaml, as `helm install -f` (repeatable)",
)
no_placement_option = click.option(
    "--no-placement",
    is_flag=True,
    help="a generic pipeline: no node pools, GPUs, tolerations or Secrets (as "
    "`ctrl run` uses); excludes --chart and -f",
)
image_option = click.option(
    "--image",
    default=None,
    help="image reference for every step (default: the values' "
    "image, else $CTRL_PIPELINE_IMAGE or components.image.DEFAULT_IMAGE)",
)


REPO_CHART = Path(__file__).resolve().parents[1] / "charts" / "ctrl-pipeline"


def _placement(
    chart_dir: str | None, value_files: tuple[str, ...], image: str | None, no_placement: bool = False
):
    """Compile-time cluster placement from the chart's values (``--chart``, else ``$CTRL_CHART``, else the
    repository's chart), or None with ``--no-placement`` (a generic pipeline, as ``ctrl run`` uses)."""
    from .placement import CHART_ENV, PlacementError, load

    if no_placement:
        if chart_dir is not None or value_files:
            raise click.UsageError(
                "--no-placement compiles a pipeline without the chart: drop --chart and -f"
            )
        return None
    try:
        return load(chart_dir or os.environ.get(CHART_ENV) or REPO_CHART, value_files, image)
    except PlacementError as err:
        raise click.UsageError(str(err)) from None


def _compile(out_file: str, params, placement, image: str | None, sha: str) -> str:
    from .pipeline import compile_pipeline

    return compile_pipeline(out_file, params, sha, placement=placement, image=image)


@main.command("compile")
@params_option
@set_option
@chart_option
@values_option
@no_placement_option
@image_option
@click.option("--out", "out_file", type=click.Path(dir_okay=False), required=True)
def compile_cmd(params_path, overrides, chart_dir, value_files, no_placement, image, out_file) -> None:
    """Compile the pipeline to KFP IR YAML (parameters default to the params file's values; every step is
    placed on its node pool from the chart's values unless --no-placement)."""
    from .register_step import git_sha

    params = _load_params(params_path, overrides)
    placement = _placement(chart_dir, value_files, image, no_placement)
    _compile(out_file, params, placement, image, git_sha())
    click.echo(out_file)


kfp_options = [
    click.option(
        "--host",
        envvar="KFP_HOST",
        required=True,
        help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline (env KFP_HOST)",
    ),
    click.option(
        "--token",
        envvar="KFP_TOKEN",
        default=None,
        show_envvar=True,
        help="bearer token for the KFP API (env KFP_TOKEN; in a pod: KF_PIPELINES_SA_TOKEN_PATH)",
    ),
    click.option("--namespace", default=None, help="KFP namespace (multi-user KFP: your profile namespace)"),
    click.option("--experiment", default="ctrl-pipeline", show_default=True),
    click.option(
        "--version-name",
        default=None,
        help="pipeline version name (default: the git SHA; $CTRL_GIT_SHA / $GITHUB_SHA outside a checkout)",
    ),
    click.option(
        "--service-account",
        default=None,
        help="Kubernetes ServiceAccount of the runs (default: the chart values' serviceAccount.name)",
    ),
]


def _kfp_options(f):
    for opt in reversed(kfp_options):
        f = opt(f)
    return f


def _kfp_options_but_host(f):  # ctrl sweep: --host is one of its modes, not required
    for opt in reversed(kfp_options[1:]):
        f = opt(f)
    return f


def _client(host: str, token: str | None = None, namespace: str | None = None):
    import kfp

    kwargs: dict = {}
    if token:
        kwargs["existing_token"] = token
    elif os.environ.get("KF_PIPELINES_SA_TOKEN_PATH"):  # a pod's projected ServiceAccount token
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(os.environ["KF_PIPELINES_SA_TOKEN_PATH"])
    if namespace:
        kwargs["namespace"] = namespace
    return kfp.Client(host=host, **kwargs)


def _source_sha() -> str:
    from .register_step import git_sha

    return git_sha("") or os.environ.get("CTRL_GIT_SHA", "") or os.environ.get("GITHUB_SHA", "")


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _upload(
    client, package: str, name: str, version: str, sha: str, description: str | None = None
) -> tuple[str, str, str]:
    """Upload the compiled package as pipeline ``name`` / version ``version``; returns (pipeline id, version id,
    version name). Idempotent: a version of that name holding the same package (its sha256 is in the version's
    description) is reused; a different package under the same git SHA (other values, --set defaults or a
    dirty tree) becomes version ``<sha>-<package digest>`` instead of silently reusing the old one."""
    import hashlib

    from .pipeline import PIPELINE_DESCRIPTION

    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()
    pid = client.get_pipeline_id(name)
    if pid is None:
        pid = client.upload_pipeline(
            package, pipeline_name=name, description=description or PIPELINE_DESCRIPTION
        ).pipeline_id
    for candidate in (version, f"{version}-{digest[:12]}"):
        found = (
            client.list_pipeline_versions(pid, page_size=10, filter=_name_filter(candidate)).pipeline_versions
            or []
        )
        if not found:
            v = client.upload_pipeline_version(
                package,
                pipeline_version_name=candidate,
                pipeline_id=pid,
                description=f"git {sha or 'unknown'}; package sha256:{digest}",
            )
            return pid, v.pipeline_version_id, candidate
        if f"sha256:{digest}" in (found[0].description or ""):
            return pid, found[0].pipeline_version_id, candidate
    raise click.ClickException(
        f"pipeline {name}: versions {version} and {version}-{digest[:12]} exist with other "
        "packages; pass --version-name"
    )


def _compile_and_upload(
    params, opts: dict, chart_dir, value_files, image, no_placement: bool, compile_fn=None, pipeline=None
):
    """Compile with these parameters as defaults (and the chart's placement) and upload it as the pipeline
    version named by the git SHA. Returns (client, pipeline id, version id, version name, service account).
    ``compile_fn(path, placement, sha)`` and ``pipeline`` (name, description) compile and name another pipeline
    than the DAG (``ctrl sweep``)."""
    import tempfile

    from .pipeline import PIPELINE_DESCRIPTION, PIPELINE_NAME

    name, description = pipeline or (PIPELINE_NAME, PIPELINE_DESCRIPTION)
    compile_fn = compile_fn or (lambda path, placement, sha: _compile(path, params, placement, image, sha))

    sha = _source_sha()
    version = opts["version_name"] or sha
    if not version:
        raise click.UsageError(
            "cannot name the pipeline version: not a git checkout and neither CTRL_GIT_SHA nor "
            "GITHUB_SHA is set; pass --version-name"
        )
    placement = _placement(chart_dir, value_files, image, no_placement)
    service_account = opts["service_account"] or (placement.service_account if placement else None) or None
    with tempfile.TemporaryDirectory() as d:
        package = compile_fn(str(Path(d) / "pipeline.yaml"), placement, sha)
        client = _client(opts["host"], opts["token"], opts["namespace"])
        pid, vid, vname = _upload(client, package, name, version, sha, description)
    return client, pid, vid, vname, service_account


@main.command()
@params_option
@set_option
@chart_option
@values_option
@no_placement_option
@image_option
@_kfp_options
@click.option("--run-name", default=None)
def submit(params_path, overrides, chart_dir, value_files, no_placement, image, run_name, **opts) -> None:
    """Upload the pipeline as a version named by the git SHA (it then appears in the KFP UI with every
    parameter, default and description) and start a run with these parameters."""
    from .pipeline import PIPELINE_NAME

    params = _load_params(params_path, overrides)
    client, pid, vid, vname, sa = _compile_and_upload(
        params, opts, chart_dir, value_files, image, no_placement
    )
    exp = client.create_experiment(opts["experiment"], namespace=opts["namespace"])
    run = client.run_pipeline(
        experiment_id=exp.experiment_id,
        job_name=run_name or f"{PIPELINE_NAME}-{vname[:12]}",
        pipeline_id=pid,
        version_id=vid,
        params=flatten(params),
        service_account=sa,
    )
    click.echo(
        json.dumps(
            {
                "pipeline_id": pid,
                "version_id": vid,
                "version": vname,
                "experiment_id": exp.experiment_id,
                "run_id": run.run_id,
            }
        )
    )


def kfp_cron(expr: str) -> str:
    """KFP's scheduler takes six fields (seconds first); a five-field crontab gets second 0."""
    fields = expr.split()
    if len(fields) == 5:
        return "0 " + " ".join(fields)
    if len(fields) == 6:
        return " ".join(fields)
    raise click.BadParameter(
        f"{expr!r}: expected a 5-field crontab or a 6-field KFP cron", param_hint="--cron"
    )


@main.command()
@params_option
@set_option
@chart_option
@values_option
@no_placement_option
@image_option
@_kfp_options
@click.option(
    "--cron", required=True, help="crontab, 5 fields ('0 3 * * 1', Mondays 03:00) or KFP's 6 (seconds first)"
)
@click.option("--name", "job_name", default="ctrl-retrain", show_default=True)
def schedule(
    params_path, overrides, chart_dir, value_files, no_placement, image, cron, job_name, **opts
) -> None:
    """Create (or replace, by name) a recurring run of the pipeline version at this git SHA: max concurrency
    1, no catch-up of missed intervals."""
    cron = kfp_cron(cron)
    params = _load_params(params_path, overrides)
    client, pid, vid, vname, sa = _compile_and_upload(
        params, opts, chart_dir, value_files, image, no_placement
    )
    exp = client.create_experiment(opts["experiment"], namespace=opts["namespace"])
    old = (
        client.list_recurring_runs(
            experiment_id=exp.experiment_id, page_size=100, filter=_name_filter(job_name)
        ).recurring_runs
        or []
    )
    rec = client.create_recurring_run(
        experiment_id=exp.experiment_id,
        job_name=job_name,
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        pipeline_id=pid,
        version_id=vid,
        params=flatten(params),
        enabled=True,
        service_account=sa,
        description=f"ctrl schedule: pipeline version {vname}",
    )
    for r in old:  # replace: one schedule per name, never two retrainings on overlapping schedules
        client.delete_recurring_run(r.recurring_run_id)
    click.echo(
        json.dumps(
            {
                "recurring_run_id": rec.recurring_run_id,
                "pipeline_id": pid,
                "version_id": vid,
                "version": vname,
                "cron": cron,
                "replaced": [r.recurring_run_id for r in old],
            }
        )
    )


# --- sweeps: one pipeline, one front, one registration -------------------------------------------------


def _sweep_parallelism(parallelism, chart_dir, value_files, no_placement: bool) -> int:
    """--parallelism, else the chart values' sweep.parallelism; 1 (sequential) without placement."""
    if parallelism is not None or no_placement:
        return parallelism or 1
    from .placement import CHART_ENV, PlacementError, load_values
    from .sweep import parallelism_from_values

    try:
        return parallelism_from_values(
            load_values(chart_dir or os.environ.get(CHART_ENV) or REPO_CHART, value_files)
        )
    except PlacementError as err:
        raise click.UsageError(str(err)) from None


@main.command("sweep")
@params_option
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="BLOCK.KEY=VALUE",
    help="a parameter of every child, or a sweep: a list for a scalar key, a list of lists for a list-typed key "
    "(repeatable; the children are the cartesian product)",
)
@chart_option
@values_option
@no_placement_option
@image_option
@click.option("--local", is_flag=True, help="run the sweep here through kfp.local, one child at a time")
@click.option(
    "--out", "out_file", type=click.Path(dir_okay=False), default=None, help="compile to KFP IR YAML"
)
@click.option(
    "--host",
    default=None,
    help="KFP API endpoint: upload the sweep as a version of pipeline ctrl-sweep and start a run",
)
@_kfp_options_but_host
@click.option("--run-name", default=None)
@click.option(
    "--parallelism",
    type=click.IntRange(min=1),
    default=None,
    help="children run at once on the cluster (default: the chart values' sweep.parallelism; 1 with "
    "--no-placement or --local)",
)
@click.option(
    "--max-kl",
    type=click.FloatRange(min=0),
    default=None,
    help="register the best child among the settings whose mean exact KL is at most this (default: no limit)",
)
@click.option(
    "--summary-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="--local: write the JSON summary here",
)
@click.option("--output-dir", type=click.Path(file_okay=False), default="outputs", show_default=True)
@click.option(
    "--verbose", is_flag=True, help="--local: print kfp.local's own stream instead of progress bars"
)
def sweep_cmd(
    params_path,
    overrides,
    chart_dir,
    value_files,
    no_placement,
    image,
    local,
    out_file,
    host,
    run_name,
    parallelism,
    max_kl,
    summary_out,
    output_dir,
    verbose,
    **opts,
) -> None:
    """Sweep parameters as one pipeline: fetch and pretrain once, optimise and evaluate every child (a KFP
    ParallelFor), collect one reward-KL front (front.json, front.png) and register the best child through the
    gate. --local runs it here; --out compiles it; --host submits it (see pipelines/sweep.py)."""
    from .sweep import SweepError, plan

    if sum(map(bool, (local, out_file, host))) != 1:
        raise click.UsageError(
            "choose one of --local (run here), --out FILE (compile) or --host URL (submit)"
        )
    try:
        sweep = plan(params_path if params_path is not None else _default_params_path(), overrides)
    except SweepError as err:
        raise click.UsageError(str(err)) from None
    if local:
        if chart_dir or value_files or image or no_placement or (parallelism or 1) > 1:
            raise click.UsageError(
                "--local runs the children one at a time without placement: drop --chart, -f, --image, "
                "--no-placement and --parallelism"
            )
        _sweep_local(sweep, max_kl, summary_out, output_dir, verbose)
        return
    from .register_step import git_sha
    from .sweep import SWEEP_DESCRIPTION, SWEEP_NAME, compile_sweep

    n = _sweep_parallelism(parallelism, chart_dir, value_files, no_placement)

    def compile_fn(path: str, placement, sha: str) -> str:
        return compile_sweep(path, sweep, sha, placement=placement, image=image, parallelism=n, max_kl=max_kl)

    if out_file:
        compile_fn(out_file, _placement(chart_dir, value_files, image, no_placement), git_sha())
        click.echo(f"{out_file}: {len(sweep.children)} children, parallelism {n}")
        return
    opts["host"] = host
    client, pid, vid, vname, sa = _compile_and_upload(
        sweep.base,
        opts,
        chart_dir,
        value_files,
        image,
        no_placement,
        compile_fn=compile_fn,
        pipeline=(SWEEP_NAME, SWEEP_DESCRIPTION),
    )
    exp = client.create_experiment(opts["experiment"], namespace=opts["namespace"])
    run = client.run_pipeline(
        experiment_id=exp.experiment_id,
        job_name=run_name or f"{SWEEP_NAME}-{vname[:12]}",
        pipeline_id=pid,
        version_id=vid,
        params=flatten(sweep.base),
        service_account=sa,
    )
    click.echo(json.dumps({"pipeline_id": pid, "version_id": vid, "version": vname, "run_id": run.run_id,
                           "children": len(sweep.children), "parallelism": n}))  # fmt: skip


def _sweep_local(sweep, max_kl, summary_out, output_dir, verbose: bool) -> None:
    """``ctrl sweep --local``: the compiled sweep through kfp.local (as ``ctrl run``), then the front's table."""
    import shutil

    from kfp import local

    from components import tracking

    from .console import RunConsole
    from .register_step import git_sha
    from .sweep import build_sweep_pipeline

    tracking_uri = _default_tracking_uri()
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    root = Path(output_dir).resolve() / run_id
    root.mkdir(parents=True, exist_ok=True)
    click.echo(
        f"ctrl sweep {run_id}: {len(sweep.children)} children ({' x '.join(sweep.keys)}), outputs in {root}, "
        f"MLflow at {tracking_uri}"
    )
    os.environ.pop(tracking.RUN_ID_ENV, None)  # each child reports to a live run of its own parameters
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"), raise_on_error=True
    )
    pipeline = build_sweep_pipeline(sweep, git_sha(), parallelism=1, max_kl=max_kl)
    t0 = time.perf_counter()
    with RunConsole(root / "run.log", verbose=verbose):
        task = pipeline(**flatten(sweep.base))
    front = json.loads(task.outputs["front"])
    registered = json.loads(task.outputs["registered"])
    for name in ("front_json", "front_png"):
        if front.get(name):
            shutil.copyfile(front[name], root / Path(front[name]).name)
    summary = {
        "run_id": run_id,
        "outputs_dir": str(root),
        "mlflow": {"tracking_uri": tracking_uri, "run_id": registered["run_id"]},
        "keys": sweep.keys,
        "children": front["points"],
        "best": front["best"],
        "max_kl": front["max_kl"],
        "front": str(root / "front.json"),
        "plot": str(root / "front.png") if front.get("front_png") else None,
        "registered": {
            k: registered[k]
            for k in ("name", "version", "aliases", "promoted", "gate_passed", "gate_reason", "created")
        },
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    text = json.dumps(summary, indent=2)
    (root / "summary.json").write_text(text + "\n")
    if summary_out:
        Path(summary_out).parent.mkdir(parents=True, exist_ok=True)
        Path(summary_out).write_text(text + "\n")
    _print_front(sweep, summary)


def _print_front(sweep, s: dict) -> None:
    widths = [max(len(k), 8) for k in sweep.keys]
    click.echo("\n      " + "  ".join(f"{k:>{w}}" for k, w in zip(sweep.keys, widths, strict=True))
               + "      gain (95% CI)   KL exact  KL Thm3.1")  # fmt: skip
    for row in s["children"]:
        mark = "*" if row["child"] == s["best"] else " "
        values = "  ".join(
            f"{_value_text(row['swept'][k]):>{w}}" for k, w in zip(sweep.keys, widths, strict=True)
        )
        gain = "—" if row["gain_sde"] is None else f"{row['gain_sde']:+9.4f} ± {row['gain_ci']:.4f}"
        exact = "—" if row["kl_exact"] is None else f"{row['kl_exact']:.4f}"
        thm = "—" if row["kl_thm31"] is None else f"{row['kl_thm31']:.4f}"
        click.echo(f"{mark} {row['child']:>3} {values}  {gain:>18} {exact:>10} {thm:>10}")
    limit = "no KL limit" if s["max_kl"] is None else f"mean exact KL <= {s['max_kl']:g}"
    click.echo(f"gain and KL: the training sampler at the training step count; * the registered child: the best "
               f"mean gain over seeds ({limit}), its best seed")  # fmt: skip
    r = s["registered"]
    click.echo(f"registered {r['name']} v{r['version']} aliases={r['aliases']} ({r['gate_reason']})")
    click.echo(f"front: {s['front']}" + (f"\nplot: {s['plot']}" if s["plot"] else ""))
    click.echo(f"wall time: {s['wall_s']:.0f}s")


def _value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@main.command()
@click.argument("name")
@click.argument("version", type=int)
@click.option("--force", is_flag=True, help="promote even if the gate fails (needs --reason; tagged)")
@click.option("--reason", default=None)
@params_option
@set_option
def promote(name, version, force, reason, params_path, overrides) -> None:
    """Promote model NAME version VERSION to champion through the same gate as the pipeline."""
    from .registry import GateConfig
    from .registry import promote as do_promote

    params = _load_params(params_path, overrides)
    _default_tracking_uri()
    rp = params.register
    gate = GateConfig(
        min_gain=rp.min_gain,
        require_no_worse_than_champion=rp.require_no_worse_than_champion,
        tolerance=rp.tolerance,
    )
    try:
        ok, why = do_promote(name, version, force=force, reason=reason, gate=gate)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    click.echo(("promoted: " if ok else "refused: ") + why)
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("name", type=click.Choice(["fetch", "pretrain_value", "optimize", "evaluate", "register"]))
@params_option
@set_option
@click.option("--checkpoint", default="data/checkpoint", show_default=True)
@click.option("--value", "value_dir", default="data/value", show_default=True)
@click.option("--optimize-dir", default="data/optimize", show_default=True)
@click.option("--evaluate-dir", default="data/evaluate", show_default=True)
@click.option(
    "--num-processes",
    type=click.IntRange(min=1),
    default=None,
    help="data-parallel processes for pretrain_value/optimize (one per GPU); default: $CTRL_NUM_PROCESSES or 1",
)
@click.option(
    "--launcher",
    type=click.Choice(LAUNCHERS),
    default=None,
    help="what starts the processes: torchrun or accelerate (accelerate launch --multi_gpu); "
    "default: $CTRL_LAUNCHER or torchrun",
)
@click.option(
    "--nnodes",
    type=click.IntRange(min=1),
    default=None,
    help="nodes of a multi-node step, each running this command with --num-processes processes (torchrun's "
    "c10d rendezvous); default: $CTRL_NNODES, else Kubeflow Trainer's $PET_NNODES, else 1",
)
@click.option(
    "--node-rank",
    type=click.IntRange(min=0),
    default=None,
    help="this node's index (node 0 hosts the rendezvous); default: $CTRL_NODE_RANK, else $PET_NODE_RANK",
)
@click.option(
    "--rdzv-endpoint",
    default=None,
    help="HOST:PORT of node 0's rendezvous store; default: $CTRL_RDZV_ENDPOINT, "
    "else $PET_MASTER_ADDR:$PET_MASTER_PORT",
)
@click.option("--rdzv-id", default=None, help="the rendezvous' name; default: $CTRL_RDZV_ID, else ctrl-NAME")
@click.option(
    "--max-restarts",
    type=click.IntRange(min=0),
    default=None,
    help="restarts of the whole group after a failed process or lost node, each resuming from the newest "
    "checkpoint (torchrun's elastic agent); default: $CTRL_MAX_RESTARTS or 0",
)
def step(
    name,
    params_path,
    overrides,
    checkpoint,
    value_dir,
    optimize_dir,
    evaluate_dir,
    num_processes,
    launcher,
    nnodes,
    node_rank,
    rdzv_endpoint,
    rdzv_id,
    max_restarts,
) -> None:
    """Run one pipeline step on folders (what dvc.yaml's stages and multi-GPU components call; on several nodes,
    the command of every node)."""
    from ctrl_core import launch, steps

    params = _load_params(params_path, overrides)  # validated before any process is started
    # only CTRL pretrains a value net (otherwise the step only writes "skipped"): one process is enough there
    data_parallel = name == "optimize" or (name == "pretrain_value" and params.optimize.algorithm == "ctrl")
    n, rdzv = 1, launch.Rendezvous()
    # WORLD_SIZE set: this process is a rank that an outer torchrun started (Kubeflow Trainer's, or ours)
    if data_parallel and "WORLD_SIZE" not in os.environ:
        try:  # before any process starts
            n = num_processes or launch.num_processes()
            rdzv = launch.rendezvous(nnodes, rdzv_endpoint, rdzv_id, node_rank, max_restarts, f"ctrl-{name}")
            if n > 1 or rdzv != launch.Rendezvous():
                check_split(params, name, n * rdzv.nnodes)
                launcher = launcher_name(launcher, rdzv)
        except LaunchError as err:
            raise click.UsageError(str(err)) from None
    if n > 1 or rdzv != launch.Rendezvous():
        argv = [
            "step",
            name,
            *(["--params", params_path] if params_path else []),
            *[a for o in overrides for a in ("--set", o)],
            "--checkpoint",
            checkpoint,
            "--value",
            value_dir,
            "--optimize-dir",
            optimize_dir,
            "--evaluate-dir",
            evaluate_dir,
        ]
        sys.exit(launch_data_parallel(n, argv, launcher, rdzv))
    from components.tracking import LiveRun

    # with $MLFLOW_TRACKING_URI set, the step's events reach the pipeline's live run (rank 0 emits them)
    live = LiveRun(params, active=name in ("pretrain_value", "optimize", "evaluate"))
    if name == "fetch":
        out = steps.fetch(params, checkpoint)
    elif name == "pretrain_value":
        with live:
            out = steps.pretrain_value(params, checkpoint, value_dir)
    elif name == "optimize":
        algo_ctrl = params.optimize.algorithm == "ctrl"
        with live:
            out = steps.optimize(params, checkpoint, value_dir if algo_ctrl else None, optimize_dir)
    elif name == "evaluate":
        with live:
            out = steps.evaluate(params, checkpoint, Path(optimize_dir) / "adapter", evaluate_dir)
            live.log_artifacts(str(evaluate_dir), "evaluation")
    else:
        _default_tracking_uri()
        from .register_step import register_from_outputs

        evaluation = json.loads((Path(evaluate_dir) / "evaluation.json").read_text())
        link = json.loads((Path(value_dir) / "link.json").read_text())
        out = register_from_outputs(
            params, checkpoint, optimize_dir, evaluation, link, evaluation_dir=evaluate_dir
        )
    click.echo(json.dumps(out, indent=2, default=str)[:4000])


@main.command("export")
@click.option(
    "--fused",
    "fused_out",
    type=click.Path(file_okay=False),
    required=True,
    help="write here a diffusers pipeline folder with the LoRA merged into the UNet (replaced whole)",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="the fetched checkpoint folder (default: data/checkpoint, as `ctrl step`)",
)
@click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="the LoRA adapter folder (default: data/optimize/adapter, the optimize step's adapter/)",
)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="a `ctrl run` output folder (outputs/RUN_ID): its checkpoint and adapter",
)
def export(fused_out, checkpoint, adapter, run_dir) -> None:
    """Export the base checkpoint with the LoRA merged into its UNet as a complete diffusers pipeline folder
    (safetensors), loadable with `DiffusionPipeline.from_pretrained(OUT)`."""
    from ctrl_core.export import export_fused, run_inputs

    if run_dir is None:
        checkpoint, adapter = checkpoint or "data/checkpoint", adapter or "data/optimize/adapter"
    elif checkpoint or adapter:
        raise click.UsageError(
            "--run takes the checkpoint and the adapter from the run: leave out --checkpoint and --adapter"
        )
    else:
        try:
            checkpoint, adapter = run_inputs(run_dir)
        except FileNotFoundError as err:
            raise click.UsageError(str(err)) from None
    try:
        info = export_fused(checkpoint, adapter, fused_out)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps({"fused": str(Path(fused_out).resolve()), **info}, indent=2))


if __name__ == "__main__":
    main()

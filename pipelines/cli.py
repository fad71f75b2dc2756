"""The ``ctrl`` command: run the DAG locally, compile, submit/schedule on Kubeflow Pipelines, promote models.

    ctrl run [--params params.yaml] [--set block.key=value ...] [--summary-out PATH]
    ctrl compile --out pipeline.yaml
    ctrl submit --host URL            (upload as a version named by the git SHA, then start a run)
    ctrl schedule --host URL --cron "0 3 * * 1"
    ctrl promote NAME VERSION [--force --reason TEXT]
    ctrl step NAME ...                (one step, for dvc.yaml)
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import click

from ctrl_core.params import ParamsError, flatten, load

DEFAULT_PARAMS = "params.yaml"


def _load_params(params_path: str | None, overrides: tuple[str, ...]):
    path = params_path if params_path is not None else (DEFAULT_PARAMS if Path(DEFAULT_PARAMS).is_file() else None)
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


params_option = click.option("--params", "params_path", type=click.Path(dir_okay=False), default=None,
                             help="params.yaml (default: ./params.yaml when present, else built-in defaults)")
set_option = click.option("--set", "overrides", multiple=True, metavar="BLOCK.KEY=VALUE", help="override a parameter (repeatable)")


@main.command()
@params_option
@set_option
@click.option("--summary-out", type=click.Path(dir_okay=False), default=None, help="write the JSON summary here")
@click.option("--output-dir", type=click.Path(file_okay=False), default="outputs", show_default=True)
def run(params_path, overrides, summary_out, output_dir) -> None:
    """Run the whole DAG locally through kfp.local (no cluster, no GPU, no network)."""
    params = _load_params(params_path, overrides)  # validated before anything is written
    tracking_uri = _default_tracking_uri()
    from kfp import local

    from .pipeline import build_pipeline
    from .register_step import git_sha

    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    root = Path(output_dir).resolve() / run_id
    root.mkdir(parents=True, exist_ok=True)
    click.echo(f"ctrl run {run_id}: outputs in {root}, MLflow at {tracking_uri}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"), raise_on_error=True)
    pipeline = build_pipeline(params, git_sha())
    t0 = time.perf_counter()
    task = pipeline(**flatten(params))
    outs = {k: json.loads(task.outputs[k]) for k in ("fetch", "value", "optimize", "evaluation", "registered")}
    summary = {
        "run_id": run_id,
        "outputs_dir": str(root),
        "mlflow": {"tracking_uri": tracking_uri, "run_id": outs["registered"]["run_id"]},
        "checkpoint": {"source": outs["fetch"]["manifest"]["source"], "sha256": outs["fetch"]["manifest"]["sha256"]},
        "link": {"chosen": outs["value"]["chosen"], "mse": outs["value"]["mse"]},
        "train": {k: outs["optimize"][k] for k in ("algorithm", "iterations", "first_reward", "final_reward", "final_kl",
                                                   "seconds_per_iteration")},
        "evaluation": outs["evaluation"]["evaluation"],
        "robustness_ratio": outs["evaluation"]["robustness_ratio"],
        "report": str(Path(outs["evaluation"]["artifacts_dir"]) / "report.html"),
        "registered": {k: outs["registered"][k] for k in ("name", "version", "aliases", "promoted", "gate_passed",
                                                          "gate_reason", "created")},
        "wall_s": {"fetch_checkpoint": outs["fetch"]["wall_s"], "pretrain_value": outs["value"]["wall_s"],
                   "ctrl_optimize": outs["optimize"]["wall_s"], "evaluate": outs["evaluation"]["wall_s"],
                   "register": outs["registered"]["wall_s"], "total": round(time.perf_counter() - t0, 2)},
    }
    text = json.dumps(summary, indent=2)
    (root / "summary.json").write_text(text + "\n")
    if summary_out:
        Path(summary_out).parent.mkdir(parents=True, exist_ok=True)
        Path(summary_out).write_text(text + "\n")
    _print_summary(summary)


def _print_summary(s: dict) -> None:
    click.echo(f"\nlink function: {s['link']['chosen']}  (validation MSE: "
               + ", ".join(f"{k} {v:.4g}" for k, v in s["link"]["mse"].items()) + ")")
    click.echo("sampler steps      base     tuned      gain (95% CI)        KL")
    for smp, cells in s["evaluation"].items():
        for n in sorted(cells, key=int):
            c = cells[n]
            click.echo(f"{smp:>7} {n:>5} {c['base']:9.4f} {c['tuned']:9.4f} {c['gain']:+9.4f} ± {c['gain_ci']:.4f} {c['kl']:9.4f}")
    ratio = s["robustness_ratio"]
    click.echo("robustness ratio: " + ("n/a (no gain at the training step count)" if ratio is None else f"{ratio:.3f}"))
    r = s["registered"]
    click.echo(f"registered {r['name']} v{r['version']} aliases={r['aliases']} ({r['gate_reason']})")
    click.echo(f"report: {s['report']}\nwall time: {s['wall_s']['total']:.0f}s")


@main.command("compile")
@params_option
@set_option
@click.option("--out", "out_file", type=click.Path(dir_okay=False), required=True)
def compile_cmd(params_path, overrides, out_file) -> None:
    """Compile the pipeline to KFP IR YAML (parameters default to the params file's values)."""
    from .pipeline import compile_pipeline
    from .register_step import git_sha

    params = _load_params(params_path, overrides)
    compile_pipeline(out_file, params, git_sha())
    click.echo(out_file)


def _client(host: str):
    import kfp

    return kfp.Client(host=host)


def _upload(client, package: str, name: str, version: str) -> tuple[str, str]:
    """Upload the compiled package as pipeline ``name`` / version ``version`` (idempotent on the version name)."""
    pid = client.get_pipeline_id(name)
    if pid is None:
        p = client.upload_pipeline(package, pipeline_name=name)
        pid = p.pipeline_id
    versions = client.list_pipeline_versions(pid, page_size=200).pipeline_versions or []
    for v in versions:
        if v.display_name == version:
            return pid, v.pipeline_version_id
    v = client.upload_pipeline_version(package, pipeline_version_name=version, pipeline_id=pid)
    return pid, v.pipeline_version_id


def _compile_and_upload(params, host: str):
    """Compile with these parameters as defaults and upload as the pipeline version named by the git SHA."""
    import tempfile

    from .pipeline import PIPELINE_NAME, compile_pipeline
    from .register_step import git_sha

    sha = git_sha("unversioned")
    client = _client(host)
    with tempfile.TemporaryDirectory() as d:
        package = compile_pipeline(str(Path(d) / "pipeline.yaml"), params, sha)
        pid, vid = _upload(client, package, PIPELINE_NAME, sha[:12])
    return client, pid, vid, sha


@main.command()
@params_option
@set_option
@click.option("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
@click.option("--experiment", default="ctrl-pipeline", show_default=True)
@click.option("--run-name", default=None)
def submit(params_path, overrides, host, experiment, run_name) -> None:
    """Upload the pipeline as a version named by the git SHA and start a run with these parameters."""
    from .pipeline import PIPELINE_NAME

    params = _load_params(params_path, overrides)
    client, pid, vid, sha = _compile_and_upload(params, host)
    exp = client.create_experiment(experiment)
    run = client.run_pipeline(experiment_id=exp.experiment_id, job_name=run_name or f"{PIPELINE_NAME}-{sha[:8]}",
                              pipeline_id=pid, version_id=vid, params=flatten(params))
    click.echo(json.dumps({"pipeline_id": pid, "version_id": vid, "run_id": run.run_id}))


@main.command()
@params_option
@set_option
@click.option("--host", required=True)
@click.option("--cron", required=True, help="six-field KFP cron, e.g. '0 0 3 * * 1' (Mondays 03:00)")
@click.option("--experiment", default="ctrl-pipeline", show_default=True)
@click.option("--name", "job_name", default="ctrl-retrain", show_default=True)
def schedule(params_path, overrides, host, cron, experiment, job_name) -> None:
    """Create a recurring run (max concurrency 1, no catch-up) of the pipeline version at this git SHA."""
    params = _load_params(params_path, overrides)
    client, pid, vid, _ = _compile_and_upload(params, host)
    exp = client.create_experiment(experiment)
    rec = client.create_recurring_run(experiment_id=exp.experiment_id, job_name=job_name, cron_expression=cron,
                                      max_concurrency=1, no_catchup=True, pipeline_id=pid, version_id=vid,
                                      params=flatten(params), enabled=True)
    click.echo(json.dumps({"recurring_run_id": rec.recurring_run_id, "pipeline_id": pid, "version_id": vid}))


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
    gate = GateConfig(min_gain=rp.min_gain, require_no_worse_than_champion=rp.require_no_worse_than_champion, tolerance=rp.tolerance)
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
def step(name, params_path, overrides, checkpoint, value_dir, optimize_dir, evaluate_dir) -> None:
    """Run one pipeline step on folders (what dvc.yaml's stages call)."""
    from ctrl_core import steps

    params = _load_params(params_path, overrides)
    if name == "fetch":
        out = steps.fetch(params, checkpoint)
    elif name == "pretrain_value":
        out = steps.pretrain_value(params, checkpoint, value_dir)
    elif name == "optimize":
        algo_ctrl = params.optimize.algorithm == "ctrl"
        out = steps.optimize(params, checkpoint, value_dir if algo_ctrl else None, optimize_dir)
    elif name == "evaluate":
        out = steps.evaluate(params, checkpoint, Path(optimize_dir) / "adapter", evaluate_dir)
    else:
        _default_tracking_uri()
        from .register_step import register_from_outputs

        evaluation = json.loads((Path(evaluate_dir) / "evaluation.json").read_text())
        link = json.loads((Path(value_dir) / "link.json").read_text())
        out = register_from_outputs(params, checkpoint, optimize_dir, evaluation, link, evaluation_dir=evaluate_dir)
    click.echo(json.dumps(out, indent=2, default=str)[:4000])


if __name__ == "__main__":
    main()

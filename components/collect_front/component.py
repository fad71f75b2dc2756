from typing import List, NamedTuple  # noqa: UP035 - KFP reads these annotations of the task's signature

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Model, Output

from ..image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def collect_front(
    params: str,
    keys: List[str],  # noqa: UP006
    children: List[str],  # noqa: UP006
    evaluations: List[str],  # noqa: UP006
    optimizations: List[str],  # noqa: UP006
    adapters: Input[List[Model]],  # noqa: UP006
    reports: Input[List[HTML]],  # noqa: UP006
    max_kl: float,
    front: Output[Artifact],
    adapter: Output[Model],
    report: Output[HTML],
) -> NamedTuple("Outputs", params=str, evaluation_json=str, summary=str):
    """Every sweep child's evaluation as one reward-KL front (front/front.json and front/front.png, as
    bench.frontier writes them) and the best child (components/collect_front/front_points.py) handed on to
    register: its parameters, its evaluation and copies of its adapter and report.

    ``params``: the sweep's base parameters (the shared steps'); ``keys``: the swept keys (block.key);
    ``children`` (parameters JSON), ``evaluations``, ``optimizations`` (task outputs), ``adapters``, ``reports``:
    every child's (``dsl.Collected``, in one order); ``max_kl`` < 0: no KL limit. The live MLflow runs of the
    shared steps and of the children not registered are finished here (register completes the best child's)."""
    import json
    import shutil
    from pathlib import Path

    from components.collect_front import front_points
    from ctrl_core import front as front_plot
    from ctrl_core.io import atomic_write_json
    from ctrl_core.params import from_json

    kids = [from_json(p) for p in children]
    swept = [front_points.swept_values(p, keys) for p in kids]
    evals, optims = [json.loads(e) for e in evaluations], [json.loads(o) for o in optimizations]
    limit = None if max_kl < 0 else max_kl
    points = front_points.points(kids, swept, evals, optims)
    summary = front_points.summarise(points, limit)
    out = Path(front.path)
    out.mkdir(parents=True, exist_ok=True)
    if summary["settings"]:
        front_plot.plot(points, summary, out / "front.png")
    try:
        best = front_points.best_child(points, summary, limit)
    except ValueError as err:  # the front is written even when no child qualifies
        atomic_write_json(front_points.document(points, summary, None, keys, limit), out / "front.json")
        raise ValueError(f"{err}; the front: {out / 'front.json'}") from None
    atomic_write_json(front_points.document(points, summary, best, keys, limit), out / "front.json")

    shutil.copytree(adapters[best].path, adapter.path, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copyfile(reports[best].path, report.path)
    evaluation_dir = Path(reports[best].path).parent / "evaluation"
    if evaluation_dir.is_dir():  # register logs this folder: the registered run gets the front beside it
        copied = shutil.copytree(evaluation_dir, Path(report.path).parent / "evaluation")
        for name in ("front.json", "front.png"):
            if (out / name).is_file():
                shutil.copyfile(out / name, Path(copied) / name)

    from components import tracking

    if tracking.enabled():
        try:
            client = tracking.client()
            keep = tracking.find_run(client, kids[best])
            for p in [from_json(params), *kids]:
                run = tracking.find_run(client, p)
                if run is not None and run != keep:
                    client.set_tag(run, "ctrl.sweep", "not registered")
                    client.set_terminated(run, status="FINISHED")
        except Exception as err:  # the front and the registration matter more
            print(f"could not finish the sweep's other live MLflow runs: {type(err).__name__}: {err}")

    result = {
        "best": best,
        "best_swept": swept[best],
        "points": [
            {k: p[k] for k in ("child", "swept", "seed", "gain_sde", "gain_ci", "kl_exact", "kl_thm31")}
            for p in points
        ],
        "front_json": str(out / "front.json"),
        "front_png": str(out / "front.png") if summary["settings"] else None,
        "max_kl": limit,
    }
    from collections import namedtuple

    return namedtuple("Outputs", ["params", "evaluation_json", "summary"])(
        children[best], evaluations[best], json.dumps(result)
    )

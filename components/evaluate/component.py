from kfp import dsl
from kfp.dsl import HTML, Input, Markdown, Metrics, Model, Output

from ..image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(
    params: str,
    checkpoint: Input[Model],
    adapter: Input[Model],
    eval_metrics: Output[Metrics],
    report: Output[HTML],
    summary: Output[Markdown],
) -> str:
    """Base vs tuned at every step count with each of evaluate.samplers (sde, ode, euler_maruyama, heun): reward with
    95% CI, gain, the exact KL of the discrete chain (stochastic samplers) beside Theorem 3.1's, robustness."""
    import json
    import shutil
    import time
    from pathlib import Path

    from ctrl_core import steps
    from ctrl_core.params import from_json

    t0 = time.perf_counter()
    work = Path(report.path).parent / "evaluation"  # full outputs (JSON, plot, grids) beside the report
    from components.tracking import LiveRun

    p = from_json(params)
    with LiveRun(p) as live:  # each cell's gain as it is measured, then the grids and the report
        out = steps.evaluate(p, checkpoint.path, str(Path(adapter.path) / "adapter"), work)
        live.log_artifacts(str(work), "evaluation")
    for smp, cells in out["evaluation"].items():
        for n, c in cells.items():
            for key in ("base", "tuned", "gain", "kl", "kl_thm31", "kl_exact"):
                if c.get(key) is not None:  # kl_exact is None for a deterministic sampler (no path KL)
                    eval_metrics.log_metric(f"eval/{smp}/steps{n}/{key}", c[key])
    if out["robustness_ratio"] is not None:
        eval_metrics.log_metric("eval/robustness_ratio", out["robustness_ratio"])
    shutil.copyfile(work / "report.html", report.path)
    shutil.copyfile(work / "report.md", summary.path)
    out["artifacts_dir"] = str(work)
    return json.dumps({**out, "wall_s": round(time.perf_counter() - t0, 2)})

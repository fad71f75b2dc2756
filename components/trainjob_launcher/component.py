"""The launchers of the steps placed on several nodes (``nodes`` > 1 in the chart's values).

Each has the inputs, outputs and name of the step it stands for (components/pretrain_value, ctrl_optimize), so
the pipeline's DAG is the same; its body runs the step as a Kubeflow Trainer TrainJob (components/trainjob.py)
and reports what the step's own component reports. The task itself is light: no GPU, the cache PVC mounted.
"""

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from ..image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def pretrain_value(
    params: str, checkpoint: Input[Model], value: Output[Model], link_metrics: Output[Metrics]
) -> str:
    """Train the value net for every candidate link function on several nodes (a TrainJob) and keep the best
    by held-out MSE."""
    import json
    import time

    from components.trainjob import run_step
    from ctrl_core.params import from_json

    t0 = time.perf_counter()
    p = from_json(params)
    if p.optimize.algorithm == "ctrl":
        out = run_step("pretrain_value", params, checkpoint.path, value.path)
    else:  # only CTRL has a value net: the step writes that it skipped, no nodes needed
        from ctrl_core import steps

        out = steps.pretrain_value(p, checkpoint.path, value.path)
    for link, mse in out["mse"].items():
        link_metrics.log_metric(f"value/mse/{link}", mse)
    value.metadata["link"] = out["chosen"]
    return json.dumps({**out, "wall_s": round(time.perf_counter() - t0, 2)})


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ctrl_optimize(
    params: str,
    checkpoint: Input[Model],
    value: Input[Model],
    adapter: Output[Model],
    train_metrics: Output[Metrics],
) -> str:
    """CTRL (or the DDPO baseline) on several nodes (a TrainJob) from the checkpoint and the pretrained value
    net; outputs the LoRA adapter (under adapter/), the value net, per-iteration metrics and checkpoints."""
    import json
    import time

    from components.trainjob import run_step
    from ctrl_core.params import from_json

    t0 = time.perf_counter()
    value_dir = value.path if from_json(params).optimize.algorithm == "ctrl" else None
    out = run_step("optimize", params, checkpoint.path, adapter.path, value_dir)
    for key in ("final_reward", "first_reward", "final_kl", "approx_kl", "clipfrac"):
        if out.get(key) is not None:
            train_metrics.log_metric(f"train/{key}", out[key])
    adapter.metadata["algorithm"] = out["algorithm"]
    return json.dumps({**out, "wall_s": round(time.perf_counter() - t0, 2)})

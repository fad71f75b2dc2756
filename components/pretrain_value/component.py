from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from ..image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def pretrain_value(
    params: str, checkpoint: Input[Model], value: Output[Model], link_metrics: Output[Metrics]
) -> str:
    """Train the value net for every candidate link function and keep the best by held-out MSE."""
    import json
    import time

    from ctrl_core import steps
    from ctrl_core.params import from_json

    t0 = time.perf_counter()
    from ctrl_core.launch import num_processes, run_step_data_parallel

    p = from_json(params)
    if num_processes() > 1 and p.optimize.algorithm == "ctrl":  # one process per GPU (CTRL_NUM_PROCESSES)
        out = run_step_data_parallel("pretrain_value", params, checkpoint.path, value.path)
    else:
        from components.tracking import LiveRun

        with LiveRun(p):  # each link's held-out MSE reaches the MLflow run as it is fitted
            out = steps.pretrain_value(p, checkpoint.path, value.path)
    for link, mse in out["mse"].items():
        link_metrics.log_metric(f"value/mse/{link}", mse)
    value.metadata["link"] = out["chosen"]
    return json.dumps({**out, "wall_s": round(time.perf_counter() - t0, 2)})

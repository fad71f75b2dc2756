from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from ..image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ctrl_optimize(
    params: str,
    checkpoint: Input[Model],
    value: Input[Model],
    adapter: Output[Model],
    train_metrics: Output[Metrics],
) -> str:
    """CTRL (or the DDPO baseline) from the checkpoint and the pretrained value net; outputs the LoRA adapter
    (peft format, under adapter/), the value net, per-iteration metrics and periodic checkpoints."""
    import json
    import time

    from ctrl_core import steps
    from ctrl_core.params import from_json

    t0 = time.perf_counter()
    p = from_json(params)
    value_dir = value.path if p.optimize.algorithm == "ctrl" else None
    from components.tracking import LiveRun
    from ctrl_core.launch import num_processes, run_step_data_parallel

    if num_processes() > 1:  # one process per GPU; gradients all-reduced (rank 0 reports to MLflow)
        out = run_step_data_parallel("optimize", params, checkpoint.path, adapter.path, value_dir)
    else:
        with LiveRun(p):  # each iteration's reward, KL and losses reach the MLflow run as they come
            out = steps.optimize(p, checkpoint.path, value_dir, adapter.path)
    for key in ("final_reward", "first_reward", "final_kl", "approx_kl", "clipfrac"):
        if out.get(key) is not None:
            train_metrics.log_metric(f"train/{key}", out[key])
    adapter.metadata["algorithm"] = out["algorithm"]
    return json.dumps({**out, "wall_s": round(time.perf_counter() - t0, 2)})

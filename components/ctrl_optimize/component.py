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
    total = p.qlearning.iterations if p.optimize.algorithm == "qlearning" else p.optimize.iterations

    def progress(row: dict) -> None:
        reward = "skipped" if row.get("reward_mean") is None else f"{row['reward_mean']:+.4f}"
        kl = f" kl {row['kl']:.4f}" if row.get("kl") is not None else ""
        secs = sum(v for k, v in row.items() if k.endswith("_s") and isinstance(v, float))
        print(
            f"[ctrl_optimize] iteration {row['iteration'] + 1}/{total} reward {reward}{kl} ({secs:.1f}s)",
            flush=True,
        )

    value_dir = value.path if p.optimize.algorithm == "ctrl" else None
    from ctrl_core.launch import num_processes, run_step_data_parallel

    if num_processes() > 1:  # one process per GPU; gradients all-reduced
        out = run_step_data_parallel("optimize", params, checkpoint.path, adapter.path, value_dir)
    else:
        out = steps.optimize(p, checkpoint.path, value_dir, adapter.path, progress=progress)
    for key in ("final_reward", "first_reward", "final_kl", "approx_kl", "clipfrac"):
        if out.get(key) is not None:
            train_metrics.log_metric(f"train/{key}", out[key])
    adapter.metadata["algorithm"] = out["algorithm"]
    return json.dumps({**out, "wall_s": round(time.perf_counter() - t0, 2)})

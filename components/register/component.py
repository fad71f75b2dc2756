from kfp import dsl
from kfp.dsl import HTML, Input, Model

from ..image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register(
    params: str,
    checkpoint: Input[Model],
    adapter: Input[Model],
    report: Input[HTML],
    evaluation_json: str,
    link_json: str,
    git_sha: str = "",
) -> str:
    """Log to MLflow, register a model version (idempotent), alias challenger, promote champion through the gate."""
    import json
    import time
    from pathlib import Path

    from ctrl_core.params import from_json
    from pipelines.register_step import register_from_outputs

    t0 = time.perf_counter()
    out = register_from_outputs(
        from_json(params),
        checkpoint.path,
        adapter.path,
        json.loads(evaluation_json),
        json.loads(link_json),
        git_sha,
        evaluation_dir=str(Path(report.path).parent / "evaluation"),
    )
    return json.dumps({**out, "wall_s": round(time.perf_counter() - t0, 2)})

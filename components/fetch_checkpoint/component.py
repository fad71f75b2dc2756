from kfp import dsl
from kfp.dsl import Model, Output

from ..image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def fetch_checkpoint(params: str, checkpoint: Output[Model]) -> str:
    """Fetch the pretrained checkpoint (builtin:, local path, s3://, hf:) and verify it; returns a JSON summary."""
    import json
    import time

    from ctrl_core import steps
    from ctrl_core.params import from_json

    t0 = time.perf_counter()
    manifest = steps.fetch(from_json(params), checkpoint.path)
    checkpoint.metadata.update(
        {"source": manifest["source"], "sha256": manifest["sha256"], "size_bytes": manifest["size_bytes"]}
    )
    return json.dumps({"manifest": manifest, "wall_s": round(time.perf_counter() - t0, 2)})

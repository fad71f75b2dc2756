"""The registered model as an MLflow model: a pyfunc flavour that generates images with the engine's sampler.

Load and call it (in-process, or REST through ``mlflow models serve -m models:/NAME@champion``)::

    model = mlflow.pyfunc.load_model("models:/ctrl-digits@champion")
    images = model.predict(pd.DataFrame({"label": [3, 7]}), params={"steps": 20, "sampler": "sde", "seed": 0})

    POST /invocations {"dataframe_records": [{"label": 3}, {"label": 7}], "params": {"seed": 0}}
    -> {"predictions": [{"image": "<base64 PNG>", "shape": [1, 8, 8]}, ...]}

Input: one row per image, one column named by the model's kind (``ctrl_core.serving.input_kind``): ``label``
(class-conditional models, e.g. the digits), ``prompt`` (Stable Diffusion), ``index`` (unconditional; values
unused). Params (the signature's ``ParamSchema``, with defaults): ``steps`` (the training step count),
``sampler`` (sde | ode, or any solver of ``ctrl_core.policy``), ``seed``, ``batch_size`` (rows per generator:
batch j starts at seed + j, as the evaluate step), ``pixels`` and, for prompts, ``guidance``.
Output: a DataFrame, one row per image: ``image`` (base64 PNG, uint8), ``shape`` ([C, H, W]) and, with
``pixels=true``, ``pixels`` (the C·H·W float32 values in [-1, 1], row-major): plain JSON through MLflow's
scoring server, and float32 values survive it exactly (each is a float64 that JSON prints round-trip).

The model folder (``build_model``): MLmodel + ``python_model.py`` (models from code: ``pipelines/mlflow_pyfunc.py``,
no pickle), requirements, signature, input example; ``artifacts/``: ``checkpoint/`` (the fetched base checkpoint
folder, bundled when it is at most ``BUNDLE_LIMIT_BYTES``: the digits model loads with no network) or
``checkpoint.json`` (its source and sha256, fetched and verified at load into ``$CTRL_MODEL_CACHE``, or taken
from ``$CTRL_SERVING_CHECKPOINT``), ``adapter/`` (peft's files and, for SD, diffusers' LoRA file), ``params.json``
(the run's parameters: the problem is loaded as the evaluate step loads it); and the model card ``README.md``
with ``sample_grid.png`` (the evaluate step's tuned samples) beside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

BUNDLE_LIMIT_BYTES = 512 * 2**20
CACHE_ENV, CHECKPOINT_ENV = "CTRL_MODEL_CACHE", "CTRL_SERVING_CHECKPOINT"
CODE_FILE = Path(__file__).with_name("mlflow_pyfunc.py")
CARD, GRID, BASE_GRID = "README.md", "sample_grid.png", "sample_grid_base.png"
# the engine's core dependencies pinned at their installed versions in the model's requirements
CORE_DISTRIBUTIONS = ("torch", "diffusers", "peft", "safetensors", "numpy", "scipy", "scikit-learn", "pillow",
                      "pydantic", "pyyaml", "pandas", "mlflow")  # fmt: skip


class CtrlImageModel(mlflow.pyfunc.PythonModel):
    """Images for class labels or prompts from the tuned model (``ctrl_core.serving``); see the module docstring."""

    def load_context(self, context) -> None:
        from ctrl_core.params import from_json
        from ctrl_core.serving import load_tuned

        art = context.artifacts
        raw = json.loads(Path(art["params"]).read_text())
        if "prompts" in art:  # a prompt file outside the checkpoint, bundled
            raw["model"]["prompts"] = art["prompts"]
        params = from_json(json.dumps(raw))
        checkpoint = art.get("checkpoint") or _referenced_checkpoint(art["checkpoint_ref"])
        self.tuned = load_tuned(params, checkpoint, art["adapter"])
        self.defaults = default_params(params, self.tuned.kind)

    # pd.DataFrame: a type hint MLflow infers no schema from (the declared signature is the schema)
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from ctrl_core.serving import generate, png_base64

        p = {**self.defaults, **(params or {})}
        column = self.tuned.input_column
        if column not in model_input.columns:
            raise ValueError(
                f"this model takes a {column!r} column (one row per image), got {list(model_input.columns)}"
            )
        images = generate(self.tuned, model_input[column].tolist(), steps=p["steps"], sampler=p["sampler"],
                          seed=p["seed"], guidance=p.get("guidance"), batch_size=p["batch_size"])  # fmt: skip
        out = {"image": png_base64(images), "shape": [list(images.shape[1:])] * len(images)}
        if _true(p["pixels"]):
            out["pixels"] = [row.ravel().tolist() for row in images.numpy()]
        return pd.DataFrame(out)


def _true(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def _referenced_checkpoint(ref_file: str) -> str:
    """A checkpoint kept by reference: ``$CTRL_SERVING_CHECKPOINT`` when it holds the same sha256, else fetched
    from its source into ``$CTRL_MODEL_CACHE`` (default ~/.cache/ctrl-pipeline/checkpoints) and verified."""
    from ctrl_core.checkpoints import fetch_checkpoint

    ref = json.loads(Path(ref_file).read_text())
    local = os.environ.get(CHECKPOINT_ENV, "")
    if local:
        manifest = json.loads((Path(local) / "manifest.json").read_text())
        if manifest.get("sha256") != ref["sha256"]:
            raise ValueError(f"${CHECKPOINT_ENV}={local} holds checkpoint {manifest.get('sha256')}, the model "
                             f"needs {ref['sha256']}")  # fmt: skip
        return local
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ctrl-pipeline" / "checkpoints")
    dest = cache / ref["sha256"][:16]
    fetch_checkpoint(ref["source"], dest, ref["sha256"])
    return str(dest)


def default_params(params, kind: str) -> dict[str, Any]:
    """The pyfunc's params and their defaults (the signature's ParamSchema) for a run's ``params``."""
    out = {"steps": int(params.optimize.train_steps), "sampler": "sde", "seed": 0, "batch_size": 256,
           "pixels": False}  # fmt: skip
    if kind == "prompt":
        out["guidance"] = float(params.model.guidance_scale)
    return out


def signature(params, kind: str):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    from ctrl_core.serving import INPUT_COLUMNS

    types = {bool: DataType.boolean, int: DataType.long, float: DataType.double, str: DataType.string}
    column = ColSpec(DataType.string if kind == "prompt" else DataType.long, INPUT_COLUMNS[kind])
    outputs = Schema([ColSpec(DataType.string, "image"), ColSpec(Array(DataType.long), "shape"),
                      ColSpec(Array(DataType.float), "pixels", required=False)])  # fmt: skip
    spec = ParamSchema([ParamSpec(k, types[type(v)], v) for k, v in default_params(params, kind).items()])
    return ModelSignature(inputs=Schema([column]), outputs=outputs, params=spec)


def input_example(checkpoint_dir: Path, params, kind: str, num_classes: int) -> pd.DataFrame:
    from ctrl_core.serving import INPUT_COLUMNS

    if kind == "prompt":
        prompts_file = Path(params.model.prompts) if params.model.prompts else checkpoint_dir / "prompts.txt"
        lines = [
            ln.strip()
            for ln in prompts_file.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")
        ]
        values: list = lines[:2] or ["a photo"]
    else:
        values = list(range(min(4, num_classes))) if kind == "label" else [0, 1]
    return pd.DataFrame({INPUT_COLUMNS[kind]: values})


def pip_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    """This project's distribution and its core dependencies, pinned at the installed versions."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("ctrl-pipeline", *CORE_DISTRIBUTIONS, *extra):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build_model(
    path: str,
    mlflow_model=None,
    *,
    params,
    checkpoint_dir: str | Path,
    adapter_dir: str | Path,
    evaluation: dict,
    lineage: dict[str, str],
    model_name: str,
    evaluation_dir: str | Path | None = None,
    bundle: bool | None = None,
) -> None:
    """Write the MLflow model folder at ``path`` (``registry.register_run(logged_model=...)`` calls this with the
    LoggedModel's ``mlflow_model``). ``bundle``: copy the base checkpoint in (None: when it is at most
    ``BUNDLE_LIMIT_BYTES``), else reference it by source and sha256. ``evaluation``: the evaluate step's output;
    ``evaluation_dir``: its folder (the report whose sample grids the card shows)."""
    from ctrl_core.serving import input_kind

    ckpt, adapter = Path(checkpoint_dir), Path(adapter_dir)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    if bundle is None:
        bundle = _tree_bytes(ckpt) <= BUNDLE_LIMIT_BYTES
    kind, num_classes = input_kind(ckpt, adapter)
    with tempfile.TemporaryDirectory(prefix="ctrl-model-build-") as tmp:
        staged = Path(tmp)
        artifacts = {"adapter": str(staged / "adapter"), "params": str(staged / "params.json")}
        # peft's README.md is an empty template: the model card replaces it
        shutil.copytree(adapter, staged / "adapter", ignore=shutil.ignore_patterns("README.md"))
        (staged / "params.json").write_text(params.model_dump_json(indent=2))
        if bundle:
            artifacts["checkpoint"] = str(ckpt)
        else:
            (staged / "checkpoint.json").write_text(
                json.dumps({k: manifest[k] for k in ("source", "sha256")})
            )
            artifacts["checkpoint_ref"] = str(staged / "checkpoint.json")
        if params.model.prompts:
            artifacts["prompts"] = params.model.prompts
        mlflow.pyfunc.save_model(
            path, python_model=str(CODE_FILE), artifacts=artifacts, mlflow_model=mlflow_model,
            signature=signature(params, kind), input_example=input_example(ckpt, params, kind, num_classes),
            pip_requirements=pip_requirements(("transformers",) if kind == "prompt" else ()),
            metadata={"ctrl": {"kind": kind, "input_column": _column(kind),
                               "checkpoint": {"source": manifest["source"], "sha256": manifest["sha256"],
                                              "bundled": bool(bundle)}}},
        )  # fmt: skip
    cell, grids = sample_grids(evaluation_dir, params) if evaluation_dir else ("", {})
    for name, png in grids.items():
        (Path(path) / name).write_bytes(png)
    run_id = getattr(mlflow_model, "run_id", None) or ""
    model_id = getattr(mlflow_model, "model_id", None) or ""
    card = model_card(model_name, params, manifest, bool(bundle), kind, evaluation, lineage, run_id, model_id, cell,
                      grids)  # fmt: skip
    # MLflow copies an artifact folder under its own name: the bundled checkpoint keeps the fetched folder's
    (Path(path) / CARD).write_text(card.replace("model/artifacts/checkpoint", f"model/artifacts/{ckpt.name}"))


def _column(kind: str) -> str:
    from ctrl_core.serving import INPUT_COLUMNS

    return INPUT_COLUMNS[kind]


_FIGURE = re.compile(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'><figcaption>([^<]+)</figcaption>")


def sample_grids(evaluation_dir: str | Path, params) -> tuple[str, dict[str, bytes]]:
    """(cell "sampler/steps", {GRID: tuned, BASE_GRID: base}): the sample grids of one evaluated cell, from the
    evaluate step's report.html (the sde sampler at the training step count when evaluated, else its largest step
    count); ("", {}) without one."""
    import base64

    report = Path(evaluation_dir) / "report.html"
    if not report.is_file():
        return "", {}
    found = {
        name: png for png, name in ((m.group(1), m.group(2)) for m in _FIGURE.finditer(report.read_text()))
    }
    cells = sorted({n.split("/", 1)[1] for n in found if n.startswith("tuned/")},
                   key=lambda c: (c.split("/")[0] != "sde", c.split("/")[-1] != str(params.optimize.train_steps),
                                  -int(c.split("/")[-1]) if c.split("/")[-1].isdigit() else 0))  # fmt: skip
    if not cells:
        return "", {}
    out = {GRID: base64.b64decode(found[f"tuned/{cells[0]}"])}
    if f"base/{cells[0]}" in found:
        out[BASE_GRID] = base64.b64decode(found[f"base/{cells[0]}"])
    return cells[0], out


def _fmt(cell: dict, key: str, spec: str = ".4f") -> str:
    """The cell's number; "—" where it is None (the exact KL of a deterministic sampler), "n/a" where absent."""
    value = cell.get(key)
    if key in cell and value is None:
        return "—"
    return format(float(value), spec) if isinstance(value, int | float) else "n/a"


def model_card(
    model_name: str,
    params,
    manifest: dict,
    bundled: bool,
    kind: str,
    evaluation: dict,
    lineage: dict[str, str],
    run_id: str,
    model_id: str,
    cell: str,
    grids: dict[str, bytes],
) -> str:
    """The version's README.md: base model, method and key parameters, evaluation table, samples, lineage and
    how to load it."""
    algorithm = params.optimize.algorithm
    if algorithm == "qlearning":
        block = params.qlearning
        keys = ("start", "iterations", "batch_size", "train_steps", "reward_weight", "theta", "lr", "critic")
    else:
        block = params.optimize.resolved()  # what the trainer ran (-1 / auto: the algorithm's values)
        keys = ("iterations", "batch_size", "train_steps", "train_timesteps", "solver", "beta", "lr", "advantage",
                "clip_range", "ppo_epochs")  # fmt: skip
    method_rows = [f"| optimize.algorithm | {algorithm} |",
                   f"| reward | {params.reward.name} {json.dumps(params.reward.options) if params.reward.options else ''} |",
                   f"| model.lora_rank | {params.model.lora_rank} |"]  # fmt: skip
    if kind == "prompt":
        method_rows.append(f"| model.guidance_scale | {params.model.guidance_scale} |")
    method_rows += [f"| {'qlearning' if algorithm == 'qlearning' else 'optimize'}.{k} | {getattr(block, k)} |"
                    for k in keys]  # fmt: skip
    if lineage.get("value_link"):
        method_rows.append(f"| value link (chosen) | {lineage['value_link']} |")

    cells = evaluation.get("evaluation", {})
    eval_rows = [f"| {smp} | {n} | {_fmt(c, 'base')} | {_fmt(c, 'tuned')} | {_fmt(c, 'gain', '+.4f')} ± "
                 f"{_fmt(c, 'gain_ci')} | {_fmt(c, 'kl_exact')} | {_fmt(c, 'kl_thm31' if 'kl_thm31' in c else 'kl')} |"
                 for smp, per in cells.items() for n, c in sorted(per.items(), key=lambda kv: int(kv[0]))]  # fmt: skip
    ratio = evaluation.get("robustness_ratio")
    column = _column(kind)
    example = {"label": "[0, 1, 2, 3]", "prompt": '["a photo of a cat"]', "unconditional": "[0, 1]"}[kind]
    if GRID in grids:
        samples = [f"Tuned samples at {cell.replace('/', ' with ')} steps (the evaluate step's grid, "
                   "first rows of its evaluation set):", "", f"![tuned samples]({GRID})", ""]  # fmt: skip
        if BASE_GRID in grids:
            samples += [
                "The base model on the same noise and conditions:",
                "",
                f"![base samples]({BASE_GRID})",
                "",
            ]
    else:
        samples = ["No sample grid: the evaluation report had none.", ""]
    diffusers_line = (
        '`pipe = StableDiffusionPipeline.from_pretrained(BASE); pipe.load_lora_weights("model/artifacts/adapter")`'
        if kind == "prompt" else
        "diffusers has no LoRA loader for this model's `UNet2DModel`: use the fused export below")  # fmt: skip
    lines = [
        f"# {model_name}",
        "",
        f"A diffusion model fine-tuned with {algorithm.upper() if algorithm != 'qlearning' else 'q-learning'} "
        f"for the reward `{params.reward.name}` by ctrl-pipeline: the base checkpoint below with a LoRA adapter "
        "(rank "
        f"{params.model.lora_rank}), logged as an MLflow pyfunc model that generates images for "
        f"{'prompts' if kind == 'prompt' else 'class labels' if kind == 'label' else 'rows (unconditional)'}.",
        "",
        "## Base model",
        "",
        "| source | sha256 | in this model |",
        "|---|---|---|",
        f"| `{manifest['source']}` | `{manifest['sha256']}` | "
        f"{'bundled (artifacts/checkpoint/)' if bundled else 'referenced (artifacts/checkpoint.json), fetched and verified at load'} |",
        "",
        "## Method and parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *method_rows,
        "",
        "All parameters: `artifacts/params.json` (the run's params.yaml, resolved).",
        "",
        "## Evaluation",
        "",
        "Mean reward of the base and tuned models on the same noise and conditions; gain with its 95% CI. "
        "KL (exact): the KL of the tuned from the base discrete chain (sum of per-step Gaussian KLs), for the "
        "stochastic samplers; — for a deterministic one (ode, heun), which has no path KL. KL (Thm 3.1): Theorem "
        "3.1's running-reward integral, the continuous-time SDE's path KL; on an ode or heun row it is that "
        "integral along deterministic paths, not a path KL.",
        "",
        "| sampler | steps | base | tuned | gain (95% CI) | KL (exact) | KL (Thm 3.1) |",
        "|---|---|---|---|---|---|---|",
        *eval_rows,
        "",
        f"Robustness ratio (min gain / gain at the training step count): "
        f"{'n/a' if ratio is None else format(float(ratio), '.3f')}",
        "",
        "## Samples",
        "",
        *samples,
        "## Lineage",
        "",
        "| | |",
        "|---|---|",
        f"| MLflow run | `{run_id}` |",
        f"| MLflow model | `models:/{model_id}` |" if model_id else "| MLflow model | (not logged) |",
        f"| git sha | `{lineage.get('git_sha', '')}` |",
        f"| params digest | `{lineage.get('params_hash', '')}` |",
        f"| DVC revision (dvc.lock hash) | `{lineage.get('dvc_revision', '') or 'n/a (not run in a DVC project)'}` |",
        f"| checkpoint sha256 | `{manifest['sha256']}` |",
        "",
        "## How to load it",
        "",
        "MLflow (in Python, or `mlflow models serve -m models:/"
        + model_name
        + "@champion --env-manager local` "
        "and POST `/invocations`):",
        "",
        "```python",
        "import mlflow, pandas as pd",
        f'model = mlflow.pyfunc.load_model("models:/{model_name}@champion")',
        f'images = model.predict(pd.DataFrame({{"{column}": {example}}}), params={{"steps": '
        f'{params.optimize.train_steps}, "sampler": "sde", "seed": 0}})  # base64 PNGs + shapes',
        "```",
        "",
        f"diffusers: {diffusers_line}.",
        "",
        "A complete diffusers pipeline with the LoRA merged (`DiffusionPipeline.from_pretrained(OUT)`):",
        "",
        "```sh",
        f"mlflow artifacts download -u models:/{model_name}@champion -d model",
        "ctrl export --fused OUT --checkpoint model/artifacts/checkpoint --adapter model/artifacts/adapter",
        "```",
        "",
    ]
    if not bundled:
        lines[-3] = ("ctrl export --fused OUT --checkpoint CHECKPOINT --adapter model/artifacts/adapter  "
                     "# CHECKPOINT: the source above, fetched")  # fmt: skip
    return "\n".join(lines)

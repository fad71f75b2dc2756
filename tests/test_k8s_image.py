"""The image (no docker here: the Dockerfile is linted, and the package is installed the way the image
installs it), and the scheduled-retraining CI workflow."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]


def _constraint(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(rf"^{re.escape(name)}==(\S+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def _dockerfile():
    parser = pytest.importorskip("dockerfile_parse", reason="the k8s extra (make setup installs it)")
    return parser.DockerfileParser(str(REPO / "Dockerfile"))


def test_dockerfile_lint():
    df = _dockerfile()
    instructions = [(i["instruction"], i["value"]) for i in df.structure if i["instruction"] != "COMMENT"]
    base = df.baseimage
    # a pinned CUDA PyTorch base whose torch is the version the project holds
    assert re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base), base
    assert base.split(":")[1].split("-")[0] == _constraint("torch")
    assert [k for k, _ in instructions].count("FROM") == 1
    assert not any(k == "ADD" for k, _ in instructions), "use COPY (ADD fetches URLs and unpacks archives)"
    runs = " ".join(v for k, v in instructions if k == "RUN")
    assert re.search(
        r'pip install -c constraints\.txt "\.\[pipeline[,\]]', runs
    )  # the install CI and make use
    assert "PIP_NO_CACHE_DIR=1" in df.content and "-e " not in runs  # no cache layer, not editable
    assert "apt-get" not in runs or "--no-install-recommends" in runs
    assert not re.search(r"(curl|wget)[^|]*\|\s*(ba)?sh", runs), "no piping downloads into a shell"
    # the final user is non-root (numeric, so runAsNonRoot can verify it)
    users = [v for k, v in instructions if k == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert [k for k, _ in instructions].index("USER") > max(
        i for i, (k, _) in enumerate(instructions) if k == "RUN"
    )
    assert all(v.startswith("/") for k, v in instructions if k == "WORKDIR")
    for k, v in instructions:
        if k in ("CMD", "ENTRYPOINT"):
            assert v.strip().startswith("["), f"{k} in exec (JSON) form"
    env = df.envs
    assert not [n for n in env if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", n)], (
        "no credentials in the image"
    )
    assert env["CTRL_CHART"] == "/opt/ctrl-pipeline/charts/ctrl-pipeline"
    ignored = (REPO / ".dockerignore").read_text().split()
    for must in (".git", ".venv", "mlflow.db", "outputs", ".env"):
        assert must in ignored, f".dockerignore must exclude {must}"


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        p = pat.removeprefix("**/")
        if (
            fnmatch.fnmatch(rel, pat)
            or any(fnmatch.fnmatch("/".join(parts[: i + 1]), p) for i in range(len(parts)))
            or (pat.startswith("**/") and any(fnmatch.fnmatch(x, p) for x in parts))
        ):
            return True
    return False


def _build_context(dest: Path) -> Path:
    """The files `COPY . /opt/ctrl-pipeline` sees: the git-tracked and new files minus .dockerignore."""
    patterns = [p for p in (REPO / ".dockerignore").read_text().split() if not p.startswith("#")]
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in listed:
        src = REPO / rel
        if src.is_file() and not _dockerignored(rel, patterns):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the build context")
def test_package_installs_as_the_image_installs_it(tmp_path):
    """Build the wheel from the Docker build context and install it non-editable into a fresh environment
    (its dependencies: this venv's site-packages, so no torch download); the console script then runs,
    finds the chart as the image's CTRL_CHART does, and compiles with placement."""
    ctx = _build_context(tmp_path / "ctx")
    assert (ctx / "charts/ctrl-pipeline/values.schema.json").is_file() and (ctx / "params.yaml").is_file()
    assert not (ctx / "tests").exists() and not (ctx / ".venv").exists()
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(ctx)],
        check=True,
        cwd=tmp_path,
        timeout=180,
    )
    (wheel,) = wheels.glob("ctrl_pipeline-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    vpy = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(vpy), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=120,
    )
    site = subprocess.run(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies (a plain path entry: this venv's editable install of the project is not activated)
    Path(site, "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {
        **os.environ,
        "CTRL_CHART": str(ctx / "charts/ctrl-pipeline"),
        "PYTHONPATH": "",
        "HOME": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    probe = subprocess.run(
        [
            str(vpy),
            "-c",
            "import ctrl_core, pipelines.placement, importlib.metadata as m, pathlib; "
            "print(ctrl_core.__file__); "
            "print(any(p.suffix == '.safetensors' for p in pathlib.Path(ctrl_core.__file__).parent.glob('weights/*'))); "
            "print(' '.join(m.requires('ctrl-pipeline')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    ).stdout.splitlines()
    assert probe[0].startswith(site), probe  # the installed copy, not the repository
    assert probe[1] == "True"  # package data (the embedded default's weights) is in the wheel
    assert 'kfp==2.17.0; extra == "pipeline"' in probe[2] and "kfp-kubernetes" in probe[2]
    out = tmp_path / "p.yaml"
    compiled = subprocess.run(
        [
            str(venv / "bin" / "ctrl"),
            "compile",
            "-f",
            str(ctx / "charts/ctrl-pipeline/values.yaml"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=180,
    )
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert "nvidia.com/gpu" in out.read_text()


def test_retrain_workflow_compiles_and_submits_with_ci_secrets():
    wf = yaml.safe_load((REPO / ".github/workflows/retrain.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as true
    assert on["schedule"][0]["cron"].count(" ") == 4 and "workflow_dispatch" in on
    (job,) = wf["jobs"].values()
    for var in ("KFP_HOST", "KFP_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"):
        assert job["env"][var] == "${{ secrets." + var + " }}", var
    script = "\n".join(s.get("run", "") for s in job["steps"]).replace("\\\n", " ")
    commands = [line.strip() for line in script.splitlines() if line.strip().startswith("ctrl ")]
    assert [c.split()[1] for c in commands] == ["compile", "submit"]
    assert 'pip install -c constraints.txt ".[pipeline]"' in script
    for cmd in commands:
        name = cmd.split()[1]
        options = set(re.findall(r"(?:^|\s)(--?[a-z][-a-z]*)", cmd))
        known = {o for p in main.commands[name].params for o in p.opts}
        assert options <= known, f"ctrl {name}: unknown options {options - known}"
        help_ = CliRunner().invoke(main, [name, "--help"])
        assert help_.exit_code == 0
    assert (
        re.search(r"secrets\.", yaml.safe_dump(job["steps"])) is None
    )  # secrets only through env, never inline

"""Fault campaign: invalid inputs, S3 faults, registry crashes and races, SIGKILLed steps.

    python -m bench.faults [--quick] [--seed 0] --json OUT

Writes ``kills_tried``, ``kills_survived``, ``invalid_tried``, ``invalid_rejected``, ``s3_faults_tried``,
``s3_faults_survived``, ``worse_promotions`` (must be 0), ``lost_iterations`` (must be 0), ``ok`` and a
``details`` entry per campaign. The servers are the tests' own (tests/s3_server.py: moto over HTTP;
tests/s3_faults.py: the fault-injecting proxy); MLflow is a local sqlite store. ``--quick`` runs smaller
campaigns (under 5 minutes on 2 cores, about 2 of them for the kill campaign).

* invalid: schema-derived invalid parameters (tests/test_fuzz_inputs.py's strategies) through
  ``params.validate`` and through the real ``ctrl run`` CLI; rejected = a ParamsError / usage error naming
  the field, and (CLI) no output folder, no MLflow database, within 3 s.
* s3: fetch_checkpoint through the proxy under random fault schedules; survived = the exact bytes with the
  expected hash, or a CheckpointError with nothing left at dest and no temporary folder.
* registry: random evaluation tables registered in sequence (a promotion to a model worse than the
  champion it replaces counts in ``worse_promotions``), two processes registering one run_key at once
  (must give one version), and a SIGKILL at every fault point of a registration followed by a retry (must
  converge: one version, aliases applied).
* kills: ``bench.kill_campaign.run_kill_campaign`` (SIGKILL the training steps, resume, compare bitwise).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

from ctrl_core import progress

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def _tests_on_path() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


# -- 1. invalid inputs -----------------------------------------------------------------------------------


def invalid_campaign(n_validate: int, n_cli: int, seed: int) -> dict:
    _tests_on_path()
    from click.testing import CliRunner
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hyp_seed
    from test_fuzz_inputs import CLI_BUDGET_S, _yaml_scalar, invalid_field

    from ctrl_core.params import ParamsError, validate
    from pipelines.cli import main

    failures: list[dict] = []
    counts = {"validate": 0, "cli": 0}
    rejected = {"validate": 0, "cli": 0}
    common = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}

    @hyp_seed(seed)
    @settings(max_examples=n_validate, **common)
    @given(case=invalid_field())
    def through_validate(case):
        raw, field = case
        counts["validate"] += 1
        try:
            validate(raw)
        except ParamsError as err:
            if field in str(err):
                rejected["validate"] += 1
                return
            failures.append({"via": "validate", "raw": repr(raw), "error": str(err)[:300]})
            return
        failures.append({"via": "validate", "raw": repr(raw), "error": "ACCEPTED"})

    runner = CliRunner()
    work_root = Path(tempfile.mkdtemp(prefix="faults-cli-"))

    @hyp_seed(seed + 1)
    @settings(max_examples=n_cli, **common)
    @given(case=invalid_field(), via_file=__import__("hypothesis").strategies.booleans())
    def through_cli(case, via_file):
        raw, field = case
        counts["cli"] += 1
        work = work_root / uuid.uuid4().hex[:8]
        work.mkdir()
        ((block, inner),) = raw.items()
        ((key, value),) = inner.items()
        if via_file:
            import yaml

            (work / "p.yaml").write_text(yaml.safe_dump(raw))
            args = ["run", "--params", "p.yaml"]
        else:
            args = ["run", "--set", f"{block}.{key}={_yaml_scalar(value)}"]
        db = work / "tracking.db"
        cwd = os.getcwd()
        os.chdir(work)
        try:
            t0 = time.perf_counter()
            res = runner.invoke(
                main,
                args,
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "CTRL_CHECKPOINT_ROOT": str(work / "ckpts")},
            )
            elapsed = time.perf_counter() - t0
        finally:
            os.chdir(cwd)
        left = sorted(p.name for p in work.iterdir() if p.name != "p.yaml")
        ok = (
            res.exit_code == 2
            and field in res.output
            and not left
            and not db.exists()
            and elapsed < CLI_BUDGET_S
        )
        if ok:
            rejected["cli"] += 1
        else:
            failures.append(
                {
                    "via": "cli",
                    "args": args,
                    "exit": res.exit_code,
                    "left": left,
                    "elapsed_s": round(elapsed, 2),
                    "output": res.output[-300:],
                }
            )

    t0 = time.perf_counter()
    through_validate()
    through_cli()
    shutil.rmtree(work_root, ignore_errors=True)
    return {
        "tried": counts["validate"] + counts["cli"],
        "rejected": rejected["validate"] + rejected["cli"],
        "by_path": {k: {"tried": counts[k], "rejected": rejected[k]} for k in counts},
        "failures": failures[:20],
        "seconds": round(time.perf_counter() - t0, 1),
    }


# -- 2. S3 faults ------------------------------------------------------------------------------------------


def s3_campaign(n: int, seed: int) -> dict:
    _tests_on_path()
    import hashlib

    import boto3
    import torch
    from botocore.config import Config
    from s3_faults import Fault, FaultyS3Proxy
    from s3_server import local_s3_server, patched_env
    from safetensors.torch import save

    from ctrl_core.checkpoints import CheckpointError, fetch_checkpoint, tree_sha256

    rng = random.Random(seed)
    kinds = [("status", "GET"), ("status", "HEAD"), ("drop", "GET"), ("drop", "HEAD"), ("truncate", "GET"),
             ("short", "GET"), ("corrupt", "GET")]  # fmt: skip
    results: list[dict] = []
    t0 = time.perf_counter()
    with local_s3_server() as upstream, FaultyS3Proxy(upstream) as proxy:
        files = {f"unet{i}.safetensors": save({"w": torch.randn(2048 + 512 * i, generator=torch.Generator().manual_seed(i))})
                 for i in range(2)}  # fmt: skip
        bucket = "fault-campaign"
        for cfg in ("when_supported", "when_required"):  # with and without botocore's CRC32 on the object
            client = boto3.client(
                "s3", endpoint_url=upstream, config=Config(request_checksum_calculation=cfg)
            )
            if cfg == "when_supported":
                client.create_bucket(Bucket=bucket)
            for rel, data in files.items():
                client.put_object(Bucket=bucket, Key=f"{cfg}/tree/{rel}", Body=data)
            client.put_object(
                Bucket=bucket, Key=f"{cfg}/one/unet.safetensors", Body=files["unet0.safetensors"]
            )
        hashes = {rel: hashlib.sha256(d).hexdigest() for rel, d in files.items()}
        sources = {
            "one": (hashes["unet0.safetensors"], {"unet.safetensors": files["unet0.safetensors"]}),
            "tree": (tree_sha256(hashes), files),
        }
        work = Path(tempfile.mkdtemp(prefix="faults-s3-"))
        with patched_env({"AWS_ENDPOINT_URL_S3": proxy.endpoint, "AWS_MAX_ATTEMPTS": "3"}):
            for i in range(n):
                proxy.clear()
                schedule = []
                for _ in range(rng.randint(1, 3)):
                    kind, method = rng.choice(kinds)
                    times = rng.choice([1, 1, 2, 3, 6])  # 6 > any retry budget: must fail cleanly
                    body = kind in ("truncate", "short", "corrupt")
                    proxy.add(
                        Fault(
                            kind,
                            times=times,
                            method=method,
                            status=rng.choice([500, 503]),
                            path_contains=".safetensors" if body else "",
                        )
                    )
                    schedule.append(f"{kind}/{method}x{times}")
                which, cfg = rng.choice(["one", "tree"]), rng.choice(["when_supported", "when_required"])
                expected, content = sources[which]
                source = f"s3://{bucket}/{cfg}/{which}/"
                case = work / f"c{i}"
                case.mkdir()
                dest = case / "ckpt"
                pre_existing = rng.random() < 0.3
                if pre_existing:  # an older good copy of another source sits in dest
                    (dest / "old").mkdir(parents=True)
                    (dest / "old" / "keep.txt").write_text("old")
                try:
                    m = fetch_checkpoint(source, dest, expected)
                    outcome = "fetched"
                    survived = m.sha256 == expected and all(
                        (dest / r).read_bytes() == d for r, d in content.items()
                    )
                except CheckpointError as e:
                    outcome = f"failed: {str(e)[-120:]}"
                    kept = (dest / "old" / "keep.txt").is_file() if pre_existing else not dest.exists()
                    survived = kept
                leftovers = [p.name for p in case.iterdir() if p.name != "ckpt"]
                survived = survived and not leftovers
                results.append(
                    {
                        "schedule": schedule,
                        "source": f"{cfg}/{which}",
                        "outcome": outcome,
                        "injected": proxy.injected(),
                        "survived": survived,
                        "leftovers": leftovers,
                    }
                )
        shutil.rmtree(work, ignore_errors=True)
    return {
        "tried": len(results),
        "survived": sum(r["survived"] for r in results),
        "fetched": sum(r["outcome"] == "fetched" for r in results),
        "failed_cleanly": sum(r["outcome"] != "fetched" and r["survived"] for r in results),
        "faults_injected": sum(r["injected"] for r in results),
        "cases": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# -- 3. registry ---------------------------------------------------------------------------------------------


def _random_evaluation(rng: random.Random, around: dict | None = None) -> dict:
    """A random evaluation table; with ``around`` (the champion's), a perturbation of it whose cells land on both
    sides of the gate's tolerance, so that promotions and refusals are both frequent and many are borderline."""
    cells = rng.sample([(s, k) for s in ("sde", "ode") for k in ("10", "20", "50")], rng.randint(2, 6))
    out: dict = {}
    for sampler, steps in cells:
        ref = (around or {}).get(sampler, {}).get(steps)
        if ref is not None:
            base, tuned = ref["base"], ref["tuned"] + rng.gauss(0.0, 0.04)
        else:
            base = rng.uniform(-1, 1)
            tuned = base + rng.uniform(-0.2, 0.6)
        out.setdefault(sampler, {})[steps] = {"base": base, "tuned": tuned, "gain": tuned - base, "kl": 0.01}
    return out


def _worse(candidate: dict, champ: dict, tolerance: float) -> bool:
    for sampler, cells in candidate.items():
        for steps, cell in cells.items():
            other = champ.get(sampler, {}).get(steps)
            if other is not None and not cell["tuned"] >= other["tuned"] - tolerance:
                return True
    return False


_REGISTER = r"""
import json, os, sys, time
uri, name, key, ev, go = sys.argv[1:6]
from pipelines.registry import GateConfig, register_run
while go and not os.path.exists(go):
    time.sleep(0.005)
r = register_run(model_name=name, run_key=key, params={"p": 1}, metrics={}, evaluation=json.loads(ev),
                 artifacts={}, lineage={}, gate=GateConfig(), tracking_uri=uri)
print("RESULT", json.dumps({"version": r.version, "created": r.created}))
"""


def registry_campaign(n_sequence: int, crash_points: tuple[str, ...], racers: int, seed: int) -> dict:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    from pipelines import registry
    from pipelines.registry import GateConfig, register_run

    rng = random.Random(seed)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="faults-registry-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def reg(name, key, ev, tolerance=0.0):
        return register_run(
            model_name=name,
            run_key=key,
            params={"p": 1},
            metrics={},
            evaluation=ev,
            artifacts={},
            lineage={},
            gate=GateConfig(tolerance=tolerance),
            tracking_uri=uri,
        )

    # (a) promotions over random sequences
    promotions = worse = 0
    name = "gate-campaign"
    tolerance = 0.05
    champ_eval = None
    for i in range(n_sequence):
        ev = _random_evaluation(rng, champ_eval if rng.random() < 0.7 else None)
        before = registry.champion(name, tracking_uri=uri)
        r = reg(name, f"seq-{i}", ev, tolerance)
        if r.promoted and r.version != before:
            promotions += 1
            worse += champ_eval is not None and _worse(ev, champ_eval, tolerance)
            champ_eval = ev

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    ev_json = json.dumps(_random_evaluation(rng))

    # (b) racers registering one run_key at once
    go = work / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER, uri, "race", "race-key", ev_json, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(racers)
    ]
    time.sleep(1.0)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    results = [json.loads(o.split("RESULT ", 1)[1]) for o, _ in outs if "RESULT " in o]
    versions = client.search_model_versions("name = 'race'")
    race = {
        "racers": racers,
        "finished": len(results),
        "versions": len(versions),
        "created": sum(r["created"] for r in results),
        "ok": len(results) == racers and len(versions) == 1 and sum(r["created"] for r in results) == 1,
    }

    # (c) SIGKILL at each fault point, then retry
    crashes = []
    for point in crash_points:
        model = f"crash-{point}"
        reg(model, f"{model}-champion", {"sde": {"10": {"base": 0, "tuned": 0.1, "gain": 0.1}}})
        ev = {"sde": {"10": {"base": 0, "tuned": 0.3, "gain": 0.3}}}
        p = subprocess.run(
            [sys.executable, "-c", _REGISTER, uri, model, f"{model}-new", json.dumps(ev), ""],
            env={**env, registry.FAULT_ENV: point},
            capture_output=True,
            text=True,
            timeout=300,
        )
        killed = p.returncode == -9
        r = reg(model, f"{model}-new", ev)
        live = sorted(int(v.version) for v in client.search_model_versions(f"name = '{model}'"))
        tags = client.get_model_version(model, str(r.version)).tags
        ok = (
            killed
            and live == [1, 2]
            and r.version == 2
            and r.promoted
            and tags.get(registry.TAG_ALIASES_DONE) == "true"
        )
        crashes.append(
            {"point": point, "killed": killed, "versions": live, "aliases": r.aliases, "converged": ok}
        )
    shutil.rmtree(work, ignore_errors=True)
    return {
        "worse_promotions": int(worse),
        "sequence": {
            "registrations": n_sequence,
            "promotions": promotions,
            "refusals": n_sequence - promotions,
            "tolerance": tolerance,
        },
        "race": race,
        "crashes": crashes,
        "ok": worse == 0 and race["ok"] and all(c["converged"] for c in crashes),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# -- 4. kills ---------------------------------------------------------------------------------------------------


def kill_campaign(quick: bool, seed: int) -> dict:
    try:
        from bench.kill_campaign import run_kill_campaign
    except ImportError as e:
        return {"error": f"bench.kill_campaign is not available: {e}"}
    return run_kill_campaign(quick=quick, seed=seed)


# -- main ---------------------------------------------------------------------------------------------------------


def _guard(name: str, fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # a campaign that crashes is reported, never turned into numbers
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


def run(quick: bool, seed: int) -> dict:
    t0 = time.perf_counter()
    size = {"validate": 150, "cli": 40, "s3": 16, "seq": 12, "racers": 2,
            "points": ("after_create_version", "after_challenger_alias")} if quick else \
        {"validate": 1500, "cli": 300, "s3": 80, "seq": 60, "racers": 3,
         "points": ("after_create_run", "after_create_version", "after_gate_tags", "after_challenger_alias")}  # fmt: skip
    with progress.Bar("bench.faults", "campaigns", 4) as bar:
        invalid = _guard("invalid", invalid_campaign, size["validate"], size["cli"], seed)
        bar.update(1, invalid_rejected=invalid.get("rejected", 0))
        s3 = _guard("s3", s3_campaign, size["s3"], seed)
        bar.update(2, s3_survived=s3.get("survived", 0))
        reg = _guard("registry", registry_campaign, size["seq"], size["points"], size["racers"], seed)
        bar.update(3, worse_promotions=reg.get("worse_promotions", -1))
        kills = _guard("kills", kill_campaign, quick, seed)
        bar.update(4, kills_survived=kills.get("kills_survived", 0))

    def get(d: dict, key: str):
        return d.get(key) if "error" not in d else None

    out = {
        "kills_tried": get(kills, "kills_tried"),
        "kills_survived": get(kills, "kills_survived"),
        "invalid_tried": get(invalid, "tried"),
        "invalid_rejected": get(invalid, "rejected"),
        "s3_faults_tried": get(s3, "tried"),
        "s3_faults_survived": get(s3, "survived"),
        "worse_promotions": get(reg, "worse_promotions"),
        "lost_iterations": get(kills, "lost_iterations"),
        "overlap_survived": (get(kills, "overlap") or {}).get("survived"),  # two live attempts of one run
    }
    out["ok"] = (
        None not in out.values()
        and out["kills_survived"] == out["kills_tried"]
        and out["invalid_rejected"] == out["invalid_tried"]
        and out["s3_faults_survived"] == out["s3_faults_tried"]
        and out["worse_promotions"] == 0
        and out["lost_iterations"] == 0
        and out["overlap_survived"] is True
        and reg.get("ok") is True
    )
    out.update(
        {
            "quick": quick,
            "seed": seed,
            "seconds": round(time.perf_counter() - t0, 1),
            "details": {"invalid": invalid, "s3": s3, "registry": reg, "kills": kills},
        }
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller campaigns (< 5 min on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True, help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    out = run(args.quick, args.seed)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    keys = (
        "kills_tried",
        "kills_survived",
        "invalid_tried",
        "invalid_rejected",
        "s3_faults_tried",
        "s3_faults_survived",
        "worse_promotions",
        "lost_iterations",
        "overlap_survived",
        "ok",
        "seconds",
    )
    print(json.dumps({k: out[k] for k in keys}))
    sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()

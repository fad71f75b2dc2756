"""SMOKE TEST of the GPU benchmark harness (bench/gpu.py) on the CPU with a tiny model.

It checks that the harness runs end to end and writes every key as a finite positive number. The numbers it
produces are NOT performance results (random tiny weights on a CPU); the real run is on an H100/H200.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import gpu

torch.set_num_threads(1)

KEYS = (
    "device",
    "ctrl_over_ddpo",
    "unet_mfu",
    "images_per_s",
    "matmul_peak_tflops",
    "unet_tflops_per_forward",
    "seconds_per_iteration",
    "peak_memory_gb",
    "setting",
    "versions",
    "tiny",
)


def test_gpu_bench_harness_smoke_tiny_cpu(tmp_path, monkeypatch):
    """Harness smoke test only: not a performance claim."""
    monkeypatch.setenv("CTRL_DEVICE", "cpu")
    out_path = tmp_path / "gpu_tiny.json"
    gpu.main(
        [
            "--tiny",
            "--batch",
            "2",
            "--steps",
            "4",
            "--train-timesteps",
            "2",
            "--minibatch",
            "2",
            "--iterations",
            "1",
            "--designs",
            "conv/fd,conv_tiny/td_beta0,paper_tiny/td,latent_only/td",
            "--json",
            str(out_path),
        ]
    )
    out = json.loads(out_path.read_text())
    assert all(k in out for k in KEYS)
    assert out["tiny"] is True and out["performance_claim"] is False and out["device"].startswith("cpu")
    for k in (
        "ctrl_over_ddpo",
        "unet_mfu",
        "images_per_s",
        "matmul_peak_tflops",
        "unet_tflops_per_forward",
        "peak_memory_gb",
    ):
        assert math.isfinite(out[k]) and out[k] > 0, k
    for alg in ("ctrl", "ddpo"):
        t = out["seconds_per_iteration"][alg]
        assert all(math.isfinite(t[p]) and t[p] >= 0 for p in ("total", "sample", "value", "policy"))
        assert t["total"] > 0
    assert out["unet_forward_batch"] == 4  # CFG: both halves in one UNet call
    assert list(out["ctrl_over_ddpo_by_design"]) == [
        "conv/fd",
        "conv_tiny/td_beta0",
        "paper_tiny/td",
        "latent_only/td",
    ]
    assert (
        out["ctrl_over_ddpo"] == out["ctrl_over_ddpo_by_design"]["conv/fd"]
        and out["ctrl_design"] == "conv/fd"
    )
    assert out["complete"] is True and out["skipped_designs"] == {}
    assert (
        out["sampling_mismatch"]["approx_kl"] < 1e-5 and out["sampling_mismatch"]["clipfrac"] == 0.0
    )  # float32
    assert out["phases_done"] == [
        "build",
        "unet_forward",
        "sampling",
        "ddpo",
        "ctrl conv/fd",
        "ctrl conv_tiny/td_beta0",
        "ctrl paper_tiny/td",
        "ctrl latent_only/td",
    ]
    assert not list(tmp_path.glob("*.tmp"))  # atomic rewrites leave no temporary file
    with pytest.raises(SystemExit, match="DESIGN/VARIANT"):
        gpu.main(["--tiny", "--designs", "conv/ppo", "--json", str(tmp_path / "x.json")])


def test_tiny_numbers_are_not_written_as_gpu_results():
    with pytest.raises(SystemExit, match="refusing"):
        gpu.main(["--tiny", "--json", str(gpu.DEFAULT_JSON)])


def test_budget_skips_designs_and_keeps_what_was_measured(tmp_path, monkeypatch):
    """A run out of --budget-s skips the CTRL designs it cannot finish; the JSON written after each phase holds
    the measured ones (complete: false when nothing of CTRL could be timed, and the run says why). With
    --merged-sampling."""
    monkeypatch.setenv("CTRL_DEVICE", "cpu")
    out_path = tmp_path / "gpu_tiny.json"
    argv = [
        "--tiny",
        "--batch",
        "2",
        "--steps",
        "2",
        "--train-timesteps",
        "1",
        "--minibatch",
        "2",
        "--iterations",
        "1",
        "--designs",
        "conv/td,latent_only/td",
        "--merged-sampling",
        "--old-log-probs",
        "trainer",
        "--json",
        str(out_path),
    ]
    with pytest.raises(SystemExit, match="left no time for any CTRL design"):
        gpu.main([*argv, "--budget-s", "0.01"])
    partial = json.loads(out_path.read_text())
    assert partial["complete"] is False and partial["phases_done"] == [
        "build",
        "unet_forward",
        "sampling",
        "ddpo",
    ]
    assert partial["seconds_per_iteration"]["ddpo"]["total"] > 0 and partial["unet_mfu"] > 0
    assert "ctrl_over_ddpo" not in partial
    # --merged-sampling: sampling through the float32 merged copy; its log-probs are the trainer's
    ddpo = partial["seconds_per_iteration"]["ddpo"]  # --old-log-probs trainer: its cost and the gap it found
    assert ddpo["recompute_s"] > 0 and ddpo["sampler_clipfrac"] == 0.0 and ddpo["approx_kl"] >= 0
    assert partial["setting"]["merged_sampling"] is True and partial["sampling_mismatch"]["clipfrac"] == 0.0
    assert partial["sampling_mismatch"]["approx_kl"] < 1e-5


def test_forward_only_stops_after_mfu_and_sampling(tmp_path, monkeypatch):
    monkeypatch.setenv("CTRL_DEVICE", "cpu")
    out = gpu.main(
        ["--tiny", "--batch", "2", "--steps", "2", "--forward-only", "--json", str(tmp_path / "f.json")]
    )
    assert out["complete"] is True and out["phases_done"] == ["build", "unet_forward", "sampling"]
    assert out["unet_mfu"] > 0 and out["images_per_s"] > 0 and "seconds_per_iteration" not in out
    assert json.loads((tmp_path / "f.json").read_text())["setting"]["forward_only"] is True


def test_inductor_tuning_sets_the_flags_it_reports():
    import torch._inductor.config as cfg

    names = (
        "conv_1x1_as_mm",
        "coordinate_descent_tuning",
        "coordinate_descent_check_all_directions",
        "epilogue_fusion",
    )
    saved = {k: getattr(cfg, k) for k in names if hasattr(cfg, k)}
    try:
        applied = gpu.inductor_tuning()
        assert applied and set(applied) <= set(names)
        assert all(getattr(cfg, k) == v for k, v in applied.items())
    finally:
        for k, v in saved.items():
            setattr(cfg, k, v)

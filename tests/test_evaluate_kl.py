"""Evaluation reports the exact KL of the discrete chain beside Theorem 3.1's sum, for every solver the engine
samples with (issue 15, items 3 and 8): a stochastic sampler's row carries both, a deterministic sampler's row
has no exact KL (None, never NaN), and every reader of the evaluation (report, MLflow metrics, model card, the
CLI summary) shows the two columns."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ctrl_core.evaluate import Cell, evaluate, robustness_ratio, training_sampler
from ctrl_core.models import AffineCorrection, GaussianScoreModel
from ctrl_core.params import ParamsError, validate
from ctrl_core.policy import GaussianScorePolicy
from ctrl_core.report import html_report, markdown_report
from ctrl_core.schedule import LinearVPSchedule

ALL_SAMPLERS = ["sde", "ode", "euler_maruyama", "heun"]


def _tilted_policy() -> GaussianScorePolicy:
    """A 2-D Gaussian whose 'tuned' model is the exact score plus a random affine correction (the pretrained
    model: the correction switched off), so the two chains differ and every KL is positive."""
    torch.manual_seed(0)
    corr = AffineCorrection(2)
    torch.nn.init.normal_(corr.net[-1].weight, std=0.3)
    torch.nn.init.normal_(corr.net[-1].bias, std=0.3)
    model = GaussianScoreModel(LinearVPSchedule(), torch.tensor([0.5, -1.0]), torch.tensor([0.7, 1.2]), corr)
    return GaussianScorePolicy(model, "ddpm")


def _reward(x: torch.Tensor, c) -> torch.Tensor:
    return -0.5 * (x - 2.0).pow(2).sum(1)


@pytest.fixture(scope="module")
def all_solvers():
    return evaluate(_tilted_policy(), _reward, (2,), [1, 10], ALL_SAMPLERS, 64, seed=3)[0]


def test_every_solver_is_evaluated_with_the_exact_kl_where_the_chain_is_stochastic(all_solvers):
    assert list(all_solvers) == ALL_SAMPLERS
    for smp in ALL_SAMPLERS:
        cell = all_solvers[smp]["10"]
        assert cell.kl == cell.kl_thm31 > 0, (smp, cell)  # the old key is Theorem 3.1's sum
        if smp in ("ode", "heun"):  # deterministic: no path density, no path KL
            assert cell.kl_exact is None, (smp, cell)
        else:
            assert cell.kl_exact is not None and cell.kl_exact > 0, (smp, cell)
    # Euler-Maruyama's per-step KL is Theorem 3.1's integrand (tests/test_exact_kl.py): equal on the same paths
    em = all_solvers["euler_maruyama"]["10"]
    assert em.kl_exact == pytest.approx(em.kl_thm31, rel=1e-5)
    # DDPM steps on a coarse grid: the chain's KL exceeds the theorem's sum (docs/method.md, "KL")
    assert all_solvers["sde"]["10"].kl_exact > 1.1 * all_solvers["sde"]["10"].kl_thm31
    # one DDPM step lands on Tweedie's x_hat with no noise: that chain is deterministic too
    assert (
        all_solvers["sde"]["1"].kl_exact is None and all_solvers["euler_maruyama"]["1"].kl_exact is not None
    )


def test_the_evaluation_json_carries_both_kls_and_no_nan(all_solvers):
    evaluation = {smp: {n: c.as_dict() for n, c in cells.items()} for smp, cells in all_solvers.items()}
    text = json.dumps(evaluation, allow_nan=False)  # None is null: JSON/KFP safe
    back = json.loads(text)
    for cells in back.values():
        for cell in cells.values():
            assert {"kl", "kl_thm31", "kl_exact"} <= set(cell) and cell["kl"] == cell["kl_thm31"]
    assert back["ode"]["10"]["kl_exact"] is None and back["heun"]["10"]["kl_exact"] is None
    assert isinstance(back["sde"]["10"]["kl_exact"], float)


def test_two_names_for_one_solver_are_refused():
    with pytest.raises(ValueError, match="twice"):
        evaluate(_tilted_policy(), _reward, (2,), [4], ["sde", "ddpm"], 4)


def _cell(gain: float) -> Cell:
    return Cell(0.0, 0.01, gain, 0.01, gain, 0.01, 0.1, None)


def test_the_robustness_ratio_takes_the_training_solvers_own_row():
    results = {"sde": {"20": _cell(0.4), "10": _cell(0.2)}, "heun": {"20": _cell(0.8), "10": _cell(0.6)}}
    by_ddpm = robustness_ratio(results, 20, training_sampler("ddpm"))
    assert by_ddpm["reference_gain"] == 0.4 and by_ddpm["sde"] == pytest.approx(0.5)  # ddpm is the sde row
    assert robustness_ratio(results, 20, "sde") == by_ddpm
    assert robustness_ratio(results, 20, training_sampler("heun"))["reference_gain"] == 0.8
    # a training chain that no evaluated sampler runs: the reference is the largest gain seen
    assert robustness_ratio(results, 20, training_sampler("euler_maruyama"))["reference_gain"] == 0.8
    assert training_sampler("ddim", 1.0) == "ddpm" and training_sampler("ddim", -1.0) == "ddim"
    assert training_sampler("sde") == "ddpm" and training_sampler("ddim", 0.5) is None
    assert robustness_ratio(results, 20, None)["reference_gain"] == 0.8


def _out(evaluation: dict) -> dict:
    return {"evaluation": evaluation, "robustness_ratio": 0.9, "train_steps": 10}


def test_the_reports_show_a_dash_for_a_missing_exact_kl(all_solvers):
    evaluation = {smp: {n: c.as_dict() for n, c in cells.items()} for smp, cells in all_solvers.items()}
    md = markdown_report(_out(evaluation))
    assert "| KL (exact) | KL (Thm 3.1) |" in md and "not a path KL" in md
    ode, sde = evaluation["ode"]["10"], evaluation["sde"]["10"]
    assert f"| ode | 10 | {ode['base']:.4f} |" in md
    assert f"± {ode['gain_ci']:.4f} | — | {ode['kl_thm31']:.4f} |" in md
    assert f"± {sde['gain_ci']:.4f} | {sde['kl_exact']:.4f} | {sde['kl_thm31']:.4f} |" in md
    html = html_report(_out(evaluation), b"png", {})
    assert f"<td>—</td><td>{ode['kl_thm31']:.4f}</td>" in html and "<th>KL (exact)</th>" in html
    # an evaluation written before the two columns (only "kl") still renders
    old = {"sde": {"4": {"base": 0.1, "base_ci": 0.0, "tuned": 0.2, "tuned_ci": 0.0, "gain": 0.1, "gain_ci": 0.0,
                         "kl": 0.05}}}  # fmt: skip
    assert "| — | 0.0500 |" in markdown_report(_out(old))


def test_the_config_accepts_every_solver_and_refuses_a_bad_name_naming_the_key():
    assert validate({"evaluate": {"samplers": ALL_SAMPLERS}}).evaluate.samplers == ALL_SAMPLERS
    for bad in (["sde", "rk4"], ["euler"], ["heun", "heun"]):
        with pytest.raises(ParamsError) as info:
            validate({"evaluate": {"samplers": bad}})
        assert "evaluate.samplers" in str(info.value), bad


def test_mlflow_metrics_log_the_exact_kl_only_where_it_exists(all_solvers):
    from pipelines.registry import _eval_metrics

    evaluation = {smp: {n: c.as_dict() for n, c in cells.items()} for smp, cells in all_solvers.items()}
    metrics = _eval_metrics(evaluation)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["eval/sde/steps10/kl_exact"] == evaluation["sde"]["10"]["kl_exact"]
    assert metrics["eval/heun/steps10/kl_thm31"] == metrics["eval/heun/steps10/kl"]
    assert "eval/heun/steps10/kl_exact" not in metrics and "eval/ode/steps10/kl_exact" not in metrics


def test_the_model_card_and_the_run_summary_show_both_kls(all_solvers, capsys):
    from ctrl_core.config import Params
    from pipelines.cli import _print_summary
    from pipelines.mlflow_model import model_card

    evaluation = {smp: {n: c.as_dict() for n, c in cells.items()} for smp, cells in all_solvers.items()}
    heun, em = evaluation["heun"]["10"], evaluation["euler_maruyama"]["10"]
    card = model_card("m", Params(), {"source": "builtin:digits", "sha256": "0" * 64}, True, "label",
                      _out(evaluation), {}, "run", "", "", {})  # fmt: skip
    assert "| KL (exact) | KL (Thm 3.1) |" in card
    assert f"± {heun['gain_ci']:.4f} | — | {heun['kl_thm31']:.4f} |" in card
    assert f"± {em['gain_ci']:.4f} | {em['kl_exact']:.4f} | {em['kl_thm31']:.4f} |" in card

    summary = {"link": {"chosen": "linear", "mse": {"linear": 0.1}}, "evaluation": evaluation,
               "robustness_ratio": None, "registered": {"name": "m", "version": 1, "aliases": [], "gate_reason": "ok"},
               "report": "r.html", "wall_s": {"total": 1.0}}  # fmt: skip
    _print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    assert any("KL exact" in line and "KL Thm3.1" in line for line in lines)
    heun_line = next(line for line in lines if line.split()[:2] == ["heun", "10"])
    assert heun_line.split()[-2:] == ["—", f"{heun['kl_thm31']:.4f}"]
    em_line = next(line for line in lines if line.split()[:2] == ["euler_maruyama", "10"])
    assert em_line.split()[-2:] == [f"{em['kl_exact']:.4f}", f"{em['kl_thm31']:.4f}"]

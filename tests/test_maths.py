"""Tests that prove the maths (docs/method.md#what-the-tests-prove): solvers, Theorem 3.1, the value boundary,
the PPO gradient."""

from __future__ import annotations

import math

import pytest
import torch

from ctrl_core.algorithms import OptimConfig, Trainer
from ctrl_core.models import AffineCorrection, GaussianScoreModel
from ctrl_core.policy import GaussianScorePolicy, gaussian_log_prob, running_kl, sample, step_coefficients
from ctrl_core.rewards import make_reward
from ctrl_core.schedule import DiscreteVPSchedule, LinearVPSchedule, score_from_model_output, tweedie_x0
from ctrl_core.value import LINKS, MLPResidual, ValueFunction


@pytest.fixture
def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True
    )


def test_discrete_schedule_is_exact_at_training_timesteps(ddim_scheduler):
    sch = DiscreteVPSchedule.from_scheduler(ddim_scheduler)
    ac = ddim_scheduler.alphas_cumprod.double()
    k = torch.tensor([0, 1, 10, 500, 999])
    s = (k + 1).double() / 1000
    torch.testing.assert_close(torch.exp(sch.log_alpha_bar(s)), ac[k], rtol=1e-12, atol=0)
    torch.testing.assert_close(sch.model_time(s), k.double())
    assert float(sch.alpha(0.0)) == 1.0 and float(sch.sigma(0.0)) == 0.0
    # g^2 = beta = -d log alpha_bar / ds, checked by finite differences between knots
    s_mid, h = torch.tensor([0.3005, 0.7005], dtype=torch.float64), 1e-5
    fd = -(sch.log_alpha_bar(s_mid + h) - sch.log_alpha_bar(s_mid - h)) / (2 * h)
    torch.testing.assert_close(sch.g2(s_mid), fd, rtol=1e-6, atol=0)


def test_linear_schedule_sde_coefficients_match_alpha_sigma():
    """For the VP-SDE, f = dlog(alpha)/ds x and g^2 = d sigma^2/ds - 2 dlog(alpha)/ds sigma^2 (App. B)."""
    sch = LinearVPSchedule()
    s, h = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), 1e-6
    dlog_a = (torch.log(sch.alpha(s + h)) - torch.log(sch.alpha(s - h))) / (2 * h)
    dsig2 = (sch.sigma(s + h) ** 2 - sch.sigma(s - h) ** 2) / (2 * h)
    torch.testing.assert_close(-0.5 * sch.beta(s), dlog_a, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sch.g2(s), dsig2 - 2 * dlog_a * sch.sigma(s) ** 2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_score_parametrisations_agree(prediction_type):
    """eps-, v- and x0-prediction of the same (x0, eps) give the same score, and Tweedie recovers x0."""
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
    )
    a, sg = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    x = a * x0 + sg * eps
    out = {"epsilon": eps, "v_prediction": a * eps - sg * x0, "sample": x0}[prediction_type]
    score = score_from_model_output(out, x, a, sg, prediction_type)
    torch.testing.assert_close(score, -eps / sg)
    torch.testing.assert_close(tweedie_x0(score, x, a, sg), x0)


def test_ddim_step_is_the_exponential_integrator_and_matches_diffusers(ddim_scheduler):
    """App. B eq. 36: X_s' = sigma'/sigma X_s + (alpha' - alpha sigma'/sigma) x_hat, and diffusers' DDIM step."""
    sch = DiscreteVPSchedule.from_scheduler(ddim_scheduler)
    ddim_scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    for t, t_prev in [(980, 960), (500, 480), (20, 0)]:
        s, s_prev = (t + 1) / 1000, (t_prev + 1) / 1000
        mu = -eps / sch.sigma(s)
        coef = step_coefficients(sch, "ddim", s, s_prev)
        ours = coef.A * x + coef.B * mu
        a, sg, a2, sg2 = sch.alpha(s), sch.sigma(s), sch.alpha(s_prev), sch.sigma(s_prev)
        xhat = tweedie_x0(mu, x, a, sg)
        eq36 = sg2 / sg * x + (a2 - a * sg2 / sg) * xhat
        torch.testing.assert_close(ours, eq36, rtol=0, atol=1e-12)
        ref = ddim_scheduler.step(eps.float(), t, x.float(), eta=0.0).prev_sample.double()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        # eta = 1 (DDPM posterior) with the same injected noise as diffusers
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
        c1 = step_coefficients(sch, "ddpm", s, s_prev)
        ref1 = ddim_scheduler.step(
            eps.float(), t, x.float(), eta=1.0, variance_noise=noise.float()
        ).prev_sample.double()
        torch.testing.assert_close(c1.A * x + c1.B * mu + c1.std * noise, ref1, rtol=1e-5, atol=1e-5)


def test_exponential_integrator_is_exact_for_constant_x_hat():
    """With x_hat held constant, eq. 33 dX = 1/2 (alpha x_hat - alpha^2 X) dlambda integrates to eq. 36."""
    sch = LinearVPSchedule()
    s, s_next = 0.7, 0.35
    x, xhat = torch.tensor([1.3, -0.4], dtype=torch.float64), torch.tensor([0.2, 0.9], dtype=torch.float64)
    # fine RK4 in lambda
    lam0, lam1 = float(sch.log_snr(s)), float(sch.log_snr(s_next))
    n = 2000
    h = (lam1 - lam0) / n

    def rhs(lam, X):
        alpha = math.sqrt(1 / (1 + math.exp(-lam)))
        return 0.5 * (alpha * xhat - alpha**2 * X)

    X, lam = x.clone(), lam0
    for _ in range(n):
        k1 = rhs(lam, X)
        k2 = rhs(lam + h / 2, X + h / 2 * k1)
        k3 = rhs(lam + h / 2, X + h / 2 * k2)
        k4 = rhs(lam + h, X + h * k3)
        X, lam = X + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), lam + h
    a, sg, a2, sg2 = sch.alpha(s), sch.sigma(s), sch.alpha(s_next), sch.sigma(s_next)
    torch.testing.assert_close(X, sg2 / sg * x + (a2 - a * sg2 / sg) * xhat, rtol=1e-9, atol=1e-9)


def _affine_chain_terminal(model, policy, grid, correction_on: bool):
    """Exact terminal mean/var of the discretised chain when every score is affine in x (1-D, per dim)."""
    m = torch.zeros(model.dim, dtype=torch.float64)
    v = torch.ones(model.dim, dtype=torch.float64)
    ctx = torch.no_grad()
    with ctx:
        for k in range(grid.numel() - 1):
            s, s_next = float(grid[k]), float(grid[k + 1])
            sv = torch.full((1,), s, dtype=torch.float64)
            zero, one = torch.zeros(1, model.dim), torch.ones(1, model.dim)
            if correction_on:
                p, q1 = model.score(sv, zero)[0].double(), model.score(sv, one)[0].double()
            else:
                with model.pretrained():
                    p, q1 = model.score(sv, zero)[0].double(), model.score(sv, one)[0].double()
            q = q1 - p  # mu(x) = p + q x
            coef = policy.coefficients(s, s_next)
            gain = coef.A + coef.B * q
            m, v = gain * m + coef.B * p, gain**2 * v + coef.std**2
    return m, v


def _gauss_kl(m1, v1, m2, v2):
    return float((0.5 * (v1 / v2 + (m1 - m2) ** 2 / v2 - 1 + torch.log(v2 / v1))).sum())


@pytest.mark.parametrize("solver", ["euler_maruyama", "ddpm"])
def test_theorem_3_1_running_reward_is_the_path_kl_and_bounds_the_terminal_kl(solver):
    torch.manual_seed(0)
    sch = LinearVPSchedule()
    corr = AffineCorrection(2)
    torch.nn.init.normal_(corr.net[-1].weight, std=0.3)
    torch.nn.init.normal_(corr.net[-1].bias, std=0.3)
    model = GaussianScoreModel(sch, torch.tensor([0.5, -1.0]), torch.tensor([0.7, 1.2]), corr)
    policy = GaussianScorePolicy(model, solver)
    n, B = 400, 4000
    grid = sch.time_grid(n, s_end=1e-3)  # stop short of s = 0 so every step is stochastic
    g = torch.Generator().manual_seed(0)
    traj = sample(
        policy,
        torch.randn(B, 2, generator=g, dtype=torch.float64),
        None,
        grid,
        g,
        reference_steps=list(range(n)),
    )
    running = running_kl(sch, traj)  # Thm 3.1 integral, per path
    # exact KL between the two discretised path measures: E sum_k log N(x'; m_theta) - log N(x'; m_pre)
    log_ratio = torch.zeros(B, dtype=torch.float64)
    for k in range(n):
        coef = policy.coefficients(float(grid[k]), float(grid[k + 1]))
        x, x_next = traj.states[k], traj.states[k + 1]
        log_ratio += policy.log_prob(coef, x, x_next, traj.means[k]) - policy.log_prob(
            coef, x, x_next, traj.ref_means[k]
        )
    se = float(log_ratio.std() / math.sqrt(B))
    assert abs(float(running.mean()) - float(log_ratio.mean())) < 4 * se + 0.02 * float(running.mean())
    # data-processing: the path KL bounds the terminal KL (exact for these affine-Gaussian chains)
    m1, v1 = _affine_chain_terminal(model, policy, grid, True)
    m2, v2 = _affine_chain_terminal(model, policy, grid, False)
    terminal = _gauss_kl(m1, v1, m2, v2)
    assert terminal > 0.01  # the correction matters, so the comparison has teeth
    assert float(running.mean()) >= terminal
    # and the sampled chain really has that terminal law
    torch.testing.assert_close(
        traj.sample.mean(0), m1.float().double(), atol=4 * float(v1.max().sqrt()) / math.sqrt(B), rtol=0
    )


@pytest.mark.parametrize("link", sorted(LINKS))
def test_value_boundary_condition_for_every_link(link):
    torch.manual_seed(0)
    reward = make_reward("quadratic", target=1.0, k=2.0)
    residual = MLPResidual(3)
    torch.nn.init.normal_(residual.net[-1].bias, mean=5.0)  # a residual far from zero
    value = ValueFunction(reward, residual, link)
    x = torch.randn(16, 3)
    s0 = torch.zeros(16, dtype=torch.float64)
    torch.testing.assert_close(value(s0, x, None, x_hat=x), reward(x, None))  # V(T, x) = RM(x), eq. 18
    # and away from T the residual is used wherever c_out != 0
    s = torch.full((16,), 0.5, dtype=torch.float64)
    c_skip, c_out = LINKS[link](s.float())
    expected = c_skip * reward(x, None) + c_out * residual(s, x)
    torch.testing.assert_close(value(s, x, None, x_hat=x), expected)


def test_clipped_surrogate_gradient_at_ratio_one_is_the_policy_gradient():
    torch.manual_seed(0)
    sch = LinearVPSchedule()
    corr = AffineCorrection(2)
    torch.nn.init.normal_(corr.net[-1].weight, std=0.1)
    model = GaussianScoreModel(sch, torch.zeros(2), torch.ones(2), corr)
    policy = GaussianScorePolicy(model, "ddpm")
    reward = make_reward("quadratic", target=1.0, k=1.0)
    value = ValueFunction(reward, MLPResidual(2), "cos_sin")
    cfg = OptimConfig(batch_size=32, train_steps=10, train_timesteps=4, beta=0.0, clip_range=0.1, lr=3e-4)
    tr = Trainer(policy, reward, cfg, (2,), value=value)
    ro = tr.rollout()
    adv, _ = tr.normalise(tr.advantages(ro))
    idx = torch.arange(32)
    params = tr.params
    ppo = sum(tr.surrogate_loss(ro, adv, k, idx)[0] for k in ro.steps)
    g_ppo = torch.autograd.grad(ppo, params)
    # plain estimator of eq. 21: -sum_k mean(grad log pi(a_k) * q_k) (same weights)
    pg = 0
    for k in ro.steps:
        s, s_next = float(ro.traj.grid[k]), float(ro.traj.grid[k + 1])
        coef = policy.coefficients(s, s_next)
        x, xn = ro.traj.states[k], ro.traj.states[k + 1]
        mu = policy.mean(torch.full((32,), s, dtype=torch.float64), x, None)
        logp = gaussian_log_prob(xn, policy.transition_mean(coef, x, mu), coef.std)
        pg = pg - (logp * adv[k]).mean() * ro.kl_scale
    g_pg = torch.autograd.grad(pg, params)
    assert any(float(g.abs().max()) > 0 for g in g_pg)
    for a, b in zip(g_ppo, g_pg, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_log_prob_is_the_exact_gaussian_density():
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    std = torch.tensor(0.37, dtype=torch.float64)
    ref = torch.distributions.Normal(m.double(), std).log_prob(x.double()).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, m, std).double(), ref, rtol=1e-5, atol=1e-4)


def test_last_step_into_data_is_deterministic_and_excluded():
    sch = LinearVPSchedule()
    model = GaussianScoreModel(sch, torch.zeros(1), torch.ones(1))
    policy = GaussianScorePolicy(model, "ddpm")
    traj = sample(policy, torch.randn(8, 1), None, sch.time_grid(10))
    assert traj.stochastic[:-1].all() and not traj.stochastic[-1]
    assert torch.all(traj.log_probs[-1] == 0) and torch.all(torch.isfinite(traj.log_probs))


def test_discrete_grids_stay_strictly_decreasing_when_stopping_early():
    """A grid ending at s_end > 0 (q-learning's s_min) used to append s_end after timestep 0 (not monotone)."""
    from diffusers import DDPMScheduler

    sch = DiscreteVPSchedule.from_scheduler(
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    )
    for s_end in (0.0, 0.0005, 0.001, 0.05):
        assert bool((sch.time_grid(8, s_end=s_end).diff() < 0).all())
        for seed in range(50):
            grid = sch.random_time_grid(8, torch.Generator().manual_seed(seed), s_end=s_end)
            assert bool((grid.diff() < 0).all()) and float(grid[-1]) == s_end, (s_end, seed, grid)

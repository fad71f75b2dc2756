"""Latent text-to-image backend (ctrl_core/latent.py) on a tiny SD1.5-shaped model built from config dicts."""

from __future__ import annotations

import json

import torch

from ctrl_core import params as params_mod
from ctrl_core.algorithms import OptimConfig
from ctrl_core.checkpoints import fetch_checkpoint
from ctrl_core.io import UnsafeWeightsError
from ctrl_core.latent import LatentProblem, LatentScoreModel, latent_problem, load_sd_folder
from ctrl_core.policy import sample
from ctrl_core.recipes import checkpoint_problem, make_trainer
from ctrl_core.rewards import make_reward
from ctrl_core.schedule import score_from_model_output
from ctrl_core.steps import load_problem
from ctrl_core.testing import save_tiny_sd, tiny_sd_components
from ctrl_core.value import ConvResidual, ValueFunction

torch.set_num_threads(1)


def _problem(seed: int = 0, guidance_scale: float = 3.0, lora_rank: int = 2) -> LatentProblem:
    return latent_problem(
        **tiny_sd_components(seed),
        prompts=["a red circle", "a blue square"],
        lora_rank=lora_rank,
        guidance_scale=guidance_scale,
    )


def _inputs(problem: LatentProblem, n: int = 3, s: float = 0.6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *problem.x_shape), generator=g)
    return torch.full((n,), s, dtype=torch.float64), x, problem.condition_sampler(n, g)


def _tuned_problem() -> tuple[LatentProblem, LatentScoreModel]:
    """A tiny latent problem whose adapter is not the identity (random lora_B), so mu_theta != mu_pre."""
    problem = _problem(seed=0)
    model = problem.policy.model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return problem, model


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _base(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_sd_folder_to_problem_samples_guided_latents_and_decoded_reward(tmp_path):
    # through the fetch step (local folder here; S3 prefixes and HF ids land in the same kind of folder)
    manifest = fetch_checkpoint(str(save_tiny_sd(tmp_path / "src")), tmp_path / "sd")
    assert "unet/diffusion_pytorch_model.safetensors" in manifest.files and "prompts.txt" in manifest.files
    ckpt = tmp_path / "sd"
    parts = load_sd_folder(ckpt)
    # the tokenizer files were really read (offline loaders can silently return a few special tokens)
    assert len(parts["tokenizer"]) == parts["text_encoder"].config.vocab_size == 519
    assert parts["scheduler"].config.beta_schedule == "scaled_linear"

    problem = checkpoint_problem(ckpt, lora_rank=2, guidance_scale=5.0)
    assert isinstance(problem, LatentProblem) and isinstance(problem.policy.model, LatentScoreModel)
    assert problem.x_shape == (4, 8, 8) and problem.prompts == [
        "a red circle",
        "a blue square",
        "a green tree",
    ]
    assert problem.eval_conditions(5).tolist() == [0, 1, 2, 0, 1]

    batches = []  # CFG: one UNet call per step on [uncond; cond], i.e. 2B rows
    hook = problem.policy.model.base_unet.register_forward_hook(
        lambda m, a, k, out: batches.append(k["encoder_hidden_states"].shape[0]), with_kwargs=True
    )
    g = torch.Generator().manual_seed(0)
    c = problem.condition_sampler(4, g)
    traj = sample(
        problem.policy,
        torch.randn((4, *problem.x_shape), generator=g),
        c,
        problem.policy.schedule.time_grid(4),
        g,
    )
    hook.remove()
    assert traj.sample.shape == (4, 4, 8, 8) and torch.isfinite(traj.states).all()
    assert batches == [8] * 4

    reward = problem.wrap_reward(make_reward("jpeg_compressibility"))
    images = reward.decode(traj.sample)
    assert images.shape == (4, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    r = reward(traj.sample, c)
    assert r.shape == (4,) and torch.isfinite(r).all()

    # through the pipeline's parameters: model.prompts overrides the folder's prompts.txt
    (tmp_path / "mine.txt").write_text("one prompt\n\n# a comment\nanother prompt\n")
    p = params_mod.validate(
        {"model": {"lora_rank": 2, "prompts": str(tmp_path / "mine.txt"), "guidance_scale": 1.5}}
    )
    from_params = load_problem(p, ckpt)
    assert from_params.prompts == ["one prompt", "another prompt"]
    assert from_params.policy.model.guidance_scale == 1.5


def test_adapter_starts_at_identity_and_one_ctrl_step_moves_only_the_adapter():
    problem = _problem()
    model = problem.policy.model
    s, x, c = _inputs(problem)
    with torch.no_grad():
        before = model.score(s, x, c)
        with model.pretrained():
            base_before = model.score(s, x, c)
    # LoRA B = 0 at initialisation: exactly the pretrained score
    torch.testing.assert_close(before, base_before, rtol=0, atol=0)
    lora0, base0 = _lora(model), _base(model)
    assert lora0 and all("to_" in n for n in lora0)  # LoRA on the attention projections only

    reward = problem.wrap_reward(make_reward("jpeg_compressibility"))
    value = ValueFunction(reward, problem.make_residual(), "cos_sin")
    assert isinstance(value.residual, ConvResidual)
    cfg = OptimConfig(
        iterations=1,
        batch_size=4,
        train_steps=4,
        train_timesteps=2,
        minibatch_size=4,
        lr=1e-2,
        value_epochs=1,
        lr_decay="none",
    )
    stats = make_trainer(problem, reward, cfg, value).step()
    assert torch.isfinite(torch.tensor([stats.reward_mean, stats.objective])).all()

    assert any(not torch.equal(lora0[n], p) for n, p in _lora(model).items()), "the adapter did not move"
    assert all(torch.equal(base0[n], p) for n, p in _base(model).items()), "the base weights moved"
    with torch.no_grad():
        after = model.score(s, x, c)
        with model.pretrained():
            base_after = model.score(s, x, c)
    torch.testing.assert_close(base_after, base_before, rtol=0, atol=0)
    assert not torch.allclose(after, before)


def test_classifier_free_guidance_is_uncond_plus_w_times_difference():
    problem = _problem(guidance_scale=1.0)
    model = problem.policy.model
    s, x, c = _inputs(problem)
    with torch.no_grad():
        cond = model.score(s, x, c)  # w = 1: the conditional score
        uncond = model.score(s, x, None)
        torch.testing.assert_close(
            cond,
            score_from_model_output(
                model.conditional_output(s, x, c),
                x,
                model.schedule.alpha(s),
                model.schedule.sigma(s),
                "epsilon",
            ),
        )
        assert not torch.allclose(cond, uncond)  # the prompt matters
        for w in (0.0, 4.0):
            model.guidance_scale = w
            torch.testing.assert_close(
                model.score(s, x, c), uncond + w * (cond - uncond), rtol=1e-4, atol=1e-4
            )


def test_autocast_and_gradient_checkpointing_keep_the_score():
    problem = _problem()
    model = problem.policy.model
    s, x, c = _inputs(problem)
    with torch.no_grad():
        ref = model.score(s, x, c)
        model.autocast_dtype = torch.bfloat16
        low = model.score(s, x, c)
        model.autocast_dtype = None
    assert low.dtype == torch.float32
    assert (low - ref).norm() <= 0.05 * ref.norm()

    def grads():
        model.zero_grad()
        model.score(s, x, c).square().mean().backward()
        return [p.grad.clone() for p in model.trainable_parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.base_unet.is_gradient_checkpointing
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_adapter_round_trip(tmp_path):
    problem, model = _tuned_problem()
    s, x, c = _inputs(problem)
    with torch.no_grad():
        tuned = model.score(s, x, c)
    model.save_adapter(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh = _problem(seed=0).policy.model
    with torch.no_grad():
        assert not torch.allclose(fresh.score(s, x, c), tuned)
        fresh.load_adapter(str(tmp_path / "adapter"))
        torch.testing.assert_close(fresh.score(s, x, c), tuned, rtol=0, atol=0)


def test_pickled_weights_are_refused(tmp_path):
    import pytest

    ckpt = save_tiny_sd(tmp_path / "sd")
    torch.save({"w": torch.zeros(1)}, ckpt / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="diffusion_pytorch_model.bin"):
        load_sd_folder(ckpt)
    with pytest.raises(UnsafeWeightsError):
        checkpoint_problem(ckpt, lora_rank=2)
    (ckpt / "unet" / "diffusion_pytorch_model.bin").unlink()
    # a pickle renamed to .safetensors is caught by its header
    torch.save({"w": torch.zeros(1)}, ckpt / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UnsafeWeightsError):
        load_sd_folder(ckpt)


def test_pipeline_steps_run_on_a_latent_checkpoint(tmp_path, monkeypatch):
    """fetch -> value pretraining -> CTRL -> evaluation on a tiny SD-shaped folder: the image reward is applied
    to VAE-decoded latents in every step, and the report shows decoded samples."""
    from ctrl_core import steps
    from ctrl_core.testing import save_tiny_sd

    monkeypatch.setenv("CTRL_CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    save_tiny_sd(tmp_path / "sd")
    p = params_mod.load(None, [
        f"checkpoint.source={tmp_path / 'sd'}", "model.lora_rank=2", "model.guidance_scale=2.0",
        "value.candidates=[rm_only, linear]", "value.num_paths=8", "value.steps=4", "value.points_per_path=1",
        "value.epochs=1", "value.batch_size=8", "optimize.iterations=1", "optimize.batch_size=4",
        "optimize.train_steps=4", "optimize.train_timesteps=2", "optimize.minibatch_size=4",
        "evaluate.steps=[4]", "evaluate.samplers=[sde]", "evaluate.num_samples=4", "optimize.old_log_probs=trainer",
        "optimize.lr=0.0003",
    ])  # fmt: skip
    steps.fetch(p, tmp_path / "checkpoint")
    link = steps.pretrain_value(p, tmp_path / "checkpoint", tmp_path / "value")
    assert all(torch.isfinite(torch.tensor(list(link["mse"].values()))))
    summary = steps.optimize(p, tmp_path / "checkpoint", tmp_path / "value", tmp_path / "optimize")
    assert summary["final_reward"] is not None and torch.isfinite(torch.tensor(summary["final_reward"]))
    row = json.loads((tmp_path / "optimize" / "metrics.jsonl").read_text().splitlines()[0])
    assert (
        row["sampler_approx_kl"] == 0.0 and row["recompute_s"] > 0
    )  # old_log_probs=trainer: the gap is logged
    ev = steps.evaluate(p, tmp_path / "checkpoint", tmp_path / "optimize" / "adapter", tmp_path / "evaluate")
    cell = ev["evaluation"]["sde"]["4"]
    assert torch.isfinite(torch.tensor([cell["base"], cell["tuned"]])).all()
    assert (
        "<figure><img src='data:image/png" in (tmp_path / "evaluate" / "report.html").read_text()
    )  # sample grids


def test_params_choose_autocast_and_gradient_checkpointing(tmp_path):
    """model.autocast / model.gradient_checkpointing reach the latent model from params; on a checkpoint that
    is not latent text-to-image they are an error, not silently ignored."""
    import pytest

    from ctrl_core.embedded import WEIGHTS_DIR

    save_tiny_sd(tmp_path / "sd")
    p = params_mod.load(None, [f"checkpoint.source={tmp_path / 'sd'}", "model.lora_rank=2",
                               "model.autocast=bf16", "model.gradient_checkpointing=true"])  # fmt: skip
    model = load_problem(p, tmp_path / "sd").policy.model
    assert model.autocast_dtype == torch.bfloat16 and model.base_unet.is_gradient_checkpointing
    plain = load_problem(
        params_mod.load(None, [f"checkpoint.source={tmp_path / 'sd'}"]), tmp_path / "sd"
    ).policy.model
    assert plain.autocast_dtype is None and not plain.base_unet.is_gradient_checkpointing
    with pytest.raises(params_mod.ParamsError, match="model.autocast"):
        params_mod.load(None, ["model.autocast=int8"])
    with pytest.raises(ValueError, match="apply to latent text-to-image"):
        checkpoint_problem(WEIGHTS_DIR, autocast="bf16")


def test_compiled_unet_keeps_scores_the_adapter_switch_and_gradients():
    """torch.compile of the UNet (model.compile) changes no number: mu_theta, mu_pre (the adapter switch is a
    flag dynamo must guard on, or mu_pre would silently be mu_theta) and the LoRA gradients. The aot_eager
    backend traces the same graphs as inductor without generating C++ (inductor on the CPU takes minutes per
    graph; checked by hand: max abs difference 1.5e-5 on this model)."""
    from torch._dynamo.utils import counters

    problem, model = _tuned_problem()
    s, x, c = _inputs(problem)

    def run():
        model.zero_grad()
        with torch.no_grad(), model.pretrained():
            pre = model.score(s, x, c)
        mu = model.score(s, x, c)
        mu.square().mean().backward()
        return mu.detach(), pre, [p.grad.clone() for p in model.trainable_parameters()]

    eager = run()
    assert not torch.allclose(eager[0], eager[1])  # the adapter matters
    torch._dynamo.reset()
    counters.clear()
    try:
        model.compile_unet(backend="aot_eager")
        compiled = run()
        assert (
            counters["stats"]["unique_graphs"] >= 2
        )  # really compiled: one graph per adapter state at least
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    import pytest

    with pytest.raises(ValueError, match="unknown torch.compile mode"):
        model.compile_unet("fastest")


def test_channels_last_keeps_the_score():
    problem = _problem(seed=0)
    model = problem.policy.model
    s, x, c = _inputs(problem)
    with torch.no_grad():
        ref = model.score(s, x, c)
        model.use_channels_last()
        nhwc = model.score(s, x, c)
    conv = model.base_unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nhwc.is_contiguous()  # the engine gets ordinary tensors back
    torch.testing.assert_close(nhwc, ref, rtol=1e-4, atol=1e-5)


def test_params_choose_compile_and_channels_last(tmp_path):
    """model.compile / model.channels_last reach the UNet of any diffusers checkpoint (here the embedded digits
    one) without compiling anything yet (that happens at the first call); a mode torch.compile lacks is a
    params error before any loading."""
    import pytest

    from ctrl_core.embedded import WEIGHTS_DIR

    p = params_mod.load(None, ["model.compile=max-autotune", "model.channels_last=true"])
    model = load_problem(p, WEIGHTS_DIR).policy.model
    assert model.base_unet._compiled_call_impl is not None and model._channels_last
    plain = load_problem(params_mod.load(None, []), WEIGHTS_DIR).policy.model
    assert plain.base_unet._compiled_call_impl is None and not plain._channels_last
    with pytest.raises(params_mod.ParamsError, match="model.compile"):
        params_mod.load(None, ["model.compile=fastest"])
    # a latent checkpoint: the VAE decoder (the reward's decode) is compiled too
    save_tiny_sd(tmp_path / "sd")
    latent = load_problem(params_mod.load(None, ["model.compile=default"]), tmp_path / "sd")
    assert latent.policy.model.base_unet._compiled_call_impl is not None
    assert latent.vae.decoder._compiled_call_impl is not None


def test_attention_runs_through_sdpa():
    """The UNet's (and the VAE's) attention uses torch's scaled_dot_product_attention (flash / memory-efficient
    kernels on a GPU), also with the LoRA adapter injected."""
    problem = _problem()
    procs = problem.policy.model.base_unet.attn_processors
    assert procs and {type(p).__name__ for p in procs.values()} == {"AttnProcessor2_0"}
    assert {type(p).__name__ for p in problem.vae.attn_processors.values()} <= {"AttnProcessor2_0"}


def test_merged_sampling_copy_matches_the_lora_model_and_follows_its_updates():
    """model.merged_sampling: no-grad calls run a copy of the UNet with the adapter merged into its weights and
    q/k/v fused. In float32 it gives the LoRA model's outputs; after an optimiser step it refreshes (and is not
    stale); mu_pre and gradient-carrying calls keep the LoRA model; the base weights are never written; the
    copy is in no state dict."""
    problem, model = _tuned_problem()
    s, x, c = _inputs(problem, n=4)
    keys = set(model.state_dict())
    base = _base(model)
    with torch.no_grad():
        ref = model.score(s, x, c)
        with model.pretrained():
            pre = model.score(s, x, c)
    model.enable_merged_sampling(None)
    sampler = model._sampler
    assert sampler.fused_attns and all(a.fused_projections for a in sampler.fused_attns.values())
    assert {type(p).__name__ for p in sampler.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    with torch.no_grad():
        merged = model.score(s, x, c)
        with model.pretrained():
            pre_merged = model.score(s, x, c)
    assert sampler.refreshes == 1
    torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged, pre, rtol=1e-3, atol=1e-4)  # the adapter is in the copy
    assert torch.equal(pre_merged, pre)  # mu_pre: the LoRA model with its adapter off, as before
    mu = model.score(s, x, c)  # with gradients: the LoRA model itself
    assert mu.requires_grad and torch.equal(mu.detach(), ref)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.05)
    mu.square().mean().backward()
    opt.step()
    with torch.no_grad():
        after = model.score(s, x, c)
        again = model.score(s, x, c)
    assert sampler.refreshes == 2  # one refresh per change of the adapter, not per call
    model.__dict__["_sampler"] = None
    with torch.no_grad():
        unmerged_after = model.score(s, x, c)
    model.__dict__["_sampler"] = sampler
    assert not torch.allclose(unmerged_after, ref, rtol=1e-3, atol=1e-4)  # the step changed the policy ...
    torch.testing.assert_close(after, unmerged_after, rtol=1e-4, atol=1e-5)  # ... and the copy followed
    assert torch.equal(again, after)
    assert set(model.state_dict()) == keys
    for n, p in _base(model).items():
        assert torch.equal(p, base[n]), n


def test_merged_sampling_in_training_keeps_sampler_and_trainer_log_probs_equal(tmp_path):
    """A DDPO iteration whose rollouts run through the merged copy (float32): the importance ratios of the first
    minibatch, before any update, are 1 (approx KL ~ 0, nothing clipped). A stale copy would not give that.
    params: model.merged_sampling reaches the model (float32); with autocast it is refused (the rounding of the
    merged weights moves the sampler's log-probs off the trainer's: bench.merged_sampling)."""
    import pytest

    save_tiny_sd(tmp_path / "sd")
    p = params_mod.load(
        None, [f"checkpoint.source={tmp_path / 'sd'}", "model.lora_rank=2", "model.merged_sampling=true"]
    )
    model = load_problem(p, tmp_path / "sd").policy.model
    assert model._sampler.dtype is None and next(model._sampler.unet.parameters()).dtype == torch.float32
    with pytest.raises(
        params_mod.ParamsError, match="model.merged_sampling: must be false with model.autocast=bf16"
    ):
        params_mod.load(None, ["model.merged_sampling=true", "model.autocast=bf16"])
    assert getattr(load_problem(params_mod.load(None, [f"checkpoint.source={tmp_path / 'sd'}"]), tmp_path / "sd")
                   .policy.model, "_sampler", None) is None  # fmt: skip

    problem, model = _tuned_problem()
    model.enable_merged_sampling(None)
    reward = problem.wrap_reward(make_reward("jpeg_compressibility"))
    cfg = OptimConfig(
        algorithm="ddpo",
        iterations=2,
        batch_size=4,
        train_steps=3,
        train_timesteps=3,
        minibatch_size=4,
        lr=1e-2,
        kl_monitor=False,
    )
    trainer = make_trainer(problem, reward, cfg, None)
    first = trainer.step()
    assert first.approx_kl < 1e-6 and first.clipfrac == 0.0
    second = (
        trainer.step()
    )  # the weights moved after the first: the copy must have followed them (stale: ~660)
    assert model._sampler.refreshes == 2 and second.approx_kl < 1e-6 and second.clipfrac == 0.0
    ro = trainer.rollout()
    m = trainer.sampling_mismatch(ro)
    assert m["approx_kl"] < 1e-6 and m["clipfrac"] == 0.0
    # a fused AdamW (the trainer's on a GPU) writes the weights without bumping their version counters: the
    # trainer tells the model after each step
    problem, model = _tuned_problem()
    model.enable_merged_sampling(None)
    trainer = make_trainer(problem, reward, cfg, None)
    trainer.opt = torch.optim.AdamW(trainer.params, lr=1e-2, fused=True)
    versions = [p._version for p in trainer.params]
    trainer.step()
    assert [p._version for p in trainer.params] == versions  # why the counters alone would not do
    second = trainer.step()  # sampled with the copy refreshed after the fused step (stale: approx KL ~ 600)
    assert model._sampler.refreshes == 2 and second.approx_kl < 1e-6
    m = trainer.sampling_mismatch(trainer.rollout())
    assert m["approx_kl"] < 1e-6 and m["clipfrac"] == 0.0
    model._sampler._state_key = lambda: model._sampler._key  # a copy that misses updates ...
    model._sampler.invalidate = lambda: None
    trainer.step()
    assert trainer.sampling_mismatch(trainer.rollout())["clipfrac"] > 0.1  # ... is what the diagnostic shows


def test_merged_sampling_copy_is_compiled_and_channels_last_with_the_unet():
    """model.compile / model.channels_last apply to the merged copy too, in either order; the compiled copy's
    no-grad outputs are the eager copy's (aot_eager: the graphs inductor would get, no C++ build)."""
    problem, model = _tuned_problem()
    s, x, c = _inputs(problem)
    model.enable_merged_sampling(None)
    with torch.no_grad():
        eager = model.score(s, x, c)
    torch._dynamo.reset()
    try:
        model.compile_unet(backend="aot_eager")
        assert model._sampler.unet._compiled_call_impl is not None
        with torch.no_grad():
            compiled = model.score(s, x, c)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    model.use_channels_last()
    model.enable_merged_sampling(None)  # a new copy after compile / channels_last gets both
    assert model._sampler.unet._compiled_call_impl is not None
    assert model._sampler.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_old_log_probs_from_the_trainer_make_the_first_pass_ratios_one():
    """optimize.old_log_probs=trainer: PPO's pi_old is recomputed by the update's forward. With a sampler that
    computes differently (a bf16 merged copy under bf16 autocast, built through the library: params refuse it),
    the first pass's ratios are then exactly 1 where the recorded ones clip heavily, and the gap is logged. In
    float32, where sampler and trainer agree, both settings train to bitwise the same weights."""

    def run(old_log_probs: str, bf16: bool):
        problem, model = _tuned_problem()
        if bf16:
            model.autocast_dtype = torch.bfloat16
            model.enable_merged_sampling(torch.bfloat16)
        reward = problem.wrap_reward(make_reward("jpeg_compressibility"))
        cfg = OptimConfig(
            algorithm="ddpo",
            iterations=1,
            batch_size=4,
            train_steps=4,
            train_timesteps=4,
            minibatch_size=4,
            kl_monitor=False,
            old_log_probs=old_log_probs,
            log_prob_reduce="sum",  # the gap in exact (summed) log-densities, not DDPO's per-dimension average
            lr=3e-4,
        )  # one update: all ratios before it
        stats = make_trainer(problem, reward, cfg, None).step()
        return stats, [p.detach().clone() for p in model.trainable_parameters()]

    recorded, _ = run("sampler", bf16=True)
    recomputed, _ = run("trainer", bf16=True)
    assert recorded.clipfrac > 0.1 and recorded.approx_kl > 1e-3
    assert recomputed.approx_kl == 0.0 and recomputed.clipfrac == 0.0
    assert recomputed.extra["sampler_clipfrac"] > 0.1 and recomputed.extra["recompute_s"] > 0
    (plain, w_plain), (trainer, w_trainer) = run("sampler", bf16=False), run("trainer", bf16=False)
    assert trainer.extra["sampler_approx_kl"] == 0.0 and "sampler_approx_kl" not in plain.extra
    for a, b in zip(w_plain, w_trainer, strict=True):
        assert torch.equal(a, b)
    import pytest

    with pytest.raises(params_mod.ParamsError, match="optimize.old_log_probs: must be sampler or trainer"):
        params_mod.load(None, ["optimize.old_log_probs=vllm"])


def test_a_bf16_unet_gets_a_bf16_vae_decode_and_fp16_keeps_it_float32():
    """With model.autocast=bf16 the reward's VAE decode (and the value's tiny decoder) runs in bf16 too: the decode
    costs more than a UNet step. fp16 keeps the VAE in float32 (diffusers' force_upcast: SD's VAE overflows in
    fp16). The decoded images stay float32 in [-1, 1], close to the float32 decode."""
    parts = tiny_sd_components(0)
    ref = latent_problem(**tiny_sd_components(0), prompts=["a red circle"], lora_rank=2)
    bf16 = latent_problem(**parts, prompts=["a red circle"], lora_rank=2, autocast_dtype=torch.bfloat16)
    fp16 = latent_problem(
        **tiny_sd_components(0), prompts=["a red circle"], lora_rank=2, autocast_dtype=torch.float16
    )
    assert next(bf16.vae.parameters()).dtype == torch.bfloat16
    assert (
        next(fp16.vae.parameters()).dtype == torch.float32
        and next(ref.vae.parameters()).dtype == torch.float32
    )
    z = torch.randn((3, *ref.x_shape), generator=torch.Generator().manual_seed(0))
    images = {
        name: p.wrap_reward(make_reward("jpeg_compressibility")).decode(z)
        for name, p in (("ref", ref), ("bf16", bf16))
    }
    assert images["bf16"].dtype == torch.float32 and images["bf16"].abs().max() <= 1
    assert (images["bf16"] - images["ref"]).abs().mean() < 0.02 * images["ref"].abs().mean() + 1e-3
    assert not torch.equal(images["bf16"], images["ref"])  # really computed in bf16

"""bench.value_cost's cost model (issue 7 item 3): the per-iteration accounting and the meta-device counting it
rests on. The benchmark's numbers themselves are in bench/results/value_cost.json, not asserted here."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import value_cost as vc

F = {"unet_forward": 10.0, "unet_lora_forward_backward": 21.0, "vae_decode_512": 30.0, "taesd_decode_512": 2.0,
     "imagereward_forward": 1.5, "imagereward_copy_forward_backward": 1.7, "conv_residual_forward": 0.01,
     "conv_residual_forward_backward": 0.03}  # fmt: skip


def test_iteration_accounting_counts_each_call_once():
    B, K, E, u = 4, 3, 2, 2 * F["unet_forward"]
    ddpo = vc.iteration_flops(F, "ddpo", "", B, K, E)
    assert sum(ddpo.values()) == pytest.approx(B * (30.0 + 1.5) + K * B * 2 * 21.0)

    def extra(design: str, variant: str) -> float:
        return sum(vc.iteration_flops(F, design, variant, B, K, E).values()) - sum(ddpo.values())

    # conv + tiny decoder, beta 0, no mu_pre: 2 K B value evaluations (decode + score + CNN) and the CNN's fit
    assert extra("conv_tiny", "td_beta0") == pytest.approx(2 * K * B * (2.0 + 1.5 + 0.01) + E * K * B * 0.03)
    # beta > 0 adds mu_pre at the K steps; the finite difference adds x_hat's UNet call at the perturbed state
    assert extra("conv_tiny", "td") - extra("conv_tiny", "td_beta0") == pytest.approx(K * B * u)
    assert extra("conv_tiny", "fd") - extra("conv_tiny", "td") == pytest.approx(K * B * u)
    # the paper's copy decodes x_t and scores it at every evaluation, and again in every epoch of the fit
    assert extra("paper", "td_beta0") == pytest.approx(
        2 * K * B * (30.0 + 1.5) * 2 + E * K * B * (30.0 + 1.7)
    )
    # TD shares V between adjacent drawn steps: K (K - 1) / S fewer evaluations per path on average
    shared = sum(vc.iteration_flops(F, "conv_tiny", "td_beta0", B, K, E).values()) - sum(
        vc.iteration_flops(F, "conv_tiny", "td_beta0", B, K, E, S=4).values()
    )
    assert shared == pytest.approx(K * (K - 1) / 4 * B * (2.0 + 1.5 + 0.01))
    assert vc.iteration_flops(F, "conv_tiny", "fd", B, K, E, S=4) == vc.iteration_flops(
        F, "conv_tiny", "fd", B, K, E
    )
    table = vc.cost_table(F, B, N=5, K=K, E=E)
    assert table["ddpo_tflop"] * 1e12 == pytest.approx(sum(ddpo.values()) + 5 * B * u)
    ratios = {k: r["ctrl_over_ddpo_flops"] for k, r in table["designs"].items()}
    assert len(ratios) == 15 and min(ratios, key=ratios.get) == "latent_only/td_beta0"
    # no decode and no reward model before T: at beta 0 CTRL costs DDPO plus the CNN only
    assert extra("latent_only", "td_beta0") == pytest.approx(2 * K * B * 0.01 + E * K * B * 0.03)
    assert max(ratios, key=ratios.get) == "paper/fd"


def test_meta_device_counts_equal_real_counts():
    """Counting on the meta device (what the benchmark does at SD1.5 size) gives the FLOPs of the real run, and
    more: the CPU's fused attention kernel has no FLOP formula, so a CPU count misses attention, while the meta
    device runs SDPA's math path (two batched matmuls per attention), which is counted."""
    from diffusers import UNet2DConditionModel

    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)  # fmt: skip
    counts = []
    for device in ("cpu", "meta"):
        with torch.device(device):
            unet = UNet2DConditionModel(**cfg)
            x, t, e = torch.randn(2, 4, 8, 8), torch.full((2,), 10.0), torch.randn(2, 7, 32)
            with FlopCounterMode(display=False) as c:
                unet(x, t, encoder_hidden_states=e)
        counts.append({str(k): v for k, v in c.get_flop_counts()["Global"].items()})
    cpu, meta = counts
    assert cpu and all(meta[k] == v for k, v in cpu.items())  # convolutions and linears: the same counts
    # attention: QK^T and AV cost 2 L_q L_k d each. Self-attention over 8x8 = 64 tokens and cross-attention over
    # 7 prompt tokens at 16 channels, in 3 transformers (1 down, 2 up); the mid block's at 4x4 = 16 tokens, 32 ch
    per_image = sum(2 * 2 * 64 * lk * 16 for lk in (64, 7)) * 3 + sum(2 * 2 * 16 * lk * 32 for lk in (16, 7))
    assert set(meta) - set(cpu) == {"aten.bmm"} and meta["aten.bmm"] == 2 * per_image


def test_fit_spread_is_mean_and_sample_std_of_r2():
    out = vc._spread([0.1, 0.3], var=0.5)
    assert out["r2_by_seed"] == pytest.approx([0.8, 0.4])
    assert out["r2"] == pytest.approx(0.6) and out["val_mse"] == pytest.approx(0.2)
    assert out["r2_std"] == pytest.approx(0.2 * 2**0.5)  # sample (n - 1) standard deviation
    assert (
        vc._spread([0.1], var=0.5)["r2_std"] != vc._spread([0.1], var=0.5)["r2_std"]
    )  # one fit: no spread (nan)

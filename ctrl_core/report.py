"""The evaluation step's reports: a reward-vs-steps plot (PNG), sample grids, and the results table as HTML (one
self-contained file, images inlined) and markdown. The numbers come from ``evaluate.evaluate``; nothing here
computes a metric."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import torch


def write_reports(
    folder: Path,
    out: dict,
    samples: dict[str, dict[str, torch.Tensor]],
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Write ``reward_vs_steps.png``, ``report.html`` and ``report.md`` of the evaluation ``out`` (the step's
    evaluation.json) into ``folder``. ``samples``: {"base"/"tuned": {cell: (B, C, H, W) images}} shown as grids in
    the HTML (other shapes are left out); ``decode`` maps latents to images first."""
    plot_png = reward_vs_steps_png(out["evaluation"], out["train_steps"])
    (folder / "reward_vs_steps.png").write_bytes(plot_png)
    show = decode or (lambda x: x)
    grids = {
        f"{which}/{key}": grid_png(show(x))
        for which, d in samples.items()
        for key, x in d.items()
        if x.dim() == 4
    }
    (folder / "report.html").write_text(html_report(out, plot_png, grids))
    (folder / "report.md").write_text(markdown_report(out))


def reward_vs_steps_png(evaluation: dict, train_steps: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for smp, cells in evaluation.items():
        steps = sorted(cells, key=int)
        xs = [int(n) for n in steps]
        ax.errorbar(
            xs,
            [cells[n]["base"] for n in steps],
            yerr=[cells[n]["base_ci"] for n in steps],
            fmt="--o",
            label=f"base {smp}",
            alpha=0.7,
        )
        ax.errorbar(
            xs,
            [cells[n]["tuned"] for n in steps],
            yerr=[cells[n]["tuned_ci"] for n in steps],
            fmt="-s",
            label=f"tuned {smp}",
        )
    ax.axvline(train_steps, color="grey", ls=":", lw=0.8)
    ax.set(xscale="log", xlabel="sampling steps", ylabel="mean reward (95% CI)", title="reward vs steps")
    ax.set_xticks(sorted({int(n) for cells in evaluation.values() for n in cells}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def grid_png(images: torch.Tensor, scale: int = 4) -> bytes:
    from PIL import Image

    from .imageprep import to_uint8

    arr = to_uint8(images)  # (B, H, W, C)
    n, h, w, c = arr.shape
    cols = min(10, n)
    rows = (n + cols - 1) // cols
    canvas = Image.new("L" if c == 1 else "RGB", (cols * (w + 1), rows * (h + 1)), 0)
    for i, a in enumerate(arr):
        canvas.paste(
            Image.fromarray(a[..., 0] if c == 1 else a), ((i % cols) * (w + 1), (i // cols) * (h + 1))
        )
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


#: what the two KL columns are (evaluate.py's module docstring); printed under both tables
KL_NOTE = (
    "KL (exact): the exact KL between the tuned and base discrete chains (sum of per-step Gaussian KLs), for "
    "the stochastic samplers; — for a deterministic sampler (ode, heun), which has no path KL. KL (Thm 3.1): "
    "Theorem 3.1's running-reward sum, the continuous-time SDE's path KL; on an ode or heun row it is that "
    "integral along deterministic paths, a measure of how far the tuned score moved, not a path KL."
)


def _kl(cell: dict, key: str) -> str:
    """A KL column's entry: "—" where it is None (the exact KL of a deterministic sampler). ``kl_thm31`` falls
    back to ``kl`` for an evaluation written before the two columns."""
    value = cell.get(key, cell.get("kl") if key == "kl_thm31" else None)
    return "—" if value is None else f"{value:.4f}"


def _table_rows(out: dict) -> list[str]:
    rows = [
        "| sampler | steps | base | tuned | gain (95% CI) | KL (exact) | KL (Thm 3.1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for smp, cells in out["evaluation"].items():
        for n in sorted(cells, key=int):
            c = cells[n]
            rows.append(
                f"| {smp} | {n} | {c['base']:.4f} | {c['tuned']:.4f} | {c['gain']:+.4f} ± {c['gain_ci']:.4f} "
                f"| {_kl(c, 'kl_exact')} | {_kl(c, 'kl_thm31')} |"
            )
    return rows


def markdown_report(out: dict) -> str:
    return "\n".join(
        [
            "# Evaluation",
            "",
            *_table_rows(out),
            "",
            KL_NOTE,
            "",
            f"Robustness ratio (min gain / gain at {out['train_steps']} steps): {_ratio(out)}",
            "",
        ]
    )


def _ratio(out: dict) -> str:
    r = out["robustness_ratio"]
    return "n/a (no gain at the training step count)" if r is None else f"{r:.3f}"


def html_report(out: dict, plot_png: bytes, grids: dict[str, bytes]) -> str:
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    rows = "".join(
        f"<tr><td>{smp}</td><td>{n}</td><td>{c['base']:.4f}</td><td>{c['tuned']:.4f}</td>"
        f"<td>{c['gain']:+.4f} ± {c['gain_ci']:.4f}</td><td>{_kl(c, 'kl_exact')}</td><td>{_kl(c, 'kl_thm31')}</td></tr>"
        for smp, cells in out["evaluation"].items()
        for n, c in sorted(cells.items(), key=lambda kv: int(kv[0]))
    )
    imgs = "".join(
        f"<figure><img src='data:image/png;base64,{b64(png)}'><figcaption>{name}</figcaption></figure>"
        for name, png in sorted(grids.items())
    )
    return (
        "<html><head><meta charset='utf-8'><title>ctrl-pipeline evaluation</title></head><body>"
        "<h1>Evaluation</h1><table border='1' cellpadding='4'><tr><th>sampler</th><th>steps</th><th>base</th>"
        f"<th>tuned</th><th>gain (95% CI)</th><th>KL (exact)</th><th>KL (Thm 3.1)</th></tr>"
        f"{rows}</table><p>{KL_NOTE}</p><p>Robustness ratio: {_ratio(out)}</p>"
        f"<img src='data:image/png;base64,{b64(plot_png)}'><h2>Samples (base vs tuned, same noise)</h2>{imgs}</body></html>"
    )

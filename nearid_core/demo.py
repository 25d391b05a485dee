"""Offline proof that NearID training works: one command, no downloads, CPU friendly.

    python -m nearid_core.demo OUTDIR                 # default size: 6 min on 2 shared (busy) EPYC cores
    python -m nearid_core.demo OUTDIR --size ci       # the size the CI test runs: ~30 s there

What it does (everything under OUTDIR, which is replaced on re-runs; a non-empty folder that is not an earlier demo
output is refused):

1. **Data** (:mod:`nearid_core.synthetic`): a procedural near-identity dataset in the local folder layout -- objects
   (shape, colours, texture, an attached part) shown in 2-3 views, each on a different background, plus per view
   near-identity distractors (the object slightly changed, rendered with the view's exact pose into the view's exact
   background) from three sources. ``src_a`` (colour drift) and ``src_b`` (geometry / texture) are training
   sources; ``src_c`` (larger multi-attribute changes) is **held out** from training. Identities are split into
   train / val / test; MTG-style part edits are added to training (x2).
2. **A meaningful, honest trunk**: a small random SigLIP vision tower is pretrained on a *separate* pool of
   identities with generic self-supervision that never sees a distractor: multi-view instance discrimination
   (NT-Xent between two augmented views of one object vs the other objects of the batch) on its pooled MAP-head
   output, plus per-patch pixel reconstruction from its tokens (keeps the tokens local). Its MAP head is the frozen
   baseline, exactly as SigLIP2's own head is the paper's baseline and initialisation.
3. **Baseline**: held-out SSR / PA (test identities x all three sources, through ``nearid_core.eval``).
4. **NearID training**: ``python -m nearid_core.train`` on the frozen trunk (feature cache, infonce_ext with
   slot-aligned distractors, MTG joint training, checkpoints, validation, exports).
5. **After**: the same benchmark on the exported release checkpoint; ``summary.json`` holds both, and
   ``embedding_kpca.png`` shows, before and after (SSR / PA in each title), KernelPCA of the views (dots) of eight
   held-out identities and their held-out-source distractors (hollow squares, dashed line to the view with the same
   background), and a third panel with the histogram of every NearID-Bench margin (sim(view a, view b) minus
   sim(view a, distractor in a's background); > 0 is a win) of both heads.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .preprocessing import PreprocessConfig
from .synthetic import make_identity, write_dataset, write_mtg

logger = logging.getLogger("nearid_core.demo")

TRAIN_SOURCES = ("src_a", "src_b")
_MARKER = ".nearid-demo"
HELD_OUT_SOURCES = ("src_c",)


@dataclass(frozen=True)
class DemoSize:
    """Knobs of one demo size."""

    image_size: int = 32
    patch_size: int = 4
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    n_train: int = 700
    n_val: int = 40
    n_test: int = 160
    n_mtg: int = 40
    n_pretrain: int = 1000
    pretrain_steps: int = 300
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    train_steps: int = 1500
    train_batch: int = 16
    train_lr: float = 3e-3
    warmup_steps: int = 100
    reconstruction_weight: float = 10.0
    same_view_fraction: float = 0.5


SIZES: dict[str, DemoSize] = {
    "full": DemoSize(),
    "ci": DemoSize(n_train=240, n_val=20, n_test=60, n_mtg=16, n_pretrain=300, pretrain_steps=60,
                   pretrain_batch=32, pretrain_lr=2e-3, train_steps=300, warmup_steps=40),
}


# --------------------------------------------------------------------------------------------------------------------
# Trunk pretraining (generic self-supervision; never sees a distractor)
# --------------------------------------------------------------------------------------------------------------------


def _to_tensor(img) -> torch.Tensor:
    """PIL RGB -> [3, H, W] in -1..1 (the SigLIP normalisation of PreprocessConfig defaults at native size)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1)


def _views_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild augmentation of normalised images [B, 3, H, W]: crop-scale 0.8-1, flip, brightness / contrast +-10 %."""
    b = x.shape[0]
    scale = torch.empty(b).uniform_(0.8, 1.0, generator=g)
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (1 - scale)[:, None]
    flip = (torch.rand(b, generator=g) < 0.5).float() * 2 - 1
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale * flip, scale, shift
    y = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False,
                      padding_mode="reflection")
    bright = torch.empty(b, 1, 1, 1).uniform_(-0.1, 0.1, generator=g)
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.9, 1.1, generator=g)
    return ((y + bright) * contrast).clamp(-1, 1)


def pretrain_backbone(size: DemoSize, seed: int = 0):
    """A small SigLIP vision tower pretrained with multi-view NT-Xent on its MAP-head output + patch reconstruction.

    The pretraining identities are disjoint from the NearID splits (indices from 1,000,000 on) and are rendered
    without any distractor.

    Returns:
        (SiglipVisionModel in eval mode, list of per-step losses).
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=size.hidden_size, intermediate_size=2 * size.hidden_size,
                                num_hidden_layers=size.layers, num_attention_heads=size.heads,
                                image_size=size.image_size, patch_size=size.patch_size)
    torch.manual_seed(seed)
    model = SiglipVisionModel(config)
    tower = getattr(model, "vision_model", model)
    p = size.patch_size
    decoder = torch.nn.Linear(size.hidden_size, 3 * p * p)
    identities = [make_identity(1_000_000 + i, seed, (2, 3), size.image_size, sources=())
                  for i in range(size.n_pretrain)]
    images = torch.stack([_to_tensor(v) for ident in identities for v in ident.views])
    starts = np.cumsum([0] + [len(ident.views) for ident in identities])
    optimizer = torch.optim.AdamW([*model.parameters(), *decoder.parameters()], lr=size.pretrain_lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    warmup = max(1, size.pretrain_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    losses = []
    model.train()
    for _ in range(size.pretrain_steps):
        picks = rng.choice(len(identities), size=min(size.pretrain_batch, len(identities)), replace=False)
        a, b = [], []
        for i in picks:
            v = rng.choice(len(identities[i].views), size=2, replace=False)
            a.append(starts[i] + v[0])
            b.append(starts[i] + (v[0] if rng.random() < size.same_view_fraction else v[1]))
        x = torch.cat([_views_augment(images[a], g), _views_augment(images[b], g)])
        hidden = tower.embeddings(x)
        tokens = tower.post_layernorm(tower.encoder(inputs_embeds=hidden).last_hidden_state)
        z = F.normalize(tower.head(tokens), dim=-1)
        n = len(picks)
        sim = z @ z.T / 0.2
        sim.fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # [2n, N, 3 p p]
        loss = F.cross_entropy(sim, target) + size.reconstruction_weight * F.mse_loss(decoder(tokens), patches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return model.eval(), losses


# --------------------------------------------------------------------------------------------------------------------
# Evaluation and plot
# --------------------------------------------------------------------------------------------------------------------


def _bench(model_dir: Path, records, sources: Sequence[str]) -> dict[str, Any]:
    from .eval.baselines import load_embedder
    from .eval.benchmarks import run_nearid_bench

    embedder = load_embedder("nearid", model=str(model_dir), device="cpu", dtype=torch.float32)
    result = run_nearid_bench(records, embedder, sources=list(sources), batch_size=64, progress=False)
    return result.to_json()


def _margins(emb: np.ndarray, index: dict[tuple[int, str, int], int], records, sources: Sequence[str]) -> np.ndarray:
    """All directed NearID-Bench margins sim(view a, view b) - sim(view a, distractor in a's background)."""
    out = []
    for k, rec in enumerate(records):
        present = [j for j, v in enumerate(rec.views) if v is not None]
        for source in sources:
            for a in present:
                d = index.get((k, source, a))
                if d is None:
                    continue
                for b in present:
                    if b != a:
                        va, vb = emb[index[(k, "view", a)]], emb[index[(k, "view", b)]]
                        out.append(float(va @ vb - va @ emb[d]))
    return np.asarray(out)


def plot_kpca(models: dict[str, Path], records, source: str, path: Path, n_identities: int = 8,
              metrics: dict[str, dict[str, Any]] | None = None, sources: Sequence[str] | None = None) -> Path:
    """The demo figure: per model a KernelPCA panel, plus one panel of NearID-Bench margins.

    KernelPCA panels (cosine kernel, fit per model): the views of the first ``n_identities`` 3-view identities of
    ``records`` as filled dots coloured by identity, their ``source`` distractors as hollow squares of the same colour,
    thin solid lines joining the views of one identity, dashed lines joining each view to the distractor rendered into
    its background. ``metrics`` (title -> a ``run_nearid_bench(...).to_json()``) puts SSR / PA into the titles. The last
    panel is the histogram of every directed margin sim(view a, view b) - sim(view a, distractor in a's background)
    over all ``records`` and ``sources`` (default: ``source``) per model; a margin > 0 is a win.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from sklearn.decomposition import KernelPCA

    from .data import open_image
    from .scorer import NearIDScorer

    sources = [source] if sources is None else list(sources)
    images, index = [], {}
    for k, rec in enumerate(records):
        for j, view in enumerate(rec.views):
            if view is None:
                continue
            index[(k, "view", j)] = len(images)
            images.append(open_image(view))
            for s in sources:
                neg = rec.distractors.get(s, [None] * len(rec.views))[j]
                if neg is not None:
                    index[(k, s, j)] = len(images)
                    images.append(open_image(neg))
    shown = [k for k, r in enumerate(records) if r.n_views == 3 and all(
        (k, source, j) in index for j in range(3))][:n_identities]
    colors = plt.get_cmap("tab10")
    n = len(models)
    fig, axes = plt.subplots(1, n + 1, figsize=(5.6 * n + 5.6, 5.6))
    all_margins = {}
    for ax, (title, model_dir) in zip(axes, models.items()):
        scorer = NearIDScorer.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
        emb = scorer.embed(images, batch_size=64, progress=False).numpy()
        all_margins[title] = _margins(emb, index, records, sources)
        rows = [index[(k, kind, j)] for k in shown for kind in ("view", source) for j in range(3)]
        xy = dict(zip(rows, KernelPCA(n_components=2, kernel="cosine").fit_transform(emb[rows])))
        for c, k in enumerate(shown):
            col = colors(c % 10)
            v = [xy[index[(k, "view", j)]] for j in range(3)]
            d = [xy[index[(k, source, j)]] for j in range(3)]
            ax.plot(*zip(*v, v[0]), color=col, lw=1.0, alpha=0.7)
            for j in range(3):
                ax.plot(*zip(v[j], d[j]), color=col, lw=0.9, ls="--", alpha=0.6)
            ax.scatter(*zip(*v), color=col, s=55, zorder=3, edgecolors="k", linewidths=0.4)
            ax.scatter(*zip(*d), facecolors="none", edgecolors=[col], marker="s", s=60, linewidths=1.6, zorder=3)
        if metrics and title in metrics:
            m = metrics[title]
            ps = m.get("per_source", {}).get(source)
            extra = f"\n{source}: SSR {ps['SSR']:.1f} / PA {ps['PA']:.1f}" if ps else ""
            title = f"{title}\nheld-out test, all sources: SSR {m['SSR']:.1f} / PA {m['PA']:.1f}{extra}"
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color="grey", marker="o", ls="-", markeredgecolor="k", label="views of one identity"),
               Line2D([], [], color="grey", marker="s", markerfacecolor="none", ls="--",
                      label=f"{source} distractor -- view with the same background")]
    axes[0].legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)
    ax = axes[-1]
    lo = min(float(v.min()) for v in all_margins.values() if v.size) if any(v.size for v in all_margins.values()) else -1
    hi = max(float(v.max()) for v in all_margins.values() if v.size) if any(v.size for v in all_margins.values()) else 1
    bins = np.linspace(lo, hi, 41)
    for (title, margins), col in zip(all_margins.items(), ("tab:grey", "tab:red", "tab:blue", "tab:green")):
        wins = 100.0 * float((margins > 0).mean()) if margins.size else float("nan")
        ax.hist(margins, bins=bins, alpha=0.55, color=col, label=f"{title.splitlines()[0]}: {wins:.1f} % > 0")
    ax.axvline(0, color="k", lw=1)
    ax.set_xlabel("margin = sim(view a, view b) - sim(view a, distractor in a's background)")
    ax.set_ylabel("directed pairs")
    ax.set_title(f"all {len(records)} held-out test identities, distractors: {', '.join(sources)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"KernelPCA (cosine) of {len(shown)} held-out identities: views (dots) and their {source} "
                 f"distractors (hollow squares), one colour per identity", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nearid_core.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("output_dir", help="working folder (overwritten): data, backbone, run, plot, summary.json")
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="ci = the CI test's size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (None: torch's choice)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    return args


def run_demo(output_dir: str | Path, size: str | DemoSize = "full", seed: int = 0) -> dict[str, Any]:
    """Run the whole demo (see the module docstring) and return the summary that is also written to summary.json."""
    from .data import load_local_nearid
    from .train import main as train_main

    cfg = SIZES[size] if isinstance(size, str) else size
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / _MARKER).exists():
            raise ValueError(f"{out} exists and is not a demo folder (no {_MARKER}); refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("written by python -m nearid_core.demo; the whole folder is replaced on re-runs\n")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    n_total = cfg.n_train + cfg.n_val + cfg.n_test
    data_info = write_dataset(out / "data", n_total, n_views=(2, 3), image_size=cfg.image_size,
                              sources=TRAIN_SOURCES + HELD_OUT_SOURCES, seed=seed,
                              splits={"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}, write_masks=False)
    write_mtg(out / "mtg", cfg.n_mtg, image_size=cfg.image_size, seed=seed)
    timings["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    backbone, pretrain_losses = pretrain_backbone(cfg, seed)
    backbone.save_pretrained(out / "backbone")
    preprocess = PreprocessConfig(size=(cfg.image_size, cfg.image_size), resample="bilinear")
    (out / "backbone" / "preprocessor_config.json").write_text(json.dumps(preprocess.to_dict(), indent=2))
    timings["pretrain_s"] = time.perf_counter() - t

    sources = TRAIN_SOURCES + HELD_OUT_SOURCES
    test = load_local_nearid(out / "data", sources, "test")
    t = time.perf_counter()
    baseline = _bench(out / "backbone", test, sources)
    timings["baseline_eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    train_args = [
        "--model", str(out / "backbone"), "--data-dir", str(out / "data"), "--neg-sources", *TRAIN_SOURCES,
        "--val-sources", *sources, "--mtg-dir", str(out / "mtg"), "--mtg-repeat", "2",
        "--output-dir", str(out / "run"), "--max-steps", str(cfg.train_steps), "--batch-size", str(cfg.train_batch),
        "--lr", str(cfg.train_lr), "--warmup-steps", str(cfg.warmup_steps), "--seed", str(seed),
        "--checkpointing-steps", str(max(1, cfg.train_steps // 2)), "--checkpoints-total-limit", "1",
        "--export", "release", "--export-dtype", "fp32", "--report-to", "none", "--cpu", "--log-every", "100",
    ]
    train_main(train_args)
    timings["train_s"] = time.perf_counter() - t
    trained_dir = out / "run" / "export" / "release"

    t = time.perf_counter()
    nearid = _bench(trained_dir, test, sources)
    timings["nearid_eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    titles = ("frozen SigLIP-style head (before)", "NearID head (after)")
    plot = plot_kpca(dict(zip(titles, (out / "backbone", trained_dir))), test, HELD_OUT_SOURCES[0],
                     out / "embedding_kpca.png", metrics=dict(zip(titles, (baseline, nearid))), sources=sources)
    timings["plot_s"] = time.perf_counter() - t

    summary = {
        "baseline": baseline,
        "nearid": nearid,
        "improvement": {"SSR": nearid["SSR"] - baseline["SSR"], "PA": nearid["PA"] - baseline["PA"]},
        "train_sources": list(TRAIN_SOURCES),
        "held_out_sources": list(HELD_OUT_SOURCES),
        "test_identities": len(test),
        "size": asdict(cfg),
        "dataset": data_info,
        "pretrain_loss": {"first": pretrain_losses[0], "last": pretrain_losses[-1]},
        "plot": str(plot),
        "train_log": str(out / "run" / "train_log.csv"),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _format(summary: dict[str, Any]) -> str:
    lines = [f"{'held-out test (SSR / PA, %)':32s} {'frozen head':>16s} {'NearID head':>16s}"]
    for source in summary["baseline"]["per_source"]:
        b, n = summary["baseline"]["per_source"][source], summary["nearid"]["per_source"][source]
        tag = " (held-out source)" if source in summary["held_out_sources"] else ""
        lines.append(f"{source + tag:32s} {b['SSR']:7.1f} / {b['PA']:5.1f}   {n['SSR']:7.1f} / {n['PA']:5.1f}")
    b, n = summary["baseline"], summary["nearid"]
    lines.append(f"{'all sources (micro-pooled)':32s} {b['SSR']:7.1f} / {b['PA']:5.1f}   "
                 f"{n['SSR']:7.1f} / {n['PA']:5.1f}")
    lines.append(f"plot: {summary['plot']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run_demo(args.output_dir, args.size, args.seed)
    print(_format(summary))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

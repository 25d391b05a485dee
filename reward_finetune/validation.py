"""Identity validation the reward cannot fool, and its log.

At every validation the trainer samples the validation prompt with fixed seeds and measures three similarities of the
images (`IdentityJudge`):

* `identity_train`: NearID cosine to the instance images the reward optimises against;
* `identity_heldout`: NearID cosine to instance images held out of the reward (`--validation_holdout`);
* `meanpool_similarity`: cosine of the same trunk's mean-pooled patch tokens (the `siglip2-mean` baseline's readout,
  which the reward never optimises) to all instance images.

A run that inflates the first while the other two fall is fooling the reward. `IdentityLog` writes them to
`identity.csv`, plots them in `identity_curve.png`, and marks the best checkpoint by held-out identity (by the training
identity when nothing is held out) in `best_checkpoint.json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from nearid_core.losses import identity_loss
from nearid_core.preprocessing import Images
from nearid_core.runs import CsvLog
from nearid_core.scorer import NearIDScorer

IDENTITY_CSV = "identity.csv"
IDENTITY_PLOT = "identity_curve.png"
BEST_CHECKPOINT_JSON = "best_checkpoint.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METRICS = ("identity_train", "identity_heldout", "meanpool_similarity")


class IdentityJudge:
    """The three validation similarities of generated images (see the module docstring)."""

    def __init__(self, scorer: NearIDScorer, train_references: Images, heldout_references: Images,
                 reduce: str = "mean") -> None:
        self.scorer, self.reduce = scorer, reduce
        with torch.no_grad():
            self.train = scorer.embed(train_references)
            self.heldout = scorer.embed(heldout_references) if len(heldout_references) else None
            self.meanpool = scorer.embed([*train_references, *heldout_references], readout="mean")

    @torch.no_grad()
    def measure(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Images [N, 3, H, W] in 0..1 -> per-image similarities [N] for each of `METRICS` (held-out: None when
        nothing is held out)."""
        embeds = self.scorer.embed_pixels(images, input_range="0,1")
        pooled = self.scorer.embed_pixels(images, input_range="0,1", readout="mean")
        return {
            "identity_train": 1 - identity_loss(embeds, self.train, self.reduce),
            "identity_heldout": None if self.heldout is None else 1 - identity_loss(embeds, self.heldout, self.reduce),
            "meanpool_similarity": 1 - identity_loss(pooled, self.meanpool, "mean"),
        }


def _scores_text(scores: torch.Tensor | None) -> str:
    return "" if scores is None else " ".join(f"{s:.5f}" for s in scores.float().cpu().tolist())


class IdentityLog:
    """The identity curve: one row per validation (`identity.csv`), its plot and the best checkpoint.

    A new run (`resume_step=None`) starts an empty log, removing a previous run's rows and `best_checkpoint.json`; a
    resumed run keeps the rows up to the resumed step. The row of the base model (step 0, checkpoint "base") is
    plotted but is never the best checkpoint.
    """

    FIELDS = ("step", "checkpoint", *METRICS, "identity_train_min", "identity_train_max", "scores_train",
              "scores_heldout")

    def __init__(self, output_dir: str | Path, resume_step: int | None = None) -> None:
        self.output_dir = Path(output_dir)
        self._csv = CsvLog(self.output_dir / IDENTITY_CSV, self.FIELDS, keep_until_step=resume_step)
        self.rows: list[dict] = [self._parse(r) for r in self._csv.rows]
        self._write_best_and_plot()

    @staticmethod
    def _parse(row: dict) -> dict:
        out = dict(row)
        out["step"] = int(row["step"])
        for key in (*METRICS, "identity_train_min", "identity_train_max"):
            out[key] = float(row[key]) if row.get(key) not in (None, "") else None
        return out

    def append(self, step: int, checkpoint: str, metrics: dict[str, torch.Tensor | None]) -> dict:
        """Add one validation (`IdentityJudge.measure` output); returns the row (means, min/max, per-image scores)."""
        train = metrics["identity_train"].float()
        row = {"step": step, "checkpoint": checkpoint,
               **{m: None if metrics[m] is None else float(metrics[m].float().mean()) for m in METRICS},
               "identity_train_min": float(train.min()), "identity_train_max": float(train.max()),
               "scores_train": _scores_text(train), "scores_heldout": _scores_text(metrics["identity_heldout"])}
        self._csv.write({k: ("" if v is None else v) for k, v in row.items()})
        self.rows.append(row)
        self._write_best_and_plot()
        return row

    @property
    def selection_metric(self) -> str:
        """`identity_heldout` when the log has held-out scores, else `identity_train`."""
        return "identity_heldout" if any(r["identity_heldout"] is not None for r in self.rows) else "identity_train"

    def best(self) -> dict | None:
        """The checkpoint row with the highest `selection_metric` (the earliest on ties), or None."""
        key = self.selection_metric
        eligible = [r for r in self.rows if r["checkpoint"] != "base" and r[key] is not None and math.isfinite(r[key])]
        return max(eligible, key=lambda r: (r[key], -r["step"])) if eligible else None

    def _write_best_and_plot(self) -> None:
        best = self.best()
        best_path = self.output_dir / BEST_CHECKPOINT_JSON
        if best is None:
            best_path.unlink(missing_ok=True)
        else:
            key = self.selection_metric
            lora = LORA_WEIGHT_NAME if best["checkpoint"] == "final" else f"{best['checkpoint']}/{LORA_WEIGHT_NAME}"
            best_path.write_text(json.dumps({
                "checkpoint": best["checkpoint"], "step": best["step"], "lora_weights": lora,
                "selected_by": key, **{m: best[m] for m in METRICS},
                "metric": f"{key}: mean NearID cosine of the validation images to the "
                          f"{'held-out' if key == 'identity_heldout' else 'training'} instance images (higher is "
                          "better)",
            }, indent=2))
        if self.rows:
            self._plot(best)

    def _plot(self, best: dict | None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = sorted(self.rows, key=lambda r: r["step"])
        steps = [r["step"] for r in rows]
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        labels = {"identity_train": "NearID, training references (optimised)",
                  "identity_heldout": "NearID, held-out references", "meanpool_similarity": "SigLIP mean-pool"}
        for metric, style in zip(METRICS, ("o-", "s-", "^--")):
            values = [r[metric] for r in rows]
            if any(v is not None for v in values):
                ax.plot(steps, [math.nan if v is None else v for v in values], style, label=labels[metric])
        if best is not None:
            key = self.selection_metric
            ax.plot([best["step"]], [best[key]], marker="*", markersize=16, color="tab:red", linestyle="",
                    label=f"best: {best['checkpoint']}")
        ax.set_xlabel("step")
        ax.set_ylabel("cosine to the instance images")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
        fig.tight_layout()
        fig.savefig(self.output_dir / IDENTITY_PLOT, dpi=100)
        plt.close(fig)


def split_references(files: Sequence[Path], holdout: int) -> tuple[list[Path], list[Path]]:
    """(reward references, held-out references): the last `holdout` files (by name) are held out.

    Raises:
        ValueError: holding out that many would leave the reward no reference.
    """
    if holdout >= len(files) and holdout > 0:
        raise ValueError(f"--validation_holdout {holdout} would hold out all {len(files)} instance images; the reward "
                         f"needs at least one (use at most {len(files) - 1}, or 0).")
    cut = len(files) - holdout
    return list(files[:cut]), list(files[cut:])

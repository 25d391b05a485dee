"""Training-run plumbing shared by the head trainer (`nearid_core.train`) and the reward trainer (`reward_finetune`).

* `checkpoint-<step>/` folders written atomically: `begin_checkpoint` gives a hidden temporary folder, `commit_checkpoint`
  renames it into place once every file is written and synced, so a crash leaves the previous set of checkpoints or
  the new one, never a partial folder that `latest` would pick.
* `checkpoint_dirs` / `latest_checkpoint` / `resolve_resume` / `prune_checkpoints`: listing, `--resume latest` and
  `--checkpoints_total_limit`. A folder counts as a checkpoint only when its completion marker file exists.
* `CsvLog`: an append-only CSV that a resumed run truncates to the resumed step and a new run starts afresh.
* `available_trackers`: which accelerate trackers a `--report_to` value means on this install.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "trainer_state.json"  # written last into every checkpoint: its presence means "complete"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# accelerate tracker name -> the package it needs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow"}


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first (temporary and partial folders ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / CHECKPOINT_MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1][1] if found else None


def resolve_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """The checkpoint to resume from: `latest` -> newest complete one in `output_dir` (None if there is none yet);
    otherwise the folder as given, or of that name under `output_dir`.

    Raises:
        FileNotFoundError: the named folder does not exist or is not a complete checkpoint.
    """
    if not resume:
        return None
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("resume latest: no checkpoint in %s yet, starting a new run", output_dir)
        return path
    path = Path(resume)
    if not path.is_dir() and (Path(output_dir) / path.name).is_dir():
        path = Path(output_dir) / path.name
    if not (path / CHECKPOINT_MARKER).is_file():
        raise FileNotFoundError(f"{resume} is not a complete training checkpoint (no {CHECKPOINT_MARKER}; looked at "
                                f"{path}).")
    return path


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None, protect: Sequence[str] = ()) -> list[Path]:
    """Delete the oldest checkpoints until at most `total_limit` remain; folders named in `protect` (e.g. the best
    checkpoint) are never deleted, even if that keeps one more than the limit. Returns the deleted folders."""
    if total_limit is None:
        return []
    found = [p for _, p in checkpoint_dirs(output_dir)]
    removed = []
    for path in found:
        if len(found) - len(removed) <= total_limit:
            break
        if path.name in protect:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info("checkpoints total limit %d: removed %s", total_limit, ", ".join(p.name for p in removed))
    return removed


def checkpoint_folder(output_dir: str | os.PathLike, step: int, temporary: bool = False) -> Path:
    """`checkpoint-<step>` in `output_dir`, or the hidden folder it is written in before `commit_checkpoint`."""
    name = f"{CHECKPOINT_PREFIX}{step}"
    return Path(output_dir) / (f".{name}.tmp" if temporary else name)


def begin_checkpoint(output_dir: str | os.PathLike, step: int) -> Path:
    """A fresh, empty `checkpoint_folder(output_dir, step, temporary=True)` to write checkpoint `step` into (the same
    name on every process)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_folder(output_dir, step, temporary=True)
    if tmp.exists():  # left by a crash
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(tmp: str | os.PathLike) -> Path:
    """Sync every file of a folder from `begin_checkpoint` (which must hold `CHECKPOINT_MARKER`, written last) and
    rename it to `checkpoint-<step>`, replacing an existing checkpoint of the same step. Returns the final folder."""
    tmp = Path(tmp)
    if not (tmp / CHECKPOINT_MARKER).is_file():
        raise FileNotFoundError(f"{tmp} has no {CHECKPOINT_MARKER}: write it last, after everything else.")
    root = tmp.parent
    final = root / tmp.name[1:].removesuffix(".tmp")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(tmp)
    old = None
    if final.exists():  # re-saving the same step (e.g. after an interrupted resume): swap, then drop the old one
        old = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------------
# Logs and trackers
# ----------------------------------------------------------------------------------------------------------------------


class CsvLog:
    """An append-only CSV. A new run (`keep_until_step=None`) starts it empty; a resumed run keeps the rows up to the
    resumed step, so the file always matches the run. `rows` holds the kept and written rows (values as written)."""

    def __init__(self, path: str | os.PathLike, fields: Sequence[str], keep_until_step: int | None = None) -> None:
        self.path, self.fields = Path(path), list(fields)
        self.rows: list[dict[str, str]] = []
        if keep_until_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def write(self, row: dict[str, Any]) -> None:
        text = {k: (repr(v) if isinstance(v, float) else str(v)) for k, v in row.items() if k in self.fields}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(text)
        self.rows.append(text)


def available_trackers(report_to: str, flag: str = "--report_to") -> list[str]:
    """The accelerate trackers a `report_to` value asks for: `auto` = the installed ones among tensorboard / wandb
    (none installed: none), `all` = all of those and they must be installed, `none`, or a comma-separated list of
    tensorboard / wandb / comet_ml / mlflow.

    Raises:
        ValueError: an unknown tracker, or one whose package is not installed (the message names `flag` and the fix).
    """
    wanted = [t.strip() for t in report_to.split(",") if t.strip()]
    if wanted in ([], ["none"]):
        return []
    if wanted == ["auto"]:
        return [t for t in ("tensorboard", "wandb") if _installed(TRACKER_PACKAGES[t])]
    if wanted == ["all"]:
        wanted = ["tensorboard", "wandb"]
    unknown = [t for t in wanted if t not in TRACKER_PACKAGES]
    if unknown:
        raise ValueError(f"{flag} {unknown[0]!r} is not supported; use {', '.join(TRACKER_PACKAGES)}, auto, all "
                         "or none.")
    missing = [t for t in wanted if not _installed(TRACKER_PACKAGES[t])]
    if missing:
        raise ValueError(f"{flag} {report_to}: {', '.join(missing)} is not installed "
                         f"(pip install {' '.join(TRACKER_PACKAGES[t] for t in missing)}), or use {flag} auto / none.")
    return wanted


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None

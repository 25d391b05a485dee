"""Training-run plumbing shared by the head trainer (`nearid_core.train`) and the reward trainer (`reward_finetune`).

* `checkpoint-<step>/` folders written atomically: `begin_checkpoint` gives a hidden temporary folder, `commit_checkpoint`
  renames it into place once every file is written and synced, so a crash leaves the previous set of checkpoints or
  the new one, never a partial folder that `latest` would pick.
* `clean_stale_checkpoints`: on start, delete the temporary folders a killed run left behind (never those of a run
  that is still going).
* `checkpoint_dirs` / `latest_checkpoint` / `resolve_resume` / `prune_checkpoints`: listing, `--resume latest` and
  `--checkpoints_total_limit`. A folder counts as a checkpoint only when its completion marker file exists.
* `CsvLog`: an append-only CSV that a resumed run truncates to the resumed step and a new run starts afresh.
* `available_trackers`: which accelerate trackers a `--report_to` value means on this install.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "trainer_state.json"  # written last into every checkpoint: its presence means "complete"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# temporary folders: `.checkpoint-N.tmp` (begin_checkpoint; `.tmp-PID` in older versions), `.checkpoint-N.old-PID`
# (the replaced folder during commit_checkpoint)
_TEMP_RE = re.compile(r"^\.checkpoint-\d+\.(?:tmp|old)(?:-(\d+))?$")
_OWNER = ".owner.json"  # in a temporary folder: the process writing it (removed by commit_checkpoint)
_OWNERLESS_GRACE_S = 600.0  # a temporary folder with no owner record is left alone this long after its last change

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
    """A fresh `checkpoint_folder(output_dir, step, temporary=True)` to write checkpoint `step` into (the same name on
    every process). It holds only an owner record (this process), which `clean_stale_checkpoints` reads and
    `commit_checkpoint` removes."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_folder(output_dir, step, temporary=True)
    if tmp.exists():  # left by a crash
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / _OWNER).write_text(json.dumps(_this_process()))
    return tmp


def commit_checkpoint(tmp: str | os.PathLike) -> Path:
    """Sync every file of a folder from `begin_checkpoint` (which must hold `CHECKPOINT_MARKER`, written last) and
    rename it to `checkpoint-<step>`, replacing an existing checkpoint of the same step. Returns the final folder."""
    tmp = Path(tmp)
    if not (tmp / CHECKPOINT_MARKER).is_file():
        raise FileNotFoundError(f"{tmp} has no {CHECKPOINT_MARKER}: write it last, after everything else.")
    root = tmp.parent
    final = root / tmp.name[1:].removesuffix(".tmp")
    (tmp / _OWNER).unlink(missing_ok=True)
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


def clean_stale_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary checkpoint folders (`.checkpoint-N.tmp`, `.checkpoint-N.old-PID`) that killed or crashed
    runs left in `output_dir`; call it once on start, before the first save, on the main process.

    A folder is stale when the process that wrote it is gone: its recorded process id is not running on this host (or
    is now another process, or is this one: nothing is being saved yet), or, with no record, it has not changed for
    10 minutes. Folders written by a running process, or by another host, are kept (and logged). Returns the deleted
    folders.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        m = _TEMP_RE.match(path.name)
        if not m or not path.is_dir():
            continue
        owner = _owner_of(path, m.group(1))
        if owner is not None and _running(owner):
            logger.info("kept %s: it is being written by process %s on %s", path, owner.get("pid"), owner.get("host"))
            continue
        if owner is None and time.time() - path.stat().st_mtime < _OWNERLESS_GRACE_S:
            continue  # no record yet (being created) or an unknown writer: too recent to tell
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info("removed %d stale temporary checkpoint folder(s) left by an interrupted run: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def _this_process() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}


def _process_start(pid: int) -> str | None:
    """When process `pid` started (Linux: clock ticks since boot, /proc/PID/stat field 22), to tell a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_of(path: Path, pid_in_name: str | None) -> dict[str, Any] | None:
    """The owner record of a temporary folder, or the PID in its name (on this host), or None."""
    try:
        owner = json.loads((path / _OWNER).read_text())
        if isinstance(owner, dict) and isinstance(owner.get("pid"), int):
            return owner
    except (OSError, ValueError):
        pass
    return {"pid": int(pid_in_name), "host": socket.gethostname()} if pid_in_name else None


def _running(owner: dict[str, Any]) -> bool:
    """Whether the process of an owner record may still be writing (unknowable for another host: assume so)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner["pid"]
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    start, now = owner.get("start"), _process_start(pid)
    return start is None or now is None or start == now


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

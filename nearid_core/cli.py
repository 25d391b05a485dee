"""`nearid` command line: `nearid score` ranks candidates by identity against references; `nearid embed` writes
embeddings.

    nearid score --ref ref.png [--ref ref2.png ...] CANDIDATE [CANDIDATE ...] [--model ID_OR_DIR] [--json]
    nearid embed IMAGE [IMAGE ...] --output embeddings.safetensors|.npy [--model ID_OR_DIR]
    nearid embed [IMAGE ...] [--file-list FILE] | --dataset NAME_OR_DIR [--split S] [--image-column C] [--streaming]
                 [--shard-size N --output FOLDER]

A candidate or image argument may be a directory: its image files are used, sorted by name. Arguments are parsed and
checked before torch and the model load, so `--help` and usage errors answer at once. With `--shard-size`, `embed`
writes resumable shards into a folder, split across the processes of `accelerate launch` (see `embed_shards`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .names import DEFAULT_MODEL, DTYPE_NAMES, IMAGE_SUFFIXES, REDUCTIONS

EMBED_SUFFIXES = (".safetensors", ".npy")


class UsageError(ValueError):
    """A mistake in what the user typed; reported as one message with exit status 2."""


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id, checkpoint directory or head-only .safetensors file (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=(*DTYPE_NAMES, "int8"), default="auto",
                        help="auto = fp16 on CUDA; on CPUs bf16 where it is measured faster, else fp32; int8 = the "
                             "trunk's linears in int8 through torchao, compiled (CPU only, opt-in for bulk scoring; "
                             "pip install 'nearid-toolkit[int8]')")
    parser.add_argument("--compile", action="store_true",
                        help="wrap each trunk layer in torch.compile (the first batch pays the compilation; always on "
                             "with --dtype int8)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0,
                        help="processes decoding and resizing images while the model runs (default 0: in the main "
                             "process)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="skip image files that cannot be read (reported on stderr) instead of stopping")
    parser.add_argument("--allow-large-images", action="store_true",
                        help="read images over PIL's decompression-bomb limit (~179 MP), decoded at reduced size")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nearid", description="NearID identity scoring.")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="rank candidate images by identity similarity to reference images",
                           description="Scores are cosine similarities in [-1, 1] (also shown as 100*cos); "
                                       "higher = more likely the same object instance.")
    score.add_argument("--ref", action="append", required=True, metavar="REF",
                       help="reference image (or directory); repeat for several references")
    score.add_argument("candidates", nargs="+", help="candidate images or directories")
    score.add_argument("--reduce", choices=REDUCTIONS, default="mean", help="how several references combine")
    score.add_argument("--top-k", type=int, default=None, help="print only the best K")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_model_args(score)

    embed = sub.add_parser("embed", help="write L2-normalised embeddings of images",
                           description="Writes [N, D] float32 embeddings. A .safetensors file records the source "
                                       "file of each row in its metadata; a .npy file gets a sidecar <file>.json.")
    embed.add_argument("images", nargs="*", help="images or directories")
    embed.add_argument("--file-list", metavar="FILE",
                       help="a text file of images (or directories), one a line; relative paths are read from its "
                            "folder")
    embed.add_argument("--dataset", metavar="NAME_OR_DIR",
                       help="embed a Hugging Face dataset instead: a hub name or a folder written by save_to_disk")
    embed.add_argument("--split", default="train", help="split of --dataset (default train)")
    embed.add_argument("--image-column", default="image", help="image column of --dataset (default image)")
    embed.add_argument("--streaming", action="store_true",
                       help="stream --dataset (datasets' streaming=True) instead of downloading it first: rows are "
                            "read in order as they are embedded; with --shard-size a rerun continues after the last "
                            "complete shard, re-reading the rows before it (one process only)")
    embed.add_argument("--shard-size", type=int, default=None, metavar="N",
                       help="write N rows a shard into the --output folder (shard-00000.safetensors ... and "
                            "manifest.json); a rerun computes only missing shards; under `accelerate launch` the "
                            "processes share the shards")
    embed.add_argument("--output", "-o", required=True,
                       help="output file: .safetensors or .npy; with --shard-size, a folder")
    _add_model_args(embed)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments (files, directories, output path) without loading torch or the model."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        if args.workers < 0:
            raise UsageError("--workers must be >= 0")
        if args.dtype == "int8":
            check_int8(args.device)
        if args.command == "score":
            if args.top_k is not None and args.top_k < 1:
                raise UsageError("--top-k must be >= 1")
            args.ref_paths = expand_images(args.ref)
            args.candidate_paths = expand_images(args.candidates)
        else:
            check_embed_inputs(args)
    except UsageError as err:
        parser.error(str(err))
    return args


def check_int8(device: str | None) -> None:
    """`--dtype int8` needs torchao and a CPU; checked before torch loads.

    Raises:
        UsageError: torchao is not installed, or `device` is not a CPU.
    """
    import importlib.util

    if device is not None and not device.startswith("cpu"):
        raise UsageError(f"--dtype int8 runs on CPUs only; got --device {device} (on a GPU use the default fp16)")
    if importlib.util.find_spec("torchao") is None:
        raise UsageError("--dtype int8 needs torchao: pip install 'nearid-toolkit[int8]'")


def expand_images(items: Sequence[str]) -> list[Path]:
    """Paths as given; directories replaced by their image files (sorted by name).

    Raises:
        UsageError: a path that does not exist, or a directory without image files.
    """
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"directory {path} contains no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif path.exists() or path.is_symlink():  # a broken link or a loop is reported precisely when read
            paths.append(path)
        else:
            raise UsageError(f"image file not found: {path}")
    return paths


def check_embed_inputs(args: argparse.Namespace) -> None:
    """Check `nearid embed`'s inputs and output; sets `args.output` (a Path) and `args.image_paths` (files; empty with
    --dataset, which loads later, with the model)."""
    if args.shard_size is not None and args.shard_size < 1:
        raise UsageError("--shard-size must be >= 1")
    if args.shard_size is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("several processes (accelerate launch) need --shard-size N and an --output folder")
    if args.dataset is not None and (args.images or args.file_list):
        raise UsageError("give either --dataset or images / --file-list, not both")
    if args.dataset is None and not args.images and not args.file_list:
        raise UsageError("nothing to embed: give images or directories, --file-list FILE or --dataset NAME")
    if args.streaming and args.dataset is None:
        raise UsageError("--streaming streams a --dataset; give --dataset NAME_OR_DIR")
    if args.streaming and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--streaming runs in one process: a stream cannot be split into shards by process; save the "
                         "dataset with save_to_disk and embed that folder under accelerate launch")
    args.output = check_output(args.output) if args.shard_size is None else check_output_folder(args.output)
    listed = read_file_list(Path(args.file_list)) if args.file_list else []
    args.image_paths = expand_images([*args.images, *listed]) if args.dataset is None else []


def read_file_list(path: Path) -> list[str]:
    """The paths of a --file-list: one a line, blank lines and #-comments skipped, relative ones read from the list's
    folder.

    Raises:
        UsageError: the list cannot be read or names nothing.
    """
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read --file-list {path}: {getattr(err, 'strerror', None) or err}") from err
    paths = [str(path.parent / line) for line in lines if line and not line.startswith("#")]
    if not paths:
        raise UsageError(f"--file-list {path} names no files")
    return paths


def check_output_folder(output: str) -> Path:
    """The `--output` folder of a sharded run, created if missing and checked writable before any work.

    Raises:
        UsageError: an empty name, an existing file, or a folder that cannot be created or written.
    """
    path = Path(output)
    if not output.strip():
        raise UsageError("--output is empty; with --shard-size give a folder name such as embeddings/")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output {output} is a file; with --shard-size it names a folder of shards")
    _writable_folder(path, output)
    return path


def _writable_folder(folder: Path, output: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the folder of --output {output}: {err.strerror or err}") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write --output {output}: the folder {folder} is not writable")


def check_output(output: str) -> Path:
    """The `--output` path, checked before any work: a .safetensors / .npy file in a writable directory.

    Raises:
        UsageError: a wrong suffix, an existing directory, or a folder that cannot be created or written.
    """
    path = Path(output)
    if path.is_dir():
        raise UsageError(f"--output {output} is a directory; give a file name such as "
                         f"{path / 'embeddings.safetensors'} (or --shard-size N to write shards into the folder)")
    if not output.strip():
        raise UsageError("--output is empty; give a file name such as embeddings.safetensors")
    if path.suffix.lower() not in EMBED_SUFFIXES:
        raise UsageError(f"--output must end in .safetensors or .npy, got {output!r}")
    path = path.with_suffix(path.suffix.lower())
    if path.suffix == ".npy" and sidecar_path(path).is_dir():
        raise UsageError(f"--output {output}: its row-source sidecar {sidecar_path(path)} is a directory")
    _writable_folder(path.parent, output)
    return path


# --------------------------------------------------------------------------------------------------------------------
# The work (torch and the model load from here on)


def _load_scorer(args: argparse.Namespace):
    import torch

    from .scorer import NearIDScorer

    dtypes = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}
    return NearIDScorer.from_pretrained(args.model, device=args.device, dtype=dtypes[args.dtype],
                                        quantize="int8" if args.dtype == "int8" else None,
                                        compile=True if args.compile else None)


def _embed_files(scorer, paths: Sequence[Path], args: argparse.Namespace):
    return scorer.embed_files(paths, batch_size=args.batch_size, num_workers=args.workers,
                              skip_unreadable=args.skip_unreadable)


def _report_skipped(skipped: Sequence[tuple[Path, str]]) -> None:
    for path, reason in skipped:
        print(f"nearid: skipped {path}: {reason}", file=sys.stderr)
    if skipped:
        print(f"nearid: skipped {len(skipped)} unreadable image(s)", file=sys.stderr)


def run_score(args: argparse.Namespace) -> int:
    from .scorer import to_percent

    scorer = _load_scorer(args)
    refs, references, skipped_refs = _embed_files(scorer, args.ref_paths, args)
    cands, candidates, skipped = _embed_files(scorer, args.candidate_paths, args)
    _report_skipped([*skipped_refs, *skipped])
    if not references:
        raise UsageError("no reference image could be read")
    if not candidates:
        raise UsageError("no candidate image could be read")
    order, scores = scorer.rank(refs, cands, top_k=args.top_k, reduce=args.reduce)
    rows = [
        {"rank": r + 1, "file": str(candidates[i]), "score": round(float(s), 6), "score_100": round(float(to_percent(s)), 2)}
        for r, (i, s) in enumerate(zip(order.tolist(), scores))
    ]
    if args.json:
        payload = {"model": str(args.model), "references": [str(p) for p in references], "reduce": args.reduce,
                   "results": rows, "skipped": [{"file": str(p), "reason": why} for p, why in [*skipped_refs, *skipped]]}
        print(json.dumps(payload, indent=2))
        return 0
    width = max(len("candidate"), *(len(r["file"]) for r in rows))
    print(f"references ({args.reduce}): " + ", ".join(str(p) for p in references))
    print(f"{'rank':>4}  {'cosine':>8}  {'100*cos':>7}  candidate")
    print(f"{'-' * 4}  {'-' * 8}  {'-' * 7}  {'-' * width}")
    for r in rows:
        print(f"{r['rank']:>4}  {r['score']:>8.4f}  {r['score_100']:>7.2f}  {r['file']}")
    return 0


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it over `path` (readers never see half).

    A symlinked `path` keeps its link: the file it points to is replaced. The file gets the usual permissions
    (0666 less the umask), not the temporary file's private 0600."""
    path = Path(os.path.realpath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sidecar_path(npy_path: Path) -> Path:
    """Where `nearid embed` records the source file of each row of a .npy output: `<file>.json`."""
    return npy_path.with_name(npy_path.name + ".json")


def run_embed(args: argparse.Namespace) -> int:
    from . import embed_shards

    items = (embed_shards.load_image_dataset(args.dataset, args.split, args.image_column, args.streaming)
             if args.dataset is not None else args.image_paths)
    if args.shard_size is not None:
        return _run_embed_shards(args, items)
    scorer = _load_scorer(args)
    if args.streaming:
        embeddings, images, skipped = embed_shards.embed_stream(lambda part: _embed_files(scorer, part, args),
                                                                items.rows())
    else:
        embeddings, images, skipped = _embed_files(scorer, items, args)
    embeddings = embeddings.cpu()
    _report_skipped(skipped)
    if not images:
        raise UsageError("no image could be read; nothing written")
    output: Path = args.output
    provenance = {"files": [str(p) for p in images], "model": str(args.model)}
    if output.suffix == ".npy":
        import numpy as np

        def save_npy(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, embeddings.numpy())

        write_atomic(sidecar_path(output), lambda tmp: tmp.write_text(json.dumps(provenance, indent=2)))
        write_atomic(output, save_npy)
        where = f" (rows' source files in {sidecar_path(output)})"
    else:
        embed_shards.save_safetensors(output, embeddings, provenance["files"], model=provenance["model"])
        where = ""
    print(f"wrote {tuple(embeddings.shape)} embeddings to {output}{where}")
    return 0


def _run_embed_shards(args: argparse.Namespace, items: Sequence[Any]) -> int:
    """`nearid embed --shard-size N`: this process's missing shards, then (main process) the manifest."""
    from . import embed_shards

    processes = embed_shards.current_processes()
    if processes.count > 1 and args.device is None:
        args.device = processes.device
    scorer = _load_scorer(args)
    digest = items.digest() if hasattr(items, "digest") else embed_shards.sources_digest([str(p) for p in items])
    identity = {"fingerprint": scorer.fingerprint(), "shard_size": args.shard_size,
                "inputs": None if args.streaming else len(items), "sources_sha256": digest}
    embed = lambda part: _embed_files(scorer, part, args)  # noqa: E731
    if args.streaming:
        done = embed_shards.write_stream_shards(args.output, items, identity, embed, model=str(args.model))
    else:
        done = embed_shards.write_shards(args.output, items, identity, embed, processes, model=str(args.model))
    _report_skipped(done["skipped"])
    tag = f"process {processes.index}/{processes.count}: " if processes.count > 1 else ""
    print(f"{tag}wrote {len(done['written'])} shard(s), {len(done['kept'])} already complete")
    if done["manifest"] is not None:
        manifest = done["manifest"]
        print(f"{args.output}: {manifest['rows']} embeddings in {manifest['shards']} shard(s) "
              f"(load with nearid_core.load_embeddings)")
        if manifest["rows"] == 0:
            raise UsageError("no image could be read; the shards are empty")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.allow_large_images:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
    from .checkpoint import CheckpointError, CheckpointNotFoundError
    from .preprocessing import ImageInputError
    from .quantization import QuantizationError
    from .scorer import DeviceError

    try:
        return {"score": run_score, "embed": run_embed}[args.command](args)
    except (CheckpointNotFoundError, CheckpointError, ImageInputError, DeviceError, QuantizationError,
            UsageError) as err:
        hint = " (or pass --skip-unreadable)" if isinstance(err, ImageInputError) else ""
        print(f"nearid: error: {err}{hint}", file=sys.stderr)
        return 2
    except OSError as err:  # the output could not be written (disk full, permissions changed meanwhile)
        print(f"nearid: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from nearid_core.cli import main as package_main  # so UsageError is one class with embed_shards' import of it

    sys.exit(package_main())

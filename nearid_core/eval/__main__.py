"""``python -m nearid_core.eval``: the paper's benchmarks for NearID, the baselines, or precomputed similarities.

Usage::

    python -m nearid_core.eval nearid-bench --hf [--sources flux qwen ...] [--indices splits/test.json] [--masks fg]
    python -m nearid_core.eval nearid-bench --data DIR [--split test|all|FILE.json] [--baseline clip-vit-l14]
    python -m nearid_core.eval nearid-bench --sims flux.csv qwen.csv ...       # source name = file stem
    python -m nearid_core.eval mtg --hf | --data DIR | --sims FILE.csv
    python -m nearid_core.eval dreambench --ratings DIR [--category object] [--strict]
    python -m nearid_core.eval dreambench-score --samples SAMPLES --ratings DIR [--name nearid]

Model runs take ``--model`` (hub id or local dir; default the chosen baseline's weights, NearID for ``nearid``),
``--baseline`` (``nearid``, ``siglip2-map``, ``siglip2-mean``, ``clip-vit-l14``, ``dinov2-l``), ``--device``,
``--dtype``, ``--batch-size``, and write their per-sample similarity CSVs to ``--sims-out`` (re-summarise them later
with ``--sims``). ``nearid-bench`` numbers the images as the paper's ``sim_test.py`` does (``--indexing compact``, the
default, Table 1) or slot by slot (``--indexing aligned``); the table notes and the JSON say which. ``--sims`` tables
are checked (columns, numbers, values in ``--sim-range``, default -1 1; unique sample ids); empty cells, like the
missing views and distractors of ``--data``, are counted and reported under the table and in the JSON. Every
subcommand prints a table and takes ``--json``, ``--csv``, ``--latex`` and ``--plots DIR``. A mistake in the command
line or the inputs exits with status 2 and one message.
Launch with ``accelerate launch -m nearid_core.eval ...`` to split the embedding over several GPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Only light modules here: arguments are parsed and checked before torch, transformers or a dataset library loads.
from .metrics import M_H_CATEGORIES
from .names import BASELINE_NAMES, DTYPE_NAMES, INDEXING_MODES, MASK_MODES, RATING_NAME_PATTERN, SIM_RANGE

if TYPE_CHECKING:
    from .benchmarks import Table

logger = logging.getLogger("nearid_core.eval")

MODEL_FLAGS = ("model", "baseline", "device", "dtype", "batch_size", "sims_out", "cache_dir")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (not with --sims)")
    g.add_argument("--model", help="hub id or local dir of the weights (default: the baseline's; NearID: "
                                   "Aleksandar/nearid-siglip2)")
    g.add_argument("--baseline", choices=BASELINE_NAMES, help="embedder family (default nearid)")
    g.add_argument("--device", help="torch device (default cuda if available, else cpu; per process when launched "
                                    "with accelerate)")
    g.add_argument("--dtype", choices=DTYPE_NAMES, help="weights dtype (default auto: fp16 on CUDA)")
    g.add_argument("--batch-size", type=int, help="images per forward pass (default 32)")
    g.add_argument("--cache-dir", help="cache folder for hub models and datasets")


def _add_sim_range(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sim-range", nargs=2, type=float, metavar=("LO", "HI"),
                   help="--sims only: the scale of the similarity cells (default -1 1, cosines); a cell outside it "
                        "is an error")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", type=Path, help="write the summary JSON here")
    g.add_argument("--csv", type=Path, help="write the summary table as CSV here")
    g.add_argument("--latex", type=Path, help="write the summary table as a LaTeX tabular here")
    g.add_argument("--plots", type=Path, help="write the figures (PNG) into this folder")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nearid_core.eval",
                                     description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("nearid-bench", help="NearID-Bench SSR / PA per distractor source and micro-pooled")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="local dataset folder (layout: nearid_core.data)")
    src.add_argument("--hf", action="store_true", help="hub datasets Aleksandar/NearID + Aleksandar/NearID-<Source>")
    src.add_argument("--sims", nargs="+", type=Path, metavar="CSV", help="per-sample similarity CSVs, one per source")
    p.add_argument("--sources", nargs="+", help="distractor sources (default: --hf the seven of the paper, "
                                                "nearid_core.data.EVAL_SOURCES; --data every folder under "
                                                "distractors/)")
    p.add_argument("--split", help="split name, 'all', or (--data) a JSON file (default test)")
    p.add_argument("--indices", type=Path, help="JSON list of 0-based row positions selecting the split")
    p.add_argument("--masks", choices=MASK_MODES, help="full images (default, Table 1) or fg (cleaned masks)")
    p.add_argument("--indexing", choices=INDEXING_MODES,
                   help="compact (default; the paper's sim_test.py numbering, Table 1: cross_ij = i-th present view vs "
                        "j-th present distractor) or aligned (cross_aa = view a+1 vs the distractor in its own "
                        "background)")
    p.add_argument("--sims-out", type=Path, help="folder for the per-sample CSVs (default "
                                                 "eval_outputs/<model>/nearid-bench_<masks>[_aligned])")
    _add_sim_range(p)
    _add_model_options(p)
    _add_output_options(p)

    p = sub.add_parser("mtg", help="MTG M-O, M-Opair, SSR, PA")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="local MTG folder (<root>/<sample_id>/image_*.png)")
    src.add_argument("--hf", action="store_true", help="hub dataset abdo-eldesokey/mtg-dataset")
    src.add_argument("--sims", type=Path, metavar="CSV", help="per-sample CSV with sim_12, sim_1_1p, sim_1_2p, "
                                                              "sim_2_2p, sim_2_1p, oracle_1, oracle_2 (or the "
                                                              "reference's mtg_sim_1_2 ... mtg_oracle_2)")
    p.add_argument("--split", help="hub split (default test; --hf only)")
    p.add_argument("--masks", choices=MASK_MODES, help="full (default) or fg (object masks, uncleaned)")
    p.add_argument("--sims-out", type=Path,
                   help="per-sample CSV to write (default eval_outputs/<model>/mtg_<masks>.csv)")
    _add_sim_range(p)
    _add_model_options(p)
    _add_output_options(p)

    p = sub.add_parser("dreambench", help="DreamBench++ M-H from a ratings folder")
    p.add_argument("--ratings", type=Path, required=True,
                   help="folder with data_human_rating/ and data_<scorer>_rating/")
    p.add_argument("--category", nargs="+", choices=M_H_CATEGORIES, help="categories (default all four)")
    p.add_argument("--strict", action="store_true",
                   help="a data_<scorer>_rating folder lacking some method is an error (default: skipped with a "
                        "warning, as the reference does)")
    _add_output_options(p)

    p = sub.add_parser("dreambench-score", help="write data_<name>_rating/ from DreamBench++ samples")
    p.add_argument("--samples", type=Path, required=True, help="run folders with src_image/ and tgt_image/")
    p.add_argument("--ratings", type=Path, required=True, help="ratings folder to write data_<name>_rating/ into")
    p.add_argument("--name", help="scorer name (default: the baseline name, '-' -> '_')")
    _add_model_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    return parser


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) not in (None, False)]


def _check_input_file(path: Path, flag: str) -> None:
    """An input file must exist, be a file and not be empty."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; pass the file(s) inside it (e.g. {path}/*.csv)")
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file (if it holds a shell pattern, the pattern matched nothing)")
    if path.stat().st_size == 0:
        raise ValueError(f"{flag} {path} is empty")


def _check_input_folder(path: Path, flag: str) -> None:
    if not path.is_dir():
        raise ValueError(f"{flag} {path}: {'not a folder' if path.exists() else 'no such folder'}")


def _check_json_file(path: Path, flag: str) -> None:
    _check_input_file(path, flag)
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag} {path} is not valid JSON: {err}") from None


def _input_files(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(flag, file) for every input file the command reads that an output could overwrite."""
    sims = getattr(args, "sims", None)
    inputs = [("--sims", p) for p in (sims if isinstance(sims, list) else [sims]) if p is not None]
    if getattr(args, "indices", None) is not None:
        inputs.append(("--indices", args.indices))
    split = getattr(args, "split", None)
    if split is not None and split.endswith(".json"):
        inputs.append(("--split", Path(split)))
    if args.command == "dreambench":
        inputs += [("--ratings", p) for p in sorted(args.ratings.glob("data_*_rating/**/*.json"))]
    return inputs


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _check_outputs(args: argparse.Namespace) -> None:
    """Output paths must be creatable (a file is not an existing folder and a folder is not an existing file) and
    must not be one of the input files."""
    files = [("--json", args.json), ("--csv", args.csv), ("--latex", args.latex)] if hasattr(args, "json") else []
    folders = [("--plots", args.plots)] if hasattr(args, "plots") else []
    sims_out = getattr(args, "sims_out", None)
    (files if args.command == "mtg" else folders).append(("--sims-out", sims_out))
    inputs = _input_files(args)
    for flag, path in files:
        if path is not None and path.is_dir():
            raise ValueError(f"{flag} {path} is a folder; give a file name")
        for in_flag, in_path in inputs if path is not None else []:
            if _same_file(path, in_path):
                raise ValueError(f"{flag} {path} is the input {in_flag} {in_path}; writing it would destroy the "
                                 "input, give another output file")
    for flag, path in folders:
        if path is not None and path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path} is a file; give a folder")


def _check_split(data: Path, split: str) -> None:
    """``--split`` of ``--data``: a name (``<data>/splits/<name>.json``), ``all``, or a JSON file."""
    if split == "all" or (data / "splits" / f"{split}.json").is_file():
        return
    if split.endswith(".json"):
        _check_json_file(Path(split), "--split")
    elif Path(split).suffix or os.sep in split or "/" in split:
        raise ValueError(f"--split {split}: expected a split name (a file {data}/splits/<name>.json, e.g. test), "
                         "'all', or a .json file listing identity ids")


def _check_sim_range(args: argparse.Namespace) -> None:
    if args.sim_range is None:
        args.sim_range = SIM_RANGE
        return
    lo, hi = args.sim_range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"--sim-range needs two finite numbers LO < HI, got {lo:g} {hi:g}")
    args.sim_range = (lo, hi)


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check flag combinations, input and output paths, and fill defaults; raises ValueError naming the flag and
    the fix. Loads nothing but small JSON files."""
    cmd = args.command
    if cmd in ("nearid-bench", "mtg"):
        if args.sims is not None:
            extra = _given(args, MODEL_FLAGS + ("split", "masks") + (("sources", "indices", "indexing")
                                                                      if cmd == "nearid-bench" else ()))
            if extra:
                raise ValueError(f"{cmd} --sims summarises precomputed similarities; {', '.join(extra)} do not apply")
            _check_sim_range(args)
            for path in args.sims if cmd == "nearid-bench" else [args.sims]:
                _check_input_file(path, "--sims")
            _check_outputs(args)
            return args
        if args.sim_range is not None:
            raise ValueError("--sim-range declares the scale of --sims tables; it does not apply to a model run")
        if cmd == "nearid-bench" and args.indices is not None and args.split not in (None, "all"):
            raise ValueError("give either --split or --indices, not both (--indices selects the rows itself)")
        if cmd == "mtg" and args.data is not None and args.split is not None:
            raise ValueError("mtg --data: the local MTG layout has no splits; --split applies to --hf only")
        if args.data is not None:
            _check_input_folder(args.data, "--data")
        if cmd == "nearid-bench" and args.indices is not None:
            _check_json_file(args.indices, "--indices")
        if cmd == "nearid-bench" and args.data is not None and args.split is not None:
            _check_split(args.data, args.split)
        args.masks = args.masks or "full"
        if cmd == "nearid-bench":
            args.indexing = args.indexing or "compact"
    if cmd in ("nearid-bench", "mtg", "dreambench-score"):
        args.baseline = args.baseline or "nearid"
        args.batch_size = 32 if args.batch_size is None else args.batch_size
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if cmd == "dreambench":
        _check_input_folder(args.ratings, "--ratings")
    if cmd == "dreambench-score":
        _check_input_folder(args.samples, "--samples")
        if args.ratings.exists() and not args.ratings.is_dir():
            raise ValueError(f"--ratings {args.ratings} is a file; give the ratings folder")
        args.name = args.name or args.baseline.replace("-", "_")
        if not re.fullmatch(RATING_NAME_PATTERN, args.name):
            raise ValueError(f"--name {args.name!r} must be a simple identifier (letters, digits, _ . -)")
    _check_outputs(args)
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; a mistake exits with status 2 and one message (``parser.error``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return validate_args(args)
    except ValueError as err:
        parser.error(str(err))


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nearid_core").setLevel(level)


def _embedder(args: argparse.Namespace, dist):
    import torch

    from .baselines import load_embedder

    dtypes = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    device = args.device if args.device is not None else (dist.device if dist is not None else None)
    kwargs = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    return load_embedder(args.baseline, args.model, device=device, dtype=dtypes[args.dtype or "auto"], **kwargs)


def _emit(args: argparse.Namespace, tables: list[Table], payload: dict) -> None:
    from .benchmarks import write_json

    for t in tables:
        print(t.to_text())
        print()
    if args.json:
        logger.info("wrote %s", write_json(args.json, payload))
    if args.csv:
        logger.info("wrote %s", tables[0].to_csv(args.csv))
    if args.latex:
        args.latex.parent.mkdir(parents=True, exist_ok=True)
        args.latex.write_text(tables[0].to_latex())
        logger.info("wrote %s", args.latex)


def _run_label(embedder) -> str:
    """Name of a model run in file names: the weights' tag, prefixed by the baseline unless it is NearID."""
    from .baselines import model_tag

    tag = model_tag(embedder.model_id)
    return tag if embedder.name == "nearid" else f"{embedder.name}_{tag}"


def _bench_records(args: argparse.Namespace):
    """(records, sources) of a nearid-bench model run, from --data or --hf."""
    from ..data import EVAL_SOURCES, load_hf_nearid, load_local_nearid, local_sources

    if args.data is not None:
        split = args.indices if args.indices is not None else args.split
        if split is None:
            split = "test" if (args.data / "splits" / "test.json").is_file() else "all"
            logger.info("using split %r of %s", split, args.data)
        sources = args.sources or local_sources(args.data)
        return load_local_nearid(args.data, sources, split), sources
    records = load_hf_nearid(args.sources or list(EVAL_SOURCES), split=args.split or "test", indices=args.indices,
                             cache_dir=args.cache_dir, with_masks=args.masks == "fg")
    return records, records.sources


def _cmd_nearid_bench(args: argparse.Namespace) -> int:
    from .benchmarks import distributed_context, nearid_bench_from_sims, plot_nearid_bench, run_nearid_bench

    if args.sims is not None:
        result, label = nearid_bench_from_sims(args.sims, sim_range=args.sim_range), "sims"
    else:
        records, sources = _bench_records(args)
        dist = distributed_context()
        embedder = _embedder(args, dist)
        label = _run_label(embedder)
        result = run_nearid_bench(records, embedder, sources, masks=args.masks, indexing=args.indexing,
                                  batch_size=args.batch_size, dist=dist, progress=not args.quiet)
        if dist is not None and not dist.is_main:
            return 0
        suffix = "" if args.indexing == "compact" else f"_{args.indexing}"
        out = args.sims_out or Path("eval_outputs") / label / f"nearid-bench_{args.masks}{suffix}"
        result.write_sims(out)
        logger.info("per-sample similarities: %s (re-summarise with --sims %s/*.csv)", out, out)
    setting = f"masks={args.masks}, indexing={args.indexing}" if args.sims is None else "from CSV"
    _emit(args, [result.table(f"NearID-Bench ({label}, {setting})")], result.to_json())
    if args.plots:
        logger.info("wrote %s", plot_nearid_bench(result, label, args.plots))
    return 0


def _cmd_mtg(args: argparse.Namespace) -> int:
    from ..data import load_hf_mtg, load_local_mtg
    from .benchmarks import distributed_context, mtg_from_sims, plot_mtg_ecdf, run_mtg

    if args.sims is not None:
        result, label = mtg_from_sims(args.sims, sim_range=args.sim_range), args.sims.stem
    else:
        records = load_local_mtg(args.data) if args.data is not None else load_hf_mtg(
            args.split or "test", cache_dir=args.cache_dir)
        dist = distributed_context()
        embedder = _embedder(args, dist)
        label = _run_label(embedder)
        result = run_mtg(records, embedder, masks=args.masks, batch_size=args.batch_size, dist=dist,
                         progress=not args.quiet)
        if dist is not None and not dist.is_main:
            return 0
        out = args.sims_out or Path("eval_outputs") / label / f"mtg_{args.masks}.csv"
        logger.info("per-sample similarities: %s (re-summarise with mtg --sims)", result.write_sims(out))
    _emit(args, [result.table(f"MTG ({label})")], result.to_json())
    if args.plots:
        logger.info("wrote %s", plot_mtg_ecdf(result, label, args.plots))
    return 0


def _cmd_dreambench(args: argparse.Namespace) -> int:
    from .benchmarks import plot_dreambench_bars, run_dreambench

    result = run_dreambench(args.ratings, args.category, strict=args.strict)
    _emit(args, [result.table()] + result.method_tables(), result.to_json())
    if args.plots:
        logger.info("wrote %s", plot_dreambench_bars(result, args.plots))
    return 0


def _cmd_dreambench_score(args: argparse.Namespace) -> int:
    from .benchmarks import distributed_context, score_dreambench

    dist = distributed_context()
    embedder = _embedder(args, dist)
    out = score_dreambench(args.samples, embedder, args.ratings, args.name, batch_size=args.batch_size, dist=dist,
                           progress=not args.quiet)
    if dist is None or dist.is_main:
        print(f"wrote {out}; compute M-H with: python -m nearid_core.eval dreambench --ratings {args.ratings}")
    return 0


COMMANDS = {
    "nearid-bench": _cmd_nearid_bench,
    "mtg": _cmd_mtg,
    "dreambench": _cmd_dreambench,
    "dreambench-score": _cmd_dreambench_score,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status.

    A user's mistake exits with status 2 and one message, never a traceback: flags and paths are checked by
    :func:`parse_args` before anything loads; a bad table, rating file, dataset or checkpoint found later
    (``ValueError`` or ``OSError`` and their subclasses) is reported through the parser too (the traceback is
    logged at DEBUG level).
    """
    args = parse_args(argv)
    _setup_logging(args.quiet)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as err:
        logger.debug("%s failed", args.command, exc_info=True)
        build_parser().error(" ".join(str(err).split()) or type(err).__name__)


if __name__ == "__main__":
    sys.exit(main())

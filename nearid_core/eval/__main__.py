"""``python -m nearid_core.eval``: the paper's benchmarks for NearID, the baselines, or precomputed similarities.

Usage::

    python -m nearid_core.eval nearid-bench --hf [--sources flux qwen ...] [--indices splits/test.json] [--masks fg]
    python -m nearid_core.eval nearid-bench --data DIR [--split test|all|FILE.json] [--baseline clip-vit-l14]
    python -m nearid_core.eval nearid-bench --sims flux.csv qwen.csv ...       # source name = file stem
    python -m nearid_core.eval mtg --hf | --data DIR | --sims FILE.csv
    python -m nearid_core.eval dreambench --ratings DIR [--category object]
    python -m nearid_core.eval dreambench-score --samples SAMPLES --ratings DIR [--name nearid]

Model runs take ``--model`` (hub id or local dir; default the chosen baseline's weights, NearID for ``nearid``),
``--baseline`` (``nearid``, ``siglip2-map``, ``siglip2-mean``, ``clip-vit-l14``, ``dinov2-l``), ``--device``,
``--dtype``, ``--batch-size``, and write their per-sample similarity CSVs to ``--sims-out`` (re-summarise them later
with ``--sims``). Every subcommand prints a table and takes ``--json``, ``--csv``, ``--latex`` and ``--plots DIR``.
Launch with ``accelerate launch -m nearid_core.eval ...`` to split the embedding over several GPUs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data import EVAL_SOURCES, load_hf_mtg, load_hf_nearid, load_local_mtg, load_local_nearid, local_sources
from .baselines import BASELINES, load_embedder, model_tag
from .metrics import M_H_CATEGORIES
from .benchmarks import (
    INDEXING_MODES,
    MASK_MODES,
    Table,
    distributed_context,
    mtg_from_sims,
    nearid_bench_from_sims,
    plot_dreambench_bars,
    plot_mtg_ecdf,
    plot_nearid_bench,
    run_dreambench,
    run_mtg,
    run_nearid_bench,
    score_dreambench,
    write_json,
)

logger = logging.getLogger("nearid_core.eval")

DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODEL_FLAGS = ("model", "baseline", "device", "dtype", "batch_size", "sims_out", "cache_dir")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (not with --sims)")
    g.add_argument("--model", help="hub id or local dir of the weights (default: the baseline's; NearID: "
                                   "Aleksandar/nearid-siglip2)")
    g.add_argument("--baseline", choices=sorted(BASELINES), help="embedder family (default nearid)")
    g.add_argument("--device", help="torch device (default cuda if available, else cpu; per process when launched "
                                    "with accelerate)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default auto: fp16 on CUDA)")
    g.add_argument("--batch-size", type=int, help="images per forward pass (default 32)")
    g.add_argument("--cache-dir", help="cache folder for hub models and datasets")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", type=Path, help="write the summary JSON here")
    g.add_argument("--csv", type=Path, help="write the summary table as CSV here")
    g.add_argument("--latex", type=Path, help="write the summary table as a LaTeX tabular here")
    g.add_argument("--plots", type=Path, help="write the figures (PNG) into this folder")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nearid_core.eval", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("nearid-bench", help="NearID-Bench SSR / PA per distractor source and micro-pooled")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="local dataset folder (layout: nearid_core.data)")
    src.add_argument("--hf", action="store_true", help="hub datasets Aleksandar/NearID + Aleksandar/NearID-<Source>")
    src.add_argument("--sims", nargs="+", type=Path, metavar="CSV", help="per-sample similarity CSVs, one per source")
    p.add_argument("--sources", nargs="+", help=f"distractor sources (default: --hf {' '.join(EVAL_SOURCES)}; "
                                                "--data every folder under distractors/)")
    p.add_argument("--split", help="split name, 'all', or (--data) a JSON file (default test)")
    p.add_argument("--indices", type=Path, help="JSON list of 0-based row positions selecting the split")
    p.add_argument("--masks", choices=MASK_MODES, help="full images (default, Table 1) or fg (cleaned masks)")
    p.add_argument("--indexing", choices=INDEXING_MODES, help="slot-aligned cross terms (default) or the reference "
                                                              "sim_test.py compaction")
    p.add_argument("--sims-out", type=Path, help="folder for the per-sample CSVs (default "
                                                 "eval_outputs/<model>/nearid-bench_<masks>)")
    _add_model_options(p)
    _add_output_options(p)

    p = sub.add_parser("mtg", help="MTG M-O, M-Opair, SSR, PA")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="local MTG folder (<root>/<sample_id>/image_*.png)")
    src.add_argument("--hf", action="store_true", help="hub dataset abdo-eldesokey/mtg-dataset")
    src.add_argument("--sims", type=Path, metavar="CSV", help="per-sample CSV with sim_12, sim_1_1p, sim_1_2p, "
                                                              "sim_2_2p, sim_2_1p, oracle_1, oracle_2")
    p.add_argument("--split", help="hub split (default test; --hf only)")
    p.add_argument("--masks", choices=MASK_MODES, help="full (default) or fg (object masks, uncleaned)")
    p.add_argument("--sims-out", type=Path,
                   help="per-sample CSV to write (default eval_outputs/<model>/mtg_<masks>.csv)")
    _add_model_options(p)
    _add_output_options(p)

    p = sub.add_parser("dreambench", help="DreamBench++ M-H from a ratings folder")
    p.add_argument("--ratings", type=Path, required=True,
                   help="folder with data_human_rating/ and data_<scorer>_rating/")
    p.add_argument("--category", nargs="+", choices=M_H_CATEGORIES, help="categories (default all four)")
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


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check flag combinations and fill defaults; raises ValueError naming the flags. Loads nothing."""
    cmd = args.command
    if cmd in ("nearid-bench", "mtg"):
        if args.sims is not None:
            extra = _given(args, MODEL_FLAGS + ("split", "masks") + (("sources", "indices", "indexing")
                                                                      if cmd == "nearid-bench" else ()))
            if extra:
                raise ValueError(f"{cmd} --sims summarises precomputed similarities; {', '.join(extra)} do not apply")
            return args
        if cmd == "nearid-bench" and args.indices is not None and args.split not in (None, "all"):
            raise ValueError("give either --split or --indices, not both (--indices selects the rows itself)")
        if cmd == "mtg" and args.data is not None and args.split is not None:
            raise ValueError("mtg --data: the local MTG layout has no splits; --split applies to --hf only")
        args.masks = args.masks or "full"
        if cmd == "nearid-bench":
            args.indexing = args.indexing or "aligned"
    if cmd in ("nearid-bench", "mtg", "dreambench-score"):
        args.baseline = args.baseline or "nearid"
        args.batch_size = 32 if args.batch_size is None else args.batch_size
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if cmd == "dreambench-score":
        args.name = args.name or args.baseline.replace("-", "_")
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (ValueError for conflicting flags)."""
    return validate_args(build_parser().parse_args(argv))


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nearid_core").setLevel(level)


def _embedder(args: argparse.Namespace, dist):
    device = args.device if args.device is not None else (dist.device if dist is not None else None)
    kwargs = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    return load_embedder(args.baseline, args.model, device=device, dtype=DTYPES[args.dtype or "auto"], **kwargs)


def _emit(args: argparse.Namespace, tables: list[Table], payload: dict) -> None:
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
    tag = model_tag(embedder.model_id)
    return tag if embedder.name == "nearid" else f"{embedder.name}_{tag}"


def _bench_records(args: argparse.Namespace):
    """(records, sources) of a nearid-bench model run, from --data or --hf."""
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
    if args.sims is not None:
        result, label = nearid_bench_from_sims(args.sims), "sims"
    else:
        records, sources = _bench_records(args)
        dist = distributed_context()
        embedder = _embedder(args, dist)
        label = _run_label(embedder)
        result = run_nearid_bench(records, embedder, sources, masks=args.masks, indexing=args.indexing,
                                  batch_size=args.batch_size, dist=dist, progress=not args.quiet)
        if dist is not None and not dist.is_main:
            return 0
        suffix = "" if args.indexing == "aligned" else f"_{args.indexing}"
        out = args.sims_out or Path("eval_outputs") / label / f"nearid-bench_{args.masks}{suffix}"
        result.write_sims(out)
        logger.info("per-sample similarities: %s (re-summarise with --sims %s/*.csv)", out, out)
    _emit(args, [result.table(f"NearID-Bench ({label}, masks={args.masks or 'from CSV'})")], result.to_json())
    if args.plots:
        logger.info("wrote %s", plot_nearid_bench(result, label, args.plots))
    return 0


def _cmd_mtg(args: argparse.Namespace) -> int:
    if args.sims is not None:
        result, label = mtg_from_sims(args.sims), args.sims.stem
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
    result = run_dreambench(args.ratings, args.category)
    _emit(args, [result.table()] + result.method_tables(), result.to_json())
    if args.plots:
        logger.info("wrote %s", plot_dreambench_bars(result, args.plots))
    return 0


def _cmd_dreambench_score(args: argparse.Namespace) -> int:
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
    """Run one subcommand; returns the exit status."""
    args = parse_args(argv)
    _setup_logging(args.quiet)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""`nearid` command line: `nearid score` ranks candidates by identity against references; `nearid embed` writes
embeddings.

    nearid score --ref ref.png [--ref ref2.png ...] CANDIDATE [CANDIDATE ...] [--model ID_OR_DIR] [--json]
    nearid embed IMAGE [IMAGE ...] --output embeddings.safetensors|.npy [--model ID_OR_DIR]

A candidate or image argument may be a directory: its image files are used, sorted by name.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import CheckpointError, CheckpointNotFoundError
from .preprocessing import IMAGE_SUFFIXES, ImageInputError
from .scorer import DEFAULT_MODEL, REDUCTIONS, NearIDScorer, to_percent

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id, checkpoint directory or head-only .safetensors file (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="auto = fp16 on CUDA, bf16 on CPUs with bf16 matrix units, else fp32")
    parser.add_argument("--batch-size", type=int, default=16)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
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

    embed = sub.add_parser("embed", help="write L2-normalised embeddings of images")
    embed.add_argument("images", nargs="+", help="images or directories")
    embed.add_argument("--output", "-o", required=True, help="output file: .safetensors or .npy")
    _add_model_args(embed)

    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.command == "embed" and Path(args.output).suffix not in (".safetensors", ".npy"):
        parser.error(f"--output must end in .safetensors or .npy, got {args.output!r}")
    if args.command == "score" and args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be >= 1")
    return args


def expand_images(items: Sequence[str]) -> list[Path]:
    """Paths as given; directories replaced by their image files (sorted). Missing paths raise ImageInputError."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageInputError(f"Directory {path} contains no image files ({', '.join(IMAGE_SUFFIXES)}).")
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        else:
            raise ImageInputError(f"Image file not found: {path}")
    return paths


def _load_scorer(args: argparse.Namespace) -> NearIDScorer:
    return NearIDScorer.from_pretrained(args.model, device=args.device, dtype=DTYPES[args.dtype])


def run_score(args: argparse.Namespace) -> int:
    references = expand_images(args.ref)
    candidates = expand_images(args.candidates)
    scorer = _load_scorer(args)
    refs = scorer.embed([str(p) for p in references], batch_size=args.batch_size)
    cands = scorer.embed([str(p) for p in candidates], batch_size=args.batch_size,
                         progress=len(candidates) > 4 * args.batch_size)
    order, scores = scorer.rank(refs, cands, top_k=args.top_k, reduce=args.reduce)
    rows = [
        {"rank": r + 1, "file": str(candidates[i]), "score": round(float(s), 6), "score_100": round(float(to_percent(s)), 2)}
        for r, (i, s) in enumerate(zip(order.tolist(), scores))
    ]
    if args.json:
        payload = {"model": str(args.model), "references": [str(p) for p in references], "reduce": args.reduce,
                   "results": rows}
        print(json.dumps(payload, indent=2))
        return 0
    width = max(len("candidate"), *(len(r["file"]) for r in rows))
    print(f"references ({args.reduce}): " + ", ".join(str(p) for p in references))
    print(f"{'rank':>4}  {'cosine':>8}  {'100*cos':>7}  candidate")
    print(f"{'-' * 4}  {'-' * 8}  {'-' * 7}  {'-' * width}")
    for r in rows:
        print(f"{r['rank']:>4}  {r['score']:>8.4f}  {r['score_100']:>7.2f}  {r['file']}")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    images = expand_images(args.images)
    scorer = _load_scorer(args)
    embeddings = scorer.embed([str(p) for p in images], batch_size=args.batch_size,
                              progress=len(images) > 4 * args.batch_size).cpu()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".npy":
        import numpy as np

        np.save(output, embeddings.numpy())
    else:
        from safetensors.torch import save_file

        save_file({"embeddings": embeddings.contiguous()}, str(output),
                  metadata={"files": json.dumps([str(p) for p in images]), "model": str(args.model)})
    print(f"wrote {tuple(embeddings.shape)} embeddings to {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"score": run_score, "embed": run_embed}[args.command](args)
    except (CheckpointNotFoundError, CheckpointError, ImageInputError) as err:
        print(f"nearid: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

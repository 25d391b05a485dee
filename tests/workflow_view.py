"""Where a UI workflow opens: `extra.ds` {scale, offset} chosen so that every node is visible in a 1600x1000 window.

    python tests/workflow_view.py            # rewrite extra.ds of every workflows/*.json

The editor (LiteGraph) draws a graph point p at canvas pixel (p + offset) * scale; a node's box runs from its `pos`
to `pos + size`, plus the title bar above `pos`. In ComfyUI's frontend 1.27 the canvas fills the window less the
sidebar (64 px, left) and the tab bar + menu (78 px, top): measured 1536x922 in a 1600x1000 window. The zoom toolbar
floats over the canvas' bottom edge, hence the wider bottom margin.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

WINDOW = (1600, 1000)
SIDEBAR, TOP_BARS = 64, 78  # the editor's chrome beside the canvas
MARGINS = (20, 20, 20, 70)  # left, top, right, bottom: canvas pixels kept free
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT
MAX_SCALE = 1.0

Box = tuple[float, float, float, float]


def node_box(node: dict) -> Box:
    """A node's canvas box (x0, y0, x1, y1), title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def graph_box(workflow: dict) -> Box:
    boxes = [node_box(n) for n in workflow["nodes"]]
    return min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)


def canvas_size(window: tuple[int, int] = WINDOW) -> tuple[int, int]:
    return window[0] - SIDEBAR, window[1] - TOP_BARS


def visible_area(window: tuple[int, int] = WINDOW) -> Box:
    (width, height), (left, top, right, bottom) = canvas_size(window), MARGINS
    return left, top, width - right, height - bottom


def screen_box(box: Box, ds: dict) -> Box:
    """`box` in canvas pixels at the view `ds`."""
    (ox, oy), s = ds["offset"], ds["scale"]
    return (box[0] + ox) * s, (box[1] + oy) * s, (box[2] + ox) * s, (box[3] + oy) * s


def fit_ds(workflow: dict, window: tuple[int, int] = WINDOW) -> dict:
    """The largest scale (at most 1, in steps of 0.01) showing the whole graph in the visible area, centred."""
    x0, y0, x1, y1 = graph_box(workflow)
    ax0, ay0, ax1, ay1 = visible_area(window)
    scale = min(MAX_SCALE, math.floor(min((ax1 - ax0) / (x1 - x0), (ay1 - ay0) / (y1 - y0)) * 100) / 100)
    offset_x = (ax0 + ax1) / 2 / scale - (x0 + x1) / 2
    offset_y = (ay0 + ay1) / 2 / scale - (y0 + y1) / 2
    return {"scale": scale, "offset": [round(offset_x), round(offset_y)]}


def main(paths: list[str]) -> None:
    files = [Path(p) for p in paths] or sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
    for path in files:
        workflow = json.loads(path.read_text())
        workflow.setdefault("extra", {})["ds"] = fit_ds(workflow)
        path.write_text(json.dumps(workflow, indent=2) + "\n")
        print(f"{path.name}: {workflow['extra']['ds']}")


if __name__ == "__main__":
    main(sys.argv[1:])

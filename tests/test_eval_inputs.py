"""Every eval input gets a right answer or a clear error: one regression test per formerly silent wrong answer
(malformed similarity tables, rating files, dataset gaps), the CLI contract (a user's mistake exits 2 with one
message, never a traceback), and a CSV round trip on random tables."""

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import eval_usage_error

from nearid_core.data import MTGRecord, NearIDRecord
from nearid_core.eval.__main__ import main
from nearid_core.eval.baselines import BASELINES
from nearid_core.eval.benchmarks import (
    BENCH_COLUMNS,
    SimsTableError,
    load_dreambench_ratings,
    mtg_from_sims,
    nearid_bench_from_sims,
    run_dreambench,
    run_mtg,
    run_nearid_bench,
    write_sims_csv,
)
from nearid_core.eval.metrics import nearid_bench_metrics
from nearid_core.eval.names import BASELINE_NAMES
from nearid_core.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
TWO_VIEW = ["sample_id", "sim_01", "cross_00", "cross_11"]
MTG_HEADER = ["sample_id", "sim_12", "sim_1_1p", "sim_1_2p", "sim_2_2p", "sim_2_1p", "oracle_1", "oracle_2"]
MTG_ROW = [0.75, 0.5, 0.5, 0.625, 0.25, 0.5, 0.75]


def _csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join("" if v is None else str(v) for v in r) for r in rows])
                    + "\n")
    return path


def _json_out(argv, tmp_path):
    out = tmp_path / "out.json"
    assert main([str(a) for a in argv] + ["--json", str(out), "-q"]) == 0
    return json.loads(out.read_text())





# =====================================================================================================================
# NearID-Bench --sims tables
# =====================================================================================================================

# The issue's case: 80 two-view samples; 11 win both terms, 8 win only the anchor-0 term, 61 lose it.
#   SSR = 11 / 80 = 13.75 %. Without the cross_11 column only the anchor-0 term is left: (11 + 8) / 80 = 23.75 %.
ISSUE_ROWS = ([[f"a{i}", 0.75, 0.5, 0.5] for i in range(11)] + [[f"b{i}", 0.75, 0.5, 0.875] for i in range(8)]
              + [[f"c{i}", 0.25, 0.5, 0.5] for i in range(61)])


def test_missing_cross_11_column_is_an_error_not_a_different_ssr(tmp_path, capsys):
    full = _csv(tmp_path / "flux.csv", TWO_VIEW, ISSUE_ROWS)
    assert _json_out(["nearid-bench", "--sims", full], tmp_path)["SSR"] == pytest.approx(13.75)
    # what the metric gives without the column (the silent 23.75 the reader used to pass on)
    cols = {"sim_01": [r[1] for r in ISSUE_ROWS], "cross_00": [r[2] for r in ISSUE_ROWS]}
    assert nearid_bench_metrics({"flux": cols})["flux"].ssr == pytest.approx(23.75)
    short = _csv(tmp_path / "short.csv", TWO_VIEW[:3], [r[:3] for r in ISSUE_ROWS])
    err = eval_usage_error(["nearid-bench", "--sims", short], capsys)
    assert "short.csv lacks the column(s) ['cross_11']" in err and "needs sim_01, cross_00 and cross_11" in err


def test_third_view_columns_all_or_none(tmp_path):
    path = _csv(tmp_path / "s.csv", TWO_VIEW + ["sim_02", "sim_12"], [["x", 0.5, 0.25, 0.25, 0.5, 0.5]])
    with pytest.raises(SimsTableError, match=r"has the column\(s\) \['sim_02', 'sim_12'\] but lacks \['cross_22'\]"):
        nearid_bench_from_sims([path])
    # an empty column is fine: it says "no such term" explicitly
    path = _csv(tmp_path / "s.csv", TWO_VIEW + ["sim_02", "sim_12", "cross_22"],
                [["x", 0.5, 0.25, 0.25, 0.5, 0.5, None]])
    assert nearid_bench_from_sims([path]).metrics["s"].counts.term_trials == 4


@pytest.mark.parametrize("cell, message", [
    ("high", r"s.csv, line 3, column 'cross_11': 'high' is not a number \(leave a missing value empty\)"),
    ("inf", r"line 3, column 'cross_11': 'inf' is not a finite number"),
    ("75", r"line 3, column 'cross_11': 75 is outside \[-1, 1\].*--sim-range LO HI"),
    ("-1.5", r"line 3, column 'cross_11': -1.5 is outside \[-1, 1\]"),
])
def test_bad_cells_name_file_line_column_and_fix(tmp_path, cell, message):
    path = _csv(tmp_path / "s.csv", TWO_VIEW, [["x", 0.5, 0.25, 0.25], ["y", 0.5, 0.25, cell]])
    with pytest.raises(SimsTableError, match=message):
        nearid_bench_from_sims([path])


def test_rounding_slack_and_declared_scale(tmp_path):
    # fp16 cosines slightly above 1 are fine; a 0-100 table is refused unless its scale is declared
    assert nearid_bench_from_sims([_csv(tmp_path / "a.csv", TWO_VIEW, [["x", 1.0004, 0.5, 0.5]])]).metrics["a"].n == 1
    pct = _csv(tmp_path / "pct.csv", TWO_VIEW, [[r[0]] + [100 * v for v in r[1:]] for r in ISSUE_ROWS])
    with pytest.raises(SimsTableError, match="75.0 is outside"):
        nearid_bench_from_sims([pct])
    out = _json_out(["nearid-bench", "--sims", pct, "--sim-range", "-100", "100"], tmp_path)
    assert out["SSR"] == pytest.approx(13.75)


def test_duplicate_sample_ids_are_an_error(tmp_path):
    path = _csv(tmp_path / "s.csv", TWO_VIEW, [["x", 0.5, 0.25, 0.25], ["y", 0.5, 0.25, 0.25], ["x", 0.5, 0.5, 0.5]])
    with pytest.raises(SimsTableError, match=r"sample_id 'x' is on lines 2 and 4"):
        nearid_bench_from_sims([path])


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("sim_01,cross_00,cross_11\n", "has a header but no data rows"),
    ("sim_01,cross_00,cross_11,cross_00\n0.5,0.1,0.1,0.1\n", r"names \['cross_00'\] more than once"),
    ("sim_01,cross_00,cross_11\n0.5,0.1\n", "line 2: 2 cells but the header has 3 columns"),
    ("sim_01,cross_00,cross_11\n0.5,0.1,0.1,0.2\n", "line 2: 4 cells but the header has 3 columns"),
])
def test_malformed_csv_layouts(tmp_path, text, message):
    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(SimsTableError, match=message):
        nearid_bench_from_sims([path])


def test_utf8_bom_header_is_read(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("sim_01,cross_00,cross_11\n0.5,0.25,0.25\n", encoding="utf-8-sig")
    assert nearid_bench_from_sims([path]).metrics["excel"].n == 1


def test_blank_and_nan_cells_are_counted_as_missing_terms(tmp_path, capsys):
    # x: complete (2 terms); y: cross_11 empty (1 missing); z: sim_01 "nan" (both missing, no term: not counted)
    path = _csv(tmp_path / "s.csv", TWO_VIEW, [["x", 0.5, 0.25, 0.25], ["y", 0.5, 0.25, None], ["z", "nan", 0.1, 0.1]])
    out = _json_out(["nearid-bench", "--sims", path], tmp_path)
    assert (out["n"], out["rows"], out["missing_terms"]) == (2, 3, 3)
    assert out["per_source"]["s"]["term_trials"] == 3
    printed = capsys.readouterr().out
    assert ("note: s: 3 of 6 directed terms missing (empty or NaN cells); 1 of 3 rows have no term and are not "
            "counted") in printed


def test_n_pos_says_how_many_terms_a_row_should_have(tmp_path):
    header = ["sample_id", "n_pos"] + list(BENCH_COLUMNS)
    three = [0.75, 0.75, 0.75] + [0.25] * 9
    two = [0.75, None, None, 0.25, 0.25, None, 0.25, 0.25, None, None, None, None]
    rows = [["a", 3] + three, ["b", 2] + two, ["c", 3] + two]  # c claims 3 views but has 2: 4 terms missing
    report = nearid_bench_from_sims([_csv(tmp_path / "s.csv", header, rows)]).reports["s"]
    assert (report.rows, report.expected_terms, report.missing_terms) == (3, 14, 4)
    with pytest.raises(SimsTableError, match="'2.5' is not a whole number"):
        nearid_bench_from_sims([_csv(tmp_path / "s.csv", header, [["a", 2.5] + three])])
    with pytest.raises(SimsTableError, match=r"4 is outside \[0, 3\]; n_pos counts"):
        nearid_bench_from_sims([_csv(tmp_path / "s.csv", header, [["a", 4] + three])])


# =====================================================================================================================
# MTG --sims tables
# =====================================================================================================================


def test_mtg_table_checks(tmp_path):
    def table(*rows):
        return _csv(tmp_path / "m.csv", MTG_HEADER, rows)

    with pytest.raises(SimsTableError, match=r"column 'oracle_1': 1.5 is outside \[-inf, 1\]; oracle = 1 - part"):
        mtg_from_sims(table(["a", *MTG_ROW[:5], 1.5, 0.5]))
    with pytest.raises(SimsTableError, match=r"column 'sim_1_1p': 7 is outside \[-1, 1\]"):
        mtg_from_sims(table(["a", 0.75, 7, *MTG_ROW[2:]]))
    with pytest.raises(SimsTableError, match="sample_id 'a' is on lines 2 and 3"):
        mtg_from_sims(table(["a", *MTG_ROW], ["a", *MTG_ROW]))
    # negative oracles are legitimate (part larger than object); a 0-10 judge declares its scale
    assert mtg_from_sims(table(["a", *MTG_ROW[:5], -0.5, 0.5])).metrics.n == 1
    judge = table(["a", 7, 5, 5, 6, 2, 0.5, 0.75], ["b", 5, 5, 5, 2, 2, 0.5, 0.0])
    assert mtg_from_sims(judge, sim_range=(0, 10)).metrics.trials == 4
    # empty cells are counted: b lacks sim_2_2p (1 margin missing)
    result = mtg_from_sims(table(["a", *MTG_ROW], ["b", 0.5, 0.5, 0.5, None, 0.5, 0.5, 0.5]))
    assert result.to_json()["missing_terms"] == 1 and result.to_json()["blank_cells"] == {"sim_2_2p": 1}
    assert "note: mtg: 1 of 4 margins missing" in result.table().to_text()


# =====================================================================================================================
# DreamBench++ rating folders
# =====================================================================================================================

KEYS = ["object_00_cup-0", "object_00_cup-1", "object_01_mug-0", "object_01_mug-1"]


def _ratings(root, metric_text=None):
    for g, values in ((1, [0, 1, 2, 4]), (2, [0, 2, 1, 4])):
        d = root / "data_human_rating" / "merged_data" / f"group{g}"
        d.mkdir(parents=True)
        (d / "alpha-cp.json").write_text(json.dumps(dict(zip(KEYS, values))))
    (root / "data_nearid_rating").mkdir()
    (root / "data_nearid_rating" / "alpha.json").write_text(
        metric_text if metric_text is not None else json.dumps(dict(zip(KEYS, [10, 30, 20, 40]))))
    return root


@pytest.mark.parametrize("text, message", [
    ('{"object_00_cup-0": 1, "object_00_cup-0": 2, "object_01_mug-0": 3}', "key 'object_00_cup-0' is given twice"),
    ('{"object_00_cup-0": "1", "object_00_cup-1": 2}', "the score '1' is not a number"),
    ('{"object_00_cup-0": true, "object_00_cup-1": 2}', "the score True is not a number"),
    ('{"object_00_cup-0": Infinity, "object_00_cup-1": 2}', "the score inf is not finite"),
    ('{"object_00_cup-0": 1,', "is not valid JSON"),
    ("[1, 2]", "must hold a non-empty JSON object"),
])
def test_rating_file_checks(tmp_path, text, message):
    with pytest.raises(SimsTableError, match=message):
        load_dreambench_ratings(_ratings(tmp_path / "r", text))


def test_null_ratings_are_counted_and_left_out(tmp_path, capsys):
    with_null = dict(zip(KEYS, [10, None, 20, 40]))
    result = run_dreambench(_ratings(tmp_path / "a", json.dumps(with_null)), ["object"])
    # left out = the same correlations as without that item in every file
    root = tmp_path / "b"
    for g, values in ((1, [0, 2, 4]), (2, [0, 1, 4])):
        d = root / "data_human_rating" / "merged_data" / f"group{g}"
        d.mkdir(parents=True)
        (d / "alpha-cp.json").write_text(json.dumps(dict(zip(KEYS[:1] + KEYS[2:], values))))
    (root / "data_nearid_rating").mkdir()
    (root / "data_nearid_rating" / "alpha.json").write_text(json.dumps(dict(zip(KEYS[:1] + KEYS[2:], [10, 20, 40]))))
    assert result.per_method["nearid"]["object"]["alpha"] == pytest.approx(
        run_dreambench(root, ["object"]).per_method["nearid"]["object"]["alpha"])
    assert result.to_json()["missing_ratings"] == {"nearid": {"alpha": 1}}
    assert "note: nearid: missing ratings left out of the correlations: alpha 1" in result.table().to_text()


# =====================================================================================================================
# --data layouts with gaps
# =====================================================================================================================


class MeanColour:
    """Embedding = the image's mean RGB colour, normalised."""

    name, model_id = "colour", "colour"

    def embed(self, images, batch_size=16, progress=None):
        rgb = torch.tensor(np.stack([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images]))
        return torch.nn.functional.normalize(rgb + 1.0, dim=-1)


def _solid(r, g, b):
    return Image.new("RGB", (4, 4), (r, g, b))


def test_nearid_data_gaps_are_counted_and_logged(caplog):
    v = [_solid(200, 10, 10), _solid(190, 20, 10), _solid(180, 10, 30)]
    d = [_solid(10, 200, 10), _solid(10, 190, 30), _solid(30, 10, 190)]
    records = [
        NearIDRecord("full", None, list(v), distractors={"s": list(d), "t": list(d)}),
        NearIDRecord("gap", None, [v[0], None, v[2]], distractors={"s": list(d), "t": [d[0], None, None]}),
        NearIDRecord("one", None, [v[0], None, None], distractors={"s": list(d), "t": list(d)}),
    ]
    with caplog.at_level("WARNING", logger="nearid_core"):
        result = run_nearid_bench(records, MeanColour(), progress=False)
    # views: gap lacks view 2 (before its view 3), one lacks view 2 -> 2; distractors: t lacks gap's view 3;
    # "one" has a single view, so the compact numbering (the default) leaves it out of both tables
    assert result.to_json()["data"] == {"samples": 3, "missing_views": 2, "missing_distractors": {"s": 0, "t": 1},
                                        "dropped_samples": {"s": 1, "t": 1}, "n_images_disagree": 0}
    assert "3 samples, 2 missing positive views, 1 missing distractors (t 1)" in caplog.text
    assert "2 samples left out of a source's table (fewer than 2 views or no distractor, as sim_test.py) (s 1, t 1)" \
        in caplog.text
    # the lost term: gap in t has only sim_02 - cross_00 (1 of its 2 terms)
    assert result.reports["t"].missing_terms == 1 and result.reports["s"].missing_terms == 0
    assert "note: data: 3 samples" in result.table().to_text()


def test_fg_drops_views_without_a_mask_and_n_images_hides_nothing(caplog):
    """As the reference: with fg masks a view slot without a mask loses its view and its distractors (counted); a
    declared n_images below the present views hides none of them (counted)."""
    v = [_solid(200, 10, 10), _solid(190, 20, 10), _solid(180, 10, 30)]
    d = [_solid(10, 200, 10), _solid(10, 190, 30), _solid(30, 10, 190)]
    white = Image.new("L", (4, 4), 255)
    records = [NearIDRecord("m", None, list(v), [white, None, white], {"s": list(d)}),
               NearIDRecord("n", None, list(v), [white] * 3, {"s": list(d)}, n_images=2)]
    with caplog.at_level("WARNING", logger="nearid_core"):
        fg = run_nearid_bench(records, MeanColour(), masks="fg", progress=False)
    m, n = fg.rows["s"]
    assert (m["n_pos"], m["n_neg"]) == (2, 2)  # view 2 and its distractor are gone (it used to be the full view 2)
    assert (n["n_pos"], n["n_neg"]) == (3, 3)  # all three views, n_images = 2 notwithstanding
    data = fg.to_json()["data"]
    assert (data["unmasked_views"], data["unmasked_distractors"], data["n_images_disagree"]) == (1, {"s": 1}, 1)
    assert "identity m has a view without a mask; that view and its distractors are dropped" in caplog.text
    text = fg.table().to_text()
    assert "fg: 1 views without a mask dropped with their 1 distractors, as the reference does" in text
    assert "1 samples declare an n_images other than their present views" in text
    full = run_nearid_bench(records, MeanColour(), masks="full", progress=False)
    assert full.rows["s"][0]["n_pos"] == 3 and "unmasked_views" not in full.to_json()["data"]
    with pytest.raises(ValueError, match="--masks fg: no view has a foreground mask"):
        run_nearid_bench([NearIDRecord("bare", None, list(v), distractors={"s": list(d)})], MeanColour(), masks="fg",
                         progress=False)


def test_mtg_data_gaps_are_counted(caplog):
    a, b = _solid(200, 10, 10), _solid(190, 20, 10)
    mask = Image.new("L", (4, 4), 255)
    records = [MTGRecord("x", (a, b), (a, b), (mask, mask), (mask, mask)),
               MTGRecord("y", (a, b), (None, b), (mask, None), (mask, mask))]
    with caplog.at_level("WARNING", logger="nearid_core"):
        result = run_mtg(records, MeanColour(), progress=False)
    assert result.to_json()["data"] == {"samples": 2, "missing_edits": 1, "missing_masks": 1}
    assert result.to_json()["missing_terms"] == 1  # y's m1 needs the missing edit 1p
    assert "1 missing edited images" in caplog.text


# =====================================================================================================================
# CLI contract: every user mistake exits 2 with one message naming the input, never a traceback
# =====================================================================================================================


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Named good and bad inputs the contract cases refer to."""
    root = tmp_path_factory.mktemp("inputs")
    write_dataset(root / "data", 2, n_views=2, image_size=8, sources=("s",), splits={})
    (root / "folder").mkdir()
    (root / "empty.csv").write_text("")
    (root / "file.txt").write_text("x")
    (root / "bad.json").write_text("{not json")
    (root / "binary.csv").write_bytes(b"\xff\xfe\x00\x81" * 8)
    _csv(root / "good.csv", TWO_VIEW, [["x", 0.5, 0.25, 0.25]])
    _csv(root / "header_only.csv", TWO_VIEW, [])
    _csv(root / "no_cross_11.csv", TWO_VIEW[:3], [["x", 0.5, 0.25]])
    _csv(root / "words.csv", TWO_VIEW, [["x", 0.5, "low", 0.25]])
    _csv(root / "percent.csv", TWO_VIEW, [["x", 50, 25, 25]])
    _csv(root / "dup_ids.csv", TWO_VIEW, [["x", 0.5, 0.25, 0.25], ["x", 0.5, 0.25, 0.25]])
    _csv(root / "mtg_no_oracle.csv", MTG_HEADER[:-1], [["a", *MTG_ROW[:-1]]])
    _csv(root / "mtg_oracle.csv", MTG_HEADER, [["a", *MTG_ROW[:5], 2, 0.5]])
    _ratings(root / "ratings_str", '{"object_00_cup-0": "x", "object_00_cup-1": 2}')
    _ratings(root / "ratings_huge", '{"object_00_cup-0": 1' + "0" * 400 + ', "object_00_cup-1": 2}')
    _csv(root / "underscore.csv", TWO_VIEW, [["x", "0.5", "0.2_5", 0.25]])
    (root / "link.csv").symlink_to(root / "good.csv")
    (root / "indices.json").write_text("[0]")
    return {p.name: p for p in root.iterdir()} | {"missing.csv": root / "missing.csv", "nowhere": root / "nowhere"}


CONTRACT = [
    # (id, argv with {name} placeholders for the inputs fixture, a piece of the message)
    ("no command", [], "required: COMMAND"),
    ("unknown command", ["bench"], "invalid choice: 'bench'"),
    ("no source", ["nearid-bench"], "one of the arguments --data --hf --sims is required"),
    ("two sources", ["nearid-bench", "--hf", "--data", "{data}"], "not allowed with argument"),
    ("model flag with sims", ["nearid-bench", "--sims", "{good.csv}", "--model", "x"], "--model do not apply"),
    ("sim-range with a model run", ["nearid-bench", "--hf", "--sim-range", "0", "1"], "--sim-range declares"),
    ("sim-range reversed", ["nearid-bench", "--sims", "{good.csv}", "--sim-range", "1", "0"], "LO < HI"),
    ("sim-range nan", ["mtg", "--sims", "{good.csv}", "--sim-range", "nan", "1"], "two finite numbers"),
    ("sim-range word", ["mtg", "--sims", "{good.csv}", "--sim-range", "a", "1"], "invalid float value: 'a'"),
    ("missing sims file", ["nearid-bench", "--sims", "{missing.csv}"], "no such file"),
    ("empty sims file", ["nearid-bench", "--sims", "{empty.csv}"], "empty.csv is empty"),
    ("sims folder", ["nearid-bench", "--sims", "{folder}"], "is a folder; pass the file(s) inside it"),
    ("header only", ["nearid-bench", "--sims", "{header_only.csv}"], "has a header but no data rows"),
    ("not utf-8", ["nearid-bench", "--sims", "{binary.csv}"], "cannot read"),
    ("missing column", ["nearid-bench", "--sims", "{no_cross_11.csv}"], "lacks the column(s) ['cross_11']"),
    ("non-numeric cell", ["nearid-bench", "--sims", "{words.csv}"], "line 2, column 'cross_00': 'low' is not a"),
    ("out of range", ["nearid-bench", "--sims", "{percent.csv}"], "50 is outside [-1, 1]; similarities are cosines"),
    ("duplicate ids", ["nearid-bench", "--sims", "{dup_ids.csv}"], "sample_id 'x' is on lines 2 and 3"),
    ("same stem twice", ["nearid-bench", "--sims", "{good.csv}", "{good.csv}"], "two CSVs give source 'good'"),
    ("json is a folder", ["nearid-bench", "--sims", "{good.csv}", "--json", "{folder}"], "is a folder; give a file"),
    ("plots is a file", ["nearid-bench", "--sims", "{good.csv}", "--plots", "{file.txt}"], "is a file; give a folder"),
    ("missing data folder", ["nearid-bench", "--data", "{nowhere}"], "--data {nowhere}: no such folder"),
    ("data is a file", ["nearid-bench", "--data", "{file.txt}"], "not a folder"),
    ("data without layout", ["nearid-bench", "--data", "{folder}"], "is not a NearID dataset folder"),
    ("unknown split", ["nearid-bench", "--data", "{data}", "--split", "val"], "split 'val'"),
    ("unknown source", ["nearid-bench", "--data", "{data}", "--sources", "zz"], "unknown distractor source(s)"),
    ("missing indices", ["nearid-bench", "--data", "{data}", "--indices", "{missing.csv}"], "no such file"),
    ("bad indices json", ["nearid-bench", "--data", "{data}", "--indices", "{bad.json}"], "is not valid JSON"),
    ("split and indices", ["nearid-bench", "--data", "{data}", "--split", "x", "--indices", "{bad.json}"],
     "either --split or --indices"),
    ("batch size 0", ["nearid-bench", "--hf", "--batch-size", "0"], "--batch-size must be >= 1"),
    ("batch size word", ["nearid-bench", "--hf", "--batch-size", "many"], "invalid int value: 'many'"),
    ("unknown baseline", ["mtg", "--hf", "--baseline", "vit"], "invalid choice: 'vit'"),
    ("mtg missing column", ["mtg", "--sims", "{mtg_no_oracle.csv}"], "lacks the column(s) ['oracle_2']"),
    ("mtg oracle above 1", ["mtg", "--sims", "{mtg_oracle.csv}"], "column 'oracle_1': 2 is outside"),
    ("mtg split with data", ["mtg", "--data", "{folder}", "--split", "test"], "--hf only"),
    ("mtg empty folder", ["mtg", "--data", "{folder}"], "no MTG sample folders"),
    ("mtg sims-out folder", ["mtg", "--data", "{folder}", "--sims-out", "{folder}"], "is a folder; give a file"),
    ("missing ratings", ["dreambench", "--ratings", "{nowhere}"], "no such folder"),
    ("not a ratings folder", ["dreambench", "--ratings", "{folder}"], "is not a DreamBench++ ratings folder"),
    ("string score", ["dreambench", "--ratings", "{ratings_str}"], "the score 'x' is not a number"),
    ("unknown category", ["dreambench", "--ratings", "{folder}", "--category", "cars"], "invalid choice: 'cars'"),
    ("huge integer score", ["dreambench", "--ratings", "{ratings_huge}"],
     "ratings_huge/data_nearid_rating/alpha.json, key 'object_00_cup-0': the score is a 401-digit integer"),
    ("underscore in a cell", ["nearid-bench", "--sims", "{underscore.csv}"],
     "column 'cross_00': '0.2_5' is not a number (write it without the '_'"),
    ("csv overwrites sims", ["nearid-bench", "--sims", "{good.csv}", "--csv", "{good.csv}"],
     "--csv {good.csv} is the input --sims {good.csv}; writing it would destroy the input"),
    ("json overwrites sims", ["nearid-bench", "--sims", "{good.csv}", "--json", "{folder}/../good.csv"],
     "is the input --sims {good.csv}"),
    ("latex overwrites a linked sims", ["nearid-bench", "--sims", "{link.csv}", "--latex", "{good.csv}"],
     "--latex {good.csv} is the input --sims {link.csv}"),
    ("mtg json overwrites sims", ["mtg", "--sims", "{good.csv}", "--json", "{good.csv}"], "is the input --sims"),
    ("json overwrites a rating file",
     ["dreambench", "--ratings", "{ratings_str}", "--json", "{ratings_str}/data_nearid_rating/alpha.json"],
     "is the input --ratings {ratings_str}/data_nearid_rating/alpha.json"),
    ("csv overwrites indices",
     ["nearid-bench", "--data", "{data}", "--indices", "{indices.json}", "--csv", "{indices.json}"],
     "is the input --indices {indices.json}"),
    ("split is a csv", ["nearid-bench", "--data", "{data}", "--split", "foo.csv"],
     "--split foo.csv: expected a split name (a file {data}/splits/<name>.json, e.g. test), 'all', or a .json file"),
    ("missing split json", ["nearid-bench", "--data", "{data}", "--split", "{missing.csv}.json"], "no such file"),
    ("missing samples", ["dreambench-score", "--samples", "{nowhere}", "--ratings", "{folder}"], "no such folder"),
    ("bad rating name", ["dreambench-score", "--samples", "{folder}", "--ratings", "{folder}", "--name", "a b"],
     "--name 'a b' must be a simple identifier"),
    ("ratings is a file", ["dreambench-score", "--samples", "{folder}", "--ratings", "{file.txt}"], "is a file"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CONTRACT], ids=[c[0] for c in CONTRACT])
def test_cli_contract(inputs, capsys, argv, message):
    names = {k: str(v) for k, v in inputs.items()}

    def fill(text: str) -> str:
        return re.sub(r"\{([^}]+)\}", lambda m: names[m.group(1)], text)

    assert fill(message) in eval_usage_error([fill(a) for a in argv], capsys)


def test_an_output_never_overwrites_an_input(inputs, capsys):
    before = inputs["good.csv"].read_bytes()
    for flag in ("--json", "--csv", "--latex"):
        eval_usage_error(["nearid-bench", "--sims", inputs["good.csv"], flag, inputs["good.csv"]], capsys)
    assert inputs["good.csv"].read_bytes() == before


def test_cli_contract_in_a_real_process(inputs):
    """One fresh interpreter: a usage error imports none of the benchmark, baseline or dataset code (torch and
    transformers still come with ``import nearid_core`` itself); then a table error found after parsing, through the
    ``python -m nearid_core.eval`` entry point, exits 2 with one message."""
    heavy = ["nearid_core.eval.benchmarks", "nearid_core.eval.baselines", "nearid_core.data", "datasets", "matplotlib"]
    code = "\n".join([
        "import runpy, sys",
        "from nearid_core.eval.__main__ import main",
        "try:",
        f"    main(['nearid-bench', '--sims', {str(inputs['missing.csv'])!r}])",
        "except SystemExit as e:",
        "    print('usage error', e.code, [m for m in %r if m in sys.modules], flush=True)" % heavy,
        f"sys.argv = ['nearid_core.eval', 'nearid-bench', '--sims', {str(inputs['no_cross_11.csv'])!r}]",
        "runpy.run_module('nearid_core.eval', run_name='__main__', alter_sys=True)",
    ])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.stdout.splitlines()[0] == "usage error 2 []", proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 2 and "no such file" in errors[0] and "lacks the column(s) ['cross_11']" in errors[1]


def test_baseline_names_match_the_registry():
    assert tuple(BASELINES) == BASELINE_NAMES


# =====================================================================================================================
# Round trip: a random table written as CSV and read back gives the metrics of the table itself
# =====================================================================================================================

CELL = st.one_of(st.sampled_from([k / 8 for k in range(-8, 9)]), st.just(math.nan))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(CELL, min_size=len(BENCH_COLUMNS), max_size=len(BENCH_COLUMNS)), min_size=1, max_size=12))
def test_csv_round_trip_gives_the_same_metrics(rows):
    table = {c: np.array([r[k] for r in rows]) for k, c in enumerate(BENCH_COLUMNS)}
    with tempfile.TemporaryDirectory() as d:
        path = write_sims_csv(Path(d) / "src.csv", [dict(zip(BENCH_COLUMNS, r)) for r in rows], BENCH_COLUMNS)
        result = nearid_bench_from_sims([path])
    assert result.metrics["src"].counts == nearid_bench_metrics({"src": table})["src"].counts
    assert result.reports["src"].rows == len(rows)
    assert result.reports["src"].missing_terms == 6 * len(rows) - result.metrics["src"].counts.term_trials

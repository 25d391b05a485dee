"""`python -m nearid_core.eval`: hand-worked tables through the CLI, DreamBench++ layouts, end-to-end runs with tiny
random models on generated data, baselines, and flag validation. Expected numbers are worked out in the comments."""

import json
import math
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import eval_usage_error

from nearid_core import NearIDScorer
from nearid_core.data import NearIDRecord, load_local_nearid, open_image
from nearid_core.eval import benchmarks
from nearid_core.eval.__main__ import main, parse_args
from nearid_core.eval.baselines import load_embedder
from nearid_core.eval.benchmarks import run_nearid_bench
from nearid_core.eval.metrics import m_h, method_score, mtg_oracle
from nearid_core.synthetic import write_dataset, write_mtg

A_999 = math.atanh(0.999)
A_9999 = math.atanh(0.9999)


def _run_json(argv, out):
    assert main(list(map(str, argv)) + ["--json", str(out), "-q"]) == 0
    return json.loads(out.read_text())





def _write_csv(path, header, rows):
    lines = [",".join(header)] + [",".join("" if v is None else str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# =====================================================================================================================
# NearID-Bench from hand-made similarity CSVs
# =====================================================================================================================

# src_a.csv: 2-view samples (only sim_01, cross_00, cross_11). Values are multiples of 1/8, so ties are exact.
#   row | sim_01 cross_00 cross_11 | margins a=0, a=1   | wins | mean    | all win | mean win
#   a   | 0.75   0.5      0.25     | 0.25, 0.5          | 2/2  | 0.375   | yes     | yes
#   b   | 0.5    0.5      0.625    | 0 (tie), -0.125    | 0/2  | -0.0625 | no      | no
#   c   | 0.625  --       0.5      | NaN, 0.125         | 1/1  | 0.125   | yes     | yes
#   d   | --     0.25     0.25     | no valid term: not a sample
# n=3 ssr_wins=2 term_wins=3 term_trials=5 mean_wins=2
#   SSR 2/3=66.667  PA (3+2)/(5+3)=62.5  PA_terms 3/5=60  SSR_mean 2/3
SRC_A = (["sample_id", "category", "sim_01", "cross_00", "cross_11", "neg_sim_01"],
         [["a", "mug", 0.75, 0.5, 0.25, 0.9], ["b", "mug", 0.5, 0.5, 0.625, 0.9],
          ["c", "cat", 0.625, None, 0.5, None], ["d", "cat", None, 0.25, 0.25, 0.1]])

# src_b.csv: 3-view samples; off-diagonal cross_pn are junk (0.99) and must not matter.
#   e: sims .875 .75 .625, cross_aa .5 .5 .5 -> margins .375 .375 .25 .25 .125 .125: 6/6, mean wins, all win
#   f: sim_01 .5 sim_02 .25 sim_12 .75; cross_00 .25 cross_11 .5 cross_22 .75
#      01/a0 .25 W  01/a1 0 L(tie)  02/a0 0 L(tie)  02/a2 -.5 L  12/a1 .25 W  12/a2 0 L(tie)
#      2/6; mean margin exactly 0 -> loses; not all
#   g: a 2-view row: sim_01 .375 cross_00 .5 cross_11 .125 -> -.125 L, .25 W: 1/2; mean .0625 wins; not all
# n=3 ssr_wins=1 term_wins=9 term_trials=14 mean_wins=2
#   SSR 33.333  PA (9+2)/(14+3)=64.706  PA_terms 9/14=64.286  SSR_mean 66.667
_B_HEADER = ["sample_id", "sim_01", "sim_02", "sim_12"] + [f"cross_{p}{n}" for p in range(3) for n in range(3)]
SRC_B = (_B_HEADER, [
    ["e", 0.875, 0.75, 0.625, 0.5, 0.99, 0.99, 0.99, 0.5, 0.99, 0.99, 0.99, 0.5],
    ["f", 0.5, 0.25, 0.75, 0.25, 0.99, 0.99, 0.99, 0.5, 0.99, 0.99, 0.99, 0.75],
    ["g", 0.375, None, None, 0.5, 0.99, None, 0.99, 0.125, None, None, None, None],
])
# Micro-pooled: n=6 ssr_wins=3 term_wins=12 term_trials=19 mean_wins=4
#   SSR 50  PA 16/25=64 (the macro mean of the two PAs would be 63.6)  PA_terms 12/19  SSR_mean 4/6


def test_nearid_bench_sims_hand_worked(tmp_path):
    a = _write_csv(tmp_path / "src_a.csv", *SRC_A)
    b = _write_csv(tmp_path / "src_b.csv", *SRC_B)
    out = _run_json(["nearid-bench", "--sims", a, b, "--csv", tmp_path / "t.csv", "--latex", tmp_path / "t.tex"],
                    tmp_path / "r.json")
    assert set(out) == {"SSR", "PA", "PA_terms", "SSR_mean", "n", "indexing", "rows", "missing_terms", "per_source"}
    assert out["indexing"] is None  # a CSV's numbering is its producer's
    assert list(out["per_source"]) == ["src_a", "src_b"]
    # missing terms (no n_pos column: every row should give the table's 2 resp. 6 terms): src_a c lacks cross_00 (1),
    # d lacks sim_01 (2); src_b g is a 2-view row in a 3-view table (4)
    assert (out["per_source"]["src_a"]["rows"], out["per_source"]["src_a"]["missing_terms"]) == (4, 3)
    assert (out["per_source"]["src_b"]["rows"], out["per_source"]["src_b"]["missing_terms"]) == (3, 4)
    assert (out["rows"], out["missing_terms"]) == (7, 7)
    pa, pb = out["per_source"]["src_a"], out["per_source"]["src_b"]
    assert (pa["n"], pa["ssr_wins"], pa["term_wins"], pa["term_trials"], pa["mean_wins"]) == (3, 2, 3, 5, 2)
    assert (pb["n"], pb["ssr_wins"], pb["term_wins"], pb["term_trials"], pb["mean_wins"]) == (3, 1, 9, 14, 2)
    assert pa["SSR"] == pytest.approx(200 / 3) and pa["PA"] == pytest.approx(62.5)
    assert pa["PA_terms"] == pytest.approx(60.0) and pa["SSR_mean"] == pytest.approx(200 / 3)
    assert pb["SSR"] == pytest.approx(100 / 3) and pb["PA"] == pytest.approx(1100 / 17)
    assert pb["PA_terms"] == pytest.approx(900 / 14) and pb["SSR_mean"] == pytest.approx(200 / 3)
    assert out["n"] == 6
    assert out["SSR"] == pytest.approx(50.0) and out["PA"] == pytest.approx(64.0)
    assert out["PA_terms"] == pytest.approx(1200 / 19) and out["SSR_mean"] == pytest.approx(400 / 6)
    table = (tmp_path / "t.csv").read_text().splitlines()
    assert table[0] == "source,n,SSR,PA,PA_terms,SSR_mean" and table[-1].startswith("all,6,50.0,64.0,")
    tex = (tmp_path / "t.tex").read_text()
    assert "src\\_a & 3 & 66.67 & 62.50 & 60.00 & 66.67 \\\\" in tex and "\\midrule\nall & 6 & 50.00 & 64.00" in tex


def test_nearid_bench_sims_errors(tmp_path, capsys):
    a = _write_csv(tmp_path / "src_a.csv", *SRC_A)
    (tmp_path / "other").mkdir()
    err = eval_usage_error(["nearid-bench", "--sims", a, shutil.copy(a, tmp_path / "other" / "src_a.csv")], capsys)
    assert "two CSVs give source 'src_a'" in err
    bad = _write_csv(tmp_path / "bad.csv", ["sim_01", "cross_00", "cross_11"], [[0.5, "high", 0.25]])
    assert "bad.csv, line 2, column 'cross_00'" in eval_usage_error(["nearid-bench", "--sims", bad], capsys)
    none = _write_csv(tmp_path / "none.csv", ["score"], [[0.5]])
    assert "lacks the column(s) ['sim_01', 'cross_00', 'cross_11']" in eval_usage_error(
        ["nearid-bench", "--sims", none], capsys)


# ---------------------------------------------------------------------------------------------------------------------
# The spec's worked cases
# ---------------------------------------------------------------------------------------------------------------------

_FULL = ["sim_01", "sim_02", "sim_12", "cross_00", "cross_11", "cross_22"]
WIN = [0.75, 0.75, 0.75, 0.25, 0.25, 0.25]  # six margins of +.5
# two losing terms (01/a0, 02/a0 = .75 - .875), mean (-.25 + 2) / 6 > 0 wins
LOSE_TWO = [0.75, 0.75, 0.75, 0.875, 0.25, 0.25]
# margins -.5, .125, -.5, .125, .375, .375: two losing terms and a mean of exactly 0, which loses
LOSE_MEAN = [0.25, 0.25, 0.5, 0.75, 0.125, 0.125]


def test_spec_toy_pa_with_and_without_the_extra_trial(tmp_path):
    # spec 6.2: "16/17 vs the pure-term 13/14". Three samples with 6 + 6 + 2 terms, one losing term, every mean wins:
    #   WIN: 6/6.  Second: 01/a0 .25, 01/a1 .625, 02/a0 .25, 02/a2 .375, 12/a1 .125 win, 12/a2 -.125 loses: 5/6.
    #   Third (2 views): .5, .5: 2/2.  PA = (13 + 3) / (14 + 3); PA_terms = 13 / 14; SSR = 2 / 3.
    rows = [WIN, [0.75, 0.75, 0.25, 0.5, 0.125, 0.375], [0.75, None, None, 0.25, 0.25, None]]
    out = _run_json(["nearid-bench", "--sims", _write_csv(tmp_path / "toy.csv", _FULL, rows)], tmp_path / "r.json")
    assert (out["per_source"]["toy"]["term_wins"], out["per_source"]["toy"]["term_trials"]) == (13, 14)
    assert out["PA"] == pytest.approx(100 * 16 / 17) and out["PA_terms"] == pytest.approx(100 * 13 / 14)
    assert out["SSR"] == pytest.approx(200 / 3) and out["SSR_mean"] == pytest.approx(100.0)


def test_spec_table1_nearid_counts_micro_pooled(tmp_path):
    # Table 1 NearID: 7 sources x 500 = 3,500 samples, SSR 99.17, PA 99.71. Structure that gives exactly that:
    # 29 failing samples (16 with two losing terms, 13 that also lose the mean): SSR = 3471 / 3500 = 99.171 %,
    # PA = (24500 - 58 - 13) / (6 * 3500 + 3500) = 24429 / 24500 = 99.710 %.
    fails = [5, 4, 4, 4, 4, 4, 4]
    n_mean = iter([2, 2, 2, 2, 2, 2, 1])
    paths = []
    for k, f in enumerate(fails):
        m = next(n_mean)
        rows = [LOSE_MEAN] * m + [LOSE_TWO] * (f - m) + [WIN] * (500 - f)
        paths.append(_write_csv(tmp_path / f"source{k}.csv", _FULL, rows))
    out = _run_json(["nearid-bench", "--sims", *paths], tmp_path / "r.json")
    assert out["n"] == 3500 and len(out["per_source"]) == 7
    assert round(out["SSR"], 2) == 99.17 and round(out["PA"], 2) == 99.71
    assert out["SSR"] == pytest.approx(100 * 3471 / 3500) and out["PA"] == pytest.approx(100 * 24429 / 24500)
    assert out["per_source"]["source0"]["SSR"] == pytest.approx(100 * 495 / 500)


def test_spec_mtg_35_of_100(tmp_path):
    # Table 1 NearID MTG: SSR 35.0 = 35/100, PA 46.5 = 93/200 (35 samples win both margins, 23 win one)
    both, one, none = [0.75, 0.5, 0.5], [0.75, 0.5, 0.875], [0.25, 0.5, 0.5]  # sim_12, sim_1_1p, sim_2_2p
    rows = [[f"s{i}", s12, s11, 0.5, s22, 0.5, i / 100, 1 - i / 100]
            for i, (s12, s11, s22) in enumerate([both] * 35 + [one] * 23 + [none] * 42)]
    out = _run_json(["mtg", "--sims", _write_csv(tmp_path / "m.csv", MTG_HEADER, rows)], tmp_path / "m.json")
    assert out["n"] == 100 and out["SSR"] == pytest.approx(35.0) and out["PA"] == pytest.approx(46.5)


# =====================================================================================================================
# MTG from a hand-made CSV
# =====================================================================================================================

# Margins m1 = sim_12 - sim_1_1p, m2 = sim_12 - sim_2_2p:
#   s1: .75-.5=.25 W, .75-.625=.125 W (all win)   s2: .5-.5=0 L (tie), .5-.25=.25 W
#   s3: .5-.75=-.25 L, NaN                         s4: sim_12 missing -> no margin, not a sample
#   n=3, SSR 1/3, PA 3/5 = 60 %
# Correlations (pairwise complete): sim_1_1p = (o1 + .5)/2 -> r=+1; sim_2_2p vs oracle_2 on s1, s2, s4:
#   (.625,.75) (.25,0) (.5,.5) lie on o = 2 (s - .25) -> r=+1; sim_1_2p constant -> undefined -> 0;
#   sim_2_1p = .5 - o1/2 -> r=-1.
#   M-O = tanh((A + A + 0 - A) / 4) with A = atanh(.999);  M-Opair = tanh((A + A) / 2) = .999
MTG_HEADER = ["sample_id", "sim_12", "sim_1_1p", "sim_1_2p", "sim_2_2p", "sim_2_1p", "oracle_1", "oracle_2"]
MTG_ROWS = [
    ["s1", 0.75, 0.5, 0.5, 0.625, 0.25, 0.5, 0.75],
    ["s2", 0.5, 0.5, 0.5, 0.25, 0.25, 0.5, 0.0],
    ["s3", 0.5, 0.75, 0.5, None, 0.0, 1.0, 0.5],
    ["s4", None, 0.25, 0.5, 0.5, 0.5, 0.0, 0.5],
]


def test_mtg_sims_hand_worked(tmp_path):
    sims = _write_csv(tmp_path / "model.csv", MTG_HEADER, MTG_ROWS)
    out = _run_json(["mtg", "--sims", sims, "--plots", tmp_path / "plots"], tmp_path / "m.json")
    assert set(out) == {"MO", "MOpair", "SSR", "PA", "n", "rows", "missing_terms", "blank_cells"}
    assert out["n"] == 3
    # s3 lacks sim_2_2p (1 margin), s4 lacks sim_12 (2 margins)
    assert (out["rows"], out["missing_terms"], out["blank_cells"]) == (4, 3, {"sim_12": 1, "sim_2_2p": 1})
    assert out["SSR"] == pytest.approx(100 / 3) and out["PA"] == pytest.approx(60.0)
    assert out["MO"] == pytest.approx(math.tanh(A_999 / 4))
    assert out["MOpair"] == pytest.approx(0.999)
    assert (tmp_path / "plots" / "mtg_ecdf_model.png").stat().st_size > 1000


def test_mtg_sims_requires_every_column(tmp_path, capsys):
    sims = _write_csv(tmp_path / "m.csv", MTG_HEADER[:-1], [r[:-1] for r in MTG_ROWS])
    assert "lacks the column(s) ['oracle_2']" in eval_usage_error(["mtg", "--sims", sims], capsys)


def test_mtg_sims_reads_the_reference_column_names(tmp_path, capsys):
    """A CSV of the reference sim_test.py --mode mtg (mtg_sim_1_2 ... mtg_oracle_2, plus its ratio / margin / win and
    VLM text columns, which are ignored) gives the same summary as the same numbers under our names."""
    ours = _run_json(["mtg", "--sims", _write_csv(tmp_path / "ours.csv", MTG_HEADER, MTG_ROWS)], tmp_path / "o.json")
    names = {"sim_12": "mtg_sim_1_2", "sim_1_1p": "mtg_sim_1_1p", "sim_1_2p": "mtg_sim_1_2p",
             "sim_2_2p": "mtg_sim_2_2p", "sim_2_1p": "mtg_sim_2_1p", "oracle_1": "mtg_oracle_1",
             "oracle_2": "mtg_oracle_2"}
    header = ["sample_id", "mtg_ratio_1", "mtg_oracle_1", "mtg_ratio_2", "mtg_oracle_2", "mtg_sim_1_2",
              "mtg_sim_1_2_confidence", "mtg_sim_1_1p", "mtg_sim_1_2p", "mtg_sim_2_2p", "mtg_sim_2_1p",
              "mtg_margin_1", "mtg_margin_2", "mtg_win_1", "mtg_win_2", "mtg_overall_win"]
    ours_of = {names.get(c, c): k for k, c in enumerate(MTG_HEADER)}
    extra = {"mtg_sim_1_2_confidence": "high", "mtg_win_1": "True", "mtg_win_2": "", "mtg_overall_win": "False"}
    rows = [[extra.get(c, row[ours_of[c]] if c in ours_of else 0.25) for c in header] for row in MTG_ROWS]
    reference = _write_csv(tmp_path / "reference.csv", header, rows)
    assert _run_json(["mtg", "--sims", reference], tmp_path / "r.json") == ours
    # a reference table lacking a column is told so in the reference's names
    lacking = _write_csv(tmp_path / "lacking.csv", [c for c in header if c != "mtg_oracle_2"],
                         [[v for c, v in zip(header, r) if c != "mtg_oracle_2"] for r in rows])
    assert "lacks the column(s) ['mtg_oracle_2']" in eval_usage_error(["mtg", "--sims", lacking], capsys)


# =====================================================================================================================
# DreamBench++ M-H from a generated ratings folder
# =====================================================================================================================

# Human keys; metric files carry a trailing image index and spell magic_cube as rubik's_cube.
OBJ_KEYS = ["object_00_magic_cube-0", "object_00_magic_cube-1", "object_01_cup-0"]
STYLE_KEYS = ["style_00_ink-0", "style_00_ink-1", "style_00_ink-2"]
# object category, per method: (group 1, group 2, nearid metric)
#   alpha: r1 = r2 = 1                               -> 1 (clipped to .9999 in z space)
#   beta : group 2 reversed: r1 = 1, r2 = -1         -> 0
#   gamma: metric (10, 30, 20) vs (0, 1, 2): dx=(-1,0,1), dy=(-10,10,0): r = 10/sqrt(2*200) = .5 for both -> .5
#   M-H(object) = tanh((atanh(.9999) + 0 + atanh(.5)) / 3)
#   human-human(object): r(g1, g2) = 1, -1, 1 -> tanh(atanh(.9999) / 3)
# style category: every file equals (1, 2, 3) -> every r = 1 -> .9999 (clipped, tanh(atanh(.9999)))
OBJECT = {
    "alpha": ([0, 1, 2], [0, 1, 2], [10, 20, 30]),
    "beta": ([0, 1, 2], [2, 1, 0], [10, 20, 30]),
    "gamma": ([0, 1, 2], [0, 1, 2], [10, 30, 20]),
}


def _metric_key(k):
    return k.replace("magic_cube", "rubik's_cube") + "_0"


def _write_ratings(root, methods=OBJECT):
    human = root / "data_human_rating" / "merged_data"
    for g in (1, 2):
        (human / f"group{g}").mkdir(parents=True)
    (root / "data_nearid_rating").mkdir()
    (root / "data_gpt_rating" / "concept_preservation_full").mkdir(parents=True)
    (root / "data_unrelated_rating").mkdir()  # no method file: skipped
    for method, (g1, g2, metric) in methods.items():
        style = [1, 2, 3]
        for g, values in ((1, g1), (2, g2)):
            d = dict(zip(OBJ_KEYS, values)) | dict(zip(STYLE_KEYS, style))
            (human / f"group{g}" / f"{method}-cp.json").write_text(json.dumps(d))
        nearid = {_metric_key(k): v for k, v in zip(OBJ_KEYS + STYLE_KEYS, list(metric) + style)}
        (root / "data_nearid_rating" / f"{method}.json").write_text(json.dumps(nearid))
        gpt = {_metric_key(k): v for k, v in zip(OBJ_KEYS + STYLE_KEYS, list(g1) + style)}
        (root / "data_gpt_rating" / "concept_preservation_full" / f"{method}.json").write_text(json.dumps(gpt))
    return root


def test_dreambench_object_category_hand_worked(tmp_path):
    ratings = _write_ratings(tmp_path / "ratings")
    out = _run_json(["dreambench", "--ratings", ratings, "--category", "object"], tmp_path / "d.json")
    assert set(out) == {"mh", "human_human", "per_method", "missing_ratings", "skipped_scorers"}
    assert out["missing_ratings"] == {} and out["skipped_scorers"] == {}
    assert out["mh"]["nearid"] == pytest.approx(math.tanh((A_9999 + 0 + math.atanh(0.5)) / 3))
    assert out["per_method"]["nearid"] == pytest.approx({"alpha": 1.0, "beta": 0.0, "gamma": 0.5})
    # gpt equals group 1: r1 = 1 everywhere, r2 = 1, -1, 1 -> scores 1, 0, 1
    assert out["per_method"]["gpt"] == pytest.approx({"alpha": 1.0, "beta": 0.0, "gamma": 1.0})
    assert out["mh"]["gpt"] == pytest.approx(math.tanh(2 * A_9999 / 3))
    assert out["human_human"] == pytest.approx(math.tanh(A_9999 / 3))
    assert "unrelated" not in out["mh"]


def test_dreambench_all_categories_and_plot(tmp_path):
    ratings = _write_ratings(tmp_path / "ratings")
    out = _run_json(["dreambench", "--ratings", ratings, "--plots", tmp_path / "plots", "--csv", tmp_path / "t.csv"],
                    tmp_path / "d.json")
    # only object and style occur in the ratings: the two animal/human categories are skipped with a warning
    nearid = out["mh"]["nearid"]
    assert set(nearid) == {"object", "style", "all_fisher_z"}
    assert nearid["style"] == pytest.approx(0.9999)
    assert nearid["all_fisher_z"] == pytest.approx(math.tanh((math.atanh(nearid["object"]) + A_9999) / 2))
    assert out["human_human"]["style"] == pytest.approx(0.9999)
    assert out["per_method"]["nearid"]["object"]["gamma"] == pytest.approx(0.5)
    assert (tmp_path / "plots" / "dreambench_mh.png").stat().st_size > 1000
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "scorer,object,style,all_fisher_z"


def test_dreambench_pairs_items_by_key_and_fails_loudly_on_unmatched_keys(tmp_path, capsys):
    ratings = _write_ratings(tmp_path / "ratings")
    in_order = _run_json(["dreambench", "--ratings", ratings, "--category", "object"], tmp_path / "a.json")
    path = ratings / "data_nearid_rating" / "beta.json"
    items = list(json.loads(path.read_text()).items())
    path.write_text(json.dumps(dict(reversed(items))))  # the same keys in another order: the same numbers
    assert _run_json(["dreambench", "--ratings", ratings, "--category", "object"], tmp_path / "b.json") == in_order
    items[2] = ("object_01_mug-0_0", items[2][1])  # a different item, not just a suffix / alias
    path.write_text(json.dumps(dict(items)))
    err = eval_usage_error(["dreambench", "--ratings", ratings], capsys)
    assert "data_nearid_rating/beta.json lacks ['object_01_cup-0']" in err and "extra ['object_01_mug-0_0']" in err


def test_dreambench_same_keys_reordered_with_an_image_index(tmp_path):
    """Every key ends in _<n> (several images per concept): a reordered scorer file pairs by full key, not position."""
    keys = [f"object_00_cup-0_{i}" for i in range(4)] + [f"object_01_mug-0_{i}" for i in range(4)]
    human = {1: [0, 1, 2, 3, 4, 5, 6, 7], 2: [0, 2, 1, 3, 5, 4, 6, 7]}
    score = dict(zip(keys, [10, 20, 30, 40, 50, 60, 70, 80]))
    results = []
    for order, scorer_keys in (("same", keys), ("reordered", keys[3::-1] + keys[4:])):
        root = tmp_path / order
        for g, values in human.items():
            d = root / "data_human_rating" / "merged_data" / f"group{g}"
            d.mkdir(parents=True)
            (d / "alpha-cp.json").write_text(json.dumps(dict(zip(keys, values))))
        (root / "data_nearid_rating").mkdir()
        (root / "data_nearid_rating" / "alpha.json").write_text(json.dumps({k: score[k] for k in scorer_keys}))
        results.append(_run_json(["dreambench", "--ratings", root, "--category", "object"], tmp_path / f"{order}.json"))
    expected = method_score(human[1], human[2], [score[k] for k in keys])
    assert results[0]["mh"]["nearid"] == pytest.approx(expected) and results[1] == results[0]


def test_dreambench_skips_a_scorer_lacking_a_method_unless_strict(tmp_path, capsys, caplog):
    """As the reference: a scorer folder without every method is skipped with a warning naming it; --strict fails."""
    ratings = _write_ratings(tmp_path / "ratings")
    (ratings / "data_gpt_rating" / "concept_preservation_full" / "gamma.json").unlink()
    folder = ratings / "data_gpt_rating" / "concept_preservation_full"
    with caplog.at_level("WARNING", logger="nearid_core"):
        out = _run_json(["dreambench", "--ratings", ratings, "--category", "object"], tmp_path / "d.json")
    assert f"skipping scorer folder {folder}" in caplog.text and "['gamma']" in caplog.text
    assert set(out["mh"]) == {"nearid"} and out["skipped_scorers"] == {str(folder): ["gamma"]}
    assert out["mh"]["nearid"] == pytest.approx(math.tanh((A_9999 + 0 + math.atanh(0.5)) / 3))  # unchanged
    assert f"note: skipped {folder}: it lacks method(s) gamma" in capsys.readouterr().out
    err = eval_usage_error(["dreambench", "--ratings", ratings, "--strict"], capsys)
    assert "data_gpt_rating" in err and "lacks ratings for method(s) ['gamma']" in err
    # every scorer skipped: an error naming them
    (ratings / "data_nearid_rating" / "beta.json").unlink()
    err = eval_usage_error(["dreambench", "--ratings", ratings], capsys)
    assert "no data_<scorer>_rating folder with ratings for all the human-rated methods" in err
    assert "data_nearid_rating" in err


# =====================================================================================================================
# End to end with a tiny random NearID model on generated data
# =====================================================================================================================


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nearid_ds")
    write_dataset(root, 6, n_views=(2, 3), image_size=40, sources=("src_a", "src_b"),
                  splits={"train": 2, "test": 4}, missing_rate=0.25, seed=1)
    return root


@pytest.fixture
def count_embeds(monkeypatch):
    """Record every image passed to NearIDScorer.embed."""
    seen = []
    original = NearIDScorer.embed

    def embed(self, images, batch_size=16, progress=None, **kwargs):
        seen.extend(images if isinstance(images, (list, tuple)) else [images])
        return original(self, images, batch_size=batch_size, progress=progress, **kwargs)

    monkeypatch.setattr(NearIDScorer, "embed", embed)
    return seen


def _split_files(root, split):
    ids = json.loads((root / "splits" / f"{split}.json").read_text())
    views = [p for i in ids for p in sorted((root / "identities" / i).glob("view*.png"))]
    dists = [p for i in ids for p in sorted(root.glob(f"distractors/*/{i}/view*.png"))]
    return ids, views, dists


def _model_args(release_dir):
    return ["--model", release_dir, "--device", "cpu", "--dtype", "fp32", "--batch-size", "5"]


def test_nearid_bench_end_to_end(tmp_path, bench_data, release_dir, count_embeds):
    ids, views, dists = _split_files(bench_data, "test")
    sims = tmp_path / "sims"
    out = _run_json(["nearid-bench", "--data", bench_data, "--sims-out", sims, "--plots", tmp_path / "plots",
                     *_model_args(release_dir)], tmp_path / "r.json")
    # every unique image (views once for both sources, each distractor) embedded exactly once
    assert len(count_embeds) == len(views) + len(dists)
    assert len(set(map(str, count_embeds))) == len(count_embeds)
    assert set(out["per_source"]) == {"src_a", "src_b"}
    assert out["n"] == sum(s["n"] for s in out["per_source"].values())
    assert all(0 <= out[k] <= 100 for k in ("SSR", "PA", "PA_terms", "SSR_mean"))
    assert (tmp_path / "plots" / f"nearid_bench_{release_dir.name}.png").is_file()

    # the default numbering is the reference sim_test.py's (compact): cross_pn = cos(p-th present view, n-th present
    # distractor); the data has distractor gaps (checked below), so this differs from slot alignment
    rows = {r["sample_id"]: r for r in _read_rows(sims / "src_b.csv")}
    assert sorted(rows) == ids
    scorer = NearIDScorer.from_pretrained(release_dir, device="cpu", dtype=torch.float32)
    for ident in ids:
        v = [p for p in (bench_data / "identities" / ident / f"view{j}.png" for j in (1, 2, 3)) if p.exists()]
        d = [p for p in (bench_data / "distractors" / "src_b" / ident / f"view{j}.png" for j in (1, 2, 3))
             if p.exists()]
        for p in range(3):
            for n in range(3):
                cell = rows[ident][f"cross_{p}{n}"]
                if p < len(v) and n < len(d):
                    assert float(cell) == pytest.approx(float(scorer.similarity(v[p], d[n])), abs=1e-5)
                else:
                    assert cell == ""

    # the dataset's gaps are reported: views missing from slots 1-2 (or before the last view), views without their
    # distractor per source, and the terms they cost
    records = load_local_nearid(bench_data, ["src_a", "src_b"], "test")
    gaps = out["data"]
    assert gaps["samples"] == len(ids)
    assert gaps["missing_distractors"] == {s: sum(r.views[j] is not None and r.distractors[s][j] is None
                                                  for r in records for j in range(3)) for s in ("src_a", "src_b")}
    assert sum(gaps["missing_distractors"].values()) > 0  # missing_rate=0.25: the data has gaps
    assert out["missing_terms"] == sum(s["missing_terms"] for s in out["per_source"].values()) > 0

    # re-summarising the written CSVs gives the same JSON (less the dataset's gaps and the indexing, which a CSV does
    # not hold)
    again = _run_json(["nearid-bench", "--sims", sims / "src_a.csv", sims / "src_b.csv"], tmp_path / "again.json")
    assert out["indexing"] == "compact" and again["indexing"] is None
    assert {k: v for k, v in again.items() if k != "indexing"} == {k: v for k, v in out.items()
                                                                   if k not in ("data", "indexing")}


def _read_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_nearid_bench_fg_masks_and_all_split(tmp_path, bench_data, release_dir, count_embeds):
    out = _run_json(["nearid-bench", "--data", bench_data, "--split", "all", "--sources", "src_a", "--masks", "fg",
                     "--sims-out", tmp_path / "sims", *_model_args(release_dir)], tmp_path / "r.json")
    records = load_local_nearid(bench_data, ["src_a"], "all")
    n_images = sum(r.n_views + sum(x is not None for x in r.distractors["src_a"]) for r in records)
    assert len(count_embeds) == n_images
    # fg images are masked copies: black outside the cleaned mask of their view slot
    assert all(isinstance(im, Image.Image) for im in count_embeds)
    # compact numbering (the default): a sample needs 2 views and 1 distractor
    n_expected = sum(r.n_views >= 2 and any(x is not None for x in r.distractors["src_a"]) for r in records)
    assert list(out["per_source"]) == ["src_a"] and out["n"] == n_expected


def test_mtg_end_to_end(tmp_path, release_dir, count_embeds):
    write_mtg(tmp_path / "mtg", 4, image_size=40)
    sims = tmp_path / "mtg.csv"
    out = _run_json(["mtg", "--data", tmp_path / "mtg", "--sims-out", sims, "--plots", tmp_path / "plots",
                     *_model_args(release_dir)], tmp_path / "m.json")
    assert len(count_embeds) == 16  # 4 images per sample, each once
    assert set(out) == {"MO", "MOpair", "SSR", "PA", "n", "rows", "missing_terms", "data"} and out["n"] == 4
    assert out["data"] == {"samples": 4, "missing_edits": 0, "missing_masks": 0} and out["missing_terms"] == 0
    assert -1 <= out["MO"] <= 1 and -1 <= out["MOpair"] <= 1
    rows = _read_rows(sims)
    d = tmp_path / "mtg" / "mtg0002"
    expected = mtg_oracle(np.asarray(Image.open(d / "image_2_object_mask.png")),
                          np.asarray(Image.open(d / "image_2_part_mask.png")))
    assert float(rows[2]["oracle_2"]) == pytest.approx(expected)
    assert (tmp_path / "plots" / f"mtg_ecdf_{release_dir.name}.png").is_file()
    assert _run_json(["mtg", "--sims", sims], tmp_path / "again.json") == {k: v for k, v in out.items() if k != "data"}


def test_hf_paths_through_the_cli(tmp_path, monkeypatch, release_dir, count_embeds):
    """--hf runs the real hub loading code; datasets.load_dataset is replaced by in-memory datasets."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)

    def img():
        return Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))

    image = datasets.Image()
    pos = datasets.Dataset.from_dict(
        {"id": [1, 2, 3], "category": ["a", "b", "c"], "images1": [img(), img(), img()],
         "images2": [img(), img(), img()], "images3": [img(), None, img()], "split": ["test", "train", "test"]},
        features=datasets.Features({"id": datasets.Value("int64"), "category": datasets.Value("string"),
                                    "images1": image, "images2": image, "images3": image,
                                    "split": datasets.Value("string")}))
    neg = datasets.Dataset.from_dict({"id": [1, 2, 3], "nimg1": [img(), img(), None], "nimg2": [img(), img(), img()]},
                                     features=datasets.Features({"id": datasets.Value("int64"), "nimg1": image,
                                                                 "nimg2": image}))
    mtg_cols = ["image_1_original", "image_2_original", "image_1_inpainted", "image_2_inpainted"]
    mtg = datasets.Dataset.from_dict({c: [img(), img()] for c in mtg_cols},
                                     features=datasets.Features({c: image for c in mtg_cols}))
    loaded = []

    def fake_load(repo, split, cache_dir=None):
        loaded.append((repo, split))
        return {"Aleksandar/NearID": pos, "Aleksandar/NearID-Qwen_1328": neg, "abdo-eldesokey/mtg-dataset": mtg}[repo]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = _run_json(["nearid-bench", "--hf", "--sources", "Qwen_1328", "--sims-out", tmp_path / "s",
                     *_model_args(release_dir)], tmp_path / "r.json")
    assert loaded == [("Aleksandar/NearID", "train"), ("Aleksandar/NearID-Qwen_1328", "train")]
    assert list(out["per_source"]) == ["qwen_1328"] and out["n"] == 2  # rows 0 and 2 are the test split
    assert len(count_embeds) == 6 + 3  # 3 views each for rows 0 and 2; distractors: 2 + 1 present
    assert [r["sample_id"] for r in _read_rows(tmp_path / "s" / "qwen_1328.csv")] == ["1", "3"]
    out = _run_json(["mtg", "--hf", "--sims-out", tmp_path / "m.csv", *_model_args(release_dir)], tmp_path / "m.json")
    assert loaded[-1] == ("abdo-eldesokey/mtg-dataset", "test") and out["n"] == 2


# =====================================================================================================================
# Slot alignment vs the reference compaction, on in-memory records with a transparent embedder
# =====================================================================================================================


class ColourEmbedder:
    """Embedding = the image's (unique) RGB colour, normalised; counts calls. Takes PIL images or files."""

    name, model_id = "colour", "colour"

    def __init__(self):
        self.calls = 0

    def embed(self, images, batch_size=16, progress=None):
        self.calls += len(images)
        images = [im if isinstance(im, Image.Image) else open_image(im) for im in images]
        rgb = torch.tensor(np.stack([np.asarray(im).reshape(-1, 3)[0] for im in images]), dtype=torch.float32)
        return torch.nn.functional.normalize(rgb, dim=-1)


def _solid(rgb):
    return Image.fromarray(np.tile(np.array(rgb, np.uint8), (4, 4, 1)))


def test_aligned_vs_compact_indexing():
    # 3 views, distractor of view 2 missing. Colours chosen so cosines are simple:
    views = [_solid((255, 0, 0)), _solid((0, 255, 0)), _solid((0, 0, 255))]
    dist = [_solid((255, 0, 0)), None, _solid((0, 255, 0))]  # d1 == v1 content (shared embedding), d3 looks like v2
    rec = NearIDRecord("x", None, views, distractors={"s": dist})
    emb = ColourEmbedder()
    aligned = run_nearid_bench([rec], emb, masks="full", indexing="aligned", progress=False)
    assert emb.calls == 3  # d1 has the same pixels as v1, so it shares its embedding; d3 likewise shares v2's
    row = aligned.rows["s"][0]
    # aligned: cross_00 = cos(v1, d1) = 1, cross_11 missing, cross_22 = cos(v3, d3) = 0
    assert (row["cross_00"], row["cross_22"], row["n_neg"]) == (1.0, 0.0, 2) and math.isnan(row["cross_11"])
    # compact: negatives renumbered (d1, d3): cross_11 = cos(v2, d3) = 1 and no cross_22
    compact = run_nearid_bench([rec], ColourEmbedder(), indexing="compact", progress=False).rows["s"][0]
    assert compact["cross_11"] == 1.0 and math.isnan(compact["cross_22"])
    # margins, aligned: sims all 0; 01/a0: 0-1 L, 02/a0: 0-1 L, 02/a2: 0-0 L(tie), 12/a2 L(tie) -> 0 of 4
    m = aligned.metrics["s"]
    assert (m.counts.term_trials, m.counts.term_wins, m.n) == (4, 0, 1)


def _write_png(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    _solid(rgb).save(path)


def test_default_indexing_is_compact_and_differs_from_aligned(tmp_path, monkeypatch, capsys):
    """A local layout with gaps, embedded by colour; the default numbering is the reference's (compact).

    y: views R, Y; distractor of view 1 missing, view 2's distractor d2 = (255, 0, 60) looks like view 1.
       sim_01 = cos(R, Y) = .7071. aligned: only cross_11 = cos(Y, d2) = .6881 -> margin +.019 W.
       compact: d2 is the first present distractor: only cross_00 = cos(R, d2) = .9731 -> margin -.266 L.
    z: views R, (255, 40, 0); distractors B, B: sim_01 = .988, cross_00 = cross_11 = 0 -> 2 W in both modes.
    w: one view: no term in aligned; compact leaves it out of the table (reported).
    aligned: n 2, all win: SSR 100, PA (3 + 2) / (3 + 2) = 100
    compact: n 2, y loses: SSR 50, PA (2 + 1) / (3 + 2) = 60, PA_terms 2 / 3
    """
    root = tmp_path / "data"
    layout = {"y": ([(255, 0, 0), (255, 255, 0)], [None, (255, 0, 60)]),
              "z": ([(255, 0, 0), (255, 40, 0)], [(0, 0, 255), (0, 0, 255)]),
              "w": ([(0, 255, 0)], [(0, 0, 255)])}
    for ident, (views, dists) in layout.items():
        for j, rgb in enumerate(views):
            _write_png(root / "identities" / ident / f"view{j + 1}.png", rgb)
        for j, rgb in enumerate(dists):
            if rgb is not None:
                _write_png(root / "distractors" / "s" / ident / f"view{j + 1}.png", rgb)
    monkeypatch.setattr("nearid_core.eval.__main__._embedder", lambda args, dist: ColourEmbedder())
    monkeypatch.chdir(tmp_path)
    default = _run_json(["nearid-bench", "--data", root], tmp_path / "default.json")
    compact = _run_json(["nearid-bench", "--data", root, "--indexing", "compact"], tmp_path / "compact.json")
    aligned = _run_json(["nearid-bench", "--data", root, "--indexing", "aligned"], tmp_path / "aligned.json")
    assert default == compact and default["indexing"] == "compact" and aligned["indexing"] == "aligned"
    assert (aligned["n"], aligned["SSR"], aligned["PA"]) == (2, 100.0, 100.0)
    assert (compact["n"], compact["SSR"], compact["PA"]) == (2, 50.0, 60.0)
    assert compact["PA_terms"] == pytest.approx(200 / 3)
    assert compact["data"]["dropped_samples"] == {"s": 1} and aligned["data"]["dropped_samples"] == {"s": 0}
    # the default run's CSVs go to nearid-bench_full, the aligned one's to nearid-bench_full_aligned
    (default_dir,) = tmp_path.glob("eval_outputs/*/nearid-bench_full")
    assert (default_dir.parent / "nearid-bench_full_aligned" / "s.csv").is_file()
    assert [r["sample_id"] for r in _read_rows(default_dir / "s.csv")] == ["y", "z"]
    # the printed table says which numbering produced it
    assert main(["nearid-bench", "--data", str(root), "-q"]) == 0
    text = capsys.readouterr().out
    assert "masks=full, indexing=compact" in text and "note: indexing: compact (as the paper's sim_test.py" in text


def test_embedding_cache_shards_over_processes():
    """Two simulated processes (threads with an all-gather) each embed their share; both end with every embedding."""
    images = [_solid((k * 20, 255 - k * 20, 7)) for k in range(5)]
    barrier, parts, results = threading.Barrier(2, timeout=10), {}, {}

    def gather_for(rank):
        def gather(items):
            parts[rank] = items
            barrier.wait()
            return parts[0] + parts[1]
        return gather

    def work(rank):
        emb = ColourEmbedder()
        cache = benchmarks.EmbeddingCache(emb, 2, benchmarks.Distributed(rank, 2, torch.device("cpu"),
                                                                         gather_for(rank)))
        keys = [cache.add(im) for im in images]
        cache.flush()
        results[rank] = (emb.calls, np.stack([cache[k] for k in keys]))

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    full = ColourEmbedder().embed(images).numpy()
    assert results[0][0] == 3 and results[1][0] == 2  # images 0, 2, 4 on rank 0; 1, 3 on rank 1
    assert np.allclose(results[0][1], full) and np.allclose(results[1][1], full)


# =====================================================================================================================
# DreamBench++ scoring mode -> data_<name>_rating -> M-H
# =====================================================================================================================


def test_dreambench_score_then_mh(tmp_path, release_dir, count_embeds, rgb_images):
    rng = np.random.default_rng(0)
    keys = {}
    refs = [im.resize((32, 32)) for im in rgb_images[:3]]
    for run, method in (("emu2_seed0", "emu2"), ("ip_adapter_vit_giant_sdxl_x", "ip_adapter_vit_g_sdxl")):
        keys[method] = []
        for c, concept in enumerate(("object_00_magic_cube", "object_01_cup", "style_00_ink")):
            for k in range(2):
                rel = f"{concept.replace('magic_cube', 'rubik' + chr(39) + 's_cube')}/{k}_0"
                for sub, img in (("src_image", refs[c]),
                                 ("tgt_image", Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))):
                    path = tmp_path / "samples" / run / sub / f"{rel}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    img.save(path)
                keys[method].append(f"{concept}-{k}")
    ratings = tmp_path / "ratings"
    for g in (1, 2):
        d = ratings / "data_human_rating" / "merged_data" / f"group{g}"
        d.mkdir(parents=True)
        for method, ks in keys.items():
            (d / f"{method}-cp.json").write_text(json.dumps({k: int(rng.integers(0, 5)) for k in sorted(ks)}))
    assert main(["dreambench-score", "--samples", str(tmp_path / "samples"), "--ratings", str(ratings), "-q",
                 *map(str, _model_args(release_dir))]) == 0
    # 12 generated images + 3 distinct references (each copied 4x across runs and images) -> 15 embeddings
    assert len(count_embeds) == 15
    written = json.loads((ratings / "data_nearid_rating" / "emu2.json").read_text())
    assert list(written) == sorted(written) and list(written)[0] == "object_00_rubik's_cube-0_0"
    scorer = NearIDScorer.from_pretrained(release_dir, device="cpu", dtype=torch.float32)
    run = tmp_path / "samples" / "emu2_seed0"
    expected = 100 * float(scorer.similarity(run / "src_image" / "object_01_cup" / "1_0.png",
                                             run / "tgt_image" / "object_01_cup" / "1_0.png"))
    assert written["object_01_cup-1_0"] == pytest.approx(expected, abs=1e-3)

    out = _run_json(["dreambench", "--ratings", ratings, "--category", "object"], tmp_path / "d.json")
    human = [{m: json.loads((ratings / "data_human_rating" / "merged_data" / f"group{g}" / f"{m}-cp.json")
                            .read_text()) for m in keys} for g in (1, 2)]
    metric = {m: json.loads((ratings / "data_nearid_rating" / f"{m}.json").read_text()) for m in keys}
    assert out["mh"]["nearid"] == pytest.approx(m_h(human[0], human[1], metric, "object"), nan_ok=True)


def test_dreambench_score_twelve_images_per_concept(tmp_path, monkeypatch):
    """12 images of one concept (keys _0 .. _11): the scorer file lists them in numeric order and M-H pairs each
    generated image with its own human ratings (a string sort put _10 before _2)."""
    run = tmp_path / "samples" / "emu2_seed0"
    keys = [f"object_00_cup-0_{i}" for i in range(12)]
    for i in range(12):
        _write_png(run / "src_image" / "object_00_cup" / f"0_{i}.png", (255, 0, 0))
        _write_png(run / "tgt_image" / "object_00_cup" / f"0_{i}.png", (255, 20 * i, 0))
    ratings = tmp_path / "ratings"
    human = [11 - i for i in range(12)]  # the further the colour drifts, the lower the rating
    for g in (1, 2):
        d = ratings / "data_human_rating" / "merged_data" / f"group{g}"
        d.mkdir(parents=True)
        (d / "emu2-cp.json").write_text(json.dumps(dict(zip(keys, human))))
    monkeypatch.setattr("nearid_core.eval.__main__._embedder", lambda args, dist: ColourEmbedder())
    assert main(["dreambench-score", "--samples", str(tmp_path / "samples"), "--ratings", str(ratings), "-q"]) == 0
    written = json.loads((ratings / "data_nearid_rating" / "emu2.json").read_text())
    assert list(written) == keys
    cosines = [100 * 255 / math.hypot(255, 20 * i) for i in range(12)]
    assert [written[k] for k in keys] == pytest.approx(cosines, abs=1e-3)
    out = _run_json(["dreambench", "--ratings", ratings, "--category", "object"], tmp_path / "d.json")
    assert out["per_method"]["nearid"]["emu2"] == pytest.approx(method_score(human, human, cosines), abs=1e-4)
    assert out["per_method"]["nearid"]["emu2"] > 0.95


# =====================================================================================================================
# Baselines
# =====================================================================================================================

DINO_PREPROCESSOR = {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 36},
                     "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
                     "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                     "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True}


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    d = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32,
                             patch_size=8)).save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(DINO_PREPROCESSOR))
    return d


def test_clip_and_dinov2_baselines(tiny_clip_dir, dino_dir, rgb_images, image_files):
    from transformers import AutoModel, CLIPModel

    from nearid_core.eval.baselines import slow_image_processor

    for name, path, dim in (("clip-vit-l14", tiny_clip_dir, 16), ("dinov2-l", dino_dir, 32)):
        emb = load_embedder(name, path, device="cpu", dtype=torch.float32)
        out = emb.embed(rgb_images, batch_size=3)
        assert out.shape == (4, dim) and out.dtype == torch.float32
        assert torch.allclose(out.norm(dim=-1), torch.ones(4), atol=1e-5)
        assert torch.allclose(emb.embed(image_files), out, atol=1e-5)  # paths == the same PIL images
        # equals the model's own readout through its own processor
        pixels = slow_image_processor(str(path))(images=rgb_images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            if name == "clip-vit-l14":
                raw = CLIPModel.from_pretrained(path).get_image_features(pixel_values=pixels)
                raw = raw if isinstance(raw, torch.Tensor) else raw.pooler_output
            else:
                raw = AutoModel.from_pretrained(path)(pixel_values=pixels).pooler_output
        assert torch.allclose(out, torch.nn.functional.normalize(raw, dim=-1), atol=1e-5)


def test_siglip_readouts(siglip_vision_dir, rgb_images):
    scorer = NearIDScorer.from_pretrained(siglip_vision_dir, device="cpu", dtype=torch.float32)
    map_emb = load_embedder("siglip2-map", siglip_vision_dir, device="cpu", dtype=torch.float32)
    assert torch.allclose(map_emb.embed(rgb_images), scorer.embed(rgb_images), atol=1e-6)
    mean_emb = load_embedder("siglip2-mean", siglip_vision_dir, device="cpu", dtype=torch.float32)
    out = mean_emb.embed(rgb_images, batch_size=3)
    with torch.no_grad():
        tokens = scorer.model.encode_tokens(scorer.pixel_values(rgb_images))
    assert tokens.shape[1] == 16  # (56 / 14)^2 patch tokens, no extra token
    assert torch.allclose(out, torch.nn.functional.normalize(tokens.mean(1), dim=-1), atol=1e-5)
    assert not torch.allclose(out, map_emb.embed(rgb_images), atol=1e-2)


def test_nearid_bench_with_clip_baseline(tmp_path, bench_data, tiny_clip_dir):
    out = _run_json(["nearid-bench", "--data", bench_data, "--baseline", "clip-vit-l14", "--model", tiny_clip_dir,
                     "--device", "cpu", "--dtype", "fp32", "--sims-out", tmp_path / "sims"], tmp_path / "r.json")
    assert set(out["per_source"]) == {"src_a", "src_b"} and out["n"] > 0


# =====================================================================================================================
# Flag validation (before anything is loaded)
# =====================================================================================================================


@pytest.mark.parametrize("argv, message", [
    (["nearid-bench", "--sims", "a.csv", "--model", "x"], "--model"),
    (["nearid-bench", "--sims", "a.csv", "--masks", "fg", "--sources", "s"], "--masks, --sources"),
    (["mtg", "--sims", "a.csv", "--baseline", "dinov2-l"], "--baseline"),
    (["nearid-bench", "--data", "d", "--split", "val", "--indices", "i.json"], "--split or --indices"),
    (["mtg", "--data", "d", "--split", "test"], "--hf only"),
    (["nearid-bench", "--hf", "--batch-size", "0"], "--batch-size"),
])
def test_conflicting_flags_raise_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_argparse_rejects_two_data_sources_and_unknown_baseline(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["nearid-bench", "--hf", "--data", "d"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["mtg", "--hf", "--baseline", "vit"])
    args = parse_args(["dreambench-score", "--samples", str(tmp_path), "--ratings", "r", "--baseline",
                       "siglip2-mean"])
    assert args.name == "siglip2_mean" and args.batch_size == 32

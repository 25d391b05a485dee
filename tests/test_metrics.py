"""Metric values on hand-made tables; every expected number is worked out by hand in the comments."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearid_core.eval.metrics import (
    BENCH_COLUMNS,
    DIRECTED_TERMS,
    BenchCounts,
    align_ratings,
    canonical_key,
    fisher_z_mean,
    human_agreement,
    key_category,
    m_h,
    m_h_per_method,
    method_score,
    mtg_metrics,
    mtg_oracle,
    natural_sort_key,
    nearid_bench_counts,
    nearid_bench_margins,
    nearid_bench_metrics,
    pearson,
    pool_counts,
    summarize_counts,
)

nan = float("nan")

# ---------------------------------------------------------------------------------------------------------------------
# NearID-Bench
# ---------------------------------------------------------------------------------------------------------------------

# Source A: 2-view samples, only sim_01, cross_00, cross_11 exist (all other columns missing = all NaN).
#   row | sim_01 cross_00 cross_11 | margins (a=0, a=1)  | wins    | mean     | all win? | mean win?
#   0   | 0.8    0.5      0.6      | 0.3, 0.2            | 2 of 2  | 0.25     | yes      | yes
#   1   | 0.5    0.5      0.375    | 0.0 (tie), 0.125    | 1 of 2  | 0.0625   | no       | yes
#   2   | 0.25   0.625    NaN      | -0.375, NaN         | 0 of 1  | -0.375   | no       | no
#   3   | NaN    0.125    0.25     | NaN, NaN            | -- no valid term, not a sample --
# n=3, ssr_wins=1, term_wins=3, term_trials=5, mean_wins=2
TWO_VIEW = {
    "sim_01": [0.8, 0.5, 0.25, nan],
    "cross_00": [0.5, 0.5, 0.625, 0.125],
    "cross_11": [0.6, 0.375, nan, 0.25],
}
TWO_VIEW_COUNTS = BenchCounts(n=3, ssr_wins=1, term_wins=3, term_trials=5, mean_wins=2)

# Source B: 3-view samples (6 directed terms each); off-diagonal cross_ij are junk and must be ignored.
#   row 0: sim_01=0.875 sim_02=0.75 sim_12=0.5; cross_00=0.625 cross_11=0.25 cross_22=0.5
#     01/a0: 0.875-0.625=0.25 W   01/a1: 0.875-0.25=0.625 W   02/a0: 0.75-0.625=0.125 W
#     02/a2: 0.75-0.5=0.25 W      12/a1: 0.5-0.25=0.25 W      12/a2: 0.5-0.5=0.0 tie -> L
#     5 of 6 win; mean = 1.5/6 = 0.25 > 0; not all win
#   row 1: every sim 0.75, every cross_aa 0.5 -> six margins of 0.25, all win, mean wins
# n=2, ssr_wins=1, term_wins=11, term_trials=12, mean_wins=2
THREE_VIEW = {
    "sim_01": [0.875, 0.75],
    "sim_02": [0.75, 0.75],
    "sim_12": [0.5, 0.75],
    "cross_00": [0.625, 0.5],
    "cross_11": [0.25, 0.5],
    "cross_22": [0.5, 0.5],
    "cross_01": [0.99, 0.99],
    "cross_10": [0.99, 0.99],
    "cross_12": [0.99, 0.99],
    "cross_21": [0.99, 0.99],
    "cross_02": [0.99, 0.99],
    "cross_20": [0.99, 0.99],
}
THREE_VIEW_COUNTS = BenchCounts(n=2, ssr_wins=1, term_wins=11, term_trials=12, mean_wins=2)


def test_directed_terms_order():
    assert DIRECTED_TERMS == (
        ("sim_01", "cross_00"), ("sim_01", "cross_11"),
        ("sim_02", "cross_00"), ("sim_02", "cross_22"),
        ("sim_12", "cross_11"), ("sim_12", "cross_22"),
    )


def test_two_view_counts_ties_and_nan():
    assert nearid_bench_counts(TWO_VIEW) == TWO_VIEW_COUNTS


def test_two_view_metrics():
    m = summarize_counts(TWO_VIEW_COUNTS)
    assert m.ssr == pytest.approx(100 * 1 / 3)  # 1 of 3 samples wins every term
    assert m.pa == pytest.approx(100 * 5 / 8)  # (3 term wins + 2 mean wins) / (5 terms + 3 samples) = 62.5
    assert m.pa_terms == pytest.approx(100 * 3 / 5)  # 60.0
    assert m.ssr_mean == pytest.approx(100 * 2 / 3)
    assert m.n == 3
    assert m.as_dict()["term_trials"] == 5


def test_three_view_margins_and_counts():
    margins = nearid_bench_margins(THREE_VIEW)
    assert margins.shape == (2, 6)
    np.testing.assert_array_equal(margins[0], [0.25, 0.625, 0.125, 0.25, 0.25, 0.0])
    np.testing.assert_array_equal(margins[1], [0.25] * 6)
    assert nearid_bench_counts(THREE_VIEW) == THREE_VIEW_COUNTS
    m = summarize_counts(THREE_VIEW_COUNTS)
    assert m.ssr == pytest.approx(50.0)  # 1 of 2
    assert m.pa == pytest.approx(100 * 13 / 14)  # (11 + 2) / (12 + 2)
    assert m.pa_terms == pytest.approx(100 * 11 / 12)
    assert m.ssr_mean == pytest.approx(100.0)


def test_two_view_margins_missing_columns_are_nan():
    margins = nearid_bench_margins(TWO_VIEW)
    # Row 0: 0.8-0.5 and 0.8-0.6; the four terms of sim_02 / sim_12 have no column -> NaN.
    np.testing.assert_allclose(margins[0, :2], [0.3, 0.2])
    assert np.isnan(margins[:, 2:]).all()
    assert margins[1, 0] == 0.0  # exact tie
    assert np.isnan(margins[3]).all()


def test_missing_column_equals_all_nan_column():
    explicit = dict(TWO_VIEW, sim_02=[nan] * 4, sim_12=[nan] * 4, cross_22=[nan] * 4)
    assert nearid_bench_counts(explicit) == TWO_VIEW_COUNTS


def test_extra_trial_pa_differs_from_term_pa():
    # One 2-view sample: margins 0.5 - 0 = 0.5 (win) and 0.5 - 0.75 = -0.25 (loss); mean 0.125 > 0 (win).
    # PA (extra trial) = (1 + 1) / (2 + 1) = 66.67; PA_terms = 1 / 2 = 50; SSR = 0; SSR_mean = 100.
    m = summarize_counts(nearid_bench_counts({"sim_01": [0.5], "cross_00": [0.0], "cross_11": [0.75]}))
    assert m.pa == pytest.approx(200 / 3)
    assert m.pa_terms == pytest.approx(50.0)
    assert m.ssr == 0.0
    assert m.ssr_mean == 100.0


def test_non_finite_margin_is_not_a_trial():
    # inf - inf = NaN and inf - 0.5 = inf: both non-finite, so only 0.5 - 0.25 = 0.25 is a trial (a win).
    cols = {"sim_01": [np.inf, 0.5], "cross_00": [np.inf, 0.25], "cross_11": [0.5, nan]}
    assert nearid_bench_counts(cols) == BenchCounts(n=1, ssr_wins=1, term_wins=1, term_trials=1, mean_wins=1)


def test_micro_pooling_two_sources():
    # Pooled counts: n = 3 + 2 = 5, ssr_wins = 1 + 1 = 2, term_wins = 3 + 11 = 14, term_trials = 5 + 12 = 17,
    # mean_wins = 2 + 2 = 4.  SSR = 2/5 = 40 (the macro mean of 33.3 and 50 would be 41.7),
    # PA = (14 + 4) / (17 + 5) = 18/22, PA_terms = 14/17, SSR_mean = 4/5.
    pooled = BenchCounts(n=5, ssr_wins=2, term_wins=14, term_trials=17, mean_wins=4)
    assert pool_counts([TWO_VIEW_COUNTS, THREE_VIEW_COUNTS]) == pooled
    results = nearid_bench_metrics({"flux": TWO_VIEW, "sdxl": THREE_VIEW})
    assert list(results) == ["flux", "sdxl", "all"]
    assert results["flux"].counts == TWO_VIEW_COUNTS
    assert results["sdxl"].counts == THREE_VIEW_COUNTS
    a = results["all"]
    assert a.counts == pooled
    assert a.ssr == pytest.approx(40.0)
    assert a.pa == pytest.approx(100 * 18 / 22)
    assert a.pa_terms == pytest.approx(100 * 14 / 17)
    assert a.ssr_mean == pytest.approx(80.0)


def test_empty_counts_give_nan():
    m = summarize_counts(pool_counts([]))
    assert m.n == 0
    assert all(math.isnan(v) for v in (m.ssr, m.pa, m.pa_terms, m.ssr_mean))
    assert nearid_bench_counts({}) == BenchCounts()
    assert nearid_bench_counts({"sim_01": [nan], "cross_00": [0.5]}) == BenchCounts()


def test_bench_input_validation():
    with pytest.raises(ValueError, match="cross_11"):
        nearid_bench_counts({"sim_01": [0.5, 0.5], "cross_00": [0.1, 0.1], "cross_11": [0.1]})
    with pytest.raises(ValueError, match="sim_01"):
        nearid_bench_counts({"sim_01": [[0.5, 0.5]], "cross_00": [0.1]})
    with pytest.raises(ValueError, match="all"):
        nearid_bench_metrics({"all": TWO_VIEW})
    with pytest.raises(ValueError, match="'bad'.*cross_00"):
        nearid_bench_metrics({"bad": {"sim_01": [0.5], "cross_00": ["x"]}})


# ---------------------------------------------------------------------------------------------------------------------
# Pearson and Fisher-z
# ---------------------------------------------------------------------------------------------------------------------


def test_pearson_pairwise_complete_and_undefined():
    # Dropping the NaN pair leaves x = [1, 2, 3], y = [2, 4, 6]: perfectly linear -> r = 1.
    assert pearson([1, 2, nan, 3], [2, 4, 100, 6]) == pytest.approx(1.0)
    # x = [1, 3, 2], y = [1, 2, 3]: deviations [-1, 1, 0] and [-1, 0, 1] -> sxy = 1, sxx = syy = 2 -> r = 0.5.
    assert pearson([1, 3, 2], [1, 2, 3]) == pytest.approx(0.5)
    assert pearson([0.6, 0.6, 0.6], [1, 2, 3]) == 0.0  # constant side -> NaN -> 0
    assert math.isnan(pearson([0.6, 0.6, 0.6], [1, 2, 3], nan_to_zero=False))
    assert pearson([1, nan], [2, 3]) == 0.0  # one complete pair only
    with pytest.raises(ValueError, match="3.*2"):
        pearson([1, 2, 3], [1, 2])


def test_fisher_z_mean():
    # atanh(0.6) = ln 2, atanh(0.8) = ln 3; mean = ln sqrt(6); tanh(ln a) = (a^2 - 1) / (a^2 + 1) = 5/7.
    assert fisher_z_mean([0.6, 0.8], clip=0.999) == pytest.approx(5 / 7)
    # r = 1 is clipped to 0.999 before atanh, so the mean of [1, 1] is 0.999, not 1 (and not NaN/inf).
    assert fisher_z_mean([1.0, 1.0], clip=0.999) == pytest.approx(0.999)
    assert fisher_z_mean([1.0, 1.0], clip=0.9999) == pytest.approx(0.9999)
    # [1, 0] with clip 0.999: tanh(atanh(0.999) / 2) = (sqrt(k) - 1) / (sqrt(k) + 1), k = 1.999 / 0.001 = 1999.
    assert fisher_z_mean([1.0, 0.0], clip=0.999) == pytest.approx((math.sqrt(1999) - 1) / (math.sqrt(1999) + 1))
    assert fisher_z_mean([1.0, -1.0], clip=0.999) == pytest.approx(0.0)
    assert fisher_z_mean([nan, 0.5], clip=0.999) == pytest.approx(0.5)  # NaN dropped
    assert math.isnan(fisher_z_mean([], clip=0.999))
    with pytest.raises(ValueError, match="clip"):
        fisher_z_mean([0.5], clip=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# MTG
# ---------------------------------------------------------------------------------------------------------------------

# row | s12  s11p s12p s22p s21p | o1   o2   | m1 = s12-s11p | m2 = s12-s22p | all win | mean
# 0   | 0.9  0.1  1    0.6  0    | 0.25 0    | 0.8 W         | 0.3 W         | yes     | 0.55
# 1   | 0.8  0.2  0    0.6  1    | 0.5  0.5  | 0.6 W         | 0.2 W         | yes     | 0.4
# 2   | 0.6  0.3  0    0.6  0    | 0.75 1    | 0.3 W         | 0.0 tie L     | no      | 0.15
# 3   | 0.7  NaN  NaN  0.6  1    | 1    0.25 | NaN           | 0.1 W         | yes     | 0.1
# 4   | NaN  NaN  NaN  0.6  NaN  | NaN  NaN  | NaN           | NaN           | -- not a sample --
# n = 4; SSR = 3/4 = 75; PA = (3 + 3 wins) / (3 + 4 valid margins) = 6/7 (no extra trial); SSR_mean = 4/4.
# Correlations (pairwise-complete):
#   r(s11p, o1): rows 0-2, [0.1, 0.2, 0.3] vs [0.25, 0.5, 0.75] -> exactly linear, r = 1 (clipped to 0.999)
#   r(s22p, o2): s22p constant 0.6 -> NaN -> 0
#   r(s12p, o2): rows 0-2, x = [1, 0, 0] (dev [2/3, -1/3, -1/3]), y = [0, 0.5, 1] (dev [-0.5, 0, 0.5]):
#                sxy = -1/3 - 1/6 = -0.5, sxx = 2/3, syy = 0.5 -> r = -0.5 / sqrt(1/3) = -sqrt(3)/2
#   r(s21p, o1): rows 0-3, x = [0, 1, 0, 1] (dev +-0.5), y = [0.25, 0.5, 0.75, 1] (dev [-.375, -.125, .125, .375]):
#                sxy = 0.25, sxx = 1, syy = 0.3125 -> r = 0.25 / sqrt(0.3125) = 1/sqrt(5)
# M-O = tanh((atanh(0.999) + 0 + atanh(-sqrt(3)/2) + atanh(1/sqrt(5))) / 4)
#     = tanh((3.800201 + 0 - 1.316958 + 0.481212) / 4) = tanh(0.741114) ~= 0.62982
# M-Opair = tanh((atanh(0.999) + 0) / 2) = (sqrt(1999) - 1) / (sqrt(1999) + 1) ~= 0.956246
MTG_TABLE = {
    "sim_12": [0.9, 0.8, 0.6, 0.7, nan],
    "sim_1_1p": [0.1, 0.2, 0.3, nan, nan],
    "sim_1_2p": [1, 0, 0, nan, nan],
    "sim_2_2p": [0.6, 0.6, 0.6, 0.6, 0.6],
    "sim_2_1p": [0, 1, 0, 1, nan],
    "oracle_1": [0.25, 0.5, 0.75, 1.0, nan],
    "oracle_2": [0.0, 0.5, 1.0, 0.25, nan],
}


def test_mtg_metrics_hand_table():
    res = mtg_metrics(**MTG_TABLE)
    assert res.correlations["s11p_o1"] == pytest.approx(1.0)
    assert res.correlations["s22p_o2"] == 0.0
    assert res.correlations["s12p_o2"] == pytest.approx(-math.sqrt(3) / 2)
    assert res.correlations["s21p_o1"] == pytest.approx(1 / math.sqrt(5))
    expected_m_o = math.tanh((0.5 * math.log(1999) - math.atanh(math.sqrt(3) / 2) + math.atanh(1 / math.sqrt(5))) / 4)
    assert expected_m_o == pytest.approx(0.62982, abs=1e-5)
    assert res.m_o == pytest.approx(expected_m_o)
    assert res.m_opair == pytest.approx((math.sqrt(1999) - 1) / (math.sqrt(1999) + 1))
    assert (res.n, res.wins, res.trials) == (4, 6, 7)
    assert res.ssr == pytest.approx(75.0)
    assert res.pa == pytest.approx(100 * 6 / 7)
    assert res.ssr_mean == pytest.approx(100.0)


def test_mtg_length_mismatch_names_argument():
    bad = dict(MTG_TABLE, oracle_2=[0.0, 0.5])
    with pytest.raises(ValueError, match="oracle_2"):
        mtg_metrics(**bad)


def test_mtg_oracle():
    obj = np.zeros((4, 5), dtype=np.uint8)
    obj[:2, :] = 255  # 10 object pixels
    part = np.zeros((4, 5), dtype=np.uint8)
    part[0, :3] = 1  # 3 part pixels
    assert mtg_oracle(obj, part) == pytest.approx(1 - 3 / 10)
    assert mtg_oracle(np.zeros((4, 5)), part) == 0.0  # empty object: ratio 1 -> oracle 0
    assert mtg_oracle(obj, None) == 0.0  # missing mask: (ratio, oracle) = (1, 0)
    assert mtg_oracle(None, part) == 0.0
    # No clipping: a 4-pixel part on a 2-pixel object gives 1 - 2 = -1.
    assert mtg_oracle([[1, 1, 0, 0]], [[1, 1, 1, 1]]) == -1.0
    assert mtg_oracle(obj, np.zeros((4, 5))) == 1.0  # nothing edited


# ---------------------------------------------------------------------------------------------------------------------
# DreamBench++ M-H
# ---------------------------------------------------------------------------------------------------------------------


def test_canonical_key_and_category():
    assert canonical_key("object_cat_3") == "object_cat"
    assert canonical_key("live_subject_animal_kitten-0_0") == "live_subject_animal_kitten-0"
    assert canonical_key("object_cat") == "object_cat"
    assert canonical_key("object_a_1_2") == "object_a_1"  # only one trailing index
    assert canonical_key("object_x_") == "object_x_"
    assert canonical_key("object_rubik's_cube_0") == "object_magic_cube"
    assert canonical_key("object_magic_cube") == "object_magic_cube"
    assert key_category("object_cat_3") == "object"
    assert key_category("live_subject_animal_dog") == "live_subject_animal"
    assert key_category("live_subject_human_girl") == "live_subject_human"
    assert key_category("style_monet") == "style"
    assert key_category("scene_beach") is None


HUMAN_KEYS = ["object_magic_cube", "object_cat", "object_mug", "style_van_gogh", "style_monet"]
METRIC_KEYS = ["object_rubik's_cube_0", "object_cat_0", "object_mug_0", "style_van_gogh_0", "style_monet_0"]


def _ratings(keys, values):
    return dict(zip(keys, values))


# Per method: object items are the first three keys, style the last two.
# m1 object: h1 = [1, 2, 3], h2 = [1, 3, 2], metric = [0.1, 0.2, 0.3]
#   r1 = 1; r2: x dev [-1, 1, 0], y dev [-0.1, 0, 0.1] -> 0.1 / sqrt(2 * 0.02) = 0.5 -> score (1 + 0.5)/2 = 0.75
# m2 object: h1 = [1, 2, 4], h2 = [3, 2, 1], metric = [0.1, 0.2, 0.3]
#   r1: x dev [-4/3, -1/3, 5/3], y dev [-0.1, 0, 0.1] -> sxy = 0.3, sxx = 42/9, syy = 0.02
#       r1 = 0.3 / sqrt(0.84/9) = 0.98198 -> rounded 0.9820; r2 = -1 -> score (0.982 - 1)/2 = -0.009
#       (unrounded it would be -0.00901, so the 4-decimal rounding is visible)
# M-H(object) = tanh((atanh(0.75) + atanh(-0.009)) / 2) = tanh((0.972955 - 0.009000) / 2) ~= 0.447826
# m1 style: h1 = [1, 2], h2 = [2, 1], metric [0.5, 0.7] -> r1 = 1, r2 = -1 -> score 0
# m2 style: h1 = [5, 5] is constant -> r1 undefined -> score NaN, dropped -> M-H(style) = 0
# Human-human (object): m1 r(h1, h2) = 0.5 (as r2 above); m2: x dev [-4/3, -1/3, 5/3], y dev [1, 0, -1]:
#   sxy = -3, sxx = 42/9, syy = 2 -> r = -9/sqrt(84) = -0.98198 -> -0.982
#   ceiling = tanh((atanh(0.5) + atanh(-0.982)) / 2) ~= -0.716648
HUMAN_1 = {
    "m1": _ratings(HUMAN_KEYS, [1, 2, 3, 1, 2]),
    "m2": _ratings(HUMAN_KEYS, [1, 2, 4, 5, 5]),
}
HUMAN_2 = {
    "m1": _ratings(HUMAN_KEYS, [1, 3, 2, 2, 1]),
    "m2": _ratings(HUMAN_KEYS, [3, 2, 1, 1, 2]),
}
METRIC = {
    "m1": _ratings(METRIC_KEYS, [0.1, 0.2, 0.3, 0.5, 0.7]),
    "m2": _ratings(METRIC_KEYS, [0.1, 0.2, 0.3, 0.5, 0.7]),
}


def test_method_score_rounds_each_r():
    assert method_score([1, 2, 4], [3, 2, 1], [0.1, 0.2, 0.3]) == pytest.approx(-0.009, abs=1e-12)


def test_m_h_two_methods_two_groups():
    per_method = m_h_per_method(HUMAN_1, HUMAN_2, METRIC, category="object")
    assert list(per_method) == ["m1", "m2"]
    assert per_method["m1"] == pytest.approx(0.75)
    assert per_method["m2"] == pytest.approx(-0.009, abs=1e-12)
    expected = math.tanh((0.5 * math.log(7) + math.atanh(-0.009)) / 2)  # atanh(0.75) = ln(1.75/0.25)/2 = ln(7)/2
    assert expected == pytest.approx(0.447826, abs=1e-6)
    assert m_h(HUMAN_1, HUMAN_2, METRIC, category="object") == pytest.approx(expected)


def test_m_h_style_drops_nan_method():
    per_method = m_h_per_method(HUMAN_1, HUMAN_2, METRIC, category="style")
    assert per_method["m1"] == pytest.approx(0.0)
    assert math.isnan(per_method["m2"])
    assert m_h(HUMAN_1, HUMAN_2, METRIC, category="style") == pytest.approx(0.0)


def test_human_agreement_ceiling():
    expected = math.tanh((math.atanh(0.5) + math.atanh(-0.982)) / 2)
    assert expected == pytest.approx(-0.716648, abs=1e-6)
    assert human_agreement(HUMAN_1, HUMAN_2, category="object") == pytest.approx(expected)


def test_align_ratings_pairs_by_key():
    keys, values = align_ratings([HUMAN_1["m1"], METRIC["m1"]], labels=["human.json", "metric.json"])
    assert keys == ["object_magic_cube", "object_cat", "object_mug", "style_van_gogh", "style_monet"]
    np.testing.assert_array_equal(values, [[1, 2, 3, 1, 2], [0.1, 0.2, 0.3, 0.5, 0.7]])
    # the same items in another order pair up the same (never by position)
    reordered = dict(reversed(list(METRIC["m1"].items())))
    _, again = align_ratings([HUMAN_1["m1"], reordered])
    np.testing.assert_array_equal(again, values)


def test_align_ratings_keeps_the_image_index_when_both_files_have_it():
    """Several images per concept: every key ends in _<n>, so the full key pairs items (stripped they would clash)."""
    keys = [f"object_00_cup-0_{i}" for i in range(12)]
    human = dict(zip(keys, range(12)))
    shuffled = {k: 10.0 * human[k] for k in sorted(keys)}  # string order: _0, _1, _10, _11, _2, ...
    _, values = align_ratings([human, shuffled])
    np.testing.assert_array_equal(values[1], 10.0 * values[0])
    assert m_h({"m": human}, {"m": human}, {"m": shuffled}) == pytest.approx(0.9999)
    assert m_h({"m": human}, {"m": human}, {"m": shuffled}) == m_h({"m": human}, {"m": human},
                                                                   {"m": {k: 10.0 * human[k] for k in keys}})
    # one file without the index: its keys would clash once stripped, so nothing pairs -> an error
    with pytest.raises(ValueError, match="only after stripping"):
        align_ratings([human, {"object_00_cup-0": 1.0, **{k: 1.0 for k in keys[1:]}}])


def test_natural_sort_key():
    keys = ["object_00_cup-10_0", "object_00_cup-2_0", "object_00_cup-0_11", "object_00_cup-0_2"]
    assert sorted(keys, key=natural_sort_key) == ["object_00_cup-0_2", "object_00_cup-0_11", "object_00_cup-2_0",
                                                  "object_00_cup-10_0"]


def test_align_ratings_fails_loudly_on_unmatched_keys():
    other = _ratings(["object_magic_cube_0", "object_mugs_0", "object_cat_0", "style_van_gogh_0", "style_monet_0"],
                     [0.1, 0.2, 0.3, 0.5, 0.7])
    with pytest.raises(ValueError) as err:
        align_ratings([HUMAN_1["m1"], other], labels=["group1/m1-cp.json", "nearid/m1.json"])
    msg = str(err.value)
    assert "group1/m1-cp.json" in msg and "nearid/m1.json" in msg
    assert "lacks ['object_mug']" in msg and "extra ['object_mugs_0']" in msg

    shorter = _ratings(METRIC_KEYS[:4], [0.1, 0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"b.json lacks \['style_monet'\] and has extra \[\].*4 vs 5 items"):
        align_ratings([HUMAN_1["m1"], shorter], labels=["a.json", "b.json"])

    misaligned_metric = dict(METRIC, m2=other)
    with pytest.raises(ValueError, match=r"metric\['m2'\] lacks"):
        m_h(HUMAN_1, HUMAN_2, misaligned_metric)


def test_m_h_input_validation():
    with pytest.raises(ValueError, match="different methods"):
        m_h(HUMAN_1, HUMAN_2, {"m1": METRIC["m1"]})
    with pytest.raises(ValueError, match="category"):
        m_h(HUMAN_1, HUMAN_2, METRIC, category="objects")
    with pytest.raises(ValueError, match="live_subject_human"):
        m_h(HUMAN_1, HUMAN_2, METRIC, category="live_subject_human")  # no such item in the toy files
    with pytest.raises(ValueError, match="at least two"):
        align_ratings([HUMAN_1["m1"]])


# ---------------------------------------------------------------------------------------------------------------------
# Invariants on random tables (hypothesis). Cells are multiples of 1/8 (exact, so ties are frequent) or NaN.
# ---------------------------------------------------------------------------------------------------------------------

PROPERTY = settings(max_examples=60, deadline=None)
CELL = st.one_of(st.sampled_from([k / 8 for k in range(-8, 9)]), st.just(nan))
FINITE = st.sampled_from([k / 8 for k in range(-8, 9)])
MTG_NAMES = ("sim_12", "sim_1_1p", "sim_1_2p", "sim_2_2p", "sim_2_1p", "oracle_1", "oracle_2")


def _rows(width: int, cell=CELL, max_size: int = 12):
    return st.lists(st.lists(cell, min_size=width, max_size=width), min_size=0, max_size=max_size)


def _table(rows, names) -> dict[str, np.ndarray]:
    return {c: np.array([r[k] for r in rows], dtype=np.float64) for k, c in enumerate(names)}


def _direct_counts(rows) -> BenchCounts:
    """Spec 6.2 counted one sample at a time: NaN margins are no trial, a tie loses, the mean of the valid margins."""
    n = ssr = wins = trials = mean_wins = 0
    for row in rows:
        cells = dict(zip(BENCH_COLUMNS, row))
        margins = [cells[s] - cells[c] for s, c in DIRECTED_TERMS if math.isfinite(cells[s] - cells[c])]
        if margins:
            n += 1
            ssr += all(m > 0 for m in margins)
            wins += sum(m > 0 for m in margins)
            trials += len(margins)
            mean_wins += sum(margins) / len(margins) > 0
    return BenchCounts(n, ssr, wins, trials, mean_wins)


@PROPERTY
@given(_rows(len(BENCH_COLUMNS)))
def test_property_bench_counts_equal_a_direct_count(rows):
    assert nearid_bench_counts(_table(rows, BENCH_COLUMNS)) == _direct_counts(rows)


@PROPERTY
@given(st.data(), _rows(len(BENCH_COLUMNS)))
def test_property_bench_permutation_of_samples(data, rows):
    order = data.draw(st.permutations(range(len(rows))))
    shuffled = [rows[i] for i in order]
    assert nearid_bench_counts(_table(shuffled, BENCH_COLUMNS)) == nearid_bench_counts(_table(rows, BENCH_COLUMNS))


@PROPERTY
@given(_rows(len(BENCH_COLUMNS)), st.integers(1, 3))
def test_property_bench_nan_rows_and_unused_columns_change_nothing(rows, n_nan):
    counts = nearid_bench_counts(_table(rows, BENCH_COLUMNS))
    padded = rows + [[nan] * len(BENCH_COLUMNS)] * n_nan  # samples without any term are not samples
    assert nearid_bench_counts(_table(padded, BENCH_COLUMNS)) == counts
    off_diagonal = [c for c in BENCH_COLUMNS if c.startswith("cross_") and c[-1] != c[-2]]
    junk = _table(rows, BENCH_COLUMNS) | {c: np.full(len(rows), nan) for c in off_diagonal}
    assert nearid_bench_counts(junk) == counts


@PROPERTY
@given(st.lists(FINITE, min_size=1, max_size=12))
def test_property_bench_ties_lose(values):
    # every similarity of a sample equals every cross_aa of it: all six margins are exactly 0
    cols = {c: np.array(values) for c in ("sim_01", "sim_02", "sim_12", "cross_00", "cross_11", "cross_22")}
    counts = nearid_bench_counts(cols)
    assert counts == BenchCounts(n=len(values), ssr_wins=0, term_wins=0, term_trials=6 * len(values), mean_wins=0)


@PROPERTY
@given(_rows(len(BENCH_COLUMNS)), _rows(len(BENCH_COLUMNS)))
def test_property_bench_micro_pooling_is_concatenation(a, b):
    ta, tb = _table(a, BENCH_COLUMNS), _table(b, BENCH_COLUMNS)
    joined = nearid_bench_counts(_table(a + b, BENCH_COLUMNS))
    assert joined == nearid_bench_counts(ta) + nearid_bench_counts(tb)
    assert nearid_bench_metrics({"a": ta, "b": tb})["all"].counts == joined


def _mtg(rows):
    return mtg_metrics(**_table(rows, MTG_NAMES))


@PROPERTY
@given(st.data(), _rows(len(MTG_NAMES), max_size=10))
def test_property_mtg_permutation_of_samples(data, rows):
    order = data.draw(st.permutations(range(len(rows))))
    a, b = _mtg(rows), _mtg([rows[i] for i in order])
    assert (a.n, a.wins, a.trials) == (b.n, b.wins, b.trials)
    assert a.ssr == pytest.approx(b.ssr, nan_ok=True) and a.pa == pytest.approx(b.pa, nan_ok=True)
    assert a.correlations == pytest.approx(b.correlations, abs=1e-9)
    assert a.m_o == pytest.approx(b.m_o, abs=1e-9) and a.m_opair == pytest.approx(b.m_opair, abs=1e-9)


@PROPERTY
@given(_rows(len(MTG_NAMES), max_size=10), st.integers(1, 3))
def test_property_mtg_nan_rows_change_nothing(rows, n_nan):
    a, b = _mtg(rows), _mtg(rows + [[nan] * len(MTG_NAMES)] * n_nan)
    assert (a.n, a.wins, a.trials, a.correlations) == (b.n, b.wins, b.trials, b.correlations)


@PROPERTY
@given(st.lists(st.tuples(FINITE, CELL, CELL), min_size=1, max_size=10))
def test_property_mtg_ties_lose(rows):
    # s(1,1p) and s(2,2p) equal s(1,2) (or are missing): no margin wins, no sample succeeds
    sim_12 = [r[0] for r in rows]
    res = mtg_metrics(sim_12, [r[0] if math.isfinite(r[1]) else nan for r in rows], [0.0] * len(rows),
                      [r[0] if math.isfinite(r[2]) else nan for r in rows], [0.0] * len(rows),
                      [1.0] * len(rows), [1.0] * len(rows))
    assert res.wins == 0 and res.trials == sum(math.isfinite(r[1]) + math.isfinite(r[2]) for r in rows)
    assert res.ssr == 0.0 or (res.n == 0 and math.isnan(res.ssr))


@PROPERTY
@given(st.data(), st.lists(st.tuples(CELL, CELL), min_size=0, max_size=12))
def test_property_pearson_symmetric_bounded_permutation_and_nan_pairs(data, pairs):
    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    r = pearson(x, y)
    assert -1.0 <= r <= 1.0 and r == pytest.approx(pearson(y, x), abs=1e-12)
    order = data.draw(st.permutations(range(len(pairs))))
    assert pearson([x[i] for i in order], [y[i] for i in order]) == pytest.approx(r, abs=1e-12)
    assert pearson(x + [nan, 0.5], y + [0.25, nan]) == r  # pairs with a NaN side are left out


@PROPERTY
@given(st.data(), st.lists(st.one_of(st.floats(-1, 1), st.just(nan)), max_size=8))
def test_property_fisher_z_mean_permutation_bounds_and_nan(data, values):
    z = fisher_z_mean(values, clip=0.999)
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        assert math.isnan(z)
        return
    lo, hi = (float(np.clip(v, -0.999, 0.999)) for v in (min(finite), max(finite)))
    assert lo - 1e-9 <= z <= hi + 1e-9  # a mean lies within the (clipped) values
    order = data.draw(st.permutations(range(len(values))))
    assert fisher_z_mean([values[i] for i in order], clip=0.999) == pytest.approx(z, abs=1e-12)
    assert fisher_z_mean(finite, clip=0.999) == z

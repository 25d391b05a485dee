"""Paper metrics as pure array functions: NearID-Bench SSR/PA, MTG M-O/M-Opair/SSR/PA and DreamBench++ M-H.

Everything here works on numbers that were already computed (cosine similarities, oracle values, per-image ratings);
there is no I/O, no model and no torch. Percentages are on a 0-100 scale like the paper's tables; correlations are in
[-1, 1]. A metric whose denominator is empty is NaN.

NearID-Bench (one distractor source): for each positive pair (i, j) in (0, 1), (0, 2), (1, 2) and each anchor
a in {i, j}, the directed margin is ``sim_ij - cross_aa`` (the other view of the same object against a different object
inpainted into the anchor's own background). A margin wins only if it is strictly positive; a non-finite margin is not
a trial. Sources are pooled micro-style by summing :class:`BenchCounts`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "BENCH_COLUMNS",
    "DIRECTED_TERMS",
    "KEY_ALIASES",
    "M_H_CATEGORIES",
    "BenchCounts",
    "BenchMetrics",
    "MTGMetrics",
    "align_ratings",
    "canonical_key",
    "fisher_z_mean",
    "human_agreement",
    "key_category",
    "m_h",
    "m_h_per_method",
    "method_score",
    "mtg_metrics",
    "mtg_oracle",
    "natural_sort_key",
    "nearid_bench_counts",
    "nearid_bench_margins",
    "nearid_bench_metrics",
    "pearson",
    "pool_counts",
    "summarize_counts",
]

# --------------------------------------------------------------------------------------------------------------------
# NearID-Bench (spec section 6.2 / 6.3)
# --------------------------------------------------------------------------------------------------------------------

#: Directed terms as (similarity column, cross column): pair (i, j) with anchor a gives ``sim_ij - cross_aa``.
DIRECTED_TERMS: tuple[tuple[str, str], ...] = tuple(
    (f"sim_{i}{j}", f"cross_{a}{a}") for i, j in ((0, 1), (0, 2), (1, 2)) for a in (i, j)
)

#: Columns of a per-sample similarity table that the benchmark reads or validates.
BENCH_COLUMNS: tuple[str, ...] = ("sim_01", "sim_02", "sim_12") + tuple(
    f"cross_{p}{n}" for p in range(3) for n in range(3)
)


@dataclass(frozen=True)
class BenchCounts:
    """Additive NearID-Bench counts for one group of samples; sum them to micro-pool sources.

    Attributes:
        n: samples with at least one valid (finite) directed term.
        ssr_wins: samples in which every valid term wins.
        term_wins: valid terms with margin > 0.
        term_trials: valid terms.
        mean_wins: samples whose mean valid margin is > 0.
    """

    n: int = 0
    ssr_wins: int = 0
    term_wins: int = 0
    term_trials: int = 0
    mean_wins: int = 0

    def __add__(self, other: BenchCounts) -> BenchCounts:
        if not isinstance(other, BenchCounts):
            return NotImplemented
        return BenchCounts(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        """The counts in field order (n, ssr_wins, term_wins, term_trials, mean_wins)."""
        return (self.n, self.ssr_wins, self.term_wins, self.term_trials, self.mean_wins)


@dataclass(frozen=True)
class BenchMetrics:
    """NearID-Bench metrics (percent, 0-100; NaN when the denominator is 0) with the counts they came from.

    Attributes:
        ssr: Sample Success Rate = ssr_wins / n (paper "SSR", reference code ``SSRm``).
        pa: Pairwise Accuracy, Table-1 convention: (term_wins + mean_wins) / (term_trials + n), i.e. each sample's
            mean margin counts as one extra trial.
        pa_terms: PA over directed terms only: term_wins / term_trials.
        ssr_mean: share of samples whose mean margin wins: mean_wins / n (reference code ``SSR``, not reported).
        counts: the additive counts.
    """

    ssr: float
    pa: float
    pa_terms: float
    ssr_mean: float
    counts: BenchCounts

    @property
    def n(self) -> int:
        """Samples with at least one valid term."""
        return self.counts.n

    def as_dict(self) -> dict[str, float]:
        """Flat dict of metrics and counts, e.g. for a CSV row or a JSON summary."""
        return {"ssr": self.ssr, "pa": self.pa, "pa_terms": self.pa_terms, "ssr_mean": self.ssr_mean,
                **asdict(self.counts)}


def _as_float_column(name: str, values: ArrayLike) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"column {name!r} must hold numbers (NaN for missing cells): {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"column {name!r} must be 1-D (one value per sample), got shape {arr.shape}")
    return arr


def _float_columns(columns: Mapping[str, ArrayLike], names: Sequence[str]) -> tuple[dict[str, np.ndarray], int]:
    """Convert the named columns that are present; check they share one length; return them and that length."""
    out: dict[str, np.ndarray] = {}
    length: int | None = None
    first: str | None = None
    for name in names:
        if name not in columns or columns[name] is None:
            continue
        arr = _as_float_column(name, columns[name])
        if length is None:
            length, first = len(arr), name
        elif len(arr) != length:
            raise ValueError(f"column {name!r} has {len(arr)} rows but column {first!r} has {length}")
        out[name] = arr
    return out, (0 if length is None else length)


def nearid_bench_margins(columns: Mapping[str, ArrayLike]) -> np.ndarray:
    """Directed NearID-Bench margins of one distractor source.

    Args:
        columns: column name -> 1-D float array over samples, using the names in :data:`BENCH_COLUMNS`
            (other keys are ignored). NaN marks a missing cell; a missing column counts as all NaN, so a 2-view
            table needs only ``sim_01``, ``cross_00`` and ``cross_11``.

    Returns:
        [N, 6] float64 margins ordered as :data:`DIRECTED_TERMS`; NaN where the term is not a trial (non-finite).

    Raises:
        ValueError: a column is not 1-D numeric, or columns differ in length (the message names the column).
    """
    cols, n = _float_columns(columns, BENCH_COLUMNS)
    missing = np.full(n, np.nan)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, which is what we want
        return _finite_or_nan([cols.get(s, missing) - cols.get(c, missing) for s, c in DIRECTED_TERMS], n)


def _finite_or_nan(terms: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Stack T margin arrays of length N into [N, T], turning every non-finite entry into NaN (= not a trial)."""
    margins = np.stack(terms, axis=1) if n else np.empty((0, len(terms)))
    margins[~np.isfinite(margins)] = np.nan
    return margins


def _margin_counts(margins: np.ndarray) -> tuple[int, int, int, int, int]:
    """(n, all-win samples, wins, trials, mean-win samples) for [N, T] margins with NaN = not a trial."""
    valid = np.isfinite(margins)
    wins = valid & (np.where(valid, margins, 0.0) > 0.0)
    n_valid = valid.sum(axis=1)
    has_term = n_valid > 0
    all_win = has_term & (wins.sum(axis=1) == n_valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_margin = np.where(valid, margins, 0.0).sum(axis=1) / n_valid
    mean_win = has_term & (mean_margin > 0.0)
    return int(has_term.sum()), int(all_win.sum()), int(wins.sum()), int(valid.sum()), int(mean_win.sum())


def nearid_bench_counts(columns: Mapping[str, ArrayLike]) -> BenchCounts:
    """Additive NearID-Bench counts for one distractor source.

    Args:
        columns: per-sample similarity columns as in :func:`nearid_bench_margins`.

    Returns:
        The counts; pass them to :func:`summarize_counts`, or sum several sources with :func:`pool_counts`.
    """
    return BenchCounts(*_margin_counts(nearid_bench_margins(columns)))


def _percent(num: int, den: int) -> float:
    return 100.0 * num / den if den else float("nan")


def summarize_counts(counts: BenchCounts) -> BenchMetrics:
    """SSR, PA (with the per-sample extra trial), PA over terms only and mean-based SSR, in percent."""
    c = counts
    return BenchMetrics(
        ssr=_percent(c.ssr_wins, c.n),
        pa=_percent(c.term_wins + c.mean_wins, c.term_trials + c.n),
        pa_terms=_percent(c.term_wins, c.term_trials),
        ssr_mean=_percent(c.mean_wins, c.n),
        counts=c,
    )


def pool_counts(counts: Iterable[BenchCounts]) -> BenchCounts:
    """Micro-pool several sources by summing their counts (each sample and each trial weighs the same)."""
    total = BenchCounts()
    for c in counts:
        total = total + c
    return total


def nearid_bench_metrics(
    sources: Mapping[str, Mapping[str, ArrayLike]], pooled_name: str = "all"
) -> dict[str, BenchMetrics]:
    """Per-source and micro-pooled NearID-Bench metrics.

    Args:
        sources: distractor source name -> its per-sample similarity columns (see :func:`nearid_bench_margins`).
        pooled_name: key of the pooled entry.

    Returns:
        source name -> metrics, in input order, then ``pooled_name`` -> metrics over the summed counts.

    Raises:
        ValueError: a source is named ``pooled_name``, or a source's columns are invalid.
    """
    if pooled_name in sources:
        raise ValueError(f"source name {pooled_name!r} clashes with the pooled entry; pass another pooled_name")
    counts = {}
    for name, columns in sources.items():
        try:
            counts[name] = nearid_bench_counts(columns)
        except ValueError as exc:
            raise ValueError(f"source {name!r}: {exc}") from exc
    out = {name: summarize_counts(c) for name, c in counts.items()}
    out[pooled_name] = summarize_counts(pool_counts(counts.values()))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Correlations
# --------------------------------------------------------------------------------------------------------------------


def pearson(x: ArrayLike, y: ArrayLike, nan_to_zero: bool = True) -> float:
    """Pearson correlation over the pairs where both values are finite (pairwise-complete).

    Args:
        x: [N] values.
        y: [N] values.
        nan_to_zero: return 0.0 instead of NaN when the correlation is undefined (fewer than 2 complete pairs, or a
            constant side), as the MTG evaluation does.

    Returns:
        r in [-1, 1] (or NaN / 0.0 when undefined).

    Raises:
        ValueError: x and y are not 1-D or differ in length.
    """
    xa, ya = _as_float_column("x", x), _as_float_column("y", y)
    if len(xa) != len(ya):
        raise ValueError(f"pearson: x has {len(xa)} values but y has {len(ya)}")
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    r = float("nan")
    if len(xa) >= 2 and not np.all(xa == xa[0]) and not np.all(ya == ya[0]):
        dx, dy = xa - xa.mean(), ya - ya.mean()
        den = math.sqrt(float(dx @ dx) * float(dy @ dy))
        if den > 0.0:
            r = max(-1.0, min(1.0, float(dx @ dy) / den))
    return 0.0 if (nan_to_zero and math.isnan(r)) else r


def fisher_z_mean(values: ArrayLike, clip: float) -> float:
    """Average correlations in Fisher-z space: tanh(mean(atanh(clip(r, -clip, clip)))).

    Args:
        values: correlations in [-1, 1]; NaN entries are dropped.
        clip: bound in (0, 1) applied before atanh (0.999 for MTG M-O, 0.9999 for DreamBench++ M-H).

    Returns:
        The averaged correlation, NaN if no value remains.
    """
    if not 0.0 < clip < 1.0:
        raise ValueError(f"clip must lie in (0, 1), got {clip}")
    r = np.asarray(values, dtype=np.float64).ravel()
    r = r[~np.isnan(r)]
    if r.size == 0:
        return float("nan")
    return float(np.tanh(np.mean(np.arctanh(np.clip(r, -clip, clip)))))


# --------------------------------------------------------------------------------------------------------------------
# MTG (spec section 6.5)
# --------------------------------------------------------------------------------------------------------------------

_MTG_CLIP = 0.999


@dataclass(frozen=True)
class MTGMetrics:
    """MTG part-level metrics.

    Attributes:
        m_o: Fisher-z mean of the four oracle correlations (M-O).
        m_opair: Fisher-z mean of the two same-background correlations (M-Opair).
        ssr: percent of samples (with >= 1 valid margin) where every valid margin wins.
        pa: percent of valid margins that win (no extra per-sample trial).
        ssr_mean: percent of samples whose mean valid margin wins (printed by the reference, not in Table 1).
        n: samples with at least one valid margin.
        wins: winning margins.
        trials: valid margins.
        correlations: Pearson r (NaN -> 0) keyed ``s11p_o1``, ``s22p_o2``, ``s12p_o2``, ``s21p_o1``.
    """

    m_o: float
    m_opair: float
    ssr: float
    pa: float
    ssr_mean: float
    n: int
    wins: int
    trials: int
    correlations: dict[str, float]


def mtg_metrics(
    sim_12: ArrayLike,
    sim_1_1p: ArrayLike,
    sim_1_2p: ArrayLike,
    sim_2_2p: ArrayLike,
    sim_2_1p: ArrayLike,
    oracle_1: ArrayLike,
    oracle_2: ArrayLike,
    clip: float = _MTG_CLIP,
) -> MTGMetrics:
    """MTG M-O, M-Opair, SSR and PA from per-sample similarities and oracles.

    Args:
        sim_12: [N] s(1, 2), the two original views.
        sim_1_1p: [N] s(1, 1p), view 1 vs its own part-edited version.
        sim_1_2p: [N] s(1, 2p).
        sim_2_2p: [N] s(2, 2p).
        sim_2_1p: [N] s(2, 1p).
        oracle_1: [N] fraction of object 1 left unedited (see :func:`mtg_oracle`).
        oracle_2: [N] same for view 2.
        clip: Fisher-z clip bound.

    NaN is allowed anywhere: correlations are pairwise-complete and NaN margins are not trials.
    Margins are m1 = s(1,2) - s(1,1p) and m2 = s(1,2) - s(2,2p); a margin wins only if > 0.

    Raises:
        ValueError: an input is not 1-D numeric or the inputs differ in length (the message names the argument).
    """
    arrays, n_rows = _float_columns(
        {"sim_12": sim_12, "sim_1_1p": sim_1_1p, "sim_1_2p": sim_1_2p, "sim_2_2p": sim_2_2p, "sim_2_1p": sim_2_1p,
         "oracle_1": oracle_1, "oracle_2": oracle_2},
        ("sim_12", "sim_1_1p", "sim_1_2p", "sim_2_2p", "sim_2_1p", "oracle_1", "oracle_2"),
    )
    a = arrays
    correlations = {
        "s11p_o1": pearson(a["sim_1_1p"], a["oracle_1"]),
        "s22p_o2": pearson(a["sim_2_2p"], a["oracle_2"]),
        "s12p_o2": pearson(a["sim_1_2p"], a["oracle_2"]),
        "s21p_o1": pearson(a["sim_2_1p"], a["oracle_1"]),
    }
    with np.errstate(invalid="ignore"):
        margins = _finite_or_nan([a["sim_12"] - a["sim_1_1p"], a["sim_12"] - a["sim_2_2p"]], n_rows)
    n, all_wins, wins, trials, mean_wins = _margin_counts(margins)
    return MTGMetrics(
        m_o=fisher_z_mean(list(correlations.values()), clip),
        m_opair=fisher_z_mean([correlations["s11p_o1"], correlations["s22p_o2"]], clip),
        ssr=_percent(all_wins, n),
        pa=_percent(wins, trials),
        ssr_mean=_percent(mean_wins, n),
        n=n,
        wins=wins,
        trials=trials,
        correlations=correlations,
    )


def mtg_oracle(object_mask: ArrayLike | None, part_mask: ArrayLike | None) -> float:
    """Oracle similarity of one view: the fraction of the object left unedited, 1 - |part > 0| / |object > 0|.

    Args:
        object_mask: [H, W] (any shape) object mask; pixels > 0 count. None = missing.
        part_mask: [H, W] (any shape) mask of the edited part; pixels > 0 count. None = missing.

    Returns:
        The oracle, not clipped (negative if the part is larger than the object). An empty object gives ratio 1,
        hence 0.0; a missing mask gives 0.0.
    """
    if object_mask is None or part_mask is None:
        return 0.0
    object_area = int(np.count_nonzero(np.asarray(object_mask) > 0))
    part_area = int(np.count_nonzero(np.asarray(part_mask) > 0))
    ratio = part_area / object_area if object_area > 0 else 1.0
    return 1.0 - ratio


# --------------------------------------------------------------------------------------------------------------------
# DreamBench++ M-H (spec section 6.6)
# --------------------------------------------------------------------------------------------------------------------

#: Category prefixes of DreamBench++ keys; Table 1 reports ``object``.
M_H_CATEGORIES: tuple[str, ...] = ("object", "live_subject_animal", "live_subject_human", "style")

#: Naming differences between rating files that denote the same concept.
KEY_ALIASES: dict[str, str] = {"rubik's_cube": "magic_cube"}

_M_H_CLIP = 0.9999
_TRAILING_INDEX = re.compile(r"_\d+$")


def canonical_key(key: str) -> str:
    """Key with one trailing ``_<digits>`` image index stripped (``object_cat-0_3`` -> ``object_cat-0``) and aliases
    mapped (``rubik's_cube`` -> ``magic_cube``); rating files whose keys differ only so still pair up (see
    :func:`align_ratings`).
    """
    return _alias_key(_TRAILING_INDEX.sub("", key))


def _alias_key(key: str) -> str:
    for src, dst in KEY_ALIASES.items():
        key = key.replace(src, dst)
    return key


def natural_sort_key(key: str) -> list:
    """Sort key that orders the numbers inside ``key`` by value: ``cup-2_0`` before ``cup-10_0``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def key_category(key: str) -> str | None:
    """The entry of :data:`M_H_CATEGORIES` that ``key`` starts with, or None."""
    for category in M_H_CATEGORIES:
        if key.startswith(category):
            return category
    return None


def _index_by(rating: Mapping[str, float], reduce: Callable[[str], str]) -> dict[str, str] | None:
    """reduced key -> original key, or None when two keys of the file reduce to the same one."""
    out = {reduce(k): k for k in rating}
    return out if len(out) == len(rating) else None


def _match_keys(ref: Mapping[str, float], other: Mapping[str, float], ref_label: str, label: str) -> list[str]:
    """The keys of ``other`` that pair with the keys of ``ref``, in ``ref``'s order.

    Keys pair when they are equal after mapping aliases (``rubik's_cube`` = ``magic_cube``); failing that, when they
    are equal after also stripping one trailing ``_<n>`` (one file indexes its images and the other does not), which
    is allowed only if no two keys of either file become the same. Never by position.
    """
    for reduce in (_alias_key, canonical_key):
        ref_index, index = _index_by(ref, reduce), _index_by(other, reduce)
        if ref_index is not None and index is not None and ref_index.keys() == index.keys():
            return [index[k] for k in ref_index]
    lacks, extra = _unpaired(ref, other), _unpaired(other, ref)
    if lacks or extra:
        problem = (f"{label} lacks {_some(lacks)} and has extra {_some(extra)} (compared with {ref_label}, "
                   f"{len(other)} vs {len(ref)} items)")
    else:
        problem = (f"{label} and {ref_label} pair up only after stripping the trailing _<n> image index, which makes "
                   "two keys of one file the same")
    raise ValueError(f"rating keys do not match: {problem}. Items are paired by key (rubik's_cube = magic_cube; a "
                     "trailing _<n> image index may be left out only where every key stays distinct); give both "
                     "files the same items")


def _unpaired(rating: Mapping[str, float], other: Mapping[str, float]) -> list[str]:
    """Keys of ``rating`` that equal no key of ``other``, even with aliases mapped and the ``_<n>`` index stripped."""
    alias, canonical = {_alias_key(k) for k in other}, {canonical_key(k) for k in other}
    return [k for k in rating if _alias_key(k) not in alias and canonical_key(k) not in canonical]


def _some(keys: list[str]) -> str:
    return repr(keys[:3])[:-1] + (", ...]" if len(keys) > 3 else "]")


def align_ratings(
    ratings: Sequence[Mapping[str, float]], labels: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Pair two or more {key: score} rating dicts by key, in the order of the first.

    Args:
        ratings: rating dicts; the order of the items in a file does not matter.
        labels: one name per dict (e.g. file paths) used in error messages; defaults to ``ratings[k]``.

    Returns:
        (canonical keys of the first dict [N], scores [len(ratings), N] float64).

    Raises:
        ValueError: fewer than two dicts, labels of the wrong length, a non-numeric score, or a key of one dict that
            pairs with no key of the first (see :func:`_match_keys`; the message names the keys and the labels).
    """
    if len(ratings) < 2:
        raise ValueError(f"align_ratings needs at least two rating dicts, got {len(ratings)}")
    if labels is None:
        labels = [f"ratings[{k}]" for k in range(len(ratings))]
    if len(labels) != len(ratings):
        raise ValueError(f"got {len(labels)} labels for {len(ratings)} rating dicts")
    ref = ratings[0]
    rows = []
    for rating, label in zip(ratings, labels):
        keys = list(ref) if rating is ref else _match_keys(ref, rating, labels[0], label)
        try:
            rows.append(np.array([float(rating[k]) for k in keys], dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{label}: scores must be numbers: {exc}") from exc
    return [canonical_key(k) for k in ref], np.stack(rows)


def method_score(human_1: ArrayLike, human_2: ArrayLike, metric: ArrayLike) -> float:
    """One method's metric-human agreement: (r1 + r2) / 2, each Pearson r rounded to 4 decimals.

    Args:
        human_1: [N] ratings of annotator group 1.
        human_2: [N] ratings of annotator group 2.
        metric: [N] metric scores for the same items (any scale).

    Returns:
        The score; NaN if either correlation is undefined.
    """
    r1 = round(pearson(human_1, metric, nan_to_zero=False), 4)
    r2 = round(pearson(human_2, metric, nan_to_zero=False), 4)
    return (r1 + r2) / 2


def _category_rows(
    ratings: Sequence[Mapping[str, float]], labels: Sequence[str], category: str | None
) -> np.ndarray:
    """Aligned [len(ratings), N_category] scores of one method restricted to one category (None = all items)."""
    if category is not None and category not in M_H_CATEGORIES:
        raise ValueError(f"category must be one of {M_H_CATEGORIES} or None, got {category!r}")
    keys, values = align_ratings(ratings, labels)
    if category is None:
        return values
    keep = np.array([key_category(k) == category for k in keys], dtype=bool)
    if not keep.any():
        raise ValueError(f"{labels[0]} has no item in category {category!r}")
    return values[:, keep]


def _check_methods(named: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    names = list(named)
    methods = list(named[names[0]])
    for name in names[1:]:
        if set(named[name]) != set(methods):
            raise ValueError(
                f"{names[0]} and {name} cover different methods: {sorted(methods)} vs {sorted(named[name])}"
            )
    if not methods:
        raise ValueError("no methods given")
    return methods


def m_h_per_method(
    human_1: Mapping[str, Mapping[str, float]],
    human_2: Mapping[str, Mapping[str, float]],
    metric: Mapping[str, Mapping[str, float]],
    category: str | None = "object",
) -> dict[str, float]:
    """Per-method metric-human agreement (see :func:`method_score`) within one DreamBench++ category.

    Args:
        human_1: method -> {key: rating} of annotator group 1, in file order.
        human_2: method -> {key: rating} of annotator group 2.
        metric: method -> {key: metric score}.
        category: one of :data:`M_H_CATEGORIES` (by key prefix), or None for all items.

    Returns:
        method -> score, in the order of ``human_1``.

    Raises:
        ValueError: the three mappings cover different methods, or a method's files are misaligned.
    """
    methods = _check_methods({"human_1": human_1, "human_2": human_2, "metric": metric})
    out = {}
    for method in methods:
        labels = [f"human_1[{method!r}]", f"human_2[{method!r}]", f"metric[{method!r}]"]
        h1, h2, m = _category_rows([human_1[method], human_2[method], metric[method]], labels, category)
        out[method] = method_score(h1, h2, m)
    return out


def m_h(
    human_1: Mapping[str, Mapping[str, float]],
    human_2: Mapping[str, Mapping[str, float]],
    metric: Mapping[str, Mapping[str, float]],
    category: str | None = "object",
    clip: float = _M_H_CLIP,
) -> float:
    """DreamBench++ M-H of a metric for one category: Fisher-z mean over methods of :func:`m_h_per_method`.

    Table 1 reports ``category="object"``. Arguments are as in :func:`m_h_per_method`; NaN method scores are dropped.
    """
    return fisher_z_mean(list(m_h_per_method(human_1, human_2, metric, category).values()), clip)


def human_agreement(
    human_1: Mapping[str, Mapping[str, float]],
    human_2: Mapping[str, Mapping[str, float]],
    category: str | None = "object",
    clip: float = _M_H_CLIP,
) -> float:
    """Human-human ceiling: Fisher-z mean over methods of Pearson(group 1, group 2), each rounded to 4 decimals."""
    methods = _check_methods({"human_1": human_1, "human_2": human_2})
    rs = []
    for method in methods:
        labels = [f"human_1[{method!r}]", f"human_2[{method!r}]"]
        h1, h2 = _category_rows([human_1[method], human_2[method]], labels, category)
        rs.append(round(pearson(h1, h2, nan_to_zero=False), 4))
    return fisher_z_mean(rs, clip)

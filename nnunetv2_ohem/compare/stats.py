"""Statistics of a comparison table (pure functions on ``results.csv`` rows).

* per trainer: mean and Student-t 95 % interval over its runs (folds × seeds), :func:`mean_ci`;
* against the first (reference) trainer: the difference paired by (fold, seed) — same validation cases and,
  with seeds, the same initialisation seed — with its t-interval and a paired t-test
  (``scipy.stats.ttest_rel``, equal to a one-sample t-test of the differences).

Fewer than two runs (or pairs) give no interval: ``lo``/``hi``/``p`` are NaN and ``n`` says why; the report
writes "no CI (n = 1)" instead of a number.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd

PAIR_KEYS = ("fold", "seed")


def mean_ci(values: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """Mean and Student-t confidence interval: ``x̄ ± t_{(1+level)/2, n-1} · s / √n`` (s: sample standard
    deviation, ddof = 1). NaN values are dropped; with one value the interval is (NaN, NaN)."""
    from scipy import stats
    x = np.asarray([v for v in values if v is not None and not math.isnan(float(v))], dtype=float)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def _finite(values) -> np.ndarray:
    x = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(float)
    return x[np.isfinite(x)]


def summarize_runs(results: pd.DataFrame, metrics: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """One row per budget × trainer (in table order): ``n_runs``, mean epochs and training seconds and, per
    metric, ``<m>_n`` (runs with a finite value), ``<m>_mean``, ``<m>_lo``, ``<m>_hi``."""
    need = {"budget", "trainer", "fold", "seed", "epochs", "train_seconds", *metrics}
    missing = need - set(results.columns)
    if missing:
        raise ValueError(f"results table lacks column(s) {sorted(missing)}")
    rows = []
    for (budget, trainer), g in results.groupby(["budget", "trainer"], sort=False):
        row: Dict = {"budget": budget, "trainer": trainer, "n_runs": int(len(g)),
                     "epochs": float(g["epochs"].mean()), "train_seconds": float(g["train_seconds"].mean())}
        for m in metrics:
            x = _finite(g[m])
            row[f"{m}_n"] = int(len(x))
            row[f"{m}_mean"], row[f"{m}_lo"], row[f"{m}_hi"] = mean_ci(x.tolist(), level)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_test(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Tuple[int, float, float, float,
                                                                                        float]:
    """``(n, mean, lo, hi, p)`` of the paired differences ``a − b`` (pairs with a NaN dropped): mean with its
    t-interval and the two-sided p-value of the paired t-test. NaN interval and p for fewer than 2 pairs; a
    zero-variance difference gives p = 0 (or 1 when the mean difference is 0) rather than NaN."""
    from scipy import stats
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("paired samples must be 1-d and of equal length")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    n = int(len(d))
    if n == 0:
        return 0, math.nan, math.nan, math.nan, math.nan
    m, lo, hi = mean_ci(d.tolist(), level)
    if n < 2:
        return n, m, lo, hi, math.nan
    if float(np.std(d, ddof=1)) == 0.0:
        return n, m, m, m, (1.0 if m == 0 else 0.0)
    p = float(stats.ttest_rel(a, b).pvalue)
    return n, m, lo, hi, p


def paired_differences(results: pd.DataFrame, reference: str, metrics: Sequence[str],
                       level: float = 0.95) -> pd.DataFrame:
    """Per budget, trainer ≠ ``reference`` and metric: the (fold, seed)-paired difference trainer − reference
    (:func:`paired_test`). Runs without a partner are left out (``n`` counts the pairs)."""
    rows: List[Dict] = []
    for budget, g in results.groupby("budget", sort=False):
        ref = g[g["trainer"] == reference].set_index(list(PAIR_KEYS))
        if ref.index.has_duplicates:
            raise ValueError(f"reference {reference} has more than one run per (fold, seed) in budget {budget}")
        for trainer, gt in g.groupby("trainer", sort=False):
            if trainer == reference:
                continue
            own = gt.set_index(list(PAIR_KEYS))
            common = own.index.intersection(ref.index)
            for m in metrics:
                a = pd.to_numeric(own.loc[common, m], errors="coerce").to_numpy(float)
                b = pd.to_numeric(ref.loc[common, m], errors="coerce").to_numpy(float)
                n, mean, lo, hi, p = paired_test(a, b, level)
                rows.append({"budget": budget, "trainer": trainer, "metric": m, "n": n, "mean": mean, "lo": lo,
                             "hi": hi, "p": p})
    return pd.DataFrame(rows, columns=["budget", "trainer", "metric", "n", "mean", "lo", "hi", "p"])


def format_ci(mean: float, lo: float, hi: float, n: int, digits: int = 3) -> str:
    """``0.512 [0.401, 0.623]``; ``0.512 (no CI, n = 1)`` for one value; ``n/a`` without values."""
    if n == 0 or math.isnan(mean):
        return "n/a (no value)"
    if math.isnan(lo):
        return f"{mean:.{digits}f} (no CI, n = {n})"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


__all__ = ["mean_ci", "summarize_runs", "paired_test", "paired_differences", "format_ci", "format_p", "PAIR_KEYS"]

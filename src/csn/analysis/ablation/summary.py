"""Summaries of ablation tables: normalized curves, the areas under them, and selective-vs-random gaps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from csn.errors import CsnError

_KEY_CANDIDATES = ("run", "step", "epoch", "stage", "mode", "rank_split", "score_split", "bn_recalibrated", "seed")


@dataclass
class AblationSummary:
    """curves: the rows plus top1_norm/top5_norm (accuracy / unablated accuracy); areas: trapezoid area
    under top1_norm vs fraction per (step, stage, order, draw); gaps: per (step, stage) the
    selective-minus-random area (negative = ablating selective units hurts more) with its spread over draws,
    and the grid's largest fraction (max_fraction)."""

    curves: pd.DataFrame
    areas: pd.DataFrame
    gaps: pd.DataFrame


def _normalized(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The rows plus top1_norm (and top5_norm): accuracy over the unablated (n = 0) accuracy of the same curve group."""
    curves = df.copy()
    base = curves[curves["n"] == 0].groupby(keys, dropna=False)[["top1"] + (["top5"] if "top5" in df else [])].mean()
    if base.empty and not curves.empty:
        raise CsnError("the ablation table has no n=0 (unablated) rows to normalize by; include 0 in the grid.")
    base = base.rename(columns={"top1": "_b1", "top5": "_b5"}).reset_index()
    curves = curves.merge(base, on=keys, how="left")
    with np.errstate(divide="ignore", invalid="ignore"):
        curves["top1_norm"] = curves["top1"] / curves["_b1"].where(curves["_b1"] > 0)
        if "top5" in curves:
            curves["top5_norm"] = curves["top5"] / curves["_b5"].where(curves["_b5"] > 0)
    return curves.drop(columns=[c for c in ("_b1", "_b5") if c in curves])


def _areas(curves: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Trapezoid area under top1_norm vs fraction per (keys, order, draw) (numpy.trapezoid; 0 for a single point)."""
    rows = []
    for k, g in curves.groupby(keys + ["order", "draw"], dropna=False, sort=True):
        g = g.sort_values("fraction")
        f = g["fraction"].to_numpy(float)
        area = float(np.trapezoid(g["top1_norm"].to_numpy(float), f)) if len(g) > 1 else 0.0
        row = dict(zip(keys + ["order", "draw"], k, strict=True))
        row.update(area=area, max_fraction=float(f.max()), points=len(g))
        rows.append(row)
    return pd.DataFrame(rows, columns=keys + ["order", "draw", "area", "max_fraction", "points"])


def _gaps(areas: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per keys: selective area minus the mean random area, with the random draws' std and standard error."""
    rows = []
    for k, g in areas.groupby(keys, dropna=False, sort=True):
        sel = g.loc[g["order"] == "selective", "area"]
        rnd = g.loc[g["order"] == "random", "area"].to_numpy(float)
        lst = g.loc[g["order"] == "least", "area"]
        s = float(sel.iloc[0]) if len(sel) else float("nan")
        r_mean = float(rnd.mean()) if len(rnd) else float("nan")
        r_std = float(rnd.std(ddof=1)) if len(rnd) > 1 else float("nan")
        row = dict(zip(keys, k if isinstance(k, tuple) else (k,), strict=True))
        row.update(selective_area=s, random_area=r_mean, random_area_std=r_std,
                   least_area=float(lst.iloc[0]) if len(lst) else float("nan"),
                   gap=s - r_mean, gap_std=r_std, gap_se=r_std / math.sqrt(len(rnd)) if len(rnd) > 1 else float("nan"),
                   draws=len(rnd), max_fraction=float(g["max_fraction"].max()))
        rows.append(row)
    return pd.DataFrame(rows, columns=keys + ["selective_area", "random_area", "random_area_std", "least_area",
                                             "gap", "gap_std", "gap_se", "draws", "max_fraction"])


def summarize_ablation(df: pd.DataFrame) -> AblationSummary:
    """Normalized curves, areas under them (numpy.trapezoid over fraction ablated) and selective-vs-random gaps.

    Curves are grouped by every identifying column the table has (run, step, epoch, stage, mode,
    splits, BN batches, seed), so rows computed under other settings are never averaged together.
    """
    need = {"step", "stage", "order", "n", "fraction", "draw", "top1"}
    if not need <= set(df.columns):
        raise CsnError(f"ablation table lacks columns {sorted(need - set(df.columns))}; pass a table written by "
                       "ablation_sweep or the Ablation analysis (csn ablate).")
    keys = [c for c in _KEY_CANDIDATES if c in df.columns]
    curves = _normalized(df, keys)
    areas = _areas(curves, keys)
    return AblationSummary(curves, areas, _gaps(areas, keys))


__all__ = ["AblationSummary", "summarize_ablation"]

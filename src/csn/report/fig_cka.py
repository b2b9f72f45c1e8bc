"""CKA figures: layer x layer heatmaps, CKA vs epoch for layer pairs, across checkpoints, and between runs.

Functions take CKA tables (tables/cka.parquet as DataFrames), never models, so the report can draw
them from tables alone. Each writes PNG + SVG through csn.report.style.save and returns a
style.Figure with a one-sentence caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from csn.analysis.cka import LOGITS, comparison_rows, summarize_cka_runs
from csn.errors import CsnError
from csn.report import style


def layer_colors(layers: Sequence[str]) -> dict[str, tuple]:
    """Depth-ordered colors for layers (viridis, shallow = dark); the logits are black."""
    inner = [l for l in layers if l != LOGITS]
    cmap = style.colormap("viridis")
    cols = {l: cmap(0.05 + 0.85 * (i / max(1, len(inner) - 1))) for i, l in enumerate(inner)}
    cols[LOGITS] = (0.0, 0.0, 0.0, 1.0)
    return cols


def _pick_steps(steps: Sequence[int], k: int) -> list[int]:
    steps = sorted(set(int(s) for s in steps))
    if len(steps) <= k:
        return steps
    idx = sorted(set(np.linspace(0, len(steps) - 1, k).round().astype(int).tolist()))
    return [steps[i] for i in idx]


def cka_heatmaps(df: pd.DataFrame, out_dir: str | Path, *, steps: Sequence[int] | None = None, max_panels: int = 4,
                 name: str = "cka_within", title: str | None = None) -> style.Figure:
    """Layer x layer CKA within one checkpoint, one heatmap per chosen step (default: first, last, evenly between)."""
    d = comparison_rows(df, "within", "csn cka RUN --mode within")
    chosen = _pick_steps(d["step_a"], max_panels) if steps is None else [int(s) for s in steps]
    missing = [s for s in chosen if s not in set(d["step_a"].astype(int))]
    if missing:
        raise CsnError(f"no within-checkpoint CKA at step {missing[0]}; steps in the table: "
                       f"{', '.join(str(s) for s in sorted(set(d['step_a'].astype(int))))}.")
    layers = list(dict.fromkeys(d["layer_a"].tolist()))
    m = len(layers)
    side = max(3.0, 0.42 * m + 1.6)
    k = len(chosen)
    fig, axes = style.new(ncols=k + 1, width=side * (k + 0.25) / (k + 1), height=side,
                          gridspec_kw={"width_ratios": [1.0] * k + [0.05]})
    im = None
    for ax, s in zip(axes[0][:k], chosen):
        x = d[d["step_a"] == s]
        mat = x.pivot(index="layer_a", columns="layer_b", values="cka").reindex(index=layers, columns=layers)
        im = ax.imshow(mat.to_numpy(dtype=float), vmin=0, vmax=1, cmap="magma", origin="upper")
        ax.set_xticks(range(m), layers, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(m), layers, fontsize=8)
        ax.grid(False)
        if m <= 12:
            for i in range(m):
                for j in range(m):
                    v = mat.iat[i, j]
                    if np.isfinite(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                                color="black" if v > 0.6 else "white")
        ax.set_title(f"step {s} (epoch {float(x['epoch_a'].iloc[0]):.3g})", fontsize=10)
    fig.colorbar(im, cax=axes[0][k], label="linear CKA")
    if title:
        fig.suptitle(title)
    cap = (f"Linear CKA (unbiased minibatch estimator) between every pair of layers within the network at "
           f"{len(chosen)} checkpoint{'s' if len(chosen) != 1 else ''} (steps {', '.join(map(str, chosen))}); "
           "1 = the two layers' unit activations are linearly equivalent up to rotation and scale.")
    return style.save(fig, out_dir, name, cap)


def default_pairs(layers: Sequence[str]) -> list[tuple[str, str]]:
    """Each layer vs the next one, and each layer vs the logits (when present)."""
    inner = [l for l in layers if l != LOGITS]
    pairs = [(a, b) for a, b in zip(inner, inner[1:])]
    if LOGITS in layers:
        pairs += [(l, LOGITS) for l in inner]
    return pairs


def cka_pairs_vs_epoch(df: pd.DataFrame, out_dir: str | Path, *, pairs: Sequence[tuple[str, str]] | None = None,
                       log_epochs: bool = True, name: str = "cka_pairs", title: str | None = None) -> style.Figure:
    """Within-checkpoint CKA of chosen layer pairs vs epoch (default: consecutive layers | each layer vs logits)."""
    d = comparison_rows(df, "within", "csn cka RUN --mode within")
    layers = list(dict.fromkeys(d["layer_a"].tolist()))
    pairs = list(pairs) if pairs is not None else default_pairs(layers)
    if not pairs:
        raise CsnError("no layer pairs to plot; pass pairs=[(layer_a, layer_b), ...].")
    bad = [p for p in pairs if p[0] not in layers or p[1] not in layers]
    if bad:
        raise CsnError(f"layer pair {bad[0]} is not in the table; layers: {', '.join(layers)}.")
    groups = [("consecutive layers", [p for p in pairs if LOGITS not in p]),
              ("layer vs logits", [p for p in pairs if LOGITS in p])]
    groups = [g for g in groups if g[1]]
    fig, axes = style.new(ncols=len(groups))
    cols = layer_colors(layers)
    epochs = sorted(set(d["epoch_a"].astype(float)))
    for ax, (gt, gp) in zip(axes[0], groups):
        for a, b in gp:
            x = d[(d["layer_a"] == a) & (d["layer_b"] == b)].sort_values("epoch_a")
            ax.plot(x["epoch_a"], x["cka"], marker="o", ms=3, lw=1.5, color=cols[a], label=f"{a} – {b}")
        style.epoch_axis(ax, log_epochs, epochs)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("linear CKA")
        ax.set_title(gt, fontsize=10)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    cap = ("Linear CKA between pairs of layers of the same checkpoint versus training epoch"
           f"{' (symlog axis)' if log_epochs else ''}: how similar neighbouring layers' representations are, and "
           "how close each layer's representation is to the network's output.")
    return style.save(fig, out_dir, name, cap)


def cka_across_vs_epoch(df: pd.DataFrame, out_dir: str | Path, *, log_epochs: bool = True, name: str = "cka_across",
                        title: str | None = None, reference: int | None = None) -> style.Figure:
    """Each layer vs itself at the reference checkpoint | at the previous checkpoint, vs epoch."""
    has_ref = df is not None and len(df) and (df["comparison"] == "reference").any()
    has_prev = df is not None and len(df) and (df["comparison"] == "previous").any()
    if not (has_ref or has_prev):
        comparison_rows(df, "reference", "csn cka RUN --mode across")
    panels = []
    if has_ref:
        r = df[df["comparison"] == "reference"]
        refs = sorted(set(r["step_b"].astype(int)))
        ref = refs[-1] if reference is None else int(reference)
        if ref not in refs:
            raise CsnError(f"no CKA against reference step {ref}; references in the table: {', '.join(map(str, refs))}.")
        r = r[r["step_b"] == ref]
        panels.append((f"vs the same layer at step {ref} (epoch {float(r['epoch_b'].iloc[0]):.3g})", r,
                       float(r["epoch_b"].iloc[0])))
    if has_prev:
        panels.append(("vs the same layer at the previous checkpoint", df[df["comparison"] == "previous"], None))
    fig, axes = style.new(ncols=len(panels), sharex=True)
    allp = pd.concat([p[1] for p in panels])
    layers = list(dict.fromkeys(allp["layer_a"].tolist()))
    epochs = sorted(set(allp["epoch_a"].astype(float)) | set(allp["epoch_b"].astype(float)))
    cols = layer_colors(layers)
    for ax, (pt, d, ref_epoch) in zip(axes[0], panels):
        for l in layers:
            x = d[d["layer_a"] == l].sort_values("epoch_a")
            if not x.empty:
                ax.plot(x["epoch_a"], x["cka"], marker="o", ms=3, lw=1.5, color=cols[l], label=l)
        if ref_epoch is not None:
            ax.axvline(ref_epoch, color="0.5", ls=":", lw=1)
        style.epoch_axis(ax, log_epochs, epochs)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("linear CKA")
        ax.set_title(pt, fontsize=10)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    what = " and ".join(p[0].split(" (")[0].replace("vs the same layer at ", "") for p in panels)
    cap = (f"Linear CKA between each layer's representation at every checkpoint and the same layer at {what}, "
           f"versus training epoch{' (symlog axis)' if log_epochs else ''}: where and when representations stop changing.")
    return style.save(fig, out_dir, name, cap)


def cka_runs_vs_epoch(tables, out_dir: str | Path, *, log_epochs: bool = True, name: str = "cka_runs",
                      title: str | None = None, label_a: str = "run A", label_b: str = "run B") -> style.Figure:
    """Each layer of run A vs the same layer of run B at matched checkpoints vs epoch; mean ± 1 SE over run pairs.

    E.g. regularized (A) vs unregularized (B), one table per seed pair: the study's comparison of
    stage outputs and logits.
    """
    s = summarize_cka_runs(tables)
    n = int(s["n_pairs"].max()) if len(s) else 0
    fig, axes = style.new()
    ax = axes[0][0]
    layers = list(dict.fromkeys(s["layer"].tolist()))
    cols = layer_colors(layers)
    for l in layers:
        x = s[s["layer"] == l].sort_values("epoch_a")
        ax.plot(x["epoch_a"], x["mean"], marker="o", ms=3, lw=1.5, color=cols[l], label=l)
        if n > 1:
            ax.fill_between(x["epoch_a"], x["mean"] - x["se"].fillna(0), x["mean"] + x["se"].fillna(0),
                            color=cols[l], alpha=0.18, lw=0)
    style.epoch_axis(ax, log_epochs, sorted(set(s["epoch_a"].astype(float))))
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("linear CKA")
    ax.set_title(f"{label_a} vs {label_b}, same layer", fontsize=10)
    handles, _ = ax.get_legend_handles_labels()
    if n > 1:
        handles.append(style.patch(facecolor="0.5", alpha=0.25, label=f"±1 SE over {n} run pairs"))
    ax.legend(handles=handles, fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    cap = (f"Linear CKA between each layer of {label_a} and the same layer of {label_b} at matched checkpoints "
           f"versus training epoch{' (symlog axis)' if log_epochs else ''}"
           + (f", mean over {n} run pairs with ±1 SE bands." if n > 1 else "."))
    return style.save(fig, out_dir, name, cap)


def cka_figures(df: pd.DataFrame, out_dir: str | Path, *, log_epochs: bool = True, prefix: str = "cka",
                title: str | None = None) -> list[style.Figure]:
    """Every CKA figure the table supports: heatmaps and pair curves (within), across-checkpoint and between-run curves."""
    if df is None or len(df) == 0:
        raise CsnError("no CKA rows to plot; run `csn cka RUN` first.")
    figs = []
    comps = set(df["comparison"])
    if "within" in comps:
        figs.append(cka_heatmaps(df, out_dir, name=f"{prefix}_within", title=title))
        if df[df["comparison"] == "within"]["step_a"].nunique() > 1:
            figs.append(cka_pairs_vs_epoch(df, out_dir, log_epochs=log_epochs, name=f"{prefix}_pairs", title=title))
    if comps & {"reference", "previous"}:
        figs.append(cka_across_vs_epoch(df, out_dir, log_epochs=log_epochs, name=f"{prefix}_across", title=title))
    if "runs" in comps:
        d = df[df["comparison"] == "runs"]
        for _i, (rb, g) in enumerate(d.groupby("run_b", sort=False)):
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(rb))
            figs.append(cka_runs_vs_epoch(g, out_dir, log_epochs=log_epochs, name=f"{prefix}_runs_{safe}",
                                          title=title, label_a=str(g["run_a"].iloc[0]), label_b=str(rb)))
    return figs


__all__ = ["cka_heatmaps", "cka_pairs_vs_epoch", "cka_across_vs_epoch", "cka_runs_vs_epoch", "cka_figures",
           "default_pairs", "layer_colors"]

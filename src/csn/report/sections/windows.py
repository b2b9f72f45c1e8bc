"""The critical-period map section (csn experiment windows): "how early is early"."""

from __future__ import annotations

import pandas as pd

from csn.errors import CsnError
from csn.experiments.windows import gap_curves, read_map, trajectories
from csn.report.fig_windows import windows_figures
from csn.report.page import (
    Page,
    Section,
    fmt,
    fmt_g,
    fmt_pm,
    found_section,
    is_number,
    nearby,
    note_item,
    section,
    table_item,
)


@section("how early is early", order=70)
def windows_section(rep: Page) -> Section | None:
    """"How early is early": the map's verdicts, figures and per-condition table for a windows experiment; for
    another experiment (e.g. a reproduction), links to the maps found in it or beside it."""
    exp = rep.experiment
    title = "How early is early: the critical-period map"
    lead = ("The selectivity regularizer only inside a window [start, end) of training (α < 0 suppresses, α > 0 "
            "promotes), every condition with the baseline's seeds; paired harm = the baseline's final test accuracy "
            "minus the condition's, same seed (after Achille, Rovere & Soatto 2019, critical learning periods).")
    if exp is not None and (exp / "windows.parquet").is_file():
        sec = Section("windows", title, lead)
        try:
            m = read_map(exp)
        except CsnError as e:
            sec.items.append(note_item(f"the map's tables cannot be shown: {e}"))
            return sec
        table, verdicts, info, sel, acc = (m[k] for k in ("windows", "windows_verdicts", "info", "windows_selectivity",
                                                          "windows_accuracy"))
        sec.items += _windows_verdict_items(verdicts, info)
        sec.items.append(note_item(_windows_design(info)))
        sec.items += rep.draw("the critical-period map figures", lambda: windows_figures(
            table, trajectories(sel, table), gap_curves(acc), rep.out_dir))
        sec.items.append(_windows_condition_table(table))
        wall = info.get("wall_seconds", {})
        if wall:
            sec.items.append(note_item(f"Wall time of the last `csn experiment windows` call: training {fmt_g(wall.get('training'))} s, "
                                   f"selectivity {fmt_g(wall.get('selectivity'))} s ({info.get('parallel', '?')} runs at a "
                                   f"time; {len(info.get('conditions', []))} conditions x {len(info.get('seeds', []))} seeds)."))
        return sec
    near = nearby(exp, "windows_verdicts.parquet")
    if not near:
        rep.omit("How early is early", "no critical-period map: run `csn experiment windows --preset fmnist` (or "
                                       "`--preset smoke` for a first look).")
        return None
    return found_section(rep, "windows", title, lead + " Maps found with this experiment:", near, "map",
                          lambda d: _windows_verdict_items(read_map(d)["windows_verdicts"], {}))


def _windows_design(info: dict) -> str:
    """One sentence on how the map was run: learning-rate schedule, α per stage or split, accuracy at window ends."""
    cfg = info.get("train_config", {}) if isinstance(info.get("train_config"), dict) else {}
    lr = f"learning rate {cfg.get('lr_schedule', '?')}" if cfg else "learning rate not recorded"
    if info.get("reg_reduce", cfg.get("reg_reduce", "mean")) == "sum":
        alpha = "α applied in full to every regularized stage (reg_reduce=sum)"
    elif (info.get("preset") or {}).get("reg_reduce") == "mean":
        alpha = "α split over the regularized stages (reg_reduce=mean, as the map's preset declares)"
    else:
        alpha = "α split over the regularized stages (reg_reduce=mean: a map run before 2026-12-05)"
    bn = info.get("end_bn_batches")
    end = (f"accuracy at each window's end and at the end of training on the whole test split after BatchNorm "
           f"re-estimation from {bn} batches" if bn else
           "accuracy at each window's end and at the end = the checkpoints' eval-mode values (no BatchNorm re-estimation)")
    return f"Design: {lr}; {alpha}; {end}."


def _windows_verdict_items(v: pd.DataFrame | None, info: dict) -> list[dict]:
    """The verdict table per (alpha, stage set) and the declared rules in words."""
    if v is None or v.empty:
        return [note_item("no verdicts: the map has no regularized condition, or was run with --no-selectivity.")]
    pts = lambda x: fmt(100 * x, 2) if is_number(x) else "–"  # noqa: E731 - accuracy in points
    rows = [[fmt_g(r["alpha"]), r["stage_set"], r["question"], r["verdict"], f"{pts(r['estimate'])} [{pts(r['lo'])}, "
             f"{pts(r['hi'])}]", pts(r["minimal"]), pts(r["mde"]), fmt(r["rho"], 2),
             f"{100 * r['csi_change']:+.0f} %" if is_number(r["csi_change"]) else "–", r["n_seeds"]]
            for r in v.to_dict("records")]
    items = [table_item(["α", "stages", "question", "verdict", "estimate, points [95 % CI]", "minimal effect", "MDE",
                     "ρ(start, harm)", "CSI at the earliest window's end vs baseline", "seeds"],
                    rows, "Verdicts per (α, stage set) by the rules declared before the map was run "
                          "(csn.experiments.window_stats.WINDOW_RULES; ρ is a description, not a verdict).",
                    numeric=(0, 4, 5, 6, 7, 8, 9))]
    rules = [f"α < 0: {v[v['kind'] == 'suppress']['rule'].iloc[0]}" if (v["kind"] == "suppress").any() else None,
             f"α > 0: {v[v['kind'] == 'promote']['rule'].iloc[0]}" if (v["kind"] == "promote").any() else None]
    items.append({"kind": "list", "title": "Rules", "entries": [r for r in rules if r]})
    if info.get("rules"):
        items.append(note_item("Thresholds: " + ", ".join(f"{k} = {val}" for k, val in dict(info["rules"]).items()) + "."))
    return items


def _windows_dose(r: dict) -> list[str]:
    """The dose cells of a regularized condition: regularized steps, mean lr and |α| over them, CSI and η² reduction at
    the window's end (a map written before the dose was recorded shows dashes)."""
    pct = lambda x: f"{100 * float(x):.0f} %" if is_number(x) else "–"  # noqa: E731
    return [fmt_g(r.get("reg_steps_mean")), fmt(r.get("reg_mean_lr_mean"), 4), fmt_g(r.get("reg_mean_abs_alpha_mean")),
            f"{pct(r.get('csi_reduction_end_mean'))} / {pct(r.get('eta2_reduction_end_mean'))}"]


def _windows_condition_table(t: pd.DataFrame) -> dict:
    """Per condition: paired harm with both SEs and its CI, the dose, the gap at the window's end (BatchNorm
    re-estimated, and the checkpoints' eval-mode one), CSI/eta² at the window end and the end."""
    pts = lambda x: fmt(100 * x, 2) if is_number(x) else "–"  # noqa: E731
    rows = []
    for r in t.to_dict("records"):
        reg = r.get("kind", "suppress" if r["alpha"] != 0 else "baseline") != "baseline"
        ep = (f" (ep {r['start_epoch']:.3g}-{r['end_epoch']:.3g})" if is_number(r.get("start_epoch")) and
              is_number(r.get("end_epoch")) else "")
        window = (f"rewind at {r['end_step']} to {fmt_g(r.get('rewind_to_step'))}" if r.get("kind") == "rewind" else
                  f"[{r['start_step']}, {r['end_step']}){ep}")
        rows.append([r["condition"], fmt_g(r["alpha"]), window if reg else "–",
                     r["stages"] or "–", r["seeds"], fmt_pm(r["final_test_acc_mean"], r["final_test_acc_se"], 4),
                     fmt_pm(100 * r["harm_mean"], 100 * r["harm_se_paired"], 2) if reg else "–",
                     pts(r["harm_se_unpaired"]) if reg else "–",
                     f"[{pts(r.get('harm_lo'))}, {pts(r.get('harm_hi'))}]" if reg else "–",
                     pts(r.get("harm_eval_mean")) if reg else "–",
                     *(_windows_dose(r) if reg else ["–"] * 4),
                     fmt_pm(100 * r["early_gap_mean"], 100 * r["early_gap_se"], 2) if reg else "–",
                     pts(r.get("early_gap_eval_mean")) if reg else "–",
                     f"{fmt(r['csi_end_mean'])} / {fmt(r['base_csi_end_mean'])}" if reg else "–",
                     f"{fmt(r['eta2_end_mean'])} / {fmt(r['base_eta2_end_mean'])}" if reg else "–",
                     f"{fmt(r['csi_final_mean'])} / {fmt(r['base_csi_final_mean'])}" if reg else "–",
                     r["final_test_acc_per_seed"]])
    return table_item(["condition", "α", "window (steps)", "stages", "seeds", "final test acc", "paired harm, points (± paired "
                   "SE)", "unpaired SE", "harm CI", "harm, eval mode", "dose: regularized steps", "dose: mean lr", "dose: mean |α| per "
                   "stage", "dose: CSI / η² reduction at window end", "Δacc at window end, BN re-estimated",
                   "Δacc at window end, eval mode", "CSI at window end (cond / base)", "η² at window end (cond / base)",
                   "CSI at the end (cond / base)", "final acc per seed"], rows,
                  "Per condition, over seeds: harm = baseline − condition final test accuracy of the same seed (the "
                  "paired SE beside the unpaired one; CI = 95 % t interval), on the whole test split after BatchNorm "
                  "re-estimation (maps run before 2026-12-05: eval mode), the checkpoints' eval-mode harm beside it; "
                  "the dose = optimizer steps with α ≠ 0, the mean learning rate and |α| over them (α applies to every "
                  "regularized stage in full) and the CSI and "
                  "η² reduction at the window's end vs the baseline at that step; Δacc at the window's end = condition − "
                  "baseline test accuracy there, on the whole test split after BatchNorm re-estimation (the verdicts' "
                  "value; maps run before 2026-12-05 hold the eval-mode value there), beside the checkpoints' own "
                  "eval-mode value; CSI and η² are means over the live units of the regularized stages.",
                  numeric=(1, *range(4, 19)))

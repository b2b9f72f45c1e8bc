"""The configuration section: what was trained, how, with which software; BatchNorm re-estimation per analysis
table; a reproduction's protocol (reproduce.json)."""

from __future__ import annotations

import json
from pathlib import Path

from csn.analysis.registry import analysis
from csn.report.page import (
    Page,
    RunGroup,
    Section,
    epochs_label,
    join_values,
    note_item,
    section,
    steps_label,
    table_item,
)


def _reg_text(cfg: dict) -> str:
    if cfg.get("reg_schedule"):
        return f"schedule {cfg['reg_schedule']!r}"
    if cfg.get("reg_alpha"):
        layers = cfg.get("reg_layers")
        return (f"alpha {cfg['reg_alpha']:g} over epochs {cfg.get('reg_window') or 'all'}"
                f"{'; layers ' + ', '.join(layers) if layers else '; every stage but the last'}")
    return "none"


def _config_rows(cond: RunGroup) -> list[tuple[str, str]]:
    infos = [r.info for r in cond.runs]
    cfgs = [i.get("config", {}) for i in infos]
    data = [i.get("data", {}) for i in infos]

    def each(fn) -> str:
        out = []
        for i, c, d in zip(infos, cfgs, data):
            try:
                out.append(fn(i, c, d))
            except (KeyError, TypeError, ValueError):
                out.append(None)
        return join_values(out)

    ck = [i.get("checkpoint_steps") or [] for i in infos]
    ck_text = steps_label(ck[0]) if all(c == ck[0] for c in ck) else "differs between seeds"
    return [
        ("runs", ", ".join(r.name for r in cond.runs)),
        ("seeds", join_values(cond.seeds)),
        ("dataset", each(lambda i, c, d: f"{d['name']} ({d['num_train']} train / {d['num_test']} test, "
                                         f"{d['num_classes']} classes)")),
        ("model", each(lambda i, c, d: f"{c['model']} (width {c.get('width', 1)})")),
        ("training", each(lambda i, c, d: f"{c['epochs']:g} epochs × {i['steps_per_epoch']} steps/epoch "
                                          f"= {i.get('total_steps', '?')} steps, batch {c['batch_size']}")),
        ("optimizer", each(lambda i, c, d: f"SGD lr {c['lr']:g} ({c.get('lr_schedule', '?')}"
                                           f"{', warm-up ' + format(c['warmup_epochs'], 'g') + ' ep' if c.get('warmup_epochs') else ''}), "
                                           f"momentum {c.get('momentum', 0):g}, weight decay {c.get('weight_decay', 0):g}")),
        ("augmentation", each(lambda i, c, d: c.get("augment", "–"))),
        ("regularizer", each(lambda i, c, d: _reg_text(c))),
        ("checkpoint schedule", each(lambda i, c, d: c.get("checkpoints"))),
        ("checkpoint steps", f"{len(ck[0])}: {ck_text}" if ck and ck[0] else "–"),
        ("device", each(lambda i, c, d: f"{i.get('device', '?')}" + (f" × {i['world_size']}" if i.get("world_size", 1) > 1 else ""))),
        ("versions", each(lambda i, c, d: f"csn {i.get('csn_version', '?')}, torch {i.get('torch_version', '?')}, "
                                          f"python {i.get('python', '?')}")),
    ]


BN_TABLES = ("selectivity", "ablation", "linearity", "cka")
"""The analyses whose BatchNorm re-estimation the configuration section lists (their label and checkpoint column
from the analysis registry)."""


def _bn_lines(rep: Page) -> list[str]:
    """Per analysis table: at which checkpoints BatchNorm statistics were re-estimated (recorded per row)."""
    lines = []
    for name in BN_TABLES:
        entry = analysis(name)
        what, step_col = entry.label, entry.table.step
        ep_col = step_col.replace("step", "epoch")
        descs: dict[str, list[str]] = {}
        for run in rep.runs:
            df = rep.table(run, name)
            if df is None or "bn_recalibrated" not in df.columns:
                continue
            if step_col not in df.columns:
                continue
            per = df.groupby(step_col).agg(bn=("bn_recalibrated", "max"),
                                           epoch=(ep_col, "first") if ep_col in df.columns else ("bn_recalibrated", "size"))
            on = per[per["bn"] > 0]
            if on.empty:
                d = f"off at all {len(per)} checkpoints (stored running statistics)"
            else:
                batches = join_values(int(b) for b in sorted(on["bn"].unique()))
                d = (f"re-estimated from {batches} training batches at {len(on)} of {len(per)} checkpoints "
                     f"(steps {steps_label(on.index.tolist())}; epochs {epochs_label(on['epoch'].tolist())})"
                     + (", stored running statistics at the others" if len(on) < len(per) else ""))
            descs.setdefault(d, []).append(run.name)
        n_with = sum(len(v) for v in descs.values())
        for d, names in descs.items():
            who = "all runs" if len(names) == n_with == len(rep.runs) and len(rep.runs) > 1 else \
                ("" if len(rep.runs) == 1 else ", ".join(names))
            lines.append(f"{what}: BatchNorm statistics {d}" + (f" [{who}]" if who else "") + ".")
    return lines


@section("configuration", order=10)
def config_section(rep: Page) -> Section:
    sec = Section("config", "Runs, configuration and versions",
                  "What was trained, how, and with which software; BatchNorm re-estimation as recorded in each "
                  "analysis table (early checkpoints' running statistics lag the weights, see SPEC).")
    rows_by_cond = [_config_rows(c) for c in rep.conds]
    fields = [k for k, _ in rows_by_cond[0]]
    rows = [[f] + [dict(r)[f] for r in rows_by_cond] for f in fields]
    sec.items.append(table_item(["", *[c.name for c in rep.conds]], rows,
                            "Configuration per condition (values that differ between seeds are listed together)."))
    bn = _bn_lines(rep)
    if bn:
        sec.items.append({"kind": "list", "title": "BatchNorm statistics re-estimation", "entries": bn})
    sec.items.extend(_protocol(rep.experiment))
    return sec


PROTOCOL_KEYS = ("seeds", "reg_seeds", "alpha", "late_onset", "early_checkpoint", "early_epoch", "ablation_checkpoints",
                 "linearity_checkpoints", "reg_selectivity_checkpoints", "cka_checkpoints", "ablation.draws",
                 "selectivity.samples", "linearity.samples", "cka.samples")
"""The settings of a reproduction (reproduce.json) shown in the configuration section (those it holds: reg_seeds,
early_checkpoint and early_epoch are keys of earlier versions' reproductions)."""


def _protocol(experiment: Path | None) -> list[dict]:
    """The reproduction's protocol table (reproduce.json), if the experiment is a reproduction."""
    if experiment is None or not (experiment / "reproduce.json").is_file():
        return []
    try:
        rp = json.loads((experiment / "reproduce.json").read_bytes().decode("utf-8"))
        settings, study = rp.get("settings", {}), rp.get("reproduce_preset", {})
        keep = {}
        for key in PROTOCOL_KEYS:
            value: object = study
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                keep[key] = value
        keep.update(rp.get("resolved", {}))  # the study's times on this dataset (steps per epoch, late onset step)
        return [table_item(["setting", "value"], [[k, v] for k, v in {**settings, **keep}.items()],
                       "The reproduction's protocol (reproduce.json).", cls="config narrow")]
    except (ValueError, OSError, AttributeError, RecursionError):
        return [note_item(f"{experiment / 'reproduce.json'} could not be read.")]

"""The mechanism section (csn experiment windows --preset mechanism): "by which mechanism"."""

from __future__ import annotations

from csn.errors import CsnError
from csn.experiments import mechanism_stats as ms
from csn.experiments.windows import read_map
from csn.report.fig_mechanism import mechanism_figure
from csn.report.page import Page, Section, fmt, is_number, note_item, section, table_item
from csn.runs.io import read_table


@section("by which mechanism", order=72)
def mechanism_section(rep: Page) -> Section | None:
    """The mechanism study's three answers, their rules, and the curves of CSI, eta², probe accuracy and Fisher
    trace per condition; nothing for an experiment without windows_mechanism.parquet."""
    exp = rep.experiment
    if exp is None or not (exp / "windows_mechanism.parquet").is_file():
        return None
    sec = Section("mechanism", "By which mechanism: probes, Fisher information, rewinds",
                  "Suppression from step 0 and from the late onset beside rewinds of the same stages to their own "
                  "earlier weights, every condition with the baseline's seeds; three questions declared before the "
                  "study was measured (csn.experiments.mechanism_stats).")
    try:
        answers = read_table(exp / "windows_mechanism.parquet")
        curves = read_table(exp / "windows_mechanism_curves.parquet")
        table = read_map(exp)["windows"]
    except CsnError as e:
        sec.items.append(note_item(f"the mechanism tables cannot be shown: {e}"))
        return sec
    num = lambda x, nd=4: fmt(x, nd) if is_number(x) else "–"  # noqa: E731
    rows = [[r["question"], r["verdict"], f"{num(r['estimate'])} [{num(r['lo'])}, {num(r['hi'])}]", num(r["minimal"]),
             r["n_seeds"], r["observed"], r["detail"]] for r in answers.to_dict("records")]
    sec.items.append(table_item(["question", "answer", "estimate [95 % CI]", "declared bound", "seeds", "what was seen",
                                 "detail"], rows, f"Rule set {ms.RULES_VERSION}, declared {ms.RULES_DECLARED} before the "
                                "study was measured: (a) probe drop = baseline - suppressed probe accuracy at the "
                                "window's end, holds at >= the bound with its interval above 0; (b) lag = log2 of the "
                                "Fisher-peak step over the CSI-peak step (+ the first checkpoint), within +-the bound "
                                "(an equivalence test); (c) d = harm(rewind at the peak to step 0) - harm(suppression "
                                "from step 0), holds when its interval's lower end is above -the bound.",
                                numeric=(2, 3, 4)))
    if curves is not None and len(curves):
        sec.items += rep.draw("the mechanism figure", lambda: [mechanism_figure(curves, table, rep.out_dir)])
    return sec

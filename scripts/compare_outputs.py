#!/usr/bin/env python3
"""Compare two csn output trees, e.g. made by two versions of the code (a refactor must not change results):
every Parquet table (rows sorted, exact values and dtypes; paths inside the trees made relative), every
checkpoint's sha256 and metrics (manifests), and the claims of claims.json. Exit status 1 on any difference.

usage: python scripts/compare_outputs.py OLD_TREE NEW_TREE     (trees from scripts/reference_outputs.sh)"""
import json
import sys
from pathlib import Path

import pandas as pd

WALL = {"time_s"}


def tidy(df):
    df = df.drop(columns=[c for c in df.columns if c in WALL])
    cols = sorted(df.columns)
    return df[cols].sort_values(cols, kind="stable").reset_index(drop=True)


def main(old, new):
    old, new = Path(old), Path(new)
    n_tables = n_ckpt = 0
    problems = []
    for p in sorted(old.rglob("*.parquet")):
        rel = p.relative_to(old)
        if "report" in rel.parts:
            continue
        q = new / rel
        if not q.is_file():
            problems.append(f"missing in new: {rel}")
            continue
        a, b = pd.read_parquet(p), pd.read_parquet(q)
        for df, root in ((a, str(old)), (b, str(new))):  # paths recorded in a table: relative to the tree
            for c in df.columns:
                if pd.api.types.is_string_dtype(df[c]) or df[c].dtype == object:
                    df[c] = df[c].map(lambda v, r=root: v.replace(r, "ROOT") if isinstance(v, str) else v)
        try:
            pd.testing.assert_frame_equal(tidy(a), tidy(b), check_exact=True, check_like=False)
            n_tables += 1
        except AssertionError as e:
            problems.append(f"{rel}: {str(e).splitlines()[0:3]}")
    for p in sorted(new.rglob("*.parquet")):
        if "report" not in p.parts and not (old / p.relative_to(new)).is_file():
            problems.append(f"only in new: {p.relative_to(new)}")
    for m in sorted(old.rglob("manifest.jsonl")):
        rel = m.relative_to(old)
        ra = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
        rb = [json.loads(x) for x in (new / rel).read_text().splitlines() if x.strip()]
        if [(x["step"], x["sha256"], x["metrics"]) for x in ra] != [(x["step"], x["sha256"], x["metrics"]) for x in rb]:
            problems.append(f"{rel}: checkpoints differ")
        else:
            n_ckpt += len(ra)
    for c in sorted(old.rglob("claims.json")):
        rel = c.relative_to(old)
        ca, cb = json.loads(c.read_text()), json.loads((new / rel).read_text())
        same = ca["claims"] == cb["claims"] and ca["thresholds"] == cb["thresholds"]
        print(f"{rel}: claims {'identical' if same else 'DIFFER'} ({[v['verdict'] for v in cb['claims']]})")
        if not same:
            problems.append(f"{rel}: claims differ")
    print(f"{n_tables} tables identical, {n_ckpt} checkpoints identical (sha256 and metrics)")
    for p in problems:
        print("PROBLEM", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

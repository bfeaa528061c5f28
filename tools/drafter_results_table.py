"""Markdown tables from `dspark-native eval --out` JSON files (used for docs/benchmarks.md).

    python3 tools/drafter_results_table.py dspark=RUN/eval_dspark.json dflash=RUN/eval_dflash.json \
        eagle3=RUN/eval_eagle3.json [--paper [TARGET]]

--paper adds the DSpark paper's Table 1 rows for TARGET (default Qwen3-4B) and its drafters'
macro-tau ratios, from third_party/dspark_paper/table1_tau.json.
"""

import json
import os
import sys

PAPER_TABLE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "third_party", "dspark_paper", "table1_tau.json"
)


def paper_rows(target="Qwen3-4B", path=PAPER_TABLE):
    """Markdown lines: the paper's tau per benchmark and domain for ``target``, and the DSpark
    macro-tau ratios against the other drafters."""
    with open(path) as f:
        t = json.load(f)
    if target not in t["tau"]:
        sys.exit(f"--paper: no target {target!r} in {path} (have {', '.join(t['tau'])})")
    bench, rows = t["benchmarks"], t["tau"][target]
    doms = list(t["domains"])
    out = [
        f"paper, Table 1 ({target}, T = 1, block 7, static verification; tau bonus included)",
        "",
        "| drafter | " + " | ".join(bench) + " | " + " | ".join(f"{d} mean" for d in doms) + " | macro |",
        "|---" * (2 + len(bench) + len(doms)) + "|",
    ]
    macro = {}
    for name, vals in rows.items():
        by = dict(zip(bench, vals, strict=True))
        dm = [sum(by[b] for b in t["domains"][d]) / len(t["domains"][d]) for d in doms]
        macro[name] = sum(vals) / len(vals)
        out.append(
            f"| {name} | "
            + " | ".join(f"{v:.2f}" for v in vals)
            + " | "
            + " | ".join(f"{v:.2f}" for v in dm)
            + f" | **{macro[name]:.2f}** |"
        )
    if "DSpark" in macro:
        out.append("")
        out.append(
            "paper: DSpark macro tau vs "
            + ", ".join(f"{n} {100 * (macro['DSpark'] / m - 1):+.1f}%" for n, m in macro.items() if n != "DSpark")
        )
    return out


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main(argv):
    paper = None
    if "--paper" in argv:
        i = argv.index("--paper")
        nxt = argv[i + 1] if i + 1 < len(argv) and "=" not in argv[i + 1] else None
        paper = nxt or "Qwen3-4B"
        argv = argv[:i] + argv[i + (2 if nxt else 1) :]
    runs = []
    for a in argv:
        name, _, path = a.partition("=")
        if not path:
            sys.exit(f"expected NAME=EVAL.json, got {a!r}")
        with open(path) as f:
            runs.append((name, json.load(f)))
    temps = sorted({t for _, r in runs for t in r["temperatures"]}, key=float)
    domains = sorted({d for _, r in runs for t in r["temperatures"].values() for d in t["domains"]})

    print("tau (tokens per round, bonus included; static policy, every draft of the block verified)\n")
    head = " | ".join(f"{d} T={t}" for t in temps for d in domains + ["macro"])
    print(f"| drafter | {head} |")
    print("|---" * (1 + len(temps) * (len(domains) + 1)) + "|")
    macro = {}
    for name, r in runs:
        cells = []
        for t in temps:
            e = r["temperatures"].get(t)
            for d in domains:
                cells.append(_fmt(e["domains"][d]["tau"]) if e and d in e["domains"] else "-")
            m = e["overall"]["macro_tau"] if e else None
            macro[(name, t)] = m
            cells.append(f"**{_fmt(m)}**")
        print(f"| {name} | " + " | ".join(cells) + " |")
    base = runs[0][0]
    for name, _ in runs[1:]:
        ratios = []
        for t in temps:
            a, b = macro.get((base, t)), macro.get((name, t))
            ratios.append(f"T={t}: {100 * (a / b - 1):+.1f}%" if a and b else f"T={t}: -")
        print(f"\n{base} macro tau vs {name}: " + ", ".join(ratios))

    print(
        "\nconditional acceptance by draft position k (accepted | drafts < k accepted), all domains; "
        "(n) = rounds that reached k\n"
    )
    g = max(len(t["overall"]["cond_accept"]) for _, r in runs for t in r["temperatures"].values())
    print("| drafter | T | " + " | ".join(f"k={k}" for k in range(g)) + " |")
    print("|---" * (2 + g) + "|")
    for name, r in runs:
        for t in temps:
            e = r["temperatures"].get(t)
            if e:
                ca, n = e["overall"]["cond_accept"], e["overall"]["reached"]
                print(f"| {name} | {t} | " + " | ".join(f"{_fmt(a)} ({m})" for a, m in zip(ca, n, strict=True)) + " |")

    for name, r in runs:
        for t in temps:
            e = r["temperatures"].get(t)
            if not e or "confidence" not in e["overall"]:
                continue
            o = e["overall"]
            print(f"\n{name}, T={t}: confidence head per position ({o['confidence_rounds']} full-block rounds)\n")
            print("| metric | " + " | ".join(f"k={k}" for k in range(len(o["confidence"]))) + " |")
            print("|---" * (1 + len(o["confidence"])) + "|")
            variants = [("raw", o["confidence"])] + ([("STS", o["confidence_sts"])] if "confidence_sts" in o else [])
            rows = [(f"ECE of survival product, {v}", per, "ece_cum", ".3f") for v, per in variants]
            rows += [(f"ECE of c_k vs conditional acceptance, {v}", per, "ece", ".3f") for v, per in variants]
            rows += [("AUC, raw", o["confidence"], "auc", ".2f")]
            rows += [(f"Brier (survival), {v}", per, "brier_cum", ".3f") for v, per in variants]
            for label, per, key, spec in rows:
                vals = [p.get(key) for p in per]
                cells = ("-" if v is None or v != v else format(v, spec) for v in vals)
                print(f"| {label} | " + " | ".join(cells) + " |")

    if paper:
        print()
        print("\n".join(paper_rows(paper)))


if __name__ == "__main__":
    main(sys.argv[1:])

"""The README's memory table: weight + cache + activation memory per preset, resolution and precision,
COMPUTED from the shapes by runtime/memory_plan.py (not measured: no GPU ran these).

    python benchmarks/memory_table.py                 # print the Markdown table
    python benchmarks/memory_table.py --write-readme  # and replace the table between README's markers

Also writes benchmarks/results/memory_table.json (every part of every plan, in bytes).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from skyrt.runtime.memory_plan import DF_1_3B, GIB, RESOLUTIONS, plan_preset

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("self-forcing", "causvid", "longlive", "causal-forcing-framewise", "causal-forcing-chunkwise",
           "rolling-forcing", DF_1_3B)
PRECISIONS = ("fp32", "bf16", "fp8")  # fp16 is bf16's size
BEGIN, END = "<!-- memory-table:begin -->", "<!-- memory-table:end -->"


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f}"


def plans() -> dict:
    return {(p, r, q): plan_preset(p, *RESOLUTIONS[r], precision=q, text_encoder=False)
            for p in PRESETS for r in RESOLUTIONS for q in PRECISIONS}


def markdown(table: dict) -> str:
    lines = ["| preset | resolution | weights fp32 / 16-bit / fp8 | cache fp32 / 16-bit | activations fp32 / 16-bit "
             "| one stream fp32 / 16-bit / fp8 |", "|---|---|---|---|---|---|"]
    for preset in PRESETS:
        for res in RESOLUTIONS:
            row = {q: table[preset, res, q] for q in PRECISIONS}
            lines.append(
                f"| {preset} | {res} | {' / '.join(gib(row[q].weights_bytes) for q in PRECISIONS)} "
                f"| {gib(row['fp32'].cache_bytes)} / {gib(row['bf16'].cache_bytes)} "
                f"| {gib(row['fp32'].activation_bytes)} / {gib(row['bf16'].activation_bytes)} "
                f"| {' / '.join(gib(row[q].total_bytes(1)) for q in PRECISIONS)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-readme", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory_table.json")
    args = p.parse_args()
    table = plans()
    text = markdown(table)
    print(text)
    args.out.write_text(json.dumps({"computed_by": "runtime/memory_plan.py (from the shapes; not measured)",
                                    "plans": [{"preset": k[0], "resolution": k[1], **v.to_json()}
                                              for k, v in table.items()]}, indent=1) + "\n")
    if args.write_readme:
        readme = ROOT / "README.md"
        old = readme.read_text()
        if BEGIN not in old:
            raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), f"{BEGIN}\n{text}\n{END}", old, flags=re.S)
        readme.write_text(new)


if __name__ == "__main__":
    main()

"""Compare methods on the shipped tiny LLaVA and plot accuracy against cost, from Python (the same
sweep as ``vtoken bench``, smaller): python examples/compare_methods.py [--limit 100] [--out compare]"""

import argparse

from vtoken.bench import run
from vtoken.bench_plot import plot
from vtoken.bench_report import matched_cost_summary, short_table, write

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--limit", type=int, default=100, help="generated test records to answer")
parser.add_argument("--methods", default="random,pool,fastv,visionzip", help="comma separated")
parser.add_argument("--out", default="compare", help="folder for bench.md, bench.json and the plots")
args = parser.parse_args()

rows = run(methods=args.methods.split(","), budgets=["1", "1/3", "1/9"], limit=args.limit, repeats=1, batch=2,
           progress=lambda line: None, configs=[])
write(rows, args.out, "python examples/compare_methods.py")   # the tables, as vtoken bench writes them
written = plot(rows, args.out)                                 # accuracy_vs_flops.png, recall_vs_flops.png
print(short_table(rows))
print(matched_cost_summary(rows))
for row in rows:
    if row.method == "fastv" and row.budget == "1/9":           # FastV drops at LLM layer 2: 16 of 144 after it
        print(f"fastv at 1/9 keeps {row.kept_tokens:.0f} of {row.visual_tokens} tokens on average over the LLM's layers")
print("plots:", ", ".join(written.values()))

"""Compile every paper config's full-size train step for its documented TPU slice (the `# target:` line of the
config) and for 8 x H100, one after the other, and write benchmarks/results/plan_pods.json + a markdown table
(the README's pod table). Needs libtpu and the CUDA plugin (pip install -e '.[tpu,gpu]',
or folders named by BMR_PLUGIN_PATH); ~1-5 min per compile on 2 cores.

    python benchmarks/plan_pods.py [--only 2b] [--no-gpu]
"""
import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import replace_section  # noqa: E402  (benchmarks/common.py)
from bmretriever_jax.pods import podplan  # noqa: E402
from bmretriever_jax.config import load_config  # noqa: E402
from bmretriever_jax.pods.plan import resolve_model_config  # noqa: E402
from bmretriever_jax.pods.targets import parse_target  # noqa: E402

GiB = 2**30


def documented_target(path):
    with open(path) as f:
        for line in f:
            if line.startswith("# target:"):
                return line.split(":", 1)[1].split()[0]
    raise SystemExit(f"{path}: no '# target:' line")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="substring of the config names to run")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="rewrite the README's pod table from the JSON, no compile")
    a = ap.parse_args()
    out_path = os.path.join(ROOT, "benchmarks", "results", "plan_pods.json")
    rows = json.load(open(out_path)) if os.path.exists(out_path) else {}
    for path in [] if a.table_only else sorted(glob.glob(os.path.join(ROOT, "configs", "papers", "*.yaml"))):
        rel = os.path.relpath(path, ROOT)
        if a.only not in rel:
            continue
        for target in [documented_target(path)] + ([] if a.no_gpu else ["h100x8"]):
            res = podplan.run_target(rel, [], target)
            key = f"{rel} {target}"
            if "result" not in res:
                rows[key] = {"config": rel, "target": target, "error": res}
            else:
                r, run, t = res["result"], load_config(rel), parse_target(target)
                cfg = resolve_model_config(run.model.name)[0]
                fl = podplan.step_flops(cfg, run, r["mesh"][0] * r["mesh"][1])
                th = podplan.throughput(fl, run, t, 0.40)
                rows[key] = {"config": rel, "target": target, **r, "flops": fl, "at_40pct": th,
                             "usable_bytes": t.usable_bytes, "command": f"bmr plan {rel} --target {target}"}
            print(json.dumps({key: rows[key].get("memory", rows[key].get("error"))}), flush=True)
            with open(out_path, "w") as f:
                json.dump(rows, f, indent=1)
    table = markdown_table(rows)
    print(table)
    if not a.only:
        rewrite_readme(table)


def markdown_table(rows):
    """The README's table: one row per (config, target), TPU slice first, in config order."""
    head = ["| command | mesh (data, fsdp, tensor) | compiled GiB/chip / usable | fits | tokens/step computed (text) | "
            "FLOPs/step (executed) | step at 40% of peak | hours for the config's steps | compile | CPU estimate |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    body = []
    for key in sorted(rows, key=lambda k: (rows[k]["config"], rows[k]["target"].startswith("h100"))):
        r = rows[key]
        if "memory" not in r:
            body.append(f"| `bmr plan {r['config']} --target {r['target']}` | compile failed | | | | | | | | |")
            continue
        m = r["memory"]
        margin = (r["usable_bytes"] - m["peak"]) / GiB
        fits = "yes" if r["fits"] else f"**NO** ({-margin:.2f} GiB over)"
        body.append(f"| `{r['command']}` | {tuple(r['mesh'])} | {m['peak'] / GiB:.2f} / {r['usable_bytes'] / GiB:.1f} | "
                    f"{fits} | {r['flops']['tokens']:,.0f} ({_text_share(r):.0%}) | {r['flops']['executed']:.3g} | "
                    f"{r['at_40pct']['step_s']:.2f} s | {r['at_40pct']['hours']:.1f} | {r['compile_s']:.0f} s | "
                    f"{r['estimate_bytes'] / GiB:.2f} GiB ({100 * (r['estimate_bytes'] - m['peak']) / m['peak']:+.0f}%) |")
    return "\n".join(head + body)


def _text_share(r) -> float:
    """Text share of the computed tokens on the config's length profile (stored with newer rows; older, padded
    rows get it from the profile and their config, which is what they compiled)."""
    if "text_share" in r["flops"]:
        return r["flops"]["text_share"]
    from bmretriever_jax.pods.stepcompile import packing_plan

    return packing_plan(load_config(os.path.join(ROOT, r["config"])), r["mesh"][0] * r["mesh"][1])["text_share"]


def rewrite_readme(table):
    replace_section(os.path.join(ROOT, "README.md"), "pods", table)
    print("rewrote the README table")

if __name__ == "__main__":
    main()

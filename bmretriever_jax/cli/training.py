"""`bmr train` and `bmr plot`."""
from __future__ import annotations

import json

from bmretriever_jax.config import load_config
from bmretriever_jax.studies.plot import plot_run


def cmd_train(a):
    from bmretriever_jax.training import train

    run = load_config(a.config, a.overrides)
    res = train(run, quiet=a.quiet, allow_config_change=a.allow_config_change)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in res.items()}, indent=1))


def cmd_plot(a):
    print(plot_run(a.run_dir, a.out))


def add_commands(sub) -> None:
    s = sub.add_parser("train", help="contrastive training (both stages) from a YAML config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100 lora.rank=8")
    s.add_argument("--allow-config-change", action="store_true",
                   help="resume a run although its config changed (beyond steps / logging); recorded in "
                        "OUT/config_changes.jsonl")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("plot", help="loss curves (and dev NDCG@10) of a run, or of every run in a folder -> PNG")
    s.add_argument("run_dir", metavar="DIR", help="a run (holds metrics.jsonl) or a folder of runs "
                   "(runs/quickstart: a line per run, named by its path under DIR)")
    s.add_argument("--out", default=None, help="PNG path (default DIR/loss.png)")
    s.set_defaults(fn=cmd_plot)

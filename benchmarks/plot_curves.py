"""Validation NDCG@10 against training time, one line per run folder (PNG), plus a table.

    .venv/bin/python benchmarks/plot_curves.py OUT.png [LABEL=]RUN_DIR [...] [--title TEXT] [--x steps]

Reads each run's state.json (written at every validation, so a run still in progress plots too) and
labels a line with LABEL, else the run's model name (config.yaml `name`) or the folder name; runs
with the same LABEL prefix before '@' (e.g. TTDS@42, TTDS@43) share a colour. `--x steps` plots
against optimizer steps (comparable when runs shared a loaded CPU unevenly). Works for every
recipe that records `history` entries {step, epoch, train_seconds, valid{...}} (generative, dynamic,
classic, whose history holds per-epoch `seconds`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ttds.io import read_json


def curve(run: Path, x: str = "time") -> tuple[str, list[float], list[float]]:
    state = read_json(run / "state.json")
    label = run.name
    cfg = run / "config.yaml"
    if cfg.is_file():
        import yaml

        label = (yaml.safe_load(cfg.read_text()) or {}).get("name") or label
    t, ts, ys = 0.0, [], []
    for h in state.get("history", []):
        t = h["train_seconds"] if "train_seconds" in h else t + h.get("seconds", 0.0)  # classic: per-epoch seconds
        if "NDCG@10" in h.get("valid", {}):
            ts.append(h["step"] if x == "steps" else t / 60)
            ys.append(h["valid"]["NDCG@10"])
    return label, ts, ys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("runs", nargs="+", help="[LABEL=]RUN_DIR")
    ap.add_argument("--title", default="validation NDCG@10 vs training time")
    ap.add_argument("--x", choices=["time", "steps"], default="time")
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    unit = "step" if a.x == "steps" else "train minute"
    print(f"| run | validations | best valid NDCG@10 | at {unit} | last {unit} |")
    print("|---|---|---|---|---|")
    colours: dict[str, str] = {}
    for spec in a.runs:
        given, _, path = spec.rpartition("=")
        run = Path(path)
        if not (run / "state.json").is_file():
            print(f"| {run} | no state.json yet | - | - | - |")
            continue
        label, t, y = curve(run, a.x)
        label = given or label
        if not y:
            print(f"| {label} | 0 | - | - | - |")
            continue
        group = label.split("@")[0]
        line = ax.plot(t, y, marker="o", markersize=3, label=label, color=colours.get(group))[0]
        colours.setdefault(group, line.get_color())
        b = max(range(len(y)), key=y.__getitem__)
        f = ".0f" if a.x == "steps" else ".1f"
        print(f"| {label} | {len(y)} | {y[b]:.4f} | {t[b]:{f}} | {t[-1]:{f}} |")
    ax.set_xlabel("optimizer steps" if a.x == "steps" else "training time (minutes, this process)")
    ax.set_ylabel("validation NDCG@10 (sampled users)")
    ax.set_title(a.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(a.out)  # atomic: a reader never sees half a PNG
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

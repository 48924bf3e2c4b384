"""Validation NDCG@10 against training time, one line per run folder (PNG), plus a table.

    .venv/bin/python benchmarks/plot_curves.py OUT.png [LABEL=]RUN_DIR|RESULTS.json[#ROW] [...] [--title TEXT] [--x steps]

Reads each run's state.json (written at every validation, so a run still in progress plots too) and
labels a line with LABEL, else the run's model name (config.yaml `name`) or the folder name. A committed results
file (`benchmarks/results/*.json`, written by collect_runs.py or `ttds bench`) stands in for a run folder that is
gone: its row labelled ROW (default: the first) gives the curve from its `valid_history`. Runs
with the same LABEL prefix before '@' (e.g. TTDS@42, TTDS@43) share a colour. `--x steps` plots
against optimizer steps (comparable when runs shared a loaded CPU unevenly). Works for every
recipe that records `history` entries {step, epoch, train_seconds, valid{...}} (generative, dynamic,
classic, whose history holds per-epoch `seconds`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ttds.io import read_json


def history(spec: str) -> tuple[str, list[dict]] | None:
    """(default label, validation history) of a run folder or of a results-file row (`FILE.json#ROW`); None when
    the folder has no state.json yet."""
    path, _, row = spec.partition("#") if ".json" in spec else (spec, "", "")
    run = Path(path)
    if run.suffix == ".json":
        rows = read_json(run).get("rows", [])
        found = next((r for r in rows if not row or r.get("label") == row), None)
        if found is None:
            raise SystemExit(f"{run}: no row labelled {row!r} (rows: {', '.join(str(r.get('label')) for r in rows)})")
        return found.get("label") or run.stem, found.get("valid_history", [])
    if not (run / "state.json").is_file():
        return None
    label = run.name
    cfg = run / "config.yaml"
    if cfg.is_file():
        import yaml

        label = (yaml.safe_load(cfg.read_text()) or {}).get("name") or label
    return label, read_json(run / "state.json").get("history", [])


def curve(spec: str, x: str = "time") -> tuple[str, list[float], list[float]] | None:
    found = history(spec)
    if found is None:
        return None
    label, hist = found
    t, ts, ys = 0.0, [], []
    for h in hist:
        t = h["train_seconds"] if "train_seconds" in h else t + h.get("seconds", 0.0)  # classic: per-epoch seconds
        if "NDCG@10" in h.get("valid", {}):
            ts.append(h["step"] if x == "steps" else t / 60)
            ys.append(h["valid"]["NDCG@10"])
    return label, ts, ys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("runs", nargs="+", help="[LABEL=]RUN_DIR or [LABEL=]RESULTS.json[#ROW]")
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
        found = curve(path, a.x)
        if found is None:
            print(f"| {path} | no state.json yet | - | - | - |")
            continue
        label, t, y = found
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

"""Collect `ttds index build` folders (and given LC-Rec index files) into one table per dataset.

    .venv/bin/python benchmarks/index_report.py --data /work/shared/data/Games \
        --name Games runs/index-Games-item-rqvae runs/index-Games-item-lsh ... [--given]

Writes benchmarks/results/index-<name>.json and .md. Every figure is read from the folders'
stats.json / semantic.json (written by the build) or recomputed from the index files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ttds.data.readers import load_dataset
from ttds.index.base import SemanticIndex
from ttds.index.build import load_raw_codes
from ttds.index.quality import entity_texts, index_stats, semantic_check
from ttds.io import read_json, write_json, write_text
from ttds.runtime import machine_info


def fmt(v, nd=3):
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="*")
    ap.add_argument("--data", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--given", action="store_true", help="add the dataset's shipped NAME.index.json")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--note", action="append", default=[], help="a line of notes for the .md")
    a = ap.parse_args()
    ds = load_dataset(a.data)
    texts, cats = entity_texts(ds, "item")
    rows = []
    for f in a.folders:
        f = Path(f)
        conf = read_json(f / "config.json")
        idx = SemanticIndex.load(f / "index.json", conf["tower"])
        stats = index_stats(idx, load_raw_codes(f), read_json(f / "stats.json"))
        sem = read_json(f / "semantic.json") if (f / "semantic.json").is_file() else semantic_check(idx, texts, cats)
        label = f.name.removeprefix(f"index-{ds.name}-item-") + (f" ({stats.get('collisions')})" if conf["kind"] == "rqvae" else "")
        rows.append({"index": label, "folder": str(f), "backbone": conf.get("backbone"), "stats": stats, "semantic": sem})
    if a.given:
        path = Path(a.data) / f"{ds.name}.index.json"
        idx = SemanticIndex.load(path)
        rows.append({"index": "given LC-Rec index.json", "folder": str(path), "backbone": "LLaMA (LC-Rec release)",
                     "stats": index_stats(idx), "semantic": semantic_check(idx, texts, cats)})
    result = {"dataset": ds.name, "n_items": ds.n_items, "machine": machine_info(), "rows": rows}
    out = Path(a.out) / f"index-{a.name}"
    write_json(out.with_suffix(".json"), result)
    head = ("| index | coll. before | after Sinkhorn | coll. after | ID len | used codes / level | perplexity / level | encode s | fit s (epochs) "
            "| total s | Jaccard ratio (2-prefix) | category ratio |")
    lines = [f"# Semantic index on {ds.name} ({ds.n_items} items, backbone minilm)", "",
             "Collision rate = share of items whose raw ID is shared. Semantic ratio = mean over 20,000 pairs of items "
             "sharing their first 2 codes / the same over 20,000 random pairs (1.0 = no semantics).", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s, m = r["stats"], r["semantic"]
        used = "/".join(str(l["used"]) for l in s["levels"])
        ppl = "/".join(f"{l['perplexity']:.0f}" for l in s["levels"])
        fit = f"{fmt(s.get('fit_seconds'), 1)} ({s.get('epochs', '-')})" if "fit_seconds" in s else "-"
        enc = fmt(s.get("encode_seconds"), 1) + (" (cached)" if s.get("embeddings_cached") else "") if "encode_seconds" in s else "-"
        lines.append(f"| {r['index']} | {s['collision_rate_before']:.4f} | {fmt(s.get('collision_rate_sinkhorn'), 4)} | {s['collision_rate_after']:.4f} | {s['levels_after']} "
                     f"| {used} | {ppl} | {enc} | {fit} | {fmt(s.get('total_seconds'), 1) if 'total_seconds' in s else '-'} "
                     f"| {fmt(m['jaccard_ratio'], 2)} | {fmt(m['category_ratio'], 2)} |")
    mi = result["machine"]
    lines += ["", *a.note, "", f"Machine: {mi}", ""]
    write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Time per epoch: RecBole 1.2.1 SASRec against our SASRec, same data, same settings, one thread each.

RecBole is an external anchor, not a dependency of ttds: it lives in its own venv, e.g.
    python3 -m venv /work/recbole-venv
    /work/recbole-venv/bin/pip install torch==2.13.0          # first: an unpinned torch pulls a CUDA build
    /work/recbole-venv/bin/pip install recbole==1.2.1 "numpy<2" "pandas<2.3" "scipy<1.14" "setuptools<70"
(recbole 1.2.1 imports ray, which needs pkg_resources; its numpy/pandas code predates NumPy 2).

Usage (with the ttds venv):
    .venv/bin/python benchmarks/recbole_anchor.py --data ../shared/data/Instruments \
        --recbole-python /work/recbole-venv/bin/python [--epochs 2]

What it does: writes the dataset as RecBole atomic files in a temp dir (timestamp = position in the
user's sequence, so RecBole's leave-one-out split 'LS: valid_and_test' with 'order: TO' is ours),
runs RecBole's SASRec for N epochs in a subprocess of the RecBole venv (CE over all items, hidden 64,
2 layers, 2 heads, inner 256, dropout 0.5/0.5, max length 20, batch 2048 prefixes, lr 1e-3, Adam),
then `ttds train --model sasrec` for N epochs with its defaults (same model and optimiser settings;
batches of 256 windows, every position of a window is a target), and prints one table: training
seconds per epoch (wall and this process's CPU time; on a shared machine the CPU time is the fair
figure), validation NDCG@10 / HR@10 after the last epoch, and the ratio ours / RecBole.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ------------------------------------------------------------------ RecBole side (runs in the RecBole venv)


def recbole_part(data_dir: str, name: str, epochs: int) -> dict:
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    settings = {
        "data_path": data_dir, "checkpoint_dir": str(Path(data_dir) / "saved"), "use_gpu": False, "gpu_id": "",
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "MAX_ITEM_LIST_LENGTH": 20,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "train_neg_sample_args": None, "loss_type": "CE",
        "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2,
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "initializer_range": 0.02,
        "train_batch_size": 2048, "eval_batch_size": 4096, "learning_rate": 0.001, "weight_decay": 0.0,
        "epochs": epochs, "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
        "worker": 0, "show_progress": False, "seed": 42, "reproducibility": True,
    }
    config = Config(model="SASRec", dataset=name, config_dict=settings)
    torch.set_num_threads(1)
    init_seed(config["seed"], config["reproducibility"])
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train_data, valid_data, _ = data_preparation(config, dataset)
    prep = time.perf_counter() - t0
    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    wall, cpu = [], []
    for epoch in range(epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer._train_epoch(train_data, epoch, show_progress=False)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print(f"recbole epoch {epoch + 1}: {wall[-1]:.1f} s wall, {cpu[-1]:.1f} s CPU", file=sys.stderr, flush=True)
    valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    return {"wall": wall, "cpu": cpu, "prep_seconds": prep, "threads": torch.get_num_threads(),
            "users": dataset.user_num - 1, "items": dataset.item_num - 1, "train_samples": len(train_data.dataset),
            "valid": {"NDCG@10": float(valid["ndcg@10"]), "HR@10": float(valid["hit@10"])}}


# ------------------------------------------------------------------ ttds side


def write_atomic(data: str, out: Path) -> str:
    from ttds.data.readers import load_dataset

    ds = load_dataset(data)
    (out / ds.name).mkdir(parents=True, exist_ok=True)
    with open(out / ds.name / f"{ds.name}.inter", "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, seq in enumerate(ds.sequences):
            for t, i in enumerate(seq):
                f.write(f"{u}\t{i}\t{t}\n")
    return ds.name


def ours_part(data: str, out: Path, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "ttds", "train", "--model", "sasrec", "--data", data, "--out", str(out),
           "--set", "threads=1", "--set", f"train.epochs={epochs}", "--set", "train.patience=1000"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"ttds train failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    state = json.loads((out / "state.json").read_text())
    last = state["history"][-1]["valid"]
    return {"wall": state["epoch_seconds"], "cpu": state["epoch_cpu_seconds"],
            "valid": {"NDCG@10": last["NDCG@10"], "HR@10": last["HR@10"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/Instruments")
    ap.add_argument("--recbole-python", default="/work/recbole-venv/bin/python")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--recbole-part", nargs=2, metavar=("DIR", "NAME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.recbole_part:  # inside the RecBole venv: one JSON line on stdout
        print(json.dumps(recbole_part(args.recbole_part[0], args.recbole_part[1], args.epochs)))
        return

    with tempfile.TemporaryDirectory(prefix="recbole-anchor-") as tmp:
        tmp = Path(tmp)
        name = write_atomic(args.data, tmp / "atomic")
        proc = subprocess.run([args.recbole_python, __file__, "--epochs", str(args.epochs),
                               "--recbole-part", str(tmp / "atomic"), name], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"RecBole run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rb = json.loads(proc.stdout.strip().splitlines()[-1])
        ours = ours_part(args.data, tmp / "ours", args.epochs)

    def mean(xs):
        return sum(xs) / len(xs)

    print(f"SASRec, CE over all items, hidden 64, 2 layers, max length 20, lr 1e-3, 1 thread, {args.epochs} epochs "
          f"on {name} ({rb['users']} users, {rb['items']} items; RecBole: {rb['train_samples']} training prefixes, "
          f"data preparation {rb['prep_seconds']:.0f} s, not counted)")
    print()
    print("| implementation | batch | s/epoch (wall) | CPU s/epoch | valid NDCG@10 | valid HR@10 |")
    print("|---|---|---|---|---|---|")
    print(f"| RecBole 1.2.1 | 2048 prefixes | {mean(rb['wall']):.1f} | {mean(rb['cpu']):.1f} | "
          f"{rb['valid']['NDCG@10']:.4f} | {rb['valid']['HR@10']:.4f} |")
    print(f"| ttds | 256 windows | {mean(ours['wall']):.1f} | {mean(ours['cpu']):.1f} | "
          f"{ours['valid']['NDCG@10']:.4f} | {ours['valid']['HR@10']:.4f} |")
    print(f"| ratio ttds / RecBole | | {mean(ours['wall']) / mean(rb['wall']):.2f} | "
          f"{mean(ours['cpu']) / mean(rb['cpu']):.2f} | | |")


if __name__ == "__main__":
    main()

"""Load time and encode throughput of the offline backbones (converts SmolLM2 once if needed).

    .venv/bin/python benchmarks/backbone_load.py [minilm smollm2-135m ...]
"""
import sys
import time

import torch

from ttds.backbone import Backbone
from ttds.backbone.registry import cache_dir


def main(names):
    torch.set_num_threads(2)
    texts = [f"Title: Wireless Gaming Controller model {i} Brand: HyperGrip Categories: Video Games" for i in range(128)]
    print(f"{'backbone':<16}{'first load s':>14}{'load s':>10}{'d':>6}{'encode texts/s':>16}")
    for name in names:
        converted = (cache_dir() / "models" / name / "config.json").is_file()
        t = time.perf_counter()
        Backbone.load(name)
        first = time.perf_counter() - t
        t = time.perf_counter()
        bb = Backbone.load(name)
        again = time.perf_counter() - t
        bb.encode(texts[:8])
        t = time.perf_counter()
        bb.encode(texts, batch_size=64)
        rate = len(texts) / (time.perf_counter() - t)
        ids = bb.add_tokens(["<a_3>"])
        enc = bb.tokenizer("bought <a_3>", add_special_tokens=False)["input_ids"]
        whole = enc[-1] == ids[0] and len(enc) == len(bb.tokenizer("bought", add_special_tokens=False)["input_ids"]) + 1
        note = ("" if whole else "  STRAY TOKEN before an added ID")
        note += "" if converted or name == "minilm" else " (incl. GGUF conversion)"
        print(f"{name:<16}{first:>14.1f}{again:>10.2f}{bb.hidden_size:>6}{rate:>16.1f}{note}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["minilm", "smollm2-135m"])

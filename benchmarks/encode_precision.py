"""Re-encoding item texts in fp32 against bf16 autocast, side by side: what a TTDS re-assignment costs
(`ttds.train.dynamic.refresh_text` encodes under the training's precision) and how far the vectors move.

    PYTHONPATH=src .venv/bin/python benchmarks/encode_precision.py --data ../shared/data/Scientific \
        --set backbone.name_or_path=smollm2-135m --set backbone.num_layers=10 --items 1024 --threads 1

The texts are the item tower's inputs of a `ttds` run with those settings (index.options: template, truncation);
`--items` takes the first N of them (0: all). Prints one table row per precision and the cosine between the two
(plain, and centred on the fp32 mean: the part of X the RQ-VAE quantises).
"""
import argparse
import time

import torch

from ttds.config import load_config
from ttds.data.readers import load_dataset
from ttds.index.build import index_config, tower_inputs
from ttds.runtime import has_fast_bf16, machine_info
from ttds.train.generative import _backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (ttds model)")
    ap.add_argument("--items", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(model="ttds", overrides=a.set)
    ds = load_dataset(a.data)
    bb = _backbone(cfg, "cpu")
    bb.model.eval()
    texts = tower_inputs(ds, "item", index_config(cfg), bb.tokenizer)
    texts = texts[:a.items] if a.items > 0 else texts
    tokens = sum(len(ids) for ids in bb.tokenizer(texts, truncation=True, max_length=bb.cfg.max_text_tokens)["input_ids"])
    m = machine_info()
    print(f"# {m['cpu']}, {m['cores']} cores, torch {m['torch']}; bf16 units: {has_fast_bf16(torch.device('cpu'))}; "
          f"{a.threads} thread(s)")
    print(f"# {a.data}: {len(texts)} item texts, {tokens} tokens; backbone {bb.cfg.name_or_path}, "
          f"{bb.hf_model.config.num_hidden_layers} layers, d={bb.hidden_size}")
    print("\n| precision | seconds | texts/s | tokens/s |\n|---|---|---|---|")
    out = {}
    bb.encode(texts[:8], progress=False)  # warm-up
    for prec in ("fp32", "bf16"):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
            out[prec] = bb.encode(texts, progress=False)
        s = time.perf_counter() - t
        print(f"| {prec} | {s:.1f} | {len(texts) / s:.1f} | {tokens / s:.0f} |")
    mu = out["fp32"].mean(0)  # centred too: a causal LM's mean-pooled states share a few huge dimensions
    for name, shift in (("cosine", 0.0), ("centred cosine", mu)):
        cos = torch.nn.functional.cosine_similarity(out["fp32"] - shift, out["bf16"] - shift, dim=1)
        print(f"{name}(fp32, bf16) per item: mean {cos.mean():.5f}, min {cos.min():.5f}")


if __name__ == "__main__":
    main()

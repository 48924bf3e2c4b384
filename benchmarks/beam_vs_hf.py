"""This engine's constrained beam search vs. HF `generate(num_beams=20, prefix_allowed_tokens_fn=...)`.

Same trained model, same prompts, side by side in one run:
  HF      batch 1 (LC-Rec's way): `generate` with the trie as `prefix_allowed_tokens_fn`; the model
          is exposed to HF through a thin adapter whose logits are the model's own ID-head logits
          for the level being generated (-inf elsewhere), so both engines score identically.
  ttds    `beam_search_prompts`: users and beams batched, prompt once (shared prefix once per call),
          one KV cache row per user with tree attention over the beams.
Prints a table: users/s of each, the speed ratio, and how many top-10 lists are identical.

    python benchmarks/beam_vs_hf.py --model-dir runs/lcrec-Scientific --data /work/shared/data/Scientific --users 30
    python benchmarks/beam_vs_hf.py --model-dir runs/x --data D --full-test     # also time the whole test set
    python benchmarks/beam_vs_hf.py --model-dir runs/x --data D --precision bf16  # both engines under bf16 autocast
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def hf_adapter(rec):
    """A `GenerationMixin` model around a GenerativeRecommender: full-vocabulary logits that are
    the ID head's logits of the next level (decided by the last input token) and -inf elsewhere."""
    from transformers import GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    import copy

    # the output's KV-cache field: `cache` from transformers 5.24 on, `past_key_values` before
    CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

    base_config = copy.deepcopy(rec.backbone.hf_model.config)  # HF edits the config it is given

    class Adapter(PreTrainedModel, GenerationMixin):
        config_class = type(base_config)
        base_model_prefix = "rec"
        _supports_cache_class = True
        _supports_sdpa = True

        def __init__(self):
            super().__init__(base_config)
            self.rec = rec
            self.vocab = rec.n_words + rec.n_id_tokens + 1  # + an end token for short IDs (`hf_recommend`)
            self.n_item_levels = len(rec.item_index.level_sizes)
            self.prompt_len = 0  # set by `hf_recommend`: the level of the next token = tokens generated so far

        def get_input_embeddings(self):
            return self.rec.backbone.hf_model.get_input_embeddings()

        def forward(self, input_ids, attention_mask=None, past_key_values=None, position_ids=None, use_cache=True,
                    cache_position=None, cache=None, **kwargs):
            past_key_values = cache if cache is not None else past_key_values  # transformers >= 5.24 names it `cache`
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            if attention_mask is None or attention_mask.shape[1] != past + input_ids.shape[1]:
                # HF hands only the new tokens' mask slice during decoding; prompts here are unpadded
                attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long)
            if position_ids is None:
                position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            h, pkv = self.rec.hidden(input_ids, attention_mask, position_ids, past_key_values, use_cache=True)
            # the level of the next token is the number of tokens generated so far (not read off the last token: a
            # prompt ends with its last history item's ID, whose last token is level 3 when the ID is short)
            g = past + input_ids.shape[1] - self.prompt_len
            logits = torch.full((len(input_ids), 1, self.vocab), float("-inf"))
            if 0 <= g < self.n_item_levels:
                s, k = self.rec.n_words + self.rec.offsets[g], self.rec.groups[g][2]
                logits[:, 0, s:s + k] = self.rec.level_logits(h[:, -1], g).float()
            return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: pkv})

    return Adapter().eval()


def hf_recommend(adapter, rec, prompt: np.ndarray, beam: int, k: int) -> list[int]:
    """HF `generate(num_beams=beam)` at batch 1, constrained by the trie through a logits processor on the
    log-probabilities (what `prefix_allowed_tokens_fn` does). A short ID (no disambiguation token) ends with an
    end token of log-probability 0, so a finished beam keeps its score, as in this engine's beam search."""
    from transformers import LogitsProcessor, LogitsProcessorList

    trie, L, V = rec.trie, rec.trie.n_levels, rec.n_words
    P = len(prompt)
    offs = np.asarray(rec.offsets[:L])
    end = adapter.vocab - 1
    short = bool((rec.item_index.codes[:, -1] < 0).any())

    class TrieMask(LogitsProcessor):
        def __call__(self, input_ids, scores):
            t = input_ids.shape[1] - P
            out = torch.full_like(scores, float("-inf"))
            for row, ids in enumerate(input_ids):
                if t and int(ids[-1]) == end:  # finished: only the end token again (HF pads after it)
                    out[row, end] = 0.0
                    continue
                codes = (ids[P:] - V - torch.as_tensor(offs[:t])).unsqueeze(0)
                node = trie.nodes_of(codes)
                if t and int(trie.ends(node, t)[0]) >= 0:  # a short ID ends here: stay, score unchanged
                    out[row, end] = 0.0
                elif t < L:
                    allowed = torch.nonzero(trie.allowed(node, t)[0]).squeeze(1) + V + int(offs[t])
                    out[row, allowed] = scores[row, allowed]
            return out

    ids = torch.as_tensor(prompt).unsqueeze(0)
    adapter.prompt_len = P
    out = adapter.generate(ids, attention_mask=torch.ones_like(ids), num_beams=beam, num_return_sequences=k,
                           max_new_tokens=L, min_new_tokens=None if short else L, logits_processor=LogitsProcessorList([TrieMask()]),
                           do_sample=False, early_stopping=True, length_penalty=0.0, eos_token_id=end if short else None,
                           pad_token_id=end if short else 0, use_cache=True)
    gen = out[:, P:]
    if gen.shape[1] < L:  # every returned ID is short
        gen = torch.cat([gen, gen.new_full((len(gen), L - gen.shape[1]), end)], 1)
    codes = torch.where(gen == end, torch.full_like(gen, -1), gen - V - torch.as_tensor(offs))
    codes[:, :-1] = codes[:, :-1].clamp(min=0)  # an end token before the last level cannot come out
    return rec.trie.entities(codes).tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--users", type=int, default=30, help="test users compared (HF at batch 1 is slow)")
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32, help="users per forward of this engine")
    ap.add_argument("--engine-users", type=int, default=1000, help="test users timed for this engine")
    ap.add_argument("--full-test", action="store_true", help="also time this engine on every test user")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="both engines' precision (bf16: torch autocast, as eval.precision=bf16)")
    ap.add_argument("--out", default="benchmarks/results/beam_vs_hf.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ttds.data.dataset import leave_one_out
    from ttds.data.readers import load_dataset
    from ttds.io import write_json
    from ttds.models.beam import beam_search_prompts
    from ttds.recipes import load_model, run_config

    cfg = run_config(args.model_dir)
    _, rec = load_model(args.model_dir, "cpu")
    ds = load_dataset(args.data)
    test = leave_one_out(ds, int(cfg["data"]["max_history"])).test
    rng = np.random.default_rng(0)
    pick = rng.choice(len(test), min(args.users, len(test)), replace=False)
    prompts = rec.prompts(test.users[pick], test.history[pick])
    adapter = hf_adapter(rec)

    bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with torch.no_grad(), bf16:
        hf_recommend(adapter, rec, prompts[0], args.beam, args.k)  # warm-up
        t, c = time.perf_counter(), time.process_time()
        hf_lists = [hf_recommend(adapter, rec, p, args.beam, args.k) for p in prompts]
        hf_s, hf_cpu = time.perf_counter() - t, time.process_time() - c
        t = time.perf_counter()
        ours, _ = beam_search_prompts(rec, prompts, rec.trie, 0, args.beam, args.k, args.batch)
        ours_small_s = time.perf_counter() - t
        # throughput of this engine on a larger sample (batching needs users to batch)
        m = min(args.engine_users, len(test))
        big = rec.prompts(test.users[:m], test.history[:m])
        t, c = time.perf_counter(), time.process_time()
        beam_search_prompts(rec, big, rec.trie, 0, args.beam, args.k, args.batch)
        ours_s, ours_cpu = time.perf_counter() - t, time.process_time() - c
    same = sum(a == b for a, b in zip(hf_lists, ours.tolist()))
    same_set = sum(set(a) == set(b) for a, b in zip(hf_lists, ours.tolist()))
    res = {
        "model_dir": str(args.model_dir), "dataset": ds.name, "beam": args.beam, "k": args.k, "threads": args.threads,
        "precision": args.precision,
        "compared_users": len(prompts), "identical_top10_lists": same, "identical_top10_sets": same_set,
        "hf_batch1_users_per_s": len(prompts) / hf_s,
        "ttds_users_per_s_same_sample": len(prompts) / ours_small_s,
        "ttds_users_per_s": m / ours_s, "ttds_timed_users": m,
        "speedup": (m / ours_s) / (len(prompts) / hf_s),
        # per CPU-second of this process: less sensitive to other load on a shared machine
        "hf_batch1_users_per_cpu_s": len(prompts) / hf_cpu, "ttds_users_per_cpu_s": m / ours_cpu,
        "speedup_cpu": (m / ours_cpu) / (len(prompts) / hf_cpu),
        "mean_prompt_tokens": float(np.mean([len(p) for p in big])),
        "load_average_1m_at_end": os.getloadavg()[0],  # shared machines: read absolute speeds with this
    }
    if args.full_test:
        allp = rec.prompts(test.users, test.history)
        t = time.perf_counter()
        with torch.no_grad(), bf16:
            beam_search_prompts(rec, allp, rec.trie, 0, args.beam, args.k, args.batch)
        res["full_test_users"] = len(allp)
        res["full_test_seconds"] = time.perf_counter() - t
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, res)
    print(f"{'engine':<34}{'users/s':>10}")
    print(f"{'HF generate, batch 1':<34}{res['hf_batch1_users_per_s']:>10.2f}")
    print(f"{'ttds beam search (batched)':<34}{res['ttds_users_per_s']:>10.2f}")
    print(f"speed-up x{res['speedup']:.1f} (wall), x{res['speedup_cpu']:.1f} (per CPU-second); identical top-{args.k} lists {same}/{len(prompts)} (same sets {same_set})")
    if args.full_test:
        print(f"full test set: {res['full_test_users']} users in {res['full_test_seconds'] / 60:.1f} min")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

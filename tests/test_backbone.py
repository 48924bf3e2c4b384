"""Backbone wrapper: offline loading, encoding, added tokens, LoRA, save/load, item/user texts."""
import os

import pytest
import torch

from ttds.backbone import Backbone, BackboneConfig, item_texts, user_texts
from ttds.backbone.registry import cache_dir
from ttds.errors import TTDSError
from ttds.io import read_json, write_json


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm():
    return Backbone.load("minilm")


def test_minilm_encodes_offline(minilm):
    texts = ["Wireless Gaming Controller", "Wired Gaming Gamepad Controller", "Borosilicate Lab Beaker 500 ml"]
    a = minilm.encode(texts)
    assert a.shape == (3, 384) and a.dtype == torch.float32
    b = minilm.encode(texts, batch_size=1)  # batching and padding do not change the result
    assert torch.allclose(a, b, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity
    assert cos(a[0], a[1], dim=0) > cos(a[0], a[2], dim=0) + 0.1
    assert not minilm.is_causal_lm and minilm.hidden_size == 384


def test_add_tokens_grows_vocab_and_tokenizes_whole():
    bb = Backbone.load("minilm")
    n = len(bb.tokenizer)
    ids = bb.add_tokens(["<a_1>", "<b_2>", "<a_1>"])
    assert len(bb.tokenizer) == n + 2 and ids[0] == ids[2] and ids[0] != ids[1]
    assert bb.model.get_input_embeddings().weight.shape[0] == n + 2
    enc = bb.tokenizer("bought <a_1><b_2>", add_special_tokens=False)["input_ids"]
    assert enc[-2:] == ids[:2] and len(enc) == 3  # no stray space token before the ID
    assert bb.add_tokens(["<a_1>"]) == ids[:1] and len(bb.tokenizer) == n + 2  # idempotent


def test_lora_trains_new_rows_only(tmp_path):
    bb = Backbone.load(BackboneConfig(name_or_path="minilm", lora={"r": 4}))
    new = bb.add_tokens(["<a_1>", "<a_2>"])
    old_ids = bb.tokenizer.convert_tokens_to_ids(["game", "controller"])
    emb = lambda ids: bb.model.get_input_embeddings()(torch.tensor(ids)).detach().clone()  # noqa: E731
    before_new, before_old = emb(new), emb(old_ids)
    bb.apply_lora(new)
    frozen = {n: p.detach().clone() for n, p in bb.model.named_parameters() if not p.requires_grad}
    assert any(n.endswith("query.base_layer.weight") for n in frozen)
    assert bb.lora_applied and bb.hidden_size == 384
    trainable = [n for n, p in bb.model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    assert not any(n.endswith("query.base_layer.weight") for n in trainable)
    bb.model.train()
    opt = torch.optim.SGD([p for p in bb.model.parameters() if p.requires_grad], lr=1.0)
    out = bb.encode(["game <a_1> controller <a_2>"], grad=True)
    (out ** 2).sum().backward()
    opt.step()
    assert not torch.allclose(emb(new), before_new)  # new rows moved
    assert torch.allclose(emb(old_ids), before_old)  # old rows frozen
    assert all(torch.equal(p, frozen[n]) for n, p in bb.model.named_parameters() if n in frozen)
    # round trip: adapter + added tokens
    bb.model.eval()
    ref = bb.encode(["game <a_1> controller"])
    bb.save_pretrained(tmp_path / "bb")
    back = Backbone.from_pretrained(tmp_path / "bb")
    assert torch.allclose(back.encode(["game <a_1> controller"]), ref, atol=1e-5)


def test_missing_model_is_one_line_error(tmp_path):
    with pytest.raises(TTDSError, match="config.json"):
        Backbone.load(str(tmp_path / "nope"))
    with pytest.raises(TTDSError, match="dtype"):
        BackboneConfig(dtype="int3")


def test_any_local_llama_folder(tmp_path, minilm):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = minilm.tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    bb = Backbone.load(str(tmp_path / "llama"))
    assert bb.is_causal_lm and bb.hidden_size == 32
    assert bb.encode(["a b c", "d"]).shape == (2, 32)
    ids = bb.add_tokens(["<a_0>", "<b_0>"])
    assert bb.model.get_output_embeddings().weight.shape[0] == len(bb.tokenizer)
    x = torch.tensor([[5, 6, ids[0]]])
    h, past = bb.hidden_states(x, torch.ones_like(x), use_cache=True)
    assert h.shape == (1, 3, 32) and past is not None


def test_num_layers_keeps_the_first_pretrained_layers(tmp_path, minilm, caplog):
    from ttds.index.build import embedding_key

    with caplog.at_level("INFO"):
        cut = Backbone.load(BackboneConfig(num_layers=2))
    assert len(cut.body.encoder.layer) == 2 and cut.hf_model.config.num_hidden_layers == 2
    assert any("checkpoint weights unused (encoder.layer.2." in r.getMessage() for r in caplog.records)
    x = minilm.tokenizer(["Wireless Gaming Controller"], return_tensors="pt")
    with torch.no_grad():  # the cut model is the full model's first two layers, pretrained weights and all
        full = minilm.body(**x, output_hidden_states=True).hidden_states[2]
        assert torch.allclose(cut.body(**x).last_hidden_state, full, atol=1e-5)
    assert embedding_key(cut, ["a"]) != embedding_key(minilm, ["a"])  # cached text embeddings are per depth
    threads = torch.get_num_threads()
    key = embedding_key(minilm, ["a"])
    try:  # ... and per thread count (the float sums differ), so a run never reads another thread count's vectors
        torch.set_num_threads(threads % 2 + 1)
        assert embedding_key(minilm, ["a"]) != key
    finally:
        torch.set_num_threads(threads)
    assert embedding_key(minilm, ["a"]) == key
    cut.save_pretrained(tmp_path / "cut")
    assert len(Backbone.from_pretrained(tmp_path / "cut").body.encoder.layer) == 2
    with pytest.raises(TTDSError, match="num_layers=7: the model at .* has only 6 layers"):
        Backbone.load(BackboneConfig(num_layers=7))
    for bad in (0, "2", True):
        with pytest.raises(TTDSError, match="backbone.num_layers"):
            BackboneConfig(num_layers=bad)


def test_load_report_is_one_line(caplog, tmp_path, minilm):
    """transformers' load report (a key table, logged as a warning) becomes one INFO line when only the expected
    weights are missing: the fresh LM head of a BERT loaded as a decoder. Weights that do not fit the config are
    one error line, after transformers' report (which names the keys)."""
    with caplog.at_level("INFO"):
        Backbone.load(BackboneConfig(causal=True))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # transformers' records propagate here
    lines = [r.getMessage() for r in caplog.records if "newly initialised" in r.getMessage()]
    assert len(lines) == 1 and "in the output head (cls.predictions." in lines[0] and "pooler.dense" in lines[0]
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=len(minilm.tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bad")
    minilm.tokenizer.save_pretrained(tmp_path / "bad")
    cfg = read_json(tmp_path / "bad" / "config.json", "config.json")
    write_json(tmp_path / "bad" / "config.json", {**cfg, "hidden_size": 64, "intermediate_size": 128})
    caplog.clear()
    with pytest.raises(TTDSError, match="its weights do not fit its config.json"):
        Backbone.load(str(tmp_path / "bad"))
    assert any("LOAD REPORT" in r.getMessage() and "MISMATCH" in r.getMessage() for r in caplog.records)


def test_kv_cache_under_both_transformers_names():
    """transformers 5.24 renamed the forward argument and output field `past_key_values` to `cache`; run_body
    passes and reads the cache under whichever name the installed model takes."""
    from types import SimpleNamespace

    from ttds.backbone.backbone import run_body

    class NewBody(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=False, return_dict=True):
            return SimpleNamespace(last_hidden_state=input_ids.float(), cache=(cache or 0) + 1 if use_cache else None)

    class OldBody(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=False, return_dict=True):
            return SimpleNamespace(last_hidden_state=input_ids.float(),
                                   past_key_values=(past_key_values or 0) + 1 if use_cache else None)

    x = torch.ones(1, 2, dtype=torch.long)
    for body in (NewBody(), OldBody()):
        h, cache = run_body(body, input_ids=x, use_cache=True)
        assert h.shape == (1, 2) and cache == 1
        assert run_body(body, cache=cache, use_cache=True, input_ids=x)[1] == 2  # the cache went in
        assert run_body(body, input_ids=x).shape == (1, 2)


def test_causal_bert_option():
    bb = Backbone.load(BackboneConfig(causal=True))
    assert bb.is_causal_lm and bb.body.config.is_decoder


@pytest.mark.skipif(not os.environ.get("TTDS_SLOW_TESTS") or not (cache_dir() / "models" / "smollm2-135m" / "config.json").is_file(),
                    reason="slow (1-60 s on a shared CPU; conversion ~30 s once): set TTDS_SLOW_TESTS=1, "
                           "or run benchmarks/backbone_load.py")
def test_smollm2_converted_copy_loads():
    bb = Backbone.load("smollm2-135m")
    assert bb.is_causal_lm and bb.hidden_size == 576
    ids = bb.add_tokens(["<a_3>"])
    assert bb.tokenizer("bought <a_3>", add_special_tokens=False)["input_ids"][-1] == ids[0]
    assert len(bb.tokenizer("bought <a_3>", add_special_tokens=False)["input_ids"]) == 2  # no stray space


def test_item_and_user_texts():
    from ttds.data.readers import load_dataset

    ds = load_dataset("builtin:users=40,items=30,seed=2")
    ds.item_text["brand"][0] = ""
    texts = item_texts(ds, "Title: {title}\nBrand: {brand}")
    assert len(texts) == ds.n_items and "Brand:" not in texts[0] and texts[0].startswith("Title: ")
    tok = Backbone.load("minilm").tokenizer
    short = item_texts(ds, "{title} {description}", tok, max_tokens=4)
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 4 for t in short)
    with pytest.raises(TTDSError, match="price"):
        item_texts(ds, "{price}")
    users = user_texts(ds)
    assert len(users) == ds.n_users and all(users)
    for u in range(ds.n_users):  # the texts about held-out items are left out
        held = set(ds.sequences[u][-2:].tolist())
        kept = [t.text for t in ds.user_text[u] if t.item not in held]
        assert users[u] == " ".join(kept)


def test_scratch_init_takes_the_architecture_not_the_weights(tmp_path, minilm):
    """`backbone.init: scratch` (TIGER): the folder's architecture family and tokenizer, changed by `backbone.arch`,
    with random weights drawn from the run's seed; its text embeddings are refused for an index."""
    torch.manual_seed(0)
    a = Backbone.load(BackboneConfig(init="scratch", arch={"hidden_size": 32, "num_hidden_layers": 2,
                                                            "num_attention_heads": 2, "intermediate_size": 64}))
    assert a.hidden_size == 32 and len(a.body.encoder.layer) == 2
    assert a.tokenizer.get_vocab() == minilm.tokenizer.get_vocab()
    same = Backbone.load(BackboneConfig(init="scratch"))  # scratch without arch: MiniLM's shapes, other weights
    w, w0 = same.hf_model.get_input_embeddings().weight, minilm.hf_model.get_input_embeddings().weight
    assert w.shape == w0.shape and not torch.allclose(w, w0)
    torch.manual_seed(0)
    b = Backbone.load(BackboneConfig(init="scratch", arch={"hidden_size": 32, "num_hidden_layers": 2,
                                                            "num_attention_heads": 2, "intermediate_size": 64}))
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n  # the seed decides the weights
    a.save_pretrained(tmp_path / "a")  # a trained scratch model reloads as saved (arch from its config.json)
    back = Backbone.from_pretrained(tmp_path / "a")
    assert back.hidden_size == 32 and torch.equal(back.hf_model.get_input_embeddings().weight,
                                                  a.hf_model.get_input_embeddings().weight)
    with pytest.raises(TTDSError, match="backbone.arch.hiden_size: the bert config .* has no such field"):
        Backbone.load(BackboneConfig(init="scratch", arch={"hiden_size": 32}))
    with pytest.raises(TTDSError, match="hidden_size 30 is not a multiple of num_attention_heads 12"):
        Backbone.load(BackboneConfig(init="scratch", arch={"hidden_size": 30}))
    with pytest.raises(TTDSError, match="backbone.arch: .* needs backbone.init=scratch"):
        BackboneConfig(arch={"hidden_size": 32})
    with pytest.raises(TTDSError, match="backbone.init='random'"):
        BackboneConfig(init="random")
    from ttds.data.readers import load_dataset
    from ttds.index.build import IndexConfig, tower_vectors

    with pytest.raises(TTDSError, match="set index.options.encoder"):
        tower_vectors(load_dataset("builtin:users=20,items=20"), "item", IndexConfig(), a)

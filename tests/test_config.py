"""Layered config: defaults < model < dataset < user file < CLI overrides; resolved config is written."""
import pytest
import yaml

from ttds.config import CONFIG_DIR, flatten, load_config, merge, parse_override
from ttds.errors import TTDSError
from ttds.runtime import start_run


def test_layers_in_order(tmp_path, monkeypatch):
    cfgdir = tmp_path / "configs"
    (cfgdir / "models").mkdir(parents=True)
    (cfgdir / "datasets").mkdir()
    (cfgdir / "defaults.yaml").write_text("a: 0\nb: 0\nc: 0\nd: 0\ntrain: {lr: 0.1, epochs: 3}\n")
    (cfgdir / "models" / "m.yaml").write_text("b: 1\nc: 1\nd: 1\ntrain: {lr: 0.2}\n")
    (cfgdir / "datasets" / "games.yaml").write_text("c: 2\nd: 2\n")
    user = tmp_path / "user.yaml"
    user.write_text("d: 3\n")
    monkeypatch.setattr("ttds.config.CONFIG_DIR", cfgdir)
    cfg = load_config("m", "Games", user, ["train.lr=1e-3", "a=[1, 2]"])
    assert (cfg["a"], cfg["b"], cfg["c"], cfg["d"]) == ([1, 2], 1, 2, 3)
    assert cfg["train"] == {"lr": 0.001, "epochs": 3}


def test_unknown_top_level_key_is_one_clear_error(tmp_path):
    with pytest.raises(TTDSError, match=r"--set bogus.key=1: unknown top-level config key 'bogus'; expected one of .*train"):
        load_config("ttss", overrides=["bogus.key=1"])
    user = tmp_path / "user.yaml"
    user.write_text("trian: {lr: 0.1}\n")
    with pytest.raises(TTDSError, match=r"user.yaml: unknown top-level config key 'trian'"):
        load_config("ttss", file=user)
    # every key a shipped layer declares passes, and a written run config reads back (it carries `name`)
    cfg = load_config("ttds", overrides=["dist.strategy=fsdp", "name=ttds"])
    user.write_text(yaml.safe_dump(cfg))
    assert load_config(file=user) == cfg


def test_section_of_another_model_is_kept_but_logged_as_ignored(caplog):
    cfg = load_config("ttss", overrides=["dynamic.refresh_text=false"])
    assert cfg["dynamic"] == {"refresh_text": False}
    assert "config section 'dynamic': not a setting of model 'ttss'; ignored" in caplog.text
    caplog.clear()
    load_config("ttds", overrides=["dynamic.refresh_text=false"])
    assert "ignored" not in caplog.text


def test_model_base_layer(tmp_path, monkeypatch):
    cfgdir = tmp_path / "configs"
    (cfgdir / "models").mkdir(parents=True)
    (cfgdir / "defaults.yaml").write_text("a: 0\ntrain: {lr: 0.1, epochs: 3}\n")
    (cfgdir / "models" / "full.yaml").write_text("a: 1\ntrain: {lr: 0.2}\n")
    (cfgdir / "models" / "abl.yaml").write_text("base: full\ntrain: {epochs: 5}\n")
    (cfgdir / "models" / "loop1.yaml").write_text("base: loop2\n")
    (cfgdir / "models" / "loop2.yaml").write_text("base: loop1\n")
    (cfgdir / "models" / "orphan.yaml").write_text("base: nothing\n")
    (cfgdir / "models" / "other.yaml").write_text("b: 2\ntrain: {lr: 0.4, wd: 0.01}\n")
    (cfgdir / "models" / "both.yaml").write_text("base: [full, other]\ntrain: {epochs: 7}\n")
    (cfgdir / "models" / "badbase.yaml").write_text("base: {full: 1}\n")
    monkeypatch.setattr("ttds.config.CONFIG_DIR", cfgdir)
    cfg = load_config("abl", overrides=["train.lr=0.3"])
    assert cfg == {"a": 1, "train": {"lr": 0.3, "epochs": 5}}  # the base key itself is not part of the result
    # several bases: merged in order (later wins), the file's own keys over all
    assert load_config("both") == {"a": 1, "b": 2, "train": {"lr": 0.4, "epochs": 7, "wd": 0.01}}
    with pytest.raises(TTDSError, match="badbase.yaml: base: expected a model name or a list"):
        load_config("badbase")
    with pytest.raises(TTDSError, match="cycle loop1 -> loop2 -> loop1"):
        load_config("loop1")
    with pytest.raises(TTDSError, match="model 'nothing': no config"):
        load_config("orphan")


# paper Tables 2-3: each ablation is its parent with exactly these settings changed
ABLATIONS = {
    "stds": ("ttds", {"index.user": False}),
    "stds_dm": ("ttds", {"index.user": False, "loss.alpha": 0.0}),
    "ttds_dm": ("ttds", {"loss.alpha": 0.0}),
    "ttds_ho": ("ttds", {"tasks.userpred": 0.0, "tasks.review": 0.0}),
    "ttds_3": ("ttds", {"index.options.levels": 3}),
    "ttds_5": ("ttds", {"index.options.levels": 5}),
    # an LSH index has no parameters: it is dynamic only through the re-encoded X, so TT-DLSH turns that on
    "tt_dlsh": ("ttds", {"index.source": "lsh", "index.user_source": "lsh", "dynamic.refresh_text": True}),
    "tt_slsh": ("ttss", {"index.source": "lsh", "index.user_source": "lsh"}),
    "tt_sr": ("ttss", {"index.source": "random", "index.user_source": "random"}),
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_is_one_change_from_its_parent(name):
    parent, change = ABLATIONS[name]
    a, p = flatten(load_config(model=name)), flatten(load_config(model=parent))
    assert {k: v for k, v in a.items() if p.get(k, object()) != v} == change


def test_ttds_shares_everything_but_the_dynamic_parts_with_ttss():
    d, s = flatten(load_config(model="ttds")), flatten(load_config(model="ttss"))
    differ = {k.split(".")[0] for k in set(d) | set(s) if d.get(k, object()) != s.get(k, object())}
    assert differ == {"recipe", "dynamic", "loss"}


def test_override_parsing():
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 0.001)
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("name=sasrec") == (["name"], "sasrec")
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_defaults_exist_and_resolved_config_written(tmp_path):
    assert (CONFIG_DIR / "defaults.yaml").is_file()
    cfg = load_config(overrides=["seed=7"])
    start_run(cfg, tmp_path / "run")
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["seed"] == 7 and written == cfg
    assert (tmp_path / "run" / "run.log").exists()


def test_tiger_ttds_is_ttds_on_tigers_model():
    """`base: [ttds, tiger]`: TTDS's dynamic parts and tasks, TIGER's backbone, prompt and optimiser."""
    a, t, d = (flatten(load_config(model=m)) for m in ("tiger_ttds", "tiger", "ttds"))
    assert a["recipe"] == "dynamic" and a["index.user"] is True
    assert {k: v for k, v in a.items() if k.split(".")[0] in ("dynamic", "loss")} == \
        {k: v for k, v in d.items() if k.split(".")[0] in ("dynamic", "loss")}
    for k in ("backbone.init", "tasks.prompt", "index.options.encoder", "index.options.levels", "train.lr", "train.batch_size",
              "train.epochs"):
        assert a[k] == t[k], k
    assert t["index.options.levels"] == 3 != d["index.options.levels"]  # TIGER's 3 x 256 codes, TTDS's 4
    assert a["tasks.userpred"] == d["tasks.userpred"] > 0 and a["tasks.item2index"] == a["tasks.index2item"] == 0

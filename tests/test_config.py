"""Layered config: defaults < model < dataset < user file < CLI overrides; resolved config is written."""
import yaml

from ttds.config import CONFIG_DIR, load_config, merge, parse_override
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
    cfg = load_config("m", "Games", user, ["train.lr=1e-3", "new.key=[1, 2]"])
    assert (cfg["a"], cfg["b"], cfg["c"], cfg["d"]) == (0, 1, 2, 3)
    assert cfg["train"] == {"lr": 0.001, "epochs": 3}
    assert cfg["new"]["key"] == [1, 2]


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

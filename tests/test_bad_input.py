"""Every bad-input case of the data layer: one clear error line naming file and key/line, exit 2,
no traceback, and no half-written output."""
import json

import pytest

from ttds.data.readers import write_lcrec, load_dataset


def _lcrec(tmp_path, inter=None, items=None, name="Bad"):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    inter = inter if inter is not None else {"0": [0, 1, 2], "1": [2, 1, 0, 1]}
    items = items if items is not None else {str(i): {"title": f"t{i}"} for i in range(3)}
    (folder / f"{name}.inter.json").write_text(inter if isinstance(inter, str) else json.dumps(inter))
    if items is not False:
        (folder / f"{name}.item.json").write_text(items if isinstance(items, str) else json.dumps(items))
    return folder


def _assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip() and not l.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_folder(tmp_path, run_cli):
    code, _, err = run_cli("data", "stats", tmp_path / "nope")
    _assert_one_line_error(code, err, "nope", "not found")


def test_missing_inter_file(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("data", "stats", tmp_path / "empty")
    _assert_one_line_error(code, err, "empty", "inter.json")


def test_malformed_json(tmp_path, run_cli):
    folder = _lcrec(tmp_path, inter='{"0": [0, 1, 2],\n "1": [2, 1 0]}')
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "Bad.inter.json", "line 2", "malformed JSON")


def test_item_not_in_item_table(tmp_path, run_cli):
    folder = _lcrec(tmp_path, inter={"0": [0, 1, 7], "1": [2, 1, 0]})
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "Bad.inter.json", "user '0'", "item id 7", "item table")


def test_non_contiguous_user_ids(tmp_path, run_cli):
    folder = _lcrec(tmp_path, inter={"0": [0, 1, 2], "2": [2, 1, 0]})
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "Bad.inter.json", "not contiguous", "id 1")


def test_non_contiguous_item_ids(tmp_path, run_cli):
    folder = _lcrec(tmp_path, items={"0": {"title": "a"}, "1": {"title": "b"}, "5": {"title": "c"}})
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "Bad.item.json", "not contiguous", "id 2")


def test_duplicate_ids(tmp_path, run_cli):
    folder = _lcrec(tmp_path, inter='{"0": [0, 1, 2], "1": [2, 1, 0], "1": [0, 1, 2]}')
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "Bad.inter.json", "'1'", "duplicate")
    folder = _lcrec(tmp_path, name="Dup", items='{"0": {"title": "a"}, "0": {"title": "b"}, "1": {}, "2": {}}')
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "Dup.item.json", "'0'", "duplicate")


def test_short_user_error_and_drop(tmp_path, run_cli, caplog):
    folder = _lcrec(tmp_path, inter={"0": [0, 1, 2], "1": [2, 1], "2": [1, 2, 0]})
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "Bad.inter.json", "user '1'", "2 interactions", "--drop-short")
    code, out, err = run_cli("data", "stats", folder, "--drop-short")
    assert code == 0, err
    assert "dropped 1 users" in caplog.text
    ds = load_dataset(folder, drop_short=True)
    assert ds.n_users == 2 and ds.user_ids == ["0", "2"]


def test_non_utf8(tmp_path, run_cli):
    folder = _lcrec(tmp_path)
    (folder / "Bad.item.json").write_bytes(b'{"0": {"title": "ok"},\n"1": {"title": "caf\xe9"}, "2": {}}')
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "Bad.item.json", "line 2", "UTF-8")


def test_empty_title_allowed_and_counted(tmp_path, run_cli):
    folder = _lcrec(tmp_path, items={"0": {"title": ""}, "1": {"title": "   "}, "2": {"title": "x"}})
    code, out, err = run_cli("data", "stats", folder, "--json")
    assert code == 0, err
    st = json.loads(out)
    assert st["items_with_empty_title"] == 2 and st["items_with_title"] == pytest.approx(1 / 3, abs=1e-3)


def test_wrong_types(tmp_path, run_cli):
    folder = _lcrec(tmp_path, inter={"0": [0, "1", 2], "1": [2, 1, 0]})
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "Bad.inter.json", "user '0'", "integer item ids")
    folder = _lcrec(tmp_path, name="Arr", inter="[[0, 1, 2]]")
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "Arr.inter.json", "JSON object")


def test_bad_json_lines_leave_no_output(tmp_path, run_cli):
    rp = tmp_path / "reviews.json"
    rp.write_text('{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\n{"reviewerID": "a", "asin": \n')
    out = tmp_path / "out"
    code, _, err = run_cli("data", "prepare-amazon", "--reviews", rp, "--out", out)
    _assert_one_line_error(code, err, "reviews.json", "line 2", "malformed JSON")
    assert not out.exists(), "no half-written output"
    rp.write_text('{"reviewerID": "a", "asin": "b"}\n')
    code, _, err = run_cli("data", "prepare-amazon", "--reviews", rp, "--out", out)
    _assert_one_line_error(code, err, "reviews.json", "line 1", "unixReviewTime")
    code, _, err = run_cli("data", "prepare-amazon", "--reviews", tmp_path / "none.json", "--out", out)
    _assert_one_line_error(code, err, "none.json", "not found")
    rp.write_bytes(b'{"reviewerID": "\xff", "asin": "b", "unixReviewTime": 1}\n')
    code, _, err = run_cli("data", "prepare-amazon", "--reviews", rp, "--out", out)
    _assert_one_line_error(code, err, "reviews.json", "line 1", "UTF-8")


def test_table_reader_errors(tmp_path, run_cli):
    folder = tmp_path / "tab"
    folder.mkdir()
    (folder / "interactions.csv").write_text("user,item,timestamp\nu,i1,1\nu,i2,2\nu,i9,3\n")
    (folder / "items.csv").write_text("item,title\ni1,A\ni2,B\n")
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "interactions.csv", "line 4", "'i9'", "item table")
    (folder / "interactions.csv").write_text("user,item\nu,i1\n")
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "interactions.csv", "timestamp")
    (folder / "interactions.csv").write_text("user,item,timestamp\nu,i1,1\nu,i2,2\nu,i1,3\n")
    (folder / "items.csv").write_text("item,title\ni1,A\ni1,B\ni2,C\n")
    code, _, err = run_cli("data", "stats", folder)
    _assert_one_line_error(code, err, "items.csv", "'i1'", "duplicate")


def test_config_errors(tmp_path, run_cli):
    from ttds.config import load_config, section
    from ttds.errors import TTDSError

    with pytest.raises(TTDSError, match="--set 'train.lr'"):
        load_config(overrides=["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(TTDSError, match="bad.yaml: malformed YAML"):
        load_config(file=bad)
    from dataclasses import dataclass

    @dataclass
    class T:
        lr: float = 0.1

    with pytest.raises(TTDSError, match="config train.lrr: unknown key"):
        section({"train": {"lrr": 1}}, "train", T)
    with pytest.raises(TTDSError, match="model 'nosuch'"):
        load_config(model="nosuch")


@pytest.mark.parametrize("model,setting,needle", [
    ("ttss", "bogus.key=1", "unknown top-level config key 'bogus'"),
    ("ttss", "train.max_stepz=1", "config train.max_stepz: unknown key"),
    ("ttss", "tasks.seqrecc=1", "config tasks.seqrecc: unknown key"),
    ("ttds", "dynamic.refresh_txt=false", "config dynamic.refresh_txt: unknown key"),
    ("ttds", "loss.alfa=0", "config loss.alfa: unknown key"),
    ("ttds", "index.options.levls=3", "config index.options.levls: unknown key"),
])
def test_config_typo_stops_before_any_work(tmp_path, run_cli, model, setting, needle):
    """A typo anywhere in an LM recipe's config is one error line before the run folder, the backbone or the index fit."""
    out = tmp_path / "run"
    code, _, err = run_cli("train", "--model", model, "--data", "builtin:users=20,items=20", "--out", out, "--set", setting)
    _assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_atomic_write_survives_failure(tmp_path):
    from ttds.io import atomic_path, write_json

    target = tmp_path / "x.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("plot_curves", Path(__file__).parents[1] / "benchmarks" / "plot_curves.py")
pc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pc)


def _hist(ndcgs):
    return [{"step": 100 * (i + 1), "epoch": i, "train_seconds": 60.0 * (i + 1), "valid": {"NDCG@10": v}}
            for i, v in enumerate(ndcgs)]


def test_a_results_file_row_plots_like_its_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps({"history": _hist([0.01, 0.03])}))
    res = tmp_path / "res.json"
    res.write_text(json.dumps({"rows": [{"label": "A", "valid_history": _hist([0.02])},
                                        {"label": "B", "valid_history": _hist([0.01, 0.03])}]}))
    assert pc.curve(str(run), "steps")[1:] == pc.curve(f"{res}#B", "steps")[1:] == ([100, 200], [0.01, 0.03])
    assert pc.curve(str(res)) == ("A", [1.0], [0.02])  # no #ROW: the first row, minutes on x
    assert pc.curve(str(tmp_path / "empty")) is None  # a run folder without state.json yet
    with pytest.raises(SystemExit, match="no row labelled 'C'"):
        pc.curve(f"{res}#C")

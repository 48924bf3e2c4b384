import importlib.util
from pathlib import Path

import numpy as np
import torch

_spec = importlib.util.spec_from_file_location("collab_signal", Path(__file__).parents[1] / "benchmarks" / "collab_signal.py")
cs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cs)


def test_pairs_use_training_items_only_and_lifts_separate_structure_from_chance():
    rng = np.random.default_rng(0)
    # 200 users walking inside one of 4 clusters of 25 items; the last two items (valid, test) leave the cluster
    seqs = [np.concatenate([c * 25 + rng.integers(0, 25, 8), [100, 101]]) for c in rng.integers(0, 4, 200)]
    a, b, r = cs.pairs(seqs)
    assert len(a) and max(a.max(), b.max()) < 100  # validation/test items never enter
    assert sorted(b.tolist()) == sorted(r.tolist()) and (a != b).all()
    cluster = np.stack([np.arange(102) // 25, np.arange(102) % 25], 1)  # first code = the cluster
    noise = rng.integers(0, 4, (102, 2))
    (s1, lift1), _ = cs.prefix_lifts(cluster, a, b, r, depths=(1, 2))
    (_, lift_noise), _ = cs.prefix_lifts(noise, a, b, r, depths=(1, 2))
    assert s1 == 1.0 and lift1 > 3 and 0.8 < lift_noise < 1.25
    x = torch.nn.functional.one_hot(torch.as_tensor(np.arange(102) // 25), 5).float() + 0.01 * torch.randn(102, 5)
    assert cs.x_auc(x, a, b, r) > 0.7 and 0.4 < cs.x_auc(torch.randn(102, 5), a, b, r) < 0.6

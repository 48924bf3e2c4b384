"""Every metric against hand-computed cases: ties, constant scores, short lists, duplicates, invalid ids."""
import math

import numpy as np
import pytest
import torch

from ttds.eval.metrics import MISS, metrics_from_ranks, ranks_from_lists, ranks_from_scores


def test_ranks_from_scores_basic():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    assert ranks_from_scores(s, torch.tensor([1, 3])).tolist() == [0, 3]
    assert ranks_from_scores(s, torch.tensor([2, 0])).tolist() == [1, 0]


def test_ties_are_pessimistic():
    s = torch.tensor([[0.5, 0.5, 0.5, 0.1], [1.0, 2.0, 2.0, 0.0]])
    # target 0 ties with items 1, 2 -> ranked after both; target 1 ties with item 2 -> rank 1
    assert ranks_from_scores(s, torch.tensor([0, 1])).tolist() == [2, 1]


def test_constant_model_scores_zero():
    n = 50
    s = torch.zeros(7, n)
    r = ranks_from_scores(s, torch.arange(7))
    assert r.tolist() == [n - 1] * 7
    m = metrics_from_ranks(r)
    for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"):
        assert m[k] == 0.0
    assert m["MRR"] == pytest.approx(1 / n)


def test_nan_target_is_a_miss():
    s = torch.tensor([[float("nan"), 0.2, 0.1]])
    assert ranks_from_scores(s, torch.tensor([0])).tolist() == [MISS]


def test_mask_seen_option():
    s = torch.tensor([[0.9, 0.8, 0.1, 0.5]])
    hist = torch.tensor([[-1, 0, 1]])
    assert ranks_from_scores(s, torch.tensor([3])).tolist() == [2]
    assert ranks_from_scores(s, torch.tensor([3]), seen=hist).tolist() == [0]
    # the target itself is never masked even if it was seen before
    assert ranks_from_scores(s, torch.tensor([1]), seen=hist).tolist() == [0]


def test_metrics_hand_computed():
    ranks = np.array([0, 1, 4, 5, 9, 10])
    m = metrics_from_ranks(ranks, ks=(1, 5, 10))
    assert m["HR@1"] == pytest.approx(1 / 6)
    assert m["HR@5"] == pytest.approx(3 / 6)
    assert m["HR@10"] == pytest.approx(5 / 6)
    ndcg = lambda r: 1 / math.log2(r + 2)  # noqa: E731
    assert m["NDCG@1"] == pytest.approx(1 / 6)
    assert m["NDCG@5"] == pytest.approx((ndcg(0) + ndcg(1) + ndcg(4)) / 6)
    assert m["NDCG@10"] == pytest.approx((ndcg(0) + ndcg(1) + ndcg(4) + ndcg(5) + ndcg(9)) / 6)
    assert m["MRR"] == pytest.approx(sum(1 / (r + 1) for r in ranks) / 6)
    # rank 1 at NDCG: 1/log2(3) = 0.6309...
    assert metrics_from_ranks([1], ks=(5,))["NDCG@5"] == pytest.approx(0.6309297535714575)


def test_lists_basic_and_shorter_than_k():
    lists = [[3, 1, 2], [5, 6, 7], [0, 9, 4]]
    r = ranks_from_lists(lists, [1, 8, 4], n_items=10)
    assert r.tolist() == [1, MISS, 2]
    m = metrics_from_ranks(r, ks=(1, 5, 10))
    assert m["HR@1"] == 0.0
    assert m["HR@5"] == pytest.approx(2 / 3)
    assert m["HR@10"] == pytest.approx(2 / 3)  # a list of 3 cannot hit beyond position 3
    assert m["NDCG@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert m["MRR"] == pytest.approx((1 / 2 + 1 / 3) / 3)


def test_lists_duplicates_are_removed_and_later_items_move_up():
    # 2 repeated twice: target 5 moves from position 3 to position 2
    assert ranks_from_lists([[2, 2, 7, 5]], [5], n_items=10).tolist() == [2]
    assert ranks_from_lists([[2, 2, 2, 2]], [2], n_items=10).tolist() == [0]


def test_lists_invalid_ids_occupy_a_slot_and_never_hit():
    # -1 and 10 are invalid (n_items=10): they take positions 0 and 1; target 3 is at position 2
    assert ranks_from_lists([[-1, 10, 3]], [3], n_items=10).tolist() == [2]
    # an invalid id equal to an out-of-range "target" never matches
    assert ranks_from_lists([[10, 11]], [10], n_items=10).tolist() == [MISS]
    # repeated invalid ids each keep a slot
    assert ranks_from_lists([[-1, -1, 4]], [4], n_items=10).tolist() == [2]


def test_lists_and_scores_agree():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(20, 30, generator=g)
    t = torch.randint(0, 30, (20,), generator=g)
    top = s.argsort(1, descending=True)
    assert ranks_from_lists(top, t, 30).tolist() == ranks_from_scores(s, t).tolist()


def test_seen_at_1_counts_users_whose_top_item_is_in_their_history():
    from ttds.data.dataset import EvalSet
    from ttds.eval.evaluator import evaluate

    class Fixed:  # scores: item 0 best for every user
        n_items = 5

        def scores(self, users, history):
            return torch.tensor([[5.0, 4, 3, 2, 1]]).repeat(len(users), 1)

    class Lists:
        n_items = 5

        def recommend(self, users, history, k):
            return torch.tensor([[3, 0], [2, 4], [-1, -1]])

    hist = np.array([[-1, 0], [2, 1], [-1, -1]])  # user 0 has item 0, user 1 has items 2 and 1, user 2 nothing
    ev = EvalSet(np.arange(3), hist, np.array([1, 3, 2]))
    assert evaluate(Fixed(), ev, progress=False)["seen@1"] == pytest.approx(1 / 3)
    assert evaluate(Lists(), ev, progress=False)["seen@1"] == pytest.approx(1 / 3)  # tops 3, 2 (seen), none
    assert "seen@1" not in evaluate(Fixed(), ev, mask_seen=True, progress=False)


def _ranks_file(path, ranks, users=None, targets=None, k=10):
    from ttds.data.dataset import EvalSet
    from ttds.eval.evaluator import save_ranks

    n = len(ranks)
    users = np.arange(n) if users is None else np.asarray(users)
    targets = np.arange(n) % 7 if targets is None else np.asarray(targets)
    save_ranks(path, EvalSet(users, np.zeros((n, 3), dtype=np.int64), targets), np.asarray(ranks), k)
    return path


def test_paired_comparison_of_two_rank_files(tmp_path):
    from ttds.errors import TTDSError
    from ttds.eval.compare import compare, format_compare
    from ttds.eval.metrics import per_user

    rng = np.random.default_rng(0)
    base = rng.integers(0, 30, 2000)
    base[base >= 10] = MISS
    better = np.where(rng.random(2000) < 0.3, 0, base)  # 30 % of users get the target first
    a = _ranks_file(tmp_path / "a.safetensors", base)
    b = _ranks_file(tmp_path / "b.safetensors", better)
    assert per_user(base, "NDCG@10").mean() == pytest.approx(metrics_from_ranks(base)["NDCG@10"])
    same = compare([a], [a], ("NDCG@10", "HR@1"))["pairs"][0]["metrics"]
    assert same["NDCG@10"]["diff"] == 0 and same["NDCG@10"]["p"] == 1 and same["HR@1"]["b_ahead"] == 0
    r = compare([a], [b], ("NDCG@10", "HR@1", "MRR"))["pairs"][0]["metrics"]
    assert r["HR@1"]["diff"] == pytest.approx((better == 0).mean() - (base == 0).mean())
    assert r["HR@1"]["lo"] > 0 and r["HR@1"]["p"] < 1e-6 and r["HR@1"]["b_behind"] == 0
    noise = _ranks_file(tmp_path / "n.safetensors", rng.permutation(base))  # same distribution, reshuffled users
    assert compare([a], [noise], ("NDCG@10",))["pairs"][0]["metrics"]["NDCG@10"]["p"] > 0.01
    two = compare([a, noise], [b, b], ("NDCG@10",))
    assert two["pooled"]["NDCG@10"]["n"] == 4000 and "pooled (2 pairs)" in format_compare(two)
    # the same users and targets or a clear error; no @k beyond what was searched
    other_users = _ranks_file(tmp_path / "u.safetensors", base, targets=np.arange(2000) % 5)
    with pytest.raises(TTDSError, match="different users or targets"):
        compare([a], [other_users])
    with pytest.raises(TTDSError, match="holds ranks up to 10 only"):
        compare([a], [b], ("HR@20",))
    with pytest.raises(TTDSError, match="no ranks-test.safetensors"):
        compare([tmp_path], [b])
    run = tmp_path / "old-run"  # a run folder from before session 16, evaluated again with `ttds eval`
    run.mkdir()
    _ranks_file(run / "eval-d-test-int8.ranks.safetensors", better)  # not fp32: never picked
    with pytest.raises(TTDSError, match="no ranks-test.safetensors"):
        compare([run], [b])
    _ranks_file(run / "eval-d-test.ranks.safetensors", base)
    assert compare([run], [b])["pairs"][0]["metrics"]["NDCG@10"] == r["NDCG@10"]
    with pytest.raises(TTDSError, match="same, non-zero length"):
        compare([a, b], [b])


def test_bench_tables_pair_every_model_with_the_first(tmp_path):
    from ttds.bench.harness import paired_summary

    rng = np.random.default_rng(1)
    rows = []
    for seed in (1, 2):
        base = rng.integers(0, 10, 500)
        for model, ranks in (("A", base), ("B", np.where(rng.random(500) < 0.5, 0, base))):
            run = tmp_path / f"{model}-s{seed}"
            run.mkdir()
            _ranks_file(run / "ranks-test.safetensors", ranks)
            rows.append({"label": f"{model}@{seed}", "test": {}, "run_dir": str(run)})
    rows.append({"label": "C@1", "test": {}, "run_dir": str(tmp_path / "old")})  # no ranks: said, not hidden
    (tmp_path / "old").mkdir()
    md = paired_summary(rows)
    b = next(line for line in md.splitlines() if line.startswith("| B |"))
    assert "| B | 1, 2 | +0." in b and "p=" in b  # B ranks half of the users' targets first: clearly ahead
    assert "no ranks-test.safetensors" in next(line for line in md.splitlines() if line.startswith("| C |"))
    assert paired_summary(rows[:4:2]) == ""  # one model (A@1, A@2): nothing to pair

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttds.index.base import SemanticIndex
from ttds.index.trie import IDTrie


@st.composite
def indices(draw):
    L = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 4)) for _ in range(L)]
    universe = list(itertools.product(*[range(k) for k in sizes]))
    picked = draw(st.lists(st.sampled_from(universe), min_size=1, max_size=min(len(universe), 30), unique=True))
    return SemanticIndex(np.array(picked, dtype=np.int64).reshape(len(picked), L), sizes, list("abcd")[:L])


@st.composite
def short_id_indices(draw):
    """Base codes with collisions, disambiguated as in the paper: only colliding IDs get the extra level, the
    others end one level earlier (-1)."""
    from ttds.index.collisions import disambiguate

    M = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 3)) for _ in range(M)]
    base = draw(st.lists(st.tuples(*[st.integers(0, k - 1) for k in sizes]), min_size=1, max_size=20))
    codes = disambiguate(np.array(base, dtype=np.int64).reshape(len(base), M))
    return SemanticIndex(codes, sizes + [max(1, int(codes[:, -1].max()) + 1)], list("abc")[:M] + ["p"])


@settings(max_examples=60, deadline=None)
@given(st.one_of(indices(), short_id_indices()))
def test_trie_allows_exactly_the_valid_continuations(index):
    trie = IDTrie(index)
    valid = {tuple(r) for r in index.codes.tolist()}
    L = index.n_levels
    for t in range(L):
        # every prefix of length t over the full code space, batched
        combos = list(itertools.product(*[range(k) for k in index.level_sizes[:t]]))
        prefixes = torch.tensor(combos, dtype=torch.long).reshape(len(combos), t)
        mask = trie.allowed_after(prefixes)
        for p, row in zip(prefixes.tolist(), mask.tolist()):
            expected = [any(v[: t + 1] == tuple(p) + (c,) for v in valid) for c in range(index.level_sizes[t])]
            assert row == expected
    # every valid ID is reachable and maps back to its entity
    ents = trie.entities(torch.as_tensor(index.codes))
    assert ents.tolist() == list(range(index.n))


def test_invalid_ids_map_to_minus_one_and_add_entity():
    index = SemanticIndex(np.array([[0, 1, 0], [0, 1, 1], [2, 0, 0]]), [3, 2, 2], ["a", "b", "c"])
    trie = IDTrie(index)
    assert trie.entities(torch.tensor([[1, 0, 0], [0, 0, 0], [2, 0, 0]])).tolist() == [-1, -1, 2]
    assert trie.allowed_after(torch.tensor([[1]])).tolist() == [[False, False]]
    e = trie.add([1, 0, 1])
    assert e == 3
    assert trie.entities(torch.tensor([[1, 0, 1]])).tolist() == [3]
    assert trie.allowed_after(torch.tensor([[1, 0]])).tolist() == [[False, True]]
    with pytest.raises(ValueError):
        trie.add([0, 1, 1])
    # rebuild after a re-assignment
    trie.rebuild(SemanticIndex(np.array([[1, 1, 1], [0, 0, 0]]), [3, 2, 2], ["a", "b", "c"]))
    assert trie.entities(torch.tensor([[1, 1, 1], [0, 1, 0]])).tolist() == [0, -1]


def test_short_ids_end_one_level_early_and_stay_prefix_free():
    # base codes (0,1) shared by two items -> <p_0>, <p_1>; (2,0) and (1,1) alone -> no extra token
    index = SemanticIndex(np.array([[0, 1, 0], [0, 1, 1], [2, 0, -1], [1, 1, -1]]), [3, 2, 2], ["a", "b", "p"])
    assert index.is_unique() and index.short_ids and index.tokens(2) == ["<a_2>", "<b_0>"]
    trie = IDTrie(index)
    assert trie.entities(torch.tensor([[2, 0, -1], [0, 1, 1], [2, 0, 0], [0, 1, -1]])).tolist() == [2, 1, -1, -1]
    assert trie.allowed_after(torch.tensor([[2, 0]])).tolist() == [[False, False]]  # a short ID ends here
    assert trie.ends(trie.nodes_of(torch.tensor([[2, 0], [0, 1]])), 2).tolist() == [2, -1]
    with pytest.raises(ValueError, match="extends the short ID"):
        trie.add([2, 0, 1])
    with pytest.raises(ValueError, match="prefix of another"):
        trie.add([0, 1, -1])
    assert trie.add([2, 1, -1]) == 4 and trie.entities(torch.tensor([[2, 1, -1]])).tolist() == [4]
    # a short ID that is the prefix of a long one is not an index
    assert not SemanticIndex(np.array([[0, 1, -1], [0, 1, 0]]), [3, 2, 2], ["a", "b", "p"]).is_unique()
    with pytest.raises(ValueError, match="only at the last level"):
        SemanticIndex(np.array([[0, -1, 0]]), [3, 2, 2], ["a", "b", "p"])


def test_collisions_rejected():
    with pytest.raises(ValueError):
        IDTrie(SemanticIndex(np.array([[0, 1], [0, 1]]), [2, 2], ["a", "b"]))


@settings(max_examples=60, deadline=None)
@given(st.one_of(indices(), short_id_indices()), st.data())
def test_excluded_prefixes_are_exactly_those_with_only_excluded_leaves(index, data):
    """A continuation is allowed for a row iff it leads to at least one entity that row does not exclude;
    the same after `add` (serving's new items)."""
    trie = IDTrie(index)
    if data.draw(st.booleans()):  # a new entity appended by `add`, when the code space has room
        taken = {tuple(r) for r in index.codes.tolist()}
        free = [c for c in itertools.product(*[range(k) for k in index.level_sizes]) if c not in taken]
        if index.short_ids:  # a short ID for base codes nobody uses
            heads = {tuple(r[:-1]) for r in index.codes.tolist()}
            free = [c + (-1,) for c in itertools.product(*[range(k) for k in index.level_sizes[:-1]]) if c not in heads]
        if free:
            trie.add(list(free[0]))
            index = SemanticIndex(np.vstack([index.codes, free[0]]), index.level_sizes, index.prefixes)
    n, L = index.n, index.n_levels
    seen = [data.draw(st.lists(st.integers(0, n - 1), max_size=n)) for _ in range(3)] + [[]]
    excl = trie.excluded(seen)
    for t in range(L):
        combos = list(itertools.product(*[range(k) for k in index.level_sizes[:t]]))
        for b, s in enumerate(seen):
            rest = [tuple(index.codes[e]) for e in range(n) if e not in set(s)]
            prefix = torch.tensor(combos, dtype=torch.long).reshape(len(combos), t)
            node = trie.nodes_of(prefix)
            got = trie.allowed(node, t, torch.full((len(combos),), b), excl)
            for row, p in zip(got.tolist(), combos):
                want = [any(r[:t] == p and r[t] == c for r in rest) for c in range(index.level_sizes[t])]
                assert row == want, (b, p, t)

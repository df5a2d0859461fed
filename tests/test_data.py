"""din.data: the columnar sample format, batching, persistence, and the synthetic and MovieLens sources."""
import json
import time

import numpy as np
import pytest
import torch

from din.data import (
    BUNDLED_MOVIELENS,
    Batch,
    InteractionData,
    Split,
    load_data,
    load_movielens,
    make_synthetic,
)
from din.metrics import auc

# ---------------------------------------------------------------------------------------------
# a tiny hand-checkable MovieLens
# ---------------------------------------------------------------------------------------------

MOVIES_CSV = """movieId,title,genres
10,"Movie, The (1999)",Comedy|Drama
20,Other (2000),Action
30,"Quote ""x"", Again (2001)",(no genres listed)
5,Five (1990),Drama|Action
99,Never Rated (2002),Horror
"""
# rows out of time order on purpose; user 2 rates movies 10 and 5 in the same second (file order wins)
RATINGS_CSV = """userId,movieId,rating,timestamp
2,10,4.0,100
1,20,3.5,50
1,10,5.0,10
2,5,2.0,100
1,30,4.0,30
2,20,4.5,90
3,5,1.0,5
3,10,4.0,6
"""
# dense ids: movies by raw id 5->1, 10->2, 20->3, 30->4, 99->5; first genres by name
# "(no genres listed)"->1, Action->2, Comedy->3, Drama->4, Horror->5
CATE = {1: 4, 2: 3, 3: 2, 4: 1, 5: 5}
# (user, candidate) -> (history goods oldest first, label)
EXPECTED = {
    (1, 2): ([], 1),
    (1, 4): ([2], 1),
    (1, 3): ([2, 4], 0),  # rating 3.5 < 4
    (2, 3): ([], 1),
    (2, 2): ([3], 1),
    (2, 1): ([3, 2], 0),  # same timestamp as movie 10, later in the file
    (3, 1): ([], 0),
    (3, 2): ([1], 1),
}


@pytest.fixture
def tiny_movielens(tmp_path):
    root = tmp_path / "ml-tiny"
    root.mkdir()
    (root / "movies.csv").write_text(MOVIES_CSV, encoding="utf-8")
    (root / "ratings.csv").write_text(RATINGS_CSV, encoding="utf-8")
    return root


def _samples(data: InteractionData, max_len: int = 10):
    """{(user, candidate): (history goods, history cates, label, candidate cate)} from one full batch."""
    batch = data.batch(np.arange(len(data)), max_len)
    out = {}
    for b in range(len(batch)):
        n = int(batch.lengths[b])
        assert torch.all(batch.hist_goods[b, n:] == 0) and torch.all(batch.hist_cates[b, n:] == 0)
        key = (int(batch.user[b]), int(batch.goods[b]))
        assert key not in out
        out[key] = (
            batch.hist_goods[b, :n].tolist(),
            batch.hist_cates[b, :n].tolist(),
            int(batch.label[b]),
            int(batch.cate[b]),
        )
    return out


def _all_samples(split: Split, max_len: int = 10):
    train, test = _samples(split.train, max_len), _samples(split.test, max_len)
    assert not set(train) & set(test)
    return {**train, **test}


def test_tiny_movielens_matches_hand_computed(tiny_movielens):
    split = load_movielens(tiny_movielens, test_fraction=0.34, seed=0)
    assert (split.num_users, split.num_goods, split.num_cates) == (4, 6, 6)
    samples = _all_samples(split)
    assert set(samples) == set(EXPECTED)
    for key, (hist, label) in EXPECTED.items():
        hist_goods, hist_cates, got_label, cate = samples[key]
        assert hist_goods == hist, key  # earlier ratings only, in time order
        assert hist_cates == [CATE[g] for g in hist], key
        assert got_label == label, key
        assert cate == CATE[key[1]], key


def test_tiny_movielens_label_threshold(tiny_movielens):
    split = load_movielens(tiny_movielens, test_fraction=0.34, positive_threshold=4.5)
    labels = {key: value[2] for key, value in _all_samples(split).items()}
    assert labels[(1, 2)] == 1 and labels[(2, 3)] == 1  # 5.0 and 4.5
    assert labels[(1, 4)] == 0 and labels[(2, 2)] == 0  # 4.0


def test_max_len_keeps_the_last_items(tiny_movielens):
    split = load_movielens(tiny_movielens, test_fraction=0.34)
    # truncation at batch time ...
    cut = _all_samples(split, max_len=1)
    assert cut[(1, 3)][0] == [4] and cut[(2, 1)][0] == [2]
    # ... and at load time give the same histories
    loaded = _all_samples(load_movielens(tiny_movielens, max_len=1, test_fraction=0.34), max_len=10)
    assert {k: v[0] for k, v in loaded.items()} == {k: v[0] for k, v in cut.items()}


def test_padding_sits_at_the_end(tiny_movielens):
    data = load_movielens(tiny_movielens, test_fraction=0.34).train
    batch = data.batch(np.arange(len(data)), 4)
    assert batch.hist_goods.shape == (len(data), 4)
    for b in range(len(batch)):
        n = int(batch.lengths[b])
        assert torch.all(batch.hist_goods[b, :n] > 0) and torch.all(batch.hist_goods[b, n:] == 0)


def test_split_by_user_is_disjoint_and_seeded(tiny_movielens):
    splits = [load_movielens(tiny_movielens, test_fraction=0.34, seed=s) for s in range(6)]
    for split in splits:
        train_users, test_users = set(split.train.user.tolist()), set(split.test.user.tolist())
        assert not train_users & test_users
        assert train_users | test_users == {1, 2, 3}
        assert len(test_users) == 1
        assert len(split.train) + len(split.test) == 8
    again = load_movielens(tiny_movielens, test_fraction=0.34, seed=3)
    assert np.array_equal(again.test.user, splits[3].test.user)
    assert len({tuple(sorted(set(s.test.user.tolist()))) for s in splits}) > 1  # the seed matters


def test_movielens_accepts_a_ratings_path_and_load_data_detects_it(tiny_movielens):
    a = load_movielens(tiny_movielens / "ratings.csv", test_fraction=0.34, seed=1)
    b = load_data(str(tiny_movielens), seed=1, test_fraction=0.34)
    assert np.array_equal(a.test.goods, b.test.goods)


def test_movielens_bad_inputs(tmp_path, tiny_movielens):
    with pytest.raises(FileNotFoundError):
        load_movielens(tmp_path / "missing")
    with pytest.raises(ValueError, match="test_fraction"):
        load_movielens(tiny_movielens, test_fraction=1.0)
    with pytest.raises(ValueError, match="max_len"):
        load_movielens(tiny_movielens, max_len=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "movies.csv").write_text(MOVIES_CSV.replace("20,Other (2000),Action\n", ""), encoding="utf-8")
    (bad / "ratings.csv").write_text(RATINGS_CSV, encoding="utf-8")
    with pytest.raises(ValueError, match="movieId 20"):
        load_movielens(bad)
    (bad / "ratings.csv").write_text(RATINGS_CSV.replace("timestamp", "time"), encoding="utf-8")
    with pytest.raises(ValueError, match="timestamp"):
        load_movielens(bad)


# ---------------------------------------------------------------------------------------------
# real MovieLens: bundled and the shared copy
# ---------------------------------------------------------------------------------------------


def test_bundled_movielens_sizes():
    assert (BUNDLED_MOVIELENS / "README.txt").is_file()  # the licence travels with the data
    start = time.perf_counter()
    split = load_movielens()
    assert time.perf_counter() - start < 2.0
    summary = split.summary()
    assert len(split.train) + len(split.test) == 100_836
    assert summary["users"] == 610 and summary["train_users"] + summary["test_users"] == 610
    assert summary["items"] == 9742
    assert summary["categories"] == 19  # distinct first genres, "(no genres listed)" included
    assert summary["test_users"] == 122  # 20% of the users
    # each user's first rating has an empty history; every other sample has one
    empty = (split.train.history_lengths == 0).sum() + (split.test.history_lengths == 0).sum()
    assert empty == 610
    assert 0.4 < split.train.positive_rate < 0.6


def test_bundled_movielens_user_history_is_time_ordered():
    import csv

    split = load_movielens()
    data = split.train
    user = int(data.user[0])
    with open(BUNDLED_MOVIELENS / "ratings.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle)]
    user_raw = sorted({int(r["userId"]) for r in rows})[user - 1]
    mine = [r for r in rows if int(r["userId"]) == user_raw]
    mine = sorted(mine, key=lambda r: int(r["timestamp"]))  # stable: file order breaks ties
    index = np.flatnonzero(data.user == user)
    assert len(index) == len(mine)
    last = data.batch(index[-1:], 10_000)
    assert int(last.lengths[0]) == len(mine) - 1
    movie_raw = sorted({int(r["movieId"]) for r in csv.DictReader(open(BUNDLED_MOVIELENS / "movies.csv"))})
    expected = [movie_raw.index(int(r["movieId"])) + 1 for r in mine]
    assert last.hist_goods[0, : len(mine) - 1].tolist() == expected[:-1]
    assert int(last.goods[0]) == expected[-1]
    labels = data.label[index]
    assert labels.tolist() == [float(float(r["rating"]) >= 4) for r in mine]


def test_shared_movielens_equals_bundled(shared_data):
    path = shared_data / "ml-latest-small"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    shared, bundled = load_data(str(path), max_len=20, seed=0), load_data("movielens", max_len=20, seed=0)
    for part in ("train", "test"):
        a, b = getattr(shared, part), getattr(bundled, part)
        for column in ("user", "goods", "cate", "label", "hist_start", "hist_end", "behaviour_goods"):
            assert np.array_equal(getattr(a, column), getattr(b, column)), (part, column)
    assert shared.summary()["train_samples"] + shared.summary()["test_samples"] == 100_836


# ---------------------------------------------------------------------------------------------
# InteractionData: validation, batching, frequencies, persistence
# ---------------------------------------------------------------------------------------------


def _toy(**overrides):
    """Two users; flat behaviours u1: [1, 2, 3], u2: [4, 2]; five samples."""
    fields = dict(
        behaviour_goods=np.array([1, 2, 3, 4, 2]),
        behaviour_cates=np.array([1, 2, 1, 2, 2]),
        user=np.array([1, 1, 1, 2, 2]),
        hist_start=np.array([0, 0, 0, 3, 3]),
        hist_end=np.array([0, 2, 3, 4, 5]),
        goods=np.array([1, 3, 4, 2, 3]),
        cate=np.array([1, 1, 2, 2, 1]),
        label=np.array([1, 0, 1, 1, 0]),
        num_users=3,
        num_goods=5,
        num_cates=3,
        name="toy",
    )
    fields.update(overrides)
    return InteractionData(**fields)


def test_dtypes_and_batch_layout():
    data = _toy()
    assert data.behaviour_goods.dtype == np.int32 and data.hist_start.dtype == np.int64
    assert data.label.dtype == np.float32 and len(data) == 5 and data.num_behaviours == 5
    batch = data.batch(np.array([2, 0, 4]), max_len=2)
    assert isinstance(batch, Batch) and len(batch) == 3 and batch.max_len == 2
    for name in ("user", "hist_goods", "hist_cates", "lengths", "goods", "cate"):
        assert getattr(batch, name).dtype == torch.int64, name
    assert batch.label.dtype == torch.float32
    assert batch.hist_goods.tolist() == [[2, 3], [0, 0], [4, 2]]  # last 2 of [1, 2, 3]
    assert batch.hist_cates.tolist() == [[2, 1], [0, 0], [2, 2]]
    assert batch.lengths.tolist() == [2, 0, 2]
    assert batch.goods.tolist() == [4, 1, 3] and batch.label.tolist() == [1.0, 1.0, 0.0]
    wide = data.batch([1], max_len=4)
    assert wide.hist_goods.tolist() == [[1, 2, 0, 0]] and wide.lengths.tolist() == [2]
    trimmed = data.batch([0, 1], max_len=50, trim=True)
    assert trimmed.hist_goods.shape == (2, 2)
    assert data.batch([0], max_len=50, trim=True).hist_goods.shape == (1, 1)  # never width 0
    moved = batch.to("cpu")
    assert torch.equal(moved.hist_goods, batch.hist_goods)


def test_batch_with_no_behaviours_at_all():
    data = _toy(
        behaviour_goods=np.array([], dtype=np.int32),
        behaviour_cates=np.array([], dtype=np.int32),
        hist_start=np.zeros(5, dtype=np.int64),
        hist_end=np.zeros(5, dtype=np.int64),
    )
    batch = data.batch(np.arange(5), 3)
    assert batch.hist_goods.tolist() == [[0, 0, 0]] * 5 and batch.lengths.tolist() == [0] * 5


def test_batches_cover_every_sample_once():
    data = _toy()
    seen = torch.cat([b.goods for b in data.batches(2, 3)])
    assert seen.tolist() == data.goods.tolist()
    assert data.num_batches(2) == 3 and data.num_batches(2, drop_last=True) == 2
    assert sum(len(b) for b in data.batches(2, 3, drop_last=True)) == 4
    a = [b.user.tolist() + b.goods.tolist() for b in data.batches(2, 3, shuffle=True, seed=7)]
    b = [b.user.tolist() + b.goods.tolist() for b in data.batches(2, 3, shuffle=True, seed=7)]
    assert a == b
    shuffled = torch.cat([x.goods for x in data.batches(2, 3, shuffle=True, seed=7)])
    assert sorted(shuffled.tolist()) == sorted(data.goods.tolist())


def test_subset_shares_behaviours_and_truncated():
    data = _toy()
    sub = data.subset(np.array([4, 1]))
    assert np.shares_memory(sub.behaviour_goods, data.behaviour_goods)
    assert sub.goods.tolist() == [3, 3] and sub.name == "toy"
    assert len(data.subset(data.user == 2)) == 2
    cut = data.truncated(1)
    assert cut.history_lengths.tolist() == [0, 1, 1, 1, 1]
    assert data.history_lengths.tolist() == [0, 2, 3, 1, 2]  # original untouched


def test_frequencies_count_candidates_and_fed_histories():
    data = _toy()
    # histories: [], [1,2], [1,2,3], [4], [4,2]; candidates: 1,3,4,2,3
    # goods 1: 2 (hist) + 1 (cand); 2: 3 + 1; 3: 1 + 2; 4: 2 + 1
    assert data.goods_frequencies().tolist() == [0, 3, 4, 3, 3]
    # cates: behaviours 1,2,1,2,2 -> cate 1 at positions 0,2; cate 2 at 1,3,4
    # cate 1: pos0 x2 + pos2 x1 + candidates (1,1,1) = 6; cate 2: pos1 x2 + pos3 x2 + pos4 x1 + cands (2,2) = 7
    assert data.cates_frequencies().tolist() == [0, 6, 7]
    # with max_len=1 only the last item of each history counts
    assert data.goods_frequencies(max_len=1).tolist() == [0, 1, 3, 3, 2]
    assert data.users_frequencies().tolist() == [0, 3, 2]


def test_frequencies_equal_brute_force_over_batches():
    split = make_synthetic(num_users=50, num_goods=80, num_cates=5, samples_per_user=4, max_len=8, seed=1)
    data = split.train
    for max_len in (3, 8):
        counts = np.zeros(data.num_goods, dtype=np.int64)
        cate_counts = np.zeros(data.num_cates, dtype=np.int64)
        for batch in data.batches(16, max_len):
            valid = torch.arange(max_len)[None, :] < batch.lengths[:, None]
            np.add.at(counts, batch.hist_goods[valid].numpy(), 1)
            np.add.at(counts, batch.goods.numpy(), 1)
            np.add.at(cate_counts, batch.hist_cates[valid].numpy(), 1)
            np.add.at(cate_counts, batch.cate.numpy(), 1)
        assert np.array_equal(data.goods_frequencies(max_len=max_len), counts)
        assert np.array_equal(data.cates_frequencies(max_len=max_len), cate_counts)


def test_compact_keeps_batches():
    data = make_synthetic(num_users=40, num_goods=60, num_cates=4, samples_per_user=3, max_len=6, seed=2).test
    small = data.compact()
    assert small.num_behaviours < data.num_behaviours
    a, b = data.batch(np.arange(len(data)), 6), small.batch(np.arange(len(data)), 6)
    for name in Batch.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"goods": np.array([1, 3, 4, 2, 5])}, "goods"),  # id == num_goods
        ({"goods": np.array([1, 3, 0, 2, 3])}, "goods"),  # padding id as a candidate
        ({"behaviour_cates": np.array([1, 2, 1, 2, 3])}, "behaviour_cates"),
        ({"behaviour_cates": np.array([1, 2, 1, 2])}, "behaviour_cates"),
        ({"user": np.array([1, 1, 1, 2])}, "user"),
        ({"cate": np.array([1, 1, 2, 2])}, "cate"),
        ({"hist_end": np.array([0, 2, 3, 4, 6])}, "hist_end"),  # past the behaviours
        ({"hist_end": np.array([0, 2, 3, 2, 5])}, "hist_end"),  # before its start
        ({"label": np.array([1, 0, 2, 1, 0])}, "label"),
        ({"goods": np.array([1.0, 3, 4, 2, 3])}, "goods"),  # not integers
        ({"goods": np.array([1, 3, 4, 2, 2**40])}, "goods"),  # would wrap around in int32
        ({"num_goods": 0}, "num_goods"),
        ({"num_users": 2.5}, "num_users"),
        ({"user": np.array([[1, 1, 1, 2, 2]])}, "user"),
        ({"name": 3}, "name"),
    ],
)
def test_validation_names_the_argument(overrides, match):
    with pytest.raises(ValueError, match=match):
        _toy(**overrides)


def test_bad_batch_arguments():
    data = _toy()
    with pytest.raises(ValueError, match="max_len"):
        data.batch([0], 0)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(0, 3))
    with pytest.raises(ValueError, match="index"):
        data.batch(np.array([0.5]), 3)
    with pytest.raises(ValueError, match="index"):
        data.subset(np.array([True, False]))
    with pytest.raises(ValueError, match="num_cates"):
        Split(_toy(), _toy(num_cates=4))
    with pytest.raises(ValueError, match="train"):
        Split("train", _toy())


def test_interaction_data_save_load_round_trip(tmp_path):
    data = _toy().subset([1, 2])  # references only u1's behaviours
    target = data.save(tmp_path / "toy")
    loaded = InteractionData.load(target)
    assert not loaded.goods.flags.writeable  # read-only memory map
    assert loaded.num_behaviours == 3  # compacted
    assert (loaded.num_users, loaded.num_goods, loaded.num_cates, loaded.name) == (3, 5, 3, "toy")
    a, b = data.batch([0, 1], 4), loaded.batch([0, 1], 4)
    for name in Batch.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    in_memory = InteractionData.load(target, mmap=False)
    assert in_memory.goods.flags.writeable
    with pytest.raises(FileExistsError):
        data.save(target)
    _toy().save(target, overwrite=True)
    assert len(InteractionData.load(target)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no temporary folders left


def test_save_failure_leaves_nothing(tmp_path, monkeypatch):
    data = _toy()

    def broken(self, directory):
        (directory / "partial.npy").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(InteractionData, "_write", broken)
    with pytest.raises(RuntimeError):
        data.save(tmp_path / "toy")
    assert list(tmp_path.iterdir()) == []


def test_split_save_load_and_load_data(tmp_path):
    split = make_synthetic(num_users=30, num_goods=40, num_cates=4, samples_per_user=3, max_len=5, seed=3)
    target = split.save(tmp_path / "saved")
    summary = json.loads((target / "summary.json").read_text())
    assert summary["train_samples"] == len(split.train) and summary["users"] == 30
    for loaded in (Split.load(target), load_data(str(target)), load_data(target)):
        for part in ("train", "test"):
            a, b = getattr(split, part), getattr(loaded, part)
            assert (b.num_users, b.num_goods, b.num_cates) == (31, 41, 5)
            assert b.name == f"synthetic/{part}"
            x, y = a.batch(np.arange(len(a)), 5), b.batch(np.arange(len(b)), 5)
            for name in Batch.__dataclass_fields__:
                assert torch.equal(getattr(x, name), getattr(y, name)), (part, name)
    cut = load_data(str(target), max_len=2)
    assert cut.train.history_lengths.max() <= 2
    with pytest.raises(FileExistsError):
        split.save(target)
    with pytest.raises(ValueError, match="not a saved Split"):
        Split.load(tmp_path)


def test_load_data_rejects_unknown_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown data spec"):
        load_data("criteo")
    with pytest.raises(ValueError, match="neither a saved split"):
        load_data(str(tmp_path))
    with pytest.raises(ValueError, match="spec"):
        load_data(3)


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------


def _small_synthetic(**kwargs):
    args = dict(num_users=200, num_goods=300, num_cates=10, samples_per_user=8, max_len=20)
    args.update(kwargs)
    return make_synthetic(**args)


def test_synthetic_is_deterministic_per_seed():
    a, b, c = _small_synthetic(seed=5), _small_synthetic(seed=5), _small_synthetic(seed=6)
    for column in ("user", "goods", "cate", "label", "hist_start", "hist_end", "behaviour_goods"):
        assert np.array_equal(getattr(a.train, column), getattr(b.train, column)), column
        assert np.array_equal(getattr(a.test, column), getattr(b.test, column)), column
    assert not np.array_equal(a.train.goods, c.train.goods)


def test_synthetic_shape_and_split():
    split = _small_synthetic(seed=0)
    assert (split.num_users, split.num_goods, split.num_cates) == (201, 301, 11)
    assert len(split.train) + len(split.test) == 200 * 8
    assert not set(split.train.user.tolist()) & set(split.test.user.tolist())
    assert len(np.unique(split.test.user)) == 40
    for part in (split.train, split.test):
        assert part.history_lengths.max() <= 20
        assert 0.3 < part.positive_rate < 0.7
    assert (split.train.history_lengths == 0).any()  # empty histories occur
    assert split.train.goods_frequencies()[1:].min() >= 0


def test_synthetic_clicks_depend_on_candidate_related_behaviours():
    split = make_synthetic(num_users=600, samples_per_user=10, max_len=30, seed=0)
    data = split.test
    batch = data.batch(np.arange(len(data)), 30)
    same_category = (batch.hist_cates == batch.cate[:, None]).sum(dim=1).numpy()
    history_length = batch.lengths.numpy()
    # the planted count separates clicks well; history length (a candidate-blind summary) much less
    assert auc(data.label, same_category) > 0.85
    assert auc(data.label, history_length) < auc(data.label, same_category) - 0.15


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_users": 0}, "num_users"),
        ({"num_users": 1}, "num_users"),
        ({"num_goods": 5, "num_cates": 10}, "num_goods"),
        ({"max_len": 0}, "max_len"),
        ({"interests_per_user": 11}, "interests_per_user"),
        ({"noise": 0.7}, "noise"),
        ({"explore": -0.1}, "explore"),
        ({"min_history": 30, "max_history": 10}, "max_history"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"samples_per_user": 0}, "samples_per_user"),
    ],
)
def test_synthetic_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _small_synthetic(**kwargs)


def test_load_data_named_sources():
    synthetic = load_data("synthetic", max_len=10, seed=1, num_users=50, num_goods=60, num_cates=5)
    assert synthetic.train.history_lengths.max() <= 10
    movielens = load_data("movielens", max_len=10, seed=1)
    assert movielens.summary()["users"] == 610 and movielens.train.history_lengths.max() == 10

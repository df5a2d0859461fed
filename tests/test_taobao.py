"""din.data.taobao: UserBehavior clicks as next-click samples (per-user last click or a time cutoff)."""
import numpy as np
import pytest

from din.cli import main
from din.data import load_data, load_taobao, prepare_taobao
from din.data.taobao import _build_taobao, read_taobao_clicks

# user_id,item_id,category_id,behavior,timestamp -- no header, as published
EVENTS = """100,7,50,pv,1000
100,9,51,pv,900
200,7,52,pv,500
100,8,50,buy,950
100,3,51,pv,1000
200,3,51,cart,400
200,9,51,pv,600
200,3,51,pv,600
50,7,50,pv,10
300,11,53,pv,5
300,12,53,pv,6
"""
# pv only; users 50, 100, 200, 300 -> 1..4; items 3, 7, 9, 11, 12 -> 1..5 (item 8 was only bought);
# item 7 is listed under 50 and 52: its first click says 50; categories 50, 51, 53 -> 1, 2, 3
ITEM_CATE = {1: 2, 2: 1, 3: 2, 4: 3, 5: 3}


def _samples(data):
    batch = data.batch(np.arange(len(data)), 16)
    return [(int(batch.user[b]), batch.hist_goods[b, :int(batch.lengths[b])].tolist(),
             batch.hist_cates[b, :int(batch.lengths[b])].tolist(), int(batch.goods[b]), int(batch.cate[b]),
             int(batch.label[b])) for b in range(len(batch))]


@pytest.fixture
def events(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text(EVENTS)
    return path


def test_taobao_matches_hand_computed(events):
    split, stats = _build_taobao(events, seed=0)
    assert (split.num_users, split.num_goods, split.num_cates) == (5, 6, 4)
    train, test = _samples(split.train), _samples(split.test)
    # user 2 (raw 100): 9 @900, then 7 and 3 @1000 in file order -> [3, 2, 1]
    # user 3 (raw 200): 7 @500, then 9 and 3 @600 in file order -> [2, 3, 1]; the cart event is no click
    # user 4 (raw 300): [4, 5] -> only a test pair; user 1 (raw 50): one click -> nothing
    assert [(u, h, c) for u, h, _, c, _, y in train if y == 1] == [(2, [3], 2), (3, [2], 3)]
    assert [(u, h, c) for u, h, _, c, _, y in test if y == 1] == [(2, [3, 2], 1), (3, [2, 3], 1), (4, [4], 5)]
    assert [y for *_, y in train] == [1, 0, 1, 0] and [y for *_, y in test] == [1, 0] * 3
    for (u, h, _, _, _, _), (u0, h0, _, neg, _, _) in zip(train[0::2] + test[0::2], train[1::2] + test[1::2]):
        assert (u0, h0) == (u, h)
        assert neg in ({1, 2, 3} if u == 4 else {4, 5})  # never an item of the user's clicks
    for _, hist, cates, cand, cate, _ in train + test:
        assert cate == ITEM_CATE[cand] and cates == [ITEM_CATE[g] for g in hist]
    assert stats["events"] == 11 and stats["pv"] == 9 and stats["buy"] == 1 and stats["cart"] == 1
    assert stats["fav"] == 0 and stats["items_with_several_categories"] == 1
    assert (stats["first_timestamp"], stats["last_timestamp"]) == (5, 1000)


def test_taobao_time_split(events):
    # click timestamps 5, 6, 10, 500, 600, 600, 900, 1000, 1000: the 0.7 quantile ("higher") is 900, so the
    # targets at or after 900 are test targets: user 2's 7 and 3 @1000 (its 9 @900 is a first click, no target)
    split, stats = _build_taobao(events, seed=0, split="time", test_fraction=0.3)
    train, test = _samples(split.train), _samples(split.test)
    assert [(u, h, c) for u, h, _, c, _, y in test if y == 1] == [(2, [3], 2), (2, [3, 2], 1)]
    assert [(u, h, c) for u, h, _, c, _, y in train if y == 1] == [(3, [2], 3), (3, [2, 3], 1), (4, [4], 5)]
    assert [y for *_, y in train] == [1, 0] * 3 and [y for *_, y in test] == [1, 0] * 2
    assert stats["split"] == "time" and stats["test_from_timestamp"] == 900 and stats["test_fraction"] == 0.3
    assert stats["users_with_test_pair"] == 1 and stats["users_without_samples"] == 1
    # the default is the per-user last click, reported as such
    assert _build_taobao(events, seed=0)[1]["split"] == "last"


def test_taobao_time_split_bad_options(events, tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_taobao(events, split="day")
    for fraction in (0, 1, 1.5):
        with pytest.raises(ValueError, match="test_fraction must be in"):
            prepare_taobao(events, split="time", test_fraction=fraction, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before anything is written
    lone = tmp_path / "lone.csv"
    lone.write_text("1,7,50,pv,10\n2,8,50,pv,20\n")  # two users with one click each: no target at all
    with pytest.raises(ValueError, match="empty"):
        load_taobao(lone, split="time", test_fraction=0.5)


def test_prepare_taobao_time_split_cli(events, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", "taobao", "--input", str(events), "--split", "time", "--test-fraction", "0.3",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "split time" in printed and "test_from_timestamp 900" in printed
    assert load_data(str(out)).test.label.tolist() == [1, 0, 1, 0]
    # another split is another folder's worth of data: refused without --overwrite
    assert main(["prepare", "taobao", "--input", str(events), "--out", str(out)]) == 2


def test_taobao_tolerates_a_header_and_is_seeded(tmp_path, events):
    with_header = tmp_path / "with_header.csv"
    with_header.write_text("user_id,item_id,category_id,behavior,timestamp\n" + EVENTS)
    a, b = load_taobao(events, seed=4), load_taobao(with_header, seed=4)
    for column in ("user", "goods", "cate", "label", "hist_start", "hist_end"):
        assert np.array_equal(getattr(a.train, column), getattr(b.train, column))
        assert np.array_equal(getattr(a.test, column), getattr(b.test, column))
    draws = {tuple(load_taobao(events, seed=s).test.goods.tolist()) for s in range(10)}
    assert len(draws) > 1


@pytest.mark.parametrize("line, match", [
    ("100,7,50,click,1000", r":3: field 'behavior' is 'click'"),
    ("100,7,50,7,1000", r":3: field 'behavior' is '7'"),
    ("100,7,50,pv", r":3: expected 5 fields, found 4"),
    ("100,7,50,pv,1000,x", r":3: expected 5 fields, found 6"),
    ("100,x7,50,pv,1000", r":3: field 'item_id' is 'x7'"),
    ("-100,7,50,pv,1000", r":3: field 'user_id' is '-100'"),
    ("100,7,50,pv,10.5", r":3: field 'timestamp' is '10.5'"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, match):
    lines = EVENTS.splitlines()
    path = tmp_path / "ub.csv"
    path.write_text("\n".join(lines[:2] + [line] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"ub\.csv" + match):
        read_taobao_clicks(path)


def test_taobao_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        load_taobao(tmp_path / "absent.csv")
    only_buys = tmp_path / "buys.csv"
    only_buys.write_text("1,2,3,buy,4\n")
    with pytest.raises(ValueError, match="no 'pv'"):
        load_taobao(only_buys)


def test_shared_taobao_head(shared_data):
    path = shared_data / "taobao-userbehavior" / "UserBehavior_head814users.csv"
    split, stats = _build_taobao(path, seed=0)
    summary = split.summary()
    assert (summary["users"], summary["items"], summary["categories"]) == (812, 51930, 2819)
    assert stats["events"] == 84287 and stats["pv"] == 75693
    assert summary["train_samples"] == 2 * (75693 - 2 * 812) == 148138
    assert summary["test_samples"] == 2 * 812
    # each test positive: history + candidate = the user's clicks by (time, line), raw ids densely remapped
    rows = [line.split(",") for line in path.read_text().splitlines()]
    clicks = sorted((int(r[0]), int(r[4]), k, int(r[1])) for k, r in enumerate(rows) if r[3] == "pv")
    items = sorted({c[3] for c in clicks})
    item_id = {raw: k + 1 for k, raw in enumerate(items)}
    users = sorted({c[0] for c in clicks})
    sequences = {}
    for user, _, _, item in clicks:
        sequences.setdefault(user, []).append(item_id[item])
    test = split.test.batch(np.arange(len(split.test)), 600)
    for b in range(0, len(test), 2):
        user = users[int(test.user[b]) - 1]
        n = int(test.lengths[b])
        assert test.hist_goods[b, :n].tolist() + [int(test.goods[b])] == sequences[user]
        assert int(test.goods[b + 1]) not in sequences[user]

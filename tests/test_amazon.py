"""din.data.amazon: the raw 2014 files and the remapped CSVs, with the official build_dataset protocol."""
import csv
import json

import numpy as np
import pytest

from din.data import InteractionData, load_amazon, load_amazon_csv
from din.data.amazon import (
    NO_CATEGORY,
    _build_amazon,
    next_item_split,
    parse_literal_line,
    read_amazon_reviews,
    sample_negatives,
)

# ---------------------------------------------------------------------------------------------
# tiny raw files in the published format: reviews one JSON dict per line (a Python-literal line
# too, as the official reader eval()s every line), metadata one Python-literal dict per line
# ---------------------------------------------------------------------------------------------

REVIEWS = [
    # B7 reviews X03, X01, X02 out of time order; A1 reviews X02, X04 and Z99 (no metadata); U2 one review
    '{"reviewerID": "B7", "asin": "X03", "reviewerName": "b", "helpful": [0, 0], "reviewText": "ok", '
    '"overall": 5.0, "summary": "s", "unixReviewTime": 300, "reviewTime": "01 1, 1970"}',
    '{"reviewerID": "A1", "asin": "X02", "overall": 4.0, "unixReviewTime": 50}',
    "{'reviewerID': 'B7', 'asin': 'X01', 'reviewText': \"it's fine\", 'unixReviewTime': 100}",
    '{"reviewerID": "U2", "asin": "X05", "unixReviewTime": 10}',
    '{"reviewerID": "A1", "asin": "Z99", "unixReviewTime": 70}',
    '{"reviewerID": "B7", "asin": "X02", "unixReviewTime": 200}',
    '{"reviewerID": "A1", "asin": "X04", "unixReviewTime": 60}',
]
META = [
    "{'asin': 'Q00', 'categories': [['Zzz']]}",  # never reviewed: not in any vocabulary
    "{'asin': 'X01', 'title': 'One', 'categories': [['Electronics', 'Audio'], ['Electronics', 'Cables', 'HDMI']]}",
    "{'asin': 'X02', 'title': \"Bob's\", 'related': {'also_bought': ['X01']}, "
    "'categories': [['Electronics', 'Audio']]}",
    "{'asin': 'X03', 'categories': [['Books']], 'price': 3.5}",
    "{'asin': 'X04', 'categories': [[]]}",  # no category
    '{"asin": "X05", "categories": [["Electronics", "Audio"]]}',
    "{'asin': 'X01', 'categories': [['Later duplicate']]}",  # an asin listed twice keeps its first line
]
# remap by sorted key: reviewers A1 -> 1, B7 -> 2, U2 -> 3; asins X01..X05 -> 1..5;
# categories "(no category)" -> 1, Audio -> 2, Books -> 3, HDMI -> 4 (the last of the LAST list)
ITEM_CATE = {1: 4, 2: 2, 3: 3, 4: 1, 5: 2}


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def raw_files(tmp_path):
    return _write(tmp_path / "reviews_Tiny_5.json", REVIEWS), _write(tmp_path / "meta_Tiny.json", META)


def samples(data: InteractionData):
    """[(user, history goods, history cates, candidate, candidate cate, label)] in sample order."""
    batch = data.batch(np.arange(len(data)), 64)
    rows = []
    for b in range(len(batch)):
        n = int(batch.lengths[b])
        rows.append((int(batch.user[b]), batch.hist_goods[b, :n].tolist(), batch.hist_cates[b, :n].tolist(),
                     int(batch.goods[b]), int(batch.cate[b]), int(batch.label[b])))
    return rows


def test_raw_amazon_matches_hand_computed(raw_files):
    split, stats = _build_amazon(*raw_files, seed=0)
    assert (split.num_users, split.num_goods, split.num_cates) == (4, 6, 5)
    train, test = samples(split.train), samples(split.test)
    # B7 (user 2): items 1, 2, 3 in time order; position 1 -> train pair, position 2 -> test pair
    assert [row[:5] for row in train] == [(2, [1], [4], 2, 2), (2, [1], [4], train[1][3], train[1][4])]
    assert [row[5] for row in train] == [1, 0]
    # A1 (user 1): items 2, 4 (Z99 has no metadata: dropped) -> only a test pair; U2 -> nothing
    assert [row[:2] + row[3:4] + row[5:] for row in test] == [
        (1, [2], 4, 1), (1, [2], test[1][3], 0), (2, [1, 2], 3, 1), (2, [1, 2], test[3][3], 0)]
    assert test[0][2] == [2] and test[2][2] == [4, 2]
    # negatives: never one of the user's items, and carry their own category
    assert train[1][3] in (4, 5) and test[3][3] in (4, 5)
    assert test[1][3] in (1, 3, 5)
    for row in train + test:
        assert row[4] == ITEM_CATE[row[3]]
        assert row[2] == [ITEM_CATE[g] for g in row[1]]
    assert stats["reviews"] == 7 and stats["reviews_without_meta"] == 1 and stats["items_without_meta"] == 1
    assert stats["items_without_category"] == 1 and stats["meta_duplicates"] == 1
    assert stats["users_with_test_pair"] == 2 and stats["users_without_samples"] == 1
    summary = split.summary()
    assert (summary["users"], summary["items"], summary["categories"]) == (3, 5, 4)
    assert (summary["train_samples"], summary["test_samples"]) == (2, 4)


def test_raw_amazon_is_seeded(raw_files):
    runs = [[load_amazon(*raw_files, seed=s).test.goods.tolist() for s in seeds] for seeds in ((0, 1), (0, 1))]
    assert runs[0] == runs[1]
    negatives = {tuple(load_amazon(*raw_files, seed=s).test.goods[1::2].tolist()) for s in range(20)}
    assert len(negatives) > 1  # the seed matters


def test_category_is_the_last_entry_of_the_last_list_and_keys_sort(raw_files):
    split = load_amazon(*raw_files)
    goods = np.concatenate([split.train.behaviour_goods, split.test.goods])
    cates = np.concatenate([split.train.behaviour_cates, split.test.cate])
    assert {int(g): int(c) for g, c in zip(goods, cates)}.items() <= ITEM_CATE.items()
    assert NO_CATEGORY < "Audio" < "Books" < "HDMI"  # the order the ids above rely on


def test_literal_eval_never_executes_code(tmp_path, raw_files):
    marker = tmp_path / "PWNED"
    attack = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    reviews = _write(tmp_path / "reviews_Bad_5.json", REVIEWS[:2] + [attack] + REVIEWS[2:])
    with pytest.raises(ValueError, match=r"reviews_Bad_5\.json:3: not a JSON or Python-literal dict"):
        load_amazon(reviews, raw_files[1])
    meta = _write(tmp_path / "meta_Bad.json", META[:4] + ["{'asin': 'X05', 'categories': " + attack + "}"])
    with pytest.raises(ValueError, match=r"meta_Bad\.json:5:"):
        load_amazon(raw_files[0], meta)
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a JSON"):
        parse_literal_line(b"{'a': (lambda: 1)()}", "f", 1)


@pytest.mark.parametrize("line, match", [
    ('{"reviewerID": "A1", "asin": "X01"', r":2: not a JSON or Python-literal dict"),  # truncated
    ('{"reviewerID": "A1", "unixReviewTime": 5}', r":2: review lacks the field 'asin'"),
    ('{"reviewerID": "A1", "asin": "X01", "unixReviewTime": "5"}', r":2: reviewerID and asin must be strings"),
    ('["A1", "X01", 5]', r":2: expected a dict, found list"),
])
def test_malformed_review_lines_name_file_and_line(tmp_path, line, match):
    path = _write(tmp_path / "reviews_X_5.json", [REVIEWS[0], line, REVIEWS[1]])
    with pytest.raises(ValueError, match=r"reviews_X_5\.json" + match):
        read_amazon_reviews(path)


def test_raw_amazon_bad_inputs(tmp_path, raw_files):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_amazon(tmp_path / "missing.json", raw_files[1])
    with pytest.raises(FileNotFoundError, match="meta_missing"):
        load_amazon(raw_files[0], tmp_path / "meta_missing.json")
    empty = _write(tmp_path / "empty.json", [""])
    with pytest.raises(ValueError, match="holds no reviews"):
        load_amazon(empty, raw_files[1])
    unrelated = _write(tmp_path / "meta_Other.json", ["{'asin': 'Q00', 'categories': [['Zzz']]}"])
    with pytest.raises(ValueError, match="none of the 6 reviewed items"):
        load_amazon(raw_files[0], unrelated)
    bad_categories = _write(tmp_path / "meta_Bad.json", ["{'asin': 'X01', 'categories': 'Audio'}"])
    with pytest.raises(ValueError, match=r"meta_Bad\.json:1: categories must be a list of lists"):
        load_amazon(raw_files[0], bad_categories)


# ---------------------------------------------------------------------------------------------
# the protocol against a line-by-line transcription of the official build_dataset.py
# ---------------------------------------------------------------------------------------------


def official_build_dataset(sequences, negatives):
    """zhougr1993/DeepInterestNetwork din/build_dataset.py, with the negatives given (not drawn)."""
    train_set, test_set = [], []
    for user in sorted(sequences):
        pos_list, neg_list = sequences[user], negatives[user]
        for i in range(1, len(pos_list)):
            hist = pos_list[:i]
            if i != len(pos_list) - 1:
                train_set.append((user, hist, pos_list[i], 1))
                train_set.append((user, hist, neg_list[i], 0))
            else:
                test_set.append((user, hist, (pos_list[i], neg_list[i])))
    return train_set, test_set


def test_next_item_split_equals_the_official_loop():
    rng = np.random.default_rng(7)
    num_users, num_items, num_cates = 40, 30, 6
    lengths = rng.integers(1, 12, size=num_users)  # includes single-review users (no samples)
    user = np.repeat(np.arange(1, num_users + 1), lengths)
    item = rng.integers(1, num_items + 1, size=len(user))  # repeated items allowed
    item_cate = np.concatenate(([0], rng.integers(1, num_cates + 1, size=num_items)))
    split, _ = next_item_split(user, item, item_cate, num_users=num_users, num_items=num_items,
                               num_cates=num_cates, seed=3, name="t")
    train, test = samples(split.train), samples(split.test)
    sequences = {u: item[user == u].tolist() for u in range(1, num_users + 1)}
    # read our negatives back: every negative is at its position's slot in the official neg_list
    negatives = {u: [None] * len(seq) for u, seq in sequences.items()}
    for u, hist, _, cand, _, label in train + test:
        if label == 0:
            negatives[u][len(hist)] = cand
    expected_train, expected_test = official_build_dataset(sequences, negatives)
    assert [(u, h, c, y) for u, h, _, c, _, y in train] == expected_train
    assert [(u, h, (c, n)) for (u, h, _, c, _, _), (_, _, _, n, _, _) in zip(test[0::2], test[1::2])] == expected_test
    for u, hist, cates, cand, cate, label in train + test:
        assert cate == item_cate[cand] and cates == item_cate[hist].tolist()
        if label == 0:
            assert cand not in sequences[u] and 1 <= cand <= num_items
    assert len(test) == 2 * int((lengths >= 2).sum())
    assert split.train.positive_rate == 0.5 and split.test.positive_rate == 0.5


def test_next_item_split_needs_grouped_users():
    with pytest.raises(ValueError, match="grouped"):
        next_item_split(np.array([1, 2, 1]), np.array([1, 2, 3]), np.arange(5), num_users=2, num_items=4,
                        num_cates=4, seed=0, name="t")


def test_negatives_are_uniform_over_the_items_never_seen():
    user = np.array([1, 1, 1, 1, 2, 3, 3])
    item = np.array([5, 1, 2, 5, 6, 1, 6])
    query = np.repeat([1, 2, 3], 30000)
    draws = sample_negatives(user, item, query, num_items=6, seed=0)
    for u, allowed in ((1, {3, 4, 6}), (2, {1, 2, 3, 4, 5}), (3, {2, 3, 4, 5})):
        mine = draws[query == u]
        values, counts = np.unique(mine, return_counts=True)
        assert set(values.tolist()) == allowed
        assert np.allclose(counts / len(mine), 1 / len(allowed), atol=0.01)
    assert np.array_equal(draws, sample_negatives(user, item, query, num_items=6, seed=0))
    with pytest.raises(ValueError, match="has every one of the 3 items"):
        sample_negatives(np.array([1, 1, 1]), np.array([1, 2, 3]), np.array([1]), num_items=3, seed=0)


# ---------------------------------------------------------------------------------------------
# the remapped CSV format
# ---------------------------------------------------------------------------------------------

CSV_REVIEWS = """user_id,item_id,day
1,3,20
0,2,11
0,0,10
1,1,20
0,1,12
1,0,19
"""
CSV_ITEM_CATE = """item_id,cate_id
0,1
1,0
2,1
3,2
"""


@pytest.fixture
def csv_files(tmp_path):
    reviews, cates = tmp_path / "Tiny_reviews.csv", tmp_path / "Tiny_item_cate.csv"
    reviews.write_text(CSV_REVIEWS)
    cates.write_text(CSV_ITEM_CATE)
    return reviews, cates


def test_amazon_csv_shifts_ids_and_follows_the_protocol(csv_files):
    split = load_amazon_csv(*csv_files, seed=0)
    assert (split.num_users, split.num_goods, split.num_cates) == (3, 5, 4)
    cate = {1: 2, 2: 1, 3: 2, 4: 3}  # 0-based ids + 1
    train, test = samples(split.train), samples(split.test)
    # user 1 (raw 0): days 10, 11, 12 -> items 1, 3, 2; user 2 (raw 1): day 19 item 1, then on day 20
    # items 4 and 2 in file order
    assert [(u, h, c, y) for u, h, _, c, _, y in train if y == 1] == [(1, [1], 3, 1), (2, [1], 4, 1)]
    assert [(u, h, c, y) for u, h, _, c, _, y in test if y == 1] == [(1, [1, 3], 2, 1), (2, [1, 4], 2, 1)]
    negatives = {(u, len(h)): c for u, h, _, c, _, y in train + test if y == 0}
    assert negatives[(1, 1)] == 4 and negatives[(1, 2)] == 4  # user 1 has every item but 4
    assert negatives[(2, 1)] == 3 and negatives[(2, 2)] == 3
    for _, hist, cates, cand, cand_cate, _ in train + test:
        assert cand_cate == cate[cand] and cates == [cate[g] for g in hist]


def test_amazon_csv_bad_inputs(tmp_path, csv_files):
    reviews, cates = csv_files
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_amazon_csv(tmp_path / "nope.csv", cates)
    bad = tmp_path / "bad_reviews.csv"
    bad.write_text(CSV_REVIEWS.replace("user_id,item_id,day", "user,item_id,day"))
    with pytest.raises(ValueError, match=r"bad_reviews\.csv: header .* lacks column\(s\) \['user_id'\]"):
        load_amazon_csv(bad, cates)
    bad.write_text(CSV_REVIEWS.replace("0,1,12", "0,one,12"))
    with pytest.raises(ValueError, match=r"bad_reviews\.csv:6: field 'item_id' is 'one'"):
        load_amazon_csv(bad, cates)
    bad.write_text(CSV_REVIEWS.replace("0,1,12", "0,1"))
    with pytest.raises(ValueError, match=r"bad_reviews\.csv:6: expected 3 fields, found 2"):
        load_amazon_csv(bad, cates)
    bad.write_text(CSV_REVIEWS + "0,9,30\n")
    with pytest.raises(ValueError, match="item_id 9 has no row in"):
        load_amazon_csv(bad, cates)
    dup = tmp_path / "dup_item_cate.csv"
    dup.write_text(CSV_ITEM_CATE + "3,0\n")
    with pytest.raises(ValueError, match="listed more than once"):
        load_amazon_csv(reviews, dup)


# ---------------------------------------------------------------------------------------------
# the shared remapped copy (Amazon Beauty): sizes, and samples against a plain Python reading
# ---------------------------------------------------------------------------------------------


def test_shared_amazon_beauty(shared_data):
    root = shared_data / "amazon-tlsan-remap"
    split = load_amazon_csv(root / "Beauty_reviews.csv", root / "Beauty_item_cate.csv", seed=0)
    summary = split.summary()
    assert (summary["users"], summary["items"], summary["categories"]) == (3783, 2658, 179)
    rows = 54225
    assert summary["train_samples"] == 2 * (rows - 2 * 3783) == 93318
    assert summary["test_samples"] == 2 * 3783
    with open(root / "Beauty_reviews.csv", newline="") as handle:
        records = [(int(r["user_id"]), int(r["day"]), k, int(r["item_id"]))
                   for k, r in enumerate(csv.DictReader(handle))]
    with open(root / "Beauty_item_cate.csv", newline="") as handle:
        item_cate = {int(r["item_id"]) + 1: int(r["cate_id"]) + 1 for r in csv.DictReader(handle)}
    sequences = {}
    for user, _, _, item in sorted(records):
        sequences.setdefault(user + 1, []).append(item + 1)
    test = split.test.batch(np.arange(len(split.test)), 1000)
    for b in range(0, len(test), 2):  # positives at even positions, their negatives right after
        user = int(test.user[b])
        n = int(test.lengths[b])
        assert test.hist_goods[b, :n].tolist() + [int(test.goods[b])] == sequences[user]
        assert int(test.goods[b + 1]) not in sequences[user]
        assert int(test.cate[b + 1]) == item_cate[int(test.goods[b + 1])]
        assert test.hist_cates[b, :n].tolist() == [item_cate[i] for i in sequences[user][:-1]]
    assert len(sequences) == 3783
    json.dumps(summary)  # JSON-serialisable as is

"""`din prepare csv`: your own interaction log with named columns, string ids, with or without labels."""
import json
import sys

import numpy as np
import pytest

import din.data.interactions as interactions_module
from din.cli import main as din_main
from din.data import Split, load_data, load_interaction_log, load_taobao, prepare_interaction_log
from din.data.interactions import read_interaction_log
from din.prepare import main as prepare_main

COLUMNS = dict(user_col="user_id", item_col="item_id", category_col="cate_id", time_col="ts")
FLAGS = ["--user-col", "user_id", "--item-col", "item_id", "--category-col", "cate_id", "--time-col", "ts"]


def _click_log(seed=0, users=12, items=9):
    """Rows (user, item, category, time) with single-digit numbers, so that the text ids 'u3', 'i5', 'c2'
    sort as the numbers do: the CSV log and a Taobao file of the same clicks remap to the same dense ids."""
    rng = np.random.default_rng(seed)
    cate_of = rng.integers(0, 4, items)
    rows = []
    for user in range(users):
        for _ in range(rng.integers(1, 7)):
            item = int(rng.integers(0, items))
            rows.append((user, item, int(cate_of[item]), int(rng.integers(0, 50))))
    return rows


def _write_click_csv(path, rows, extra_column=True):
    lines = ["user_id,ts,item_id,other,cate_id" if extra_column else "user_id,item_id,cate_id,ts"]
    for user, item, cate, ts in rows:
        lines.append(f"u{user:02d},{ts},i{item},x,c{cate}" if extra_column else f"u{user:02d},i{item},c{cate},{ts}")
    path.write_text("\n".join(lines) + "\n")


def _same(a: Split, b: Split) -> None:
    assert (a.num_users, a.num_goods, a.num_cates) == (b.num_users, b.num_goods, b.num_cates)
    for part in ("train", "test"):
        x, y = getattr(a, part), getattr(b, part)
        for name in ("behaviour_goods", "behaviour_cates", "user", "hist_start", "hist_end", "goods", "cate", "label"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), (part, name)


def _fail(*args, **kwargs):
    raise AssertionError("the log was parsed again")


# ---------------------------------------------------------------------------------------------
# without a label column: every row a click, the Taobao protocol
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["last", "time"])
def test_clicks_are_the_taobao_protocol(tmp_path, split):
    rows = _click_log()
    _write_click_csv(tmp_path / "log.csv", rows)
    (tmp_path / "ub.csv").write_text("".join(f"{u},{i},{c},pv,{t}\n" for u, i, c, t in rows))
    options = {} if split == "last" else {"split": "time", "test_fraction": 0.25}
    ours = load_interaction_log(tmp_path / "log.csv", seed=4, **COLUMNS, **options)
    _same(ours, load_taobao(tmp_path / "ub.csv", seed=4, **options))
    assert ours.train.name == "log/train"


def test_prepare_csv_end_to_end_then_train(tmp_path, capsys, monkeypatch):
    rows = _click_log(users=30)
    log = tmp_path / "log.csv"
    _write_click_csv(log, rows)
    out = tmp_path / "prepared"
    assert din_main(["prepare", "csv", "--input", str(log), *FLAGS, "--out", str(out), "--seed", "2"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(str(out)) and "prepared csv" in printed.err
    summary = json.loads((out / "summary.json").read_text())
    users = {u for u, _, _, _ in rows}
    items = {i for _, i, _, _ in rows}
    clicks_per_user = np.bincount([u for u, _, _, _ in rows])
    assert (summary["users"], summary["items"]) == (len(users), len(items))
    assert summary["categories"] == len({c for _, _, c, _ in rows})
    assert summary["rows"] == summary["behaviours"] == len(rows)
    assert summary["test_samples"] == 2 * int((clicks_per_user >= 2).sum())  # a test pair per user with 2 clicks
    assert summary["train_samples"] == 2 * int(np.maximum(clicks_per_user - 2, 0).sum())
    assert summary["source"] == "csv" and summary["split"] == "last" and summary["input_format"] == "csv"
    assert summary["options"] == {"columns": {"user": "user_id", "item": "item_id", "category": "cate_id",
                                              "time": "ts"}, "delimiter": ",", "split": "last",
                                  "test_fraction": None, "seed": 2}

    # a second run with the same file and options reuses the folder without reading the file
    monkeypatch.setattr(interactions_module, "_build", _fail)
    assert din_main(["prepare", "csv", "--input", str(log), *FLAGS, "--out", str(out), "--seed", "2"]) == 0
    assert "reusing" in capsys.readouterr().err
    assert prepare_interaction_log(log, seed=2, out=out, **COLUMNS).reused
    with pytest.raises(AssertionError, match="parsed again"):  # other options: a new key
        prepare_interaction_log(log, seed=3, cache_dir=tmp_path / "cache", **COLUMNS)
    monkeypatch.undo()
    cached = prepare_interaction_log(log, seed=3, cache_dir=tmp_path / "cache", **COLUMNS)
    assert cached.path.parent == tmp_path / "cache" and cached.path.name.startswith("csv-")

    assert din_main(["train", "--data", str(out), "--epochs", "1", "--batch-size", "8", "--max-len", "4",
                     "--quiet", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and metrics["data"]["test_samples"] == summary["test_samples"]
    assert metrics["data"]["train_samples"] + metrics["data"]["valid_samples"] == summary["train_samples"]


def test_string_ids_are_remapped_densely_in_sorted_order(tmp_path):
    log = tmp_path / "log.tsv"  # a tab-separated file: the default delimiter of .tsv
    log.write_text("who\twhat\tkind\twhen\n"
                   " Zoë \tB00X\tbooks, used\t3\n"  # spaces around ids are dropped; commas are plain text here
                   "bob\t\"a\tb\"\tpens\t2.5\n"      # a quoted field may hold the delimiter
                   "Zoë\tB00X\tbooks, used\t1\n"
                   "\n"                               # a blank line is skipped
                   "bob\tB00X\tpens\t2.5\n"          # equal times keep file order
                   "bob\tz-9\tpens\t0\n"
                   "carl\tq-1\tpens\t7\n", encoding="utf-8")
    columns = {"user": "who", "item": "what", "category": "kind", "time": "when"}
    raw = read_interaction_log(log, columns)
    # sorted text: users 'Zoë' < 'bob' < 'carl'; items 'B00X' < 'a\tb' < 'q-1' < 'z-9'; 'books, used' < 'pens'
    assert raw["user"].tolist() == [0, 1, 0, 1, 1, 2]
    assert raw["item"].tolist() == [0, 1, 0, 0, 3, 2]
    assert raw["category"].tolist() == [0, 1, 0, 1, 1, 1]
    assert raw["time"].dtype == np.float64 and raw["time"].tolist() == [3, 2.5, 1, 2.5, 0, 7]
    split = load_interaction_log(log, user_col="who", item_col="what", category_col="kind", time_col="when")
    assert (split.num_users, split.num_goods, split.num_cates) == (4, 5, 3)
    test = split.test
    # Zoë (1): B00X at time 1, then again at 3; bob (2): z-9, 'a\tb', B00X (the last two at the same time, in
    # file order); carl (3) clicked once and has no sample
    assert test.user.tolist() == [1, 1, 2, 2] and test.goods[0::2].tolist() == [1, 1]
    assert test.behaviour_goods[test.hist_start[0]:test.hist_end[0]].tolist() == [1]
    assert test.behaviour_goods[test.hist_start[2]:test.hist_end[2]].tolist() == [4, 2]
    # each item's category is the one of its first row: B00X is 'books, used' although bob files it under pens
    assert test.cate[0::2].tolist() == [1, 1]
    assert test.behaviour_cates[test.hist_start[2]:test.hist_end[2]].tolist() == [2, 2]
    assert split.train.goods[0::2].tolist() == [2] and split.train.user.tolist() == [2, 2]
    summary = prepare_interaction_log(log, user_col="who", item_col="what", category_col="kind", time_col="when",
                                      out=tmp_path / "prepared").summary
    assert summary["items_with_several_categories"] == 1 and summary["users_without_samples"] == 1
    assert summary["options"]["delimiter"] == "\t" and summary["name"] == "log"


# ---------------------------------------------------------------------------------------------
# with a label column: every row a sample, histories of the earlier label-1 rows
# ---------------------------------------------------------------------------------------------


def _labelled_log(path, seed=0, users=20):
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(users):
        for _ in range(rng.integers(2, 9)):
            rows.append((f"user-{user}", f"item-{rng.integers(0, 15)}", int(rng.integers(0, 30)),
                         int(rng.random() < 0.6)))
    rows[0] = rows[0][:3] + (1,)
    rows[1] = rows[1][:3] + (0,)
    cate = {f"item-{k}": f"cat-{k % 4}" for k in range(15)}
    path.write_text("user_id,item_id,cate_id,ts,clicked\n" + "".join(
        f"{u},{i},{cate[i]},{t},{['false', 'true'][y] if n % 3 == 0 else y}\n" for n, (u, i, t, y) in enumerate(rows)))
    return rows, cate


def _expected_samples(rows):
    """Per raw (user, row) order: (user, item, label, history items) by the naive definition."""
    samples = []
    for user in sorted({u for u, _, _, _ in rows}):
        mine = sorted([(t, n, i, y) for n, (u, i, t, y) in enumerate(rows) if u == user])
        for k, (t, n, item, y) in enumerate(mine):
            samples.append((user, item, y, [i for _, _, i, yy in mine[:k] if yy == 1], t))
    return samples


def _decoded(data, users, items):
    def history(k):
        return [items[g - 1] for g in data.behaviour_goods[data.hist_start[k]:data.hist_end[k]]]

    return [(users[data.user[k] - 1], items[data.goods[k] - 1], int(data.label[k]), history(k))
            for k in range(len(data))]


@pytest.mark.parametrize("split", ["user", "time"])
def test_labelled_rows_are_samples_with_earlier_positive_histories(tmp_path, split):
    rows, cate = _labelled_log(tmp_path / "log.csv")
    users, items = sorted({r[0] for r in rows}), sorted({r[1] for r in rows})
    result = load_interaction_log(tmp_path / "log.csv", label_col="clicked", split=split, **COLUMNS)
    assert (result.num_users, result.num_goods, result.num_cates) == (len(users) + 1, len(items) + 1, 5)
    expected = _expected_samples(rows)
    got = _decoded(result.train, users, items) + _decoded(result.test, users, items)
    assert sorted(got) == sorted(sample[:4] for sample in expected)
    cate_names = sorted(set(cate.values()))
    for data in (result.train, result.test):
        assert all(cate[items[g - 1]] == cate_names[c - 1] for g, c in zip(data.goods, data.cate))
    if split == "user":
        train_users, test_users = set(result.train.user.tolist()), set(result.test.user.tolist())
        assert not train_users & test_users and len(test_users) == round(0.2 * len(users))
    else:
        times = sorted(t for _, _, t, _ in rows)
        cutoff = times[int(np.ceil(0.9 * (len(times) - 1)))]  # the 0.9 quantile, 'higher'
        test_rows = {(s[0], s[1], s[2], tuple(s[3])) for s in expected if s[4] >= cutoff}
        assert {(u, i, y, tuple(h)) for u, i, y, h in _decoded(result.test, users, items)} == test_rows
        assert len(result.test) == sum(s[4] >= cutoff for s in expected)


def test_prepare_labelled_log_then_train(tmp_path, capsys):
    rows, _ = _labelled_log(tmp_path / "log.csv", users=40)
    out = tmp_path / "prepared"
    assert din_main(["prepare", "csv", "--input", str(tmp_path / "log.csv"), *FLAGS, "--label-col", "clicked",
                     "--split", "time", "--test-fraction", "0.3", "--out", str(out)]) == 0
    assert "positive_rows" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == summary["train_samples"] + summary["test_samples"] == len(rows)
    assert summary["positive_rows"] == summary["behaviours"] == sum(y for *_, y in rows)
    assert summary["split"] == "time" and summary["test_fraction"] == 0.3
    assert summary["test_from_timestamp"] in {t for _, _, t, _ in rows}
    assert summary["options"]["columns"]["label"] == "clicked"
    assert din_main(["train", "--data", str(out), "--epochs", "1", "--batch-size", "16", "--max-len", "4",
                     "--quiet", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and metrics["data"]["test_samples"] == summary["test_samples"]
    split = load_data(str(out))
    assert len(split.train) + len(split.test) == len(rows)


# ---------------------------------------------------------------------------------------------
# errors: one line each, naming the file and the line
# ---------------------------------------------------------------------------------------------

HEADER = "user_id,item_id,cate_id,ts,clicked\n"
GOOD = "u1,i1,c1,1,1\nu1,i2,c1,2,0\n"


@pytest.mark.parametrize("body, message", [
    (GOOD + "u2,i1,c1,abc,1\n", r"log\.csv:4: column 'ts' \(the time\) is not a number: 'abc'"),
    (GOOD + "\n\nu2,i1,c1,nan,1\n", r"log\.csv:6: column 'ts' \(the time\) is not a finite number: 'nan'"),
    (GOOD + "u2,i1,c1,,1\n", r"log\.csv:4: column 'ts' \(the time\) is not a number: ''"),
    (GOOD + "u2,i1,c1,3,2\n",
     r"log\.csv:4: column 'clicked' \(the label\) must be 0 or 1 \(or false/true\), found '2'"),
    (GOOD + "u2,i1,c1,3,yes\n", r"log\.csv:4: column 'clicked' \(the label\) must be 0 or 1"),
    (GOOD + "u2,i1,c1,3\n", r"log\.csv:4: expected 5 fields as in the header, found 4: 'u2,i1,c1,3'"),
    (GOOD + "u2,i1,c1,3,1,9\n", r"log\.csv:4: expected 5 fields as in the header, found 6"),
    (GOOD + " ,i1,c1,3,1\n", r"log\.csv:4: column 'user_id' \(the user id\) is empty"),
    (GOOD + "u2,i1,,3,1\n", r"log\.csv:4: column 'cate_id' \(the category id\) is empty"),
    (GOOD + 'u2,"i1"x,c1,3,1\n', r"log\.csv:4: ',' expected after '\"'"),
    ("", r"log\.csv is empty: expected a header line"),
    ("\nu1,i1,c1,1,1\n", r"log\.csv:1: the first line must be the header"),
])
def test_malformed_rows_are_reported_with_their_line(tmp_path, body, message):
    log = tmp_path / "log.csv"
    log.write_text(body if body.startswith("\n") or not body else HEADER + body)
    with pytest.raises(ValueError, match=message):
        load_interaction_log(log, label_col="clicked", **COLUMNS)


def test_header_errors_list_every_missing_column(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("user,item_id,cate_id,time\nu1,i1,c1,1\n")
    with pytest.raises(ValueError, match=r"log\.csv: the header \['user', 'item_id', 'cate_id', 'time'\] has no "
                                         r"column 'user_id' \(the user column\), 'ts' \(the time column\), "
                                         r"'clicked' \(the label column\)"):
        load_interaction_log(log, label_col="clicked", **COLUMNS)
    log.write_text("user_id,item_id,cate_id,ts\n")
    with pytest.raises(ValueError, match="has a header but no rows"):
        load_interaction_log(log, **COLUMNS)
    log.write_text("user_id,item_id,ts,cate_id,ts\nu1,i1,1,c,2\n")
    with pytest.raises(ValueError, match=r"names 'ts' more than once"):
        load_interaction_log(log, **COLUMNS)
    # the command line: exit 2 and one line
    assert prepare_main(["csv", "--input", str(log), *FLAGS, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "more than once" in err
    assert not (tmp_path / "o").exists()


def test_labels_that_teach_nothing_and_option_errors(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text(HEADER + "u1,i1,c1,1,0\nu2,i2,c1,2,0\n")
    with pytest.raises(ValueError, match="no row has label 1 in column 'clicked'"):
        load_interaction_log(log, label_col="clicked", **COLUMNS)
    log.write_text(HEADER + "u1,i1,c1,1,1\nu2,i2,c1,2,true\n")
    with pytest.raises(ValueError, match="every row has label 1 .*leave the label column out"):
        load_interaction_log(log, label_col="clicked", **COLUMNS)
    with pytest.raises(ValueError, match=r"split must be one of \('user', 'time'\) \(with a label column"):
        load_interaction_log(log, label_col="clicked", split="last", **COLUMNS)
    with pytest.raises(ValueError, match=r"split must be one of \('last', 'time'\) \(without a label column"):
        load_interaction_log(log, split="user", **COLUMNS)
    with pytest.raises(ValueError, match="test_fraction applies to split 'time'"):
        load_interaction_log(log, test_fraction=0.2, **COLUMNS)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        load_interaction_log(log, split="time", test_fraction=1.5, **COLUMNS)
    with pytest.raises(ValueError, match="delimiter must be one character"):
        load_interaction_log(log, delimiter="::", **COLUMNS)
    with pytest.raises(ValueError, match="time_col must be a non-empty column name, got ''"):
        load_interaction_log(log, **{**COLUMNS, "time_col": ""})
    with pytest.raises(FileNotFoundError, match="absent.csv not found"):
        load_interaction_log(tmp_path / "absent.csv", **COLUMNS)
    assert prepare_main(["csv", "--input", str(log), *FLAGS, "--split", "user"]) == 2
    assert "split must be one of ('last', 'time')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_main(["csv", "--input", str(log), "--user-col", "user_id"])  # the other columns are required


def test_other_delimiters(tmp_path):
    rows = _click_log(seed=3)
    _write_click_csv(tmp_path / "log.csv", rows, extra_column=False)
    reference = load_interaction_log(tmp_path / "log.csv", **COLUMNS)
    names = {"user": "user_id", "item": "item_id", "category": "cate_id", "time": "ts"}
    assert read_interaction_log(tmp_path / "log.csv", names)["time"].dtype == np.int64  # integer times stay exact
    for delimiter, given in ((";", ";"), ("\t", "tab"), ("\t", "\\t")):
        other = tmp_path / f"log-{len(given)}.txt"
        other.write_text((tmp_path / "log.csv").read_text().replace(",", delimiter))
        _same(reference, load_interaction_log(other, delimiter=given, **COLUMNS))
    own = load_interaction_log(tmp_path / "log.csv", **{**COLUMNS, "category_col": "item_id"})  # no categories
    assert own.num_cates == own.num_goods == reference.num_goods
    assert np.array_equal(own.train.cate, own.train.goods) and np.array_equal(own.test.cate, own.test.goods)
    with pytest.raises(ValueError, match="has no column"):  # a wrong delimiter finds one big column
        load_interaction_log(tmp_path / "log-1.txt", **COLUMNS)


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------


def test_parquet_without_pyarrow_is_one_clear_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "log.parquet"
    path.write_bytes(b"PAR1 not really")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"log\.parquet: reading Parquet needs pyarrow, which is not installed"):
        load_interaction_log(path, **COLUMNS)
    assert prepare_main(["csv", "--input", str(path), *FLAGS, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install pyarrow" in err
    with pytest.raises(ValueError, match="delimiter applies to CSV files"):
        load_interaction_log(path, delimiter=";", **COLUMNS)


def test_parquet_reads_like_the_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows, _ = _labelled_log(tmp_path / "log.csv")
    cate = {f"item-{k}": f"cat-{k % 4}" for k in range(15)}
    table = pa.table({
        "user_id": [u for u, _, _, _ in rows],
        "item_id": pa.array([i for _, i, _, _ in rows]).dictionary_encode(),
        "cate_id": [cate[i] for _, i, _, _ in rows],
        "ts": pa.array([t * 10**9 for _, _, t, _ in rows], pa.timestamp("ns")),
        "clicked": [bool(y) for *_, y in rows],
    })
    pq.write_table(table, tmp_path / "log.parquet")
    for label in (None, "clicked"):
        _same(load_interaction_log(tmp_path / "log.csv", label_col=label, **COLUMNS),
              load_interaction_log(tmp_path / "log.parquet", label_col=label, **COLUMNS))
    prepared = prepare_interaction_log(tmp_path / "log.parquet", label_col="clicked", out=tmp_path / "p", **COLUMNS)
    assert prepared.summary["input_format"] == "parquet" and prepared.summary["options"]["delimiter"] is None
    pq.write_table(table.set_column(3, "ts", pa.array([1.5] * (len(rows) - 1) + [None])), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=rf"bad\.parquet: row {len(rows)}: column 'ts' \(the time\) is empty"):
        load_interaction_log(tmp_path / "bad.parquet", **COLUMNS)
    labels = pa.array([1, 0, 2] + [0] * (len(rows) - 3))
    pq.write_table(table.set_column(4, "clicked", labels), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"row 3: column 'clicked' \(the label\) must be 0 or 1, found 2"):
        load_interaction_log(tmp_path / "bad.parquet", label_col="clicked", **COLUMNS)
    with pytest.raises(ValueError, match=r"the file's columns \[.*\] has no column 'x' \(the label column\)"):
        load_interaction_log(tmp_path / "bad.parquet", label_col="x", **COLUMNS)
    (tmp_path / "junk.parquet").write_text("nope")
    with pytest.raises(ValueError, match="junk.parquet: not a readable Parquet file"):
        load_interaction_log(tmp_path / "junk.parquet", **COLUMNS)

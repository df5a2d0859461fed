"""`din prepare`, the prepared-data cache, chunked parsing, MovieLens 1M, and training on prepared folders."""
import argparse
import json
import mmap

import numpy as np
import pytest
import torch

import din.data.amazon as amazon_module
from din.cli import main as din_main
from din.data import Batch, InteractionData, Split, load_data, load_movielens, prepare_amazon_csv
from din.data import cache as cache_module
from din.data._csv import iter_numeric_chunks
from din.data.movielens import read_ratings_dat
from din.prepare import add_prepare_parser
from din.prepare import main as prepare_main

REVIEWS_CSV = "user_id,item_id,day\n" + "".join(
    f"{u},{i},{d}\n" for u, i, d in [(0, 0, 1), (0, 1, 2), (0, 2, 3), (0, 3, 4), (1, 1, 1), (1, 3, 2), (1, 4, 3),
                                      (2, 0, 5), (2, 4, 6), (2, 2, 7), (2, 1, 8), (2, 5, 9)])
ITEM_CATE_CSV = "item_id,cate_id\n0,0\n1,1\n2,0\n3,2\n4,1\n5,2\n"


@pytest.fixture
def tiny_csv(tmp_path):
    (tmp_path / "Tiny_reviews.csv").write_text(REVIEWS_CSV)
    (tmp_path / "Tiny_item_cate.csv").write_text(ITEM_CATE_CSV)
    return tmp_path / "Tiny_reviews.csv", tmp_path / "Tiny_item_cate.csv"


def _fail(*args, **kwargs):
    raise AssertionError("the raw files were parsed again")


def _mapped(array) -> bool:
    """Whether ``array``'s memory belongs to a memory map (a view of it, not a copy)."""
    while array is not None and not isinstance(array, (np.memmap, mmap.mmap)):
        array = array.base
    return array is not None


def _assert_same(a: InteractionData, b: InteractionData, max_len: int = 8) -> None:
    x, y = a.batch(np.arange(len(a)), max_len), b.batch(np.arange(len(b)), max_len)
    for name in Batch.__dataclass_fields__:
        assert torch.equal(getattr(x, name), getattr(y, name)), name


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------


def test_second_run_reuses_the_cache_without_parsing(tmp_path, tiny_csv, monkeypatch):
    lines = []
    first = prepare_amazon_csv(*tiny_csv, cache_dir=tmp_path / "cache", log=lines.append)
    assert not first.reused and first.path.parent == tmp_path / "cache"
    assert first.path.name.startswith("amazon-csv-") and "prepared amazon-csv" in lines[-1]
    monkeypatch.setattr(amazon_module, "_build_amazon_csv", _fail)
    second = prepare_amazon_csv(*tiny_csv, cache_dir=tmp_path / "cache", log=lines.append)
    assert second.reused and second.path == first.path and "reusing" in lines[-1]
    assert second.summary == first.summary
    summary = json.loads((first.path / "summary.json").read_text())
    for key in ("users", "items", "categories", "train_samples", "test_samples"):
        assert isinstance(summary[key], int)
    assert (summary["users"], summary["items"], summary["categories"]) == (3, 6, 3)
    assert (summary["train_samples"], summary["test_samples"]) == (2 * (12 - 6), 6)
    assert summary["source"] == "amazon-csv" and summary["options"] == {"seed": 0}
    assert set(summary["inputs"]) == {"reviews", "item_cate"} and "sha256" in summary["inputs"]["reviews"]
    # other options or other file contents: a new key, so the (failing) parser runs
    with pytest.raises(AssertionError, match="parsed again"):
        prepare_amazon_csv(*tiny_csv, seed=1, cache_dir=tmp_path / "cache")
    tiny_csv[0].write_text(REVIEWS_CSV + "2,3,10\n")
    with pytest.raises(AssertionError, match="parsed again"):
        prepare_amazon_csv(*tiny_csv, cache_dir=tmp_path / "cache")


def test_cache_dir_default_and_large_files_keyed_by_mtime(tmp_path, tiny_csv, monkeypatch):
    monkeypatch.setenv("DIN_CACHE_DIR", str(tmp_path / "from-env"))
    assert cache_module.default_cache_dir() == tmp_path / "from-env"
    prepared = prepare_amazon_csv(*tiny_csv)
    assert prepared.path.parent == tmp_path / "from-env"
    monkeypatch.delenv("DIN_CACHE_DIR")
    assert str(cache_module.default_cache_dir()).endswith(".cache/din")
    monkeypatch.setattr(cache_module, "HASH_LIMIT", 0)
    entry = cache_module.file_fingerprint(tiny_csv[0])
    assert "mtime_ns" in entry and "sha256" not in entry and entry["size"] == len(REVIEWS_CSV)
    with pytest.raises(FileNotFoundError, match="not found"):
        cache_module.file_fingerprint(tmp_path / "gone.csv")


def test_out_folder_is_written_reused_and_protected(tmp_path, tiny_csv, monkeypatch):
    out = tmp_path / "prepared"
    first = prepare_amazon_csv(*tiny_csv, out=out)
    assert first.path == out and Split.is_saved(out)
    monkeypatch.setattr(amazon_module, "_build_amazon_csv", _fail)
    assert prepare_amazon_csv(*tiny_csv, out=out).reused
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_amazon_csv(*tiny_csv, seed=5, out=out)
    replaced = prepare_amazon_csv(*tiny_csv, seed=5, out=out, overwrite=True)
    assert not replaced.reused and replaced.summary["options"] == {"seed": 5}
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError):
        prepare_amazon_csv(*tiny_csv, out=tmp_path / "other")


def test_a_failed_write_leaves_nothing_behind(tmp_path, tiny_csv, monkeypatch):
    def broken(self, directory):
        (directory / "user.npy").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(InteractionData, "_write", broken)
    with pytest.raises(OSError, match="disk full"):
        prepare_amazon_csv(*tiny_csv, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(OSError):
        prepare_amazon_csv(*tiny_csv, out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    monkeypatch.undo()
    assert not prepare_amazon_csv(*tiny_csv, cache_dir=tmp_path / "cache").reused  # nothing stale was kept


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def _cli(argv):
    parser = argparse.ArgumentParser(prog="din")
    add_prepare_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


RAW_REVIEWS = "\n".join([
    '{"reviewerID": "R2", "asin": "A3", "unixReviewTime": 3}',
    '{"reviewerID": "R1", "asin": "A1", "unixReviewTime": 1}',
    "{'reviewerID': 'R1', 'asin': 'A2', 'unixReviewTime': 2}",
    '{"reviewerID": "R2", "asin": "A1", "unixReviewTime": 1}',
    '{"reviewerID": "R1", "asin": "A3", "unixReviewTime": 3}',
    '{"reviewerID": "R2", "asin": "A4", "unixReviewTime": 4}',
]) + "\n"
RAW_META = "\n".join([
    "{'asin': 'A1', 'categories': [['C', 'Leaf1']]}",
    "{'asin': 'A2', 'categories': [['C', 'Leaf2']]}",
    "{'asin': 'A3', 'categories': [['C', 'Leaf1']]}",
    "{'asin': 'A4', 'categories': [['C', 'Leaf3']]}",
    "{'asin': 'A5', 'categories': [['C', 'Leaf4']]}",  # never reviewed
]) + "\n"
TAOBAO = "1,10,5,pv,1\n1,11,5,pv,2\n1,12,6,pv,3\n2,10,5,pv,1\n2,12,6,buy,2\n2,13,6,pv,3\n"


def test_prepare_command_for_every_source(tmp_path, tiny_csv, capsys):
    (tmp_path / "reviews_T_5.json").write_text(RAW_REVIEWS)
    (tmp_path / "meta_T.json").write_text(RAW_META)
    (tmp_path / "ub.csv").write_text(TAOBAO)
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "ratings.dat").write_text("1::10::4::5\n1::20::2::6\n2::10::5::1\n2::20::3::2\n3::20::4::1\n")
    (ml / "movies.dat").write_bytes("10::Caf\xe9 (1999)::Drama|Comedy\n20::B (2000)::Action\n".encode("latin-1"))
    runs = {
        "amazon": ["--reviews", str(tmp_path / "reviews_T_5.json"), "--meta", str(tmp_path / "meta_T.json")],
        "amazon-csv": ["--reviews", str(tiny_csv[0]), "--item-cate", str(tiny_csv[1])],
        "taobao": ["--input", str(tmp_path / "ub.csv")],
        "movielens": ["--input", str(ml), "--test-fraction", "0.34"],
    }
    expected = {"amazon": (2, 4, 3, 4, 4), "amazon-csv": (3, 6, 3, 12, 6), "taobao": (2, 4, 2, 2, 4),
                "movielens": (3, 2, 2, None, None)}
    for source, options in runs.items():
        out = tmp_path / f"out-{source}"
        assert _cli(["prepare", source, *options, "--out", str(out), "--seed", "3"]) == 0
        printed = capsys.readouterr()
        assert printed.out.startswith(str(out)) and "train_samples" in printed.out
        assert f"prepared {source}" in printed.err
        summary = json.loads((out / "summary.json").read_text())
        sizes = (summary["users"], summary["items"], summary["categories"], summary["train_samples"],
                 summary["test_samples"])
        assert sizes[:3] == expected[source][:3], source
        if expected[source][3] is not None:
            assert sizes[3:] == expected[source][3:], source
        assert summary["options"]["seed"] == 3
        assert _cli(["prepare", source, *options, "--out", str(out), "--seed", "3"]) == 0
        assert "reusing" in capsys.readouterr().err
    assert summary["train_samples"] + summary["test_samples"] == 5  # movielens: every rating a sample


def test_prepare_command_errors(tmp_path, tiny_csv, capsys):
    assert prepare_main(["taobao", "--input", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "o").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3,pv,4\n1,2,3,pv\n")
    assert prepare_main(["taobao", "--input", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.csv:2: expected 5 fields" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_main(["movielens", "--input", str(tmp_path), "--test-fraction", "1.5"])
    with pytest.raises(SystemExit):
        prepare_main(["amazon-csv", "--reviews", str(tiny_csv[0])])  # --item-cate missing
    assert prepare_main(["amazon-csv", "--reviews", str(tiny_csv[0]), "--item-cate", str(tiny_csv[1]),
                         "--cache-dir", str(tmp_path / "c")]) == 0
    assert str(tmp_path / "c") in capsys.readouterr().out


def test_train_streams_from_a_prepared_folder(tmp_path, tiny_csv):
    out = tmp_path / "prepared"
    in_memory = amazon_module.load_amazon_csv(*tiny_csv, seed=0)
    prepare_amazon_csv(*tiny_csv, out=out)
    split = load_data(str(out), max_len=8)
    for part in ("train", "test"):
        data = getattr(split, part)
        for column in ("behaviour_goods", "behaviour_cates", "user", "hist_end", "goods", "cate", "label"):
            assert _mapped(getattr(data, column)), (part, column)
        _assert_same(getattr(in_memory, part), data)
    assert din_main(["train", "--data", str(out), "--epochs", "1", "--batch-size", "4", "--max-len", "4",
                     "--quiet", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    data = metrics["data"]  # the validation part is carved from the 12 training samples
    assert data["train_samples"] + data["valid_samples"] == 12 and len(metrics["epochs"]) == 1


def test_load_data_prepares_named_specs_once(tmp_path, tiny_csv, monkeypatch, capsys):
    (tmp_path / "reviews_T_5.json").write_text(RAW_REVIEWS)
    (tmp_path / "meta_T.json").write_text(RAW_META)
    (tmp_path / "ub.csv").write_text(TAOBAO)
    cache = tmp_path / "cache"
    split = load_data(f"amazon-csv:{tmp_path / 'Tiny'}", max_len=2, cache_dir=cache)
    assert split.summary()["train_samples"] == 12 and split.train.history_lengths.max() <= 2
    _assert_same(split.test, amazon_module.load_amazon_csv(*tiny_csv, seed=0).test.truncated(2))
    assert "prepared amazon-csv" in capsys.readouterr().err
    monkeypatch.setattr(amazon_module, "_build_amazon_csv", _fail)
    assert load_data(f"amazon-csv:{tmp_path / 'Tiny'}", cache_dir=cache).summary()["test_samples"] == 6
    assert "reusing" in capsys.readouterr().err
    assert load_data(f"amazon:{tmp_path / 'T'}", cache_dir=cache).summary()["items"] == 4
    assert load_data(f"taobao:{tmp_path / 'ub.csv'}", seed=None, cache_dir=cache).summary()["users"] == 2
    assert len(list(cache.iterdir())) == 3
    with pytest.raises(FileNotFoundError, match="Nope_reviews.csv"):
        load_data(f"amazon-csv:{tmp_path / 'Nope'}", cache_dir=cache)
    with pytest.raises(ValueError, match="names no path"):
        load_data("taobao:")
    with pytest.raises(ValueError, match="SOURCE:PATH"):
        load_data("criteo:x")


# ---------------------------------------------------------------------------------------------
# chunked numeric parsing and MovieLens 1M's "::" format
# ---------------------------------------------------------------------------------------------


def test_chunks_parse_like_one_pass_and_count_lines_across_chunks(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.integers(0, 10**9, size=(500, 3))
    lines = [",".join(map(str, row)) for row in table.tolist()]
    lines.insert(100, "")  # an empty line is skipped but still counted
    path = tmp_path / "t.csv"
    path.write_text("\r\n".join(lines) + "\r\n")
    parts = list(iter_numeric_chunks(path, [2, 0], chunk_bytes=64))
    assert len(parts) > 100
    assert np.array_equal(np.concatenate(parts), table[:, [2, 0]])
    lines[399] = lines[399].replace(",", ",x", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"t\.csv:400: field 'column 2' is 'x"):
        list(iter_numeric_chunks(path, [0, 1, 2], chunk_bytes=64))
    with pytest.raises(ValueError, match=r"t\.csv:400: field 'b' is 'x"):
        list(iter_numeric_chunks(path, [0, 1, 2], names=["a", "b", "c"]))


ML_MOVIES_CSV = 'movieId,title,genres\n10,"Movie, The (1999)",Comedy|Drama\n20,Other (2000),Action\n' \
                '30,"Caf\xe9 (2001)",(no genres listed)\n5,Five (1990),Drama|Action\n'
ML_RATINGS = [(2, 10, 4.0, 100), (1, 20, 3.5, 50), (1, 10, 5.0, 10), (2, 5, 2.0, 100), (1, 30, 4.0, 30),
              (2, 20, 4.5, 90), (3, 5, 1.0, 5), (3, 10, 4.0, 6)]


def test_movielens_1m_format_equals_the_csv_format(tmp_path):
    csv_dir, dat_dir = tmp_path / "csv", tmp_path / "ml-1m"
    csv_dir.mkdir()
    dat_dir.mkdir()
    (csv_dir / "movies.csv").write_text(ML_MOVIES_CSV, encoding="utf-8")
    (csv_dir / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in ML_RATINGS))
    (dat_dir / "movies.dat").write_bytes("10::Movie, The (1999)::Comedy|Drama\n20::Other (2000)::Action\n"
                                         "30::Caf\xe9 (2001)::(no genres listed)\n5::Five (1990)::Drama|Action\n"
                                         .encode("latin-1"))
    (dat_dir / "ratings.dat").write_text("".join(f"{u}::{m}::{r:g}::{t}\n" for u, m, r, t in ML_RATINGS))
    a = load_movielens(csv_dir, test_fraction=0.34, seed=2)
    for b in (load_movielens(dat_dir, test_fraction=0.34, seed=2), load_data(str(dat_dir), seed=2, test_fraction=0.34),
              load_movielens(dat_dir / "ratings.dat", test_fraction=0.34, seed=2)):
        assert (b.num_users, b.num_goods, b.num_cates) == (a.num_users, a.num_goods, a.num_cates) == (4, 5, 5)
        _assert_same(a.train, b.train)
        _assert_same(a.test, b.test)


def test_movielens_1m_malformed_lines(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text("1::10::4::5\n1::20::4::6\n1::30::x::7\n")
    with pytest.raises(ValueError, match=r"ratings\.dat:3: field 'Rating' is 'x'"):
        read_ratings_dat(path)
    path.write_text("1::10::4::5\n1,20,4,6\n")
    with pytest.raises(ValueError, match=r"ratings\.dat:2: expected 4 fields, found 1"):
        read_ratings_dat(path)
    (tmp_path / "movies.dat").write_text("10::A::Drama\n20 B Action\n")
    path.write_text("1::10::4::5\n")
    with pytest.raises(ValueError, match=r"movies\.dat:2: malformed line"):
        load_movielens(tmp_path)


# ---------------------------------------------------------------------------------------------
# the shared real data end to end
# ---------------------------------------------------------------------------------------------


def test_shared_data_prepare_end_to_end(shared_data, tmp_path, capsys):
    beauty = shared_data / "amazon-tlsan-remap"
    assert _cli(["prepare", "amazon-csv", "--reviews", str(beauty / "Beauty_reviews.csv"), "--item-cate",
                 str(beauty / "Beauty_item_cate.csv"), "--out", str(tmp_path / "beauty")]) == 0
    assert _cli(["prepare", "taobao", "--input", str(shared_data / "taobao-userbehavior" /
                 "UserBehavior_head814users.csv"), "--out", str(tmp_path / "taobao")]) == 0
    capsys.readouterr()
    for name, sizes in (("beauty", (3783, 2658, 179, 93318, 7566)), ("taobao", (812, 51930, 2819, 148138, 1624))):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert tuple(summary[k] for k in ("users", "items", "categories", "train_samples", "test_samples")) == sizes
        split = load_data(str(tmp_path / name), max_len=50)
        assert len(split.train) == sizes[3] and split.train.history_lengths.max() == 50
        batch = split.train.batch(np.arange(0, len(split.train), 997), 50)
        assert int(batch.hist_goods.max()) <= sizes[1] and int(batch.cate.max()) <= sizes[2]

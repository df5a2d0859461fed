"""``din prepare``: turn a raw data set into a prepared folder that ``din train --data DIR`` memory-maps.

::

    din prepare amazon     --reviews reviews_Electronics_5.json --meta meta_Electronics.json --out DIR
    din prepare amazon-csv --reviews Beauty_reviews.csv --item-cate Beauty_item_cate.csv --out DIR
    din prepare taobao     --input UserBehavior.csv --out DIR
    din prepare movielens  --input ml-20m/ --out DIR
    din prepare csv        --input log.csv --user-col user_id --item-col item_id --category-col cate_id \
                           --time-col ts [--label-col clicked] [--split ...] [--test-fraction F] --out DIR

Each writes ``DIR/train/``, ``DIR/test/`` (``.npy`` arrays) and ``DIR/summary.json`` (sizes, the
protocol's counts, the input fingerprints and options), atomically. Without ``--out`` the folder goes to
the cache (``$DIN_CACHE_DIR`` or ``~/.cache/din``); either way a second run with unchanged inputs and
options reuses the folder instead of parsing again. The protocols are in the modules of
:mod:`din.data` (``amazon``, ``taobao``, ``movielens``, and ``interactions`` for ``csv``).

``csv`` is your own interaction log: a CSV/TSV file with a header (or a Parquet file, when pyarrow is
installed) whose user, item, category and time columns are named by the options; ids may be any text.
Without ``--label-col`` every row is a click and the samples are Taobao's (next click against a sampled
negative; ``--split last`` holds out each user's last click, ``--split time`` the latest
``--test-fraction`` of the clicks); with it every row is a sample with its label, histories are the
user's earlier label-1 rows, and ``--split user`` (default, as MovieLens) or ``time`` holds out test rows.

Also runnable alone: ``python -m din.prepare amazon-csv ...``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .data import prepare_amazon, prepare_amazon_csv, prepare_interaction_log, prepare_movielens, prepare_taobao
from .data.cache import Prepared

__all__ = ["add_prepare_parser", "cmd_prepare", "main"]

#: summary.json entries printed after the sizes (when the source reports them)
_DETAILS = ("reviews", "reviews_without_meta", "items_without_meta", "items_without_category", "meta_lines",
            "events", "pv", "items_with_several_categories", "ratings", "behaviours", "users_without_samples",
            "rows", "positive_rows", "split", "test_from_timestamp")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="folder to write (default: a folder in the cache, $DIN_CACHE_DIR or ~/.cache/din)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it holds other data (a folder made from the same inputs and "
                             "options is reused either way)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampled negatives (MovieLens, and csv with --label-col: of the user "
                             "split); default 0, the default seed of 'din train'")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache folder used when --out is not given")


def add_prepare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``prepare`` and its sources on ``subparsers`` (from ``parser.add_subparsers()``)."""
    parser = subparsers.add_parser(
        "prepare", help="prepare a raw data set (Amazon, Taobao, MovieLens, your own CSV) into a folder for --data",
        description="Parse a raw data set once into memory-mappable arrays + summary.json; "
                    "'din train --data DIR' then trains on DIR.")
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")

    amazon = sources.add_parser("amazon", help="raw Amazon 2014 files: reviews_<Cat>_5.json + meta_<Cat>.json",
                                description="Official DIN protocol (build_dataset.py) on the raw files.")
    amazon.add_argument("--reviews", type=Path, required=True, help="reviews_<Cat>_5.json (one dict per line)")
    amazon.add_argument("--meta", type=Path, required=True, help="meta_<Cat>.json (one Python-literal dict per line)")
    _common(amazon)

    amazon_csv = sources.add_parser("amazon-csv", help="remapped Amazon CSVs: <Cat>_reviews.csv + <Cat>_item_cate.csv",
                                    description="Official DIN protocol on the remapped files (0-based ids).")
    amazon_csv.add_argument("--reviews", type=Path, required=True, help="<Cat>_reviews.csv (user_id,item_id,day)")
    amazon_csv.add_argument("--item-cate", type=Path, required=True, help="<Cat>_item_cate.csv (item_id,cate_id)")
    _common(amazon_csv)

    taobao = sources.add_parser("taobao", help="Taobao UserBehavior.csv (next-click samples)",
                                description="pv clicks as behaviours, next-click prediction with sampled negatives; "
                                            "test targets: each user's last click (--split last) or every click "
                                            "after a global time cutoff (--split time).")
    taobao.add_argument("--input", type=Path, required=True,
                        help="UserBehavior.csv: user_id,item_id,category_id,behavior,timestamp")
    taobao.add_argument("--split", choices=("last", "time"), default="last",
                        help="'last' (default): each user's last click is the test pair, as the Amazon protocol; "
                             "'time': clicks at or after a global cutoff are test targets")
    taobao.add_argument("--test-fraction", type=_fraction, default=0.1,
                        help="with --split time: share of the clicks, latest first, that are test targets (0.1)")
    _common(taobao)

    movielens = sources.add_parser("movielens", help="MovieLens: ratings.csv+movies.csv or ratings.dat+movies.dat",
                                   description="Every rating a sample (label rating >= threshold), users split.")
    movielens.add_argument("--input", type=Path, required=True,
                           help="a MovieLens folder (ml-latest-small, ml-20m, ml-1m, ...) or its ratings file")
    movielens.add_argument("--test-fraction", type=_fraction, default=0.2, help="fraction of test users (0.2)")
    movielens.add_argument("--positive-threshold", type=float, default=4.0, help="ratings >= this are clicks (4)")
    _common(movielens)

    own = sources.add_parser(
        "csv", help="your own interaction log: CSV/TSV with a header (or Parquet, with pyarrow), named columns",
        description="One interaction per row. Without --label-col every row is a click: next-click samples with "
                    "sampled negatives, as taobao (--split last|time). With --label-col every row is a sample with "
                    "its 0/1 label, histories are the user's earlier label-1 rows (--split user|time). Ids may be "
                    "any text; they are remapped to dense ids. Errors name the file and line.")
    own.add_argument("--input", type=Path, required=True,
                     help="the log: a CSV/TSV file whose first line names the columns, or a .parquet/.pq file "
                          "(needs pyarrow)")
    own.add_argument("--user-col", required=True, metavar="NAME", help="the column of user ids")
    own.add_argument("--item-col", required=True, metavar="NAME", help="the column of item ids")
    own.add_argument("--category-col", required=True, metavar="NAME",
                     help="the column of item categories (an item's first row decides; no categories: name the "
                          "item column again)")
    own.add_argument("--time-col", required=True, metavar="NAME",
                     help="the column of times: numbers (Unix seconds, days, ...); ties keep file order")
    own.add_argument("--label-col", default=None, metavar="NAME",
                     help="a 0/1 (or true/false) label column: every row becomes a sample with its label "
                          "(default: none, every row is a click)")
    own.add_argument("--delimiter", default=None,
                     help="the CSV field separator (default ',', a tab for .tsv; 'tab' or '\\t' for a tab)")
    own.add_argument("--split", choices=("last", "time", "user"), default=None,
                     help="without --label-col: 'last' (default, each user's last click is the test pair) or "
                          "'time'; with it: 'user' (default, test users as MovieLens) or 'time'. 'time': rows at "
                          "or after the (1 - test fraction) quantile of the times are the test part")
    own.add_argument("--test-fraction", type=_fraction, default=None,
                     help="test share of the times (--split time, default 0.1) or of the users (--split user, "
                          "default 0.2); not with --split last")
    _common(own)

    parser.set_defaults(handler=cmd_prepare)
    return parser


def _run(args: argparse.Namespace) -> Prepared:
    def log(line: str) -> None:
        print(line, file=sys.stderr)

    common = dict(seed=args.seed, out=args.out, overwrite=args.overwrite, cache_dir=args.cache_dir, log=log)
    if args.source == "amazon":
        return prepare_amazon(args.reviews, args.meta, **common)
    if args.source == "amazon-csv":
        return prepare_amazon_csv(args.reviews, args.item_cate, **common)
    if args.source == "taobao":
        return prepare_taobao(args.input, split=args.split, test_fraction=args.test_fraction, **common)
    if args.source == "movielens":
        return prepare_movielens(args.input, test_fraction=args.test_fraction,
                                 positive_threshold=args.positive_threshold, **common)
    if args.source == "csv":
        return prepare_interaction_log(args.input, user_col=args.user_col, item_col=args.item_col,
                                       category_col=args.category_col, time_col=args.time_col,
                                       label_col=args.label_col, delimiter=args.delimiter, split=args.split,
                                       test_fraction=args.test_fraction, **common)
    raise ValueError(f"unknown source {args.source!r}")


def cmd_prepare(args: argparse.Namespace) -> int:
    """Prepare (or reuse) the folder, print where it is and its sizes; returns 0."""
    prepared = _run(args)
    summary = prepared.summary
    print(prepared.path)
    print(f"  users {summary['users']}  items {summary['items']}  categories {summary['categories']}")
    print(f"  train_samples {summary['train_samples']}  test_samples {summary['test_samples']}")
    details = [f"{key} {summary[key]}" for key in _DETAILS if key in summary]
    if details:
        print("  " + "  ".join(details))
    print(f"train on it with: din train --data {prepared.path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m din.prepare SOURCE ...``: the ``din prepare`` command on its own."""
    parser = argparse.ArgumentParser(prog="python -m din.prepare", description="Prepare a raw data set.")
    commands = parser.add_subparsers(dest="command")
    add_prepare_parser(commands)
    args = parser.parse_args(["prepare", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

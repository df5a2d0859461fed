"""Preparation time and peak memory at the scale of Amazon Electronics (the paper's data set).

Generates, into a temporary folder, a synthetic ``reviews_Electronics_5.json`` / ``meta_Electronics.json``
pair of the published size and format (default: 1,689,188 reviews by 192,403 users of 63,001 items in
801 leaf categories; every user has >= 5 reviews; the metadata lists 498,196 items, 63,001 of them
reviewed; reviews one JSON dict per line, metadata one Python-literal dict per line, with
realistic text fields), then times in a fresh process each:

1. ``python -m din.prepare amazon --reviews ... --meta ... --out DIR`` (the raw path);
2. the same command again (must reuse the folder);
3. ``python -m din.prepare amazon-csv`` on the same reviews as a remapped CSV pair;
4. one shuffled pass over all training batches of the prepared folder, memory-mapped, as
   ``din train --data DIR`` feeds the model (batch 256, max_len 100), without the model;
5. optionally (``--train-batches N``) ``N`` real DIN training steps on that folder;
6. optionally (``--ml20m``) ``python -m din.prepare movielens`` on a generated ml-20m-sized
   ``ratings.csv`` (20,000,263 ratings by 138,493 users of 27,278 movies).

Peak memory is each child process's ``ru_maxrss`` (``os.wait4``), i.e. its peak resident set.

Usage::

    .venv/bin/python benchmarks/prepare_scale.py                 # full size (~2 GB of files)
    .venv/bin/python benchmarks/prepare_scale.py --scale 0.01    # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_WORDS = ("great cable works fine sound quality battery price screen bought for my husband after two weeks the "
          "remote stopped working would recommend it to anyone looking for a cheap and reliable adapter the "
          "picture is sharp and clear but the menu is confusing and the manual is useless").split()


def _ids(rng: np.random.Generator, n: int, prefix: str, width: int) -> list:
    """``n`` distinct random ids like Amazon's (``prefix`` + upper-case letters and digits)."""
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    out: set = set()
    while len(out) < n:
        draw = alphabet[rng.integers(0, len(alphabet), size=(n - len(out), width))]
        out.update(prefix + "".join(row) for row in draw)
    ids = sorted(out)
    rng.shuffle(ids)
    return ids


def generate(folder: Path, *, reviews: int, users: int, items: int, categories: int, meta_items: int,
             seed: int = 0, review_format: str = "json") -> dict:
    """Write the raw pair and the remapped CSV pair into ``folder``; returns their sizes.

    ``review_format="python"`` writes the reviews as Python literals (single quotes) like the metadata,
    the slow case of the reader (every line goes through ``ast.literal_eval``)."""
    dump = json.dumps if review_format == "json" else repr
    rng = np.random.default_rng(seed)
    # reviews per user: 5 + a geometric tail, rescaled to the exact total
    extra = rng.geometric(1.0 / (reviews / users - 4.0), size=users) - 1
    extra = np.floor(extra * (reviews - 5 * users) / max(extra.sum(), 1)).astype(np.int64)
    np.add.at(extra, rng.integers(0, users, size=reviews - 5 * users - int(extra.sum())), 1)
    per_user = 5 + extra
    review_user = np.repeat(np.arange(users), per_user)
    # items: every item reviewed at least 5 times (5-core), the rest Zipf-like popularity
    review_item = np.concatenate([np.repeat(np.arange(items), 5),
                                  (rng.zipf(1.3, size=reviews - 5 * items) - 1) % items])
    rng.shuffle(review_item)
    review_time = rng.integers(946684800, 1406073600, size=reviews) // 86400 * 86400  # 2000 .. mid 2014, days
    item_cate = rng.integers(0, categories, size=items)
    reviewer_ids = _ids(rng, users, "A", 13)
    asins = _ids(rng, meta_items, "B00", 7)
    cate_names = [f"Leaf {k} & Co" for k in range(categories)]
    words = np.array(_WORDS)

    # the published review file is grouped by item: write it in item order
    order = np.argsort(review_item, kind="stable")
    text_len = np.minimum(rng.lognormal(4.5, 0.8, size=reviews).astype(np.int64) + 3, 600)  # words
    text_start = rng.integers(0, 10_000, size=reviews)
    corpus = words[rng.integers(0, len(words), size=11_000)]
    raw_reviews, raw_meta = folder / "reviews_Electronics_5.json", folder / "meta_Electronics.json"
    with open(raw_reviews, "w", encoding="utf-8") as handle:
        for k in order.tolist():
            when = int(review_time[k])
            text = " ".join(corpus[text_start[k]:text_start[k] + text_len[k]].tolist())
            handle.write(dump({
                "reviewerID": reviewer_ids[review_user[k]], "asin": asins[review_item[k]],
                "reviewerName": "J. Smith", "helpful": [int(k % 7), int(k % 11)], "reviewText": text,
                "overall": float(1 + k % 5), "summary": text[:40],
                "unixReviewTime": when, "reviewTime": time.strftime("%m %d, %Y", time.gmtime(when)),
            }) + "\n")
    with open(raw_meta, "w", encoding="utf-8") as handle:
        for k in np.argsort(np.array(asins)).tolist():  # the metadata file is sorted by asin
            cate = cate_names[item_cate[k]] if k < items else cate_names[k % categories]
            tree = [["Electronics", "Accessories", cate]]
            if k % 3 == 0:  # some items sit in two trees; the category is the last entry of the last list
                tree.insert(0, ["Electronics", "Other", f"Leaf {k % 17} decoy"])
            related = {name: [asins[j] for j in rng.integers(0, meta_items, size=int(rng.integers(0, 40)))]
                       for name in ("also_bought", "also_viewed", "bought_together")}
            record = {"asin": asins[k], "imUrl": f"http://ecx.images-amazon.com/images/I/{asins[k]}.jpg",
                      "related": related, "salesRank": {"Electronics": int(k)}, "categories": tree,
                      "title": f"Product {k} 'deluxe' edition", "price": round(float(k % 500) + 0.99, 2),
                      "description": " ".join(corpus[k % 10_000:k % 10_000 + 60].tolist())}
            handle.write(repr(record) + "\n")
    # the remapped CSV pair of the same reviews (0-based ids, sorted by user then day)
    csv_reviews, csv_cates = folder / "Electronics_reviews.csv", folder / "Electronics_item_cate.csv"
    by_user = np.lexsort((review_time, review_user))
    table = np.stack([review_user[by_user], review_item[by_user], review_time[by_user] // 86400], axis=1)
    np.savetxt(csv_reviews, table, fmt="%d", delimiter=",", header="user_id,item_id,day", comments="")
    np.savetxt(csv_cates, np.stack([np.arange(items), item_cate], axis=1), fmt="%d", delimiter=",",
               header="item_id,cate_id", comments="")
    return {path.name: path.stat().st_size for path in (raw_reviews, raw_meta, csv_reviews, csv_cates)}


_GENRES = ("Action Adventure Animation Children Comedy Crime Documentary Drama Fantasy Film-Noir Horror IMAX "
           "Musical Mystery Romance Sci-Fi Thriller War Western").split()


def generate_movielens(folder: Path, *, ratings: int, users: int, movies: int, seed: int = 0) -> dict:
    """An ml-20m-shaped ``ratings.csv`` / ``movies.csv`` pair (same columns, same sizes by default)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    movie_ids = np.sort(rng.choice(np.arange(1, 4 * movies), size=movies, replace=False))
    with open(folder / "movies.csv", "w", encoding="utf-8") as handle:
        handle.write("movieId,title,genres\n")
        for k, movie in enumerate(movie_ids.tolist()):
            genres = "|".join(_GENRES[(k * 7 + j) % len(_GENRES)] for j in range(1 + k % 3)) if k % 50 else \
                "(no genres listed)"
            handle.write(f'{movie},"Movie {k}, The (19{k % 100:02d})",{genres}\n')
    per_user = np.maximum(20, rng.geometric(1.0 / (ratings / users - 19), size=users) + 19)
    per_user = np.floor(per_user * ratings / per_user.sum()).astype(np.int64)
    per_user[: ratings - int(per_user.sum())] += 1
    user = np.repeat(np.arange(1, users + 1), per_user)
    movie = movie_ids[(rng.zipf(1.2, size=len(user)) - 1) % movies]
    rating = rng.integers(1, 11, size=len(user)) / 2.0
    stamp = rng.integers(789652009, 1427784002, size=len(user))
    with open(folder / "ratings.csv", "w", encoding="utf-8") as handle:
        handle.write("userId,movieId,rating,timestamp\n")
        step = 1_000_000
        for begin in range(0, len(user), step):
            block = slice(begin, begin + step)
            handle.write("".join(f"{u},{m},{r:.1f},{t}\n" for u, m, r, t in zip(
                user[block].tolist(), movie[block].tolist(), rating[block].tolist(), stamp[block].tolist())))
    return {name: (folder / name).stat().st_size for name in ("ratings.csv", "movies.csv")}


def measure(command: list, env: dict) -> dict:
    """Run ``command``; wall seconds and the child's peak RSS (GiB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output}")
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20, "output": output.strip()}


_STREAM = """
import mmap, sys, time
import numpy as np
from din.data import load_data

def mapped(array):  # a view whose memory belongs to a memory map, not a copy
    while array is not None and not isinstance(array, (np.memmap, mmap.mmap)):
        array = array.base
    return array is not None

split = load_data(sys.argv[1], max_len=100)
train = split.train
assert all(mapped(getattr(train, name)) for name in ("behaviour_goods", "behaviour_cates", "user", "goods", "label"))
started = time.perf_counter(); seen = 0; checksum = 0
for batch in train.batches(256, 100, shuffle=True, seed=1):
    seen += len(batch); checksum += int(batch.lengths.sum())
print(f"streamed {seen} samples in {time.perf_counter() - started:.1f} s (history positions {checksum})")
"""

_TRAIN = """
import itertools, sys, time
import torch
from din.data import load_data
from din.model import ModelConfig, build_model
split = load_data(sys.argv[1], max_len=100)
torch.manual_seed(0)
model = build_model(ModelConfig(model="din", num_goods=split.num_goods, num_cates=split.num_cates,
                                num_users=split.num_users))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = torch.nn.BCEWithLogitsLoss()
steps = int(sys.argv[2])
batches = itertools.islice(split.train.batches(256, 100, shuffle=True, seed=1), steps)
started = time.perf_counter()
for batch in batches:
    loss = loss_fn(model(batch), batch.label)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
seconds = time.perf_counter() - started
print(f"{steps} DIN steps (batch 256, max_len 100) in {seconds:.1f} s: {seconds / steps * 1e3:.1f} ms/step, "
      f"an epoch of {len(split.train)} samples ~ {seconds / steps * len(split.train) / 256 / 60:.0f} min")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the Electronics sizes (1.0)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files and prepared folders")
    parser.add_argument("--train-batches", type=int, default=0, help="also time N DIN training steps")
    parser.add_argument("--review-format", choices=("json", "python"), default="json",
                        help="reviews as JSON (as published, default) or as Python literals (the slow case)")
    parser.add_argument("--ml20m", action="store_true",
                        help="also time 'din prepare movielens' on an ml-20m-sized ratings.csv (20,000,263 rows)")
    args = parser.parse_args()

    sizes = {"reviews": 1_689_188, "users": 192_403, "items": 63_001, "categories": 801, "meta_items": 498_196}
    sizes = {k: max(int(round(v * args.scale)), 20 if k != "categories" else 5) for k, v in sizes.items()}
    sizes["reviews"] = max(sizes["reviews"], 5 * sizes["users"], 5 * sizes["items"])
    work = Path(tempfile.mkdtemp(prefix="din-prepare-scale-", dir=args.workdir))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIN_CACHE_DIR": str(work / "cache")}
    python = sys.executable
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, numpy {np.__version__}; load average {os.getloadavg()}")
    print(f"sizes: {sizes}; reviews as {args.review_format}; folder {work}")
    try:
        started = time.perf_counter()
        files = generate(work, **sizes, review_format=args.review_format)
        print(f"generated in {time.perf_counter() - started:.0f} s: "
              + ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in files.items()))
        results = {}
        raw = [python, "-m", "din.prepare", "amazon", "--reviews", str(work / "reviews_Electronics_5.json"),
               "--meta", str(work / "meta_Electronics.json"), "--out", str(work / "prepared")]
        results[f"amazon (raw, reviews as {args.review_format})"] = measure(raw, env)
        results["amazon again (reused)"] = measure(raw, env)
        csv = [python, "-m", "din.prepare", "amazon-csv", "--reviews", str(work / "Electronics_reviews.csv"),
               "--item-cate", str(work / "Electronics_item_cate.csv"), "--out", str(work / "prepared-csv")]
        results["amazon-csv"] = measure(csv, env)
        results["stream one epoch (mmap)"] = measure([python, "-c", _STREAM, str(work / "prepared")], env)
        if args.train_batches:
            results[f"{args.train_batches} DIN steps"] = measure(
                [python, "-c", _TRAIN, str(work / "prepared"), str(args.train_batches)], env)
        if args.ml20m:
            started = time.perf_counter()
            files = generate_movielens(work / "ml-20m", ratings=max(int(20_000_263 * args.scale), 2000),
                                       users=max(int(138_493 * args.scale), 50),
                                       movies=max(int(27_278 * args.scale), 50))
            print(f"generated ml-20m-sized files in {time.perf_counter() - started:.0f} s: "
                  + ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in files.items()))
            results["movielens (ml-20m size)"] = measure(
                [python, "-m", "din.prepare", "movielens", "--input", str(work / "ml-20m"), "--out",
                 str(work / "prepared-ml")], env)
        summary = json.loads((work / "prepared" / "summary.json").read_text())
        print("summary: " + ", ".join(f"{k} {summary[k]}" for k in ("users", "items", "categories", "train_samples",
                                                                     "test_samples", "reviews", "meta_lines")))
        print("\n| step | wall time | peak RSS |\n|---|---|---|")
        for name, result in results.items():
            print(f"| {name} | {result['seconds']:.1f} s | {result['peak_rss_gib']:.2f} GiB |")
        for name, result in results.items():
            print(f"\n[{name}]\n{result['output']}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

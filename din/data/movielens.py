"""MovieLens ratings as DIN samples (the paper's section 6.1 protocol).

* Every rating is a sample; its label is 1 when ``rating >= 4`` (``positive_threshold``).
* Its behaviours are the user's earlier ratings in time order: all of them (cut to the last
  ``max_len`` if given). Ratings with equal timestamps keep their file order, so "earlier" is
  "earlier in time, or same second and earlier in the file". The first rating of a user has an empty
  history; such samples are kept (length 0).
* The candidate is the rated movie; its category is the movie's FIRST genre, with
  ``"(no genres listed)"`` a category of its own.
* Users, movies (all of ``movies.csv``) and first genres are remapped to dense 1-based ids in sorted
  order of their raw ids (genres: of their names); 0 stays the padding id.
* Train and test are split BY USER with a seeded permutation: no user is in both.

The package bundles MovieLens ``ml-latest-small`` (GroupLens; research use, redistribution under the
same terms, README.txt travels with it; cite Harper & Konstan, TiiS 2015) in
``din/data/bundled/ml-latest-small``: ``ratings.csv``, ``movies.csv``, ``README.txt`` and
``PROVENANCE.txt`` (``links.csv`` and ``tags.csv`` are not used, so not bundled). Any MovieLens
release with the same ``ratings.csv``/``movies.csv`` columns loads too (``path_or_dir``).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ._io import PathLike
from .dataset import InteractionData, Split, _positive_int, split_by_user

__all__ = ["load_movielens", "read_ratings", "read_first_genres", "BUNDLED_MOVIELENS", "NO_GENRE"]

BUNDLED_MOVIELENS = Path(__file__).resolve().parent / "bundled" / "ml-latest-small"
NO_GENRE = "(no genres listed)"
_RATING_COLUMNS = ("userId", "movieId", "rating", "timestamp")


def _resolve(path_or_dir: Optional[PathLike]) -> Tuple[Path, Path]:
    """``(ratings.csv, movies.csv)`` for a directory, a ``ratings.csv`` path, or ``None`` (bundled)."""
    root = BUNDLED_MOVIELENS if path_or_dir is None else Path(path_or_dir)
    if root.is_dir():
        ratings, movies = root / "ratings.csv", root / "movies.csv"
    elif root.is_file():
        ratings, movies = root, root.parent / "movies.csv"
    else:
        raise FileNotFoundError(f"path_or_dir {root} does not exist")
    for required in (ratings, movies):
        if not required.is_file():
            raise FileNotFoundError(f"path_or_dir {root}: {required.name} not found at {required}")
    return ratings, movies


def _read_header(path: Path) -> list:
    with open(path, "r", encoding="utf-8", newline="") as handle:
        return next(csv.reader(handle), [])


def read_ratings(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse ``ratings.csv`` into ``(user int64, movie int64, rating float64, timestamp int64)`` [n].

    Numeric-only rows parse with numpy's C reader (~0.1 s for 100k rows); columns are located by
    header name, so their order does not matter.
    """
    path = Path(path)
    header = [name.strip() for name in _read_header(path)]
    missing = [name for name in _RATING_COLUMNS if name not in header]
    if missing:
        raise ValueError(f"{path}: header {header} lacks column(s) {missing}")
    columns = tuple(header.index(name) for name in _RATING_COLUMNS)
    # float64 holds MovieLens ids and Unix timestamps exactly (< 2**53)
    table = np.loadtxt(path, delimiter=",", skiprows=1, usecols=columns, dtype=np.float64, ndmin=2)
    if table.shape[0] == 0:
        raise ValueError(f"{path} holds no ratings")
    user, movie, rating, timestamp = table.T
    for name, values in (("userId", user), ("movieId", movie), ("timestamp", timestamp)):
        if not np.all(values == np.floor(values)):
            raise ValueError(f"{path}: column {name} must hold integers")
    return user.astype(np.int64), movie.astype(np.int64), rating, timestamp.astype(np.int64)


def read_first_genres(path: PathLike) -> Tuple[np.ndarray, list]:
    """Parse ``movies.csv`` into ``(movie ids int64 [m], first genre name of each movie)``.

    Titles contain quoted commas, hence the csv module (``movies.csv`` is small: 10k rows).
    """
    path = Path(path)
    ids, genres = [], []
    with open(path, "r", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if "movieId" not in header or "genres" not in header:
            raise ValueError(f"{path}: header {header} lacks movieId or genres")
        id_col, genre_col = header.index("movieId"), header.index("genres")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                ids.append(int(row[id_col]))
                first = row[genre_col].split("|")[0].strip()
            except (IndexError, ValueError) as error:
                raise ValueError(f"{path}:{line_no}: malformed row {row!r}") from error
            genres.append(first or NO_GENRE)
    movie_ids = np.asarray(ids, dtype=np.int64)
    if len(np.unique(movie_ids)) != len(movie_ids):
        raise ValueError(f"{path}: duplicate movieId")
    return movie_ids, genres


def load_movielens(
    path_or_dir: Optional[PathLike] = None,
    max_len: Optional[int] = None,
    test_fraction: float = 0.2,
    seed: Optional[int] = 0,
    *,
    positive_threshold: float = 4.0,
) -> Split:
    """Load MovieLens ratings as a user-disjoint train/test :class:`Split` (protocol in module doc).

    Args:
        path_or_dir: a directory holding ``ratings.csv`` and ``movies.csv``, the path of a
            ``ratings.csv`` (``movies.csv`` beside it), or ``None`` for the bundled ml-latest-small.
        max_len: keep only the last ``max_len`` earlier ratings of each history (``None``: all).
        test_fraction: fraction of the users put in the test part.
        seed: seed of the user permutation (same seed, same split).
        positive_threshold: ratings ``>=`` this are positives.

    Raises:
        FileNotFoundError: if the files are missing.
        ValueError: for bad arguments or malformed files (e.g. a rated movie absent from movies.csv).
    """
    if max_len is not None:
        max_len = _positive_int(max_len, "max_len")
    ratings_path, movies_path = _resolve(path_or_dir)
    user_raw, movie_raw, rating, timestamp = read_ratings(ratings_path)
    movie_ids, first_genres = read_first_genres(movies_path)

    # dense 1-based ids, in sorted raw order
    movie_order = np.argsort(movie_ids, kind="stable")
    movie_sorted = movie_ids[movie_order]
    movie = np.searchsorted(movie_sorted, movie_raw)  # 0-based for now
    unknown = (movie >= len(movie_sorted)) | (movie_sorted[np.minimum(movie, len(movie_sorted) - 1)] != movie_raw)
    if np.any(unknown):
        raise ValueError(f"{ratings_path}: movieId {int(movie_raw[unknown][0])} is not in {movies_path}")
    genre_names, genre_of_movie = np.unique(np.asarray(first_genres, dtype=object)[movie_order].astype(str),
                                            return_inverse=True)
    movie_cate = genre_of_movie.reshape(-1).astype(np.int64) + 1  # [m] category of dense movie id - 1
    user_values, user = np.unique(user_raw, return_inverse=True)
    user = user.reshape(-1) + 1
    movie = movie + 1

    # one flat, time-ordered behaviour array: by user, then time, then file position (stable ties)
    order = np.lexsort((np.arange(len(user)), timestamp, user))
    user_sorted = user[order]
    goods = movie[order]
    cate = movie_cate[goods - 1]
    # sample at flat position p has the history [first position of its user, p)
    hist_start = np.searchsorted(user_sorted, user_sorted, side="left")
    hist_end = np.arange(len(order), dtype=np.int64)
    data = InteractionData(
        behaviour_goods=goods,
        behaviour_cates=cate,
        user=user_sorted,
        hist_start=hist_start,
        hist_end=hist_end,
        goods=goods,
        cate=cate,
        label=(rating[order] >= positive_threshold).astype(np.float32),
        num_users=len(user_values) + 1,
        num_goods=len(movie_sorted) + 1,
        num_cates=len(genre_names) + 1,
        name="movielens",
    )
    if max_len is not None:
        data = data.truncated(max_len)
    return split_by_user(data, test_fraction, seed)

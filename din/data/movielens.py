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

:func:`row_samples` builds these samples from any rows; ``din prepare csv`` (:mod:`.interactions`) uses it
for a labelled log of your own, with the label-1 rows as the behaviours.

Two layouts load: the CSV one of ml-latest-small / ml-20m / ml-25m (``ratings.csv``
``userId,movieId,rating,timestamp`` and ``movies.csv`` ``movieId,title,genres``, UTF-8) and the ``::``
one of ml-1m / ml-10m (``ratings.dat`` ``UserID::MovieID::Rating::Timestamp`` and ``movies.dat``
``MovieID::Title::Genres``, Latin-1). Ratings are parsed in chunks by numpy's C reader (ml-20m's
20 million rows included); a malformed line is reported as ``file:line``.

The package bundles MovieLens ``ml-latest-small`` (GroupLens; research use, redistribution under the
same terms, README.txt travels with it; cite Harper & Konstan, TiiS 2015) in
``din/data/bundled/ml-latest-small``: ``ratings.csv``, ``movies.csv``, ``README.txt`` and
``PROVENANCE.txt`` (``links.csv`` and ``tags.csv`` are not used, so not bundled). Any MovieLens
release in either layout loads too (``path_or_dir``).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ._csv import iter_numeric_chunks, read_numeric_columns
from ._io import PathLike
from .cache import Log, Prepared, prepare_cached
from .dataset import InteractionData, Split, _positive_int, split_by_user

__all__ = ["load_movielens", "prepare_movielens", "read_ratings", "row_samples", "read_first_genres",
           "read_ratings_dat", "read_first_genres_dat", "movielens_files", "BUNDLED_MOVIELENS", "NO_GENRE"]

BUNDLED_MOVIELENS = Path(__file__).resolve().parent / "bundled" / "ml-latest-small"
NO_GENRE = "(no genres listed)"
_RATING_COLUMNS = ("userId", "movieId", "rating", "timestamp")
PIPELINE_VERSION = 1  # part of the cache key of prepared folders
PROTOCOL = ("every rating a sample, label rating >= positive_threshold, history = the user's earlier ratings, "
            "category = first genre, users split at random (test_fraction)")


def movielens_files(path_or_dir: Optional[PathLike]) -> Tuple[Path, Path]:
    """``(ratings, movies)`` files for a directory, a ratings file path, or ``None`` (bundled).

    A directory holding ``ratings.dat`` (and no ``ratings.csv``) is the ``::`` layout, and so is a
    ``.dat`` ratings path; ``movies`` has the ratings file's suffix.

    Raises:
        FileNotFoundError: if the path or one of the two files does not exist.
    """
    return _resolve(path_or_dir)


def _resolve(path_or_dir: Optional[PathLike]) -> Tuple[Path, Path]:
    root = BUNDLED_MOVIELENS if path_or_dir is None else Path(path_or_dir).expanduser()
    if root.is_dir():
        suffix = ".dat" if (root / "ratings.dat").is_file() and not (root / "ratings.csv").is_file() else ".csv"
        ratings, movies = root / f"ratings{suffix}", root / f"movies{suffix}"
    elif root.is_file():
        ratings, movies = root, root.parent / f"movies{root.suffix}"
    else:
        raise FileNotFoundError(f"path_or_dir {root} does not exist")
    for required in (ratings, movies):
        if not required.is_file():
            raise FileNotFoundError(f"path_or_dir {root}: {required.name} not found at {required}")
    return ratings, movies


def _integer_columns(path: Path, user, movie, rating, timestamp, names: Tuple[str, ...]):
    if len(user) == 0:
        raise ValueError(f"{path} holds no ratings")
    for name, values in ((names[0], user), (names[1], movie), (names[3], timestamp)):
        if not np.all(values == np.floor(values)):
            raise ValueError(f"{path}: column {name} must hold integers")
    return user.astype(np.int64), movie.astype(np.int64), rating, timestamp.astype(np.int64)


def read_ratings(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse ``ratings.csv`` into ``(user int64, movie int64, rating float64, timestamp int64)`` [n].

    Numeric-only rows parse with numpy's C reader in chunks (~0.1 s for 100k rows, ~20 s for ml-20m's
    20M); columns are located by header name, so their order does not matter.
    """
    path = Path(path)
    # float64 holds MovieLens ids and Unix timestamps exactly (< 2**53)
    columns = read_numeric_columns(path, _RATING_COLUMNS, dtype=np.float64)
    return _integer_columns(path, *(columns[name] for name in _RATING_COLUMNS), names=_RATING_COLUMNS)


def read_ratings_dat(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse ml-1m's ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``, no header) like :func:`read_ratings`."""
    path = Path(path)
    names = ("UserID", "MovieID", "Rating", "Timestamp")
    chunks = list(iter_numeric_chunks(path, usecols=range(4), names=names, dtype=np.float64, delimiter="::",
                                      num_fields=4))
    table = np.concatenate(chunks) if chunks else np.zeros((0, 4))
    return _integer_columns(path, *table.T, names=names)


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


def read_first_genres_dat(path: PathLike) -> Tuple[np.ndarray, list]:
    """Parse ml-1m's ``movies.dat`` (``MovieID::Title::Genres``, Latin-1, no header) like
    :func:`read_first_genres`. The title is whatever lies between the first and the last ``::``."""
    path = Path(path)
    ids, genres = [], []
    with open(path, "r", encoding="latin-1", newline="") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            head, sep, rest = line.partition("::")
            _, sep2, genre_field = rest.rpartition("::")
            try:
                if not (sep and sep2):
                    raise ValueError("expected MovieID::Title::Genres")
                ids.append(int(head))
            except ValueError as error:
                raise ValueError(f"{path}:{line_no}: malformed line {line[:120]!r} ({error})") from None
            genres.append(genre_field.split("|")[0].strip() or NO_GENRE)
    movie_ids = np.asarray(ids, dtype=np.int64)
    if len(np.unique(movie_ids)) != len(movie_ids):
        raise ValueError(f"{path}: duplicate MovieID")
    return movie_ids, genres


def row_samples(user: np.ndarray, goods: np.ndarray, cate: np.ndarray, timestamp: np.ndarray, label: np.ndarray, *,
                num_users: int, num_goods: int, num_cates: int, name: str,
                behaviour: Optional[np.ndarray] = None) -> Tuple[InteractionData, np.ndarray]:
    """Every row a sample (the MovieLens protocol of the module doc): its candidate is the row's goods and
    category, its label the row's, its history the same user's earlier behaviour rows in time order.

    Args:
        user, goods, cate: ``[n]`` 1-based ids of each row, in file order.
        timestamp: ``[n]`` numbers; rows of one user with equal timestamps keep their file order, so
            "earlier" is "earlier in time, or same time and earlier in the file".
        label: ``[n]`` 0/1 (or bool) label of each row.
        behaviour: ``[n]`` bool, which rows are behaviours that later samples see in their history
            (default: every row, as MovieLens, where each earlier rating is a behaviour).
        num_users, num_goods, num_cates, name: as :class:`InteractionData`.

    Returns:
        ``(data, order)``: the samples ordered by user, then time, then file position, and that order
        (``data``'s sample ``k`` is row ``order[k]``).
    """
    # one flat, time-ordered array: by user, then time, then file position (stable ties)
    order = np.lexsort((np.arange(len(user)), timestamp, user))
    user_sorted = user[order]
    goods, cate = goods[order], cate[order]
    if behaviour is None:  # every row a behaviour: the sample at p has the history [first row of its user, p)
        kept, before = slice(None), np.arange(len(order), dtype=np.int64)
    else:  # the history is the user's behaviours before p: count them in the flat behaviour array
        kept = np.asarray(behaviour, dtype=bool)[order]
        before = np.cumsum(kept, dtype=np.int64) - kept
    first_row = np.searchsorted(user_sorted, user_sorted, side="left")
    data = InteractionData(
        behaviour_goods=goods[kept],
        behaviour_cates=cate[kept],
        user=user_sorted,
        hist_start=before[first_row],
        hist_end=before,
        goods=goods,
        cate=cate,
        label=np.asarray(label)[order].astype(np.float32),
        num_users=num_users,
        num_goods=num_goods,
        num_cates=num_cates,
        name=name,
    )
    return data, order


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
        path_or_dir: a directory holding ``ratings.csv`` and ``movies.csv`` (or ``ratings.dat`` and
            ``movies.dat``), the path of such a ratings file (the movies file beside it), or ``None``
            for the bundled ml-latest-small.
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
    if ratings_path.suffix == ".dat":
        user_raw, movie_raw, rating, timestamp = read_ratings_dat(ratings_path)
        movie_ids, first_genres = read_first_genres_dat(movies_path)
    else:
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

    data, order = row_samples(user, movie, movie_cate[movie - 1], timestamp, rating >= positive_threshold,
                              num_users=len(user_values) + 1, num_goods=len(movie_sorted) + 1,
                              num_cates=len(genre_names) + 1, name="movielens")
    if max_len is not None:
        data = data.truncated(max_len)
    return split_by_user(data, test_fraction, seed)


def prepare_movielens(
    path_or_dir: Optional[PathLike],
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    positive_threshold: float = 4.0,
    out: Optional[PathLike] = None,
    overwrite: bool = False,
    cache_dir: Optional[PathLike] = None,
    log: Optional[Log] = None,
) -> Prepared:
    """:func:`load_movielens` (full histories), saved to ``out`` (or the cache) and reused while the two
    input files and the options are unchanged."""
    ratings, movies = _resolve(path_or_dir)
    options: Dict[str, Any] = {"test_fraction": float(test_fraction), "seed": seed,
                               "positive_threshold": float(positive_threshold)}

    def build() -> Tuple[Split, Dict[str, Any]]:
        split = load_movielens(path_or_dir, test_fraction=test_fraction, seed=seed,
                               positive_threshold=positive_threshold)
        return split, {"protocol": PROTOCOL, "ratings": int(len(split.train) + len(split.test))}

    return prepare_cached("movielens", {"ratings": ratings, "movies": movies}, options, build,
                          version=PIPELINE_VERSION, out=out, overwrite=overwrite, cache_dir=cache_dir, log=log)

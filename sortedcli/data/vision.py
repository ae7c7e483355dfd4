"""Image-classification datasets: Fashion-MNIST, CIFAR-10/100, an ImageFolder tree, sklearn digits.

:func:`build_vision_data` turns the ``data`` config section into a :class:`VisionData`: train, test
and calibration datasets whose items are ``(normalized float32 C x H x W tensor, int label)``.
Small datasets live in memory as tensors and are normalized (and augmented) in ``__getitem__``.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sortedcli.data.validation import cap, hold_out, take
from sortedcli.errors import UsageError
from sortedcli.tasks import ImageClassification

FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_ROOT = "data"  # where download=true puts files when data.root is not set
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_MAGIC = {1: 2049, 3: 2051}  # unsigned-byte IDX files: labels (1 dim), images (3 dims)
DEFAULT_STATS = {  # (mean, std) per channel
    "fashion_mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "imagefolder": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "digits": ([0.3053], [0.3760]),
}


@dataclass
class VisionData:
    name: str
    train: Dataset  # items are (float32 tensor C x H x W, normalized; int label)
    test: Dataset  # no augmentation
    calib: Dataset  # the training images without augmentation (to recalibrate BatchNorm)
    num_classes: int
    in_channels: int
    image_size: int  # H == W
    mean: tuple = ()  # the per-channel normalization applied to every item
    std: tuple = ()
    augmentation: str = "none"  # what the training items go through, in words (printed by train)
    val: Dataset | None = None  # training images held out for selection (see .validation), no augmentation
    task = ImageClassification()
    collate = None  # the default collation stacks (image, label) pairs

    @property
    def model_args(self) -> dict:
        """What the model builder needs to know of the data."""
        return {"num_classes": self.num_classes, "in_channels": self.in_channels}

    def example(self) -> torch.Tensor:
        """A batch of one test image: the input that FLOPs, latency and export are measured on."""
        return self.test[0][0].unsqueeze(0)

    @property
    def unit(self) -> str:
        return f"{self.in_channels}x{self.image_size}x{self.image_size} image"

    def describe(self) -> dict:
        """What an export records about the inputs the model expects."""
        return {"num_classes": self.num_classes, "in_channels": self.in_channels, "image_size": self.image_size,
                "data": self.name, "mean": list(self.mean), "std": list(self.std)}


class TensorImages(Dataset):
    """Images kept in memory (uint8 0..255 or float 0..1, N x C x H x W), normalized per item."""

    def __init__(self, images, labels, mean, std, size, augment=None):
        n, c, h, _ = images.shape
        if h != size and n * c * size * size <= 2**28:  # small enough: resize once, up front
            images = TF.resize(images, [size, size], antialias=True)
        self.images, self.labels, self.size, self.augment = images, labels, size, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if x.shape[-1] != self.size:
            x = TF.resize(x, [self.size, self.size], antialias=True)
        if self.augment is not None:
            x = self.augment(x)
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std, int(self.labels[i])


#: what ``data.augment=true`` means per dataset. Flips only where mirror images keep their class:
#: an ImageFolder tree may hold digits or text, so it gets crops only unless flips are asked for
#: (``data.augment=[crop,flip]``).
DEFAULT_AUGMENT = {"fashion_mnist": ("crop", "flip"), "cifar10": ("crop", "flip"), "cifar100": ("crop", "flip"),
                   "imagefolder": ("crop",), "digits": ()}
AUGMENTS = ("crop", "flip")


def augment_steps(cfg, name) -> tuple[str, ...]:
    """``data.augment``: false (none), true (the dataset's default) or a list of crop / flip."""
    value = cfg.get("augment", False)
    if value is None or value is False:
        return ()
    if value is True:
        return DEFAULT_AUGMENT[name]
    if isinstance(value, str):
        value = [value]
    try:
        steps = tuple(dict.fromkeys(value))
    except TypeError:
        steps = None
    if steps is None or not all(isinstance(v, str) and v in AUGMENTS for v in steps):
        raise UsageError(f"data.augment must be false, true or a list of {', '.join(AUGMENTS)}, got {value!r}")
    return steps


def _augmentation(size, steps):
    """``(transform or None, description)`` for the augmentation ``steps`` at image ``size``."""
    ops, words = [], []
    if "crop" in steps and size >= 28:
        ops.append(v2.RandomCrop(size, padding=4))
        words.append("random crop (padding 4)")
    if "flip" in steps:
        ops.append(v2.RandomHorizontalFlip())
        words.append("horizontal flip")
    return (v2.Compose(ops) if ops else None), (" + ".join(words) or "none")


def _stats(cfg, name, channels):
    mean, std = DEFAULT_STATS[name]
    mean = [float(v) for v in (cfg.get("mean") or mean)]
    std = [float(v) for v in (cfg.get("std") or std)]
    for key, vals in (("mean", mean), ("std", std)):
        if len(vals) not in (1, channels):
            raise UsageError(f"data.{key} must have 1 or {channels} values for {name}, got {len(vals)}")
    if any(s <= 0 for s in std):
        raise UsageError("data.std values must be positive")
    return mean * (channels // len(mean)), std * (channels // len(std))


def _subset_size(cfg, key):
    n = cfg.get(key)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UsageError(f"data.{key} must be a positive integer or null, got {n!r}")
    return n


def _in_memory(name, cfg, train, test, num_classes, native):
    """Wrap (images, labels) pairs for train and test into a VisionData."""
    size = int(cfg.get("image_size") or native)
    channels = train[0].shape[1]
    given = cfg.get("in_channels")
    if given is not None and given != channels:
        raise UsageError(f"{name} images have {channels} channel{'s' if channels > 1 else ''}: data.in_channels="
                         f"{given} cannot change that (drop it, or set data.in_channels={channels})")
    mean, std = _stats(cfg, name, channels)
    ntr, nte = _subset_size(cfg, "train_subset"), _subset_size(cfg, "test_subset")
    keep, held = hold_out(len(train[1]), cfg)
    val = (take(train[0], held), take(train[1], held)) if held else None
    if val is not None:
        train = (take(train[0], keep), take(train[1], keep))
    train = (train[0][:ntr], train[1][:ntr])
    test = (test[0][:nte], test[1][:nte])
    aug, words = _augmentation(size, augment_steps(cfg, name))
    return VisionData(name, train=TensorImages(*train, mean, std, size, aug),
                      test=TensorImages(*test, mean, std, size),
                      calib=TensorImages(*train, mean, std, size),
                      num_classes=num_classes, in_channels=channels, image_size=size,
                      mean=tuple(mean), std=tuple(std), augmentation=words,
                      val=cap(TensorImages(*val, mean, std, size) if val else None, cfg))


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)
def read_idx(path, ndim):
    """Read an unsigned-byte IDX file (gzip or plain) into a numpy array with ``ndim`` dimensions."""
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != IDX_MAGIC[ndim]:
        raise UsageError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (bad magic number)")
    dims = [int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    if len(raw) - header != int(np.prod(dims)):
        raise UsageError(f"{path} is corrupt: header says {dims} but holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folder, stem):
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_dir(candidates):
    for folder in candidates:
        if all(_find_file(folder, stem) for stem in FASHION_FILES):
            return folder
    return None


def _fashion_split(folder, prefix):
    images = read_idx(_find_file(folder, f"{prefix}-images-idx3-ubyte"), 3)
    labels = read_idx(_find_file(folder, f"{prefix}-labels-idx1-ubyte"), 1)
    if len(images) != len(labels) or images.shape[1:] != (28, 28) or labels.max(initial=0) > 9:
        raise UsageError(f"Fashion-MNIST files in {folder} are inconsistent: {images.shape} images, "
                         f"{len(labels)} labels (want N x 28 x 28 images, N labels 0..9)")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _fashion_mnist(cfg):
    root = Path(cfg.get("root") or DEFAULT_ROOT)
    if cfg.get("root"):
        candidates = [root, root / "FashionMNIST" / "raw"]
    else:
        candidates = [Path(FASHION_SYSTEM_DIR), root / "FashionMNIST" / "raw"]
    folder = _fashion_dir(candidates)
    if folder is None and cfg.get("download", False):
        try:
            torchvision.datasets.FashionMNIST(str(root), download=True)
        except Exception as e:  # network errors come in many types
            raise UsageError(f"could not download Fashion-MNIST into {root}: {e}") from None
        folder = _fashion_dir(candidates)
    if folder is None:
        where = " or ".join(str(c) for c in candidates)
        raise UsageError(f"Fashion-MNIST not found in {where}: install it with `apt-get install "
                         "dataset-fashion-mnist`, or pass data.root=DIR, or data.download=true (needs internet)")
    return _in_memory("fashion_mnist", cfg, _fashion_split(folder, "train"),
                      _fashion_split(folder, "t10k"), num_classes=10, native=28)


# ---------------------------------------------------------------- CIFAR (torchvision parses)
class _Checked:
    """Mixin: the files' integrity is checked before (:func:`_verify`, or skipped with
    ``data.verify=false``); torchvision then only needs them to exist, and parses them."""

    def _check_integrity(self):
        names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in names)

    def _load_meta(self):  # torchvision's version checks the meta file's md5 again
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10(_Checked, torchvision.datasets.CIFAR10):
    pass


class CIFAR100(_Checked, torchvision.datasets.CIFAR100):
    pass


def _verify(name: str, cls, root) -> None:
    """Refuse CIFAR files whose MD5 is not the official one (torchvision's own list): they are
    unpickled, and a pickle from anywhere can run code."""
    from torchvision.datasets.utils import check_integrity

    folder = Path(root) / cls.base_folder
    for filename, md5 in cls.train_list + cls.test_list + [(cls.meta["filename"], cls.meta["md5"])]:
        if (folder / filename).is_file() and not check_integrity(str(folder / filename), md5):
            raise UsageError(f"{folder / filename} is not the official {name} file (its MD5 differs): get the "
                             f"official archive (data.download=true), or pass data.verify=false to load your "
                             "own files in this format (they are unpickled: only files you trust)")


def _cifar(cfg, name):
    cls, classes = (CIFAR10, 10) if name == "cifar10" else (CIFAR100, 100)
    root, download = cfg.get("root"), bool(cfg.get("download", False))
    verify = cfg.get("verify", True)
    if not isinstance(verify, bool):
        raise UsageError(f"data.verify must be true or false, got {verify!r}")
    if not root and not download:
        raise UsageError(f"{name} needs data.root: put torchvision's {cls.base_folder} folder under "
                         "data.root=DIR or pass data.download=true (needs internet)")
    root = root or DEFAULT_ROOT
    if download:  # torchvision's download checks the archive's MD5 itself
        try:
            cls(root, train=True, download=True)
        except Exception as e:
            raise UsageError(f"cannot download {name} into {root}: {e!r}") from None
    if verify:
        _verify(name, cls, root)
    splits = []
    for train in (True, False):
        try:
            ds = cls(root, train=train)
        except RuntimeError:
            raise UsageError(f"{name} not found in {root}: put torchvision's {cls.base_folder} folder "
                             "under data.root=DIR or pass data.download=true (needs internet)") from None
        except Exception as e:  # bad pickles, missing keys, wrong shapes
            raise UsageError(f"cannot load {name} from {Path(root) / cls.base_folder}: {e!r}") from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        splits.append((images, torch.tensor(ds.targets, dtype=torch.int64)))
    return _in_memory(name, cfg, splits[0], splits[1], num_classes=classes, native=32)


# ---------------------------------------------------------------- ImageFolder tree
def _image(path: str, mode: str = "RGB"):
    """PIL, converted to ``mode`` (``RGB`` as torchvision's own loader, or ``L``: grayscale); a file with
    an image's name that is not one is the user's."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
        raise UsageError(f"{path} is not a readable image ({type(e).__name__}): remove it from data.root or "
                         "replace it") from None


def _empty_class_folders(split: Path) -> list[Path]:
    """The class sub-folders of ``split`` with no image file anywhere in them (ImageFolder refused them
    as "Found no valid file for the classes dog", which the CLI read as a missing train/ or val/)."""
    def has_image(folder: Path) -> bool:
        return any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(folder, followlinks=True)
                   for f in files)

    if not split.is_dir():
        return []
    return sorted(c for c in split.iterdir() if c.is_dir() and not c.name.startswith(".") and not has_image(c))


def _imagefolder(cfg):
    root = Path(cfg.get("root") or ".")
    hint = f"data.root must hold train/ and val/ folders of class sub-folders (looked in {root})"
    test_dir = root / "val" if (root / "val").is_dir() else root / "test"
    if not cfg.get("root") or not (root / "train").is_dir() or not test_dir.is_dir():
        raise UsageError(hint)
    size = int(cfg.get("image_size") or 224)
    channels = cfg.get("in_channels")
    channels = 3 if channels is None else channels
    if channels not in (1, 3) or isinstance(channels, bool):
        raise UsageError(f"data.in_channels must be 3 (RGB) or 1 (grayscale: every image converted to one "
                         f"channel) for an image folder, got {channels!r}")
    mode = "RGB" if channels == 3 else "L"
    if channels == 1 and not cfg.get("mean") and not cfg.get("std"):  # ImageNet's statistics, as one gray
        mean, std = ([sum(v) / 3] for v in DEFAULT_STATS["imagefolder"])
    else:
        mean, std = _stats(cfg, "imagefolder", channels)
    aug, words = _augmentation(size, augment_steps(cfg, "imagefolder"))

    def pipeline(augment):
        steps = [v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        steps += [aug] if augment and aug is not None else []
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]
        return v2.Compose(steps)

    def folder(path, augment):
        try:
            return torchvision.datasets.ImageFolder(str(path), transform=pipeline(augment),
                                                    loader=functools.partial(_image, mode=mode))
        except (FileNotFoundError, OSError) as e:
            empty = _empty_class_folders(path)
            if empty:
                raise UsageError(f"class folder{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} "
                                 f"{'hold' if len(empty) > 1 else 'holds'} no images "
                                 f"({', '.join(IMG_EXTENSIONS)}): put the class's "
                                 "images there, or remove the folder from every split") from None
            raise UsageError(f"{hint}: {e}") from None

    train, calib = folder(root / "train", True), folder(root / "train", False)
    test = folder(test_dir, False)
    if test.classes != train.classes:
        raise UsageError(f"class folders differ between {root / 'train'} and {test_dir}")
    if len(train.classes) < 2:  # one class trains to loss 0 and learns nothing
        raise UsageError(f"{root / 'train'} has {len(train.classes)} class folder ({', '.join(train.classes)}): "
                         "a classifier needs two or more, one sub-folder of images per class")
    given = cfg.get("num_classes")
    if given is not None and given != len(train.classes):
        raise UsageError(f"data.num_classes={given} but {root / 'train'} has {len(train.classes)} class folders "
                         f"({', '.join(train.classes[:10])}{', ...' if len(train.classes) > 10 else ''}): "
                         f"set data.num_classes={len(train.classes)}")

    def cut(ds, n):
        return ds if n is None else Subset(ds, range(min(n, len(ds))))

    ntr, nte = _subset_size(cfg, "train_subset"), _subset_size(cfg, "test_subset")
    classes = train.classes
    keep, held = hold_out(len(train), cfg)
    val = take(calib, held) if held else None  # the held-out training images, without augmentation
    if held:
        train, calib = take(train, keep), take(calib, keep)
    return VisionData("imagefolder", train=cut(train, ntr), test=cut(test, nte), calib=cut(calib, ntr),
                      num_classes=len(classes), in_channels=channels,
                      image_size=size, mean=tuple(mean), std=tuple(std), augmentation=words, val=cap(val, cfg))


# ---------------------------------------------------------------- sklearn digits
def _digits(cfg):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.from_numpy(np.random.RandomState(0).permutation(len(labels)))
    train, test = order[:1500], order[-297:]
    return _in_memory("digits", cfg, (images[train], labels[train]), (images[test], labels[test]),
                      num_classes=10, native=8)


BUILDERS = {
    "fashion_mnist": _fashion_mnist,
    "cifar10": lambda cfg: _cifar(cfg, "cifar10"),
    "cifar100": lambda cfg: _cifar(cfg, "cifar100"),
    "imagefolder": _imagefolder,
    "digits": _digits,
}


def build_vision_data(cfg) -> VisionData:
    """Build train/test/calib datasets from the ``data`` config section (a dict or DictConfig)."""
    name = str(cfg.get("name") or "").lower().replace("-", "_")
    if name not in BUILDERS:
        raise UsageError(f"unknown data.name {cfg.get('name')!r}; known: {', '.join(BUILDERS)}")
    size = cfg.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UsageError(f"data.image_size must be a positive integer or null, got {size!r}")
    return BUILDERS[name](cfg)

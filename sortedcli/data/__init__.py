"""Datasets for training and evaluating nested networks.

Every data object offers the same small surface to the engine and the commands: ``train``, ``test``
and ``calib`` datasets, ``val`` (the training items held out for choosing a sub-model, or None: see
:mod:`.validation`), ``collate`` (None: torch's default), ``task`` (the :mod:`sortedcli.tasks`
contract: how a batch becomes inputs, a loss and a metric), ``model_args`` (what the model builder
needs: classes, image channels, labels), ``example()`` (a batch of one input, on which FLOPs, latency
and exports are measured), ``unit`` (what that one input is, for the FLOPs column) and ``describe()``
(what an export records about the inputs). Sources: :mod:`.vision` (images),
:mod:`.text_classification` (text) and :mod:`.lm` (language modelling and instructions).
"""

from __future__ import annotations

import torch

from sortedcli.data import lm
from sortedcli.data.lm import LMData, build_lm_data
from sortedcli.data.text_classification import GLUE, TextData, build_text_data
from sortedcli.data.vision import BUILDERS as VISION, VisionData, build_vision_data
from sortedcli.errors import UsageError

TEXT = ("rotten_tomatoes", "glue", "text")
LANGUAGE = ("news", "hamlet", "corpus", "gsm8k", "alpaca", "chat", "chitchat")  # causal language modelling (data.lm)


def task_name(cfg) -> str:
    """The task (:mod:`sortedcli.tasks`) of the data the ``data`` section names."""
    name = str(cfg.get("name") or "")
    return "causal_lm" if name in LANGUAGE else "text_classification" if name in TEXT else "image_classification"


#: the data sets of each task (:mod:`sortedcli.tasks`), and what its items are
DATA_OF = {"causal_lm": LANGUAGE, "text_classification": TEXT, "image_classification": tuple(VISION)}
KIND = {"causal_lm": "text for a language model", "text_classification": "labelled text",
        "image_classification": "images"}
DOES = {"causal_lm": "causal language modelling", "text_classification": "text classification",
        "image_classification": "image classification"}


def _check_reader(name: str, tokenizer, tasks: tuple[str, ...] | None = None) -> None:
    """Refuse data the model cannot read, advising the data sets of the tasks the model does (``tasks``,
    when the caller knows them: a causal LM was advised classification data it then refused)."""
    task = task_name({"name": name})
    if tasks and task not in tasks:
        does = " or ".join(DOES.get(t, t.replace("_", " ")) for t in tasks)
        choices = ", ".join(d for t in tasks for d in DATA_OF.get(t, ()))
        raise UsageError(f"data={name} is {KIND[task]}, but the model does {does}: choose a data set it reads "
                         f"(data=NAME: {choices})")
    if name in LANGUAGE and tokenizer is None:
        raise UsageError(f"data={name} is text for a language model: choose model=llama")
    if tokenizer is not None and name in VISION:
        raise UsageError(f"data={name} is images, but the model reads text: choose a text data set "
                         f"({', '.join(TEXT)})")


def build_data(cfg, tokenizer=None, tasks: tuple[str, ...] | None = None):
    """The data the ``data`` config section names; text is tokenized with the model's ``tokenizer``;
    refused before it is read if it is not of one of the model's ``tasks``."""
    name = str(cfg.get("name") or "")
    _check_reader(name, tokenizer, tasks)
    if name in LANGUAGE:
        return build_lm_data(cfg, tokenizer)
    if name in TEXT:
        return build_text_data(cfg, tokenizer)
    return build_vision_data(cfg)


def input_spec(cfg, tokenizer=None, tasks: tuple[str, ...] | None = None) -> tuple[dict, object, str]:
    """``(model_args, example inputs, unit)`` from the ``data`` section (and the model's ``tokenizer``)
    alone, without reading any data: what ``sortednet submodels`` needs to build the model that
    ``train`` builds and count its FLOPs on the input shape that ``eval`` and ``export`` count them on."""
    name = str(cfg.get("name") or "")
    if tokenizer is not None or tasks:
        _check_reader(name, tokenizer, tasks)
    if name in LANGUAGE:  # the vocabulary is the tokenizer's (without one: the model config's); per token
        example = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
        return ({} if tokenizer is None else lm.model_args(tokenizer)), example, "token"
    if name in TEXT:
        labels = cfg.get("labels")
        if name == "rotten_tomatoes":
            labels = ["rotten", "fresh"]
        elif name == "glue" and not labels:
            labels = GLUE.get(str(cfg.get("task") or "").lower().replace("-", ""), {}).get("labels")
        if not labels:
            raise UsageError(f"data={name}: set data.labels (the class names) to size the classifier")
        n = int(cfg.get("flops_length") or cfg.get("max_length") or 128)
        example = {"input_ids": torch.zeros(1, n, dtype=torch.long), "attention_mask": torch.ones(1, n, dtype=torch.long)}
        return {"num_classes": len(labels), "labels": list(map(str, labels))}, example, f"sequence of {n} tokens"
    size, channels = cfg.image_size, cfg.in_channels
    return ({"num_classes": cfg.num_classes, "in_channels": channels}, torch.zeros(1, channels, size, size),
            f"{channels}x{size}x{size} image")


__all__ = ["LMData", "task_name", "build_lm_data", "TextData", "VisionData", "build_data", "build_text_data", "build_vision_data", "input_spec"]

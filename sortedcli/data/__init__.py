"""Datasets for training and evaluating nested networks (see :mod:`sortedcli.data.vision`)."""

from sortedcli.data.vision import VisionData, build_vision_data

__all__ = ["VisionData", "build_vision_data"]

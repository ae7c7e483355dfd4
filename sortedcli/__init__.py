"""sortednet: train one network so that its nested sub-networks all work (SortedNet)."""

__version__ = "0.1.0"

"""lmforge: train small language models on scarce compute, serve them safely, and prove what it cost."""

__version__ = "0.1.0"

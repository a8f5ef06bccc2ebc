"""Batches of (input, target) windows from a flat token stream: every token used, resumable, rank-aware.

The stream is cut into non-overlapping windows of T+1 tokens at stride T (window i = tokens[i*T : i*T+T+1]);
a document longer than the context continues in the next window instead of being cropped to its first one.
Each epoch visits the windows in a fresh seeded permutation; one global batch is B*world consecutive entries of
it, and rank r takes rows [r*B, (r+1)*B). Position = (epoch, batch), so a saved state resumes bit for bit.

Shapes: B = batch size per rank, T = sequence length (context).
"""

from collections.abc import Iterator

import numpy as np
import torch

from lmforge.errors import ConfigError, DataError


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the windows starting at `starts` into (x, y), y shifted by one."""
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)  # (B, T+1)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())  # (B, T), (B, T)


class BatchLoader:
    """An endless iterator of (x, y) int64 tensors of shape (B, T) for one rank."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, name: str = "the training split"):
        if batch_size < 1 or seq_len < 1:
            raise ConfigError(f"batch size and sequence length must be positive, got --train.batch_size {batch_size} "
                              f"and --model.seq_len {seq_len}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside a world of {world_size} processes")
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size  # windows consumed per step across all ranks
        self.n_windows = max(len(tokens) - 1, 0) // seq_len
        if self.n_windows < self.global_batch:
            raise DataError(f"{name} has {len(tokens)} tokens; one batch needs {batch_size}*{world_size}*{seq_len}+1 = "
                            f"{self.global_batch * seq_len + 1} — lower --train.batch_size or --model.seq_len, "
                            "or add data")
        # A partial last global batch is dropped; with a new permutation each epoch, every window still gets used.
        self.batches_per_epoch = self.n_windows // self.global_batch
        self.tokens_per_epoch = self.batches_per_epoch * self.global_batch * seq_len  # trained on, all ranks
        self.epoch = 0
        self.batch = 0  # global batches already taken in this epoch
        self._perm_epoch: int | None = None
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng((self.seed, self.epoch)).permutation(self.n_windows)
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        first = self.batch * self.global_batch + self.rank * self.batch_size
        windows = self._permutation()[first:first + self.batch_size]  # (B,)
        self.batch += 1
        return _windows(self.tokens, windows * self.seq_len, self.seq_len)

    def state_dict(self) -> dict:
        """The position, plus what it means: resuming needs the same windows and global batch size."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "n_windows": self.n_windows,
                "seq_len": self.seq_len, "global_batch": self.global_batch}

    def seek(self, batches: int) -> None:
        """Where a run is after `batches` global batches from its start (a DiLoCo site catching up jumps there)."""
        self.epoch, self.batch = divmod(batches, self.batches_per_epoch)

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved loader stopped (the world size may differ if the global batch is
        the same)."""
        mine = self.state_dict()
        for key in ("seed", "n_windows", "seq_len", "global_batch"):
            if state.get(key) != mine[key]:
                raise DataError(f"cannot resume the data loader: it was saved with {key}={state.get(key)}, this run "
                                f"has {key}={mine[key]}; resume with the same data, --model.seq_len, seed and global "
                                "batch size (batch size x world size)")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def iter_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                      max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential windows from the start of `tokens`, for validation: the same batches every call.

    The last batch may have fewer than `batch_size` rows, so every window counts; a stream shorter than
    seq_len+1 tokens yields nothing.
    """
    n_windows = max(len(tokens) - 1, 0) // seq_len
    for i, first in enumerate(range(0, n_windows, batch_size)):  # count_eval_batches(...) of them
        if max_batches is not None and i >= max_batches:
            return
        starts = np.arange(first, min(first + batch_size, n_windows), dtype=np.int64) * seq_len  # (B,)
        yield _windows(tokens, starts, seq_len)


def count_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None) -> int:
    """How many batches iter_eval_batches yields (for a progress bar's total)."""
    n_batches = -(-(max(len(tokens) - 1, 0) // seq_len) // batch_size)
    return n_batches if max_batches is None else min(n_batches, max_batches)

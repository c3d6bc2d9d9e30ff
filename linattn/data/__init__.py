"""Byte-level text data: the built-in corpus, a train/validation split, and batches sharded across ranks.

Token ids are the bytes of the file (vocab_size 256). The built-in corpus is Ambrose Bierce's
"The Devil's Dictionary" (1911, public domain; see README.md in this folder).
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = Path(__file__).with_name("corpus.txt")


def load_bytes(path: str | Path | None = None) -> torch.Tensor:
    """The bytes of a file (the built-in corpus when path is None) as a uint8 tensor [N]."""
    path = CORPUS if path is None else Path(path)
    if not path.is_file():
        raise ValueError(f"data: {str(path)!r} is not a file")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"data: {str(path)!r} is empty")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def split(data: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (1 - val_fraction) of the bytes for training, the rest for validation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"data: val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(len(data) * val_fraction))
    return data[:-n_val], data[-n_val:]


class ByteBatches:
    """Batches of windows of seq_len + 1 bytes (inputs and next-byte targets), sharded like DistributedSampler.

    The stream is cut into non-overlapping windows. Each epoch visits them in a fresh random order
    (seeded by seed + epoch); step s takes the next batch_size * world windows of that order and rank r
    the r-th batch_size of them. A batch is a function of the step alone, so resuming at a step
    continues the same sequence of batches, and the ranks together see exactly what one process with
    batch_size * world would see.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.n_windows = (len(data) - 1) // seq_len
        per_step = batch_size * world
        self.usable = self.n_windows // per_step * per_step  # whole steps per epoch
        if self.usable == 0:
            raise ValueError(
                f"data: {len(data)} bytes hold {self.n_windows} windows of seq_len={seq_len}, fewer "
                f"than one step's batch_size * world = {batch_size} * {world}"
            )
        self._epoch, self._order = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return self.usable // (self.batch_size * self.world)

    def windows(self, step: int) -> torch.Tensor:
        """Indices [batch_size] of this rank's windows at a step."""
        epoch, offset = divmod(step * self.batch_size * self.world, self.usable)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n_windows, generator=gen)[: self.usable]
        start = offset + self.rank * self.batch_size
        return self._order[start : start + self.batch_size]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len] int64, for this rank at a step."""
        return self.gather(self.windows(step))

    def gather(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = windows[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        chunk = self.data[idx].long()
        return chunk[:, :-1], chunk[:, 1:]


def eval_windows(data: torch.Tensor, seq_len: int, max_windows: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's share of the first max_windows validation windows: [n, seq_len + 1] int64 (n may be 0).

    The windows are fixed (no shuffling), so every evaluation scores the same bytes.
    """
    n = min((len(data) - 1) // seq_len, max_windows)
    if n == 0:
        raise ValueError(f"data: the validation split ({len(data)} bytes) is shorter than seq_len + 1 = {seq_len + 1}")
    mine = torch.arange(n)[rank::world]
    return data[mine[:, None] * seq_len + torch.arange(seq_len + 1)].long()

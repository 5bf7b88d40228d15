"""A byte corpus every machine has, the installed Python standard library, and batches that do not
depend on the parallel layout.

Legend: G global batch rows, L = seq_len + 1 bytes per row (inputs and the next-byte targets),
M micro-batch rows, N corpus bytes.

A global batch is a pure function of (corpus, step, seed): every rank computes the same one with no
communication, and the step number is the whole data position a checkpoint needs. The global batch
is cut into micro-batches of consecutive rows that are the same whatever the number of ranks, so an
MoE layer (which routes and drops per call) sees the same token groups on any layout.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import check_int

# NOTE: files are joined with one NUL byte: no source file of the standard library contains one, so
# it marks a file boundary unambiguously, and the model can learn that a new file starts after it.
SEPARATOR = b"\0"
_EXCLUDED_DIRS = ("site-packages", "dist-packages")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The .py files of the standard library, as paths relative to `stdlib_root()`, sorted.

    Recursive, without site-packages and dist-packages (installed packages, not the
    standard library), without symlinked directories, and only regular readable files.
    """
    root = stdlib_root()
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]
        for name in names:
            path = Path(directory, name)
            if name.endswith(".py") and path.is_file() and os.access(path, os.R_OK):
                files.append(path.relative_to(root))
    # NOTE: sorted by the posix string, not by Path, so that the order is the same on every OS.
    return sorted(files, key=lambda p: p.as_posix())


def split_files(files: list[Path], val_fraction: float = 0.05) -> tuple[list[Path], list[Path]]:
    """(train, val) by file, each in the order given.

    A file goes to val when crc32(its posix path, UTF-8) / 2**32 < val_fraction: the same on every
    machine and every run (Python's hash() of a str is salted per process). Pass relative paths, so
    that the split does not depend on where the files are installed.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    train, val = [], []
    for path in files:
        in_val = zlib.crc32(Path(path).as_posix().encode()) / 2**32 < val_fraction
        (val if in_val else train).append(path)
    return train, val


@dataclass(frozen=True)
class ByteCorpus:
    """data: [N] token ids: here uint8, the bytes of the files joined with SEPARATOR (launch.finetune
    also fills one with a tokenizer's int32 ids); num_files: how many files."""

    data: Tensor
    num_files: int

    def __len__(self) -> int:
        return self.data.numel()

    @classmethod
    def from_bytes(cls, data: bytes) -> ByteCorpus:
        return cls(_as_tensor(data), num_files=1 if data else 0)

    @classmethod
    def from_files(cls, files: list[Path], root: Path | str, max_bytes: int | None = None) -> ByteCorpus:
        """The files (relative to `root`), in order, joined with SEPARATOR.

        max_bytes: stop reading once that many bytes are in and cut the corpus there.
        """
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes!r}")
        contents, size = [], 0
        for path in files:
            if max_bytes is not None and size >= max_bytes:
                break
            contents.append(Path(root, path).read_bytes())
            size += len(contents[-1]) + len(SEPARATOR)
        return cls(_as_tensor(SEPARATOR.join(contents)[:max_bytes]), num_files=len(contents))


def load_corpus(val_fraction: float = 0.05, max_bytes: int | None = None) -> tuple[ByteCorpus, ByteCorpus]:
    """(train, val) corpora of the standard library, split by file; max_bytes caps each one."""
    root = stdlib_root()
    train, val = (
        ByteCorpus.from_files(files, root, max_bytes) for files in split_files(stdlib_files(), val_fraction)
    )
    return train, val


def global_batch(corpus: ByteCorpus, step: int, global_batch: int, seq_len: int, seed: int) -> Tensor:
    """[G, L] long: G windows of L = seq_len + 1 consecutive corpus bytes, at start offsets drawn
    uniformly from [0, N - L] by a generator seeded with seed * 1_000_003 + step.

    A pure function of its arguments: every rank gets the same batch without communicating.
    Note: (seed, step + 1_000_003) draws what (seed + 1, step) does, far beyond the runs we make.
    """
    _check_int("step", step, 0)
    _check_int("global_batch", global_batch, 1)
    _check_int("seq_len", seq_len, 1)
    _check_int("seed", seed, 0)
    length = seq_len + 1
    _check_fits(corpus, length)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    offsets_G = torch.randint(0, len(corpus) - length + 1, (global_batch,), generator=generator)
    return _windows(corpus, offsets_G, length)


def micro_batches(batch: Tensor, rank: int, world: int, micro_batch: int) -> list[Tensor]:
    """This rank's micro-batches of the global batch [G, L], each [M, L] with M = micro_batch.

    Micro-batch j is rows j*M ... (j+1)*M - 1; rank r of `world` takes micro-batches
    r, r + world, r + 2*world, ... in that order. The G / M micro-batches are the same for every
    `world`, only their owner changes. Needs G divisible by M * world.
    """
    _check_int("world", world, 1)
    _check_int("micro_batch", micro_batch, 1)
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank!r}")
    rows = batch.shape[0]
    if rows % (micro_batch * world):
        raise ValueError(
            f"global batch of {rows} rows is not divisible by micro_batch * world = "
            f"{micro_batch} * {world} = {micro_batch * world}"
        )
    return [batch[j * micro_batch : (j + 1) * micro_batch] for j in range(rank, rows // micro_batch, world)]


def val_batches(corpus: ByteCorpus, num_batches: int, batch_size: int, seq_len: int) -> list[Tensor]:
    """num_batches tensors [batch_size, seq_len + 1] long, the windows at num_batches * batch_size
    evenly spaced offsets from 0 to N - seq_len - 1: the same every call.
    """
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size), ("seq_len", seq_len)):
        _check_int(name, value, 1)
    length = seq_len + 1
    _check_fits(corpus, length)
    offsets = torch.linspace(0, len(corpus) - length, num_batches * batch_size, dtype=torch.float64)
    windows = _windows(corpus, offsets.round().long(), length)
    return list(windows.split(batch_size))


def _windows(corpus: ByteCorpus, offsets_G: Tensor, length: int) -> Tensor:
    """[G, length] long: corpus bytes offsets_G[i] ... offsets_G[i] + length - 1 in row i."""
    index_GL = offsets_G[:, None] + torch.arange(length)
    return corpus.data[index_GL].long()


def _as_tensor(data: bytes) -> Tensor:
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _check_fits(corpus: ByteCorpus, length: int) -> None:
    if len(corpus) < length:
        raise ValueError(
            f"corpus of {len(corpus)} bytes is shorter than one window of seq_len + 1 = {length}"
        )


def _check_int(name: str, value: object, minimum: int) -> None:
    check_int("data", name, value, minimum)

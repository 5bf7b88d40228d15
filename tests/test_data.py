"""The standard-library byte corpus, its split by file, and layout-independent batches."""

import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from expert_parallel.data import (
    SEPARATOR,
    ByteCorpus,
    global_batch,
    load_corpus,
    micro_batches,
    split_files,
    stdlib_files,
    stdlib_root,
    val_batches,
)


@pytest.fixture(scope="module")
def files():
    return stdlib_files()


def counting_corpus(size: int = 256) -> ByteCorpus:
    """Bytes 0, 1, ..., 255: a window is consecutive values, and its first byte is its offset."""
    return ByteCorpus.from_bytes(bytes(range(size)))


def test_stdlib_files_are_sorted_relative_py_files_without_installed_packages(files):
    assert len(files) > 100
    assert [p.as_posix() for p in files] == sorted(p.as_posix() for p in files)
    assert all(not p.is_absolute() and p.suffix == ".py" for p in files)
    assert not any({"site-packages", "dist-packages"} & set(p.parts) for p in files)
    assert Path("os.py") in files and Path("json/__init__.py") in files
    assert (stdlib_root() / files[0]).is_file()


def test_split_is_deterministic_disjoint_complete_and_near_the_fraction(files):
    train, val = split_files(files, 0.05)
    assert split_files(files, 0.05) == (train, val)
    assert not set(train) & set(val)
    assert sorted(train + val, key=Path.as_posix) == files
    assert 0.03 < len(val) / len(files) < 0.07
    assert split_files(files, 0.0) == (files, [])


def test_split_follows_the_written_out_crc32_rule():
    paths = [Path(f"pkg/module_{i}.py") for i in range(200)]
    _, val = split_files(paths, 0.25)
    assert val == [p for p in paths if zlib.crc32(p.as_posix().encode()) / 2**32 < 0.25]
    with pytest.raises(ValueError, match="val_fraction"):
        split_files(paths, 1.0)


def test_corpus_joins_files_with_the_separator_and_caps_them(tmp_path):
    for name, text in [("a.py", b"alpha"), ("b.py", b"beta"), ("c.py", b"gamma")]:
        (tmp_path / name).write_bytes(text)
    names = [Path("a.py"), Path("b.py"), Path("c.py")]
    corpus = ByteCorpus.from_files(names, tmp_path)
    assert bytes(corpus.data.tolist()) == SEPARATOR.join([b"alpha", b"beta", b"gamma"])
    assert corpus.data.dtype == torch.uint8 and corpus.num_files == 3
    capped = ByteCorpus.from_files(names, tmp_path, max_bytes=8)
    assert bytes(capped.data.tolist()) == b"alpha" + SEPARATOR + b"be" and capped.num_files == 2
    assert len(ByteCorpus.from_bytes(b"")) == 0


def test_load_corpus_caps_each_split():
    train, val = load_corpus(val_fraction=0.05, max_bytes=5000)
    assert len(train) == len(val) == 5000
    assert train.data.dtype == val.data.dtype == torch.uint8
    assert not torch.equal(train.data, val.data)


def test_global_batch_is_a_pure_function_of_its_arguments():
    corpus = counting_corpus()
    batch = global_batch(corpus, step=3, global_batch=8, seq_len=16, seed=7)
    assert batch.shape == (8, 17) and batch.dtype == torch.long
    assert torch.equal(batch, global_batch(corpus, step=3, global_batch=8, seq_len=16, seed=7))
    assert not torch.equal(batch, global_batch(corpus, step=4, global_batch=8, seq_len=16, seed=7))
    assert not torch.equal(batch, global_batch(corpus, step=3, global_batch=8, seq_len=16, seed=8))
    assert torch.equal(batch.diff(dim=1), torch.ones(8, 16, dtype=torch.long))  # consecutive bytes
    whole = global_batch(counting_corpus(17), step=0, global_batch=2, seq_len=16, seed=0)
    assert torch.equal(whole, torch.arange(17).expand(2, 17))  # the only window fits exactly
    with pytest.raises(ValueError, match="shorter than one window"):
        global_batch(counting_corpus(16), step=0, global_batch=2, seq_len=16, seed=0)


def as_micro_batches(batches: list[torch.Tensor]) -> Counter:
    return Counter(tuple(map(tuple, b.tolist())) for b in batches)


def test_micro_batches_are_the_same_set_for_every_world_size():
    batch = torch.arange(16 * 3).view(16, 3)
    in_order = micro_batches(batch, rank=0, world=1, micro_batch=2)
    assert [b.tolist() for b in in_order] == [batch[j * 2 : j * 2 + 2].tolist() for j in range(8)]
    for world in (1, 2, 4):
        per_rank = [micro_batches(batch, rank, world, micro_batch=2) for rank in range(world)]
        assert all(len(mine) == 8 // world for mine in per_rank)
        assert as_micro_batches([b for mine in per_rank for b in mine]) == as_micro_batches(in_order)
        assert [b.tolist() for b in per_rank[world - 1]] == [b.tolist() for b in in_order[world - 1 :: world]]


def test_micro_batches_refuse_an_indivisible_batch():
    batch = torch.zeros(12, 3)
    with pytest.raises(ValueError, match=r"12 rows is not divisible by micro_batch \* world = 2 \* 4 = 8"):
        micro_batches(batch, rank=0, world=4, micro_batch=2)
    with pytest.raises(ValueError, match="rank"):
        micro_batches(batch, rank=2, world=2, micro_batch=2)


def test_val_batches_are_fixed_and_evenly_spaced():
    corpus = counting_corpus()
    batches = val_batches(corpus, num_batches=3, batch_size=2, seq_len=15)
    assert [b.shape for b in batches] == [(2, 16)] * 3
    assert all(torch.equal(a, b) for a, b in zip(batches, val_batches(corpus, 3, 2, 15)))
    offsets = torch.cat([b[:, 0] for b in batches])
    assert offsets.tolist() == [0, 48, 96, 144, 192, 240]  # 0 to 256 - 16, in 5 equal steps

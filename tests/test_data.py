"""Loaders: val sharding counts every image once, train shards are disjoint and equal (RANDOM and
QUASI_RANDOM), progressive resizing, on-device normalisation, and the 'no batch' errors."""

import gc

import numpy as np
import pytest
import torch

from engine_data import SIZE_PX, TRAIN_PER_CLASS, VAL_IMAGES, shared_betons
from ffcv_imagenet.data import (IMAGENET_MEAN, IMAGENET_STD, color_jitter_, create_train_loader,
                                create_val_loader, pca_lighting_, prepare_batch)

# numba's finalizers print KeyErrors when ffcv's compiled pipelines are collected (harmless)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CPU = torch.device("cpu")
TRAIN_IMAGES = TRAIN_PER_CLASS * 10


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    yield shared_betons(tmp_path_factory)
    gc.collect()  # collect ffcv's pipelines here, where the numba warnings above are filtered


def val_labels(path, rank, world_size, batch_size=10):
    loader = create_val_loader(path, batch_size=batch_size, resolution_px=SIZE_PX, num_workers=1,
                               device=CPU, rank=rank, world_size=world_size)
    labels = [y.clone() for _, y in loader]
    return loader, torch.cat(labels).tolist()


def test_val_shards_evaluate_every_image_exactly_once(betons):
    _, val = betons
    loader0, shard0 = val_labels(val, 0, 2)
    loader1, shard1 = val_labels(val, 1, 2)
    # 37 over 2 ranks: 19 + 18, contiguous blocks, no padding and no image dropped
    assert (len(shard0), len(shard1)) == (19, 18)
    assert (loader0.num_samples, loader1.num_samples) == (19, 18)
    # the file holds the images sorted by label: 3 of each of the first 3 classes, then 4 each
    everything = sorted(c for c in range(10) for _ in range(3 if c < 3 else 4))
    assert len(everything) == VAL_IMAGES
    assert shard0 + shard1 == everything
    assert len(loader0) == 2 and len(loader1) == 2  # last batch kept (drop_last=False)


def test_a_last_batch_of_one_image(betons):
    # 19 = 3 x 6 + 1: ffcv's Squeeze made the last batch a 0-d tensor and its loader thread died,
    # leaving the consumer waiting forever
    _, val = betons
    loader, labels = val_labels(val, 0, 2, batch_size=6)
    assert len(loader) == 4 and len(labels) == 19
    assert [len(y) for _, y in loader] == [6, 6, 6, 1]


def test_a_dying_loader_thread_is_an_error_not_a_hang(betons, monkeypatch):
    from ffcv.loader.epoch_iterator import EpochIterator

    def broken(self, *args):
        raise IndexError("simulated failure in the loader thread")

    _, val = betons
    loader = create_val_loader(val, batch_size=10, resolution_px=SIZE_PX, num_workers=1, device=CPU)
    monkeypatch.setattr(EpochIterator, "run_pipeline", broken)
    monkeypatch.setattr("threading.excepthook", lambda args: None)  # keep the test output clean
    with pytest.raises(RuntimeError, match=f"loader thread for {val} stopped"):
        for _ in loader:
            pass


def train_order(path, order, rank, world_size, epoch):
    loader = create_train_loader(path, batch_size=4, resolution_px=SIZE_PX, num_workers=1,
                                 device=CPU, rank=rank, world_size=world_size, order=order,
                                 in_memory=order != "quasi_random", seed=3)
    return loader, np.asarray(loader.loader.traversal_order.sample_order(epoch))


@pytest.mark.parametrize("order", ["random", "quasi_random"])
def test_train_shards_are_disjoint_and_equal_length(betons, order):
    train, _ = betons
    loader0, epoch0_rank0 = train_order(train, order, 0, 2, epoch=0)
    loader1, epoch0_rank1 = train_order(train, order, 1, 2, epoch=0)
    assert len(epoch0_rank0) == len(epoch0_rank1) == TRAIN_IMAGES // 2
    assert not set(epoch0_rank0) & set(epoch0_rank1)
    assert set(epoch0_rank0) | set(epoch0_rank1) <= set(range(TRAIN_IMAGES))
    assert len(loader0) == len(loader1) == TRAIN_IMAGES // 2 // 4
    # same (seed, epoch): same order, whichever loader computes it; another epoch: another order
    _, again = train_order(train, order, 0, 2, epoch=0)
    np.testing.assert_array_equal(epoch0_rank0, again)
    epoch1_rank0 = np.asarray(loader0.loader.traversal_order.sample_order(1))
    assert not np.array_equal(epoch0_rank0, epoch1_rank0)


def test_train_shards_drop_the_remainder_equally():
    from types import SimpleNamespace

    from ffcv_imagenet.data import ShardedOrder

    loader = SimpleNamespace(indices=np.arange(7), seed=0, distributed=False)
    shards = [ShardedOrder(loader, quasi_random=False, rank=r, world_size=3).sample_order(0)
              for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]
    assert len(set(np.concatenate(shards))) == 6


def test_train_loader_progressive_resolution_epoch_and_threads(betons):
    train, _ = betons
    before = torch.get_num_threads()
    loader = create_train_loader(train, batch_size=16, resolution_px=24, num_workers=2, device=CPU,
                                 torch_threads=1)
    try:
        images, labels = next(iter(loader))
        assert images.shape == (16, 3, 24, 24) and images.dtype == torch.uint8
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.shape == (16,)
        loader.set_resolution(16)
        loader.set_epoch(5)
        batches = []
        for x, y in loader:
            # ffcv sets num_workers torch threads when iterated; the model gets its own back
            assert torch.get_num_threads() == 1
            batches.append((tuple(x.shape), len(y)))
        assert batches == [((16, 3, 16, 16), 16)] * (TRAIN_IMAGES // 16)
        assert loader.loader.next_epoch == 6
    finally:
        torch.set_num_threads(before)


def test_no_batch_errors_say_why(betons):
    train, val = betons
    with pytest.raises(ValueError) as e:
        create_train_loader(train, batch_size=64, resolution_px=16, num_workers=1, device=CPU,
                            world_size=2)
    message = str(e.value)
    assert str(train) in message and "no batch" in message and "40 per process" in message
    assert "batch_size=64" in message
    with pytest.raises(ValueError, match="val loader .* would yield no batch"):
        create_val_loader(val, batch_size=8, resolution_px=16, num_workers=1, device=CPU,
                          rank=40, world_size=41)


def test_prepare_batch_normalises_to_imagenet_statistics():
    mean = torch.tensor(IMAGENET_MEAN) * 255
    std = torch.tensor(IMAGENET_STD) * 255
    images = torch.empty(2, 3, 4, 4, dtype=torch.uint8)
    images[0] = mean.round().to(torch.uint8).view(3, 1, 1)
    images[1] = 255
    x = prepare_batch(images, dtype=torch.float32)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    expected0 = (mean.round() - mean) / std
    expected1 = (255 - mean) / std
    torch.testing.assert_close(x[0, :, 0, 0], expected0)
    torch.testing.assert_close(x[1, :, 2, 3], expected1)
    assert prepare_batch(images, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_color_jitter_and_pca_lighting_are_seeded_and_bounded():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)

    def augmented(seed):
        g = torch.Generator().manual_seed(seed)
        return prepare_batch(images, dtype=torch.float32, color_jitter=0.4, pca_lighting=0.1, generator=g)

    torch.testing.assert_close(augmented(1), augmented(1))
    assert not torch.equal(augmented(1), augmented(2))
    assert not torch.equal(augmented(1), prepare_batch(images, dtype=torch.float32))
    g = torch.Generator().manual_seed(0)
    x = color_jitter_(images.float(), 0.4, g)
    assert x.min() >= 0 and x.max() <= 255
    x = pca_lighting_(images.float(), 0.0, g)
    torch.testing.assert_close(x, images.float())


def test_in_memory_warns_with_advice_when_the_file_exceeds_available_ram(betons, monkeypatch):
    """ffcv-imagenet #11: in_memory=1 without the RAM for it gave 'an hour per epoch', silently."""
    import collections

    import psutil

    from ffcv_imagenet.data import check_in_memory

    train, _ = betons
    memory = collections.namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=1024))
    with pytest.warns(UserWarning, match="in_memory=0") as caught:
        check_in_memory(train, in_memory=True)
    assert str(train) in str(caught[0].message) and "quasi_random" in str(caught[0].message)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=2**50))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_in_memory(train, in_memory=True)  # enough RAM: silent
        monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=1024))
        check_in_memory(train, in_memory=False)  # not asked to cache: silent


def test_ffcv_is_imported_without_numba_typed_dict_compilation():
    """_ffcv.preload: ffcv's IMAGE_MODES becomes a plain dict (its typed Dict JIT costs 2-3 s of
    start-up); numba.typed.Dict itself is left as it was; loaders and the writer still work
    (the rest of this suite runs with it)."""
    import subprocess
    import sys

    code = ("import ffcv_imagenet.data, ffcv.fields.rgb_image as r, numba.typed; "
            "assert type(r.IMAGE_MODES) is dict and r.IMAGE_MODES == {'jpg': 0, 'raw': 1}; "
            "assert numba.typed.Dict is not dict; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_random_flip_draws_and_mirrors_as_ffcvs_flip_in_place(monkeypatch):
    """RandomFlip (our loop version of ffcv's RandomHorizontalFlip, which compiles 3-6 s slower):
    under the same numba RNG seed it flips the same images of the batch, mirrors them exactly
    (odd width: the middle column stays), leaves the rest untouched, and writes in place. One
    thread, as for seeded runs: parallel-compiled draws come from the worker threads' RNGs."""
    from ffcv.pipeline.compiler import Compiler
    from ffcv.transforms import RandomHorizontalFlip
    from numba import njit

    from ffcv_imagenet.data import RandomFlip

    @njit
    def seed_numba(seed):
        np.random.seed(seed)

    monkeypatch.setattr(Compiler, "num_threads", 1)
    images = np.random.default_rng(0).integers(0, 256, size=(16, 5, 7, 3), dtype=np.uint8)
    theirs = Compiler.compile(RandomHorizontalFlip().generate_code())
    ours = Compiler.compile(RandomFlip().generate_code())
    seed_numba(3)
    expected = theirs(images.copy(), np.empty_like(images))
    seed_numba(3)
    batch = images.copy()
    got = ours(batch, None)
    assert np.shares_memory(got, batch)
    np.testing.assert_array_equal(got, expected)
    mirrored = [bool((got[i] == images[i, :, ::-1]).all()) for i in range(16)]
    same = [bool((got[i] == images[i]).all()) for i in range(16)]
    assert all(m != s for m, s in zip(mirrored, same))  # each image is one or the other
    assert 3 <= sum(mirrored) <= 13


def test_the_loader_thread_runs_on_its_loaders_gpu(betons, monkeypatch):
    """ffcv's epoch thread is made current on the loader's GPU before its first stream switch
    (else every rank makes a context on GPU 0, libffcv/ffcv#356): the thread, not the main one,
    calls set_device with the loader's device."""
    import threading

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(
        (device, threading.current_thread() is threading.main_thread())))
    train, _ = betons
    loader = create_train_loader(train, batch_size=16, resolution_px=16, num_workers=1, device=CPU)
    assert loader.loader.thread_device == CPU
    for _ in loader:  # a CPU loader: nothing to set
        pass
    assert calls == []
    loader.loader.thread_device = torch.device("cuda", 1)  # as a rank-1 loader holds it
    for _ in loader:
        pass
    assert calls == [(torch.device("cuda", 1), False)]


def _batches_bytes(loader, epochs_and_resolutions, stall=False):
    out = []
    for epoch, res in epochs_and_resolutions:
        loader.set_epoch(epoch)
        loader.set_resolution(res)
        for images, labels in loader:
            if stall:  # the compute stream busy while the loader thread fills the next slots
                torch.cuda._sleep(20_000_000)
            out.append((images.cpu().clone(), labels.cpu().clone()))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loader_batches_equal_the_cpu_loaders_while_the_gpu_is_busy(betons):
    train, _ = betons
    schedule = [(0, 24), (1, 32)]  # a resolution change between epochs
    made = [create_train_loader(train, batch_size=16, resolution_px=24, num_workers=1,
                                device=device, deterministic=True, seed=3)
            for device in (CPU, torch.device("cuda", 0))]
    on_cpu = _batches_bytes(made[0], schedule)
    on_gpu = _batches_bytes(made[1], schedule, stall=True)
    assert len(on_cpu) == len(on_gpu) > 0
    for (a, la), (b, lb) in zip(on_cpu, on_gpu):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prepare_batch_on_cuda_never_syncs():
    device = torch.device("cuda", 0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    generator = torch.Generator(device=device).manual_seed(0)
    prepare_batch(images, dtype=torch.bfloat16)  # the per-device constants, built once
    torch.cuda.set_sync_debug_mode("error")
    try:
        for dtype in (torch.float16, torch.bfloat16):
            x = prepare_batch(images, dtype=dtype, color_jitter=0.4, pca_lighting=0.1,
                              generator=generator)
            assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
    finally:
        torch.cuda.set_sync_debug_mode(0)

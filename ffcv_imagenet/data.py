"""Train and val loaders over .beton files, and the on-device half of the input pipeline.

CPU side (ffcv, numba threads): decode + RandomResizedCrop + horizontal flip for train, decode +
center crop (ratio 224/256) for val, to uint8 NHWC batches that ffcv exposes as channels-last NCHW
tensors on the device. Device side (torch, batched, `prepare_batch`): optional colour jitter and
PCA lighting, then normalisation by the ImageNet mean and std in the training dtype.

Sharding across processes:
- train: one global order per epoch, identical on every rank (seed, epoch), cut into `world_size`
  interleaved shards of equal length (the remainder beyond a multiple of world_size is dropped, as
  drop_last does for batches). This is our own ffcv TraversalOrder, used for RANDOM and for
  QUASI_RANDOM alike, so QUASI_RANDOM works with several processes (ffcv refuses it with
  `distributed=True`): the quasi-random order stays page-local globally and each rank takes every
  world_size-th sample of it, so the ranks read the same pages at about the same time.
- val: each rank gets a contiguous block of indices (`indices=`), sequential order and
  drop_last=False, so every val image is evaluated exactly once across ranks. ffcv's own
  distributed mode uses torch's DistributedSampler, which pads by repeating images to equal
  length; that would count some images twice.

Train decoding: `train_decoder` builds our crop-first decoder (fastjpeg.py; decodes only what the
crop box needs) or ffcv's RandomResizedCrop; both draw the same boxes. Progressive resizing sets
the train decoder's `output_size` between epochs (ffcv re-reads it when it allocates the epoch's
buffers). The decoder is built by a factory argument so that another decoder can be swapped in.
"""

import json
import os
import queue
import warnings
from dataclasses import replace

import numpy as np
import torch

from ._ffcv import preload  # isort: skip

preload()  # before any ffcv import: saves 2-3 s of start-up (see _ffcv.py)

import ffcv.loader.loader
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder
from ffcv.traversal_order.quasi_random import QuasiRandom

from .fastjpeg import DEFAULT_FLAGS, CropFirstRandomResizedCrop

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, on [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
# AlexNet's PCA of ImageNet RGB pixels (on [0, 1]); rows of EIGVEC are per colour channel.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
VAL_CROP_RATIO = 224 / 256


# --------------------------------------------------------------------------- traversal orders

# test hook: a folder where each rank appends the sample indices it draws, one JSON line an epoch
# (order-rank<R>.jsonl), so that a test can check that every sample is drawn once per epoch
ORDER_LOG_ENV = "FFCV_IMAGENET_TEST_ORDER_LOG"


class ShardedOrder(TraversalOrder):
    """One global order per epoch (RANDOM or QUASI_RANDOM), same on every rank; rank r takes
    positions r, r + world, r + 2*world, ... of it, truncated to equal length on every rank."""

    def __init__(self, loader, *, quasi_random: bool, rank: int, world_size: int):
        super().__init__(loader)
        self.rank, self.world_size = rank, world_size
        self.quasi = None
        if quasi_random:
            if not loader.memory_manager.page_to_samples:
                raise ValueError("quasi_random order needs a paged .beton; use data.order=random")
            self.quasi = QuasiRandom.__new__(QuasiRandom)  # reuse its page-aware generator
            self.quasi.loader, self.quasi.indices, self.quasi.seed = loader, self.indices, self.seed
            self.quasi.page_to_samples = loader.memory_manager.page_to_samples
            self.quasi.distributed = False
            self.quasi.prepare_data_structures()

    def sample_order(self, epoch: int):
        if self.quasi is not None:
            order = self.quasi.sample_order(epoch)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.indices)
        per_rank = len(order) // self.world_size
        mine = order[self.rank::self.world_size][:per_rank]
        if os.environ.get(ORDER_LOG_ENV):
            with open(os.path.join(os.environ[ORDER_LOG_ENV], f"order-rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": epoch, "indices": [int(i) for i in mine]}) + "\n")
        return mine


class _OrderFactory(TraversalOrder):
    """ffcv's Loader calls `order(loader)` on a TraversalOrder *instance*; this adapts our class."""

    def __init__(self, **kwargs):  # no loader yet
        self.kwargs = kwargs

    def __call__(self, loader):
        return ShardedOrder(loader, **self.kwargs)

    def sample_order(self, epoch):  # pragma: no cover - never used on the factory
        raise NotImplementedError


# --------------------------------------------------------------------------- the loader thread

class DeviceEpochIterator(EpochIterator):
    """ffcv's epoch thread, first made current on its loader's GPU (`loader.thread_device`).

    A new thread starts on GPU 0: ffcv's thread enters `torch.cuda.stream(slot stream)` for each
    batch, and torch's stream context looks up (and so creates) the current device's context, so
    every rank of an 8-GPU node grew a context on GPU 0 (libffcv/ffcv#356: GPU 0's memory taken
    by seven other processes in nvidia-smi). Loaders without `thread_device` (stock ffcv in
    bench) run as before."""

    def run(self):
        device = getattr(self.loader, "thread_device", None)
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        super().run()


# ffcv's Loader.__iter__ builds its EpochIterator by this module-level name
ffcv.loader.loader.EpochIterator = DeviceEpochIterator


def _on_device(loader: Loader, device) -> Loader:
    loader.thread_device = torch.device(device)
    return loader


# --------------------------------------------------------------------------- decoders

DECODERS = ("crop_first", "ffcv")
ORDERS = ("random", "quasi_random")  # train sample orders (ShardedOrder)


def train_decoder(resolution_px: int, scale, ratio, *, seed: int = 0, deterministic: bool = False,
                  kind: str = "crop_first", levers=None):
    """Train decoder factory.

    kind="crop_first": our CropFirstRandomResizedCrop (fastjpeg.py): same crop boxes as ffcv's,
    drawn before decoding, and only the box's part of each JPEG decoded (`levers`: flags from
    fastjpeg, default DEFAULT_FLAGS). kind="ffcv": ffcv's RandomResizedCropRGBImageDecoder.
    Deterministic runs get the seeded variant of either.
    """
    size, scale, ratio = (resolution_px, resolution_px), tuple(scale), tuple(ratio)
    if kind == "crop_first":
        flags = DEFAULT_FLAGS if levers is None else levers
        if deterministic:
            return SeededCropFirst(size, scale=scale, ratio=ratio, flags=flags, seed=seed)
        return CropFirstRandomResizedCrop(size, scale=scale, ratio=ratio, flags=flags)
    if kind != "ffcv":
        raise ValueError(f"unknown train decoder {kind!r}; choose from {DECODERS}")
    if deterministic:
        return SeededRandomResizedCrop(size, scale=scale, ratio=ratio, seed=seed)
    return RandomResizedCropRGBImageDecoder(size, scale=scale, ratio=ratio)


class _SeededDecode:
    """Mixin: the decoder's randomness becomes a function of (seed, the batch's sample indices).

    ffcv draws crops and flips from numba's thread-local RNG, which nobody seeds, so two runs never
    crop alike. Here numba's RNG is reseeded at the start of each batch from a hash of the seed and
    the batch's indices (which differ per epoch because the order does); with one decoding thread
    the flip that follows draws from the same stream, so the whole batch is reproducible. Both
    train decoders draw the same boxes from the same stream, so seeded they crop identically.
    """

    def generate_code(self):
        decode = Compiler.compile(super().generate_code())
        base_seed = int(self.seed) % 2147483647

        def seeded_decode(batch_indices, my_storage, metadata, storage_state):
            h = np.int64(base_seed)
            for k in range(len(batch_indices)):
                h = (h * np.int64(1000003) + np.int64(batch_indices[k]) + np.int64(1)) % np.int64(2147483647)
            np.random.seed(h)
            return decode(batch_indices, my_storage, metadata, storage_state)

        return seeded_decode


class SeededRandomResizedCrop(_SeededDecode, RandomResizedCropRGBImageDecoder):
    def __init__(self, output_size, scale, ratio, seed: int):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed = seed


class SeededCropFirst(_SeededDecode, CropFirstRandomResizedCrop):
    def __init__(self, output_size, scale, ratio, flags, seed: int):
        super().__init__(output_size, scale=scale, ratio=ratio, flags=flags)
        self.seed = seed


class RandomFlip(Operation):
    """Mirror each image left-right with probability `flip_prob`, in place.

    Draws as ffcv's RandomHorizontalFlip does (one `np.random.rand(batch)` per batch, so a seeded
    decoder's stream gives the same flips), but swaps pixels in loops instead of assigning
    `dst[i] = images[i, :, ::-1]`. For that assignment numba (0.68) compiles the message of a
    broadcast-shape error, string formatting included: 3-6 s of every run's start-up, while the
    loops compile in well under a second. In place, it also saves a copy of each batch.
    """

    def __init__(self, flip_prob: float = 0.5):
        super().__init__()
        self.flip_prob = flip_prob

    def generate_code(self):
        my_range = Compiler.get_iterator()
        flip_prob = self.flip_prob

        def flip(images, _):
            n, height, width, channels = images.shape
            should_flip = np.random.rand(n) < flip_prob
            for i in my_range(n):
                if should_flip[i]:
                    for y in range(height):
                        for x in range(width // 2):
                            mirror = width - 1 - x
                            for c in range(channels):
                                pixel = images[i, y, x, c]
                                images[i, y, x, c] = images[i, y, mirror, c]
                                images[i, y, mirror, c] = pixel
            return images

        flip.is_parallel = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), None


# --------------------------------------------------------------------------- loaders

class TrainLoader:
    """ffcv Loader plus what the engine changes between epochs: the epoch and the resolution."""

    def __init__(self, loader: Loader, decoder, num_samples: int, torch_threads: int):
        self.loader, self.decoder = loader, decoder
        self.num_samples = num_samples
        self.torch_threads = torch_threads

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch  # our order and ffcv's use it as the shuffle seed

    def set_resolution(self, resolution_px: int) -> None:
        self.decoder.output_size = (resolution_px, resolution_px)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        yield from _iterate(self.loader, self.torch_threads)


class ValLoader:
    """This process's val batches; `indices`: the samples of the file it reads, in the order it
    yields them (a contiguous block), which maps its images to the names sidecar."""

    def __init__(self, loader: Loader, indices: np.ndarray, torch_threads: int):
        self.loader, self.indices, self.torch_threads = loader, indices, torch_threads
        self.num_samples = len(indices)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        yield from _iterate(self.loader, self.torch_threads)


def _iterate(loader: Loader, torch_threads: int):
    """(images, labels [B]) batches. Labels come as [B, 1] and are flattened here: ffcv's Squeeze
    makes a batch of one a 0-d tensor, on which its ToDevice fails in the loader thread (and the
    consumer then waits forever), e.g. the last val batch of 19 images at batch size 6."""
    # ffcv's Loader calls torch.set_num_threads(num_workers) when iterated (and again from its
    # worker thread as it starts); put back the thread count the model should use.
    iterator = iter(loader)
    torch.set_num_threads(torch_threads)
    first = True
    try:
        for images, labels in _batches(iterator, loader.fname):
            if first:
                torch.set_num_threads(torch_threads)
                first = False
            yield images, labels.view(-1)
    finally:
        iterator.close()  # stops ffcv's worker thread when the consumer stops early
        torch.set_num_threads(torch_threads)


def _batches(iterator, path, poll_s: float = 1.0):
    """ffcv's EpochIterator.__next__, except that it does not wait forever for a batch from a
    loader thread that died: ffcv's thread stops on any exception (its traceback is printed) and
    its consumer would block on the queue, hanging this rank and, through collectives, the job."""
    from ffcv.loader.epoch_iterator import IS_CUDA

    while True:
        try:
            item = iterator.output_queue.get(timeout=poll_s)
        except queue.Empty:
            if iterator.is_alive() or not iterator.output_queue.empty():
                continue
            raise RuntimeError(f"the ffcv loader thread for {path} stopped before the end of the "
                               "epoch (its exception is printed above)") from None
        if item is None:
            iterator.close()
            return
        slot, batch = item
        if IS_CUDA:  # wait for the batch's copy to the device, as ffcv's __next__ does
            iterator.current_stream.wait_stream(iterator.cuda_streams[slot])
        yield batch


def num_samples(path) -> int:
    from ffcv.reader import Reader

    return int(Reader(str(path)).num_samples)


def check_in_memory(path, in_memory: bool, processes_on_node: int = 1) -> None:
    """Warn when os_cache is asked for a file larger than the available RAM (a memory cgroup's
    limit included: host.memory_available_bytes)."""
    if not in_memory:
        return
    from .host import memory_available_bytes

    size = os.path.getsize(path)
    available = memory_available_bytes()
    if size > available:
        warnings.warn(
            f"{path} is {size / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of RAM is available: "
            "with data.in_memory=1 the page cache will thrash and an epoch can take an hour. "
            "Use --data.in_memory=0 --data.order=quasi_random, a smaller dataset (lower max "
            "resolution, more JPEG), or a machine with more RAM.", stacklevel=2)


def _image_pipeline(decoder, device, flip: bool):
    ops = [decoder] + ([RandomFlip()] if flip else [])
    return ops + [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]


def _label_pipeline(device):
    return [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True)]  # [B, 1]; see _iterate


def _no_batch_error(kind, path, n, batch_size, world_size, drop_last):
    return ValueError(
        f"{kind} loader for {path} would yield no batch: {n} samples split over {world_size} "
        f"process(es) is {n // world_size} per process, fewer than batch_size={batch_size}"
        f"{' with drop_last' if drop_last else ''}; lower the batch size or use more data")


def check_min_side(loader: Loader, path: str) -> None:
    """DataFileError naming the file and a sample when an image is below metadata.MIN_SIDE on a
    side (written by an older writer): the decoders' crops would abort the process inside OpenCV,
    with no file named, at the first batch that holds it."""
    from ffcv_imagenet.metadata import MIN_SIDE, DataFileError

    reader = loader.reader
    columns = dict(zip(reader.field_names, reader.metadata.dtype.names))
    images = reader.metadata[columns["image"]]
    small = np.flatnonzero(np.minimum(images["height"], images["width"]) < MIN_SIDE)
    if len(small):
        i = int(small[0])
        raise DataFileError(f"{path}: {len(small)} images have a side below {MIN_SIDE} px, e.g. sample "
                            f"{i} ({int(images['width'][i])}x{int(images['height'][i])}), which the "
                            "loaders' crops cannot handle; write the file again (the writer now "
                            "refuses such images)")


def create_train_loader(path, *, batch_size: int, resolution_px: int, num_workers: int,
                        device, rank: int = 0, world_size: int = 1, in_memory: bool = True,
                        order: str = "random", seed: int = 0, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), deterministic: bool = False, torch_threads=None,
                        decoder: str = "crop_first", decoder_factory=train_decoder) -> TrainLoader:
    """Train loader for this rank: equal-length shards, drop_last, channels-last uint8 on `device`."""
    path = str(path)
    n = num_samples(path)
    if (n // world_size) // batch_size == 0:
        raise _no_batch_error("train", path, n, batch_size, world_size, True)
    check_in_memory(path, in_memory)
    if deterministic:
        num_workers = 1  # the seeded decoder relies on one decoding thread
    torch_threads = torch_threads or torch.get_num_threads()
    decoder = decoder_factory(resolution_px, scale, ratio, seed=seed, deterministic=deterministic,
                              kind=decoder)
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: expected one of {', '.join(ORDERS)}")
    loader = _on_device(Loader(
        path, batch_size=batch_size, num_workers=num_workers, os_cache=in_memory,
        order=_OrderFactory(quasi_random=(order == "quasi_random"), rank=rank, world_size=world_size),
        seed=seed, drop_last=True,
        pipelines={"image": _image_pipeline(decoder, device, flip=True), "label": _label_pipeline(device)},
    ), device)
    torch.set_num_threads(torch_threads)
    check_min_side(loader, path)
    return TrainLoader(loader, decoder, n, torch_threads)


def create_val_loader(path, *, batch_size: int, resolution_px: int, num_workers: int, device,
                      rank: int = 0, world_size: int = 1, in_memory: bool = True,
                      torch_threads=None, crop_ratio: float = VAL_CROP_RATIO) -> ValLoader:
    """Val loader for this rank: a contiguous block of the file, every image exactly once overall."""
    path = str(path)
    n = num_samples(path)
    shard = np.array_split(np.arange(n), world_size)[rank]
    if len(shard) == 0:
        raise _no_batch_error("val", path, n, batch_size, world_size, False)
    torch_threads = torch_threads or torch.get_num_threads()
    decoder = CenterCropRGBImageDecoder((resolution_px, resolution_px), ratio=crop_ratio)
    loader = _on_device(Loader(
        path, batch_size=batch_size, num_workers=num_workers, os_cache=in_memory,
        order=OrderOption.SEQUENTIAL, indices=shard, drop_last=False,
        pipelines={"image": _image_pipeline(decoder, device, flip=False), "label": _label_pipeline(device)},
    ), device)
    torch.set_num_threads(torch_threads)
    check_min_side(loader, path)
    return ValLoader(loader, shard, torch_threads)


# --------------------------------------------------------------------------- on-device half

def prepare_batch(images: torch.Tensor, *, dtype: torch.dtype, color_jitter: float = 0.0,
                  pca_lighting: float = 0.0, generator=None) -> torch.Tensor:
    """uint8 NCHW (channels-last) -> normalised `dtype` channels-last; augments when asked.

    Nothing here waits on the host: the constants live on the device (`device_constants`), and
    the augmentations draw on the device from `generator`."""
    if color_jitter > 0 or pca_lighting > 0:
        x = images.float()
        if color_jitter > 0:
            x = color_jitter_(x, color_jitter, generator)
        if pca_lighting > 0:
            x = pca_lighting_(x, pca_lighting, generator)
    else:
        x = images  # uint8: addcmul promotes it to fp32
    consts = device_constants(x.device)
    # (x - mean) / std as one multiply-add in fp32 (the constants' dtype), then `dtype`
    x = torch.addcmul(consts["shift"], x, consts["scale"]).to(dtype)
    return x.contiguous(memory_format=torch.channels_last)


_CONSTANTS = {}


def device_constants(device) -> dict:
    """fp32 tensors on `device`, built once per device: `torch.tensor(list, device=cuda)` is a
    blocking host-to-device copy, which per batch would make every step wait on the host.
    scale = 1 / (255 std), shift = -mean / std (per channel, [1, 3, 1, 1]); PCA eigval, eigvec."""
    device = torch.device(device)
    if device not in _CONSTANTS:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
        host = {"scale": (1 / (255 * std)).view(1, 3, 1, 1),
                "shift": (-mean / std).view(1, 3, 1, 1),
                "eigval": torch.tensor(PCA_EIGVAL, dtype=torch.float64),
                "eigvec": torch.tensor(PCA_EIGVEC, dtype=torch.float64)}
        _CONSTANTS[device] = {k: v.to(device=device, dtype=torch.float32) for k, v in host.items()}
    return _CONSTANTS[device]


def _uniform(n, low, high, x, generator):
    """[n, 1, 1, 1] draws of U[low, high] on x's device (from `generator`, which lives there)."""
    u = torch.rand(n, 1, 1, 1, generator=generator, device=x.device)
    return low + (high - low) * u


def _gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter_(x: torch.Tensor, strength: float, generator=None) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by U[1-s, 1+s] per image (pixels on [0, 255])."""
    n = x.shape[0]
    lo, hi = max(0.0, 1 - strength), 1 + strength
    x = x * _uniform(n, lo, hi, x, generator)
    x = x.clamp(0, 255)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * _uniform(n, lo, hi, x, generator) + mean).clamp(0, 255)
    gray = _gray(x)
    x = ((x - gray) * _uniform(n, lo, hi, x, generator) + gray).clamp(0, 255)
    return x


def pca_lighting_(x: torch.Tensor, std: float, generator=None) -> torch.Tensor:
    """AlexNet lighting noise: add eigvec @ (alpha * eigval), alpha ~ N(0, std), per image."""
    n = x.shape[0]
    alpha = torch.randn(n, 3, generator=generator, device=x.device) * std
    consts = device_constants(x.device)
    rgb = (alpha * consts["eigval"]) @ consts["eigvec"].T * 255  # [n, 3]
    return (x + rgb.view(n, 3, 1, 1)).clamp(0, 255)

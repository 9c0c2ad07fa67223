"""Process-group set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...).

One process without torchrun needs no environment and creates no process group. Several processes
use NCCL on CUDA and gloo on CPU. Failure handling: torchrun terminates the other workers when one
exits with an error (its own failure propagation); the process group gets a finite timeout so that
a rank waiting on a dead peer raises instead of hanging forever; `cleanup()` destroys the group on
every exit path of `fit`.

Also what the CPU offers a process: its cores, its share of threads, and whether it runs bf16
natively (which `train.resolve_precision` and the run's env.json ask).
"""

import datetime
import signal
import sys
import threading
import time
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ffcv_imagenet.host import cpu_cores  # noqa: F401  (distributed.cpu_cores, as callers use it)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN's bf16 kernels need AVX-512).

    Without them autocast falls back to reference kernels: on a 2-core AVX2-only AMD EPYC a
    ResNet-50 training step at 96 px, batch 32, ran 13.5x slower in bf16 than in fp32 (1.10
    against 14.9 img/s, `ffcv-imagenet bench`: results/bench/precision-avx2.json).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op gone in some release: ask ATen's dispatch
        return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


class DeviceError(ValueError):
    """A device the command asks for that this machine does not have."""


def setup(device: str = "auto", timeout_s: float = 600.0, cpu_threads: int = 0) -> DistInfo:
    """Initialise from torchrun's environment; device is 'auto', 'cuda' or 'cpu'.

    On CPU, torch uses `cpu_threads` threads (0: this process's share of the cores).
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise DeviceError("training.device=cuda but torch sees no CUDA device (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda}); use "
                          "--training.device=cpu or auto")
    backend = choose_backend(use_cuda, local_world_size)
    if use_cuda:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
        set_cpu_threads(local_world_size, cpu_threads)

    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, timeout=timeout, store=attempt_store(timeout, world_size),
                                rank=rank, world_size=world_size,
                                device_id=dev if backend == "nccl" else None)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        watch_agent()
    return DistInfo(rank, world_size, local_rank, local_world_size, dev)


def watch_agent(poll_s: float = 2.0) -> threading.Thread:
    """Under torchrun: end this worker (SIGTERM to itself) when its agent is gone. An agent killed
    alone (SIGKILL, OOM killer) leaves its workers running as orphans that nothing will restart;
    ended, they close their connections, so that the other nodes' workers fail at their next
    collective and name the lost peer instead of training on with a node that cannot recover."""
    agent = os.getppid()

    def watch():
        while os.getppid() == agent:
            time.sleep(poll_s)
        print(f"rank {os.environ.get('RANK', 0)}: its torchrun agent (pid {agent}) is gone; ending "
              "this worker", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # a worker blocked inside a collective never runs the Python handler
        os._exit(128 + signal.SIGTERM)

    thread = threading.Thread(target=watch, name="watch-torchrun-agent", daemon=True)
    thread.start()
    return thread


def attempt_store(timeout: datetime.timedelta, world_size: int) -> "dist.Store":
    """torchrun's store (env://), its keys under a prefix of this attempt: after a restart
    (--max-restarts) the new workers must not read the addresses the failed ones left in it
    (gloo then connects to a dead process: 'connectFullMesh failed ... Connection refused').
    The attempt is counted in the store itself, every process of every attempt arriving once:
    TORCHELASTIC_RESTART_COUNT is not it, as an agent that restarts its healthy workers because
    another node failed does not count a restart."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    arrival = store.add("ffcv_imagenet/arrivals", 1)
    return dist.PrefixStore(f"ffcv_imagenet/attempt{(arrival - 1) // world_size}", store)


def choose_backend(use_cuda: bool, local_world_size: int) -> str:
    """NCCL for one process per GPU; gloo on the CPU, and on GPUs shared by several processes of
    a node (NCCL refuses two ranks on one GPU; sharing is for tests and debugging on a 1-GPU
    machine), where rank r takes GPU r mod the GPU count."""
    if use_cuda and local_world_size <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


def set_cpu_threads(local_world_size: int, threads: int = 0) -> int:
    """Give each process on this node its share of the cores (or `threads`, when > 0).

    torchrun sets OMP_NUM_THREADS=1 in every worker, which would leave CPU training on one core;
    the share of the cores this process may run on is what we want instead. On a machine shared
    with other jobs fewer threads can be much faster (spinning OpenMP threads wait on each other).
    """
    threads = threads or max(1, cpu_cores() // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place; a no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# how gloo and NCCL report a peer process that is gone (killed, its node lost)
LOST_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                   "remote process exited", "NCCL communicator was aborted")


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another process of the group is gone. A killed process
    is noticed at once (its sockets close); one that went silent (a network partition) only at the
    process group's timeout, `setup`'s timeout_s (600 s)."""
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in LOST_PEER_SIGNS)


def world_size() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(obj) -> list:
    """Every process's `obj`, in rank order, on every process ([obj] without a group)."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj

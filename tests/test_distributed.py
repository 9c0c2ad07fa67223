"""Process-group set-up without torchrun, and the CPU thread share (torchrun's OMP_NUM_THREADS=1
would otherwise leave CPU training on one core)."""

import pytest
import torch

from ffcv_imagenet import distributed


def test_single_process_needs_no_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        info = distributed.setup("cpu", cpu_threads=1)
        assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
        assert info.is_main and not info.is_distributed and info.device == torch.device("cpu")
        assert torch.get_num_threads() == 1
        assert not torch.distributed.is_initialized()
        t = torch.tensor([1.0, 2.0])
        assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
        assert distributed.broadcast_object({"a": 1}) == {"a": 1}
        distributed.barrier()
        distributed.cleanup()
    finally:
        torch.set_num_threads(threads)


def test_cpu_thread_share_ignores_torchruns_one_thread(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(distributed, "cpu_cores", lambda: 16)
    try:
        assert distributed.set_cpu_threads(local_world_size=2) == 8
        assert torch.get_num_threads() == 8
        assert distributed.set_cpu_threads(local_world_size=32) == 1
        assert distributed.set_cpu_threads(local_world_size=2, threads=3) == 3
    finally:
        torch.set_num_threads(threads)


def test_cuda_requested_without_a_gpu_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(distributed.DeviceError, match="training.device=cuda but torch sees no CUDA device"):
        distributed.setup("cuda")
    from ffcv_imagenet import train  # on the command line: one line, exit 2

    assert train.main(["--training.device=cuda", "--data.train_dataset=x", "--data.val_dataset=y"]) == 2
    assert capsys.readouterr().err.startswith("ffcv-imagenet train: error: training.device=cuda but")


def test_backend_is_nccl_for_one_process_per_gpu_else_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert distributed.choose_backend(True, 8) == "nccl"
    assert distributed.choose_backend(True, 1) == "nccl"
    assert distributed.choose_backend(True, 16) == "gloo"  # GPUs shared by processes
    assert distributed.choose_backend(False, 1) == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.choose_backend(True, 2) == "gloo"

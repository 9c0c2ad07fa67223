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


def test_cgroup_memory_room_is_the_smallest_of_the_cgroup_and_those_above(tmp_path):
    """v1 and v2 layouts under a fake /sys/fs/cgroup: a limit on a parent (a SLURM job's) counts,
    anonymous memory is taken off, no limit anywhere gives None."""
    from ffcv_imagenet.host import cgroup_memory_room_bytes

    root = tmp_path / "cgroup"
    job = root / "unified" / "slurm" / "job_7"
    step = job / "step_0"
    step.mkdir(parents=True)
    (job / "memory.max").write_text(str(8 * 2**30))
    (job / "memory.stat").write_text(f"anon {2**30}\nfile 5\n")
    (step / "memory.max").write_text("max\n")
    (step / "memory.stat").write_text("anon 0\n")
    proc = tmp_path / "cgroup.txt"
    proc.write_text("0::/slurm/job_7/step_0\n")
    assert cgroup_memory_room_bytes(proc, root) == 7 * 2**30
    v1 = root / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(3 * 2**30))
    (v1 / "memory.stat").write_text(f"cache 100\ntotal_rss {2**29}\n")
    proc.write_text("4:memory:/docker/abc\n0::/slurm/job_7/step_0\n")
    assert cgroup_memory_room_bytes(proc, root) == 3 * 2**30 - 2**29
    (v1 / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    proc.write_text("4:memory:/docker/abc\n")
    assert cgroup_memory_room_bytes(proc, root) is None

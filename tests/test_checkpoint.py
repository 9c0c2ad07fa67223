"""Checkpoint files: atomic save, refusal of foreign files, and the RNG states of a machine with
another number of GPUs."""

import os
import subprocess

import pytest
import torch

from ffcv_imagenet import checkpoint as ckpt_io


def test_cuda_rng_states_of_a_larger_node_restore_what_this_machine_has(monkeypatch):
    """An 8-GPU checkpoint resumed on 1 GPU sets GPU 0 only (set_rng_state_all raised IndexError);
    one of 1 GPU resumed on 4 sets GPU 0 and leaves the others."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: calls.append((device, state)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]
    assert ckpt_io.restore_cuda_rng(states) == 1
    assert [d for d, _ in calls] == [0] and torch.equal(calls[0][1], states[0])
    calls.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert ckpt_io.restore_cuda_rng(states[:1]) == 1 and [d for d, _ in calls] == [0]


def test_save_is_atomic_and_load_refuses_other_files(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt_io.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left
    assert ckpt_io.load_checkpoint(path)["epoch"] == 3
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="other.pt: not an ffcv-imagenet checkpoint"):
        ckpt_io.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="checkpoint not found: .*missing.pt"):
        ckpt_io.load_checkpoint(tmp_path / "missing.pt")


def save_epoch(path, epoch: int) -> None:
    ckpt_io.save_checkpoint(path, {"model": {"w": torch.full((1000,), float(epoch))}, "epoch": epoch})


def test_the_previous_checkpoint_is_kept_and_a_cut_one_falls_back_on_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    previous = tmp_path / "checkpoint.prev.pt"
    assert ckpt_io.load_latest(path) == (None, None)  # an empty folder: start from scratch
    save_epoch(path, 1)
    save_epoch(path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert ckpt_io.load_checkpoint(previous)["epoch"] == 1
    assert ckpt_io.load_latest(path)[0]["epoch"] == 2
    save_epoch(path, 3)
    assert ckpt_io.load_checkpoint(previous)["epoch"] == 2  # a rotation, not a second link

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut short, as a full disk or a kill mid-copy leaves it
    warnings = []
    checkpoint, used = ckpt_io.load_latest(path, warn=warnings.append)
    assert checkpoint["epoch"] == 2 and used == str(previous)
    assert str(path) in warnings[0] and str(previous) in warnings[0] and "cannot be read" in warnings[0]

    previous.unlink()
    with pytest.raises(ckpt_io.CheckpointError, match=f"{path} cannot be read.*no previous checkpoint"):
        ckpt_io.load_latest(path)
    with pytest.raises(ckpt_io.CheckpointError, match=f"{path} cannot be read"):
        ckpt_io.load_checkpoint(path)


def test_a_failed_write_leaves_both_checkpoints_and_names_the_path(tmp_path, monkeypatch):
    """ENOSPC in the middle of the write (injected): the temporary file is removed, the last and
    the previous checkpoint are as they were, and the error names the path."""
    import errno

    path = tmp_path / "checkpoint.pt"
    save_epoch(path, 1)
    save_epoch(path, 2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(obj, f):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt_io.CheckpointError, match=f"could not write the checkpoint {path}: "
                       "No space left on device; the previous checkpoint .* is kept"):
        save_epoch(path, 3)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_full_filesystem_leaves_the_last_checkpoint(tmp_path):
    """The same on a real 1 MiB filesystem (tmpfs; needs the right to mount, else skipped)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        path = mount / "checkpoint.pt"
        ckpt_io.save_checkpoint(path, {"model": {"w": torch.zeros(50_000)}, "epoch": 1})  # 200 kB
        with pytest.raises(ckpt_io.CheckpointError, match=f"could not write the checkpoint {path}"):
            ckpt_io.save_checkpoint(path, {"model": {"w": torch.zeros(500_000)}, "epoch": 2})  # 2 MB
        assert sorted(p.name for p in mount.iterdir()) == ["checkpoint.pt"]
        assert ckpt_io.load_checkpoint(path)["epoch"] == 1
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_state_of_an_eight_gpu_node_resumes_on_this_gpu():
    state = ckpt_io.rng_state()
    state["cuda"] = [torch.cuda.get_rng_state(0)] * 8  # as an 8-GPU node saves it
    ckpt_io.set_rng_state(state)
    assert torch.equal(torch.cuda.get_rng_state(0), state["cuda"][0])


def test_a_save_killed_midway_leaves_a_temporary_file_the_next_save_removes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / f"checkpoint.pt.tmp{dead.pid}").write_bytes(b"x" * 1000)
    (tmp_path / f"checkpoint.pt.tmp{os.getpid()}x").write_bytes(b"not ours")  # not a pid: kept
    save_epoch(path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", f"checkpoint.pt.tmp{os.getpid()}x"]

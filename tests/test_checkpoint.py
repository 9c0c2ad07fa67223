"""Checkpoint files: atomic save, refusal of foreign files, and the RNG states of a machine with
another number of GPUs."""

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
    with pytest.raises(ValueError, match="other.pt: not an ffcv-imagenet checkpoint"):
        ckpt_io.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ckpt_io.load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_state_of_an_eight_gpu_node_resumes_on_this_gpu():
    state = ckpt_io.rng_state()
    state["cuda"] = [torch.cuda.get_rng_state(0)] * 8  # as an 8-GPU node saves it
    ckpt_io.set_rng_state(state)
    assert torch.equal(torch.cuda.get_rng_state(0), state["cuda"][0])

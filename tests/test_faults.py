"""Faults a long run meets (issue 34), on the tiny engine data: training.resume=auto goes on with
the same run and refuses another; a worker SIGKILLed from outside under torchrun --max-restarts
is restarted and the run resumes by itself; a loss that stays NaN stops the run with the last
good checkpoint kept. (Checkpoint rotation, fallback and a full disk: test_checkpoint.py.)"""

import gc
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from engine_data import engine_env, records, run_args, shared_betons
from ffcv_imagenet import train
from ffcv_imagenet.checkpoint import load_checkpoint
from ffcv_imagenet.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    yield shared_betons(tmp_path_factory)
    gc.collect()


def test_a_window_of_non_finite_losses_stops_and_one_finite_step_does_not():
    """Every step of a NONFINITE_WINDOW non-finite: stop, naming epoch, steps and lr. One finite
    step in the window (as when fp16's GradScaler skips a few overflowing steps): go on. The same
    read hands the window's per-step losses on (NaN where a step's was)."""
    window = train.NONFINITE_WINDOW
    sums = torch.zeros(train.FIRST_BAD + 1, dtype=torch.float64)
    train._count_loss(sums, torch.tensor(2.0), 4, 1)
    for step in range(2, window + 1):
        train._count_loss(sums, torch.tensor(float("nan")), 4, step)
    points = []
    train._check_window(sums, 1, [0.1] * window, epoch=2, on_losses=points.extend)
    # the mean skips the NaNs; the first non-finite step is kept; the window is zeroed once read
    values = sums.tolist()
    assert values[:4] == [8.0, 4.0, 4.0 * window, window - 1] and values[train.FIRST_BAD] == 2.0
    assert values[train.WINDOW] == [0.0] * (2 * window + 1)
    assert points[0] == (1, 2.0, 0.1) and [n for n, _, _ in points] == list(range(1, window + 1))
    assert all(math.isnan(loss) for _, loss, _ in points[1:])
    for step in range(window + 1, 2 * window + 1):
        train._count_loss(sums, torch.tensor(float("inf")), 4, step)
    with pytest.raises(train.NonFiniteLoss, match=f"epoch 2, steps {window + 1}-{2 * window}, lr 0.1"):
        train._check_window(sums, 1, [0.1] * 2 * window, epoch=2, on_losses=None)


def test_nan_stops_the_run_keeps_the_checkpoint_and_auto_resume_goes_on(betons, tmp_path, capsys):
    folder = tmp_path / "run"
    two_epochs = run_args(*betons, folder, "--training.epochs=2", "--training.deterministic=0")
    # epoch 0, checkpointed, then a stop at the time limit
    assert train.main([*two_epochs, "--training.stop_after_s=0.001"], launched_at=time.time()) == 0
    assert load_checkpoint(folder / "checkpoint.pt")["epoch"] == 1

    # resumed with an lr that sends the loss to NaN: exit 1, a message naming epoch, step and lr,
    # nothing of epoch 1 logged as done, the checkpoint of epoch 0 kept
    capsys.readouterr()
    assert train.main([*two_epochs, "--training.resume=1", "--lr.lr=1e6"], launched_at=time.time()) == 1
    err = capsys.readouterr().err
    assert "ffcv-imagenet train: error: the weights are no longer finite at the end of epoch 1: " in err
    assert re.search(r"the loss was NaN or infinite from step \d+ of the epoch \(lr \d", err), err
    assert f"the last good checkpoint, {folder / 'checkpoint.pt'} (after epoch 1), is kept" in err
    assert [r["epoch"] for r in records(folder, "epoch")] == [0]
    (failed,) = records(folder, "failed")
    assert failed["epoch"] == 1 and failed["lr"] > 1e5 and failed["reason"] == "non-finite loss"
    assert load_checkpoint(folder / "checkpoint.pt")["epoch"] == 1

    # resume=auto (the default) with other settings: refused, naming them
    with pytest.raises(FileExistsError, match=r"holds another run \(settings differ: lr.lr: 0.02 -> 0.03"):
        train.fit(load_config([*two_epochs, "--lr.lr=0.03"]))
    # the run's own command: resumed by itself and finished
    assert train.main(two_epochs, launched_at=time.time()) == 0
    assert [r["epoch"] for r in records(folder, "epoch")] == [0, 1] and len(records(folder, "summary")) == 1
    assert [r["resumed_from_epoch"] for r in records(folder, "start")] == [None, 1, 1]


def test_auto_starts_from_scratch_in_a_folder_without_a_checkpoint_of_another_run(betons, tmp_path):
    """A folder whose run was killed before its first checkpoint: params.json says which run it
    was; the same run starts again from scratch, another is refused."""
    folder = tmp_path / "early"
    folder.mkdir()
    argv = run_args(*betons, folder, "--training.epochs=1", "--training.deterministic=0")
    cfg = load_config(argv)
    saved = {k: v for k, v in cfg.items() if k != "meta"}
    (folder / "params.json").write_text(__import__("json").dumps({**saved, "derived": {}}))
    with pytest.raises(FileExistsError, match="model.arch: 'resnet18' -> 'resnet50'"):
        train.fit(load_config([*argv, "--model.arch=resnet50"]))
    assert train.fit(cfg)["epochs"] == 1
    assert [r["epoch"] for r in records(folder, "epoch")] == [0]


def wait_for_first_checkpoint(folder: Path, procs, timeout_s: float = 180, explain=lambda: "") -> None:
    """Until epoch 0's checkpoint is in `folder`; fails when a process ends first or time runs out."""
    deadline = time.time() + timeout_s
    while not (folder / "checkpoint.pt").exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, explain()
        time.sleep(0.05)


def worker_pids(agent: psutil.Process) -> list:
    return [p.pid for p in agent.children(recursive=True)
            if "ffcv_imagenet.train" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_a_worker_killed_from_outside_is_restarted_and_the_run_resumes(betons, tmp_path):
    """torchrun --max-restarts=2, 2 processes: after epoch 0's checkpoint, one worker is SIGKILLed
    by its pid from outside; torchrun restarts the group, resume=auto continues from the
    checkpoint, and the run ends with every epoch logged once."""
    folder = tmp_path / "elastic"
    argv = run_args(*betons, folder, "--training.epochs=4", "--training.deterministic=0",
                    "--training.global_batch_size=16")
    torchrun = Path(sys.executable).with_name("torchrun")
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node=2", "--max-restarts=2",
                                 "-m", "ffcv_imagenet.train", *argv], env=engine_env(), stdout=out,
                                stderr=err, start_new_session=True)
    try:
        wait_for_first_checkpoint(folder, [proc], explain=lambda: (tmp_path / "err.txt").read_text()[-3000:])
        victim = worker_pids(psutil.Process(proc.pid))[-1]
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert [r["epoch"] for r in records(folder, "epoch")] == [0, 1, 2, 3]
    starts = records(folder, "start")
    assert len(starts) == 2 and starts[0]["resumed_from_epoch"] is None and starts[1]["resumed_from_epoch"] >= 1
    assert len(records(folder, "summary")) == 1
    assert "failed (exitcode: -9) local_rank: " in stderr and f"(pid: {victim})" in stderr  # torchrun saw the kill


def test_resume_from_another_architecture_names_the_file(betons, tmp_path):
    folder = tmp_path / "arch"
    argv = run_args(*betons, folder, "--training.epochs=1", "--training.deterministic=0")
    assert train.main(argv, launched_at=time.time()) == 0
    shutil.copy(folder / "checkpoint.pt", tmp_path / "saved.pt")
    with pytest.raises(Exception, match=f"{folder / 'checkpoint.pt'} does not fit this model "
                       r"\(model.arch=resnet50; the checkpoint's: resnet18\)"):
        train.fit(load_config([*argv, "--model.arch=resnet50", "--training.resume=1"]))


# --------------------------------------------------------------------------- files and folders

def copy_pair(betons, folder: Path) -> tuple:
    folder.mkdir()
    out = []
    for path in betons:
        for name in (path.name, path.name + ".meta.json"):
            shutil.copy(path.parent / name, folder / name)
        out.append(folder / path.name)
    return tuple(out)


def test_a_changed_beton_is_refused_before_training_naming_the_file(betons, tmp_path, capsys):
    train_beton, val_beton = copy_pair(betons, tmp_path / "data")
    data = train_beton.read_bytes()
    train_beton.write_bytes(data[:-1000])  # an interrupted copy
    assert train.main(run_args(train_beton, val_beton, tmp_path / "cut")) == 2
    err = capsys.readouterr().err
    assert (f"ffcv-imagenet train: error: {train_beton} is {len(data) - 1000:,} bytes but was "
            f"written as {len(data):,}") in err
    assert not (tmp_path / "cut").exists()  # nothing left behind by a refused launch
    train_beton.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size, replaced
    assert train.main(run_args(train_beton, val_beton, tmp_path / "replaced")) == 2
    assert f"{train_beton} is not the file its metadata" in capsys.readouterr().err

    from ffcv_imagenet import inspect
    assert inspect.main([str(train_beton)]) == 1
    assert "is not the file its metadata" in capsys.readouterr().out


def test_a_missing_beton_is_one_line_and_the_same_file_twice_warns(betons, tmp_path, capsys):
    train_beton, val_beton = betons
    assert train.main(run_args(tmp_path / "nope.beton", val_beton, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    missing = tmp_path / "nope.beton"
    assert err.strip().splitlines()[-1] == f"ffcv-imagenet train: error: data.train_dataset={missing}: no such file"
    assert not (tmp_path / "run").exists()
    cfg = load_config(run_args(val_beton, val_beton, tmp_path / "same", "--training.epochs=1",
                               "--training.deterministic=0"))
    assert train.fit(cfg)["epochs"] == 1  # it trains, warned
    assert "data.train_dataset and data.val_dataset are the same file" in capsys.readouterr().err


def test_a_second_launch_into_a_running_folder_is_refused_naming_the_pid(betons, tmp_path):
    from ffcv_imagenet.logger import RunLogger

    holder = RunLogger(tmp_path / "busy", enabled=True)
    holder.lock()
    try:
        with pytest.raises(FileExistsError, match=rf"busy is in use by another run \(pid@host {os.getpid()}@"):
            train.fit(load_config(run_args(*betons, tmp_path / "busy")))
    finally:
        holder.unlock()
    assert not (tmp_path / "busy").exists()  # the holder wrote nothing: its empty folder goes


def test_overwrite_keeps_the_old_file_until_the_new_one_replaces_it(betons, tmp_path, monkeypatch):
    """A kill between the metadata and the .beton rename (simulated by an exception) leaves the
    old .beton in place, and its new metadata's fingerprint tells that they differ."""
    from ffcv_imagenet.metadata import check_unchanged, read_metadata
    from ffcv_imagenet.writer import install, write_dataset

    source = betons[1].parent / "val_images"
    target = tmp_path / "val.beton"
    write_dataset(source, target, split="val", max_resolution=32, num_workers=1, progress=False)
    old = target.read_bytes()
    real_replace = os.replace

    def killed_at_the_rename(src, dst):
        if str(dst).endswith(".beton"):
            assert Path(dst).read_bytes() == old  # the old file is still there, whole
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(install.os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(source, target, split="val", max_resolution=24, num_workers=1, progress=False,
                      overwrite=True)
    monkeypatch.setattr(install.os, "replace", real_replace)
    assert target.read_bytes() == old
    assert not list(tmp_path.glob("*.tmp*"))  # no stray temporary metadata
    with pytest.raises(ValueError, match="is not the file its metadata|bytes but was written as"):
        check_unchanged(target, read_metadata(target))


# --------------------------------------------------------------------------- several nodes

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_node(argv, log: Path, *, port: int, max_restarts: int = 0, **env) -> subprocess.Popen:
    """One torchrun agent as one node of two (1 process), c10d rendezvous on 127.0.0.1, in a
    session of its own; its output goes to `log`."""
    torchrun = Path(sys.executable).with_name("torchrun")
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(torchrun), "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
             f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", f"--max-restarts={max_restarts}",
             "-m", "ffcv_imagenet.train", *argv],
            env=engine_env(**env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs, timeout_s: float) -> list:
    deadline = time.time() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return [proc.returncode for proc in procs]


@pytest.mark.slow
def test_two_nodes_draw_every_sample_once_and_train_like_one_node(betons, tmp_path):
    """Two torchrun agents on this machine as two nodes (c10d rendezvous on 127.0.0.1, gloo):
    every train sample drawn once per epoch across the ranks, every val image counted once, one
    log and one checkpoint, and in deterministic mode the weights of one node with 2 processes."""
    from engine_data import VAL_IMAGES, torchrun_2
    from ffcv_imagenet.data import ORDER_LOG_ENV

    argv = ["--training.epochs=2", "--training.global_batch_size=16"]
    nodes_dir, orders = tmp_path / "two_nodes", tmp_path / "orders"
    orders.mkdir()
    port = free_port()
    procs = [launch_node(run_args(*betons, nodes_dir, *argv), tmp_path / f"node{i}.txt", port=port,
                         **{ORDER_LOG_ENV: str(orders)}) for i in range(2)]
    codes = wait_all(procs, 240)
    assert codes == [0, 0], (tmp_path / "node0.txt").read_text()[-3000:] + (tmp_path / "node1.txt").read_text()[-3000:]

    drawn = {}
    for rank in (0, 1):
        for line in (orders / f"order-rank{rank}.jsonl").read_text().splitlines():
            record = __import__("json").loads(line)
            drawn[(rank, record["epoch"])] = record["indices"]
    for epoch in (0, 1):
        both = drawn[(0, epoch)] + drawn[(1, epoch)]
        assert sorted(both) == list(range(80)), epoch  # each of the 80 samples once
    assert drawn[(0, 0)] != drawn[(0, 1)]  # a new order each epoch
    assert [r["val_count"] for r in records(nodes_dir, "epoch")] == [VAL_IMAGES, VAL_IMAGES]
    assert len(records(nodes_dir, "start")) == 1 and len(records(nodes_dir, "summary")) == 1
    assert load_checkpoint(nodes_dir / "checkpoint.pt")["derived"]["world_size"] == 2

    one_node = tmp_path / "one_node"
    out = torchrun_2(run_args(*betons, one_node, *argv))
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = (load_checkpoint(folder / "checkpoint.pt")["model"] for folder in (nodes_dir, one_node))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_lost_node_ends_the_other_with_a_message_and_no_hang(betons, tmp_path):
    """The whole of one node (its agent and its worker) SIGKILLed mid-run: the surviving node ends
    non-zero well within 120 s (no restarts left), naming what it lost; nothing waits for the
    process group's 600 s timeout."""
    folder = tmp_path / "lost"
    port = free_port()
    argv = run_args(*betons, folder, "--training.epochs=6", "--training.global_batch_size=16",
                    "--training.deterministic=0")
    procs = [launch_node(argv, tmp_path / f"node{i}.txt", port=port) for i in range(2)]
    try:
        wait_for_first_checkpoint(folder, procs)
        node = psutil.Process(procs[1].pid)  # node 1, all of it: its agent and its worker (which
        for proc in [*node.children(recursive=True), node]:  # torchrun starts in a session of its own)
            proc.kill()
        started = time.time()
        codes = wait_all(procs[:1], 120)
    finally:
        wait_all(procs, 1)
    assert codes[0] != 0 and time.time() - started < 120
    text = (tmp_path / "node0.txt").read_text()
    # the lost node either ran only a worker (this node's worker names the lost peer) or also the
    # rendezvous store (this node's agent names the store it lost and ends its worker)
    assert ("a peer process is gone" in text and "ffcv_imagenet.train FAILED" in text) \
        or "The connection to the C10d store has failed" in text, text[-3000:]
    assert not records(folder, "summary")


SCONTROL_STUB = """#!/bin/bash
# stub of `scontrol show hostnames LIST`: one local address per node of the job
[ "$1 $2" = "show hostnames" ] || exit 1
for i in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done
"""

SRUN_STUB = """#!/bin/bash
# stub of srun: the command once per node of the job, concurrently, --output's %j and %t filled in
output=""
while [[ "$1" == --* ]]; do case "$1" in --output=*) output="${1#--output=}";; esac; shift; done
pids=()
for ((t = 0; t < SLURM_NNODES; t++)); do
    out=${output//%j/$SLURM_JOB_ID}; out=${out//%t/$t}
    SLURM_NODEID=$t SLURM_PROCID=$t "$@" > "${out:-/dev/stderr}" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


@pytest.mark.slow
def test_the_slurm_script_runs_two_nodes_and_a_resubmission_resumes(betons, tmp_path):
    """scripts/slurm/train.sbatch with stub srun and scontrol: two "nodes" (two local agents)
    meet at the rendezvous on the first node, train, and write one log per node; the same job
    submitted again continues the run (resume=auto)."""
    from engine_data import REPO

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    preset = tmp_path / "preset.yaml"
    preset.write_text("training:\n  epochs: 2\n  global_batch_size: 16\n  deterministic: 0\n")
    folder = tmp_path / "run"
    args = [a for a in run_args(*betons, folder) if not a.startswith(("--logging.folder", "--training.epochs",
                                                                        "--training.deterministic"))]
    env = engine_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
                     SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="2", FFCV_IMAGENET_GPUS_PER_NODE="1",
                     FFCV_IMAGENET_RDZV_PORT=str(free_port()),
                     TORCHRUN=str(Path(sys.executable).with_name("torchrun")))
    script = REPO / "scripts" / "slurm" / "train.sbatch"
    first = subprocess.run(["bash", str(script), str(preset), str(folder), *args,
                            "--training.stop_after_s=0.001"], env=env, capture_output=True, text=True,
                           timeout=300)
    logs = sorted(p.name for p in folder.glob("slurm-*.log"))
    assert first.returncode == 0, first.stderr + "".join(p.read_text()[-2000:] for p in folder.glob("slurm-*.log"))
    assert "job 4242: 2 node(s) x 1 process(es), rendezvous 127.0.0.1:" in first.stdout
    assert logs == ["slurm-4242-0.log", "slurm-4242-1.log"]
    assert [r["epoch"] for r in records(folder, "epoch")] == [0] and records(folder, "stopped")
    env["FFCV_IMAGENET_RDZV_PORT"] = str(free_port())
    second = subprocess.run(["bash", str(script), str(preset), str(folder), *args], env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, "".join(p.read_text()[-2000:] for p in folder.glob("slurm-*.log"))
    assert [r["epoch"] for r in records(folder, "epoch")] == [0, 1] and len(records(folder, "summary")) == 1
    assert [r["resumed_from_epoch"] for r in records(folder, "start")] == [None, 1]
    assert load_checkpoint(folder / "checkpoint.pt")["derived"]["world_size"] == 2


@pytest.mark.slow
def test_sigterm_ends_the_run_with_a_stopped_line_and_the_checkpoint_kept(betons, tmp_path):
    """SIGTERM (a batch system's time limit) ends the run like training.stop_after_s does: a
    message, a `stopped` line naming the signal, exit 143, the last checkpoint kept; `report`
    says so; the same command continues the run."""
    from ffcv_imagenet import report

    folder = tmp_path / "term"
    argv = run_args(*betons, folder, "--training.epochs=8", "--training.deterministic=0")
    proc = subprocess.Popen([sys.executable, "-m", "ffcv_imagenet.train", *argv], env=engine_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_checkpoint(folder, [proc], timeout_s=120)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "ffcv-imagenet train: stopped by SIGTERM during epoch" in err
    (stopped,) = records(folder, "stopped")
    assert stopped["reason"] == "SIGTERM" and load_checkpoint(folder / "checkpoint.pt")["epoch"] >= 1
    (run,) = report.find_runs([str(folder)])
    assert any("stopped by SIGTERM" in p for p in run.problems), run.problems


@pytest.mark.slow
def test_two_processes_train_like_one_accumulating_two_micro_batches(tmp_path):
    """"Same result on 1 or 8 GPUs", shown: 2 processes (DDP) with a micro-batch of 4 each against
    one process accumulating 2 micro-batches of 4, the same 3 steps. Without BatchNorm the weights
    are equal. With BatchNorm every micro-batch is normalised by its own statistics either way, so
    the learned weights are equal too; the running statistics differ: one process
    updates them once per micro-batch (twice a step), under DDP each process once per step from
    its own micro-batch and rank 0's are broadcast at the next forward."""
    from engine_data import REPO

    script = REPO / "tests" / "accumulation_vs_processes.py"
    (tmp_path / "ddp").mkdir()
    (tmp_path / "accum").mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script),
                          str(tmp_path / "ddp"), "2"], env=engine_env(), capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "accum"), "2"], env=engine_env(),
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("no_bn", "resnet18"):
        ddp, accum = (torch.load(tmp_path / d / f"{name}.pt") for d in ("ddp", "accum"))
        for key in ddp:
            if "running_" in key or "num_batches" in key:
                continue
            assert torch.equal(ddp[key], accum[key]), (name, key)  # bitwise, on this CPU
    ddp, accum = (torch.load(tmp_path / d / "resnet18.pt") for d in ("ddp", "accum"))
    assert ddp["bn1.num_batches_tracked"] == 3 and accum["bn1.num_batches_tracked"] == 6
    assert not torch.allclose(ddp["bn1.running_mean"], accum["bn1.running_mean"])


def tcp_connections(pid: int) -> list:
    process = psutil.Process(pid)
    return getattr(process, "net_connections", process.connections)(kind="tcp")  # psutil < 6: connections


@pytest.mark.slow
def test_an_agent_killed_alone_ends_its_worker_and_the_other_node_names_the_lost_peer(betons, tmp_path):
    """Only node 1's torchrun agent SIGKILLed: its worker notices (its parent is gone) and ends;
    node 0's worker then fails at its next collective naming the lost peer, and node 0 ends
    non-zero within 60 s instead of training on with a node that cannot recover."""
    folder = tmp_path / "agent"
    port = free_port()
    argv = run_args(*betons, folder, "--training.epochs=30", "--training.global_batch_size=16",
                    "--training.deterministic=0")
    procs = [launch_node(argv, tmp_path / f"node{i}.txt", port=port) for i in range(2)]
    try:
        wait_for_first_checkpoint(folder, procs)
        # the agent only, of the node that does not host the rendezvous store (whose loss ends
        # the other agent at once, a case test_a_lost_node_... covers)
        host = next(i for i, p in enumerate(procs) if any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in tcp_connections(p.pid)))
        lost, survivor = procs[1 - host], procs[host]
        os.kill(lost.pid, signal.SIGKILL)
        started = time.time()
        codes = wait_all([survivor], 60)
    finally:
        for proc in procs:  # the orphaned worker too, should the test fail
            for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
                child.kill()
        wait_all(procs, 1)
    assert codes[0] != 0 and time.time() - started < 60
    assert "its torchrun agent (pid" in (tmp_path / f"node{1 - host}.txt").read_text()
    text = (tmp_path / f"node{host}.txt").read_text()
    assert "a peer process is gone" in text and "ffcv_imagenet.train FAILED" in text, text[-3000:]
    assert not records(folder, "summary")


def test_a_file_with_images_too_small_is_refused_before_a_batch_instead_of_aborting(tmp_path, capsys,
                                                                                    monkeypatch):
    """A .beton an older writer made with a 1x1 image: training used to abort inside OpenCV at the
    first batch holding it, naming nothing; the loaders now refuse the file first, naming it."""
    import writer_data as data
    from ffcv_imagenet.writer import encode, write_dataset

    root = tmp_path / "images"
    for k in range(10):
        folder = root / f"n0{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (1, 1) if k == 3 else (32, 32)
        (folder / f"i{k}.JPEG").write_bytes(data.jpeg_bytes(data.gradient(*size, k)))
    monkeypatch.setattr(encode, "MIN_SIDE", 1)  # as the writer did before it refused them
    beton = tmp_path / "old.beton"
    write_dataset(root, beton, split="train", max_resolution=32, num_workers=1, progress=False)
    monkeypatch.undo()
    assert train.main(run_args(beton, beton, tmp_path / "run", "--training.epochs=1")) == 2
    err = capsys.readouterr().err
    assert f"ffcv-imagenet train: error: {beton}: 1 images have a side below 2 px, e.g. sample" in err

"""`ffcv-imagenet scale` at a small N: every row holds what results/scale's table reads, the README
section renders from it, and the memory cgroup it limits a loader with does limit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ffcv_imagenet import scale

FIELDS = ("layout", "samples", "index_s", "write_img_s", "parent_rss_mb", "worker_rss_mb", "bytes",
          "loader_startup_s", "epoch_overhead_s", "order")


@pytest.mark.slow
def test_scale_rows_growth_and_readme_table(tmp_path, capsys):
    out = tmp_path / "scale.json"
    code = scale.main(["--scale.samples=300,600", "--scale.classes=10", "--scale.val_samples=120",
                       "--scale.layouts=folder,val_tar", "--scale.pool=6", "--scale.pool_px=32",
                       "--scale.batch_size=16", f"--scale.workdir={tmp_path / 'work'}", f"--scale.json={out}"])
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["layout"], r["samples"], r["order"]) for r in rows} == {
        *((("folder", n, order) for n in (300, 600) for order in ("random", "quasi_random"))),
        ("val_tar", 120, "sequential")}
    for r in rows:
        assert all(r[f] is not None for f in FIELDS), r
        assert r["written"] == r["samples"] and r["bytes"] > 0 and r["index_s"] > 0
        assert r["parent_rss_mb"] >= r["parent_rss_before_mb"] > 0 and r["loader_startup_s"] > 0
    assert set(result["growth"]) == {"folder/random", "folder/quasi_random"}
    assert result["growth"]["folder/random"]["from"] == 300 and result["growth"]["folder/random"]["to"] == 600
    assert not (tmp_path / "work" / "folder-300").exists()  # sources and files removed as it goes

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- report:scale start -->\n<!-- report:scale end -->\ntail\n")
    assert scale.main([f"--scale.render={out}", f"--scale.readme={readme}"]) == 0
    text = readme.read_text()
    assert "| folder | 0.3 k / 0.6 k |" in text and "| val_tar | 0.12 k |" in text and text.endswith("tail\n")
    growth = result["growth"]["folder/random"]
    assert f"folder: index time per sample {growth['index_s']}x, parent RSS" in text
    assert growth["parent_rss_added"] is None  # two sizes: no lower and upper interval to compare


def test_memory_cgroup_limits_a_process(tmp_path):
    """A process in the cgroup that touches more than the limit is killed; under it, it runs."""
    limit = 200 * 2**20
    try:
        with scale.memory_cgroup(limit) as procs:
            touch = "import sys; b = bytearray(b'\\x01') * (int(sys.argv[1]) * 2**20); print(len(b))"
            small = subprocess.run([sys.executable, "-c", touch, "50"], capture_output=True,
                                   preexec_fn=lambda: scale._join(procs))
            large = subprocess.run([sys.executable, "-c", touch, "400"], capture_output=True,
                                   preexec_fn=lambda: scale._join(procs))
    except SystemExit as e:
        pytest.skip(str(e))
    assert small.returncode == 0
    assert large.returncode == -9  # the cgroup's out-of-memory killer


def test_evicting_a_file_from_the_page_cache(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 2**20)
    scale.read_through(path)
    scale.evict_from_page_cache(path)  # must not raise, and the file stays whole
    assert path.read_bytes() == b"x" * 2**20
    assert Path(path).stat().st_size == 2**20

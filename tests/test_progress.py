"""Progress on long work: a bar on a terminal, plain lines in a log file, nothing when off."""

import io

from ffcv_imagenet import progress as progress_module
from ffcv_imagenet.progress import LineProgress, progress


def test_a_log_gets_a_line_per_interval_and_one_at_the_end():
    out = io.StringIO()
    bar = LineProgress(total=10, desc="writing", unit=" img", every_s=3600, file=out)
    for _ in range(10):
        bar.update(1)
    assert out.getvalue() == ""  # no line before the interval
    bar.set_postfix(loss="1.234")
    bar.close()
    bar.close()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("writing: done 10/10 img (") and line.endswith(", loss=1.234)")

    out = io.StringIO()
    with LineProgress(desc="indexing", unit="members", every_s=0, file=out) as bar:
        bar.update(2)
        bar.update(3)
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["indexing: at 2 members", "indexing: at 5 members",
                                                       "indexing: done 5 members"]
    assert "\r" not in out.getvalue()


def test_the_kind_follows_the_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress(5, "val"), LineProgress)
    silent = progress(5, "val", enabled=False)
    silent.update(5)
    silent.close()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: True, raising=False)
    from tqdm import tqdm

    bar = progress(5, "val")
    assert isinstance(bar, tqdm)
    bar.close()

"""Progress on long work: a tqdm bar on a terminal; in a log file (stderr not a terminal) a plain
line every `every_s` seconds and one at the end, instead of a bar redrawn in place, which a log
keeps as thousands of carriage-return fragments. Both offer tqdm's update / set_postfix / close
and work as context managers."""

import sys
import time

LOG_EVERY_S = 30.0


class LineProgress:
    """tqdm's interface for a log file: `desc: n/total unit (rate unit/s) postfix` lines."""

    def __init__(self, total=None, desc="", unit="it", every_s=LOG_EVERY_S, file=None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit.strip(), every_s
        self.file = file or sys.stderr
        self.n, self.postfix = 0, ""
        self.started = self.last = time.monotonic()

    def update(self, n=1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.n:
            self._line(time.monotonic(), done=True)
        self.n = 0  # a second close prints nothing

    def _line(self, now: float, done: bool = False) -> None:
        of = f"/{self.total}" if self.total else ""
        rate = self.n / max(now - self.started, 1e-9)
        extra = f", {self.postfix}" if self.postfix else ""
        state = "done" if done else "at"
        print(f"{self.desc}: {state} {self.n}{of} {self.unit} ({rate:.1f} {self.unit}/s{extra})",
              file=self.file, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Silent:
    def update(self, n=1):
        pass

    def set_postfix(self, **values):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def progress(total=None, desc="", unit="it", enabled=True, leave=False):
    """A bar on a terminal, lines in a log, nothing when not `enabled`."""
    if not enabled:
        return _Silent()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return LineProgress(total, desc, unit)

"""
How far long work is: what is done, the rate and the time left, written where it will be read.

    p = Progress("prepare", total=n_bytes)       # total=None: counts and rate, no time left
    p.update(done, "12,345 documents, 4.5M tokens")
    p.close()

On a terminal (stdout is a TTY) one line is rewritten in place at most every 0.5 s and ended by
close(). Anywhere else (a log file, a pipe, CI, torchrun's output) a plain line at most every
NANOREPO_PROGRESS_S seconds (default 30), the first only after that long: a short job prints
nothing extra, a long one a line every half minute. Under torchrun only rank 0 reports.

eta(elapsed, done, total) is the time left at the rate so far, as h:mm:ss, for log lines that
carry their own progress (train.py's, eval.py's, the experiment drivers').
"""
import os
import shutil
import sys
import time


def clock(seconds) -> str:
    s = int(max(0, seconds) + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def eta(elapsed, done, total) -> str:
    """The time left for total units after `done` took `elapsed` seconds ('?' before the first)."""
    if done <= 0 or total is None:
        return "?"
    return clock(elapsed / done * max(0, total - done))


class Progress:
    def __init__(self, what, total=None, unit="", every=None, stream=None):
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = 0.5 if self.tty else float(every or os.environ.get("NANOREPO_PROGRESS_S", 30))
        self.quiet = int(os.environ.get("RANK", 0)) != 0  # torchrun: rank 0 speaks for all
        self.t0 = self.last = time.time()
        self.open = False  # a terminal line waiting for its end

    def line(self, done, detail="") -> str:
        elapsed = time.time() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        head = f"{self.what}: " + (f"{100 * done / self.total:5.1f}% " if self.total else "")
        left = f", {eta(elapsed, done, self.total)} left" if self.total else ""
        return f"{head}{detail}{', ' if detail else ''}{_si(rate)}{self.unit}/s, {clock(elapsed)} elapsed{left}"

    def update(self, done, detail=""):
        now = time.time()
        if self.quiet or now - self.last < self.every:
            return
        self.last = now
        text = self.line(done, detail)
        if self.tty:
            self.stream.write("\r" + text[:max(20, _width() - 1)].ljust(_width() - 1))
            self.open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        """End the terminal line, so what is printed next starts on its own."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


def _si(x) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.1f}"


def _width() -> int:
    return shutil.get_terminal_size((100, 24)).columns  # $COLUMNS, the terminal's, or 100

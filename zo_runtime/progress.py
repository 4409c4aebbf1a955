"""A small progress line for long work: stage, step, loss (moving average), it/s, ETA."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, stage: str, total: int, start: int = 0, stream=None, every: float = 0.5):
        self.stage, self.total, self.start = stage, total, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.time()
        self.every = every if self.tty else 10.0
        self.last = 0.0
        self.avg = None
        self.step = start

    def update(self, step: int, loss: float | None = None) -> None:
        self.step = step
        if loss is not None:
            self.avg = loss if self.avg is None else 0.95 * self.avg + 0.05 * loss
        now = time.time()
        if now - self.last < self.every and step < self.total:
            return
        self.last = now
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        parts = [f"{self.stage}", f"step {step}/{self.total}"]
        if self.avg is not None:
            parts.append(f"loss {self.avg:.4f}")
        parts += [f"{rate:.2f} it/s", f"ETA {_fmt(eta)}"]
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r" + line.ljust(79))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

"""Progress and ETA for long work: training steps, evaluation images, the sweep as a whole.

On a terminal this is a tqdm bar on stderr. In logs and CI (stderr is not a TTY) carriage-return
bars turn into walls of text, so the same progress is printed as one plain line at most every
``PLAIN_EVERY_SECONDS`` (and at the end). ``SDSWEEP_PROGRESS=bar|plain|off`` forces a style.

Nothing here knows about training, W&B or Optuna: callers pass counts and a few numbers to show.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

PLAIN_EVERY_SECONDS = 30.0
_STYLES = ("bar", "plain", "off")


def style(stream: TextIO | None = None) -> str:
    """``bar`` on a terminal, ``plain`` otherwise; ``SDSWEEP_PROGRESS`` overrides."""
    forced = os.environ.get("SDSWEEP_PROGRESS", "").strip().lower()
    if forced in _STYLES:
        return forced
    stream = stream or sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "plain"


def format_seconds(seconds: float | None) -> str:
    """``1h02m``, ``4m05s``, ``12s``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts ``done`` out of ``total`` with a rate and an ETA, shown as a bar or as plain lines.

    ``update(done, **shown)`` sets the absolute count (not an increment), so a caller that is
    only told every N steps, or resumes from a checkpoint, stays exact.
    """

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str = "it",
        *,
        initial: int = 0,
        stream: TextIO | None = None,
        plain_every: float = PLAIN_EVERY_SECONDS,
        lines_only: bool = False,
        time_from_first_update: bool = False,
        leave: bool = True,
    ):
        self.desc, self.total, self.unit = desc, max(0, int(total)), unit
        self.stream = stream or sys.stderr
        self.style = style(self.stream)
        if lines_only and self.style == "bar":
            # Coarse progress (the sweep: one update per training run) reads best as a log line,
            # and a second bar would fight with the training bar below it.
            self.style, plain_every = "plain", 0.0
        self.plain_every = plain_every
        self.done = self.start = int(initial)
        self.started = time.monotonic()
        self.last_print = self.started
        # The rate counts from the first update: model loading and resumed steps are no speed.
        self.time_from_first_update = time_from_first_update
        self._base: tuple[float, int] | None = None
        self.shown: dict[str, Any] = {}
        self.bar = None
        if self.style == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=self.done,
                desc=desc,
                unit=unit,
                file=self.stream,
                leave=leave,
                dynamic_ncols=True,
            )

    @property
    def rate(self) -> float | None:
        """Units per second since the first update (or since the start, with ``initial``/no update)."""
        since, base = self._base or (self.started, self.start)
        elapsed = time.monotonic() - since
        worked = self.done - base
        return worked / elapsed if elapsed > 0 and worked > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate else None

    def line(self) -> str:
        """``train t003: 40/100 steps (40%) 3.1 steps/s ETA 19s loss=0.123``"""
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = f" {self.rate:.3g} {self.unit}/s" if self.rate else ""
        extra = "".join(f" {k}={_short(v)}" for k, v in self.shown.items())
        eta = f" ETA {format_seconds(self.eta_seconds)}" if self.done < self.total else ""
        elapsed = f" in {format_seconds(time.monotonic() - self.started)}" if self.done >= self.total else ""
        return f"{self.desc}: {self.done}/{self.total} {self.unit}{percent}{rate}{eta}{elapsed}{extra}"

    def update(self, done: int, **shown: Any) -> None:
        if self._base is None and self.time_from_first_update:
            self._base = (time.monotonic(), int(done))  # time the steps, not the loading before them
        self.done = min(int(done), self.total) if self.total else int(done)
        self.shown.update(shown)
        if self.bar is not None:
            self.bar.n = self.done
            if shown:
                self.bar.set_postfix({k: _short(v) for k, v in self.shown.items()}, refresh=False)
            self.bar.refresh()
        elif self.style == "plain":
            now = time.monotonic()
            if now - self.last_print >= self.plain_every:
                self.last_print = now
                self._print()

    def advance(self, count: int = 1, **shown: Any) -> None:
        self.update(self.done + count, **shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.style == "plain" and self.done > self.start:
            self._print()
        self.style = "off"  # closing twice prints once

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def quiet_library_bars() -> None:
    """Weight loading and hub bars from diffusers/transformers/huggingface_hub: off (our bars are enough)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            logging_module = __import__(module, fromlist=["disable_progress_bar"])
            logging_module.disable_progress_bar()
        except Exception:  # a library missing or changed: its bars are cosmetic
            pass

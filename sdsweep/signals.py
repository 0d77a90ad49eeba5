"""Ctrl-C and SIGTERM: stop the current run promptly and hand it back, never fail it for good.

A signal handler runs in the main thread between two bytecodes, so raising from it stops training
mid-step without the training loop knowing about signals. Writes that must not be cut in half (a
trial's record, an Optuna tell, a checkpoint) run inside ``critical()``: a signal that arrives there
is raised when the block ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class HandBack(BaseException):
    """Raised in the main thread on SIGINT/SIGTERM. A BaseException, so ``except Exception`` in a
    trial does not turn a stop request into a failed trial."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + self.signum)


_state = {"received": None, "critical": 0}


def _handler(signum, frame) -> None:
    if _state["received"] is None:
        _state["received"] = signum
    if _state["critical"] == 0:
        raise HandBack(signum)


def install() -> dict:
    """Turn SIGINT and SIGTERM into ``HandBack`` in this process (main thread only).

    Returns the previous handlers, for ``restore`` (a sweep run from Python leaves them as found)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _state["received"] = None
    return {signum: signal.signal(signum, _handler) for signum in EXIT_CODES}


def ignore_stops() -> dict:
    """While a stopping process exits: SIGINT/SIGTERM do nothing more. Returns {} (nothing to restore:
    the process is on its way out)."""
    if threading.current_thread() is threading.main_thread():
        for signum in EXIT_CODES:
            signal.signal(signum, signal.SIG_IGN)
    return {}


def restore(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def received() -> int | None:
    return _state["received"]


@contextlib.contextmanager
def critical() -> Iterator[None]:
    _state["critical"] += 1
    try:
        yield
    finally:
        _state["critical"] -= 1
    if _state["critical"] == 0 and _state["received"] is not None:
        raise HandBack(_state["received"])


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: deliver ``sig`` to this process when its parent dies (even by SIGKILL). For preexec_fn."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass  # not Linux: watch_parent() is the fallback


def watch_parent(interval: float = 1.0, driver_pid: int | None = None) -> None:
    """Fallback for PR_SET_PDEATHSIG: when the parent is gone (re-parented), SIGTERM ourselves. A worker
    forked from the pool's fork server also watches the driver itself (``driver_pid``): the fork server
    only notices the driver's death after its own teardown, seconds later."""
    parent = os.getppid()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def watch() -> None:
        import time

        while True:
            time.sleep(interval)
            if os.getppid() != parent or (driver_pid is not None and gone(driver_pid)):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="sdsweep-parent-watch", daemon=True).start()

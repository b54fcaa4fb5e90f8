"""Whether this process was resumed (SIGCONT) since the last look: a timed call that spans a resume was stopped for part
of its wall time, and is timed again (`timing.timed_call`).

A job's worker is stopped for 100 ms to 2 s at a time while serving is busy (the job yield,
server/management/throttle.py), and a variant's latency measured across those stops was the yield's, not the variant's.
The worker calls `count_resumes()` first thing, before any thread exists: SIGCONT is then blocked in every thread (each
inherits the mask), so a SIGCONT stays pending on the process until `resumed()` takes it, a syscall on the timing
thread itself. Blocking SIGCONT does not keep the process stopped: the kernel continues it when the signal is sent.
What did not do: a Python handler (the kernel hands a process's signal to any of its threads, and CPython 3.11 runs the
handler only once one lands on the main thread: with numpy's threads asleep beside it, 1 resume in 3 was seen), and a
sigwait thread (it needs the GIL to count, and the timed call can end first). Standard library only: the worker calls
it before numpy is imported.
"""

from __future__ import annotations

import signal

_blocked = False


def count_resumes() -> bool:
    """Keeps this process's SIGCONTs pending for `resumed()`; call it before any thread starts. False where it cannot."""
    global _blocked
    if not _blocked and hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigtimedwait"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCONT})
        _blocked = True
    return _blocked


def resumed() -> bool:
    """Whether the process was resumed since the last call (always False without `count_resumes`); takes the signal."""
    if not _blocked or signal.SIGCONT not in signal.sigpending():
        return False
    signal.sigtimedwait({signal.SIGCONT}, 0)
    return True

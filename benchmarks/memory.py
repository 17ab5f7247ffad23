"""Peak memory beside every benchmark figure: the one place that measures it.

Three honest ways, each named in what it returns (`how`) so no figure hides which it is:

- `process_peak()`: the peak resident set size of this whole process (getrusage ru_maxrss).
  Use it when the case ran in a fresh process that did nothing else: it includes the
  interpreter and the imports (about 20-40 MiB of any Python process here).
- `Peak()`: a case that shares its process with others. On Linux it resets the process's
  high-water mark (`/proc/self/clear_refs` = 5) when the case begins and reads it (VmHWM)
  when it ends, so the peak is the case's own; it also gives the RSS at the start and the
  peak above it. Without that reset (another OS) it says so and reports the process's peak
  so far, which may come from an earlier case.
- `wait_child(proc)`: the peak of a child process (a server, a CLI call), from the rusage
  the kernel hands back when it is reaped (os.wait4); the child's own children not counted.

All in MiB (2**20 bytes).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from typing import Any

_KIB = 1024.0


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float:
    """The resident set size of this process now (VmRSS; ru_maxrss where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / _KIB


def process_peak() -> dict[str, Any]:
    """This process's peak RSS over its whole life (ru_maxrss: KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        peak //= 1024
    return {"peak_rss_mib": round(peak / _KIB, 1), "memory_how": "ru_maxrss of a fresh process"}


def reset_peak() -> bool:
    """Reset this process's high-water mark to its current RSS (Linux 4.0+); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class Peak:
    """The peak RSS of one case inside a shared process:

        with Peak() as mem:
            ... the case ...
        result.update(mem.result())
    """

    def __init__(self) -> None:
        self.start_mib = 0.0
        self.reset = False
        self.peak_mib = 0.0

    def __enter__(self) -> Peak:
        self.reset = reset_peak()
        self.start_mib = rss_mib()
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_kib("VmHWM") if self.reset else None
        if hwm is not None:
            self.peak_mib = hwm / _KIB
        else:
            self.peak_mib = process_peak()["peak_rss_mib"]

    def result(self) -> dict[str, Any]:
        how = ("VmHWM of this process, reset when the case began" if self.reset else
               "ru_maxrss of the process so far (no reset here: may include earlier cases)")
        return {"peak_rss_mib": round(self.peak_mib, 1),
                "rss_at_start_mib": round(self.start_mib, 1),
                "peak_above_start_mib": round(self.peak_mib - self.start_mib, 1),
                "memory_how": how}


def wait_child(proc: subprocess.Popen[Any], timeout: float | None = None) -> dict[str, Any]:
    """Reap `proc` and return its peak RSS (the kernel's rusage for that child alone).

    For pipes, read them before calling this (or use `run_child`). `timeout` polls; the
    child is killed when it runs out.
    """
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
        if pid:
            break
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            deadline = None
        time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"peak_rss_mib": round(usage.ru_maxrss / _KIB, 1),
            "memory_how": "ru_maxrss of the child process (os.wait4)"}


def run_child(argv: list[str], **kwargs: Any) -> tuple[subprocess.CompletedProcess[str],
                                                       dict[str, Any]]:
    """subprocess.run with text output captured, plus the child's peak RSS."""
    import threading

    proc = subprocess.Popen(argv, stdout=kwargs.pop("stdout", subprocess.PIPE),
                            stderr=kwargs.pop("stderr", subprocess.PIPE), text=True, **kwargs)
    texts: dict[str, str] = {}

    def drain(name: str, pipe: Any) -> None:  # communicate() would reap the child first
        texts[name] = pipe.read()
        pipe.close()

    readers = [threading.Thread(target=drain, args=(name, pipe)) for name, pipe in
               (("out", proc.stdout), ("err", proc.stderr)) if pipe is not None]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    memory = wait_child(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, texts.get("out", ""),
                                       texts.get("err", "")), memory


def line(memory: dict[str, Any]) -> str:
    """One line for a report: the peak and how it was measured."""
    text = f"peak RSS {memory['peak_rss_mib']:.1f} MiB"
    if "peak_above_start_mib" in memory:
        text += f" ({memory['peak_above_start_mib']:+.1f} over {memory['rss_at_start_mib']:.1f})"
    return f"{text} [{memory['memory_how']}]"

"""Peak memory beside every benchmark figure: the one place that measures it.

Each way says which it is in what it returns (`memory_how`), and the README repeats it:

- `process_peak()`: the peak resident set size of this whole process, VmHWM from
  /proc/self/status. Use it in a case that runs in a fresh process: it includes the
  interpreter and the imports. Not getrusage's ru_maxrss: on Linux a process started by
  fork (or vfork) and exec inherits the high-water mark of the process that started it, so
  a small case started by a large driver would report the driver's peak. VmHWM belongs to
  the process's own address space, made new by exec. (ru_maxrss where /proc is missing.)
- `Peak()`: a case that shares its process with others. It resets the process's high-water
  mark (`/proc/self/clear_refs` = 5, Linux 4.0+) when the case begins and reads VmHWM when
  it ends, so the peak is the case's own; it also gives the RSS at the start and the peak
  above it. Without the reset it says so and reports the process's peak so far.
- `peak_of(pid)`: VmHWM of a child that is still alive (a server about to be stopped, a
  process about to be SIGKILLed), read from /proc/<pid>/status.
- `command_peak(argv)`: a command that exits by itself (a CLI call), run once under GNU
  time (`/usr/bin/time -f %M`): time is a small C program, so the ru_maxrss it reports for
  its child carries no large parent's mark. None when /usr/bin/time is missing.

All in MiB (2**20 bytes).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_KIB = 1024.0
FRESH = "VmHWM of the case's fresh process"


def _status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib(pid: int | str = "self") -> float:
    """The resident set size of this process (or of a live child, by pid) now (VmRSS;
    this process's ru_maxrss where /proc is missing)."""
    kib = _status_kib("VmRSS", pid)
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / _KIB


def process_peak() -> dict[str, Any]:
    """This process's peak RSS over its life since exec (VmHWM)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return {"peak_rss_mib": round(kib / _KIB, 1), "memory_how": FRESH}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        peak //= 1024
    return {"peak_rss_mib": round(peak / _KIB, 1),
            "memory_how": "ru_maxrss of the case's process (may include its parent's mark)"}


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
        self.peak_mib = process_peak()["peak_rss_mib"]

    def result(self) -> dict[str, Any]:
        how = ("VmHWM of this process, reset when the case began" if self.reset else
               "the process's peak so far (no reset here: may include earlier cases)")
        return {"peak_rss_mib": round(self.peak_mib, 1),
                "rss_at_start_mib": round(self.start_mib, 1),
                "peak_above_start_mib": round(self.peak_mib - self.start_mib, 1),
                "memory_how": how}


def peak_of(pid: int) -> dict[str, Any]:
    """VmHWM of a live process (read it just before stopping the process)."""
    kib = _status_kib("VmHWM", pid)
    return {"peak_rss_mib": None if kib is None else round(kib / _KIB, 1),
            "memory_how": "VmHWM of the child process, read just before it was stopped"}


def command_peak(argv: list[str], **kwargs: Any) -> dict[str, Any]:
    """Peak RSS of one run of a command that exits by itself, under GNU time."""
    time_bin = Path("/usr/bin/time")
    if not time_bin.exists():
        return {"peak_rss_mib": None, "memory_how": "not measured: /usr/bin/time missing"}
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
        subprocess.run([str(time_bin), "-f", "%M", "-o", out.name, *argv], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        kib = int(Path(out.name).read_text().split()[-1])
    return {"peak_rss_mib": round(kib / _KIB, 1),
            "memory_how": "ru_maxrss of the command under /usr/bin/time"}


def line(memory: dict[str, Any]) -> str:
    """One line for a report: the peak and how it was measured."""
    if memory.get("peak_rss_mib") is None:
        return f"peak RSS not measured [{memory['memory_how']}]"
    text = f"peak RSS {memory['peak_rss_mib']:.1f} MiB"
    if "peak_above_start_mib" in memory:
        text += f" ({memory['peak_above_start_mib']:+.1f} over {memory['rss_at_start_mib']:.1f})"
    return f"{text} [{memory['memory_how']}]"

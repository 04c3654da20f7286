"""Benchmark of the dev stack: warm start time until every component is healthy, and resident memory.

Run with `make bench-devstack` (uses the dev install in .state; stops it first if it is running).
Prints the figures that docs/performance.md records.
"""

import argparse
import subprocess
import sys
import time

import psutil

from bastion.devstack.stack import Stack
from bastion.settings import DevstackSettings

MB = 1024 * 1024


def bastion(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "bastion.cli", *args], check=True, capture_output=True)


def memory(stack: Stack) -> dict[str, tuple[float, float]]:
    """RSS and PSS (MB) of each component's whole process tree. PSS splits shared pages fairly."""
    figures = {}
    for kind in stack.kinds:
        pid = stack.supervisor.pid(kind.name)
        if pid is None:
            raise SystemExit(f"{kind.name} is not running")
        leader = psutil.Process(pid)
        tree = [leader, *leader.children(recursive=True)]
        rss = sum(p.memory_info().rss for p in tree) / MB
        pss = sum(p.memory_full_info().pss for p in tree) / MB
        figures[kind.name] = (rss, pss)
    return figures


def main() -> None:
    # No options, but `--help` says what the run does instead of doing it (it stops and restarts the dev stack).
    argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None,
                            epilog="stops the dev install if it is running, then times `bastion up`").parse_args()
    stack = Stack(DevstackSettings(), progress=lambda message: None)
    bastion("setup")
    bastion("down")
    started = time.monotonic()
    bastion("up")
    warm = time.monotonic() - started
    print(f"warm `bastion up` until every component is healthy: {warm:.1f} s")
    time.sleep(10)  # let the JVMs finish start-up work before reading memory
    figures = memory(stack)
    print(f"{'component':<12}{'RSS MB':>10}{'PSS MB':>10}")
    for name, (rss, pss) in figures.items():
        print(f"{name:<12}{rss:>10.0f}{pss:>10.0f}")
    total_rss = sum(rss for rss, _ in figures.values())
    total_pss = sum(pss for _, pss in figures.values())
    print(f"{'total':<12}{total_rss:>10.0f}{total_pss:>10.0f}")


if __name__ == "__main__":
    main()

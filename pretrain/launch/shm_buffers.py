"""DeepSpeed's CPU all-reduce buffers in /dev/shm: released when a run ends, swept when stale.

On CPU (`DS_ACCELERATOR=cpu`) DeepSpeed's shared-memory comm op creates one ~69 MB file per rank,
`/dev/shm/deepspeed_allreduce_buffer_{uid}_{master addr}_{master port}_{rank}`, and never
removes it: every launch leaks world_size of them, and a test suite or a sweep of short runs
fills the machine's memory. Each rank unlinks its own file at exit (the other ranks mapped it
when the op started, so their mappings stay valid); `sweep_unmapped` removes files that no live
process maps any more (runs that were killed), which the test suite does after every test.
"""
from __future__ import annotations

import atexit
import glob
import os

SHM_DIR = "/dev/shm"
PREFIX = "deepspeed_allreduce_buffer_"


def own_buffer_path(rank: int) -> str:
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"{PREFIX}{os.getuid()}_{addr}_{port}_{rank}")


def release_at_exit(rank: int) -> None:
    """Unlink this rank's buffer when the process exits (normally or through an exception)."""
    path = own_buffer_path(rank)

    def _release() -> None:
        try:
            os.unlink(path)
        except OSError:
            pass
    atexit.register(_release)


def _mapped_buffers() -> set[str]:
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                for line in f:
                    if PREFIX in line:
                        mapped.add(line.split()[-1])
        except OSError:  # the process ended while we looked
            continue
    return mapped


def sweep_unmapped() -> int:
    """Remove the buffers no live process maps (left by killed runs); returns how many."""
    files = glob.glob(os.path.join(SHM_DIR, PREFIX + "*"))
    if not files:
        return 0
    mapped = _mapped_buffers()
    n = 0
    for f in files:
        if f not in mapped:
            try:
                os.unlink(f)
                n += 1
            except OSError:
                pass
    return n

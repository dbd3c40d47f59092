"""DeepSpeed's CPU all-reduce buffers in /dev/shm are released: a finished 2-rank run leaves none
of its own behind, and a stale one (no process maps it) is swept while a mapped one is kept."""
import mmap
import os

from pretrain.launch.shm_buffers import PREFIX, SHM_DIR, sweep_unmapped


def test_sweep_removes_only_unmapped_buffers():
    stale = os.path.join(SHM_DIR, f"{PREFIX}test_stale_{os.getpid()}_0")
    live = os.path.join(SHM_DIR, f"{PREFIX}test_live_{os.getpid()}_0")
    for p in (stale, live):
        with open(p, "wb") as f:
            f.write(b"\0" * 4096)
    with open(live, "r+b") as f:
        m = mmap.mmap(f.fileno(), 4096)  # this process maps it: in use
        try:
            sweep_unmapped()
            assert not os.path.exists(stale) and os.path.exists(live)
        finally:
            m.close()
    sweep_unmapped()
    assert not os.path.exists(live)

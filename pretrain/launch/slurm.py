"""Rank, world size and rendezvous of a task started by `srun` (one task per GPU).

`srun` sets SLURM_PROCID (global rank), SLURM_LOCALID (rank on its node), SLURM_STEP_NUM_TASKS
(tasks in this job step) and SLURM_STEP_NODELIST (its hosts, compressed: `gpu[01-04,07]`). The
rendezvous is the step's first host, on MASTER_PORT when set, else a port derived from the job
and step ids so two steps on one node never meet. Only SLURM_STEP_* variables are read, so a
plain `python` in the batch script itself (not under srun) is not mistaken for rank 0 of N.

    python -m pretrain.launch.slurm "gpu[01-02],cpu7"   # prints the expanded host list
"""
from __future__ import annotations

import itertools
import re
import sys


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur] if cur else out


def _expand_range(body: str) -> list[str]:
    items = []
    for part in body.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            items += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            items.append(part)
    return items


def expand_nodelist(nodelist: str) -> list[str]:
    """`gpu[01-02,05],login` -> [gpu01, gpu02, gpu05, login] (several bracket groups per name too)."""
    hosts = []
    for name in _split_top(nodelist.strip()):
        pieces = re.split(r"(\[[^\]]*\])", name)
        choices = [_expand_range(p[1:-1]) if p.startswith("[") else [p] for p in pieces if p]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    return hosts


def derived_port(env: dict) -> int:
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    step = int(env.get("SLURM_STEP_ID", "0") or 0)
    return 20000 + (job * 7 + step) % 20000


def torch_env_from_slurm(env: dict) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for an srun task ({} outside srun)."""
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    if not nodes:
        raise RuntimeError("SLURM_STEP_NODELIST is empty; cannot find the rendezvous host")
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or nodes[0],
            "MASTER_PORT": env.get("MASTER_PORT") or str(derived_port(env))}


if __name__ == "__main__":
    print("\n".join(expand_nodelist(sys.argv[1])))

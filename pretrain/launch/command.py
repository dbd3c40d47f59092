"""The command launch.sh runs, for each launcher mode, and the world size it will have.

    LAUNCHER=deepspeed (default)  one node: `deepspeed --num_gpus N`; with HOSTFILE: `deepspeed
                                  --hostfile H`, ranks per node from the hostfile's `slots` (NGPUS,
                                  when set, caps every node like DeepSpeed's --num_gpus)
    LAUNCHER=torchrun             `python -m torch.distributed.run --nproc_per_node N` (run it on
                                  every node with `-- --nnodes 2 --node_rank I --master_addr HOST`)
    LAUNCHER=srun                 inside a SLURM allocation: `srun python pretrain/train.py`, one
                                  task per GPU; ranks come from SLURM_* (pretrain/launch/slurm.py)

Arguments before `--` are config overrides; everything after it goes to the launcher unchanged
(`-- --launcher slurm`, `-- --include host1:0,1`, `-- --ssh_port 2222`, `-- --nnodes 2`).
Multi-node DeepSpeed runs also get an environment file (DeepSpeed's `.deepspeed_env` format, named
by DS_ENV_FILE) carrying OMP_NUM_THREADS, PYTHONPATH, DS_ACCELERATOR, NCCL_* and WANDB_* to the
other nodes; entries of the user's own ~/.deepspeed_env and ./.deepspeed_env are kept.

Used by launch.sh as `python -m pretrain.launch.command OVERRIDES -- LAUNCHER_ARGS`; it prints the
world size (or `?`), the environment file's path (or an empty line), then one argument per line.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

TRAIN_SCRIPT = "pretrain/train.py"
CARRIED_VARS = ("OMP_NUM_THREADS", "PYTHONPATH", "DS_ACCELERATOR")
CARRIED_PREFIXES = ("NCCL_", "WANDB_")


@dataclass
class Plan:
    cmd: list[str]
    world: int | None  # None when only the launcher will know (torchrun elastic, srun outside an allocation)
    env_file: str | None  # contents of the environment file for remote nodes, if any


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, launcher args): split at the first `--`."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return list(argv), []


def _flag(args: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in args (the last one wins, as argparse does)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def read_hostfile(path: str) -> dict[str, int]:
    """DeepSpeed hostfile `host slots=N` lines (comments and blank lines skipped) -> {host: slots}."""
    hosts: dict[str, int] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or not slots or not slots[0][6:].isdigit() or int(slots[0][6:]) < 1:
            raise ValueError(f"{path}:{n}: expected 'HOST slots=N' with N >= 1, got {line!r}")
        if parts[0] in hosts:
            raise ValueError(f"{path}:{n}: host {parts[0]} listed twice")
        hosts[parts[0]] = int(slots[0][6:])
    if not hosts:
        raise ValueError(f"{path}: no 'HOST slots=N' lines")
    return hosts


def _filter_spec(spec: str) -> dict[str, list[int] | None]:
    """DeepSpeed's `host1:0,1@host2` -> {host1: [0, 1], host2: None (all slots)}."""
    out: dict[str, list[int] | None] = {}
    for item in filter(None, spec.split("@")):
        host, _, slots = item.partition(":")
        out[host] = [int(s) for s in slots.split(",")] if slots else None
    return out


def hostfile_world(hosts: dict[str, int], launcher_args: list[str], ngpus: int | None) -> int:
    """Ranks DeepSpeed will start from this hostfile, after --include/--exclude/--num_nodes/--num_gpus."""
    slots = {h: list(range(n)) for h, n in hosts.items()}
    include, exclude = _flag(launcher_args, "--include"), _flag(launcher_args, "--exclude")
    if include:
        keep = _filter_spec(include)
        unknown = sorted(set(keep) - set(slots))
        if unknown:
            raise ValueError(f"--include names hosts not in the hostfile: {', '.join(unknown)}")
        slots = {h: (s if keep[h] is None else [i for i in s if i in keep[h]]) for h, s in slots.items() if h in keep}
    if exclude:
        drop = _filter_spec(exclude)
        slots = {h: [i for i in s if drop[h] is not None and i not in drop[h]] if h in drop else s
                 for h, s in slots.items()}
        slots = {h: s for h, s in slots.items() if s}
    num_nodes = _flag(launcher_args, "--num_nodes")
    if num_nodes and int(num_nodes) > 0:
        slots = dict(list(slots.items())[:int(num_nodes)])
    num_gpus = _flag(launcher_args, "--num_gpus") or ngpus
    if num_gpus and int(num_gpus) > 0:
        slots = {h: s[:int(num_gpus)] for h, s in slots.items()}
    return sum(len(s) for s in slots.values())


def env_file_text(env: dict, home: str, cwd: str) -> str:
    """KEY=VALUE lines for DeepSpeed to export on every node (the user's own files first)."""
    lines: dict[str, str] = {}
    for name in CARRIED_VARS:
        if env.get(name):
            lines[name] = env[name]
    for k in sorted(env):
        if k.startswith(CARRIED_PREFIXES):
            lines[k] = env[k]
    for d in (home, cwd):  # DeepSpeed reads these when DS_ENV_FILE is unset; keep what they say
        p = Path(d) / ".deepspeed_env"
        if p.is_file():
            for line in p.read_text().splitlines():
                if "=" in line:
                    k, v = line.split("=", 1)
                    lines[k.strip()] = v.strip()
    return "".join(f"{k}={v}\n" for k, v in lines.items() if "\n" not in v)


def plan(env: dict, argv: list[str]) -> Plan:
    """The command for `env` (LAUNCHER, NGPUS, HOSTFILE, NNODES, MASTER_ADDR, MASTER_PORT, PYTHON,
    DEEPSPEED, CONFIG) and launch.sh's arguments `argv` (overrides, then `--` launcher args)."""
    overrides, extra = split_args(argv)
    mode = env.get("LAUNCHER", "deepspeed")
    python = env.get("PYTHON", sys.executable)
    config = env.get("CONFIG", "pretrain/configs/demo.yaml")
    ngpus = int(env["NGPUS"]) if env.get("NGPUS") else None
    port = env.get("MASTER_PORT", "29500")
    script = [TRAIN_SCRIPT, "--config", config, *overrides]
    if mode == "deepspeed":
        ds = [env.get("DEEPSPEED", "deepspeed")]
        if not env.get("HOSTFILE"):
            n = int(_flag(extra, "--num_gpus") or ngpus or 1)
            ds += [] if _flag(extra, "--num_gpus") else ["--num_gpus", str(n)]
            ds += [] if _flag(extra, "--master_port") else ["--master_port", port]
            return Plan(ds + extra + script, n, None)
        hosts = read_hostfile(env["HOSTFILE"])
        if env.get("NNODES") and not _flag(extra, "--num_nodes"):
            ds += ["--num_nodes", env["NNODES"]]
        if ngpus and not _flag(extra, "--num_gpus"):
            ds += ["--num_gpus", str(ngpus)]
        addr = env.get("MASTER_ADDR") or next(iter(hosts))
        ds = [ds[0], "--hostfile", env["HOSTFILE"], *ds[1:]]
        ds += [] if _flag(extra, "--master_addr") else ["--master_addr", addr]
        ds += [] if _flag(extra, "--master_port") else ["--master_port", port]
        world = hostfile_world(hosts, extra + (["--num_nodes", env["NNODES"]] if env.get("NNODES") else []), ngpus)
        return Plan(ds + extra + script, world, env_file_text(env, env.get("HOME", "~"), env.get("PWD", ".")))
    if mode == "torchrun":
        n = int(_flag(extra, "--nproc_per_node") or _flag(extra, "--nproc-per-node") or ngpus or 1)
        cmd = [python, "-m", "torch.distributed.run"]
        if not (_flag(extra, "--nproc_per_node") or _flag(extra, "--nproc-per-node")):
            cmd += ["--nproc_per_node", str(n)]
        if not (_flag(extra, "--master_port") or _flag(extra, "--master-port") or _flag(extra, "--rdzv_endpoint")
                or _flag(extra, "--rdzv-endpoint")):
            cmd += ["--master_port", port]
        nnodes = _flag(extra, "--nnodes") or "1"
        world = n * int(nnodes) if nnodes.isdigit() else None
        return Plan(cmd + extra + script, world, None)
    if mode == "srun":
        cmd = ["srun", "--kill-on-bad-exit=1"]
        if ngpus and not _flag(extra, "--ntasks-per-node"):
            cmd += [f"--ntasks-per-node={ngpus}"]
        world = int(env["SLURM_NTASKS"]) if env.get("SLURM_NTASKS", "").isdigit() else None
        return Plan(cmd + extra + [python, "-u", *script], world, None)
    raise ValueError(f"LAUNCHER={mode!r}: expected deepspeed, torchrun or srun")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        p = plan(dict(os.environ), argv)
    except (ValueError, OSError) as e:
        print(f"launch.sh: {e}", file=sys.stderr)
        return 2
    env_path = ""
    if p.env_file is not None:
        path = Path(os.environ.get("LAUNCH_ENV_DIR", ".launch")) / "deepspeed_env"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(p.env_file)
        env_path = str(path.resolve())
    print("?" if p.world is None else p.world)
    print(env_path)
    print("\n".join(p.cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""launch.sh's command per launcher mode (pretrain/launch/command.py) and the SLURM task mapping.

Each case checks the exact command against the rule it implements (hostfile slots decide ranks
per node, arguments after `--` reach the launcher unchanged, ...); no process is started."""
import pytest

from pretrain.launch.command import TRAIN_SCRIPT, hostfile_world, plan, read_hostfile
from pretrain.launch.slurm import derived_port, expand_nodelist, torch_env_from_slurm

BASE = {"PYTHON": "py", "DEEPSPEED": "ds", "CONFIG": "c.yaml", "MASTER_PORT": "1234"}
SCRIPT = [TRAIN_SCRIPT, "--config", "c.yaml", "train.max_steps=5"]


@pytest.fixture
def hostfile(tmp_path):
    p = tmp_path / "hostfile"
    p.write_text("# two nodes of different sizes\nnode-a slots=4\n\nnode-b slots=2  # small one\n")
    return str(p)


def test_single_node_deepspeed():
    p = plan({**BASE, "NGPUS": "2"}, ["train.max_steps=5"])
    assert p.cmd == ["ds", "--num_gpus", "2", "--master_port", "1234", *SCRIPT]
    assert p.world == 2 and p.env_file is None


def test_hostfile_slots_decide_ranks_per_node(hostfile):
    p = plan({**BASE, "HOSTFILE": hostfile}, ["train.max_steps=5"])
    assert p.cmd == ["ds", "--hostfile", hostfile, "--master_addr", "node-a", "--master_port", "1234", *SCRIPT]
    assert "--num_gpus" not in p.cmd  # the launching machine's GPU count must not cap the nodes
    assert p.world == sum(read_hostfile(hostfile).values()) == 6
    capped = plan({**BASE, "HOSTFILE": hostfile, "NGPUS": "1", "NNODES": "1"}, ["train.max_steps=5"])
    assert capped.cmd[:7] == ["ds", "--hostfile", hostfile, "--num_nodes", "1", "--num_gpus", "1"]
    assert capped.world == 1


def test_launcher_args_after_double_dash_pass_unchanged(hostfile):
    extra = ["--launcher", "slurm", "--include", "node-a:0,1@node-b", "--ssh_port", "2222"]
    p = plan({**BASE, "HOSTFILE": hostfile}, ["train.max_steps=5", "--", *extra])
    i = p.cmd.index("--launcher")
    assert p.cmd[i:i + len(extra)] == extra and p.cmd[i + len(extra):] == SCRIPT
    assert p.world == 2 + 2  # node-a slots 0,1 and all of node-b
    p = plan({**BASE, "HOSTFILE": hostfile}, ["--", "--exclude", "node-a:3"])
    assert p.world == 5


def test_hostfile_errors(tmp_path):
    bad = tmp_path / "h"
    bad.write_text("node-a 4\n")
    with pytest.raises(ValueError, match="slots=N"):
        read_hostfile(str(bad))
    bad.write_text("node-a slots=2\n")
    with pytest.raises(ValueError, match="node-z"):
        hostfile_world(read_hostfile(str(bad)), ["--include", "node-z"], None)


def test_env_file_carries_listed_variables(hostfile, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("MY_SETTING=1\n")
    env = {**BASE, "HOSTFILE": hostfile, "OMP_NUM_THREADS": "4", "PYTHONPATH": "/repo",
           "NCCL_IB_DISABLE": "1", "WANDB_MODE": "offline", "UNRELATED": "x", "HOME": str(home),
           "PWD": str(tmp_path)}
    lines = dict(ln.split("=", 1) for ln in plan(env, []).env_file.splitlines())
    assert lines == {"OMP_NUM_THREADS": "4", "PYTHONPATH": "/repo", "NCCL_IB_DISABLE": "1",
                     "WANDB_MODE": "offline", "MY_SETTING": "1"}


def test_torchrun_and_srun_commands():
    p = plan({**BASE, "LAUNCHER": "torchrun", "NGPUS": "8"}, ["train.max_steps=5", "--", "--nnodes", "2"])
    assert p.cmd == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "8", "--master_port", "1234",
                     "--nnodes", "2", *SCRIPT]
    assert p.world == 16
    p = plan({**BASE, "LAUNCHER": "srun", "SLURM_NTASKS": "16"}, ["train.max_steps=5", "--", "--nodes=2"])
    assert p.cmd == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "py", "-u", *SCRIPT]
    assert p.world == 16
    with pytest.raises(ValueError, match="LAUNCHER"):
        plan({**BASE, "LAUNCHER": "mpirun"}, [])


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("login,cn[8-10]", ["login", "cn8", "cn9", "cn10"]),
    ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
    ("single", ["single"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_slurm_task_mapping():
    task = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
            "SLURM_STEP_NODELIST": "gpu[03-06]", "SLURM_JOB_ID": "777", "SLURM_STEP_ID": "2"}
    env = torch_env_from_slurm(task)
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03",
                   "MASTER_PORT": str(derived_port(task))}
    assert 20000 <= int(env["MASTER_PORT"]) < 40000
    assert derived_port({**task, "SLURM_STEP_ID": "3"}) != derived_port(task)  # two steps, two ports
    assert torch_env_from_slurm({**task, "MASTER_PORT": "29999"})["MASTER_PORT"] == "29999"
    # The batch script itself (no srun step variables) is not a rank of the step's world.
    batch = {k: v for k, v in task.items() if not k.startswith("SLURM_STEP")}
    assert torch_env_from_slurm(batch) == {}

"""Every usage line the repo prints runs as written.

Usage lines are the shell commands in the module docstrings of tools/*.py, in the comment headers
of pretrain/configs/**/*.yaml and in the README's code blocks. They run as cheaply as the command
allows, never as full jobs:
  * `python tools/X.py ...` and `python -m pkg.mod ...`: the program runs up to and including its
    argument parsing (argparse's `parse_args` returns, then the program stops), so every flag,
    subcommand and positional must be accepted as written; tools that only read and are cheap
    (READ_ONLY) run to the end;
  * `[ENV=...] ./launch.sh overrides [-- launcher args]`: the config resolved and its values
    validated as launch.sh does (`CONFIG` from the environment, the overrides, the world size;
    data files are not looked for), and once through launch.sh itself with `--print` (validates,
    prints the command, starts nothing). A config header must launch its own file.
Optional arguments written `[--flag x]` are taken in; of alternatives `[a | b]` the first.
Placeholders (`RUNS.csv`, `DIR`) and input files that do not exist are fine: nothing gets that far.

    python -m pytest tests/test_usage_lines.py -q
"""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import PYTHON, REPO

READ_ONLY = {"tools/model_stats.py"}  # cheap and writes nothing: run to the end
# A command starts a line, or follows a label ("Check the parameter count:  python ...").
_COMMAND = re.compile(r"(?:^|:\s+)((?:[A-Z_]+=\S+\s+)*(?:\./launch\.sh|python|taskset -c \S+ python)(?:\s.*)?)$")


# -- finding usage lines -----------------------------------------------------------------------

def _commands_in(lines: list[str]) -> list[str]:
    """Shell commands in text lines: backslash continuations joined, from the command on."""
    out, pending = [], ""
    for line in lines:
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        m = _COMMAND.search(line.strip())
        if m and (m.group(1).startswith(("python tools/", "python -m ", "taskset ")) or "./launch.sh" in m.group(1)):
            out.append(m.group(1).strip())
    return out


def tool_usage_lines() -> dict[str, list[str]]:
    return {f"tools/{p.name}": _commands_in(ast.get_docstring(ast.parse(p.read_text()), clean=True).splitlines())
            for p in sorted((REPO / "tools").glob("*.py"))}


def config_usage_lines() -> dict[str, list[str]]:
    out = {}
    for p in sorted((REPO / "pretrain/configs").rglob("*.yaml")):
        header = []
        for line in p.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("#"))
        out[str(p.relative_to(REPO))] = _commands_in(header)
    return out


def readme_usage_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [c for block in blocks for c in _commands_in(block.splitlines())]


# -- turning a line into something cheap to run -------------------------------------------------

def argv_of(command: str) -> tuple[dict, list[str]]:
    """(environment assignments, argv) of one command as bash would split and expand it
    (globs against the repository, unmatched globs kept literally), optional groups taken in."""
    while True:  # innermost [a | b] groups first: [--fill-text [DIR]] -> --fill-text DIR
        new = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split("|")[0].strip(), command)
        if new == command:
            break
        command = new
    words = shlex.split(command, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if words[:1] == ["taskset"]:
        words = words[words.index("python"):]
    argv = []
    for w in words:
        matches = sorted(str(p.relative_to(REPO)) for p in REPO.glob(w)) if any(c in w for c in "*?") else []
        argv.extend(matches or [w])
    return env, argv


def plan(command: str) -> dict:
    """What the runner does with one command."""
    env, argv = argv_of(command)
    if argv[0] == "./launch.sh":
        args = argv[1:]
        if args[:1] == ["--print"]:
            args = args[1:]
        if "--" in args:  # what follows goes to the launcher, not to the config
            args = args[:args.index("--")]
        world = int(env.get("NGPUS", 2)) * int(env.get("NNODES", 1))
        return {"kind": "launch", "config": env.get("CONFIG", "pretrain/configs/demo.yaml"), "world": world,
                "argv": args, "command": command}
    assert argv[0] == "python", command
    if argv[1] == "-m":
        return {"kind": "module", "target": argv[2], "argv": argv[3:], "command": command}
    return {"kind": "run" if argv[1] in READ_ONLY else "parse", "target": argv[1], "argv": argv[2:],
            "command": command}


# -- the runner: one process for every line, so torch and friends are imported once --------------

def run_plans(plans: list[dict]) -> list[dict]:
    """Runs in a child process (`python tests/test_usage_lines.py PLANS.json`)."""
    import argparse
    import contextlib
    import io
    import runpy

    class Parsed(BaseException):
        pass

    def stop_after(method):
        def parse(self, *a, **k):
            method(self, *a, **k)
            raise Parsed
        return parse

    results = []
    for p in plans:
        out = io.StringIO()
        code, parse_only = 0, p["kind"] in ("parse", "module")
        saved = (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_intermixed_args, sys.argv)
        if parse_only:
            argparse.ArgumentParser.parse_args = stop_after(saved[0])
            argparse.ArgumentParser.parse_intermixed_args = stop_after(saved[1])
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                if p["kind"] == "launch":  # what launch.sh runs before starting any rank
                    from pretrain.config import main as check_config
                    code = check_config([p["config"], "--world-size", str(p["world"]), "--skip-files", *p["argv"]])
                elif p["kind"] == "module":
                    sys.argv = [p["target"], *p["argv"]]
                    runpy.run_module(p["target"], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = [p["target"], *p["argv"]]
                    runpy.run_path(p["target"], run_name="__main__")
            if parse_only:  # it ran to the end: it does not parse through argparse, so no dry run
                code = 1
                out.write("finished without parsing its arguments with argparse")
        except Parsed:
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001 - reported with the command
            code = 1
            out.write(f"{type(e).__name__}: {e}")
        finally:
            argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_intermixed_args, sys.argv = saved
        results.append({"command": p["command"], "code": code, "output": out.getvalue()[-2000:]})
    return results


def _run_in_child(plans: list[dict], tmp_path: Path) -> list[dict]:
    spec = tmp_path / "plans.json"
    spec.write_text(json.dumps(plans))
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(REPO))
    proc = subprocess.run([PYTHON, str(Path(__file__)), str(spec)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _failures(results: list[dict]) -> str:
    return "\n\n".join(f"$ {r['command']}\n  exit {r['code']}: {r['output'].strip()[-600:]}"
                       for r in results if r["code"] != 0)


# -- tests ------------------------------------------------------------------------------------------

def test_every_tool_and_recipe_has_a_usage_line():
    """Every program of tools/ (a file with a __main__ block; shared helpers are not programs)
    and every recipe says how to run it."""
    programs = {f: lines for f, lines in tool_usage_lines().items()
                if '__name__ == "__main__"' in (REPO / f).read_text()}
    assert len(programs) >= len(tool_usage_lines()) - 2, sorted(set(tool_usage_lines()) - set(programs))
    missing = [f for f, lines in {**programs, **config_usage_lines()}.items() if not lines]
    assert not missing, f"no usage line in the docstring / header of: {missing}"


def test_config_headers_launch_their_own_file():
    wrong = []
    for path, lines in config_usage_lines().items():
        for line in lines:
            p = plan(line)
            if p["kind"] == "launch" and p["config"] != path:
                wrong.append(f"{path}: `{line}` launches {p['config']}")
            if p["kind"] != "launch" and path not in p["argv"]:
                wrong.append(f"{path}: `{line}` does not name the file")
    assert not wrong, "\n".join(wrong)


def test_usage_lines_run_as_written(tmp_path):
    lines = [c for cs in tool_usage_lines().values() for c in cs]
    lines += [c for cs in config_usage_lines().values() for c in cs]
    lines += readme_usage_lines()
    plans = [plan(c) for c in dict.fromkeys(lines)]
    kinds = {p["kind"] for p in plans}
    assert kinds >= {"launch", "parse", "run"}, kinds
    results = _run_in_child(plans, tmp_path)
    assert len(results) == len(plans)
    assert not _failures(results), "usage lines that do not run as written:\n\n" + _failures(results)


def test_runner_catches_a_wrong_line(tmp_path):
    """The checker itself: the header this test was written against (a config path given to
    launch.sh as an argument), an unknown flag, and a tool that fails when run."""
    bad = ["./launch.sh pretrain/configs/demo_moe.yaml",
           "python tools/sweep.py --kind early --no-such-flag 3 --out /tmp/x",
           "python tools/model_stats.py pretrain/configs/no_such.yaml --json"]
    results = _run_in_child([plan(c) for c in bad], tmp_path)
    assert [r["code"] != 0 for r in results] == [True, True, True], results
    assert "section.key=value" in results[0]["output"]
    assert "--no-such-flag" in results[1]["output"]


def test_launch_print_runs_a_header_line_dry():
    """launch.sh itself, with --print: demo_moe.yaml's expert-parallel header line resolves and
    validates for two ranks and prints the deepspeed command, and no rank starts. (The other
    launch lines go through the same check in-process, in test_usage_lines_run_as_written.)"""
    config = "pretrain/configs/demo_moe.yaml"
    line = next(c for c in config_usage_lines()[config] if "expert_parallel_size=2" in c)
    env, argv = argv_of(line)
    assert argv[0] == "./launch.sh" and env == {"CONFIG": config}
    proc = subprocess.run(["bash", "launch.sh", "--print", *argv[1:]], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=PYTHON, MASTER_PORT="29999", **env), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"--num_gpus 2 --master_port 29999 pretrain/train.py --config {config} " in proc.stdout
    resolved = yaml.safe_load(proc.stdout[:proc.stdout.index("\n+ ")])
    assert resolved["model"]["kind"] == "moe" and resolved["model"]["moe"]["expert_parallel_size"] == 2


if __name__ == "__main__":  # the child process of _run_in_child
    sys.path.insert(0, str(REPO))
    print(json.dumps(run_plans(json.loads(Path(sys.argv[1]).read_text()))))

"""Launchers of real clusters: torchrun (standalone and elastic, with restarts) and Slurm
(``recipes/slurm/dat.sbatch`` -> ``dat_ds.launch.slurm`` -> srun -> one torchrun agent per node)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, clean_env, recipe_module
from dat_ds.dist import free_port
from dat_ds.launch.slurm import SlurmJob, command, expand_nodelist, first_host, main
from dat_ds.metrics import read_jsonl

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "512", "--eval-limit", "64", "--steps", "2",
        "--eval-steps", "2", "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]
ELASTIC = ["--nnodes", "1:2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-conf", "last_call_timeout=1"]  # 1:2 nodes: without it each round waits 30 s for a 2nd node


def torchrun(args, timeout=600):
    return subprocess.run([TORCHRUN, *map(str, args)], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


# --- Slurm: the environment mapping and the command ----------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("node7", ["node7"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("gpu[01-02,07],cpu-a1", ["gpu01", "gpu02", "gpu07", "cpu-a1"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x1.cluster,y[1-2].cluster", ["x1.cluster", "y1.cluster", "y2.cluster"]),
])
def test_nodelists_expand_as_slurm_writes_them(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["gpu[1-", "gpu[3-1]", "gpu[a]", "a,,b", "gpu]1["])
def test_a_malformed_nodelist_is_refused(bad):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(bad)


GPU_JOB = {"SLURM_JOB_ID": "815243", "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_CPUS_ON_NODE": "64", "SLURM_TASKS_PER_NODE": "8(x2)"}


def test_a_gpu_job_becomes_one_agent_per_node_with_a_rank_per_gpu():
    job = SlurmJob.from_env(GPU_JOB)
    assert job == SlurmJob("815243", 2, "gpu017", 8, 64, 8)
    cmd = command(job, ["recipes/imagenet_dat.py", "--resume"], max_restarts=3, python="python")
    assert cmd == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=0",
                   "--cpus-per-task=64", "--gpus-per-node=8",
                   "python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                   "--rdzv-endpoint=gpu017:25243", "--rdzv-id=dat-ds-815243", "--max-restarts=3",
                   "recipes/imagenet_dat.py", "--resume"]
    assert "--nnodes=1:2" in command(job, ["r.py"], min_nodes=1)


def test_a_cpu_job_takes_its_tasks_per_node_as_ranks():
    env = {"SLURM_JOB_ID": "4242_3", "SLURM_JOB_NODELIST": "c[1-4]", "SLURM_NNODES": "4",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "32"}  # an array job; no GPUs
    job = SlurmJob.from_env(env)
    assert (job.nodes, job.head, job.nproc_per_node, job.gpus_on_node) == (4, "c1", 2, 0)
    cmd = command(job, ["r.py"], port=29400, python="python")
    assert "--rdzv-endpoint=c1:29400" in cmd and "--nproc-per-node=2" in cmd and "--cpus-per-task=32" in cmd
    assert not any(a.startswith("--gpus") for a in cmd)
    assert job.default_port() == 20000 + 42423 % 10000
    assert SlurmJob.from_env(env, nproc_per_node=3).nproc_per_node == 3


@pytest.mark.parametrize("env, message", [
    ({}, "not inside a Slurm job"),
    ({**GPU_JOB, "SLURM_NTASKS_PER_NODE": "4"}, "SLURM_GPUS_ON_NODE=8 but SLURM_NTASKS_PER_NODE=4"),
    ({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"}, "cannot tell the ranks per node"),
    ({**GPU_JOB, "SLURM_CPUS_ON_NODE": "lots"}, "SLURM_CPUS_ON_NODE='lots' is not a number"),
])
def test_an_unusable_environment_is_refused_in_one_line(env, message):
    with pytest.raises(ValueError, match=message) as err:
        SlurmJob.from_env(env)
    assert "\n" not in str(err.value)


def test_command_refuses_bad_settings():
    job = SlurmJob.from_env(GPU_JOB)
    for kw, message in [({"min_nodes": 3}, "--min-nodes must lie in"), ({"max_restarts": -1}, "--max-restarts")]:
        with pytest.raises(ValueError, match=message):
            command(job, ["r.py"], **kw)
    with pytest.raises(ValueError, match="name the recipe"):
        command(job, [])


def test_slurms_own_expansion_is_taken_when_scontrol_is_there(tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'b-17\\nb-18\\n'\n")
    scontrol.chmod(0o755)
    assert first_host("b-[17-18]", str(scontrol)) == "b-17"
    scontrol.write_text("#!/bin/sh\nexit 1\n")
    assert first_host("n[5-6]", str(scontrol)) == "n5", "scontrol failed: the parser's expansion"


def test_main_prints_the_command_or_exits_2_with_one_line(capsys):
    main(["--dry-run", "--", "recipes/fashion_mnist_dat.py", "--resume"], env=GPU_JOB)
    out = capsys.readouterr()
    assert out.out.startswith("srun --nodes=2 ") and out.out.rstrip().endswith("recipes/fashion_mnist_dat.py --resume")
    assert "note" not in out.err, "--resume given: no warning"
    main(["--dry-run", "recipes/fashion_mnist_dat.py"], env=GPU_JOB)
    assert "without --resume a restarted job starts its training afresh" in capsys.readouterr().err
    with pytest.raises(SystemExit) as code:
        main(["recipes/fashion_mnist_dat.py"], env={})
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1 and "not inside a Slurm job" in err[0]


def job_id_with_a_free_port() -> str:
    """A job id whose default rendezvous port is free here."""
    for job_id in range(os.getpid() % 10000, os.getpid() % 10000 + 200):
        with socket.socket() as s:
            try:
                s.bind(("", 20000 + job_id % 10000))
                return str(job_id)
            except OSError:
                continue
    pytest.skip("no free port in 20000-29999")


def test_the_sbatch_script_trains_on_one_node_through_srun_and_torchrun(tmp_path):
    """The batch script as Slurm runs it on a 1-node, 2-task allocation; ``srun`` is a stand-in
    that records its options and runs the command as the allocation's one task."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/srun_args\n"
                                  "while [ $# -gt 0 ]; do case \"$1\" in --*) shift;; *) break;; esac; done\n"
                                  "SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 exec \"$@\"\n")
    (bin_dir / "srun").chmod(0o755)
    out = tmp_path / "run"
    env = clean_env({"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": job_id_with_a_free_port(),
                     "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
                     "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "2", "SLURM_SUBMIT_DIR": str(ROOT),
                     "DAT_DS_PYTHON": sys.executable})
    r = subprocess.run(["bash", str(ROOT / "recipes" / "slurm" / "dat.sbatch"), "recipes/fashion_mnist_dat.py",
                        *map(str, TINY), "--epochs", "1", "--output-dir", str(out), "--resume"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    srun = (tmp_path / "srun_args").read_text().split()
    assert srun[:4] == ["--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--kill-on-bad-exit=0"]
    assert "--nproc-per-node=2" in srun and "--rdzv-endpoint=localhost:" + str(20000 + int(env["SLURM_JOB_ID"])
                                                                                 % 10000) in srun
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 8
    assert [row["epoch"] for row in read_jsonl(out / "metrics.jsonl")] == [0]


# --- torchrun -------------------------------------------------------------------------------

RECIPE_ARGS = {"fashion_mnist_dat.py": [], "cifar_dat.py": [], "imagenet_dat.py": [], "smooth_at.py": [],
               "semisup_dat.py": [], "finetune.py": ["--from", "runs/x"], "evaluate.py": ["--checkpoint", "runs/x"],
               "certify.py": ["--checkpoint", "runs/x"], "export.py": ["--checkpoint", "runs/x", "--out", "out"]}


@pytest.mark.parametrize("script", sorted(RECIPE_ARGS))
def test_every_recipe_takes_the_local_rank_flag_of_older_launchers(script):
    """The deepspeed launcher passes --local_rank=N, torch.distributed.launch --local-rank=N."""
    recipe = recipe_module(f"recipes/{script}")
    for flag in ("--local_rank=1", "--local-rank=1"):
        assert recipe.parser().parse_args([*RECIPE_ARGS[script], flag]).local_rank == 1

def test_a_restarted_elastic_group_forms_its_world_again(tmp_path):
    """torchrun's agent keeps one store for every round; a restarted group must not read the dead
    round's addresses from it (each round gets a store of its own). Rank 1 dies after the first
    round's world formed; the only restart allowed must form a working 2-rank world."""
    r = torchrun([*ELASTIC, "--max-restarts", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id",
                  "rounds", ROOT / "tests" / "scripts" / "elastic_rounds.py", "--out", tmp_path], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rounds = {p.name: p.read_text() for p in tmp_path.glob("round*")}
    assert rounds == {f"round{n}_rank{r}.txt": "3 2" for n in (0, 1) for r in (0, 1)}, "rank+1 summed, 2 ranks"


def worker_pids(agent_pid: int) -> list:
    try:
        return [int(c) for c in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow  # three worker groups start (~50 s here)
def test_a_killed_rank_restarts_the_group_which_resumes_from_the_newest_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [TORCHRUN, *ELASTIC, "--max-restarts", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "--rdzv-id", "dat", str(ROOT / "recipes" / "fashion_mnist_dat.py"), *map(str, TINY), "--epochs", "2",
           "--save-every", "2", "--resume", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        t0 = time.time()
        while not list((out / "checkpoints").glob("*/complete.json")):
            assert proc.poll() is None and time.time() - t0 < 300, "no checkpoint"
            time.sleep(0.1)
        saved = {p.parent.name for p in (out / "checkpoints").glob("*/complete.json")}
        os.kill(worker_pids(proc.pid)[-1], signal.SIGKILL)
        log = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-4000:]
    assert "--resume: no checkpoint in" in log, "the first start had nothing to resume"
    resumed = [line for line in log.splitlines() if line.startswith("resuming from ")]
    assert len(resumed) == 1, log[-4000:]
    tag = Path(resumed[0].split()[2]).name
    assert tag in saved or tag > max(saved), f"resumed from {tag}, saved before the kill: {saved}"
    assert tag.startswith("epoch0000-batch"), "mid-epoch: the steps before the kill were not trained again"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2 and summary["global_step"] == 16
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [0, 1] and rows[-1]["global_step"] == 16


@pytest.mark.slow  # seven 2-rank launches (~4 min here)
def test_every_recipe_runs_under_torchrun_standalone(tmp_path):
    """Training recipes, then evaluate, certify, export and finetune on the trained run."""
    base = ["--standalone", "--nproc-per-node", "2"]
    run, epochs = tmp_path / "fmnist", ["--epochs", "1"]
    jobs = [("fashion_mnist_dat.py", [*TINY, *epochs, "--output-dir", run]),
            ("smooth_at.py", [*TINY, *epochs, "--noise-copies", "1", "--output-dir", tmp_path / "smooth"]),
            ("semisup_dat.py", [*TINY, *epochs, "--labeled-fraction", "0.5", "--teacher-epochs", "1",
                                "--output-dir", tmp_path / "semisup"]),
            ("finetune.py", [*TINY, *epochs, "--from", run, "--dataset", "fashion_mnist", "--classes", "0-4",
                             "--output-dir", tmp_path / "finetune"]),
            ("evaluate.py", ["--checkpoint", run, "--eval-limit", "32", "--batch-size", "8", "--pgd-steps", "2",
                             "--steps-sweep", "--eps-sweep", "--no-autoattack", "--output-dir", tmp_path / "eval"]),
            ("certify.py", ["--checkpoint", run, "--sigma", "0.25", "--eval-limit", "2", "--skip", "100",
                            "--N0", "10", "--N", "100", "--batch-size", "50", "--output-dir", tmp_path / "certify"]),
            ("export.py", ["--checkpoint", run, "--out", tmp_path / "export"])]
    logs = {}
    for script, args in jobs:
        r = torchrun([*base, ROOT / "recipes" / script, *args])
        assert r.returncode == 0, f"{script}: " + r.stdout[-2000:] + r.stderr[-3000:]
        logs[script] = r.stdout
    for name in ("fmnist", "smooth", "semisup", "finetune"):
        assert json.loads((tmp_path / name / "summary.json").read_text())["world_size"] == 2, name
    assert json.loads((tmp_path / "eval" / "eval_summary.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "certify" / "certify_summary.json").read_text())["world_size"] == 2
    assert logs["export.py"].count("exported ") == 1, "one rank exports; two would write the same files at once"
    assert (tmp_path / "export" / "model.pt2").is_file()

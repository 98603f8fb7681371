"""A Slurm allocation as one ``torchrun`` agent per node: the command ``recipes/slurm/dat.sbatch`` runs.

Run in the batch script (on the allocation's first node), it reads the job's environment and
starts ``srun`` with one task per node, each a torchrun agent that starts the node's ranks; the
agents meet (c10d rendezvous) on the first node and restart every rank from the newest checkpoint
when one fails (``--max-restarts``; the recipe needs ``--resume``):

    python -m dat_ds.launch.slurm --max-restarts 3 recipes/imagenet_dat.py --data-dir /data/imagenet --resume
    python -m dat_ds.launch.slurm --dry-run recipes/fashion_mnist_dat.py    # print the command only

What comes from where:

* first node (the rendezvous host): ``SLURM_JOB_NODELIST``, expanded by ``scontrol show hostnames``
  (or :func:`expand_nodelist` where scontrol is missing);
* nodes: ``SLURM_JOB_NUM_NODES`` (``SLURM_NNODES``); the rendezvous numbers them, so ``SLURM_NODEID``
  is not needed;
* ranks per node: ``--nproc-per-node``, else ``SLURM_GPUS_ON_NODE`` (one rank per GPU), else
  ``SLURM_NTASKS_PER_NODE`` (``#SBATCH --ntasks-per-node``: one rank per task);
* the agent's CPUs: ``SLURM_CPUS_ON_NODE`` (every CPU of the node goes to its one agent task);
* rendezvous port: ``--port``, else ``20000 + job id % 10000`` (jobs sharing a node differ);
  rendezvous id: ``dat-ds-<job id>``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

PORT_BASE, PORT_SPAN = 20000, 10000  # below Linux's ephemeral ports (32768-60999)


def expand_nodelist(text: str) -> List[str]:
    """Slurm's compressed host list, expanded in order: ``"gpu[01-02,07],cpu-a1"`` ->
    ``["gpu01", "gpu02", "gpu07", "cpu-a1"]`` (zero padding kept; several brackets in one name
    multiply out, as ``rack[1-2]-n[1-2]``)."""
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or (ch == "," and depth == 0):
            if depth < 0 or i == start:
                raise ValueError(f"SLURM_JOB_NODELIST {text!r} is not a Slurm host list")
            hosts += _expand_name(text[start:i], text)
            start = i + 1
    if depth:
        raise ValueError(f"SLURM_JOB_NODELIST {text!r} is not a Slurm host list")
    return hosts


def _expand_name(name: str, whole: str) -> List[str]:
    parts = re.split(r"\[([^\]]*)\]", name)  # literal, ranges, literal, ranges, ..., literal
    choices = [[part] if i % 2 == 0 else _expand_ranges(part, whole) for i, part in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def _expand_ranges(spec: str, whole: str) -> List[str]:
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"SLURM_JOB_NODELIST {whole!r}: bad range {item!r}")
        low, high = m.group(1), m.group(2) or m.group(1)
        out += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return out


def first_host(nodelist: str, scontrol: Optional[str] = None) -> str:
    """The allocation's first node: Slurm's own expansion when ``scontrol`` (a path) is given and
    works, else :func:`expand_nodelist`'s."""
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)[0]


@dataclass(frozen=True)
class SlurmJob:
    """What the launch needs from a Slurm job's environment."""
    job_id: str
    nodes: int
    head: str  # the first node: the rendezvous host
    nproc_per_node: int
    cpus_on_node: Optional[int] = None
    gpus_on_node: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str], nproc_per_node: Optional[int] = None,
                 scontrol: Optional[str] = None) -> "SlurmJob":
        """The job described by ``env`` (``os.environ`` inside ``sbatch``); ``ValueError`` (one line)
        when it is no Slurm job or leaves the ranks per node open."""
        if "SLURM_JOB_NODELIST" not in env or "SLURM_JOB_ID" not in env:
            raise ValueError("not inside a Slurm job (no SLURM_JOB_NODELIST/SLURM_JOB_ID): run it from an sbatch "
                             "script, e.g. recipes/slurm/dat.sbatch")
        nodes = _int(env, "SLURM_JOB_NUM_NODES") or _int(env, "SLURM_NNODES") or 1
        gpus, tasks = _int(env, "SLURM_GPUS_ON_NODE") or 0, _int(env, "SLURM_NTASKS_PER_NODE")
        if nproc_per_node is None:
            if gpus and tasks not in (None, 1, gpus):
                raise ValueError(f"SLURM_GPUS_ON_NODE={gpus} but SLURM_NTASKS_PER_NODE={tasks}: the ranks per node are "
                                 f"ambiguous; pass --nproc-per-node")
            nproc_per_node = gpus or tasks
        if not nproc_per_node or nproc_per_node < 1:
            raise ValueError("cannot tell the ranks per node: give the job --gpus-per-node or --ntasks-per-node, "
                             "or pass --nproc-per-node")
        return cls(env["SLURM_JOB_ID"], nodes, first_host(env["SLURM_JOB_NODELIST"], scontrol), nproc_per_node,
                   _int(env, "SLURM_CPUS_ON_NODE"), gpus)

    def default_port(self) -> int:
        digits = re.sub(r"\D", "", self.job_id) or "0"  # array jobs: "1234_7"
        return PORT_BASE + int(digits) % PORT_SPAN


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    """An integer Slurm variable; ``"8(x2)"`` (a per-node list) reads as its first count."""
    value = env.get(key, "").strip()
    if not value:
        return None
    m = re.match(r"\d+", value)
    if not m:
        raise ValueError(f"{key}={value!r} is not a number")
    return int(m.group(0))


def command(job: SlurmJob, script: Sequence[str], max_restarts: int = 3, min_nodes: Optional[int] = None,
            port: Optional[int] = None, python: str = sys.executable) -> List[str]:
    """``srun`` with one torchrun agent per node of ``job``, running ``script`` (the recipe and its flags).

    ``min_nodes`` below the job's nodes lets the agents go on with fewer nodes after one fails
    (the job needs ``sbatch --no-kill`` to keep its allocation then)."""
    if not script:
        raise ValueError("name the recipe to run, e.g. recipes/imagenet_dat.py --data-dir /data/imagenet --resume")
    if max_restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0, got {max_restarts}")
    low = job.nodes if min_nodes is None else min_nodes
    if not 1 <= low <= job.nodes:
        raise ValueError(f"--min-nodes must lie in [1, {job.nodes}] (the job's nodes), got {min_nodes}")
    srun = ["srun", f"--nodes={job.nodes}", f"--ntasks={job.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=0"]
    if job.cpus_on_node:
        srun.append(f"--cpus-per-task={job.cpus_on_node}")  # the agent's ranks share every CPU of the node
    if job.gpus_on_node:
        srun.append(f"--gpus-per-node={job.gpus_on_node}")
    agent = [python, "-m", "torch.distributed.run", f"--nnodes={low}:{job.nodes}" if low < job.nodes else
             f"--nnodes={job.nodes}", f"--nproc-per-node={job.nproc_per_node}", "--rdzv-backend=c10d",
             f"--rdzv-endpoint={job.head}:{port or job.default_port()}", f"--rdzv-id=dat-ds-{job.job_id}",
             f"--max-restarts={max_restarts}"]
    return srun + agent + list(script)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dat_ds.launch.slurm", description=__doc__.splitlines()[0])
    p.add_argument("--max-restarts", type=int, default=3,
                   help="times the agents restart every rank after one fails (the recipe needs --resume) (3)")
    p.add_argument("--min-nodes", type=int, default=None,
                   help="go on with this many nodes after a node fails (default: all of the job's)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks per node (default: SLURM_GPUS_ON_NODE, else SLURM_NTASKS_PER_NODE)")
    p.add_argument("--port", type=int, default=None, help="rendezvous port on the first node (default: 20000 + "
                                                          "job id %% 10000)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.add_argument("script", nargs=argparse.REMAINDER, help="the recipe and its flags")
    return p


def main(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> None:
    args = parser().parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    try:
        job = SlurmJob.from_env(os.environ if env is None else env, args.nproc_per_node, shutil.which("scontrol"))
        cmd = command(job, script, args.max_restarts, args.min_nodes, args.port)
    except ValueError as err:
        print(f"dat_ds.launch.slurm: error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.max_restarts and "--resume" not in script:
        print("dat_ds.launch.slurm: note: without --resume a restarted job starts its training afresh",
              file=sys.stderr)
    print(f"dat_ds.launch.slurm: job {job.job_id}, {job.nodes} node(s) x {job.nproc_per_node} rank(s), rendezvous "
          f"on {job.head}:\n  {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(shlex.join(cmd))
        return
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()

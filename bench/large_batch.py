"""Large-batch DAT against small-batch AT on full Fashion-MNIST (the DAT paper's Table 1 and Figure 2).

The question: at the same number of epochs, does DAT with LAMB (layerwise adaptive LR) at 8x and
16x the AT batch keep AT's robust accuracy, while momentum SGD (DAT w/o LALR) and linearly
scaled SGD with gradual warm-up (DAT-LSGD) lose it?

Design (every choice on a validation split, the test set only for the final table):

* data: the 60,000 Fashion-MNIST training images; the last ``--holdout`` of them are the
  validation split (never trained on: the recipe's ``--holdout``, which also keeps the best epoch
  by validation PGD accuracy); the 10,000 test images are used only by ``evaluate``;
* methods: AT at global batch ``--at-batch`` with momentum SGD (``--at-lamb``: also LAMB), DAT
  at 8x and 16x that batch with LAMB, SGD (w/o LALR) and LSGD; global batch = 2 ranks x
  ``--micro`` x gradient accumulation (accumulation is the same arithmetic as more ranks;
  BatchNorm sees ``--micro`` samples in every run); optimizers and LR rules come from the shipped
  ds_configs (``lamb_fp32.json``, ``sgd_momentum.json``, ``lsgd.json``) with only the batch fields
  and the LR replaced (``REFERENCE_LR`` times the run's multiplier);
* ``sweep``: PGD training, seed 0, each method at its sweep batch (AT batch for AT, 8x for DAT)
  with the reference LR times each multiplier of the method's grid; the best multiplier by
  validation PGD accuracy is used for every final run of that method. At 16x the config's LR
  rule (``lr_rule``) scales it: 16x tests the rule, not a second sweep. LSGD is AT-SGD's chosen
  LR scaled linearly with the batch plus gradual warm-up (Goyal et al.), so it has no sweep;
* ``final``: PGD training at every batch and FGSM-RS training at AT's batch and ``--fgsm-scales``,
  ``--seeds`` seeds each (the sweep's seed-0 run is reused);
* ``ema``: AT-SGD and DAT-LAMB 8x again with ``"ema"`` in the ds_config;
* ``epochs``: DAT-LAMB and DAT-SGD at 8x with each of ``--more-epochs`` epochs (``--seeds`` seeds,
  the LR chosen at ``--epochs``): how many epochs large-batch DAT needs to reach AT's RA at ``--epochs``;
* ``curve``: the equal-epoch curve, run by the current code: AT-SGD and AT-LAMB at AT's batch,
  DAT-LAMB and DAT-SGD at 8x, each at every ``--curve-epochs`` (3, 6, 12) with its own LR schedule,
  ``--seeds`` seeds, the sweep's LRs; longest rows first, each evaluated (PGD-10) as soon as trained;
* ``conadv``: ConAdv (one-step attack on one-update-old weights, clean + adversarial loss) at 8x
  with DAT-LAMB's LR, ``--conadv-epochs``, against the curve's DAT-LAMB row of those epochs;
* ``curve-aa``: AutoAttack on the first ``--curve-aa-limit`` test images for the first
  ``--curve-aa-seeds`` seeds of the longest ``--curve-aa-methods`` rows (AT-SGD and DAT-LAMB), with
  PGD-10 on the same images beside it; a summary of the same command run on another machine (a GPU)
  and copied into the run's ``eval_autoattack/`` is read instead of evaluating again;
* ``table`` also models the time to robustness: the wall-clock to reach AT-SGD's RA at each of its
  epoch counts, AT on one rank against DAT on ``--ttr-ranks`` ranks, from the measured per-image
  training cost (this machine: the curve's runs; H200: ``gpu.json``) and a ring all-reduce of the
  gradients over the link ``bench/link_bench.py`` measured;
* ``evaluate``: PGD-10 on the 10,000 test images and AutoAttack (standard) on the first
  ``--aa-limit`` of them, through ``recipes/evaluate.py``, on the validation-best checkpoint.

Every run goes through the real recipe under the ``deepspeed`` launcher. A finished run is
stored in ``bench/results/large_batch_runs/<key>.json`` and skipped when started again, so the
study runs in parts::

    python bench/large_batch.py --plan                          # what is done, what is left, estimate
    python bench/large_batch.py --part sweep --max-minutes 60   # a slice; run again to go on
    python bench/large_batch.py --part final ema epochs evaluate   # evaluate: the runs of the parts named
    python bench/large_batch.py --at-lamb --part curve conadv curve-aa --max-minutes 120   # the curve
    python bench/large_batch.py --part table                    # large_batch.json + plot from stored runs

``--part pilot`` trains one AT and one DAT run on a slice of the data (stored apart, never in
the table) to time them and check the plumbing.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import RESULTS, machine, save  # noqa: E402

RUNS = RESULTS / "large_batch_runs"
# The LR each sweep multiplier applies to: the shipped configs' LR when the study was designed. The
# configs have since taken the study's choices; a fixed reference keeps every stored run's key meaning
# the same LR.
REFERENCE_LR = {"lamb_fp32.json": 0.05, "sgd_momentum.json": 0.1, "lsgd.json": 0.1}
PARTS = ("pilot", "sweep", "final", "ema", "epochs", "curve", "conadv", "remedies", "curve-aa", "evaluate",
         "table")
ATTACK_LABEL = {"pgd": "PGD", "fgsm_rs": "FGSM"}
# The curve's methods, in the order their runs are trained (the goal's pair first): name, optimizer, scale.
CURVE_METHODS = ("AT-SGD", "DAT-LAMB", "DAT-SGD", "AT-LAMB")
# Training flags of an attack beyond --attack: ConAdv trains on clean and adversarial loss together.
ATTACK_FLAGS = {"conadv": ["--loss", "mix"]}
LABELS = {**ATTACK_LABEL, "conadv": "ConAdv"}


@dataclass(frozen=True)
class Remedy:
    """A change to DAT-LAMB's large-batch run from the literature: ds_config entries (dotted paths)
    and recipe flags."""
    what: str
    reference: str
    config: tuple = ()  # ((dotted path, value), ...)
    flags: tuple = ()


REMEDIES = {
    "warmup": Remedy("3 of 12 epochs of linear warm-up instead of 1", "Goyal et al. 2017 (5 of 90 epochs)",
                     config=(("scheduler.params.warmup_epochs", 3), ("scheduler.params.max_warmup_fraction", 0.25))),
    "trust-clamp": Remedy("LAMB's trust ratio clamped to [0.01, 1] instead of [0, 10]",
                          "You et al. 2020 (LAMB's clipping function phi)",
                          config=(("optimizer.params.c_l", 0.01), ("optimizer.params.c_u", 1.0))),
    "label-smoothing": Remedy("label smoothing 0.1 of the training targets", "Szegedy et al. 2016; Goyal et al. 2017",
                              flags=("--label-smoothing", "0.1")),
    "views": Remedy("2 adversarial views of each image per rank, each from its own random start (2x the compute "
                    "per update)", "Hoffer et al. 2020 (batch augmentation)", flags=("--views", "2")),
}


@dataclass(frozen=True)
class Method:
    """One optimizer set-up: its shipped ds_config and the LR multipliers its sweep tries."""
    name: str  # "AT" or "DAT"
    optimizer: str  # row label: LAMB, SGD, LSGD
    config: str  # ds_configs/<config>
    scale: int  # global batch = scale x --at-batch
    lr_grid: tuple  # multipliers of REFERENCE_LR; () = no sweep of its own (LSGD: AT's choice)


def methods(scales=(8, 16), at_lamb: bool = False) -> List[Method]:
    """AT (small batch) and DAT (large batches), each optimizer with its sweep grid.

    SGD w/o LALR keeps the small-batch LR unless the sweep finds a larger one, so its grid reaches
    further up. LSGD is defined by AT's LR: it takes AT-SGD's chosen multiplier, scaled linearly
    with the batch by ``lsgd.json``'s rule, with gradual warm-up (Goyal et al.), so it has no grid.
    """
    out = [Method("AT", "SGD", "sgd_momentum.json", 1, (0.5, 1.0, 2.0))]
    if at_lamb:
        out.append(Method("AT", "LAMB", "lamb_fp32.json", 1, (0.5, 1.0, 2.0)))
    for s in scales:
        out += [Method("DAT", "LAMB", "lamb_fp32.json", s, (0.5, 1.0, 2.0)),
                Method("DAT", "SGD", "sgd_momentum.json", s, (1.0, 2.0, 4.0)),
                Method("DAT", "LSGD", "lsgd.json", s, ())]
    return out


@dataclass(frozen=True)
class Run:
    method: Method
    attack: str
    seed: int
    lr_mult: float
    phase: str  # sweep | final | ema | epochs | curve | remedy | pilot
    ema: bool = False
    epochs: Optional[int] = None  # None: --epochs
    remedy: str = ""  # a key of REMEDIES

    def key(self, args) -> str:
        m = self.method
        return (f"{self.phase}-{self.attack}-{m.name}-{m.optimizer}-b{m.scale * args.at_batch}-lr{self.lr_mult:g}"
                f"-s{self.seed}{'-ema' if self.ema else ''}{f'-e{self.epochs}' if self.epochs else ''}"
                f"{f'-{self.remedy}' if self.remedy else ''}")

    @property
    def label(self) -> str:
        return f"{self.method.name}-{self.method.optimizer}" + (" + EMA" if self.ema else "")


# --- configs and subprocesses ----------------------------------------------------------------

def ds_config(run: Run, args) -> dict:
    """The shipped config of the run's optimizer with this batch, the reference LR times the run's
    multiplier, and (maybe) EMA."""
    cfg = json.loads((ROOT / "ds_configs" / run.method.config).read_text())
    global_batch = run.method.scale * args.at_batch
    if global_batch % (args.ranks * args.micro):
        raise ValueError(f"global batch {global_batch} is not a multiple of {args.ranks} ranks x micro {args.micro}")
    cfg.pop("train_batch_size", None)
    cfg.update(train_micro_batch_size_per_gpu=args.micro,
               gradient_accumulation_steps=global_batch // (args.ranks * args.micro))
    cfg["optimizer"]["params"]["lr"] = REFERENCE_LR[run.method.config] * run.lr_mult
    if run.ema:
        cfg["ema"] = {"decay": args.ema_decay, "warmup": True}
    for path, value in REMEDIES[run.remedy].config if run.remedy else ():
        *parents, leaf = path.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"remedy {run.remedy}: {path} is not in {run.method.config}")
        node[leaf] = value
    return cfg


def launch(script: List[str], args, log: Path, port: int) -> Tuple[int, float]:
    """``deepspeed --num_gpus ranks`` (CPU ranks without GPUs) on a recipe, output to ``log``;
    returns the exit code and the CPU seconds of the whole process tree (less sensitive than wall
    time to other work on a shared machine)."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", str(args.ranks), "--master_port", str(port), *script]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    before = _children_cpu()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=str(ROOT), stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return code, _children_cpu() - before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train(run: Run, args, port: int) -> dict:
    """Train one run through ``recipes/fashion_mnist_dat.py``; returns what the table needs."""
    key = run.key(args)
    out = Path(args.workdir) / key
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = _beside(out, ".ds_config.json")
    cfg_path.write_text(json.dumps(ds_config(run, args), indent=1))
    recipe = ["recipes/fashion_mnist_dat.py", "--deepspeed_config", str(cfg_path), "--backbone", args.backbone,
              "--stem", args.stem, "--eps", str(args.eps), "--attack", run.attack,
              "--epochs", str(run.epochs or args.epochs),
              "--holdout", str(args.holdout), "--eval-limit", str(args.train_eval_limit),
              "--eval-steps", "10", "--seed", str(run.seed), "--output-dir", str(out), "--resume"]
    if run.attack == "pgd":
        recipe += ["--steps", str(args.pgd_steps)]
    recipe += ATTACK_FLAGS.get(run.attack, []) + list(REMEDIES[run.remedy].flags if run.remedy else ())
    if args.train_limit:
        recipe += ["--train-limit", str(args.train_limit + args.holdout)]
    t0 = time.perf_counter()
    code, cpu_s = launch(recipe, args, _beside(out, ".log"), port)
    if code != 0:
        raise RuntimeError(f"{key}: exit code {code}; see {_beside(out, '.log')}")
    summary = json.loads((out / "summary.json").read_text())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if run.ema and "ema" not in summary:
        raise RuntimeError(f"{key}: the trainer ignored the ds_config's \"ema\" block (no \"ema\" in summary.json)")
    return {"key": key, "run": {**asdict(run), "method": asdict(run.method)}, "output_dir": _relative(out),
            "global_batch_size": summary["global_batch_size"], "updates": _updates(epochs),
            "epochs": run.epochs or args.epochs, "peak_lr": _peak_lr(_beside(out, ".log")),
            "val_robust_acc": max((e.get("holdout_pgd_acc", 0.0) for e in epochs), default=None),
            "val_clean_acc": max((e.get("holdout_clean_acc", 0.0) for e in epochs), default=None),
            "best_epoch": summary.get("best_epoch"), "stopped_early": summary.get("stopped_early"),
            "train_wall_s": time.perf_counter() - t0, "train_cpu_s": cpu_s, "compute_s": summary["compute_s"],
            "load_avg_1m": os.getloadavg()[0],
            "train_images": (args.train_limit or 60000 - args.holdout),
            "curve": [[e["epoch"] + 1, e.get("holdout_pgd_acc")] for e in epochs],
            "settings": {k: getattr(args, k) for k in ("backbone", "stem", "eps", "pgd_steps", "holdout", "micro",
                                                       "ranks", "train_limit")}}


def _beside(out: Path, suffix: str) -> Path:
    """A file next to the run folder ``out`` named after it (not ``with_suffix``: keys hold dots, lr0.5)."""
    return out.parent / (out.name + suffix)


def _updates(epochs: List[dict]) -> int:
    """Optimizer steps the run took (the last epoch's ``global_step``; ``summary.json`` reports the
    step of the validation-best weights it ends with)."""
    return max(e["global_step"] for e in epochs)


def _peak_lr(log: Path) -> Optional[float]:
    """The peak LR the run printed at start (``LR schedule: peak lr X ...``)."""
    found = re.search(r"LR schedule: peak lr ([0-9.eE+-]+)", log.read_text(errors="replace"))
    return float(found.group(1)) if found else None


def _relative(path: Path) -> str:
    """``path`` relative to the checkout when inside it (results files then hold no machine paths)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def evaluate(record: dict, args, port: int, autoattack_only: bool = False) -> dict:
    """PGD-10 on the test images and AutoAttack on the first ``--aa-limit``, validation-best weights
    (``autoattack_only``: AutoAttack alone, on the first ``--curve-aa-limit``)."""
    out = ROOT / record["output_dir"]
    best = out / "checkpoints" / "best"
    ckpt = str(best if best.is_dir() else out)
    common = ["recipes/evaluate.py", "--checkpoint", ckpt, "--eps-sweep", "--steps-sweep", "--batch-size", "250"]
    passes = [("pgd", ["--pgd-steps", "10", "--no-autoattack"] + _limit(args.test_limit))]
    # the curve's rows get AutoAttack from part curve-aa, once every PGD row is in
    if (record["run"]["phase"] != "curve" and args.aa_limit and record["run"]["seed"] < args.aa_seeds
            and (args.aa_all or headline(record, args))):
        passes.append(("autoattack", ["--pgd-steps", "1", "--autoattack", "--eval-limit", str(args.aa_limit)]))
    if autoattack_only:
        passes = [("autoattack", ["--pgd-steps", "1", "--autoattack", "--eval-limit", str(args.curve_aa_limit)])]
    result = {"eval_walls": dict(record.get("eval_walls", {})), "eval_cpu": dict(record.get("eval_cpu", {}))}
    for name, flags in passes:
        eval_dir = out / f"eval_{name}"
        log = _beside(out, f".eval_{name}.log")
        s = elsewhere(eval_dir, out, args) if autoattack_only else None
        if s is not None:  # the same command's output from another machine: its wall-clock says nothing here
            print(f"  AutoAttack of {record['key']} found in {_relative(eval_dir)}, evaluated on {s['device']}",
                  flush=True)
            result.update(autoattack_acc=s["autoattack"]["robust_acc"], autoattack_samples=s["eval_samples"],
                          autoattack_device=s["device"])
            continue
        t0 = time.perf_counter()
        code, cpu_s = launch(common + flags + ["--output-dir", str(eval_dir)], args, log, port)
        if code != 0:
            raise RuntimeError(f"{record['key']}: evaluation exit code {code}; see {log}")
        s = json.loads((eval_dir / "eval_summary.json").read_text())
        if record["run"]["ema"] and s.get("weights") != "ema":
            raise RuntimeError(f"{record['key']}: recipes/evaluate.py did not evaluate the EMA weights of this "
                               f"EMA run (its eval_summary.json has no \"weights\": \"ema\")")
        result["eval_walls"][name] = [time.perf_counter() - t0, s["eval_samples"]]
        result["eval_cpu"][name] = [cpu_s, s["eval_samples"]]
        if name == "pgd":
            result.update(clean_acc=s["clean_acc"], robust_acc=s["pgd"][0]["robust_acc"],
                          test_samples=s["eval_samples"])
        else:
            result.update(autoattack_acc=s["autoattack"]["robust_acc"], autoattack_samples=s["eval_samples"])
    result["eval_wall_s"] = sum(wall for wall, _ in result["eval_walls"].values())
    return result


def elsewhere(eval_dir: Path, out: Path, args) -> Optional[dict]:
    """The summary of part curve-aa's AutoAttack command run on another machine (a GPU, say) and
    copied into ``eval_dir``: used where it evaluated this run's validation-best weights on the first
    ``--curve-aa-limit`` test images with the study's settings, else None (the pass runs here)."""
    path = eval_dir / "eval_summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    aa = s.get("autoattack") or {}
    ckpt = Path(s.get("checkpoint", ""))
    if (s.get("device", "cpu") == "cpu" or Path(s.get("run_dir", "")).name != out.name or ckpt.parent.name != "best"
            or s.get("eval_samples") != args.curve_aa_limit or aa.get("version") != "standard"
            or aa.get("eps") != args.eps or s.get("batch_size") != 250):
        return None
    return s


def headline(record: dict, args) -> bool:
    """Whether a run belongs to the rows the goal is judged on: PGD training at AT's batch or the
    smallest DAT batch, no EMA, ``--epochs`` epochs (AutoAttack, the costly part, runs on these)."""
    run = record["run"]
    return (run["attack"] == "pgd" and not run["ema"] and not run.get("epochs")
            and run["method"]["scale"] in (1, min(args.scales)))


def _limit(n: Optional[int]) -> list:
    return ["--eval-limit", str(n)] if n else []


# --- the study's plan ------------------------------------------------------------------------

def load_record(key: str) -> Optional[dict]:
    path = RUNS / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def store(record: dict) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    tmp = RUNS / f".{record['key']}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, RUNS / f"{record['key']}.json")


def study_runs(args) -> List[Run]:
    return final_runs(args) + final_runs(args, "ema") + final_runs(args, "epochs")


def all_methods(args) -> List[Method]:
    return methods(args.scales, args.at_lamb)


def sweep_runs(args) -> List[Run]:
    return [Run(m, "pgd", 0, mult, "sweep") for m in all_methods(args)
            if m.scale in (1, min(args.scales)) for mult in grid(m, args)]


def grid(method: Method, args) -> Tuple[float, ...]:
    """The method's LR multipliers, widened by a factor of 2 past an end of the grid while the best
    stored run of the sweep sits on that end (at most ``--grid-extend`` times): a best LR on the edge
    of the grid has not been found."""
    mults = tuple(method.lr_grid)
    for _ in range(args.grid_extend if mults else 0):
        records = [load_record(Run(method, "pgd", 0, m, "sweep").key(args)) for m in mults]
        if any(r is None for r in records):
            break
        best = max(records, key=lambda r: (r["val_robust_acc"], r["val_clean_acc"]))["run"]["lr_mult"]
        if best == mults[-1]:
            mults = mults + (mults[-1] * 2,)
        elif best == mults[0]:
            mults = (mults[0] / 2,) + mults
        else:
            break
    return mults


def chosen_mult(method: Method, args) -> Optional[float]:
    """The sweep's best LR multiplier for ``method`` (by validation PGD accuracy), or None if unswept.

    The sweep runs at 8x for DAT; a DAT method at another scale takes its 8x choice; LSGD takes
    AT-SGD's.
    """
    if not method.lr_grid:
        return chosen_mult(all_methods(args)[0], args)
    swept = Method(method.name, method.optimizer, method.config, 1 if method.name == "AT" else min(args.scales),
                   method.lr_grid)
    records = [load_record(Run(swept, "pgd", 0, mult, "sweep").key(args)) for mult in grid(swept, args)]
    if any(r is None for r in records):
        return None
    best = max(records, key=lambda r: (r["val_robust_acc"], r["val_clean_acc"]))
    return best["run"]["lr_mult"]


def final_runs(args, phase: str = "final", choose=None) -> List[Run]:
    """Every final run whose method's LR is chosen; the sweep's seed-0 PGD run stands for its own.

    FGSM-RS runs cover AT and the batches in ``--fgsm-scales``.
    """
    runs, choose = [], choose or chosen_mult
    for m in all_methods(args):
        mult = choose(m, args)
        if mult is None:
            continue
        if phase == "ema":
            if (m.name, m.optimizer, m.scale) in (("AT", "SGD", 1), ("DAT", "LAMB", min(args.scales))):
                runs += [Run(m, "pgd", s, mult, "ema", ema=True) for s in range(args.seeds)]
            continue
        if phase == "epochs":
            if m.name == "DAT" and m.lr_grid and m.scale == min(args.scales):
                runs += [Run(m, "pgd", s, mult, "epochs", epochs=e) for e in args.more_epochs
                         for s in range(args.seeds)]
            continue
        for attack in args.attacks:
            if attack == "fgsm_rs" and m.scale not in (1, *args.fgsm_scales):
                continue
            for seed in range(args.seeds):
                swept = attack == "pgd" and seed == 0 and m.lr_grid and m.scale in (1, min(args.scales))
                runs.append(Run(m, attack, seed, mult, "sweep" if swept else "final"))
    return runs


def curve_methods(args) -> List[Method]:
    """The curve's methods: AT at AT's batch, DAT at the smallest DAT scale, in ``CURVE_METHODS`` order."""
    by = {f"{m.name}-{m.optimizer}": m for m in methods(args.scales, at_lamb=True)
          if m.scale in (1, min(args.scales))}
    return [by[name] for name in CURVE_METHODS if name in args.curve_methods]


def curve_runs(args) -> List[Run]:
    """Equal-epoch runs of the current code: every curve method at every ``--curve-epochs``, PGD
    training with the LR its sweep chose, ``--seeds`` seeds; longest runs first (the goal's rows),
    seed by seed. Trained and evaluated one after the other, so a stopped study leaves whole rows."""
    out = []
    for epochs in sorted(args.curve_epochs, reverse=True):
        for seed in range(args.seeds):
            for m in curve_methods(args):
                mult = chosen_mult(m, args)
                if mult is not None:
                    out.append(Run(m, "pgd", seed, mult, "curve", epochs=epochs))
    return out + beyond_runs(args)


def beyond_runs(args) -> List[Run]:
    """DAT-LAMB past the curve's longest epochs (``--dat-more-epochs``): where it reaches AT-SGD's RA
    at AT's longest run, which the time to robustness needs when the equal-epoch row falls short."""
    lamb = [m for m in curve_methods(args) if m.name == "DAT" and m.optimizer == "LAMB"]
    mult = chosen_mult(lamb[0], args) if lamb else None
    return [] if mult is None else [Run(lamb[0], "pgd", s, mult, "curve", epochs=e)
                                    for e in sorted(args.dat_more_epochs) for s in range(args.seeds)]


def conadv_runs(args) -> List[Run]:
    """ConAdv (1-step attack on one-update-old weights, clean + adversarial loss) at DAT's smallest
    scale with DAT-LAMB's LR, ``--conadv-epochs``, ``--seeds`` seeds: against the curve's DAT-LAMB
    rows of the same epochs."""
    lamb = next(m for m in methods(args.scales) if m.name == "DAT" and m.optimizer == "LAMB"
                and m.scale == min(args.scales))
    mult = chosen_mult(lamb, args)
    return [] if mult is None else [Run(lamb, "conadv", s, mult, "curve", epochs=args.conadv_epochs)
                                    for s in range(args.seeds)]


def curve_autoattack(args, deadline: float) -> None:
    """AutoAttack on the first ``--curve-aa-limit`` test images for the first ``--curve-aa-seeds`` seeds
    of the longest ``--curve-aa-methods`` curve rows (the goal's pair by default), once their PGD rows
    are evaluated; lower seeds first, so the pair of seed 0 is complete before seed 1 starts."""
    longest = max(args.curve_epochs)
    order = sorted(curve_runs(args), key=lambda r: r.seed)
    for i, run in enumerate(order):
        record = load_record(run.key(args))
        if (run.seed >= args.curve_aa_seeds or run.epochs != longest or run.label not in args.curve_aa_methods
                or record is None
                or "robust_acc" not in record or record.get("autoattack_samples") == args.curve_aa_limit):
            continue
        if time.time() > deadline:
            print(f"--max-minutes reached: stopping before AutoAttack on {run.key(args)}", flush=True)
            return
        print(f"autoattack {run.key(args)} ...", flush=True)
        record.update(evaluate(record, args, _port(i), autoattack_only=True))
        store(record)
        print(f"  AA {_pct(record['autoattack_acc'])} on {record['autoattack_samples']}", flush=True)
    for i, run in enumerate(order):  # PGD-50 x 5 restarts on the same images: a strong PGD beside AutoAttack
        record = load_record(run.key(args))
        if not record or not record.get("autoattack_samples") or record.get("pgd50_samples") == args.curve_aa_limit:
            continue
        if time.time() > deadline:
            print(f"--max-minutes reached: stopping before PGD-50 on {run.key(args)}", flush=True)
            return
        record.update(pgd_on_aa_images(record, args, _port(i)))
        store(record)
        print(f"  {run.key(args)}: PGD-10 {_pct(record['autoattack_pgd_acc'])}, PGD-50 x5 {_pct(record['pgd50_acc'])} "
              f"on AutoAttack's {record['pgd50_samples']} images", flush=True)


def _port(i: int) -> int:
    """A master port for the i-th launch of this process (another study process picks others)."""
    return 29500 + (os.getpid() + i) % 400


def pgd_on_aa_images(record: dict, args, port: int) -> dict:
    """The AutoAttack images' per-sample outcomes, and PGD-10 and PGD-50 x 5 on the same images."""
    return {**aa_samples(record), **strong_pgd(record, args, port)}


def strong_pgd(record: dict, args, port: int, split: str = "test") -> dict:
    """PGD-10 and PGD-50 with 5 restarts by ``recipes/evaluate.py`` (a summary of the same command
    already in its folder is read instead). ``test``: on AutoAttack's images (is AutoAttack's extra
    bite a stronger optimizer's, or something PGD cannot find?); ``holdout``: on every held-out
    training image (``val_*`` keys), the strong attack that picks between runs without the test set."""
    out = ROOT / record["output_dir"]
    test = split == "test"
    eval_dir, n = out / ("eval_pgd50" if test else "eval_val_pgd50"), args.curve_aa_limit if test else None
    summary = eval_dir / "eval_summary.json"
    s = json.loads(summary.read_text()) if summary.is_file() else {}
    if not ((s.get("eval_samples") == n or not test) and s.get("split", "test") == split
            and Path(s.get("run_dir", "")).name == out.name
            and [(c["steps"], c["restarts"]) for c in s.get("pgd", [])] == [(10, 1), (50, 5)]):
        best = out / "checkpoints" / "best"
        log = _beside(out, f".{eval_dir.name}.log")
        code, _ = launch(["recipes/evaluate.py", "--checkpoint", str(best if best.is_dir() else out), "--split", split,
                          *(["--eval-limit", str(n)] if n else []), "--batch-size", "250", "--pgd-steps", "10", "50",
                          "--restarts", "1", "5", "--eps-sweep", "--steps-sweep", "--no-autoattack",
                          "--output-dir", str(eval_dir)], args, log, port)
        if code != 0:
            raise RuntimeError(f"{record['key']}: PGD-50 evaluation ({split}) exit code {code}; see {log}")
        s = json.loads(summary.read_text())
    if not test:
        return {"val_pgd10_acc": s["pgd"][0]["robust_acc"], "val_pgd50_acc": s["pgd"][1]["robust_acc"],
                "val_pgd50_samples": s["eval_samples"]}
    return {"pgd50_acc": s["pgd"][1]["robust_acc"], "pgd50_samples": s["eval_samples"],
            "pgd50_per_sample": per_sample(eval_dir, "pgd50x5")[1]}


def aa_samples(record: dict) -> dict:
    """PGD-10's accuracy on AutoAttack's images (the first ``autoattack_samples`` test images, read from
    both evaluations' ``per_sample.csv``) and AutoAttack's per-image outcomes as a string of 0/1: the
    two attacks compared on the same images, and two models compared image by image."""
    out = ROOT / record["output_dir"]
    n = record["autoattack_samples"]
    pgd_images, pgd = per_sample(out / "eval_pgd", "pgd10", n)
    aa_images, aa = per_sample(out / "eval_autoattack", "autoattack")
    if pgd_images != aa_images:
        raise RuntimeError(f"{record['key']}: the PGD and AutoAttack evaluations read different images")
    return {"autoattack_pgd_acc": pgd.count("1") / n, "autoattack_per_sample": aa}


def per_sample(folder: Path, prefix: str, n: Optional[int] = None) -> Tuple[List[str], str]:
    """The image indices and the 0/1 outcomes (a string) of the first column named ``prefix...`` in
    ``folder/per_sample.csv``, as ``recipes/evaluate.py`` writes it; its first ``n`` rows, or all."""
    with open(folder / "per_sample.csv") as f:
        rows = list(itertools.islice(csv.DictReader(f), n))
    column = next(c for c in rows[0] if c.startswith(prefix))
    return [r["index"] for r in rows], "".join(r[column] for r in rows)


def mcnemar(a: str, b: str) -> Tuple[int, int, float]:
    """Images only ``a`` survives, images only ``b`` survives, and the exact two-sided McNemar p-value
    (a binomial test on the discordant images) for two models' per-image outcomes under one attack."""
    from scipy.stats import binomtest
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    return only_a, only_b, binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0


def remedy_runs(args) -> List[Run]:
    """DAT-LAMB at the smallest DAT scale with each of ``--remedies``, at the curve's longest epochs,
    ``--remedy-seeds`` seeds: each against the curve's plain DAT-LAMB run on the validation split."""
    lamb = next(m for m in methods(args.scales) if m.name == "DAT" and m.optimizer == "LAMB"
                and m.scale == min(args.scales))
    mult = chosen_mult(lamb, args)
    return [] if mult is None else [
        Run(lamb, "pgd", s, mult, "remedy", epochs=max(args.curve_epochs), remedy=name)
        for s in range(args.remedy_seeds) for name in args.remedies]


def pilot_runs(args) -> List[Run]:
    at, dat = methods(args.scales)[0], methods(args.scales)[1]
    return [Run(at, "pgd", 0, 1.0, "pilot"), Run(dat, "pgd", 0, 1.0, "pilot")]


def execute(runs: List[Run], args, deadline: float, evaluate_too: bool) -> None:
    """Train (and evaluate) every run not stored yet, until ``deadline``."""
    for i, run in enumerate(runs):
        key = run.key(args)
        record = load_record(key)
        if record is not None and (not evaluate_too or "robust_acc" in record):
            continue
        if time.time() > deadline:
            print(f"--max-minutes reached: stopping before {key}; run again to continue", flush=True)
            return
        port = _port(i)
        if record is None:
            print(f"train {key} ...", flush=True)
            record = train(run, args, port)
            store(record)
            print(f"  val RA {_pct(record['val_robust_acc'])}, {record['updates']} updates, "
                  f"{record['train_wall_s']:.0f} s", flush=True)
        if evaluate_too and "robust_acc" not in record:
            if time.time() > deadline:
                print(f"--max-minutes reached: {key} trained, not evaluated yet", flush=True)
                return
            print(f"evaluate {key} ...", flush=True)
            record.update(evaluate(record, args, port))
            store(record)
            print(f"  TA {_pct(record['clean_acc'])}, RA {_pct(record['robust_acc'])}, "
                  f"AA {_pct(record.get('autoattack_acc'))}, {record['eval_wall_s']:.0f} s", flush=True)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


# --- the table -------------------------------------------------------------------------------

def rows(args) -> List[dict]:
    """One row per (attack, method, optimizer, batch, EMA) over its evaluated seeds."""
    groups: Dict[tuple, list] = {}
    for run in study_runs(args):
        rec = load_record(run.key(args))
        if rec is not None and "robust_acc" in rec:
            m = run.method
            groups.setdefault((run.attack, m.name, m.optimizer, m.scale, run.ema, run.epochs or args.epochs),
                              []).append(rec)
    out = []
    for (attack, name, opt, scale, ema, epochs), recs in sorted(
            groups.items(), key=lambda g: (g[0][0] != "pgd", g[0][5], g[0][3], g[0][1:3], g[0][4])):
        ra = [r["robust_acc"] for r in recs]
        aa = [r["autoattack_acc"] for r in recs if r.get("autoattack_acc") is not None]
        out.append({"method": f"{name}-{ATTACK_LABEL[attack]}" + (" + EMA" if ema else ""), "attack": attack,
                    "optimizer": opt, "global_batch_size": recs[0]["global_batch_size"], "ema": ema,
                    "seeds": len(recs), "lr_mult": recs[0]["run"]["lr_mult"], "peak_lr": recs[0]["peak_lr"],
                    "clean_acc_mean": statistics.fmean(r["clean_acc"] for r in recs),
                    "robust_acc_mean": statistics.fmean(ra),
                    "robust_acc_std": statistics.stdev(ra) if len(ra) > 1 else None,
                    "autoattack_acc_mean": statistics.fmean(aa) if aa else None, "autoattack_seeds": len(aa),
                    "autoattack_samples": max((r.get("autoattack_samples", 0) for r in recs), default=0) or None,
                    "test_samples": recs[0]["test_samples"],
                    "updates": recs[0]["updates"], "epochs": epochs, "phase": recs[0]["run"]["phase"],
                    "wall_s": statistics.fmean(r["train_wall_s"] + r.get("eval_wall_s", 0) for r in recs)})
    return out


def sweep_table(args) -> List[dict]:
    out = []
    for run in sweep_runs(args):
        rec = load_record(run.key(args))
        if rec is not None:
            out.append({"method": run.label, "global_batch_size": rec["global_batch_size"],
                        "lr_mult": run.lr_mult, "peak_lr": rec["peak_lr"], "val_robust_acc": rec["val_robust_acc"],
                        "val_clean_acc": rec["val_clean_acc"], "updates": rec["updates"],
                        "wall_s": rec["train_wall_s"]})
    return out


def notes(table: List[dict], args) -> List[str]:
    """The issue's goal checked on the rows: DAT-LAMB at 8x within 2 points of AT, and the gap w/o LALR."""
    out = []
    for attack in args.attacks:
        by = {(r["method"], r["optimizer"], r["global_batch_size"]): r for r in table
              if r["attack"] == attack and r["epochs"] == args.epochs}
        label = ATTACK_LABEL[attack]
        at = by.get((f"AT-{label}", "SGD", args.at_batch))
        big = min(args.scales) * args.at_batch
        lamb, sgd = by.get((f"DAT-{label}", "LAMB", big)), by.get((f"DAT-{label}", "SGD", big))
        if not (at and lamb):
            out.append(f"{label}: AT and DAT-LAMB at {big} are not both evaluated yet")
            continue
        gap = 100 * (lamb["robust_acc_mean"] - at["robust_acc_mean"])
        verdict = "met" if gap >= -2 else "not met"
        line = (f"{label}: RA AT {100 * at['robust_acc_mean']:.1f} % vs DAT-LAMB at {big} "
                f"{100 * lamb['robust_acc_mean']:.1f} % ({gap:+.1f} points, goal within 2: {verdict})")
        if sgd:
            line += (f"; DAT w/o LALR {100 * sgd['robust_acc_mean']:.1f} % "
                     f"({100 * (sgd['robust_acc_mean'] - lamb['robust_acc_mean']):+.1f} points vs LAMB)")
        out.append(line + f"; {lamb['updates']} updates against AT's {at['updates']}")
    at_sgd = all_methods(args)[0]
    at_mult = chosen_mult(at_sgd, args)
    dat = {m.optimizer: m for m in all_methods(args) if m.name == "DAT" and m.scale == min(args.scales)}
    if at_mult is not None and "SGD" in dat and "LAMB" in dat and chosen_mult(dat["LAMB"], args) is not None:
        same = load_record(Run(dat["SGD"], "pgd", 0, at_mult, "sweep").key(args))
        lamb = load_record(Run(dat["LAMB"], "pgd", 0, chosen_mult(dat["LAMB"], args), "sweep").key(args))
        if same and lamb:
            out.append(f"DAT w/o LALR at AT's LR (peak {same['peak_lr']:g}, the paper's setting: no LR change "
                       f"with the batch): validation RA {100 * same['val_robust_acc']:.1f} % against DAT-LAMB's "
                       f"{100 * lamb['val_robust_acc']:.1f} % (seed 0, sweep); with its LR tuned for the large "
                       f"batch, see the SGD row")
    for r in table:
        if r["epochs"] != args.epochs:
            out.append(f"{r['method']} {r['optimizer']} at {r['global_batch_size']} with {r['epochs']} epochs "
                       f"instead of {args.epochs}: RA {100 * r['robust_acc_mean']:.1f} %, TA "
                       f"{100 * r['clean_acc_mean']:.1f} % ({r['updates']} updates)")
    return out


# --- the equal-epoch curve and time to robustness ---------------------------------------------

def curve_rows(args) -> List[dict]:
    """One row per (attack, method, optimizer, epochs) of the curve and ConAdv runs, over their seeds."""
    groups: Dict[tuple, list] = {}
    for rec in stored("curve"):  # every stored run of the phase, whatever this call's flags plan
        run, m = rec["run"], rec["run"]["method"]
        if "robust_acc" in rec:
            groups.setdefault((run["attack"], m["name"], m["optimizer"], m["scale"], run["epochs"]), []).append(rec)
    out = []
    for (attack, name, opt, scale, epochs), recs in sorted(
            groups.items(), key=lambda g: (g[0][4], g[0][0] != "pgd", g[0][3], CURVE_METHODS.index(
                f"{g[0][1]}-{g[0][2]}") if f"{g[0][1]}-{g[0][2]}" in CURVE_METHODS else 9)):
        ra, ta = [r["robust_acc"] for r in recs], [r["clean_acc"] for r in recs]
        aa = sorted((r for r in recs if r.get("autoattack_acc") is not None), key=lambda r: r["run"]["seed"])
        out.append({"method": f"{name}-{LABELS[attack]}", "attack": attack, "optimizer": opt,
                    "global_batch_size": recs[0]["global_batch_size"], "epochs": epochs, "seeds": len(recs),
                    "updates": recs[0]["updates"], "lr_mult": recs[0]["run"]["lr_mult"], "peak_lr": recs[0]["peak_lr"],
                    "clean_acc_mean": statistics.fmean(ta), "clean_acc_std": _std(ta),
                    "robust_acc_mean": statistics.fmean(ra), "robust_acc_std": _std(ra),
                    "robust_acc_seeds": ra,
                    # AutoAttack: the mean over the seeds it ran on, and each seed's per-image outcomes
                    "autoattack_acc": statistics.fmean(r["autoattack_acc"] for r in aa) if aa else None,
                    "autoattack_seeds": ", ".join(str(r["run"]["seed"]) for r in aa) or None,
                    "autoattack_samples": aa[0]["autoattack_samples"] if aa else None,
                    "autoattack_device": ", ".join(dict.fromkeys(r.get("autoattack_device", "cpu") for r in aa))
                    or None,
                    "autoattack_pgd_acc": statistics.fmean(r["autoattack_pgd_acc"] for r in aa)
                    if aa and all("autoattack_pgd_acc" in r for r in aa) else None,
                    "autoattack_pgd50_acc": statistics.fmean(r["pgd50_acc"] for r in aa)
                    if aa and all("pgd50_acc" in r for r in aa) else None,
                    "autoattack_by_seed": {str(r["run"]["seed"]): {
                        "acc": r["autoattack_acc"], "pgd_acc": r.get("autoattack_pgd_acc"),
                        "pgd50_acc": r.get("pgd50_acc"), "per_sample": r.get("autoattack_per_sample")}
                        for r in aa},
                    "test_samples": recs[0]["test_samples"],
                    "compute_s_per_image": statistics.fmean(_per_image(r, args) for r in recs),
                    "compute_s_per_image_min": min(_per_image(r, args) for r in recs),
                    "wall_s": statistics.fmean(r["train_wall_s"] + r.get("eval_wall_s", 0) for r in recs)})
    return out


def plain_run(run: Run) -> Run:
    """The curve's plain DAT-LAMB run a remedy run is judged against: same seed, LR and epochs."""
    return Run(run.method, "pgd", run.seed, run.lr_mult, "curve", epochs=run.epochs)


def judge_remedies(args, deadline: float) -> None:
    """The validation judge, then the test figures of what it picks. PGD-10 flatters large-batch
    LAMB (the curve's AutoAttack rows), so each remedy run and its plain run are compared under
    PGD-50 with 5 restarts on every held-out training image; a remedy that beats its plain run there
    gets AutoAttack and PGD-50 x 5 on the curve's AutoAttack images, beside the plain run's."""
    for i, run in enumerate(remedy_runs(args)):
        for key in (plain_run(run).key(args), run.key(args)):
            record = load_record(key)
            if record is None or "robust_acc" not in record or "val_pgd50_acc" in record:
                continue
            if time.time() > deadline:
                print(f"--max-minutes reached: stopping before the held-out PGD-50 of {key}", flush=True)
                return
            record.update(strong_pgd(record, args, _port(i), "holdout"))
            store(record)
            print(f"  {key}: held-out PGD-50 x5 {_pct(record['val_pgd50_acc'])}", flush=True)
    for i, run in enumerate(remedy_runs(args)):
        record, plain = load_record(run.key(args)), load_record(plain_run(run).key(args))
        if not (record and plain and "val_pgd50_acc" in record and "val_pgd50_acc" in plain
                and record["val_pgd50_acc"] > plain["val_pgd50_acc"]):
            continue
        for rec in (plain, record):
            if rec.get("autoattack_samples") == args.curve_aa_limit and rec.get("pgd50_samples") == args.curve_aa_limit:
                continue
            if time.time() > deadline:
                print(f"--max-minutes reached: stopping before AutoAttack on {rec['key']}", flush=True)
                return
            port = _port(i)
            if rec.get("autoattack_samples") != args.curve_aa_limit:
                rec.update(evaluate(rec, args, port, autoattack_only=True))
            rec.update(pgd_on_aa_images(rec, args, port))
            store(rec)
            print(f"  {rec['key']}: AA {_pct(rec['autoattack_acc'])}, PGD-50 x5 {_pct(rec['pgd50_acc'])} on "
                  f"{rec['autoattack_samples']} test images", flush=True)


def _held_out_outcomes(record: dict) -> Optional[str]:
    """The held-out PGD-50 x 5 outcomes (0/1 per image) of a run, where ``judge_remedies`` wrote them."""
    folder = ROOT / record["output_dir"] / "eval_val_pgd50" if record.get("output_dir") else None
    return per_sample(folder, "pgd50x5")[1] if folder and (folder / "per_sample.csv").is_file() else None


def remedy_rows(args) -> List[dict]:
    """Each remedy's runs beside the plain DAT-LAMB curve run of the same seed and epochs: the held-out
    PGD-50 x 5 decides (``wins``; PGD-10 on the held-out images where that was not run), the test
    figures are reported, with AutoAttack where the remedy won."""
    out = []
    for run in remedy_runs(args):
        rec = load_record(run.key(args))
        plain = load_record(plain_run(run).key(args)) or {}
        if rec is None or "robust_acc" not in rec:
            continue
        judge = "val_pgd50_acc" if "val_pgd50_acc" in rec and "val_pgd50_acc" in plain else "val_robust_acc"
        r = REMEDIES[run.remedy]
        row = {"remedy": run.remedy, "what": r.what, "reference": r.reference, "seed": run.seed,
               "epochs": run.epochs, "global_batch_size": rec["global_batch_size"],
               "val_robust_acc": rec["val_robust_acc"], "plain_val_robust_acc": plain.get("val_robust_acc"),
               "val_pgd50_acc": rec.get("val_pgd50_acc"), "plain_val_pgd50_acc": plain.get("val_pgd50_acc"),
               "judged_by": "held-out PGD-50 x5" if judge == "val_pgd50_acc" else "held-out PGD-10",
               "clean_acc": rec["clean_acc"], "plain_clean_acc": plain.get("clean_acc"),
               "robust_acc": rec["robust_acc"], "plain_robust_acc": plain.get("robust_acc"),
               "autoattack_acc": rec.get("autoattack_acc"), "plain_autoattack_acc": plain.get("autoattack_acc"),
               "pgd50_acc": rec.get("pgd50_acc"), "plain_pgd50_acc": plain.get("pgd50_acc"),
               # CPU seconds of the training processes: what a remedy costs, less moved by other work than wall time
               "cpu_vs_plain": rec["train_cpu_s"] / plain["train_cpu_s"] if plain.get("train_cpu_s") else None,
               "wins": bool(plain.get(judge) is not None and rec[judge] > plain[judge])}
        val, plain_val = _held_out_outcomes(rec), _held_out_outcomes(plain)
        if val and plain_val and len(val) == len(plain_val):  # the two runs image by image on the held-out set
            only_remedy, only_plain, p_value = mcnemar(val, plain_val)
            row.update(val_only_remedy=only_remedy, val_only_plain=only_plain, val_mcnemar_p=p_value)
        if rec.get("autoattack_per_sample") and plain.get("autoattack_per_sample"):
            only_remedy, only_plain, p_value = mcnemar(rec["autoattack_per_sample"], plain["autoattack_per_sample"])
            row.update(autoattack_only_remedy=only_remedy, autoattack_only_plain=only_plain,
                       autoattack_mcnemar_p=p_value)
        out.append(row)
    return out


def remedy_notes(remedies: List[dict]) -> List[str]:
    """Each remedy over its seeds: how often it beat its plain run on the held-out judge, by how much,
    and its AutoAttack change on the test images where it won."""
    out = []
    for name in dict.fromkeys(r["remedy"] for r in remedies):
        runs = [r for r in remedies if r["remedy"] == name]
        judged = [r for r in runs if r["val_pgd50_acc"] is not None and r["plain_val_pgd50_acc"] is not None]
        wins = sum(r["wins"] for r in runs)
        line = f"{name}: beat its plain run on the held-out PGD-50 x5 in {wins} of {len(runs)} seed(s)"
        if judged:
            line += ", " + ", ".join(f"{100 * (r['val_pgd50_acc'] - r['plain_val_pgd50_acc']):+.1f}" for r in judged)
            line += " points"
        aa = [r for r in runs if r["autoattack_acc"] is not None and r["plain_autoattack_acc"] is not None]
        if aa:
            line += "; under AutoAttack on the test images " + ", ".join(
                f"{100 * (r['autoattack_acc'] - r['plain_autoattack_acc']):+.1f}" for r in aa) + " points"
        cpu = [r["cpu_vs_plain"] for r in runs if r.get("cpu_vs_plain")]
        if cpu:
            line += f"; training CPU seconds {statistics.fmean(cpu):.2f}x the plain run's"
        out.append(line)
    return out


def stored(phase: str) -> List[dict]:
    """The stored records of one phase's runs."""
    return [json.loads(p.read_text()) for p in sorted(RUNS.glob(f"{phase}-*.json"))] if RUNS.is_dir() else []


def _std(values: List[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) > 1 else None


def _per_image(rec: dict, args) -> float:
    """Training compute seconds per image on one rank (PGD-3 attack and update, exchange left out):
    the run's per-rank compute time over the images each rank trained on."""
    return rec["compute_s"] / (rec["updates"] * rec["global_batch_size"] / args.ranks)


def link_rate(args) -> Tuple[float, str]:
    """Bits per second an all-reduce moved across the 1 Gbit/s link of ``bench/link_bench.py`` (its
    probe), or the nominal rate where the link benchmark has not run."""
    path = RESULTS / "link.json"
    if path.is_file():
        probe = json.loads(path.read_text()).get("probe", {})
        if probe.get("all_reduce_gbit_s"):
            return probe["all_reduce_gbit_s"] * 1e9, "measured: bench/link_bench.py's all_reduce across 2 nodes"
    return 1e9, "nominal 1 Gbit/s (bench/link_bench.py has not measured the link)"


def byte_ratios() -> Dict[str, float]:
    """Bytes each compressor sends per rank as a share of the fp32 all-reduce's, as
    ``bench/link_bench.py`` measured them over its 1 Gbit/s link (empty where it has not run)."""
    path = RESULTS / "link.json"
    rows = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
    sent = {r["compressor"]: r["MB/rank/epoch"] for r in rows
            if r.get("link") == "1 Gbit/s" and str(r.get("scenario", "")).startswith("dat")}
    fp32 = sent.pop("fp32 all-reduce", None)
    return {name: mb / fp32 for name, mb in sent.items()} if fp32 else {}


def hardware(curve: List[dict], args) -> List[dict]:
    """Per-rank training cost per image and the model's parameters, for each machine the time model
    covers: this machine (the curve's own runs) and, where ``bench/gpu_check.py`` measured it, one
    H200 (its PGD-3 step of preactresnet18 at 32 px, bf16)."""
    out = []
    by_batch: Dict[int, float] = {}  # the least-loaded run of each batch: other work on the cores only slows a run
    for r in curve:
        if r["attack"] == "pgd":
            cost = r.get("compute_s_per_image_min", r["compute_s_per_image"])
            by_batch[r["global_batch_size"]] = min(cost, by_batch.get(r["global_batch_size"], math.inf))
    if by_batch:
        out.append({"name": "this machine (1 core per rank)", "model": args.backbone,
                    "s_per_image": by_batch.get(args.at_batch, min(by_batch.values())),
                    "s_per_image_by_batch": by_batch, "params": _params(args),
                    "source": "the curve's runs: per-rank compute seconds per training image (PGD-3), the fastest "
                              "run of each global batch"})
    gpu = RESULTS / "gpu.json"
    if gpu.is_file():
        for m in json.loads(gpu.read_text()).get("sections", {}).get("throughput", {}).get("models", []):
            step = next((x for x in m.get("methods", []) if x.get("method") == f"pgd-{args.pgd_steps}"), None)
            if m.get("model") == "preactresnet18" and step:
                out.append({"name": "one H200 per rank", "model": f"{m['model']} ({m['img_size']} px, "
                            f"{m.get('dtype', '')})", "s_per_image": step["seconds"] / m["batch"],
                            "params": int(m["params_m"] * 1e6),
                            "source": f"bench/results/gpu.json: PGD-{args.pgd_steps} step at batch {m['batch']}"})
    return out


def _params(args) -> int:
    import torch  # noqa: F401  (the backbone needs it)
    sys.path.insert(0, str(ROOT))
    from dat_ds.models import create_model
    model = create_model(args.backbone, 10, in_chans=1, img_size=28, stem=args.stem)
    return sum(p.numel() for p in model.parameters())


def time_to_robustness(curve: List[dict], args) -> dict:
    """Wall-clock to reach each AT row's PGD-10 RA (AT-SGD's, and AT-LAMB's where it ran) at each of
    its epoch counts: that AT on one rank against DAT on ``--ttr-ranks`` ranks, from measured parts
    (see ``notes``)."""
    rate, rate_source = link_rate(args)
    world, images = args.ttr_ranks, 60000 - args.holdout
    pgd = [r for r in curve if r["attack"] == "pgd"]
    at_rows = sorted((r for r in pgd if r["method"] == "AT-PGD"), key=lambda r: (r["optimizer"] != "SGD",
                                                                                  r["optimizer"], r["epochs"]))
    # a target is an AT row's RA that no shorter run of the same AT reached (else that run's time is AT's)
    targets = [t for t in at_rows if not any(r["optimizer"] == t["optimizer"] and r["epochs"] < t["epochs"]
                                             and r["robust_acc_mean"] >= t["robust_acc_mean"] for r in at_rows)]
    hw = hardware(curve, args)

    def seconds(row: dict, h: dict) -> Tuple[int, float, float]:
        """Ranks, seconds and the exchange's share of a step for training ``row`` on machines ``h``:
        AT's batch on one rank (no exchange), a DAT batch over ``world`` ranks; whole batches."""
        batch = row["global_batch_size"]
        ranks = 1 if batch == args.at_batch else world
        exchange = 0.0 if ranks == 1 else 2 * (ranks - 1) / ranks * 4 * h["params"] * 8 / rate
        step = batch / ranks * h.get("s_per_image_by_batch", {}).get(batch, h["s_per_image"]) + exchange
        return ranks, row["epochs"] * (images // batch) * step, exchange / step

    for row in pgd:  # every curve row's modelled time (the plot's second panel)
        row["modelled_hours"] = {_hw_key(h): seconds(row, h)[1] / 3600 for h in hw}
        row["modelled_ranks"] = seconds(row, hw[0])[0] if hw else None
    table = []
    for target in targets:
        for r_label in dict.fromkeys((r["method"], r["optimizer"]) for r in pgd):
            rows = sorted((r for r in pgd if (r["method"], r["optimizer"]) == r_label), key=lambda r: r["epochs"])
            reach = next((r for r in rows if r["robust_acc_mean"] >= target["robust_acc_mean"]), None)
            entry = {"target": f"AT-{target['optimizer']}, {target['epochs']} epochs",
                     "target_epochs": target["epochs"], "target_ra": target["robust_acc_mean"],
                     "method": f"{r_label[0].split('-')[0]}-{r_label[1]}",
                     "global_batch_size": rows[0]["global_batch_size"],
                     "epochs_tried": [r["epochs"] for r in rows],
                     "epochs": reach["epochs"] if reach else None, "ra": reach["robust_acc_mean"] if reach else None}
            for h in hw:
                key = _hw_key(h)
                if reach is None:
                    entry[f"{key}_hours"] = entry[f"{key}_speedup"] = None
                    continue
                ranks, secs, share = seconds(reach, h)
                _, at_secs, _ = seconds(target, h)
                entry.update({f"{key}_ranks": ranks, f"{key}_hours": secs / 3600, f"{key}_speedup": at_secs / secs,
                              f"{key}_exchange_share": share})
            if reach is not None and entry.get("h200_exchange_share"):  # what a compressor would leave
                h = next(h for h in hw if _hw_key(h) == "h200")
                _, at_secs, _ = seconds(target, h)
                ranks, secs, share = seconds(reach, h)
                exchange = secs * share
                entry["h200_speedup_compressed"] = {name: at_secs / (secs - exchange * (1 - ratio))
                                                    for name, ratio in byte_ratios().items()}
            table.append(entry)
    return {"ranks": world, "link_bits_per_s": rate, "link_source": rate_source, "hardware": hw, "rows": table}


def _hw_key(h: dict) -> str:
    return "this" if h["name"].startswith("this") else "h200"


def curve_notes(curve: List[dict], ttr: dict, args) -> List[str]:
    """The goal checked on the curve: DAT-LAMB at 8x within 2 points of AT-SGD at equal epochs once
    it has ~600 updates, and time to AT's RA on 8 ranks at most a third of AT's on one; ConAdv's TA."""
    out = []
    pgd = {(r["method"], r["optimizer"], r["epochs"]): r for r in curve if r["attack"] == "pgd"}
    for e in sorted({r["epochs"] for r in curve}):
        at, lamb = pgd.get(("AT-PGD", "SGD", e)), pgd.get(("DAT-PGD", "LAMB", e))
        if at and lamb:
            gap = 100 * (lamb["robust_acc_mean"] - at["robust_acc_mean"])
            enough = lamb["updates"] >= 600
            out.append(f"{e} epochs: DAT-LAMB at {lamb['global_batch_size']} RA {100 * lamb['robust_acc_mean']:.1f} % "
                       f"vs AT-SGD {100 * at['robust_acc_mean']:.1f} % ({gap:+.1f} points, {lamb['updates']} updates "
                       f"against {at['updates']}); goal within 2 points "
                       + (("met" if gap >= -2 else "not met") if enough else "not judged (fewer than 600 updates)"))
        for opt in ("LAMB", "SGD"):  # each DAT row that AutoAttack evaluated, against AT-SGD
            dat = pgd.get(("DAT-PGD", opt, e))
            if at and dat:
                out += autoattack_notes(e, at, dat, f"DAT-{opt}")
        at_lamb = pgd.get(("AT-PGD", "LAMB", e))
        if at and at_lamb and lamb:  # the same optimizer at both batches: what the 8x batch alone costs
            out.append(f"{e} epochs, LAMB at both batches: DAT-LAMB at {lamb['global_batch_size']} RA "
                       f"{100 * lamb['robust_acc_mean']:.1f} % vs AT-LAMB at {at_lamb['global_batch_size']} "
                       f"{100 * at_lamb['robust_acc_mean']:.1f} % "
                       f"({100 * (lamb['robust_acc_mean'] - at_lamb['robust_acc_mean']):+.1f} points; AT-LAMB "
                       f"{100 * (at_lamb['robust_acc_mean'] - at['robust_acc_mean']):+.1f} against AT-SGD)")
            out += autoattack_notes(e, at_lamb, lamb, "DAT-LAMB", "AT-LAMB")
    for r in curve:
        if r["attack"] == "conadv":
            ref = pgd.get(("DAT-PGD", "LAMB", r["epochs"]))
            if ref:
                out.append(f"ConAdv at {r['global_batch_size']}, {r['epochs']} epochs: "
                           f"TA {100 * r['clean_acc_mean']:.1f} % "
                           f"(DAT-PGD {100 * ref['clean_acc_mean']:.1f} %), RA {100 * r['robust_acc_mean']:.1f} % "
                           f"(DAT-PGD {100 * ref['robust_acc_mean']:.1f} %), {r['seeds']} seeds")
    for row in ttr["rows"]:
        if row["method"] != "DAT-LAMB":
            continue
        at_name = row["target"].split(",")[0]
        target = f"time to {at_name}'s {row['target_epochs']}-epoch RA ({100 * row['target_ra']:.1f} %)"
        if row.get("this_speedup"):
            out.append(f"{target}: DAT-LAMB on {ttr['ranks']} ranks gets there in {row['epochs']} epochs, "
                       f"{row['this_speedup']:.2f}x faster than {at_name} on one rank on this machine's cores"
                       + (f" ({row['h200_speedup']:.2f}x on H200s, where the exchange over the link is "
                          f"{100 * row['h200_exchange_share']:.0f} % of a step)" if row.get("h200_speedup") else "")
                       + f"; goal at least 3x on this machine: {'met' if row['this_speedup'] >= 3 else 'not met'}")
            if row.get("h200_speedup_compressed"):
                out.append(f"{target} on H200s with a compressor (its bytes as measured by bench/link_bench.py, "
                           f"the exchange time scaled by them; the curve trained uncompressed): " + ", ".join(
                               f"{name} {x:.2f}x" for name, x in row["h200_speedup_compressed"].items()))
        else:
            out.append(f"{target}: DAT-LAMB does not reach it within {max(row['epochs_tried'])} epochs")
    return out


def autoattack_notes(epochs: int, at: dict, dat: dict, name: str = "DAT-LAMB", at_name: str = "AT-SGD") -> List[str]:
    """An AT row (``at_name``) and a DAT row (``name``) at ``epochs`` under AutoAttack, seed by seed where both have it
    (the same images, PGD-10 and PGD-50 x 5 on them beside it, an exact McNemar test image by
    image), then the seeds' mean."""
    out, gaps = [], []
    for seed in sorted(set(at.get("autoattack_by_seed", {})) & set(dat.get("autoattack_by_seed", {})), key=int):
        a, d = at["autoattack_by_seed"][seed], dat["autoattack_by_seed"][seed]
        if not (a.get("per_sample") and d.get("per_sample") and a.get("pgd_acc") is not None
                and d.get("pgd_acc") is not None):
            continue
        only_at, only_dat, p = mcnemar(a["per_sample"], d["per_sample"])
        gaps.append(100 * (d["acc"] - a["acc"]))
        out.append(f"{epochs} epochs under AutoAttack, seed {seed}, the first {at['autoattack_samples']} test "
                   f"images: {name} {100 * d['acc']:.1f} % vs {at_name} {100 * a['acc']:.1f} % ({gaps[-1]:+.1f} "
                   f"points; PGD-10 on the same images {100 * d['pgd_acc']:.1f} % vs {100 * a['pgd_acc']:.1f} %, "
                   f"{100 * (d['pgd_acc'] - a['pgd_acc']):+.1f}); AutoAttack takes "
                   f"{100 * (d['pgd_acc'] - d['acc']):.1f} points off {name}'s PGD-10 RA and "
                   f"{100 * (a['pgd_acc'] - a['acc']):.1f} off AT's; {only_at} images only AT survives, "
                   f"{only_dat} only {name}, exact McNemar p = {p:.1g}"
                   + (f"; PGD-50 x 5 restarts between them: {name} {100 * d['pgd50_acc']:.1f} % vs {at_name} "
                      f"{100 * a['pgd50_acc']:.1f} % ({100 * (d['pgd50_acc'] - a['pgd50_acc']):+.1f})"
                      if d.get("pgd50_acc") is not None and a.get("pgd50_acc") is not None else ""))
    if gaps:
        mean = statistics.fmean(gaps)
        out.append(f"{epochs} epochs under AutoAttack, {name} vs {at_name}, mean over {len(gaps)} seed(s): "
                   f"{mean:+.1f} points; "
                   f"within 2 points under AutoAttack: {'yes' if mean >= -2 else 'no'}")
    return out


def write_table(args) -> Path:
    table = rows(args)
    curve = curve_rows(args)
    ttr = time_to_robustness(curve, args)
    remedies = remedy_rows(args)
    payload = {"title": "Large-batch DAT vs small-batch AT, full Fashion-MNIST (Table 1 / Figure 2)",
               "machine": machine(), "settings": settings(args), "rows": table, "sweep": sweep_table(args),
               "curve": curve, "time_to_robustness": ttr, "curve_notes": curve_notes(curve, ttr, args),
               "remedies": remedies, "remedy_notes": remedy_notes(remedies),
               "notes": notes(table, args) + [
                   f"up to {args.seeds} seeds per final row (column seeds), PGD-10 on the test images of column "
                   f"test n, AutoAttack (standard) on the first AA n of them for the first seed of the PGD rows at "
                   f"AT's batch and {min(args.scales)}x (AutoAttack costs seconds per image on 2 cores); LR "
                   f"multipliers chosen on the validation split "
                   f"({args.holdout} held-out training images), the weights of the validation-best epoch"]}
    return save("large_batch", payload)


def settings(args) -> dict:
    return {"dataset": "fashion_mnist (60,000 train, 10,000 test)", "backbone": args.backbone, "stem": args.stem,
            "eps": args.eps, "train_attack": f"pgd-{args.pgd_steps} / fgsm_rs", "epochs": args.epochs,
            "holdout": args.holdout, "ranks": args.ranks, "micro": args.micro, "at_batch": args.at_batch,
            "scales": list(args.scales), "seeds": args.seeds, "aa_limit": args.aa_limit, "at_lamb": args.at_lamb,
            "configs": "lamb_fp32.json / sgd_momentum.json / lsgd.json, batch fields and lr multiplier replaced"}


def rates() -> dict:
    """CPU seconds per training image-epoch, per PGD-10 test image and per AutoAttack image, from
    the stored runs (pilot included)."""
    found = {"train": [], "pgd": [], "autoattack": []}
    for path in sorted(RUNS.glob("*.json")) if RUNS.is_dir() else []:
        rec = json.loads(path.read_text())
        found["train"].append(rec["train_cpu_s"] / (rec["epochs"] * rec["train_images"]))
        for name, (cpu, n) in rec.get("eval_cpu", {}).items():
            found[name].append(cpu / n)
    return {k: statistics.fmean(v) for k, v in found.items() if v}


def plan(args) -> None:
    """What is stored, what is left, and an estimate: CPU seconds of the stored runs per image, over
    ``--ranks`` busy cores (a quiet machine; each run also pays ~1 min of start-up per launch)."""
    r = rates()
    cores = args.ranks
    train_s = r.get("train", math.nan) * args.epochs * (60000 - args.holdout) / cores
    aa_share = min(args.aa_seeds, args.seeds) / args.seeds if args.aa_limit else 0.0
    eval_s = (r.get("pgd", math.nan) * (args.test_limit or 10000)
              + (r.get("autoattack", math.nan) * args.aa_limit * aa_share if aa_share else 0.0)) / cores
    print(f"per run on {cores} quiet cores: about {train_s / 60:.1f} min of training, {eval_s / 60:.1f} min of "
          f"evaluation (PGD-10 on {args.test_limit or 10000} test images, AutoAttack on {args.aa_limit} for "
          f"{min(args.aa_seeds, args.seeds)} of {args.seeds} seeds); "
          f"nan: nothing stored to estimate from")
    groups = {"sweep": sweep_runs(args), "final": final_runs(args), "ema": final_runs(args, "ema"),
              "epochs": final_runs(args, "epochs"), "curve": curve_runs(args), "conadv": conadv_runs(args),
              "remedy": remedy_runs(args)}
    total = 0.0
    for name, runs in groups.items():
        records = [load_record(run.key(args)) for run in runs]
        trained = sum(rec is not None for rec in records)
        evaluated = sum(rec is not None and "robust_acc" in rec for rec in records)
        # a run's training time scales with its epochs; the curve's AutoAttack is counted apart (part curve-aa)
        left = sum(train_s * (run.epochs or args.epochs) / args.epochs
                   for run, rec in zip(runs, records) if rec is None)
        left += 0 if name == "sweep" else (len(runs) - evaluated) * (eval_s if name not in ("curve", "conadv", "remedy")
                                                                     else r.get("pgd", math.nan) * 10000 / cores)
        total += left
        print(f"{name:>6}: {len(runs)} runs, {trained} trained, {evaluated} evaluated; about {left / 60:.0f} min left")
    if not groups["final"]:
        n_final = len(final_runs_if_swept(args))
        total += n_final * (train_s + eval_s)
        print(f" final + ema: {n_final} runs once the LR sweep is done (--part sweep), about "
              f"{n_final * (train_s + eval_s) / 60:.0f} min")
    print(f"total left: about {total / 3600:.1f} h")


def final_runs_if_swept(args) -> List[Run]:
    """The final and EMA runs as they will be once the sweep has chosen (multiplier 1 as a stand-in)."""
    def stand_in(method, args):
        return 1.0
    return [r for r in final_runs(args, choose=stand_in) + final_runs(args, "ema", choose=stand_in)
            if r.phase != "sweep"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", default=["sweep", "final", "ema", "evaluate", "table"], choices=PARTS)
    p.add_argument("--plan", action="store_true", help="print what is stored and what is left, then exit")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new run after this many minutes")
    p.add_argument("--backbone", default="test_resnet")
    p.add_argument("--stem", default="native")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--pgd-steps", type=int, default=3, help="PGD steps of PGD training")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--holdout", type=int, default=5000, help="validation split: the last N training images")
    p.add_argument("--at-batch", type=int, default=128, help="AT's global batch; DAT runs at --scales times it")
    p.add_argument("--scales", type=int, nargs="+", default=[8, 16])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--micro", type=int, default=64, help="per-rank micro batch of every run")
    p.add_argument("--attacks", nargs="+", default=list(ATTACK_LABEL), choices=list(ATTACK_LABEL))
    p.add_argument("--fgsm-scales", type=int, nargs="*", default=[8], help="DAT batches (x AT's) of FGSM-RS runs")
    p.add_argument("--at-lamb", action="store_true", help="also AT with LAMB at the small batch (sweep and rows)")
    p.add_argument("--grid-extend", type=int, default=2,
                   help="widen an LR grid past its end up to N times while the best run sits on that end")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--more-epochs", type=int, nargs="*", default=[6],
                   help="part epochs: DAT-LAMB and DAT-SGD at 8x with these epoch counts")
    p.add_argument("--curve-epochs", type=int, nargs="+", default=[3, 6, 12],
                   help="part curve: the equal-epoch rows' epoch counts")
    p.add_argument("--curve-methods", nargs="+", default=list(CURVE_METHODS), choices=CURVE_METHODS,
                   help="part curve: the methods trained (AT at AT's batch, DAT at the smallest scale)")
    p.add_argument("--dat-more-epochs", type=int, nargs="*", default=[16],
                   help="part curve: DAT-LAMB also at these epochs, past the curve's longest")
    p.add_argument("--conadv-epochs", type=int, default=6, help="part conadv: epochs of the ConAdv runs")
    p.add_argument("--curve-aa-limit", type=int, default=1000,
                   help="part curve-aa: AutoAttack's test images (the first N)")
    p.add_argument("--curve-aa-seeds", type=int, default=1,
                   help="part curve-aa: AutoAttack on the runs of the first N seeds")
    p.add_argument("--curve-aa-methods", nargs="+", default=["AT-SGD", "DAT-LAMB"], choices=CURVE_METHODS,
                   help="part curve-aa: the methods whose longest curve rows AutoAttack evaluates")
    p.add_argument("--remedies", nargs="+", default=list(REMEDIES), choices=list(REMEDIES),
                   help="part remedies: the changes tried on DAT-LAMB at the curve's longest epochs")
    p.add_argument("--remedy-seeds", type=int, default=1, help="part remedies: seeds of each remedy")
    p.add_argument("--ttr-ranks", type=int, default=8, help="ranks of DAT in the time-to-robustness model")
    p.add_argument("--aa-all", action="store_true", help="AutoAttack on every run's first seed, not only the "
                                                         "PGD rows at AT's batch and the smallest DAT batch")
    p.add_argument("--test-limit", type=int, default=None, help="PGD-10 test images (default: all 10,000)")
    p.add_argument("--aa-limit", type=int, default=200,
                   help="AutoAttack test images (0: none); about 1.2 s per image on 2 cores even for test_resnet")
    p.add_argument("--aa-seeds", type=int, default=1, help="AutoAttack on the runs of the first N seeds")
    p.add_argument("--train-eval-limit", type=int, default=200,
                   help="test images of the recipe's per-epoch check (not used by the study)")
    p.add_argument("--train-limit", type=int, default=None, help="pilot: training images besides the holdout")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "large_batch"), help="run folders (checkpoints, logs)")
    args = p.parse_args(argv)
    args.scales = sorted(args.scales)
    if args.plan:
        return plan(args)
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else math.inf
    if "pilot" in args.part:
        args.train_limit = args.train_limit or 4000
        args.holdout, args.test_limit, args.aa_limit = min(args.holdout, 1000), 1000, min(args.aa_limit, 100)
        args.aa_seeds = 1
        args.workdir = str(Path(args.workdir) / "pilot")
        execute(pilot_runs(args), args, deadline, evaluate_too=True)
        return
    if args.train_limit:
        raise ValueError("--train-limit is for --part pilot only: the study trains on the full training set")
    if "sweep" in args.part:
        done = None
        while done != (done := len(sweep_runs(args))):  # a run may widen its method's grid
            execute(sweep_runs(args), args, deadline, evaluate_too=False)
    if "final" in args.part:
        execute(final_runs(args), args, deadline, evaluate_too=False)
    if "ema" in args.part:
        execute(final_runs(args, "ema"), args, deadline, evaluate_too=False)
    if "epochs" in args.part:
        execute(final_runs(args, "epochs"), args, deadline, evaluate_too=False)
    if "curve" in args.part:
        execute(curve_runs(args), args, deadline, evaluate_too=True)
    if "conadv" in args.part:
        execute(conadv_runs(args), args, deadline, evaluate_too=True)
    if "remedies" in args.part:
        execute(remedy_runs(args), args, deadline, evaluate_too=True)
        judge_remedies(args, deadline)
    if "curve-aa" in args.part:
        curve_autoattack(args, deadline)
    if "evaluate" in args.part:  # the runs of the phases named with it, or of all of them
        phases = [ph for ph in ("final", "ema", "epochs") if ph in args.part] or ["final", "ema", "epochs"]
        execute([run for ph in phases for run in final_runs(args, ph)], args, deadline, evaluate_too=True)
    if "table" in args.part or "evaluate" in args.part:
        print(f"written: {write_table(args)}")


if __name__ == "__main__":
    main()

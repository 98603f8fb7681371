"""The large-batch study's bookkeeping (bench/large_batch.py) on stored run records: which runs it
plans, how the LR sweep widens and chooses, and how the table and its verdict are built. No run is
trained here; records are written the way ``train``/``evaluate`` store them."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import large_batch as lb  # noqa: E402


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.setattr(lb, "RUNS", tmp_path / "runs")
    return parse([])


def parse(argv):
    """The study's arguments as ``main`` parses them (``--plan`` hands them over and runs nothing)."""
    captured = {}
    orig, lb.plan = lb.plan, lambda args: captured.update(args=args)
    try:
        lb.main(["--plan", *argv])
    finally:
        lb.plan = orig
    return captured["args"]


def store(run, args, val_ra, **extra):
    """A trained (and, with ``robust_acc`` in ``extra``, evaluated) record of ``run``."""
    batch = run.method.scale * args.at_batch
    record = {"key": run.key(args), "run": {**lb.asdict(run), "method": lb.asdict(run.method)},
              "global_batch_size": batch, "updates": 3 * 55000 // batch, "epochs": run.epochs or args.epochs,
              "peak_lr": 0.1 * run.lr_mult, "val_robust_acc": val_ra, "val_clean_acc": val_ra + 0.1,
              "train_wall_s": 100.0, "train_cpu_s": 200.0, "train_images": 55000, **extra}
    lb.store(record)
    return record


def by_label(args, label, scale):
    return next(m for m in lb.all_methods(args) if f"{m.name}-{m.optimizer}" == label and m.scale == scale)


def test_grid_widens_past_the_end_that_holds_the_best_run(study):
    args = study
    at = by_label(args, "AT-SGD", 1)
    assert lb.grid(at, args) == (0.5, 1.0, 2.0)
    for mult, ra in ((0.5, 0.70), (1.0, 0.72), (2.0, 0.75)):
        store(lb.Run(at, "pgd", 0, mult, "sweep"), args, ra)
    assert lb.grid(at, args) == (0.5, 1.0, 2.0, 4.0)  # best on the top end: one more above
    assert lb.chosen_mult(at, args) is None  # the widened grid is not finished
    store(lb.Run(at, "pgd", 0, 4.0, "sweep"), args, 0.74)
    assert lb.grid(at, args) == (0.5, 1.0, 2.0, 4.0)  # 2.0 is inside now: stop
    assert lb.chosen_mult(at, args) == 2.0
    # LSGD has no grid: it takes AT-SGD's choice
    assert lb.chosen_mult(by_label(args, "DAT-LSGD", 8), args) == 2.0

    lamb = by_label(args, "DAT-LAMB", 8)
    for mult, ra in ((0.5, 0.69), (1.0, 0.63), (2.0, 0.11)):
        store(lb.Run(lamb, "pgd", 0, mult, "sweep"), args, ra)
    assert lb.grid(lamb, args) == (0.25, 0.5, 1.0, 2.0)  # best on the bottom end: one more below
    store(lb.Run(lamb, "pgd", 0, 0.25, "sweep"), args, 0.70)
    store(lb.Run(lamb, "pgd", 0, 0.125, "sweep"), args, 0.71)
    # widened at most --grid-extend (2) times, and the choice is the best of what was run
    assert lb.grid(lamb, args) == (0.125, 0.25, 0.5, 1.0, 2.0)
    assert lb.chosen_mult(lamb, args) == 0.125
    assert lb.grid(lamb, parse(["--grid-extend", "0"])) == (0.5, 1.0, 2.0)


def test_final_runs_reuse_the_sweep_and_keep_phases_apart(study):
    args = study
    at = by_label(args, "AT-SGD", 1)
    for mult, ra in ((0.5, 0.7), (1.0, 0.76), (2.0, 0.73)):
        store(lb.Run(at, "pgd", 0, mult, "sweep"), args, ra)
    runs = lb.final_runs(args)
    keys = [r.key(args) for r in runs]
    # only AT-SGD and LSGD (which follows it) are chosen; DAT-LAMB/SGD wait for their sweep
    assert {(r.method.name, r.method.optimizer) for r in runs} == {("AT", "SGD"), ("DAT", "LSGD")}
    assert "sweep-pgd-AT-SGD-b128-lr1-s0" in keys  # the sweep's seed-0 run stands for itself
    assert "final-pgd-AT-SGD-b128-lr1-s1" in keys
    assert "final-fgsm_rs-AT-SGD-b128-lr1-s0" in keys
    assert {"final-pgd-DAT-LSGD-b1024-lr1-s0", "final-pgd-DAT-LSGD-b2048-lr1-s1"} <= set(keys)
    assert not any("fgsm_rs-DAT-LSGD-b2048" in k for k in keys)  # FGSM-RS only at --fgsm-scales
    assert len(keys) == len(set(keys))
    ema = [r.key(args) for r in lb.final_runs(args, "ema")]
    assert ema == ["ema-pgd-AT-SGD-b128-lr1-s0-ema", "ema-pgd-AT-SGD-b128-lr1-s1-ema"]
    assert lb.final_runs(args, "epochs") == []  # DAT-LAMB/SGD not chosen yet


def test_table_means_seeds_and_judges_the_goal(study):
    args = study
    at, lamb, sgd = (by_label(args, *m) for m in (("AT-SGD", 1), ("DAT-LAMB", 8), ("DAT-SGD", 8)))
    for method, grid_ra in ((at, (0.70, 0.75, 0.72)), (lamb, (0.69, 0.71, 0.2)), (sgd, (0.5, 0.6, 0.55))):
        for mult, ra in zip(method.lr_grid, grid_ra):
            store(lb.Run(method, "pgd", 0, mult, "sweep"), args, ra)
    evaluated = {at: (0.80, 0.74), lamb: (0.73, 0.71), sgd: (0.60, 0.58)}
    for method, ras in evaluated.items():
        for run in lb.final_runs(args):
            if run.method == method and run.attack == "pgd":
                rec = lb.load_record(run.key(args)) or store(run, args, 0.7)
                rec.update(clean_acc=0.8, robust_acc=ras[run.seed], test_samples=10000)
                if lb.headline(rec, args) and run.seed < args.aa_seeds:
                    rec.update(autoattack_acc=ras[run.seed] - 0.05, autoattack_samples=200)
                lb.store(rec)
    more = lb.Run(lamb, "pgd", 0, 1.0, "epochs", epochs=6)
    assert more in lb.final_runs(args, "epochs")
    store(more, args, 0.74, clean_acc=0.8, robust_acc=0.75, test_samples=10000)
    assert not lb.headline(lb.load_record(more.key(args)), args)

    table = lb.rows(args)
    row = {(r["method"], r["optimizer"], r["global_batch_size"], r["epochs"]): r for r in table}
    at_row = row[("AT-PGD", "SGD", 128, 3)]
    assert at_row["seeds"] == 2 and at_row["robust_acc_mean"] == pytest.approx(0.77)
    assert at_row["robust_acc_std"] == pytest.approx(0.0424, abs=1e-4)
    assert at_row["autoattack_acc_mean"] == pytest.approx(0.75) and at_row["autoattack_seeds"] == 1
    assert row[("DAT-PGD", "LAMB", 1024, 6)]["seeds"] == 1
    notes = lb.notes(table, args)
    assert notes[0].startswith("PGD: RA AT 77.0 % vs DAT-LAMB at 1024 72.0 % (-5.0 points, goal within 2: not met)")
    assert "DAT w/o LALR 59.0 % (-13.0 points vs LAMB)" in notes[0]
    assert any("with 6 epochs instead of 3: RA 75.0 %" in n for n in notes)
    # the paper's w/o LALR: SGD at AT's LR (multiplier 1 here), from the sweep, against LAMB's best
    assert any(n.startswith("DAT w/o LALR at AT's LR") and "validation RA 50.0 % against DAT-LAMB's 71.0 %" in n
               for n in notes)


def test_ds_config_sets_the_batch_and_the_reference_lr(study):
    args = study
    lamb = by_label(args, "DAT-LAMB", 16)
    cfg = lb.ds_config(lb.Run(lamb, "pgd", 0, 0.5, "final", ema=True), args)
    assert cfg["train_micro_batch_size_per_gpu"] == 64 and cfg["gradient_accumulation_steps"] == 16
    assert cfg["optimizer"]["params"]["lr"] == pytest.approx(lb.REFERENCE_LR["lamb_fp32.json"] * 0.5)
    assert cfg["ema"]["decay"] == args.ema_decay
    shipped = json.loads((ROOT / "ds_configs" / "lamb_fp32.json").read_text())
    assert cfg["scheduler"] == shipped["scheduler"]  # the LR rule and warm-up are the shipped ones
    with pytest.raises(ValueError, match="not a multiple"):
        lb.ds_config(lb.Run(lamb, "pgd", 0, 1.0, "final"), parse(["--micro", "48"]))


def sweep_choices(args, **mults):
    """Sweep records that make each named method's choice ``mults[name]`` (its best validation RA;
    inside its grid, or the grid widens)."""
    for label, chosen in mults.items():
        method = by_label(args, label.replace("_", "-"), 1 if label.startswith("AT") else 8)
        for mult in method.lr_grid:
            store(lb.Run(method, "pgd", 0, mult, "sweep"), args, 0.8 if mult == chosen else 0.6)


def test_curve_trains_longest_rows_first_with_the_sweeps_lr(study):
    args = parse(["--curve-epochs", "3", "12", "--curve-methods", "AT-SGD", "DAT-LAMB", "--conadv-epochs", "6",
                  "--dat-more-epochs", "16"])
    sweep_choices(args, AT_SGD=1.0, DAT_LAMB=1.0)
    keys = [r.key(args) for r in lb.curve_runs(args)]
    assert keys == ["curve-pgd-AT-SGD-b128-lr1-s0-e12", "curve-pgd-DAT-LAMB-b1024-lr1-s0-e12",
                    "curve-pgd-AT-SGD-b128-lr1-s1-e12", "curve-pgd-DAT-LAMB-b1024-lr1-s1-e12",
                    "curve-pgd-AT-SGD-b128-lr1-s0-e3",
                    "curve-pgd-DAT-LAMB-b1024-lr1-s0-e3", "curve-pgd-AT-SGD-b128-lr1-s1-e3",
                    "curve-pgd-DAT-LAMB-b1024-lr1-s1-e3",
                    # then DAT-LAMB past AT's longest run
                    "curve-pgd-DAT-LAMB-b1024-lr1-s0-e16", "curve-pgd-DAT-LAMB-b1024-lr1-s1-e16"]
    # ConAdv: DAT-LAMB's batch and LR, its own epochs; trained with clean + adversarial loss
    assert [r.key(args) for r in lb.conadv_runs(args)] == ["curve-conadv-DAT-LAMB-b1024-lr1-s0-e6",
                                                           "curve-conadv-DAT-LAMB-b1024-lr1-s1-e6"]
    assert lb.ATTACK_FLAGS["conadv"] == ["--loss", "mix"]
    # an unswept method has no curve rows yet
    assert not [r for r in lb.curve_runs(parse(["--curve-methods", "DAT-SGD"]))]


def test_time_to_robustness_from_the_curve(study, tmp_path, monkeypatch):
    args = parse(["--curve-epochs", "3", "12", "--curve-methods", "AT-SGD", "DAT-LAMB", "--dat-more-epochs"])
    sweep_choices(args, AT_SGD=1.0, DAT_LAMB=1.0)
    monkeypatch.setattr(lb, "RESULTS", tmp_path)  # no link or GPU measurement: the nominal link, this machine
    monkeypatch.setattr(lb, "_params", lambda args: 1_000_000)
    ra = {("AT", 3): (0.70, 0.72), ("AT", 12): (0.78, 0.78), ("DAT", 3): (0.60, 0.62), ("DAT", 12): (0.70, 0.74)}
    for run in lb.curve_runs(args):
        batch = run.method.scale * args.at_batch
        updates = run.epochs * (55000 // batch)
        # 2 ms per image on each of the 2 ranks; seed 1 ran beside other work, twice as slow
        store(run, args, 0.7, updates=updates, clean_acc=0.8, test_samples=10000,
              robust_acc=ra[(run.method.name, run.epochs)][run.seed],
              compute_s=0.002 * updates * batch / 2 * (1 + run.seed))
    curve = lb.curve_rows(args)
    assert [(r["method"], r["optimizer"], r["epochs"]) for r in curve] == [
        ("AT-PGD", "SGD", 3), ("DAT-PGD", "LAMB", 3), ("AT-PGD", "SGD", 12), ("DAT-PGD", "LAMB", 12)]
    assert curve[3]["robust_acc_mean"] == pytest.approx(0.72)
    assert curve[3]["compute_s_per_image"] == pytest.approx(0.003)
    assert curve[3]["compute_s_per_image_min"] == pytest.approx(0.002)  # the model takes the unloaded run
    ttr = lb.time_to_robustness(curve, args)
    assert ttr["link_bits_per_s"] == 1e9
    assert [h["name"] for h in ttr["hardware"]] == ["this machine (1 core per rank)"]
    row = {(r["target"], r["method"]): r for r in ttr["rows"]}
    dat = row[("AT-SGD, 3 epochs", "DAT-LAMB")]  # AT's 71 % at 3 epochs: DAT-LAMB's 12-epoch 72 % reaches it
    assert dat["epochs"] == 12 and dat["this_ranks"] == 8
    step = 128 * 0.002 + 2 * 7 / 8 * 4e6 * 8 / 1e9  # 128 images per rank, then a ring all-reduce of 4 MB
    assert dat["this_hours"] == pytest.approx(12 * (55000 // 1024) * step / 3600)
    assert dat["this_speedup"] == pytest.approx(3 * (55000 // 128) * 128 * 0.002 / (12 * (55000 // 1024) * step))
    assert row[("AT-SGD, 3 epochs", "AT-SGD")]["this_speedup"] == pytest.approx(1.0)
    assert row[("AT-SGD, 12 epochs", "DAT-LAMB")]["epochs"] is None  # 72 % never reaches 78 %
    notes = lb.curve_notes(curve, ttr, args)
    assert notes[0].startswith("3 epochs: DAT-LAMB at 1024 RA 61.0 % vs AT-SGD 71.0 % (-10.0 points")
    assert notes[0].endswith("not judged (fewer than 600 updates)")
    assert notes[1].startswith("12 epochs: DAT-LAMB at 1024 RA 72.0 % vs AT-SGD 78.0 % (-6.0 points, 636 updates")
    assert notes[1].endswith("goal within 2 points not met")
    assert any("does not reach it within 12 epochs" in n for n in notes)
    # the REPORT section: the time table first, then the curve and its plot
    import report_large_batch as report
    monkeypatch.setattr(report, "PLOTS", tmp_path / "plots")
    data = {"settings": lb.settings(args), "curve": curve, "time_to_robustness": ttr, "curve_notes": notes}
    text = "\n".join(report.render_curve("large_batch", data))
    assert text.index("### Time to robustness") < text.index("### Equal-epoch curve")
    assert "| AT-SGD, 3 epochs | 71.0 | DAT-LAMB | 1024 | 12 | 72.0 | 8 |" in text
    assert "| DAT-PGD | LAMB | 1024 | 12 | 636 | 2 |" in text
    assert (tmp_path / "plots" / "large_batch_curve.png").stat().st_size > 0


def test_time_to_robustness_aims_at_every_at_optimizer(study, tmp_path, monkeypatch):
    """AT-LAMB at AT's batch is a target too (its own one-rank time), and the notes set DAT-LAMB
    against it: the same optimizer at both batches."""
    args = parse(["--at-lamb", "--curve-epochs", "3", "12", "--curve-methods", "AT-SGD", "AT-LAMB", "DAT-LAMB",
                  "--dat-more-epochs"])
    sweep_choices(args, AT_SGD=1.0, AT_LAMB=1.0, DAT_LAMB=1.0)
    monkeypatch.setattr(lb, "RESULTS", tmp_path)
    monkeypatch.setattr(lb, "_params", lambda args: 1_000_000)
    ra = {("AT-SGD", 3): 0.70, ("AT-SGD", 12): 0.74, ("AT-LAMB", 3): 0.76, ("AT-LAMB", 12): 0.73,
          ("DAT-LAMB", 3): 0.60, ("DAT-LAMB", 12): 0.75}
    for run in lb.curve_runs(args):
        batch = run.method.scale * args.at_batch
        updates = run.epochs * (55000 // batch)
        store(run, args, 0.7, updates=updates, clean_acc=0.8, test_samples=10000,
              robust_acc=ra[(run.label, run.epochs)], compute_s=0.002 * updates * batch / 2)
    curve = lb.curve_rows(args)
    ttr = lb.time_to_robustness(curve, args)
    row = {(r["target"], r["method"]): r for r in ttr["rows"]}
    assert row[("AT-LAMB, 3 epochs", "DAT-LAMB")]["epochs"] is None  # 75 % never reaches AT-LAMB's 76 %
    # AT-LAMB's 12-epoch 73 % is no target: its own 3-epoch run got further, in a quarter of the time
    assert ("AT-LAMB, 12 epochs", "DAT-LAMB") not in row and ("AT-SGD, 12 epochs", "DAT-LAMB") in row
    reach = row[("AT-SGD, 12 epochs", "DAT-LAMB")]
    step = 128 * 0.002 + 2 * 7 / 8 * 4e6 * 8 / 1e9
    assert reach["epochs"] == 12
    assert reach["this_speedup"] == pytest.approx(12 * (55000 // 128) * 128 * 0.002 / (12 * (55000 // 1024) * step))
    notes = lb.curve_notes(curve, ttr, args)
    assert ("12 epochs, LAMB at both batches: DAT-LAMB at 1024 RA 75.0 % vs AT-LAMB at 128 73.0 % (+2.0 points; "
            "AT-LAMB -1.0 against AT-SGD)") in notes
    assert "time to AT-LAMB's 3-epoch RA (76.0 %): DAT-LAMB does not reach it within 12 epochs" in notes
    assert any(n.startswith("time to AT-SGD's 12-epoch RA (74.0 %): DAT-LAMB on 8 ranks gets there in 12 epochs, ")
               and "faster than AT-SGD on one rank" in n for n in notes)
    assert not any("AT-LAMB's 12-epoch" in n for n in notes)


def test_remedies_change_only_their_entries_and_are_judged_on_validation(study, tmp_path, monkeypatch):
    args = parse(["--curve-epochs", "3", "12"])
    sweep_choices(args, DAT_LAMB=1.0)
    runs = {r.remedy: r for r in lb.remedy_runs(args)}
    assert set(runs) == set(lb.REMEDIES)
    assert runs["warmup"].key(args) == "remedy-pgd-DAT-LAMB-b1024-lr1-s0-e12-warmup"
    plain_cfg = lb.ds_config(lb.Run(runs["warmup"].method, "pgd", 0, 1.0, "curve", epochs=12), args)
    cfg = lb.ds_config(runs["warmup"], args)
    assert (cfg["scheduler"]["params"]["warmup_epochs"], cfg["scheduler"]["params"]["max_warmup_fraction"]) == (3, 0.25)
    cfg["scheduler"]["params"].update(warmup_epochs=plain_cfg["scheduler"]["params"]["warmup_epochs"],
                                      max_warmup_fraction=plain_cfg["scheduler"]["params"]["max_warmup_fraction"])
    assert cfg == plain_cfg  # nothing else moved
    clamp = lb.ds_config(runs["trust-clamp"], args)["optimizer"]["params"]
    assert (clamp["c_l"], clamp["c_u"]) == (0.01, 1.0)
    assert lb.ds_config(runs["label-smoothing"], args) == plain_cfg  # a recipe flag, not a config entry
    assert lb.ds_config(runs["views"], args) == plain_cfg and lb.REMEDIES["views"].flags == ("--views", "2")
    plain = lb.Run(runs["warmup"].method, "pgd", 0, 1.0, "curve", epochs=12)
    store(plain, args, 0.70, clean_acc=0.8, robust_acc=0.71, test_samples=10000)
    store(runs["warmup"], args, 0.72, clean_acc=0.8, robust_acc=0.70, test_samples=10000)
    store(runs["trust-clamp"], args, 0.69, clean_acc=0.8, robust_acc=0.73, test_samples=10000)
    rows = {r["remedy"]: r for r in lb.remedy_rows(args)}
    assert set(rows) == {"warmup", "trust-clamp"}  # label smoothing not run yet
    # validation decides, whatever the test set says
    assert rows["warmup"]["wins"] and not rows["trust-clamp"]["wins"]
    assert rows["warmup"]["plain_val_robust_acc"] == 0.70 and rows["trust-clamp"]["plain_robust_acc"] == 0.71
    assert rows["warmup"]["judged_by"] == "held-out PGD-10"

    # the strong judge: PGD-50 x 5 on the held-out images reverses PGD-10's order here; AutoAttack on the
    # test images goes to the winner and its plain run only, and each evaluation runs once
    val_pgd50 = {plain.key(args): 0.60, runs["warmup"].key(args): 0.58, runs["trust-clamp"].key(args): 0.63}
    calls = []

    def strong(rec, args, port, split="test"):
        calls.append((rec["key"], split))
        return ({"val_pgd10_acc": rec["val_robust_acc"], "val_pgd50_acc": val_pgd50[rec["key"]],
                 "val_pgd50_samples": 5000} if split == "holdout" else
                {"pgd50_acc": val_pgd50[rec["key"]] - 0.05, "pgd50_samples": 1000, "pgd50_per_sample": "1" * 1000})

    monkeypatch.setattr(lb, "strong_pgd", strong)
    monkeypatch.setattr(lb, "evaluate", lambda rec, args, port, autoattack_only=False: calls.append((rec["key"], "aa"))
                   or {"autoattack_acc": val_pgd50[rec["key"]] - 0.1, "autoattack_samples": args.curve_aa_limit})
    monkeypatch.setattr(lb, "aa_samples", lambda rec: {"autoattack_pgd_acc": 0.7, "autoattack_per_sample": (
        "1" * 500 + "0" * 500 if rec["key"] == plain.key(args) else "1" * 530 + "0" * 470)})
    lb.judge_remedies(args, deadline=float("inf"))
    lb.judge_remedies(args, deadline=float("inf"))  # resumed: nothing is evaluated twice
    assert sorted(calls) == sorted([(plain.key(args), "holdout"), (runs["warmup"].key(args), "holdout"),
                                    (runs["trust-clamp"].key(args), "holdout"), (plain.key(args), "aa"),
                                    (plain.key(args), "test"), (runs["trust-clamp"].key(args), "aa"),
                                    (runs["trust-clamp"].key(args), "test")])
    rows = {r["remedy"]: r for r in lb.remedy_rows(args)}
    assert rows["trust-clamp"]["wins"] and not rows["warmup"]["wins"]
    assert rows["warmup"]["judged_by"] == "held-out PGD-50 x5" and rows["warmup"]["autoattack_acc"] is None
    assert rows["trust-clamp"]["autoattack_acc"] == pytest.approx(0.53)
    assert rows["trust-clamp"]["plain_autoattack_acc"] == pytest.approx(0.50)
    assert (rows["trust-clamp"]["autoattack_only_remedy"], rows["trust-clamp"]["autoattack_only_plain"]) == (30, 0)
    # the held-out outcomes image by image, as evaluate.py wrote them: how sure the judge is
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    for key, col in ((plain.key(args), [1] * 60 + [0] * 40), (runs["trust-clamp"].key(args), [1] * 63 + [0] * 37)):
        write_eval(tmp_path / "runs" / key / "eval_val_pgd50", {"pgd50x5_linf_eps0.1": col}, 100)
        lb.store({**lb.load_record(key), "output_dir": f"runs/{key}"})
    row = next(r for r in lb.remedy_rows(args) if r["remedy"] == "trust-clamp")
    assert (row["val_only_remedy"], row["val_only_plain"]) == (3, 0)
    assert row["val_mcnemar_p"] == pytest.approx(0.25)
    notes = {n.split(":")[0]: n for n in lb.remedy_notes(lb.remedy_rows(args))}
    assert notes["trust-clamp"] == ("trust-clamp: beat its plain run on the held-out PGD-50 x5 in 1 of 1 seed(s), "
                                    "+3.0 points; under AutoAttack on the test images +3.0 points; "
                                    "training CPU seconds 1.00x the plain run's")
    assert "0 of 1 seed(s), -2.0 points" in notes["warmup"] and "AutoAttack" not in notes["warmup"]


def test_time_to_robustness_on_h200s_from_the_gpu_check_and_the_measured_link(study, tmp_path, monkeypatch):
    args = parse(["--curve-epochs", "3", "12", "--curve-methods", "AT-SGD", "DAT-LAMB", "--dat-more-epochs"])
    sweep_choices(args, AT_SGD=1.0, DAT_LAMB=1.0)
    monkeypatch.setattr(lb, "RESULTS", tmp_path)
    monkeypatch.setattr(lb, "_params", lambda args: 1_000_000)
    (tmp_path / "link.json").write_text(json.dumps({
        "probe": {"all_reduce_gbit_s": 0.5},
        "rows": [{"link": "1 Gbit/s", "scenario": "dat (fgsm_rs, micro 16)", "compressor": "fp32 all-reduce",
                  "MB/rank/epoch": 100.0},
                 {"link": "1 Gbit/s", "scenario": "dat (fgsm_rs, micro 16)", "compressor": "PowerSGD rank 1",
                  "MB/rank/epoch": 1.0},
                 {"link": "100 Mbit/s, 40 ms RTT", "scenario": "dat (fgsm_rs, micro 16)",
                  "compressor": "QSGD 4-bit", "MB/rank/epoch": 12.5}]}))
    (tmp_path / "gpu.json").write_text(json.dumps({"sections": {"throughput": {"models": [
        {"model": "preactresnet18", "img_size": 32, "batch": 256, "dtype": "bfloat16", "params_m": 2.0,
         "methods": [{"method": "pgd-3", "seconds": 0.0512}, {"method": "pgd-10", "seconds": 1.0}]}]}}}))
    for run in lb.curve_runs(args):
        batch = run.method.scale * args.at_batch
        updates = run.epochs * (55000 // batch)
        store(run, args, 0.7, updates=updates, clean_acc=0.8, test_samples=10000,
              robust_acc={3: 0.70, 12: 0.75}[run.epochs] - (0.05 if run.method.name == "DAT" else 0.0),
              compute_s=0.002 * updates * batch / 2)
    ttr = lb.time_to_robustness(lb.curve_rows(args), args)
    assert ttr["link_bits_per_s"] == 0.5e9 and ttr["link_source"].startswith("measured")
    h200 = ttr["hardware"][1]
    assert h200["s_per_image"] == pytest.approx(0.0002) and h200["params"] == 2_000_000
    row = next(r for r in ttr["rows"] if r["target"] == "AT-SGD, 3 epochs" and r["method"] == "DAT-LAMB")
    exchange = 2 * 7 / 8 * 8e6 * 8 / 0.5e9  # 8 MB of fp32 gradients over 0.5 Gbit/s
    step = 128 * 0.0002 + exchange
    at = 3 * (55000 // 128) * 128 * 0.0002
    assert row["h200_speedup"] == pytest.approx(at / (12 * (55000 // 1024) * step))
    assert row["h200_exchange_share"] == pytest.approx(exchange / step)
    # PowerSGD sent 1 % of fp32's bytes on the same link: the exchange shrinks to 1 %
    assert row["h200_speedup_compressed"] == {
        "PowerSGD rank 1": pytest.approx(at / (12 * (55000 // 1024) * (128 * 0.0002 + 0.01 * exchange)))}


def write_eval(folder: Path, columns: dict, n: int, **summary):
    """An evaluation folder as ``recipes/evaluate.py`` writes it: ``per_sample.csv`` (one 0/1 column
    per attack) and ``eval_summary.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["index,label,clean," + ",".join(columns)]
    lines += [f"{i},{i % 10},1," + ",".join(str(col[i]) for col in columns.values()) for i in range(n)]
    (folder / "per_sample.csv").write_text("\n".join(lines) + "\n")
    (folder / "eval_summary.json").write_text(json.dumps({"eval_samples": n, **summary}))


def test_autoattack_from_another_machine_beside_pgd_on_the_same_images(study, tmp_path, monkeypatch):
    """Part curve-aa reads a summary of its own command run on a GPU and copied into the run's
    folder (nothing is launched), compares PGD-10 and AutoAttack on the same images, and the notes
    compare AT-SGD and DAT-LAMB image by image, seed by seed."""
    args = parse(["--curve-epochs", "12", "--curve-methods", "AT-SGD", "DAT-LAMB", "--curve-aa-limit", "100",
                  "--curve-aa-seeds", "2"])
    sweep_choices(args, AT_SGD=1.0, DAT_LAMB=1.0)
    monkeypatch.setattr(lb, "ROOT", tmp_path)
    monkeypatch.setattr(lb, "launch", lambda *a, **k: pytest.fail("evaluated again instead of reading the GPU's"))
    runs = [r for r in lb.curve_runs(args) if r.epochs == 12]
    assert {(r.label, r.seed) for r in runs} == {("AT-SGD", 0), ("AT-SGD", 1), ("DAT-LAMB", 0), ("DAT-LAMB", 1)}
    for run in runs:
        out = tmp_path / "runs" / run.key(args)
        dat = run.label == "DAT-LAMB"
        pgd = [1] * 80 + [0] * 20 + [1] * 50  # 80 % on the first 100 images; the 10,000 are longer
        aa = [1] * (70 if dat else 78) + [0] * (30 if dat else 22)  # AutoAttack breaks some PGD survivors
        write_eval(out / "eval_pgd", {"pgd10x1_linf_eps0.1": pgd}, 150)
        write_eval(out / "eval_autoattack", {"pgd1x1_linf_eps0.1": pgd[:100], "autoattack_linf_eps0.1": aa}, 100,
                   device="cuda: NVIDIA H200", run_dir=f"/elsewhere/{run.key(args)}",
                   checkpoint=f"/elsewhere/{run.key(args)}/checkpoints/best/mp_rank_00_model_states.pt",
                   autoattack={"version": "standard", "eps": args.eps, "robust_acc": sum(aa) / 100},
                   batch_size=250)
        strong = [1] * (74 if dat else 79) + [0] * (26 if dat else 21)  # PGD-50 x 5 on the same images
        write_eval(out / "eval_pgd50", {"pgd10x1_linf_eps0.1": pgd[:100], "pgd50x5_linf_eps0.1": strong}, 100,
                   run_dir=f"/elsewhere/{run.key(args)}",
                   pgd=[{"steps": 10, "restarts": 1, "robust_acc": 0.8},
                        {"steps": 50, "restarts": 5, "robust_acc": sum(strong) / 100}])
        store(run, args, 0.8, clean_acc=0.85, robust_acc=0.8, test_samples=150, output_dir=f"runs/{run.key(args)}",
              compute_s=100.0)
    lb.curve_autoattack(args, deadline=float("inf"))
    rec = lb.load_record(runs[0].key(args))
    assert rec["autoattack_device"] == "cuda: NVIDIA H200" and rec["autoattack_samples"] == 100
    assert rec["autoattack_pgd_acc"] == 0.8 and len(rec["autoattack_per_sample"]) == 100
    curve = lb.curve_rows(args)
    dat = next(r for r in curve if r["optimizer"] == "LAMB")
    assert dat["autoattack_acc"] == pytest.approx(0.70) and dat["autoattack_seeds"] == "0, 1"
    notes = lb.autoattack_notes(12, next(r for r in curve if r["optimizer"] == "SGD"), dat)
    assert notes[0].startswith("12 epochs under AutoAttack, seed 0, the first 100 test images: DAT-LAMB 70.0 % "
                               "vs AT-SGD 78.0 % (-8.0 points; PGD-10 on the same images 80.0 % vs 80.0 %, +0.0)")
    assert notes[0].endswith("8 images only AT survives, 0 only DAT-LAMB, exact McNemar p = 0.008; PGD-50 x 5 "
                             "restarts between them: DAT-LAMB 74.0 % vs AT-SGD 79.0 % (-5.0)")
    assert rec["pgd50_acc"] == 0.79 and len(rec["pgd50_per_sample"]) == 100 and dat["autoattack_pgd50_acc"] == 0.74
    assert notes[2] == ("12 epochs under AutoAttack, DAT-LAMB vs AT-SGD, mean over 2 seed(s): -8.0 points; within 2 "
                        "points under AutoAttack: no")
    # a summary of another command (other images, a CPU, another run) is not taken for it
    summary = tmp_path / "runs" / runs[0].key(args) / "eval_autoattack" / "eval_summary.json"
    good = json.loads(summary.read_text())
    for change in ({"eval_samples": 99}, {"device": "cpu"}, {"run_dir": "/elsewhere/another-run"},
                   {"autoattack": {**good["autoattack"], "version": "plus"}}):
        summary.write_text(json.dumps({**good, **change}))
        assert lb.elsewhere(summary.parent, summary.parents[1], args) is None, change
    summary.write_text(json.dumps(good))
    assert lb.elsewhere(summary.parent, summary.parents[1], args)["device"] == "cuda: NVIDIA H200"

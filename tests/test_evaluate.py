"""The robustness suite (recipes/evaluate.py) on a real PGD-trained checkpoint: attack strength
ordering, eps sweeps, AutoAttack, 1 rank == 2 ranks, outputs, and one-line errors."""
import csv
import json

import numpy as np
import pytest
import torch

from conftest import ROOT, recipe_module, run_deepspeed, run_recipe
from dat_ds import cli
from dat_ds.checkpoint_io import MODEL_FILE, find_checkpoint, load_model, run_dir
from dat_ds.evaluate import AutoAttackSpec, BlockSampler, PGDSpec, sample_table

EVAL = ROOT / "recipes" / "evaluate.py"
TRAIN = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "3000", "--eval-limit", "64",
         "--epochs", "2", "--steps", "2", "--eval-steps", "2",
         "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]
SUMMARY_KEYS = {"clean_acc", "pgd", "eps_sweep", "steps_sweep", "autoattack", "worst_case_acc", "eval_samples",
                "checkpoint", "run_dir", "model", "dataset", "split", "norm", "eps", "seed", "batch_size", "world_size",
                "device", "eval_s", "columns"}
PGD_KEYS = {"eps", "steps", "alpha", "restarts", "norm", "robust_acc"}


@pytest.fixture(autouse=True)
def one_thread():
    """In-process attacks on one thread, as the recipes run here (OMP_NUM_THREADS=1): torch has
    read its thread count before conftest sets that variable, and 2 threads on 2 busy cores crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def robust_run(tmp_path_factory):
    """A test_resnet PGD-trained for 2 epochs on 3,000 Fashion-MNIST images by the training recipe."""
    out = tmp_path_factory.mktemp("robust") / "run"
    r = run_recipe([*TRAIN, "--output-dir", out])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


SUITE = ["--eval-limit", "16", "--batch-size", "16", "--pgd-steps", "10", "50", "--restarts", "1", "5",
         "--eps-sweep", "0", "0.05", "0.1", "0.15", "0.2", "0.3", "--steps-sweep", "1", "3", "10"]
AUTOATTACK = {"eps": 0.1, "version": "standard", "norm": "linf", "num_classes": 10,
              "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "target_classes": 9}


@pytest.fixture(scope="module")
def suite(robust_run):
    """The suite on 16 test images, output to the default <run>/eval, logged to offline W&B; without
    AutoAttack, whose every attack runs its full budget on a robust model (about 35 s on 2 cores):
    test_autoattack_in_the_suite (slow) runs it here, and test_transformers's evaluation runs it
    through this recipe in the fast suite."""
    r = run_recipe(["--checkpoint", robust_run, *SUITE, "--no-autoattack", "--wandb"], env={"WANDB_MODE": "offline"},
                   script=EVAL)
    assert r.returncode == 0, r.stderr[-3000:]
    out = robust_run / "eval"
    return json.loads((out / "eval_summary.json").read_text()), out


def test_stronger_attacks_find_more_adversarial_examples(suite):
    s, _ = suite
    pgd10, pgd50 = s["pgd"]
    assert (pgd10["steps"], pgd10["restarts"], pgd50["steps"], pgd50["restarts"]) == (10, 1, 50, 5)
    assert pgd50["robust_acc"] <= pgd10["robust_acc"] <= s["clean_acc"]
    assert s["worst_case_acc"] <= pgd50["robust_acc"] and s["autoattack"] is None
    assert 0 < pgd50["robust_acc"], "the PGD-trained model keeps some robustness"
    assert pgd10["robust_acc"] < s["clean_acc"] - 0.05, "PGD-10 finds adversarial examples"


@pytest.mark.slow  # test_transformers's test_evaluate_runs_pgd_and_autoattack_on_it: AutoAttack <= PGD, fast
def test_autoattack_in_the_suite(robust_run, tmp_path):
    r = run_recipe(["--checkpoint", robust_run, *SUITE, "--output-dir", tmp_path], script=EVAL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AutoAttack standard" in r.stdout
    s = json.loads((tmp_path / "eval_summary.json").read_text())
    assert s["autoattack"] == {**AUTOATTACK, "robust_acc": pytest.approx(s["autoattack"]["robust_acc"])}
    assert 0 < s["autoattack"]["robust_acc"] <= s["pgd"][1]["robust_acc"], "AA <= PGD-50, some robustness kept"
    assert s["worst_case_acc"] <= s["autoattack"]["robust_acc"]


def test_robust_accuracy_falls_as_eps_grows(suite):
    s, _ = suite
    eps = [r["eps"] for r in s["eps_sweep"]]
    ra = [r["robust_acc"] for r in s["eps_sweep"]]
    assert eps == [0, 0.05, 0.1, 0.15, 0.2, 0.3]
    assert ra[0] == s["clean_acc"]
    assert all(b <= a for a, b in zip(ra, ra[1:])), ra
    assert ra[-1] < ra[0] / 2
    assert s["eps_sweep"][2]["robust_acc"] == s["pgd"][0]["robust_acc"], "same attack, same seeds, same result"
    steps = {r["steps"]: r["robust_acc"] for r in s["steps_sweep"]}
    assert steps[10] <= steps[1]


def test_outputs_have_the_documented_keys(suite):
    s, out = suite
    assert SUMMARY_KEYS <= set(s)
    assert s["model"]["backbone"] == "test_resnet" and s["eps"] == 0.1 and s["norm"] == "linf"
    assert s["eval_samples"] == 16 and s["world_size"] == 1 and s["device"] == "cpu" and s["split"] == "test"
    assert all(set(r) == PGD_KEYS for r in s["pgd"] + s["eps_sweep"] + s["steps_sweep"])
    with open(out / "per_sample.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and [int(r["index"]) for r in rows] == list(range(16))
    assert list(rows[0])[:3] == ["index", "label", "clean"] and set(list(rows[0])[3:]) == set(s["columns"])
    for name, record in s["columns"].items():
        flags = np.array([int(r[name]) for r in rows])
        assert flags.mean() == pytest.approx(record["robust_acc"])
        assert (flags <= np.array([int(r["clean"]) for r in rows])).all(), "robust implies clean-correct"
    for png in ("ra_vs_eps.png", "ra_vs_steps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image
        assert matplotlib.image.imread(out / png).ndim == 3
    assert list((out / "wandb").glob("offline-run-*")), "offline W&B run folder"


@pytest.mark.slow  # test_one_model compares a 2-rank run's figures with evaluate.py in the fast suite
def test_two_ranks_give_the_counts_of_one_rank(robust_run, tmp_path):
    args = ["--eval-limit", "60", "--batch-size", "16", "--pgd-steps", "5", "--restarts", "2",
            "--eps-sweep", "0.05", "--steps-sweep", "--no-autoattack"]
    one = run_recipe(["--checkpoint", robust_run / "checkpoints", *args, "--output-dir", tmp_path / "one"],
                     script=EVAL)
    assert one.returncode == 0, one.stderr[-3000:]
    tag = (robust_run / "checkpoints" / "latest").read_text()
    two = run_deepspeed(EVAL, ["--checkpoint", robust_run / "checkpoints" / tag / MODEL_FILE, *args,
                               "--output-dir", tmp_path / "two"])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    s1, s2 = (json.loads((tmp_path / k / "eval_summary.json").read_text()) for k in ("one", "two"))
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s1["columns"] == s2["columns"] and s1["clean_acc"] == s2["clean_acc"]
    assert (tmp_path / "one" / "per_sample.csv").read_text() == (tmp_path / "two" / "per_sample.csv").read_text()
    assert 0 < s1["pgd"][0]["robust_acc"] < s1["clean_acc"]


def test_blocks_are_the_same_on_any_number_of_ranks():
    one = BlockSampler(70, 16, 0, 1).ranges()
    two = [BlockSampler(70, 16, r, 2).ranges() for r in range(2)]
    assert one == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]
    assert two == [[(0, 16), (32, 48), (64, 70)], [(16, 32), (48, 64)]]


def test_l2_threat_model(robust_run, fmnist):
    """PGD-L2 and AutoAttack-L2 through the library: RA falls with the radius, AA <= PGD."""
    model, _ = load_model(find_checkpoint(robust_run / "checkpoints"))
    specs = [PGDSpec(e, 10, norm="l2") for e in (0.5, 1.0, 2.0, 4.0)] + [AutoAttackSpec(4.0, "l2")]
    table = sample_table(model, fmnist.test.subset(32), specs, torch.device("cpu"), batch_size=32)
    ra = [table.acc(s.name) for s in specs]
    assert table.acc("clean") > 0.5
    assert all(b <= a for a, b in zip(ra[:4], ra[1:4])) and ra[3] < ra[0] < table.acc("clean")
    assert ra[4] <= ra[3]
    assert specs[0].alpha == pytest.approx(2.5 * 0.5 / 10)


@pytest.fixture(scope="module")
def recipe():
    return recipe_module(EVAL)


def _one_line_error(recipe, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: recipe.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


BAD_ARGS = [
    (["--eps", "-0.1"], "eps must lie in [0, 1] for linf"),
    (["--eps", "1.5"], "eps must lie in [0, 1] for linf, got 1.5"),
    (["--eps-sweep", "0.1", "2"], "eps must lie in [0, 1] for linf, got 2.0"),
    (["--norm", "l2", "--eps", "-1"], "eps must be >= 0, got -1.0"),
    (["--norm", "l1"], "argument --norm: invalid choice: 'l1'"),
    (["--eps", "abc"], "argument --eps: not a number: 'abc'"),
    (["--restarts", "0"], "--restarts must be >= 1, got 0"),
    (["--pgd-steps", "10", "50", "--restarts", "1", "2", "3"], "--restarts takes one value or one per"),
    (["--backbone", "test_efficientnet"], "does not fit backbone 'test_efficientnet'"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "--data-dir /nonexistent does not exist"),
    (["--split", "holdout"], "--split holdout: the run held out no training images (--holdout 0)"),
    (["--split", "holdout", "--dataset", "mnist"], "the held-out images are the run's own dataset's (fashion_mnist)"),
    (["--split", "val"], "argument --split: invalid choice: 'val'"),
]


@pytest.mark.parametrize("args, message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_settings_exit_with_one_line(recipe, robust_run, capsys, args, message):
    assert message in _one_line_error(recipe, ["--checkpoint", str(robust_run), *args], capsys)


def test_bad_checkpoints_exit_with_one_line(recipe, robust_run, tmp_path, capsys):
    good = find_checkpoint(robust_run)
    assert good.name == MODEL_FILE and run_dir(good) == robust_run.resolve()
    assert "--checkpoint /nonexistent does not exist" in _one_line_error(
        recipe, ["--checkpoint", "/nonexistent"], capsys)
    (tmp_path / "empty").mkdir()
    assert "no checkpoint in" in _one_line_error(recipe, ["--checkpoint", str(tmp_path / "empty")], capsys)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:4000])
    assert "cannot read checkpoint" in _one_line_error(recipe, ["--checkpoint", str(truncated)], capsys)
    other = tmp_path / "other.pt"
    torch.save({"module": {"w": torch.zeros(2)}}, other)
    assert "not a dat-ds checkpoint" in _one_line_error(recipe, ["--checkpoint", str(other)], capsys)
    model, meta = load_model(good)
    assert meta["backbone"] == "test_resnet" and not model.training


def test_a_corrupt_checkpoint_fails_cleanly_from_the_command_line(robust_run, tmp_path):
    bad = tmp_path / "checkpoints" / "epoch0000" / MODEL_FILE
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x00" * 1000)
    (tmp_path / "checkpoints" / "latest").write_text("epoch0000")
    r = run_recipe(["--checkpoint", tmp_path], script=EVAL, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "is not a checkpoint" in lines[0] and MODEL_FILE in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "eval").exists()


def test_holdout_split_of_older_checkpoints_comes_from_the_run_config(recipe, tmp_path):
    """A checkpoint saved before checkpoints recorded their held-out split: the run folder's
    config.json says it where the run gave --holdout; otherwise a clear refusal."""
    with pytest.raises(ValueError, match="does not record its held-out split"):
        recipe.holdout_split({}, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"holdout": 500, "train_limit": None}))
    assert recipe.holdout_split({}, tmp_path) == {"samples": 500, "train_limit": None}
    recorded = {"holdout": {"samples": 64, "train_limit": 384}}
    assert recipe.holdout_split(recorded, tmp_path) == recorded["holdout"]  # the checkpoint's own record first
    with pytest.raises(ValueError, match="--data-placement local"):
        recipe.holdout_split({"placement": {"groups": [[0]]}, **recorded}, tmp_path)

"""Progress of long evaluations as plain lines: readable when stderr is a file, at a bounded rate."""
import io

import torch

from conftest import ROOT, run_recipe
from dat_ds.evaluate import PGDSpec, sample_table
from dat_ds.progress import EvalProgress


class Clock:
    """A clock the test moves: each reading advances it by ``step`` seconds."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def lines(every: float, step: float, batches: int, names) -> list:
    out = io.StringIO()
    p = EvalProgress(every=every, stream=out, clock=Clock(step), enabled=True)
    p.begin(batches, batches, names)
    for b in range(batches):
        for name in names:
            with p.step(b, name):
                pass
        p.batch_done()
    p.end()
    return out.getvalue().splitlines()


def test_the_first_batch_names_every_evaluation_then_the_rate_is_bounded():
    names = ["pgd10x1", "pgd50x1", "autoattack"]
    out = lines(every=5.0, step=1.0, batches=10, names=names)  # every clock reading is 1 s later
    assert out[0] == "evaluating: 10 batches of rank 0 x 3 evaluations: pgd10x1, pgd50x1, autoattack"
    assert out[1:3] == ["evaluating: pgd10x1 batch 1/10, 1.0 s", "evaluating: pgd10x1 batch 1/10 done in 1.0 s"]
    first = [line for line in out if "batch 1/10" in line]
    assert len(first) == 6 and all(any(n in line for line in first) for n in names), "each one's start and end"
    later = out[7:-1]
    assert later and all(" done in " not in line for line in later), "a 1 s evaluation's end is not reported"
    assert len(later) <= (60 - 7) // 5 + 1, "at most one line per 5 s of the run's 60 clock seconds"
    assert "about" in later[0] and "s left" in later[0], "after a batch, an estimate of the rest"
    assert out[-1].startswith("evaluating: done, 10 batches in ")


def test_a_long_evaluation_reports_its_end_and_a_quiet_reporter_says_nothing():
    out = lines(every=5.0, step=6.0, batches=3, names=["autoattack"])  # every evaluation takes 6 s
    assert sum(" done in 6.0 s" in line for line in out) == 3
    none = lines(every=5.0, step=1.0, batches=0, names=[])
    assert none[0] == "evaluating: 0 batches of rank 0 x 0 evaluations: clean only"
    quiet = io.StringIO()
    p = EvalProgress(stream=quiet, enabled=False)
    p.begin(2, 2, ["pgd"])
    with p.step(0, "pgd"):
        pass
    p.end()
    assert quiet.getvalue() == ""


def tiny_model():
    from dat_ds.models import create_model
    torch.manual_seed(0)
    return create_model("test_resnet", 10, 1, 28, (0.286,), (0.353,), stem="native")


def test_sample_table_reports_each_evaluation_per_batch(fmnist):
    out = io.StringIO()
    specs = [PGDSpec(0.1, steps=1), PGDSpec(0.1, steps=2)]
    sample_table(tiny_model(), fmnist.test.subset(24), specs, torch.device("cpu"), batch_size=8,
                 progress=EvalProgress(every=0.0, stream=out, enabled=True))
    text = out.getvalue()
    for spec in specs:
        for batch in (1, 2, 3):
            assert f"evaluating: {spec.name} batch {batch}/3, " in text
            assert f"evaluating: {spec.name} batch {batch}/3 done in " in text


def test_evaluate_recipe_prints_progress_lines_to_a_file(tmp_path):
    """stderr is a pipe here, as in a batch job's log: the lines are there all the same."""
    model = tiny_model()
    meta = {"backbone": "test_resnet", "stem": "native", "dataset": "fashion_mnist", "num_classes": 10, "in_chans": 1,
            "img_size": 28, "mean": [0.286], "std": [0.353], "classes": None, "attack": "pgd", "eps": 0.1}
    torch.save({"module": model.state_dict(), "meta": meta}, tmp_path / "mp_rank_00_model_states.pt")
    r = run_recipe(["--checkpoint", tmp_path, "--eval-limit", "16", "--batch-size", "8", "--pgd-steps", "2",
                    "--steps-sweep", "--eps-sweep", "0.05", "--no-autoattack", "--progress-every", "0",
                    "--output-dir", tmp_path / "eval"], script=ROOT / "recipes" / "evaluate.py")
    assert r.returncode == 0, r.stderr[-3000:]
    progress = [line for line in r.stderr.splitlines() if line.startswith("evaluating: ")]
    assert progress[0] == ("evaluating: 2 batches of rank 0 x 2 evaluations: pgd2x1_linf_eps0.1, "
                           "pgd2x1_linf_eps0.05")
    for name in ("pgd2x1_linf_eps0.1", "pgd2x1_linf_eps0.05"):
        for batch in (1, 2):
            assert any(line.startswith(f"evaluating: {name} batch {batch}/2, ") for line in progress)
            assert any(line.startswith(f"evaluating: {name} batch {batch}/2 done in ") for line in progress)
    assert progress[-1].startswith("evaluating: done, 2 batches in ")
    assert "\r" not in r.stderr, "no bar redrawn with carriage returns"

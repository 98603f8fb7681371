"""README.md as a tested contract: every fenced block runs here at tiny sizes, or README.md marks it
(``<!-- readme-test: skip (reason) -->`` / ``<!-- readme-test: output -->``).

How a block runs, in a scratch folder a user's shell would stand in (links to recipes/, ds_configs/,
the Makefile, hostfile.example, the venv; a copy of bench/, whose scripts write next to themselves);
blocks share the folder of their WORKSPACE and run in README order, so one block's run is the next
one's checkpoint:
* shell: each command in turn. A recipe or benchmark command gets the run-length flags of TINY (a
  value given is replaced, a missing flag appended), PLACEHOLDERS are replaced by what the test
  made for them, and the deepspeed launcher a free ``--master_port``. ``make TARGET`` runs the
  commands ``make -n TARGET`` prints, rewritten the same way (``make test``, this suite itself,
  is only printed).
* transcript (``$ command`` lines, then output): the command runs, every output line must appear.
* python: in a fresh interpreter after the block's PRELUDE (the names the README leaves to the
  reader: ``images``, ``x``, ``model``), then its THEN checks; tracebacks name README.md's lines.
  A block that starts ``# NAME.py`` is that file (``(continued)``: appended), written for the
  commands after it.
Every command is printed as it ran. Blocks in FAST run in ``make test``; the rest are slow.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT, clean_env, run_group
from readme_blocks import commands, console, is_console, parse, script_of, set_flags, split, substitute

README = ROOT / "README.md"
BLOCKS = parse(README)

# Run-length flags per script.
RUN = {"--epochs": ["1"], "--train-limit": ["128"], "--eval-limit": ["32"], "--eval-steps": ["1"]}
TINY = {
    "recipes/fashion_mnist_dat.py": RUN,
    "recipes/smooth_at.py": RUN,
    "recipes/finetune.py": RUN,
    "recipes/imagenet_dat.py": {"--epochs": ["1"], "--eval-steps": ["1"]},  # on the 36 images the test writes
    "recipes/semisup_dat.py": {**RUN, "--train-limit": ["640"], "--teacher-epochs": ["1"]},  # 10% labeled: 64
    "recipes/evaluate.py": {"--eval-limit": ["16"], "--pgd-steps": ["2"], "--steps-sweep": ["1", "2"]},
    "recipes/certify.py": {"--eval-limit": ["2"], "--N": ["200"], "--N0": ["20"], "--batch-size": ["100"]},
    "recipes/export.py": {},
    "bench/transfer.py": {"--pretrain-limit": ["128"], "--pretrain-epochs": ["1"], "--target-limit": ["128"],
                          "--epochs": ["1"], "--eval-limit": ["32"], "--steps": ["1"]},
}
# PGD-1 for the recipes' default PGD-10, where a command keeps it (another --attack may not take --steps).
PGD_RECIPES = {"recipes/fashion_mnist_dat.py", "recipes/finetune.py", "recipes/semisup_dat.py"}
PGD_TINY = {"--steps": ["1"]}
# Placeholders of the README's commands -> what the test makes for them (MAKE_FILES).
PLACEHOLDERS = {"DATA": "data/imagenet", "DIR": "data/pool/train", "runs/std": "runs/rst/teacher"}
MAKE = {"demo": "run", "test": "print"}
# adding-an-attack-2 is slow: adding-a-compressor-2 trains with the same plugin attack (and its compressor)
FAST = {"recipes-1", "smooth-at-and-certification-2", "adding-an-attack-1", "adding-a-compressor-1",
        "adding-a-compressor-2", "adding-a-dataset-1", "adding-a-backbone-source-1", "library-use-1"}
WORKSPACE = {"export-1": "export"}  # its runs/fmnist has timm's own stem; the fine-tuning block's has not
NEEDS = {"evaluation-1": "quick-start-1"}  # evaluates runs/demo
# Commands before a block: the run and export the README's Export section describes in its text.
SETUP = {"export-1": [
    "python recipes/fashion_mnist_dat.py --backbone test_resnet --stem native --output-dir runs/fmnist",
    "python recipes/export.py --checkpoint runs/fmnist --out exported/fmnist",
    "python recipes/fashion_mnist_dat.py --backbone transformers:vit_tiny --output-dir runs/run",
    "python recipes/export.py --checkpoint runs/run --out exported/run",
]}
PRELUDE = {
    "export-1": """
import torch
from PIL import Image
images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
pil_images = [Image.fromarray((im[0] * 255).byte().numpy()) for im in images]
""",
    "smooth-at-and-certification-2": """
import torch
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
x = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0))
""",
    "library-use-1": """
import torch
x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
y = torch.tensor([0, 1, 2, 3])
""",
}
THEN = {
    "export-1": "assert logits.shape == (4, 10) and torch.isfinite(logits).all()",
    "smooth-at-and-certification-2": """
assert label == smoothing.ABSTAIN or 0 <= label < 10
assert isinstance(radius, float) and radius >= 0
""",
    "library-use-1": """
assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
assert x_adv.shape == x.shape and not torch.equal(x_adv, x)
""",
    "adding-an-attack-1": "assert 'jitter_fgsm' in ATTACKS.names()",
    "adding-a-compressor-1": "assert 'fp16_mean' in COMPRESSORS.names()",
    "adding-a-dataset-1": "assert 'my_npz' in DATASETS.names()",
    "adding-a-backbone-source-1": "assert 'mine' in SOURCES.names()",
}


def output_of(ws, block_id):
    """What a block's run must leave behind (beyond exit codes 0)."""
    expect = {
        "quick-start-1": ["runs/demo/metrics.jsonl", "runs/demo/summary.json", "runs/demo/config.json",
                          "runs/demo/checkpoints/latest"],
        "multi-node-2": ["runs/imagenet_try/summary.json"],
        "smooth-at-and-certification-1": ["runs/smooth_at/certify/certify_summary.json",
                                          "runs/smooth_at/certify/certify.tsv"],
        "semi-supervised-dat-1": ["runs/rst/summary.json", "runs/lab/summary.json", "runs/rst_dir/summary.json",
                                  "runs/rst/pseudo_labels.npz"],
        "fine-tuning--robust-transfer-1": ["runs/ft/summary.json", "runs/sc/summary.json",
                                           "runs/ft_5_9/eval/eval_summary.json"],
        "fine-tuning--robust-transfer-2": ["bench/results/transfer.json"],
        "evaluation-1": ["runs/demo/eval/eval_summary.json", "runs/demo/eval/per_sample.csv",
                         "runs/demo/eval/ra_vs_eps.png"],
    }
    return [ws.path / p for p in expect.get(block_id, [])]


def imagenet_folder(ws):
    from test_data_images import write_folder
    write_folder(ws.path / "data" / "imagenet", classes=3, n_train=12, n_val=4, size=32)


def image_pool(ws):
    from test_data_images import write_folder
    write_folder(ws.path / "data" / "pool", classes=3, n_train=8, n_val=1, size=20)


def vit_folder(ws):
    from test_transformers import save_tiny
    save_tiny(ws.path / "vit_tiny", "vit")


MAKE_FILES = {"multi-node-2": imagenet_folder, "semi-supervised-dat-1": image_pool, "export-1": vit_folder}

# Runs a list of (id, filename or None, code) in one interpreter; the blocks of one file share a namespace.
RUNNER = r"""
import json, sys, traceback
results, spaces = {}, {}
for block_id, filename, prelude, line, code, then in json.load(open(sys.argv[1])):
    ns = spaces.setdefault(filename, {"__name__": "__readme__"}) if filename else {"__name__": "__readme__"}
    try:
        exec(compile(prelude, "<prelude>", "exec"), ns)
        exec(compile("\n" * line + code, "README.md", "exec"), ns)
        exec(compile(then, "<check>", "exec"), ns)
        results[block_id] = None
    except BaseException:
        results[block_id] = traceback.format_exc()
json.dump(results, open(sys.argv[2], "w"))
"""


def file_name(block):
    """``my_methods.py`` for a block that starts ``# my_methods.py`` (or ``# my_methods.py (continued)``)."""
    first = block.text.splitlines()[0] if block.text else ""
    word = first[2:].split()[0] if first.startswith("# ") and len(first) > 2 else ""
    return word if word.endswith(".py") else None


class Workspace:
    """A scratch folder standing in for the repository root, as a user's shell would."""

    def __init__(self, path: Path):
        self.path, self.done, self.python_results = path, set(), {}
        for name in ("recipes", "ds_configs", "hostfile.example", "Makefile"):
            (path / name).symlink_to(ROOT / name)
        (path / ".venv").symlink_to(Path(sys.prefix))
        shutil.copytree(ROOT / "bench", path / "bench", ignore=shutil.ignore_patterns("*.md", "results", "plots",
                                                                                        "__pycache__"))
        (path / "bench" / "results").mkdir()
        ext = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
        self.env = clean_env({"TORCH_EXTENSIONS_DIR": ext, "DS_ACCELERATOR": "cpu"})

    def write_files(self, before_line: int):
        """The README's files (``# NAME.py`` blocks) as they stand above ``before_line``."""
        texts = {}
        for b in BLOCKS:
            if b.line < before_line and b.lang == "python" and file_name(b):
                texts[file_name(b)] = texts.get(file_name(b), "") + b.text
        for name, text in texts.items():
            (self.path / name).write_text(text)

    def exec(self, argv, timeout=900, shell=False):
        """Run in the workspace in its own process group (its ranks end with it on a timeout)."""
        print("$", argv if shell else " ".join(map(str, argv)), flush=True)
        return run_group(argv, self.env, timeout, cwd=self.path, shell=shell)

    def run(self, cmd: str):
        """One README command, rewritten as the module docstring says."""
        argv = split(cmd)
        if argv[:1] == ["make"]:
            return self.make(argv[1])
        script = script_of(argv)
        if script is None:
            return self.exec(cmd, shell=True)
        assert script in TINY, f"{script} has no tiny sizes in tests/test_readme.py TINY"
        argv = substitute(argv, PLACEHOLDERS)
        k = argv.index(script)
        args, tiny = argv[k + 1:], TINY[script]
        if script in PGD_RECIPES and not any(a.split("=")[0] == "--attack" for a in args):
            tiny = {**tiny, **PGD_TINY}
        return self.exec([*self.launcher(argv[:k]), script, *set_flags(args, tiny)])

    def launcher(self, argv):
        from dat_ds.dist import free_port
        name = Path(argv[0]).name if argv else ""
        if name in ("python", "python3") and len(argv) == 1:
            return [sys.executable]
        if name == "deepspeed":
            port = [] if "--master_port" in argv else ["--master_port", str(free_port())]
            return [str(Path(sys.executable).with_name("deepspeed")), *port, *argv[1:]]
        raise AssertionError(f"no rule to run {' '.join(argv)!r} here")

    def check(self, cmd: str):
        r = self.run(cmd)
        assert r.returncode == 0, f"`{cmd}` exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    def make(self, target: str):
        assert target in MAKE, f"make {target}: not in tests/test_readme.py MAKE"
        r = self.exec(["make", "-n", "-o", ".venv/.installed", target])
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        if MAKE[target] == "run":
            for cmd in commands(r.stdout):
                self.check(cmd)
        return r

    def python(self, blocks):
        """Run python blocks in one interpreter; ``{id: None or the traceback}``."""
        spec = [(b.id, file_name(b), PRELUDE.get(b.id, ""), b.line, b.text, THEN.get(b.id, "")) for b in blocks]
        (self.path / ".readme_spec.json").write_text(json.dumps(spec))
        r = self.exec([sys.executable, "-c", RUNNER, ".readme_spec.json", ".readme_results.json"], timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.loads((self.path / ".readme_results.json").read_text())


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = Workspace(tmp_path_factory.mktemp(f"readme_{name}"))
        return made[name]
    return get


def run_block(ws, block):
    ws.write_files(block.line)
    if block.id in MAKE_FILES:
        MAKE_FILES[block.id](ws)
    for cmd in SETUP.get(block.id, []):
        ws.check(cmd)
    if block.lang == "python":
        if block.id not in ws.python_results:  # the fast ones in one interpreter
            batch = [b for b in BLOCKS if b.lang == "python" and b.mark == "run" and b.id in FAST
                     and WORKSPACE.get(b.id, "main") == WORKSPACE.get(block.id, "main")]
            ws.python_results.update(ws.python(batch if block.id in FAST else [block]))
        assert ws.python_results[block.id] is None, ws.python_results[block.id]
    elif is_console(block):
        for cmd, expected in console(block.text):
            r = ws.run(cmd)
            out = r.stdout + r.stderr
            missing = [line for line in expected if line not in out]
            assert not missing, f"`{cmd}` did not print {missing}:\n{out[-3000:]}"
            if any(": error:" in line for line in expected):
                assert r.returncode == 2, f"`{cmd}` exited {r.returncode}, not 2 (bad input)"
    else:
        for cmd in commands(block.text):
            ws.check(cmd)
    missing = [str(p) for p in output_of(ws, block.id) if not p.exists()]
    assert not missing, f"{block.where} left no {missing}"
    ws.done.add(block.id)


def params():
    for b in BLOCKS:
        marks = [] if b.id in FAST else [pytest.mark.slow, pytest.mark.timeout(2400)]
        if b.mark == "skip":
            marks.append(pytest.mark.skip(reason=f"{b.where}: {b.reason}"))
        elif b.mark == "output":
            marks.append(pytest.mark.skip(reason=f"{b.where}: output, nothing to run"))
        yield pytest.param(b, id=b.id, marks=marks)


@pytest.mark.parametrize("block", params())
def test_readme_block(block, workspaces):
    ws = workspaces(WORKSPACE.get(block.id, "main"))
    need = NEEDS.get(block.id)
    if need and need not in ws.done:
        run_block(ws, next(b for b in BLOCKS if b.id == need))
    run_block(ws, block)


def test_every_table_names_a_block_and_setup_quotes_the_readme():
    ids = {b.id for b in BLOCKS}
    for table in (FAST, WORKSPACE, NEEDS, SETUP, PRELUDE, THEN, MAKE_FILES):
        assert set(table) <= ids, f"tests/test_readme.py names blocks the README no longer has: {set(table) - ids}"
    assert all(b.mark == "run" for b in BLOCKS if b.id in FAST)
    text = README.read_text()
    assert "python recipes/export.py --checkpoint runs/fmnist --out exported/fmnist" in text


def census() -> str:
    """One line for the test session's summary."""
    run = [b for b in BLOCKS if b.mark == "run"]
    fast = sum(b.id in FAST for b in run)
    skip = [b.id for b in BLOCKS if b.mark == "skip"]
    out = sum(b.mark == "output" for b in BLOCKS)
    return (f"README.md: {len(BLOCKS)} fenced blocks, {len(run)} run ({fast} fast, {len(run) - fast} slow), "
            f"{len(skip) + out} marked ({len(skip)} skip: {', '.join(skip)}; {out} output)")


def test_tiny_flags_replace_given_values_and_append_missing_ones():
    argv = ["--output-dir", "runs/x", "--epochs", "5", "--pgd-steps", "10", "50", "--eval-limit=1000", "--wandb"]
    got = set_flags(argv, {"--epochs": ["1"], "--pgd-steps": ["2"], "--eval-limit": ["16"], "--train-limit": ["128"]})
    assert got == ["--output-dir", "runs/x", "--wandb", "--epochs", "1", "--pgd-steps", "2", "--eval-limit", "16",
                   "--train-limit", "128"]
    assert substitute(["--data-dir", "DATA", "--teacher", "runs/std"], PLACEHOLDERS) == [
        "--data-dir", "data/imagenet", "--teacher", "runs/rst/teacher"]


def test_commands_join_continuations_and_drop_comments():
    text = "# a comment\ndeepspeed --num_gpus 2 recipes/x.py \\\n    --epochs 2   # trailing\n\necho done\n"
    assert commands(text) == ["deepspeed --num_gpus 2 recipes/x.py      --epochs 2   # trailing", "echo done"]
    assert split(commands(text)[0]) == ["deepspeed", "--num_gpus", "2", "recipes/x.py", "--epochs", "2"]


@pytest.mark.parametrize("mark, error", [
    ("<!-- readme-test: skip -->", "a mark reads"),  # no reason
    ("<!-- readme-test: skipp (typo) -->", "a mark reads"),
    ("<!-- readme-test: output -->\n\nA paragraph.", "not right before a fenced block"),
])
def test_a_malformed_or_stray_mark_names_its_line(tmp_path, mark, error):
    md = tmp_path / "README.md"
    md.write_text(f"# T\n\ntext\n\n{mark}\n```bash\necho hi\n```\n")
    with pytest.raises(ValueError, match=error) as e:
        parse(md)
    assert "README.md:5" in str(e.value)
    md.write_text("# T\n\n<!-- readme-test: skip (needs two hosts) -->\n```bash\nssh a\n```\n\n```python\n1\n```\n")
    assert [(b.id, b.mark, b.reason, b.line) for b in parse(md)] == [
        ("t-1", "skip", "needs two hosts", 4), ("t-2", "run", "", 8)]

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(ROOT / "bench"))  # the benchmarks' helpers (bench/common.py) serve the tests too
from common import fill_disk  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    """Tests that start real ranks are marked ``distributed``; ``gpu`` ones skip without CUDA."""
    import inspect
    for item in items:
        fn = getattr(item, "function", None)
        try:
            source = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            source = ""
        if "run_deepspeed" in source or "deepspeed_launch" in source:
            item.add_marker(pytest.mark.distributed)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def pytest_terminal_summary(terminalreporter):
    """How much of README.md the suite runs (tests/test_readme.py), when that file was collected."""
    readme = sys.modules.get("test_readme")
    if readme is not None:
        terminalreporter.write_line(readme.census())


@pytest.fixture(scope="session")
def fmnist():
    """The real Fashion-MNIST test split (10,000 images) from the IDX files."""
    from dat_ds.data import load_dataset
    return load_dataset("fashion_mnist")


@pytest.fixture(scope="session")
def trained_model(fmnist):
    """A small naturally trained classifier (test_resnet, timm stem) on 8,000 training images."""
    from dat_ds.models import create_model
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 1, 28, fmnist.mean, fmnist.std, stem="native")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = fmnist.train
    for epoch in range(2):
        perm = torch.randperm(8000)
        for i in range(0, 8000, 128):
            x, y = train.__getitems__(perm[i:i + 128].tolist())
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="session")
def test_batch(fmnist):
    return fmnist.test.__getitems__(list(range(512)))


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
             "CROSS_SIZE")


def clean_env(extra=None):
    """The test process's environment without the one-rank world some in-process tests create."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_recipe(args, env=None, timeout=600, script="recipes/fashion_mnist_dat.py"):
    """Run a recipe as a user would; returns the CompletedProcess."""
    import subprocess
    full_env = clean_env(env)
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def recipe_module(script="recipes/fashion_mnist_dat.py"):
    """A recipe's module, loaded from its file (recipes are scripts, not a package); ``script`` is a
    path, absolute or from the repository's root."""
    import importlib.util
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused_in_process(args, monkeypatch, capsys, script="recipes/fashion_mnist_dat.py"):
    """A command line the recipe refuses, run as its ``__main__`` runs it (``cli.run(main)``) in this
    process, without a subprocess's seconds of imports: returns (exit code, the stderr lines that
    name an error, the whole stderr). Bad input stops before any process group forms."""
    from dat_ds import cli
    monkeypatch.setattr(sys, "argv", [Path(script).name, *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.run(recipe_module(script).main)
    err = capsys.readouterr().err
    return exit_.value.code, [line for line in err.strip().splitlines() if "error" in line], err


def run_deepspeed(script, args, num_ranks=2, timeout=900, env=None, port=None):
    """Launch ``script`` on ``num_ranks`` CPU ranks with the real deepspeed launcher (gloo)."""
    import subprocess
    from dat_ds.dist import free_port
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", str(num_ranks), "--master_port", str(port or free_port()), str(script),
           *map(str, args)]
    full_env = clean_env(env)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_group(cmd, env, timeout, cwd=ROOT, shell=False):
    """Run ``cmd`` in its own process group; on a timeout the whole group (a launcher's ranks) ends."""
    import signal
    import subprocess
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, shell=shell, executable="/bin/bash" if shell else None)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` with ``options`` (e.g. ``size=1m`` or ``size=1m,ro``; the tests run
    as root); the test is skipped where mounting is not permitted. Unmounted on exit."""
    import subprocess
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)



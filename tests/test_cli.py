"""The recipes' command lines as a user meets them: --help says what every flag does and its default,
a refused command line is a short usage line and one error naming the closest flag, and under the
launcher an error is printed once per job, not once per rank."""
import argparse
import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT, recipe_module, run_deepspeed

RECIPES = sorted((ROOT / "recipes").glob("*.py"))
LAUNCHER_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d ")  # the deepspeed launcher's own log lines


def flags(parser):
    """``(action, its --help text)`` for every flag a user can give."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
            yield action, formatter._expand_help(action) if action.help else ""


def _described(choice, text) -> bool:
    """``text`` says what ``choice`` does: ``choice: ...``."""
    return re.search(rf"(?<![\w-]){re.escape(str(choice))}:", text) is not None


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_flag_says_what_it_does_and_its_default(path):
    parser = recipe_module(path).parser()
    for action, text in flags(parser):
        flag = "/".join(action.option_strings)
        assert len(text.split()) >= 3, f"{path.name} {flag}: no help text"
        default = action.default
        if not any(default is none for none in (None, False, argparse.SUPPRESS)) and default != []:
            shown = [str(default)] + ([" ".join(map(str, default))] if isinstance(default, (list, tuple)) else [])
            assert any(s in text for s in shown), f"{path.name} {flag}: --help does not show the default {default!r}"
        if action.choices and sum(_described(c, text) for c in action.choices) >= 2:  # it describes the choices
            missing = [c for c in action.choices if not _described(c, text)]
            assert not missing, f"{path.name} {flag}: the help describes some choices but not {missing}"


def test_training_flags_read_as_what_they_do():
    from dat_ds import attacks, compress, objectives
    parser = recipe_module(ROOT / "recipes" / "fashion_mnist_dat.py").parser()
    texts = {a.dest: t for a, t in flags(parser)}
    assert parser.parse_args([]).early_stop is True and parser.parse_args(["--no-early-stop"]).early_stop is False
    assert parser.parse_args(["--early-stop"]).early_stop is True
    for dest, registry in (("attack", attacks.ATTACKS), ("loss", objectives.OBJECTIVES),
                           ("compressor", compress.COMPRESSORS)):
        assert all(f"{name}: " in texts[dest] for name in registry.names()), texts[dest]
    assert "hf:" in texts["img_size"] and "imagefolder" in texts["img_size"]


def run_in_process(script, argv, monkeypatch, capsys):
    """``cli.run(main)`` of a recipe in this process: ``(exit code, stderr lines)``."""
    from dat_ds import cli
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.run(recipe_module(ROOT / "recipes" / script).main)
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("script, argv, message", [
    ("fashion_mnist_dat.py", ["--epocs", "2"], "unrecognized arguments: --epocs 2 (did you mean --epochs?)"),
    ("fashion_mnist_dat.py", ["--attack", "pgdd"], "argument --attack: invalid choice: 'pgdd' (choose from"),
    ("evaluate.py", ["--chekpoint", "runs/x"], "unrecognized argument --chekpoint (did you mean --checkpoint?)"),
    ("evaluate.py", ["--checkpoint", "runs/x", "--no-autoatack"],
     "unrecognized arguments: --no-autoatack (did you mean --no-autoattack?)"),
    ("export.py", ["--checkpoint", "x", "--out", "y", "--outt", "z"], "(did you mean --out?)"),
])
def test_a_refused_command_line_is_one_usage_line_and_one_error(monkeypatch, capsys, script, argv, message):
    code, lines = run_in_process(script, argv, monkeypatch, capsys)
    assert code == 2 and len(lines) == 2, lines
    assert lines[0] == f"usage: {script} [options]  ({script} --help lists them)"
    assert lines[1].startswith(f"{script}: error: ") and message in lines[1], lines
    if "invalid choice" in message:
        assert lines[1].endswith("(did you mean 'pgd'?)")


def recipe_lines(result) -> list:
    """What the ranks printed, without the launcher's log lines."""
    out = (result.stdout + result.stderr).splitlines()
    return [line for line in out if line.strip() and not LAUNCHER_LOG.match(line)]


def test_under_the_launcher_a_shared_error_is_printed_once_and_alone(tmp_path):
    r = run_deepspeed(ROOT / "recipes" / "fashion_mnist_dat.py",
                      ["--data-dir", "/nonexistent/fmnist", "--output-dir", tmp_path / "out"], timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert recipe_lines(r) == ["fashion_mnist_dat.py: error: --data-dir /nonexistent/fmnist does not exist"], \
        r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow  # test_job_lines checks the rank prefix on a real store in the fast suite
def test_under_the_launcher_an_error_of_one_rank_is_shown_with_its_rank(tmp_path):
    plugin = tmp_path / "one_rank_fails.py"
    plugin.write_text('import os\nif os.environ["RANK"] == "1":\n    raise ValueError("rank-local disk is full")\n')
    r = run_deepspeed(ROOT / "recipes" / "fashion_mnist_dat.py",
                      ["--plugin", plugin, "--train-limit", "64", "--output-dir", tmp_path / "out"], timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [line for line in recipe_lines(r) if "error" in line]
    assert errors == ["fashion_mnist_dat.py: error: rank 1: rank-local disk is full"], \
        r.stdout[-3000:] + r.stderr[-3000:]


def test_checkpoint_errors_name_the_flag_given_and_what_was_expected(monkeypatch, capsys, tmp_path):
    code, lines = run_in_process("finetune.py", ["--from", tmp_path / "missing"], monkeypatch, capsys)
    assert code == 2 and lines == [f"finetune.py: error: --from {tmp_path / 'missing'} does not exist"], lines
    code, lines = run_in_process("finetune.py", ["--from", tmp_path], monkeypatch, capsys)
    assert code == 2 and lines[-1].startswith(f"finetune.py: error: no checkpoint in --from {tmp_path}: expected")
    config = tmp_path / "ds.json"
    config.write_text('{"train_micro_batch_size_per_gpu": 32}')
    code, lines = run_in_process("evaluate.py", ["--checkpoint", config], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"evaluate.py: error: {config} is not a checkpoint but a JSON file; expected a run's "
                               "--output-dir"), lines
    assert "unpickled" not in lines[0] and "operand" not in lines[0]


def test_under_the_launcher_a_signal_to_the_ranks_stops_once_with_128_plus_n(tmp_path):
    """The README's Signals table, row 'deepspeed, the ranks only': one stop line for the job, and
    the launcher passes on the ranks' 128 + 15."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    from conftest import clean_env
    from dat_ds.dist import free_port
    from dat_ds.engine import COMPLETE
    out = tmp_path / "run"
    cmd = [Path(sys.executable).with_name("deepspeed"), "--num_gpus", "2", "--master_port", free_port(),
           str(ROOT / "recipes" / "fashion_mnist_dat.py"), "--backbone", "test_resnet", "--stem", "native",
           "--train-limit", "4000", "--eval-limit", "32", "--steps", "1", "--eval-steps", "1", "--epochs", "2",
           "--save-every", "4", "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json",
           "--output-dir", out]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        t0 = time.time()
        while not list((out / "checkpoints").glob(f"epoch0000-batch*/{COMPLETE}")):
            assert proc.poll() is None and time.time() - t0 < 300, "no mid-epoch checkpoint"
            time.sleep(0.05)
        ranks = [k for k in psutil.Process(proc.pid).children(recursive=True)
                 if "--local_rank" in " ".join(k.cmdline())]
        assert len(ranks) == 2
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    stops = [line for line in log.splitlines() if "stopped by SIGTERM" in line]
    assert len(stops) == 1 and stops[0].startswith("fashion_mnist_dat.py: stopped by SIGTERM at epoch 0"), log[-3000:]
    assert (out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / COMPLETE).is_file()

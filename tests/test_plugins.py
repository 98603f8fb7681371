"""A new attack and a new compressor, each a class in one new module registered through the public
registries, train from a recipe's command line with no other file touched; flags a chosen
component does not take are refused with one line."""

import pytest
import torch

from conftest import ROOT, refused_in_process, run_recipe

PLUGIN = '''
"""A user's module: one attack and one compressor, registered through the public registries."""
import torch
import torch.distributed as tdist

from dat_ds.attacks import ATTACKS, Attack, pgd_linf
from dat_ds.compress import COMPRESSORS, CommStats, Compressor


@ATTACKS.register("jitter_fgsm")
class JitterFGSM(Attack):
    """One signed-gradient step of (1 + jitter) eps from a uniform start in the ball."""

    def __init__(self, eps: float, jitter: float = 0.5, bn_mode: str = "eval", loss: str = "ce"):
        super().__init__(eps, bn_mode, loss)
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must lie in [0, 1], got {jitter}")
        self.jitter = float(jitter)

    def _perturb(self, model, x, y):
        return pgd_linf(model, x, y, self.eps, (1 + self.jitter) * self.eps, 1, True, self.loss_fn(model, x))


@COMPRESSORS.register("fp16_mean")
class HalfMean(Compressor):
    """fp16 all-reduce; counts its calls in its checkpointed state."""

    name = "fp16_mean"
    state_names = ("calls",)

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)
        self.calls = torch.zeros((), dtype=torch.int64)

    def encode(self, tensor):
        return tensor.half()

    def decode(self, payload):
        return payload.float()

    def all_reduce_flat_(self, flat, n, shapes=None):
        world = tdist.get_world_size() if tdist.is_initialized() else 1
        half = flat[:n].half()
        if world > 1:
            tdist.all_reduce(half)
        flat[:n].copy_(half).mul_(self.scale / world)
        self.calls += 1
        return CommStats(bytes_sent=2 * (world - 1) * half.numel() * 2 // world)

    def state_dict(self):
        return {"calls": self.calls.clone()}

    def load_state_dict(self, state):
        self.calls = state.get("calls", torch.zeros((), dtype=torch.int64)).clone()
'''

TINY = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "96", "--eval-limit", "32",
        "--eval-steps", "1", "--epochs", "1", "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]


@pytest.fixture()
def plugin(tmp_path):
    path = tmp_path / "my_methods.py"
    path.write_text(PLUGIN)
    return path


def test_a_plugin_attack_and_compressor_train_from_the_recipe_cli(tmp_path, plugin):
    out = tmp_path / "run"
    proc = run_recipe([*TINY, "--plugin", plugin, "--attack", "jitter_fgsm", "--jitter", "0.25",
                       "--compressor", "fp16_mean", "--scale", "1.0", "--output-dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attack"] == "jitter_fgsm" and summary["compressor"] == "fp16_mean"
    assert "jitter=0.25" in summary["attack_settings"]
    rank0 = torch.load(next(out.glob("checkpoints/epoch0000/rank0.pt")), weights_only=True)
    assert int(rank0["compressor"]["calls"]) == summary["global_step"] > 0  # it exchanged every step


def _in_process(argv, monkeypatch, capsys):
    code, lines, _ = refused_in_process(argv, monkeypatch, capsys)
    return code, lines


@pytest.mark.parametrize("args, flag, component", [
    (["--compressor", "sign_vote", "--bits", "4"], "--bits", "compressor 'sign_vote'"),
    (["--compressor", "none", "--bucket-size", "64"], "--bucket-size", "compressor 'none'"),
    (["--attack", "pgd", "--tau", "2"], "--tau", "attack 'pgd'"),
    (["--attack", "fgsm_rs", "--random-start"], "--random-start", "attack 'fgsm_rs'"),
    (["--attack", "none", "--steps", "3"], "--steps", "attack 'none'"),
    (["--loss", "madry", "--beta", "3"], "--beta", "loss 'madry'"),
    (["--loss", "trades", "--lam", "2"], "--lam", "loss 'trades'"),
])
def test_a_flag_the_chosen_component_does_not_take_is_an_error(tmp_path, monkeypatch, capsys, args, flag, component):
    code, lines = _in_process([*TINY, "--output-dir", tmp_path / "o", *args], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert flag in lines[0] and component in lines[0], lines[0]


def test_a_plugin_setting_is_refused_for_another_attack(tmp_path, monkeypatch, capsys, plugin):
    code, lines = _in_process([*TINY, "--plugin", plugin, "--attack", "pgd", "--jitter", "0.3",
                               "--output-dir", tmp_path / "o"], monkeypatch, capsys)
    assert code == 2 and "--jitter" in lines[0] and "attack 'pgd'" in lines[0] and "jitter_fgsm" in lines[0]


def test_recipe_defaults_go_only_to_components_that_take_them():
    from dat_ds import cli
    p = cli.parser("t", attack="pgd", loss="smooth", sigma=0.5, noise_copies=2, tau=3)
    cfg = cli.train_config(p.parse_args([]))
    assert cfg.loss_kwargs == {"sigma": 0.5, "noise_copies": 2}
    assert cfg.attack_kwargs == {}  # pgd takes neither sigma nor tau: the defaults stay out
    cfg = cli.train_config(p.parse_args(["--attack", "smooth_pgd_l2", "--steps", "3"]))
    assert cfg.attack_kwargs == {"sigma": 0.5, "noise_copies": 2, "steps": 3}


def test_every_declared_setting_has_a_flag():
    from dat_ds import attacks, cli, compress, objectives
    p = cli.parser("t")
    dests = {a.dest for a in p._actions}
    for registry, skip in ((attacks.ATTACKS, {"eps"}), (objectives.OBJECTIVES, set()), (compress.COMPRESSORS, set())):
        for name in registry.names():
            for setting in registry.settings(name):
                if setting not in skip:
                    assert cli.FLAG_NAMES.get((registry.kind, setting), setting) in dests, (name, setting)


def test_every_setting_flag_says_what_it_does():
    """Help comes from the recipe table or the component's docstring ``Settings:`` block, never
    only the list of components that take it."""
    from dat_ds import attacks, cli, compress, objectives
    p = cli.parser("t")
    helps = {a.dest: a.help for a in p._actions}
    for registry in (attacks.ATTACKS, objectives.OBJECTIVES, compress.COMPRESSORS):
        for name in registry.names():
            if not registry.get(name).__module__.startswith("dat_ds."):
                continue  # a plugin another test registered: its flags are its author's to document
            for setting in registry.settings(name):
                dest = cli.FLAG_NAMES.get((registry.kind, setting), setting)
                if dest in helps:
                    assert helps[dest].rsplit(" [", 1)[0].strip(), f"--{dest.replace('_', '-')} has no help text"
    docs = __import__("dat_ds").compress.COMPRESSORS.setting_docs("powersgd")
    assert docs["start_iter"].startswith("exchanges sent uncompressed") and "byzantine_mode" in docs

"""``--data-placement local``: each rank reads only the folder it holds.

The real-rank runs write Fashion-MNIST subsets as IDX folders, one per rank, 3:1 in size and
class-disjoint (rank 0: classes 0-4, rank 1: classes 5-9), and train on them under ``strace``:
the run ends, evaluation counts the union of the folders' test sets, no rank opens the other's
folder, and a run resumed inside an epoch ends with the weights of the run that went straight
through. The rules (placeholders, samplers, class agreement, the resume rule) are tested in
process on real files of every dataset format.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, clean_env, run_deepspeed, run_recipe
from test_data import write_cifar10, write_idx
from test_data_images import write_folder
from dat_ds import cli, dist
from dat_ds.checkpoint_io import load_model
from dat_ds.data import (DataError, LocalSampler, Placement, ResumableSampler, check_placement, check_resume,
                         load_dataset)
from dat_ds.data.agreement import FolderFacts, agree, agreed_classes, agreed_stats
from dat_ds.data.placement import agreed_batches, resolve
from dat_ds.dist import free_port
from dat_ds.engine import ConfigError
from dat_ds.evaluate import PGDSpec, evaluate

RECIPE = ROOT / "recipes" / "fashion_mnist_dat.py"
TINY = ["--backbone", "test_resnet", "--stem", "native", "--steps", "1", "--eval-steps", "1",
        "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]
# rank 0: classes 0-4, 384 training / 48 test images; rank 1: classes 5-9, 128 / 16 (3:1)
SHARDS = ((range(0, 5), 384, 48), (range(5, 10), 128, 16))


def write_shards(root, fmnist, shards=SHARDS):
    """One folder of IDX files per rank, real Fashion-MNIST images of the given classes; returns the folders."""
    folders = []
    for r, (classes, n_train, n_test) in enumerate(shards):
        folder = Path(root) / str(r)
        folder.mkdir(parents=True)
        for prefix, split, n in (("train", fmnist.train, n_train), ("t10k", fmnist.test, n_test)):
            idx = np.flatnonzero(np.isin(split.labels.numpy(), list(classes)))[:n]
            write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", split.images[idx, 0].numpy())
            write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", split.labels[idx].numpy())
        folders.append(folder)
    return folders


def placement(folders, rank=0, dataset="fashion_mnist"):
    return Placement(rank, tuple(folders), dataset, dataset, folders[rank].partition(":")[2])


# --- the rules, in process --------------------------------------------------------------------


def test_placeholders_only_in_local_placement_and_only_known_ones():
    check_placement("global", "/data/x", "fashion_mnist")
    check_placement("local", "/data/{rank}/{local_rank:02d}-{node_rank}", "fashion_mnist")
    with pytest.raises(ValueError, match=r"^--data-dir /d/\{rank\}: .*only --data-placement local reads$"):
        check_placement("global", "/d/{rank}", "fashion_mnist")
    with pytest.raises(ValueError, match=r"--dataset hf:/d/\{node_rank\}: "):
        check_placement("global", None, "hf:/d/{node_rank}")
    with pytest.raises(ValueError, match=r"unknown placeholder \{host\}; the placeholders are"):
        check_placement("local", "/d/{host}", "fashion_mnist")
    with pytest.raises(ValueError, match="--data-placement must be one of global, local"):
        check_placement("nearby", None, "fashion_mnist")
    assert resolve("/d/n{node_rank}/r{rank:03d}", 5, 1, 2) == "/d/n2/r005"
    assert resolve("/d/{{rank}}", 5, 1, 2) == "/d/{{rank}}"  # no placeholder: kept as given
    with pytest.raises(ValueError, match="CROSS_RANK, GROUP_RANK, NODE_RANK is set"):
        resolve("/d/{node_rank}", 0, 0, None)
    parser = cli.parser("local placement")
    cfg = cli.train_config(parser.parse_args(["--data-dir", "/d/{rank}"]))
    with pytest.raises(ValueError, match="only --data-placement local"):
        cfg.validate()
    cfg = cli.train_config(parser.parse_args(["--data-dir", "/d/{rank}", "--data-placement", "local"]))
    cfg.validate()
    assert cfg.data_placement == "local"


def test_the_launchers_node_rank_variables(monkeypatch):
    from dat_ds.data.placement import node_rank
    for var in ("CROSS_RANK", "GROUP_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert node_rank() is None
    monkeypatch.setenv("NODE_RANK", "3")
    assert node_rank() == 3
    monkeypatch.setenv("GROUP_RANK", "2")  # torchrun's
    assert node_rank() == 2
    monkeypatch.setenv("CROSS_RANK", "1")  # deepspeed's launcher
    assert node_rank() == 1


def test_ranks_of_a_folder_split_it_and_every_rank_trains_the_smallest_shards_steps():
    p = placement(["0:/a", "0:/b", "0:/a", "1:/a"], rank=2)  # /a on node 1 is another folder
    assert p.groups == ((0, 2), (1,), (3,)) and p.peers == (0, 2) and p.share() == (1, 2)
    sizes = [400, 130, 400, 1000]
    assert agreed_batches(sizes, p, 32) == 4  # /b: 130 // 1 // 32; /a on node 0: 200 // 32 = 6
    shards = [LocalSampler(400, peer, 2, 4 * 32, rank, 4, seed=3) for peer, rank in ((0, 0), (1, 2))]
    for s in shards:
        s.set_epoch(1)
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b) == 128 and not set(a) & set(b)  # disjoint, the same length
    shards[0].set_epoch(2)
    assert list(shards[0]) != a  # a new permutation each epoch: the folder's other samples come later
    with pytest.raises(DataError, match=r"^--data-placement local: /b holds 20 training samples for 1 rank\(s\), "
                                        r"fewer than one micro batch of 32"):
        agreed_batches([400, 20, 400, 1000], p, 32)


@pytest.mark.parametrize("skip", [0, 3])
def test_one_folder_for_every_rank_is_the_global_order(skip):
    """Local placement over one shared folder deals the samples exactly as global placement does."""
    n, world, batch = 203, 3, 8
    for rank in range(world):
        ours = LocalSampler(n, rank, world, n // world // batch * batch, rank, world, seed=5)
        theirs = ResumableSampler(range(n), world, rank, seed=5)
        ours.set_epoch(2, consumed=skip * batch * world)
        theirs.set_epoch(2, consumed=skip * batch * world)
        whole = len(theirs) // batch * batch  # DataLoader(drop_last=True)
        assert list(ours) == list(theirs)[:whole] and len(ours) == whole


def write_named_folder(root, names, n_train=3, n_val=2):
    """An ImageFolder whose class folders carry ``names``."""
    write_folder(root, classes=len(names), n_train=n_train, n_val=n_val, size=16)
    for split in ("train", "val"):
        for i, name in enumerate(names):
            (root / split / f"class{i}").rename(root / split / name)
    return root


def test_imagefolders_with_other_classes_train_on_the_union_of_class_names(tmp_path, monkeypatch):
    roots = [write_named_folder(tmp_path / d, names) for d, names in
             (("a", ("cat", "dog")), ("b", ("bird", "dog")), ("c", ("bird",)))]  # c: one class only
    infos = [load_dataset("imagefolder", str(d), img_size=16) for d in roots]
    facts = [FolderFacts.of(info, str(d)) for info, d in zip(infos, roots)]
    assert agreed_classes(facts) == (3, ("bird", "cat", "dog"))
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: facts)
    for info, root in zip(infos, roots):
        agreed = agree(info, str(root))
        assert agreed.num_classes == 3 and agreed.class_names == ("bird", "cat", "dog")
        for ds in (agreed.train, agreed.test):
            labels = {Path(ds.paths[i]).parent.name: int(ds[i][1]) for i in range(len(ds))}
            assert labels == {name: ("bird", "cat", "dog").index(name) for name in os.listdir(root / "train")}


def test_classes_shape_and_normalization_are_agreed_or_refused():
    def facts(folder, names=None, union=False, classes=10, shape=(1, 28), mean=(0.5,), std=(0.25,), train=100):
        return FolderFacts(folder, classes, names, union, shape, mean, std, train)
    assert agreed_classes([facts("/a", classes=7), facts("/b", classes=10)]) == (10, None)  # ids: the largest
    with pytest.raises(DataError, match=r"^--data-placement local: the folders name other classes: /a has a, b "
                                        r"and /b has b, a \(labels are positions"):
        agreed_classes([facts("/a", ("a", "b"), classes=2), facts("/b", ("b", "a"), classes=2)])
    same = [facts("/a"), facts("/b", train=300)]
    assert agreed_stats(same) == ((0.5,), (0.25,))
    mean, std = agreed_stats([facts("/a", mean=(0.2,), std=(0.1,), train=100),
                              facts("/b", mean=(0.6,), std=(0.1,), train=300)])
    # pooled as one measurement over both folders' images: E[x] and E[x^2] weighted 1:3
    assert mean == (0.5,) and std == (round(np.sqrt(0.25 * (0.01 + 0.04) + 0.75 * (0.01 + 0.36) - 0.25), 4),)


def test_every_dataset_format_loads_from_its_folder(tmp_path, fmnist):
    """IDX, CIFAR batches, an ImageFolder and a save_to_disk folder, each through local placement's loader."""
    datasets = pytest.importorskip("datasets")
    idx = write_shards(tmp_path / "idx", fmnist, ((range(3), 40, 8),))[0]
    (tmp_path / "cifar").mkdir()
    write_cifar10(tmp_path / "cifar")
    write_folder(tmp_path / "folder", classes=3, n_train=4, n_val=2, size=16)
    from test_data_hf import split
    datasets.DatasetDict(train=split(4), test=split(2, seed=1)).save_to_disk(str(tmp_path / "hf"))
    cases = [("fashion_mnist", str(idx), 40, 8, 10), ("cifar10", str(tmp_path / "cifar"), 100, 20, 10),
             ("imagefolder", str(tmp_path / "folder"), 12, 6, 3), (f"hf:{tmp_path / 'hf'}", None, 12, 6, 3)]
    for name, data_dir, n_train, n_test, classes in cases:
        folder = data_dir or name.partition(":")[2]
        p = Placement(0, (f"0:{folder}",), name, name, data_dir)
        info = p.load(16 if name == "imagefolder" else None, None, None, 5, {"cache_dir": str(tmp_path / "c")}
                      if name.startswith("hf:") else {})
        assert (len(info.train), len(info.test), info.num_classes) == (n_train, 5, classes), name
        assert info.name == name
    p = Placement(0, ("0:/nowhere",), "fashion_mnist", "fashion_mnist", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere does not exist"):
        p.load(None, None, None, None, {})


def test_a_folder_too_small_to_hold_samples_out_is_refused_not_hung(monkeypatch, fmnist):
    p = placement(["0:/a", "0:/b"])
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [obj, ("", False)])
    with pytest.raises(DataError, match=r"^--data-placement local: /b is too small to hold samples out"):
        p.split_off(fmnist.test.subset(100), 10)


def test_an_epoch_interrupted_inside_goes_on_only_on_its_layout():
    two = {"placement": "local", "groups": [[0], [1]], "train": [384, 128]}
    one = {"placement": "local", "groups": [[0]], "train": [384]}
    inside = {"position": [1, 3], "meta": {"placement": two}}
    check_resume(inside, {"placement": two})  # the same ranks and folders: bit for bit
    check_resume({**inside, "position": [2, 0]}, {"placement": one})  # an epoch's end: any layout
    check_resume({"position": [1, 3], "meta": {}}, {})  # global placement: its own rules
    check_resume(None, {"placement": one})
    with pytest.raises(ConfigError, match=r"^--resume: the checkpoint stopped inside epoch 1 with 2 folder\(s\) of "
                                          r"ranks \[\[0\], \[1\]\] .* this run has 1 folder\(s\) .*an interrupted "
                                          r"epoch goes on only on the data layout it began on"):
        check_resume(inside, {"placement": one})
    with pytest.raises(ConfigError, match="this run has global placement"):
        check_resume(inside, {})


# --- real ranks ---------------------------------------------------------------------------------


def parse_trace(path):
    """``(opens, parent, ranks)`` from ``strace -f -y``: every opened path with the process or
    thread that opened it, the parent of each process or thread, and the rank each rank process
    was started as (the launcher's ``--local_rank=R``; one node)."""
    opens, parent, ranks = [], {}, {}
    open_call = re.compile(r'^(\d+)\s+(?:open|openat|openat2)\((?:\w+(?:<([^>]*)>)?, )?"([^"]*)"')
    spawn = re.compile(r"^(\d+)\s+(?:<\.\.\. )?(?:clone3?|v?fork)\b.*= (\d+)$")
    started = re.compile(r'^(\d+)\s+execve\(.*"--local_rank=(\d+)"')
    for line in Path(path).read_text(errors="replace").splitlines():
        if m := open_call.match(line):
            pid, base, name = int(m[1]), m[2] or "", m[3]
            opens.append((pid, os.path.normpath(os.path.join(base, name))))
        elif m := spawn.match(line):
            parent[int(m[2])] = int(m[1])
        elif m := started.match(line):
            ranks[int(m[1])] = int(m[2])
    return opens, parent, ranks


def rank_of(pid, parent, ranks):
    while pid is not None and pid not in ranks:
        pid = parent.get(pid)
    return ranks.get(pid)


def final_weights(out, tag=None):
    tag = tag or (out / "checkpoints" / "latest").read_text()
    return torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]


# 2 ranks x 32 per step; the smaller folder gives 128 / 32 = 4 steps per epoch; a checkpoint every 3 steps
RUN = [*TINY, "--data-placement", "local", "--epochs", "2", "--save-every", "3"]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, fmnist):
    """One 2-rank run on the 3:1 class-disjoint folders, under strace; ``(out, folders, trace, --data-dir)``.
    The folders' path names the node too, as the launcher's CROSS_RANK gives it (one node: 0)."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace for the open-file audit")
    root = tmp_path_factory.mktemp("local")
    folders = write_shards(root / "shards" / "0", fmnist)
    out, trace, data_dir = root / "run", root / "trace.txt", root / "shards" / "{node_rank}" / "{rank}"
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = ["strace", "-f", "--seccomp-bpf", "-y", "-s", "4096", "-o", str(trace),
           "-e", "trace=/^(open|openat|openat2|clone|clone3|fork|vfork|execve)$",
           str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(RECIPE),
           *map(str, RUN), "--data-dir", str(data_dir), "--output-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "every rank trains 4 minibatch(es) of 32 per epoch, the smallest shard's" in r.stdout
    return out, folders, trace, data_dir


def test_unequal_class_disjoint_folders_train_and_evaluation_counts_the_union(local_run):
    out, folders, _, _ = local_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 2 * 4  # the smallest folder's 4 steps, 2 epochs
    assert summary["eval_samples"] == 48 + 16
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["eval_samples"] for row in rows] == [64, 64]
    # the same figures, measured here on each folder's test set with the saved weights
    model, meta = load_model(out / "checkpoints" / "epoch0001" / "mp_rank_00_model_states.pt")
    assert meta["num_classes"] == 10 and meta["placement"] == {"placement": "local", "groups": [[0], [1]],
                                                                "train": [384, 128]}
    spec = PGDSpec(0.1, steps=1)
    counts = Counter()
    for folder in folders:
        test = load_dataset("fashion_mnist", str(folder)).test
        ev = evaluate(model, test, spec, torch.device("cpu"), 256, seed=0)
        counts.update(clean=round(ev["clean_acc"] * len(test)), robust=round(ev["robust_acc"] * len(test)))
    assert round(summary["clean_acc"] * 64) == counts["clean"]
    assert round(summary["robust_acc"] * 64) == counts["robust"]


def test_no_rank_opens_another_ranks_folder(local_run):
    _, folders, trace, _ = local_run
    opens, parent, ranks = parse_trace(trace)
    assert sorted(ranks.values()) == [0, 1]
    read = {0: set(), 1: set()}
    for pid, path in opens:
        for r, folder in enumerate(folders):
            if path == str(folder) or path.startswith(f"{folder}/"):
                owner = rank_of(pid, parent, ranks)
                assert owner == r, f"{path} (rank {r}'s folder) opened by process {pid}, rank {owner}"
                read[r].add(Path(path).name)
    idx = {f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))}
    assert read == {0: idx, 1: idx}  # each rank read its own folder's four files, and only those


@pytest.mark.slow  # two runs; test_elastic resumes mid-epoch in the fast suite
def test_resumed_inside_an_epoch_ends_as_the_straight_run(local_run, tmp_path):
    straight, _, _, data_dir = local_run
    out = tmp_path / "resumed"
    shutil.copytree(straight, out)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["epoch0001", "epoch0001-batch000003"]
    shutil.rmtree(out / "checkpoints" / "epoch0001")  # back to step 3 of the last epoch's 4
    r = run_deepspeed(RECIPE, [*RUN, "--data-dir", data_dir, "--output-dir", out, "--resume"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from" in r.stdout and "epoch 1, batch 3" in r.stdout
    a, b = final_weights(straight), final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_inside_an_epoch_on_another_number_of_ranks_is_refused(local_run, tmp_path):
    straight, _, _, data_dir = local_run
    out = tmp_path / "one_rank"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "checkpoints" / "epoch0001")
    r = run_recipe([*RUN, "--data-dir", data_dir, "--output-dir", out, "--resume"], env={"NODE_RANK": "0"})
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert lines == [f"{RECIPE.name}: error: --resume: the checkpoint stopped inside epoch 1 with 2 folder(s) of "
                     f"ranks [[0], [1]] with [384, 128] training samples, this run has 1 folder(s) of ranks [[0]] "
                     f"with [384] training samples; an interrupted epoch goes on only on the data layout it began "
                     f"on (resume it there, or from an epoch's end)"], r.stderr[-2000:]


@pytest.mark.slow  # one 1-rank run (~10 s)
def test_from_an_epochs_end_any_layout_goes_on(local_run, tmp_path):
    """The rule's other half: a 2-rank checkpoint from an epoch's end goes on on one rank, which
    reads only its own folder from then on."""
    straight, _, _, data_dir = local_run
    out = tmp_path / "one_rank"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "checkpoints" / "epoch0001-batch000003")
    args = [a if a != "2" else "3" for a in RUN]  # --epochs 3: one more epoch
    r = run_recipe([*args, "--data-dir", data_dir, "--output-dir", out, "--resume"], env={"NODE_RANK": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["eval_samples"] == 48  # rank 0's folder alone
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2]


def tiny_config(path, micro):
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": micro, "zero_optimization": {"stage": 0},
                                "optimizer": {"type": "Lamb", "params": {"lr": 0.01}}}))
    return path


@pytest.mark.slow  # three 2-rank runs (~15 s each); IDX folders run in the fast suite
@pytest.mark.parametrize("kind", ["imagefolder", "cifar10", "hf"])
def test_every_dataset_format_trains_on_two_ranks_from_their_own_folders(tmp_path, kind):
    """Unequal folders of each on-disk format; an ImageFolder's folders hold other classes (one holds
    a single class) and train on the union of their class names."""
    root = tmp_path / "shards"
    args = ["--data-dir", root / "{rank}"]
    if kind == "imagefolder":
        write_named_folder(root / "0", ("cat", "dog"), n_train=8, n_val=2)
        write_named_folder(root / "1", ("bird",), n_train=8, n_val=3)
        args += ["--dataset", "imagefolder", "--img-size", "16"]
        classes, test_samples = 3, 2 * 2 + 3
    elif kind == "cifar10":
        for r, n in ((0, 12), (1, 4)):  # 60 and 20 training images, 12 and 4 test images
            (root / str(r)).mkdir(parents=True)
            write_cifar10(root / str(r), n_per_batch=n)
        args += ["--dataset", "cifar10"]
        classes, test_samples = 10, 12 + 4
    else:
        datasets = pytest.importorskip("datasets")
        from test_data_hf import split
        for r, n in ((0, 8), (1, 4)):
            datasets.DatasetDict(train=split(n, size=16), test=split(2, size=16, seed=1)).save_to_disk(
                str(root / str(r)))
        args = ["--dataset", f"hf:{root / '{rank}'}"]
        classes, test_samples = 3, 6 + 6
    out = tmp_path / "run"
    config = tiny_config(tmp_path / "ds.json", 4)
    r = run_deepspeed(RECIPE, [*TINY, "--deepspeed_config", config, "--data-placement", "local", "--epochs", "1",
                               "--eval-batch-size", "4", *args, "--output-dir", out],
                      env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_samples"] == test_samples and summary["updates"] >= 1
    _, meta = load_model(out / "checkpoints" / "epoch0000" / "mp_rank_00_model_states.pt")
    assert meta["num_classes"] == classes
    if kind == "imagefolder":
        assert meta["class_names"] == ["bird", "cat", "dog"]  # the union, as the head's labels

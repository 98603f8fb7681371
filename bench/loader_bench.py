"""Which reader for an ImageNet-size folder: index time and decode throughput, measured.

    python bench/loader_bench.py                     # 100 classes x 200 JPEGs = 20,000 files
    python bench/loader_bench.py --classes 1000 --per-class 20 --cache /scratch/jpegs

Generates (once, with several processes, cached under ``--cache``, default the user's cache
folder) a class-sorted folder of JPEGs of 160-500 px with photo-like content, then measures,
side by side in one run:

* **index time**: how long each reader takes to list the folder before the first sample can be
  read (torchvision ``ImageFolder``, dat-ds ``imagefolder`` (which uses torchvision's scan),
  Hugging Face ``datasets``' ``imagefolder`` builder, first build and cached reload, and a bare
  ``os.scandir`` walk as the floor; median of ``--repeats``, imports excluded), extrapolated
  linearly to ImageNet's 1,281,167 files;
* **images/s per worker**: decode + RandomResizedCrop(224) + flip + to-tensor through a
  ``DataLoader`` with 1 and 2 workers, for each reader;
* **decoders**: dat-ds's training transform (RandomResizedCrop + flip, uint8) with each decoder
  of ``dat_ds.data.decode`` (``pil`` full decode, ``pil-draft``, ``simplejpeg``) and, where it
  imports, ``pyturbojpeg`` (it needs the system's libturbojpeg; measured here, not shipped):
  images/s in one process and through a ``DataLoader`` with one worker, in ``--rounds``
  interleaved rounds (median; ratios to ``pil`` taken within each round), at each
  ``--img-sizes``, with the share of crops decoded reduced; then the loader workers the GPU's
  training rates in ``bench/results/gpu.json`` need at that per-worker rate.

    python bench/loader_bench.py --classes 20 --per-class 100 --images 512 --decoder-images 384  # ~5 min, 2 cores

Writes ``bench/results/loader.json`` (rendered by ``bench/report.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, save  # noqa: E402

IMAGENET_FILES = 1_281_167


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dat_ds" / "loader_bench"


def write_class(args) -> int:
    """Write ``n`` JPEGs of one class: smooth random colour fields plus grain (compress like photos)."""
    from PIL import Image
    folder, cls, n, seed = args
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"{cls}_{i:05d}.JPEG"
        if path.exists():
            continue
        w, h = (int(v) for v in rng.integers(160, 501, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 6, (h, w, 1)).astype(np.int16)
        pixels = np.clip(field + grain, 0, 255).astype(np.uint8)
        tmp = path.with_suffix(".tmp")
        Image.fromarray(pixels).save(tmp, "JPEG", quality=90)
        tmp.rename(path)  # a killed run never leaves a half-written JPEG behind
    return n


def generate(root: Path, classes: int, per_class: int, procs: int) -> float:
    """Seconds spent generating (0 when the folder was already complete)."""
    train = root / "train"
    jobs = [(train / f"n{c:05d}", f"n{c:05d}", per_class, c) for c in range(classes)]
    todo = [j for j in jobs if len(list(j[0].glob("*.JPEG"))) < per_class] if train.is_dir() else jobs
    if not todo:
        return 0.0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(write_class, todo, chunksize=4))
    return time.perf_counter() - t0


def index_scandir(root: Path) -> int:
    n = 0
    for cls in os.scandir(root):
        if cls.is_dir():
            n += sum(1 for e in os.scandir(cls.path) if e.name.endswith(".JPEG"))
    return n


def index_torchvision(root: Path):
    from torchvision.datasets import ImageFolder
    return ImageFolder(str(root))


def index_datds(root: Path):
    from dat_ds.data.folder import index_folder
    return index_folder(root)


def index_hf(root: Path, cache: Path):
    import datasets as hfds
    hfds.disable_progress_bars()
    return hfds.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(cache))


def timed(fn) -> tuple:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_time(fns: dict, repeats: int) -> tuple:
    """``({name: median seconds}, {name: last result})``, calls interleaved so drift hits all alike."""
    times = {k: [] for k in fns}
    outs = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, outs[k] = timed(fn)
            times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def measure_index(root: Path, files: int, repeats: int) -> tuple:
    """``(rows, datasets, hf cache)``: index seconds per reader (median of ``repeats``; HF's first
    load, which builds its cache, once). Imports happen before any timing."""
    import datasets  # noqa: F401
    import torchvision.datasets  # noqa: F401
    import dat_ds.data.folder  # noqa: F401
    hf_cache = Path(tempfile.mkdtemp(prefix="loader_bench_hf_"))
    try:
        results, made = median_time({
            "os.scandir walk (floor)": lambda: index_scandir(root),
            "torchvision ImageFolder": lambda: index_torchvision(root),
            "dat-ds imagefolder (torchvision scan)": lambda: index_datds(root)}, repeats)
        results["HF imagefolder, first load"], _ = timed(lambda: index_hf(root, hf_cache))
        reload, out = median_time({"HF imagefolder, cached reload": lambda: index_hf(root, hf_cache)}, repeats)
        results.update(reload)
        made = {"torchvision": made["torchvision ImageFolder"], "dat-ds": made["dat-ds imagefolder (torchvision scan)"],
                "hf": out["HF imagefolder, cached reload"]}
        base = results["torchvision ImageFolder"]
        rows = [{"reader": k, "index_s": v, "ms_per_1k_files": 1e6 * v / files,
                 "extrapolated_1.28M_s": v * IMAGENET_FILES / files, "vs_torchvision": v / base}
                for k, v in results.items()]
        return rows, made, hf_cache
    except BaseException:
        shutil.rmtree(hf_cache, ignore_errors=True)
        raise


def reader_datasets(made: dict) -> dict:
    """Each reader's dataset with the training transform (RandomResizedCrop 224 + flip)."""
    from torchvision import transforms as T
    from dat_ds.data import FolderImages
    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()])
    tv = made["torchvision"]
    tv.transform = tf
    paths, labels, _ = made["dat-ds"]
    hf = made["hf"]

    def hf_tf(batch):
        batch["pixel_values"] = [tf(im.convert("RGB")) for im in batch["image"]]
        return batch
    hf.set_transform(hf_tf)
    return {"torchvision ImageFolder": tv, "dat-ds imagefolder": FolderImages(paths, labels, tf),
            "HF imagefolder": _HFItems(hf)}


class _HFItems:
    """HF rows as (tensor, label) pairs, the shape a DataLoader's default collate expects."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[int(i)]
        return row["pixel_values"], row["label"]


def throughput(ds, workers: int, n: int, batch: int = 32) -> float:
    """Images/s through a DataLoader reading ``n`` random samples with ``workers`` workers."""
    from torch.utils.data import DataLoader, Subset
    n = min(n, len(ds))
    idx = np.random.default_rng(0).choice(len(ds), n, replace=False).tolist()
    batch = max(1, min(batch, n // 4))  # the first batch is warm-up: leave several to time
    loader = DataLoader(Subset(ds, idx), batch_size=batch, num_workers=workers, shuffle=False)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not throughput
    t0 = time.perf_counter()
    seen = 0
    for x, _ in it:
        seen += len(x)
    return seen / (time.perf_counter() - t0)


# --- decoders -------------------------------------------------------------------------------------

class TurboJPEGDecoder:
    """``pyturbojpeg`` (ctypes over the system's libturbojpeg) with the same DCT scaling and the
    same crop and resize as dat-ds's ``simplejpeg``: measured beside dat-ds's decoders, not
    shipped (it needs a system library, not only pip)."""

    def __init__(self):
        from turbojpeg import TurboJPEG
        self.jpeg = TurboJPEG()

    def open(self, data: bytes):
        from dat_ds.data.decode import PILEncoded
        try:
            w, h, _, _ = self.jpeg.decode_header(data)
        except OSError:
            return PILEncoded(data, draft=True)
        return turbojpeg_encoded(self.jpeg, data, (w, h))


def turbojpeg_encoded(jpeg, data: bytes, size):
    """dat-ds's libjpeg-turbo image (:class:`~dat_ds.data.decode.TurboEncoded`) decoded by pyturbojpeg."""
    from turbojpeg import TJPF_RGB
    from dat_ds.data.decode import TurboEncoded

    class Encoded(TurboEncoded):
        def array(self, scale: int):
            try:
                return jpeg.decode(self.data, TJPF_RGB, scaling_factor=(1, scale))
            except OSError as err:
                raise ValueError(str(err)) from None
    return Encoded(data, size)


def bench_decoders() -> tuple:
    """``(decoder names, notes)``: dat-ds's decoders, and ``pyturbojpeg`` registered for this run
    where it imports and finds its library."""
    from dat_ds.data.decode import DECODERS
    names = ["pil", "pil-draft", "simplejpeg"]
    try:
        TurboJPEGDecoder()
    except (ImportError, OSError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return names, [f"pyturbojpeg not measured: {reason}"]
    if "pyturbojpeg" not in DECODERS:
        DECODERS.register("pyturbojpeg")(TurboJPEGDecoder)
    return names + ["pyturbojpeg"], []


def in_process(ds, idx) -> float:
    """Images/s of ``ds[i]`` for ``idx`` in this process: decode + augment on one core, no loader."""
    ds[idx[0]]
    t0 = time.perf_counter()
    for i in idx:
        ds[i]
    return (len(idx) - 1) / (time.perf_counter() - t0) if len(idx) > 1 else float("nan")


def reduced_share(paths, size: int, n: int = 2000) -> float:
    """Share of RandomResizedCrop(size) boxes (seeded draws over the folder's image sizes) that
    decode reduced, at 1/2 or less."""
    import torch
    from PIL import Image
    from dat_ds.data.decode import RandomResizedCropFlip, dct_scale
    crop = RandomResizedCropFlip(size, "pil")
    sizes = [Image.open(str(p)).size for p in paths[:n]]
    torch.manual_seed(0)
    boxes = [crop.box(w, h) for w, h in sizes]
    return sum(dct_scale(r - x, b - y, size, size) > 1 for x, y, r, b in boxes) / len(boxes)


def measure_decoders(paths, labels, sizes, images: int, rounds: int) -> tuple:
    """``(rows, notes)``: per decoder and size, median images/s in one process and through one
    loader worker over ``rounds`` interleaved rounds, and the medians of the per-round ratios to pil."""
    import torch
    from dat_ds.data import FolderImages
    from dat_ds.data.folder import decoding_transforms
    names, notes = bench_decoders()
    idx = np.random.default_rng(0).choice(len(paths), min(images, len(paths)), replace=False).tolist()
    rows = []
    for size in sizes:
        data = {name: FolderImages(paths, labels, decoding_transforms(size, name)[0], raw=True) for name in names}
        proc, loader = {n: [] for n in names}, {n: [] for n in names}
        for r in range(rounds):
            for name, ds in data.items():
                torch.manual_seed(r)
                proc[name].append(in_process(ds, idx))
                loader[name].append(throughput(ds, 1, len(idx)))
                print(f"decoder {name} {size} px, round {r}: {proc[name][-1]:.0f} img/s in process, "
                      f"{loader[name][-1]:.0f} img/s one worker", flush=True)
        share = reduced_share(paths, size)
        for name in names:
            rows.append({"decoder": name, "img_size": size, "reduced_share": share if name != "pil" else 0.0,
                         "in_process_img_s": statistics.median(proc[name]),
                         "in_process_vs_pil": statistics.median(a / b for a, b in zip(proc[name], proc["pil"])),
                         "img_s_per_worker": statistics.median(loader[name]),
                         "vs_pil": statistics.median(a / b for a, b in zip(loader[name], loader["pil"]))})
    return rows, notes


def gpu_rates() -> dict:
    """``{label: images/s}`` of ResNet-50 (224 px) training on the GPU from ``results/gpu.json``;
    empty where that file or model is missing."""
    path = Path(__file__).resolve().parent / "results" / "gpu.json"
    try:
        models = json.loads(path.read_text())["sections"]["throughput"]["models"]
        model = next(m for m in models if m["model"] == "resnet50" and m["img_size"] == 224)
        gpu = json.loads(path.read_text())["machine"].get("gpu", "GPU")
    except (OSError, KeyError, StopIteration, ValueError):
        return {}
    methods = {m["method"]: m for m in model["methods"]}
    rates = {}
    if "natural" in methods:
        rates[f"natural ({gpu})"] = methods["natural"]["images_per_s"]
        rates[f"natural, bare loop ({gpu})"] = methods["natural"]["bare_images_per_s"]
    if "pgd-3" in methods:
        rates[f"PGD-3 ({gpu})"] = methods["pgd-3"]["images_per_s"]
    return rates


def workers_needed(rows: list, rates: dict) -> None:
    """Adds ``workers`` to each 224 px row: ``{rate label: ceil(rate / per-worker images/s)}``."""
    for row in rows:
        if row["img_size"] == 224 and row["img_s_per_worker"] > 0:
            row["workers"] = {k: math.ceil(v / row["img_s_per_worker"]) for k, v in rates.items()}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=default_cache(), help="where the generated JPEGs are kept")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="processes that generate the JPEGs")
    p.add_argument("--images", type=int, default=1024, help="images decoded per throughput measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="index timings per reader (the median is kept)")
    p.add_argument("--decoder-images", type=int, default=512, help="images decoded per decoder measurement")
    p.add_argument("--img-sizes", type=int, nargs="+", default=[224, 160], help="crop sizes the decoders serve")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the decoder measurements")
    p.add_argument("--decoders-only", action="store_true",
                   help="only the decoders (no index or readers; for a GPU's host: its cores, many workers, nvJPEG)")
    p.add_argument("--many-workers", type=int, default=0,
                   help="also read with this many workers per decoder (what a whole host's cores give)")
    p.add_argument("--gpu-host", type=Path, default=None,
                   help="a --decoders-only results file from a GPU's host, shown beside this run's")
    p.add_argument("--out", type=Path, default=None, help="results file (default: bench/results/loader.json)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = args.cache / f"{args.classes}x{args.per_class}"
    load_before = os.getloadavg()[0]
    gen_s = generate(root, args.classes, args.per_class, args.procs)
    files = args.classes * args.per_class
    size_mb = sum(f.stat().st_size for f in (root / "train").rglob("*.JPEG")) / 2**20
    print(f"{files} JPEGs in {root / 'train'} ({size_mb:.0f} MiB; generated in {gen_s:.0f} s)", flush=True)
    if args.decoders_only:
        from dat_ds.data.folder import index_folder
        paths, labels, _ = index_folder(root / "train")
        payload = {"title": "Decoders on a GPU's host", "machine": machine(),
                   "settings": {"files": files, "decoder_images": args.decoder_images, "img_sizes": args.img_sizes,
                                "decoder_rounds": args.rounds, "many_workers": args.many_workers}}
    else:
        rows, paths, labels = measure_readers(root / "train", files, args)
        payload = result(rows, args, files, size_mb, gen_s, load_before)
    payload["decoders"] = decoders_section(paths, labels, args)
    if args.gpu_host is not None:
        payload["gpu_host"] = json.loads(args.gpu_host.read_text())
    if args.out is None:
        print(f"written: {save('loader', payload)}")
    else:
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"written: {args.out}")
    return payload


def measure_readers(root: Path, files: int, args) -> tuple:
    """``(rows, paths, labels)``: each reader's index time and images/s, and dat-ds's index."""
    rows, made, hf_cache = measure_index(root, files, args.repeats)
    try:
        data = reader_datasets(made)
        for row in rows:
            name = next((k for k in data if row["reader"].startswith(k.split(" (")[0])), None)
            for w in args.workers:
                row[f"img_s_{w}w"] = throughput(data[name], w, args.images) if name and "first" not in \
                    row["reader"] else None
                if row[f"img_s_{w}w"] is not None:
                    row[f"img_s_per_worker_{w}w"] = row[f"img_s_{w}w"] / w
                    print(f"{row['reader']}: {w} worker(s) {row[f'img_s_{w}w']:.0f} img/s", flush=True)
    finally:
        shutil.rmtree(hf_cache, ignore_errors=True)
    paths, labels, _ = made["dat-ds"]
    return rows, paths, labels


def decoders_section(paths, labels, args) -> dict:
    """The decoders' rows, the GPU rates they are held against, nvJPEG where CUDA is, and notes."""
    import torch
    rows, notes = measure_decoders(paths, labels, args.img_sizes, args.decoder_images, args.rounds)
    rates = gpu_rates()
    workers_needed(rows, rates)
    out = {"rows": rows, "gpu_rates": rates, "notes": notes + decoder_notes(args, rates)}
    if args.many_workers:
        out["many_workers"] = many_workers(paths, labels, args.many_workers, args.decoder_images * 4)
    if torch.cuda.is_available():
        out["nvjpeg"] = [measure_nvjpeg(paths, size, args.decoder_images * 4) for size in args.img_sizes]
    return out


def many_workers(paths, labels, workers: int, images: int) -> list:
    """Images/s of each decoder's 224 px training reads through ``workers`` workers at once."""
    from dat_ds.data import FolderImages
    from dat_ds.data.folder import decoding_transforms
    names, _ = bench_decoders()
    out = []
    for name in names:
        ds = FolderImages(paths, labels, decoding_transforms(224, name)[0], raw=True)
        rate = throughput(ds, workers, images)
        print(f"decoder {name} 224 px, {workers} workers: {rate:.0f} img/s", flush=True)
        out.append({"decoder": name, "workers": workers, "img_s": rate})
    return out


def measure_nvjpeg(paths, size: int, images: int, batch: int = 128) -> dict:
    """``torchvision.io.decode_jpeg(device="cuda")`` on batches of files read into memory, then each
    image's RandomResizedCrop(size) (boxes drawn on the host, crop + antialiased resize on the GPU)
    and a stack: images/s of the decode alone and of decode + crop, one process, one GPU."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from dat_ds.data.decode import RandomResizedCropFlip
    files = [torchvision.io.read_file(str(p)) for p in paths[:images]]
    crop = RandomResizedCropFlip(size, "pil")

    def run(with_crop: bool) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(files), batch):
            decoded = torchvision.io.decode_jpeg(files[i:i + batch], device="cuda")
            if with_crop:
                outs = []
                for im in decoded:
                    left, top, right, bottom = crop.box(im.shape[2], im.shape[1])
                    outs.append(F.interpolate(im[None, :, top:bottom, left:right].float(), size=(size, size),
                                              mode="bilinear", antialias=True, align_corners=False))
                torch.cat(outs)
        torch.cuda.synchronize()
        return len(files) / (time.perf_counter() - t0)
    run(True)  # warm-up: nvJPEG's handles and kernels
    decode, both = statistics.median(run(False) for _ in range(3)), statistics.median(run(True) for _ in range(3))
    print(f"nvjpeg {size} px: decode {decode:.0f} img/s, decode + crop {both:.0f} img/s", flush=True)
    return {"img_size": size, "batch": batch, "images": len(files), "decode_img_s": decode,
            "decode_crop_img_s": both}


def decoder_notes(args, rates: dict) -> list:
    import torch
    gpu = "; ".join(f"{k} {v:,.0f} img/s" for k, v in rates.items()) or "no results/gpu.json"
    return [f"Decoders: dat-ds's training transform (RandomResizedCrop + flip, uint8, the crop drawn from the "
            f"header before decoding) on {args.decoder_images} random images of the folder per cell; 'one worker': "
            "a DataLoader with 1 worker and batches of 32 (what a training loader worker does, the copy to the main "
            "process included); 'in process': the same samples read in a loop. Medians of "
            f"{args.rounds} interleaved rounds; ratios to pil taken within each round, so load that changes between "
            "rounds cancels.",
            "Reduced decodes need a crop at least twice the output on both sides (448 px at 224): rare on these "
            "160-500 px images and on ImageNet's typical 500x375 photos, so at 224 px the gain is mostly the "
            "decoder's own speed; at lower resolutions and on larger photos DCT scaling applies more often "
            "('reduced' column).",
            "pyturbojpeg needs the system's libturbojpeg (Debian: libturbojpeg0, libjpeg-turbo 2.1; PyTurboJPEG "
            "2.x requires libjpeg-turbo 3, so 1.8 is measured): not shipped, since dat-ds installs with pip alone; "
            "simplejpeg wheels carry libjpeg-turbo.",
            "torchvision.io.decode_jpeg(device='cuda') (nvJPEG) decodes batches on the GPU and takes the decode off "
            "the loader workers (the file read and the crop's geometry stay on the host; the GPU spends the time "
            "instead): " + ("measured below, in one process." if torch.cuda.is_available() else
                            "not measured here, this machine has no GPU."),
            f"Workers needed = ceil(GPU training rate / images/s of one worker) at 224 px, for ResNet-50 on one "
            f"GPU ({gpu}). The per-worker rates are this CPU's; a GPU host's cores decode at their own speed."]


def result(rows, args, files, size_mb, gen_s, load_before) -> dict:
    by = {r["reader"]: r for r in rows}
    tv, hf = by["torchvision ImageFolder"], by["HF imagefolder, first load"]
    best = min(("torchvision ImageFolder", "HF imagefolder, first load"), key=lambda k: by[k]["index_s"])
    notes = [f"{files} JPEGs ({args.classes} classes x {args.per_class}, 160-500 px, {size_mb:.0f} MiB); "
             "metadata warm in the page cache (the folder was just written or listed): a cold network "
             "file system lists slower, for every reader alike.",
             f"Index time extrapolated linearly to ImageNet's {IMAGENET_FILES:,} files: torchvision "
             f"{tv['extrapolated_1.28M_s']:.0f} s, HF imagefolder first load {hf['extrapolated_1.28M_s']:.0f} s "
             f"({hf['index_s'] / tv['index_s']:.1f}x torchvision).",
             f"Chosen reader for --dataset imagefolder: {best.split(',')[0]} scan (fastest index, same PIL "
             "decode; no cache files, so a read-only --data-dir works).",
             "images/s: decode + RandomResizedCrop(224) + flip + to-tensor through a DataLoader, "
             f"{args.images} random images per cell; per worker = images/s / workers. With 2 workers on "
             "2 cores the main process competes for a core.",
             f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after on "
             f"{os.cpu_count()} cores: other processes shared the CPU, so absolute figures are noisy; the "
             "readers were measured back to back in one run."]
    bars = {"index seconds extrapolated to 1.28 M files": {r["reader"]: r["extrapolated_1.28M_s"] for r in rows}}
    return {"title": "Reading an ImageNet-size folder: index time and images/s per worker",
            "machine": machine(), "settings": {"files": files, "classes": args.classes, "per_class": args.per_class,
                                               "images_per_cell": args.images, "workers": args.workers,
                                               "index_repeats": args.repeats,
                                               "decoder_images": args.decoder_images, "img_sizes": args.img_sizes,
                                               "decoder_rounds": args.rounds,
                                               "generation_s": round(gen_s, 1)},
            "rows": rows, "bars": bars, "notes": notes}


if __name__ == "__main__":
    main()

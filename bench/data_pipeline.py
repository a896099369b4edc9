#!/usr/bin/env python
"""Photo data pipeline benchmark: loader images/s per core, packing speed, packer memory, CLI start time.

On the same photo-sized JPEGs (crops of scikit-learn's two sample photos, resized to about
500x375 like a typical ImageNet image, JPEG quality 90) this measures:

- train loader images/s, one process, one thread, a DataLoader with no workers (per-core numbers),
  one shuffled epoch of RandomResizedCrop + flip batches of uint8 images: wsld's LMDB and folder
  loaders vs the reference's own LMDB loader (its ``dataset/imagenet_data.py`` ``ImageNet12`` train
  loader: ``dataset/lmdb_dataset.py`` + torchvision transforms + its ``fast_collate``) on the LMDB
  its own ``dataset/img2lmdb.py`` wrote; torchvision's ``ImageFolder`` (+ ToTensor, Normalize) is an
  extra row, labelled as torchvision's;
- packing images/s, one thread: ``wsld data pack`` (stores the original bytes) vs the reference's
  ``dataset/mk_img_list.py`` + ``dataset/img2lmdb.py`` (decodes and re-encodes every image with OpenCV);
- peak RSS of a fresh process packing the split, at two dataset sizes, for both packers: the child
  reads its own ``VmHWM`` from /proc/self/status when it is done (a high-water mark that starts at
  the child's exec, unlike ``ru_maxrss``, which a forked child inherits from its parent);
- the start time of ``wsld data --help`` and ``wsld data list ROOT`` (fresh processes);
- how far the fast decode is from a full-size decode (mean absolute difference, grey levels).

The reference's code is never part of this repository: ``--reference-dir`` is a checkout of
bellymonster/Weighted-Soft-Label-Distillation (needs opencv-python and msgpack: ``pip install
'wsld[bench]'``). Without it the reference rows are skipped. Prints a table and appends the results
to bench/results/data_pipeline.json.
Example: ``.venv/bin/python bench/data_pipeline.py --reference-dir ~/src/Weighted-Soft-Label-Distillation --images 600``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench_common import append_result, machine, now  # noqa: E402

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
REFERENCE_FILES = ["dataset/img2lmdb.py", "dataset/mk_img_list.py", "dataset/lmdb_dataset.py",
                   "dataset/imagenet_data.py", "dataset/prefetch_data.py", "imagenet_train_cfg.py"]
# run in a fresh child: the command, then print its own peak RSS (VmHWM counts from this process's exec)
PEAK_RSS_CHILD = r"""
import runpy, sys
def vm(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) / 1024
kind, args = sys.argv[1], sys.argv[2:]
if kind == 'imports':
    import wsld.cli, wsld.data.pack
elif kind == 'wsld':
    from wsld.cli import main
    rc = main(args)
    assert rc == 0, rc
else:  # the reference's packer script, run as its README says: python dataset/img2lmdb.py ARGS
    sys.path.insert(0, kind)
    sys.argv = [kind + '/dataset/img2lmdb.py', *args]
    runpy.run_path(sys.argv[0], run_name='__main__')
print('PEAK_RSS_MIB', vm('VmHWM'), vm('VmRSS'), 'torch' in sys.modules, file=sys.stderr)
"""


def make_photos(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    """``n`` photo-sized JPEGs in ``root/train/cNN/``: varied crops of real photos, ~500x375 or 375x500."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 427x640 each
    rng = np.random.default_rng(seed)
    for i in range(n):
        src = photos[i % 2]
        w0, h0 = src.size
        cw = int(rng.integers(260, w0 + 1))
        ch = int(rng.integers(200, h0 + 1))
        x, y = int(rng.integers(0, w0 - cw + 1)), int(rng.integers(0, h0 - ch + 1))
        crop = src.crop((x, y, x + cw, y + ch))
        size = (500, 375) if rng.random() < 0.75 else (375, 500)
        if rng.random() < 0.2:
            size = (500, int(rng.integers(280, 500)))
        img = crop.resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        d = root / "train" / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"img_{i:05d}.JPEG", quality=90)
    for c in range(classes):  # a tiny val split so the wsld loaders see an ImageNet-shaped root
        d = root / "val" / f"c{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(next((root / "train" / f"c{c:02d}").iterdir()), d / "v.JPEG")


def replicate(src: Path, dst: Path, times: int) -> None:
    """A bigger tree made of hard links to the same files (same bytes, more images)."""
    for split in ("train", "val"):
        for cls in sorted((src / split).iterdir()):
            out = dst / split / cls.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir()):
                for k in range(times if split == "train" else 1):
                    target = out / f"{f.stem}_{k}{f.suffix}"
                    try:
                        os.link(f, target)
                    except OSError:
                        shutil.copy(f, target)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def check_reference_dir(path: str) -> Path:
    """The reference checkout, or exit 2 with one line saying what is missing."""
    ref = Path(path).expanduser().resolve()
    missing = [f for f in REFERENCE_FILES if not (ref / f).is_file()]
    if missing:
        print(f"data_pipeline.py: error: --reference-dir {ref} has no {', '.join(missing)}: give a checkout of "
              "bellymonster/Weighted-Soft-Label-Distillation", file=sys.stderr)
        raise SystemExit(2)
    for mod, pkg in (("cv2", "opencv-python"), ("msgpack", "msgpack"), ("lmdb", "lmdb")):
        if importlib.util.find_spec(mod) is None:
            print(f"data_pipeline.py: error: the reference's code needs {pkg}: pip install 'wsld[bench]'", file=sys.stderr)
            raise SystemExit(2)
    return ref


def import_reference(ref: Path):
    """The reference's packer, list maker and data module, imported from its checkout as its scripts run."""
    if not hasattr(np, "int"):  # lmdb_dataset.py calls np.int(label), label a 1-element array: np.int was
        np.int = lambda v: int(np.asarray(v).item())  # int, removed in NumPy 1.24; NumPy 2 refuses int(1-D array)
    sys.path.insert(0, str(ref))
    names = ["dataset.img2lmdb", "dataset.mk_img_list", "dataset.imagenet_data", "imagenet_train_cfg"]
    try:
        return tuple(importlib.import_module(n) for n in names)
    except Exception as e:  # noqa: BLE001 - whatever the reference's code raises, one line
        print(f"data_pipeline.py: error: cannot import the reference's code from {ref}: {type(e).__name__}: {e}",
              file=sys.stderr)
        raise SystemExit(2) from None


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``: on a shared machine the CPU time of a
    single-threaded pipeline is its per-core cost, whatever else runs; wall time is what a user waits."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def reference_pack(ref_mods, root: Path, split: str, out_dir: Path) -> None:
    """The reference's two packing steps (README: mk_img_list.py, then img2lmdb.py)."""
    img2lmdb, mk_img_list = ref_mods[0], ref_mods[1]
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        mk_img_list.get_list(str(root), str(out_dir))  # appends: out_dir is fresh
        img2lmdb.create_dataset(str(out_dir / split), str(root / split), str(out_dir / f"{split}_datalist"), None)


def peak_rss(kind: str, args: list[str]) -> dict:
    """Peak and final RSS (MiB) of a fresh child process running ``kind`` with ``args``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    res = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, kind, *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} {' '.join(args)} failed:\n{res.stderr[-2000:]}")
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("PEAK_RSS_MIB"))
    _, hwm, rss, torch_loaded = line.split()
    return {"peak_rss_mib": round(float(hwm), 1), "final_rss_mib": round(float(rss), 1), "torch_imported": torch_loaded == "True"}


def gnu_time_peak(cmd: list[str]) -> float | None:
    """Cross-check: ``/usr/bin/time -v`` reports the child's peak (time itself is a few MiB)."""
    if not Path("/usr/bin/time").exists():
        return None
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in res.stderr.splitlines():
        if "Maximum resident set size" in line:
            return round(int(line.split(":")[1]) / 1024, 1)
    return None


def start_times(wsld_cmd: list[str], root: Path, out: Path, repeats: int) -> dict:
    """Wall seconds of fresh ``wsld data --help`` / ``wsld data list`` processes (and of ``import torch``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cases = {"wsld data --help": [*wsld_cmd, "data", "--help"],
             "wsld data list ROOT": [*wsld_cmd, "data", "list", str(root), "--out", str(out)],
             "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"]}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, cmd in cases.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=env)
            times[name].append(time.perf_counter() - t0)
    return {k: summary(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Targets: LMDB train loader >= 1.5x the reference's LMDB loader per core; packing "
                                 ">= 3x the reference's img2lmdb.py; packer peak RSS < 300 MiB and flat in dataset size; "
                                 "wsld data commands start in < 1 s.")
    ap.add_argument("--reference-dir", metavar="PATH",
                    help="a checkout of bellymonster/Weighted-Soft-Label-Distillation: its img2lmdb.py and LMDB loader "
                    "are the baselines (default: no reference rows)")
    ap.add_argument("--images", type=int, default=600, help="photo-sized JPEGs to generate (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per pipeline, interleaved (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32, help="loader batch size (default: %(default)s)")
    ap.add_argument("--low-res", type=int, default=128,
                    help="second train crop size, where DCT-domain downscaling applies more often (default: %(default)s)")
    ap.add_argument("--rss-scale", type=int, default=5,
                    help="the second RSS measurement packs this many times more images (default: %(default)s)")
    ap.add_argument("--workdir", help="where to build the temporary images (default: a fresh temp dir, removed after)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "data_pipeline.json"),
                    help="JSON file the results are appended to (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="print only, do not append to the JSON file")
    args = ap.parse_args(argv)
    if args.images < args.batch_size or args.repeats < 1 or args.rss_scale < 1:
        ap.error("--images must be >= --batch-size, --repeats and --rss-scale >= 1")
    ref = check_reference_dir(args.reference_dir) if args.reference_dir else None

    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # the reference's fast_collate
    ref_mods = import_reference(ref) if ref else None
    if ref_mods:
        import cv2

        cv2.setNumThreads(1)  # per-core numbers on both sides

    from wsld.config import DataConfig
    from wsld.data.batch import collate_batch
    from wsld.data.datasets import build_image_datasets
    from wsld.data.pack import pack_lmdb
    from wsld.data.sampling import ResumableSampler
    from wsld.engine.loop import make_loader

    quiet = dict(progress=False, log=lambda m: None)
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="wsld-bench-data-"))
    try:
        root = tmp / "photos"
        if root.exists():
            shutil.rmtree(root)
        t0 = time.perf_counter()
        make_photos(root, args.images)
        nbytes = sum(f.stat().st_size for f in (root / "train").rglob("*.JPEG"))
        print(f"made {args.images} JPEGs ({nbytes / args.images / 1024:.0f} KiB each on average) in "
              f"{time.perf_counter() - t0:.1f} s under {root}", file=sys.stderr)

        # --- CLI start time ----------------------------------------------------------------------------
        wsld_bin = Path(sys.executable).with_name("wsld")
        wsld_cmd = [str(wsld_bin)] if wsld_bin.exists() else [sys.executable, "-m", "wsld"]
        starts = start_times(wsld_cmd, root, tmp / "lists", args.repeats)

        # --- train loaders -------------------------------------------------------------------------------
        lmdb_dir = tmp / "lmdb"
        pack_lmdb(root, "train", lmdb_dir / "train", workers=1, overwrite=True, **quiet)  # images made anew above
        pack_lmdb(root, "val", lmdb_dir / "val", workers=1, overwrite=True, **quiet)
        ref_lmdb = tmp / "ref_lmdb"
        if ref_mods:
            shutil.rmtree(ref_lmdb, ignore_errors=True)
            reference_pack(ref_mods, root, "train", ref_lmdb)
        bs = args.batch_size

        def wsld_loader(fmt, size, fast):
            path = root if fmt == "folder" else lmdb_dir
            ds = build_image_datasets(DataConfig(format=fmt, data_path=str(path), image_size=size, fast_decode=fast))[0]
            sampler = ResumableSampler(len(ds), batch_size=bs, seed=0)
            return make_loader(ds, sampler, bs, workers=0, device=torch.device("cpu"), drop_last=True,
                               collate_fn=collate_batch), ds, sampler

        def reference_loader(size):
            imagenet_data, cfg = ref_mods[2], ref_mods[3].cfg
            lmdb_copy = tmp / f"ref_lmdb_{size}"  # py-lmdb opens an environment once per process
            shutil.copytree(ref_lmdb, lmdb_copy, dirs_exist_ok=True)
            data = imagenet_data.ImageNet12(str(lmdb_copy / "train"), None, num_workers=0, pin_memory=False,
                                            size_images=size, type_of_data_augmentation=cfg.data.type_of_data_aug,
                                            data_config=cfg.data)
            return data.getTrainLoader(bs), None, None

        def torchvision_loader(size):
            ds = ImageFolder(str(root / "train"), transform=T.Compose([
                T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]))  # fmt: skip
            return DataLoader(ds, batch_size=bs, shuffle=True, num_workers=0, drop_last=True), None, None

        lo = args.low_res
        REF, REF_LO = "reference LMDB loader (its img2lmdb LMDB)", f"reference LMDB loader @{lo}px"
        pipelines = {}
        if ref_mods:
            pipelines[REF] = reference_loader(224)
        pipelines.update({
            "wsld LMDB loader": wsld_loader("lmdb", 224, True),
            "wsld folder loader": wsld_loader("folder", 224, True),
            "wsld LMDB, fast_decode off": wsld_loader("lmdb", 224, False),
            "torchvision ImageFolder + ToTensor/Normalize": torchvision_loader(224),
        })  # fmt: skip
        if ref_mods:
            pipelines[REF_LO] = reference_loader(lo)
        pipelines.update({f"wsld LMDB loader @{lo}px": wsld_loader("lmdb", lo, True),
                          f"wsld LMDB @{lo}px, fast_decode off": wsld_loader("lmdb", lo, False)})

        def epoch(loader, sampler, e) -> tuple[float, float]:
            """Images per wall second and per CPU second over one epoch."""
            if sampler is not None:
                sampler.set_epoch(e)
            n = [0]

            def run():
                for b in loader:
                    n[0] += len(b) if hasattr(b, "images") else int(b[0].shape[0])

            wall, cpu = timed(run)
            return n[0] / wall, n[0] / cpu

        for loader, _, sampler in pipelines.values():  # warm the page cache and the code paths
            epoch(loader, sampler, 99)
        rates: dict[str, list[float]] = {k: [] for k in pipelines}
        cpu_rates: dict[str, list[float]] = {k: [] for k in pipelines}
        for r in range(args.repeats):
            for name, (loader, _, sampler) in pipelines.items():
                wall_rate, cpu_rate = epoch(loader, sampler, r)
                rates[name].append(wall_rate)
                cpu_rates[name].append(cpu_rate)

        # fast decode vs full decode, same seeds: mean absolute difference in grey levels per image
        diffs = {}
        for size, fast_name, full_name in [(224, "wsld LMDB loader", "wsld LMDB, fast_decode off"),
                                           (lo, f"wsld LMDB loader @{lo}px", f"wsld LMDB @{lo}px, fast_decode off")]:
            fast_ds, full_ds = pipelines[fast_name][1], pipelines[full_name][1]
            keys = list(ResumableSampler(len(fast_ds), batch_size=bs, seed=0))
            d = [(fast_ds[k][0].float() - full_ds[k][0].float()).abs().mean().item() for k in keys]
            diffs[f"{size}px"] = {"mean": float(np.mean(d)), "max": float(np.max(d)),
                                  "share_of_images_changed": float(np.mean([x > 0 for x in d]))}

        # --- packing, one thread -------------------------------------------------------------------------
        OURS, THEIRS = "wsld data pack (original bytes)", "reference mk_img_list.py + img2lmdb.py (re-encode)"
        packers = {OURS: lambda out: pack_lmdb(root, "train", out, workers=1, **quiet)}  # scan, list, pack
        if ref_mods:
            packers[THEIRS] = lambda out: reference_pack(ref_mods, root, "train", out)
        pack_rates: dict[str, list[float]] = {k: [] for k in packers}
        pack_cpu_rates: dict[str, list[float]] = {k: [] for k in packers}
        for r in range(args.repeats):
            for name, packer in packers.items():
                out = tmp / f"pack_{r}"
                wall, cpu = timed(lambda: packer(out))
                pack_rates[name].append(args.images / wall)
                pack_cpu_rates[name].append(args.images / cpu)
                shutil.rmtree(out)

        # --- packer memory at two dataset sizes, fresh processes ---------------------------------------
        big = tmp / "photos_big"
        replicate(root, big, args.rss_scale)
        rss = {"wsld imports only (wsld.cli, wsld.data.pack)": peak_rss("imports", [])}
        for src in (root, big):
            n = sum(1 for _ in (src / "train").rglob("*.JPEG"))
            out = tmp / "pack_rss"
            cmd = ["data", "pack", str(src), "--split", "train", "--out", str(out), "--no-progress"]
            rss[f"wsld data pack, {n} images"] = peak_rss("wsld", cmd) | {"lmdb_mib": round(sum(
                f.stat().st_size for f in out.iterdir()) / 2**20, 1)}
            shutil.rmtree(out)
            if src is root:
                rss[f"wsld data pack, {n} images"]["gnu_time_peak_mib"] = gnu_time_peak([*wsld_cmd, *cmd])
                shutil.rmtree(out)
            if ref_mods:
                out = tmp / "ref_rss"
                out.mkdir()
                ref_mods[1].get_list(str(src), str(out))
                rss[f"reference img2lmdb.py, {n} images"] = peak_rss(str(ref), [
                    "--image_path", str(src), "--list_path", str(out), "--output_path", str(out), "--split", "train"])
                shutil.rmtree(out)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)

    def ratios_to(rates: dict, base_224: str, base_lo: str) -> dict:
        # ratio per repeat (the pipelines of one repeat ran back to back), then median and range over repeats
        return {k: summary([a / b for a, b in zip(v, rates[base_lo if "@" in k else base_224])])
                for k, v in rates.items() if k not in (base_224, base_lo)}

    def pack_ratio(rates: dict):
        return summary([a / b for a, b in zip(rates[OURS], rates[THEIRS])]) if ref_mods else None

    tv = "torchvision ImageFolder + ToTensor/Normalize"
    result = {
        "date": now(),
        "machine": machine(),
        "torchvision": torchvision.__version__,
        "pillow": Image.__version__,
        "opencv": __import__("cv2").__version__ if ref_mods else None,
        "reference": {"dir": str(ref), "files": REFERENCE_FILES} if ref else None,
        "images": args.images,
        "repeats": args.repeats,
        "batch_size": bs,
        "command": "python bench/data_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "start_seconds": starts,
        "train_images_per_s_per_core": {k: summary(v) for k, v in rates.items()},
        "train_images_per_cpu_s": {k: summary(v) for k, v in cpu_rates.items()},
        "train_speedup_vs_reference": ratios_to(rates, REF, REF_LO) if ref_mods else None,
        "train_speedup_vs_reference_cpu_time": ratios_to(cpu_rates, REF, REF_LO) if ref_mods else None,
        "train_speedup_vs_torchvision_224": {k: summary([a / b for a, b in zip(v, rates[tv])])
                                             for k, v in rates.items() if "@" not in k and k != tv},
        "pack_images_per_s": {k: summary(v) for k, v in pack_rates.items()},
        "pack_images_per_cpu_s": {k: summary(v) for k, v in pack_cpu_rates.items()},
        "pack_speedup_vs_reference": pack_ratio(pack_rates),
        "pack_speedup_vs_reference_cpu_time": pack_ratio(pack_cpu_rates),
        "peak_rss": rss,
        "fast_decode_vs_full_decode_abs_diff": diffs,
    }

    m = result["machine"]
    print(f"\nmachine: {m['host']}; torch {m['torch']}, Pillow {result['pillow']}, OpenCV {result['opencv']}; "
          f"{args.images} JPEGs ~500x375; {args.repeats} repeats; 1 thread; batch {bs}")
    print("\nstart time (fresh process, s): " + "; ".join(f"{k} {v['median']:.2f}" for k, v in starts.items()))
    def cell(r, name):
        return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" if r else ("baseline" if name.startswith("reference") else "-")

    vs, vs_cpu = result["train_speedup_vs_reference"] or {}, result["train_speedup_vs_reference_cpu_time"] or {}
    print(f"\n{'train loader (1 thread)':<46} {'vs reference, wall':>20} {'per CPU s':>18} {'img/s wall':>11} "
          f"{'img/CPU s':>10}")
    for k, v in rates.items():
        print(f"{k:<46} {cell(vs.get(k), k):>20} {cell(vs_cpu.get(k), k):>18} {statistics.median(v):>11.1f} "
              f"{statistics.median(cpu_rates[k]):>10.1f}")
    print(f"\n{'packing (1 thread)':<52} {'img/s wall':>11} {'(min-max)':>12} {'img/CPU s':>10}")
    for k, v in pack_rates.items():
        print(f"{k:<52} {statistics.median(v):>11.1f} ({min(v):.0f}-{max(v):.0f}) {statistics.median(pack_cpu_rates[k]):>10.1f}")
    if ref_mods:
        print(f"wsld data pack vs the reference's img2lmdb.py: {cell(result['pack_speedup_vs_reference'], '')} wall, "
              f"{cell(result['pack_speedup_vs_reference_cpu_time'], '')} per CPU second")
    print("\npeak RSS of a fresh process (VmHWM): " + "; ".join(f"{k}: {v['peak_rss_mib']} MiB" for k, v in rss.items()))
    for size, d in diffs.items():
        print(f"fast decode vs full decode at {size}: {d['share_of_images_changed']:.0%} of crops differ (decoded at "
              f"reduced scale); mean |diff| {d['mean']:.2f} grey levels (worst image {d['max']:.2f})")
    if not args.no_save:
        print(f"appended to {append_result(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

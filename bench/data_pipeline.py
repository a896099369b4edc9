#!/usr/bin/env python
"""Photo data pipeline benchmark: images/s per core, packing speed, packer memory.

On the same photo-sized JPEGs (crops of scikit-learn's two sample photos, resized to about
500x375 like a typical ImageNet image, JPEG quality 90) this measures, in one process with one
thread (per-core numbers):

- train pipeline images/s: torchvision ``ImageFolder`` + the usual PIL transforms
  (RandomResizedCrop(224) + flip + ToTensor + Normalize; the baseline) vs wsld's folder source and
  wsld's LMDB source (uint8 tensors, DCT-domain downscaled decode), and wsld's folder source with
  ``fast_decode`` off (what the DCT trick is worth);
- packing images/s: ``wsld data pack`` (stores the original bytes) vs a packer that decodes and
  re-encodes every image as JPEG (what the reference tool did), both single-threaded;
- the packer's peak RSS at two dataset sizes (a subprocess each, ``ru_maxrss``): it streams, so the
  peak must not grow with the number of images;
- how far the fast decode is from a full-size decode (mean absolute difference, grey levels).

Prints a table and appends the results to bench/results/data_pipeline.json.
Example: ``.venv/bin/python bench/data_pipeline.py --images 300 --repeats 5``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


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


def time_dataset(ds, keys) -> float:
    t0 = time.perf_counter()
    for k in keys:
        ds[k]
    return len(keys) / (time.perf_counter() - t0)


def reencode_pack(root: Path, split: str, out: Path) -> int:
    """The reference tool's approach: decode each image, re-encode as JPEG (q95), msgpack with a uint16 label."""
    import lmdb
    import msgpack

    from wsld.data.lists import find_classes, scan_split

    lst = scan_split(root, split, find_classes(root, [split]))
    env = lmdb.open(str(out), map_size=1 << 32)
    txn = env.begin(write=True)
    for i, (p, y) in enumerate(zip(lst.paths, lst.labels)):
        img = Image.open(lst.split_dir / p).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        txn.put(p.encode(), msgpack.packb(buf.getvalue() + int(y).to_bytes(2, "little"), use_bin_type=True))
        if (i + 1) % 1000 == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.close()
    return len(lst)


def pack_rss(root: Path, out: Path) -> tuple[float, float, int]:
    """Run ``pack_lmdb`` in a fresh process: RSS after imports, peak RSS (MiB), image count."""
    code = (
        "import resource, sys, json; sys.path.insert(0, %r)\n"
        "from wsld.data.pack import pack_lmdb\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "r = pack_lmdb(%r, 'train', %r, workers=1, progress=False, log=lambda m: None)\n"
        "print(json.dumps([before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, r.count]))\n"
    ) % (str(REPO / "src"), str(root), str(out))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, peak, count = json.loads(res.stdout.strip().splitlines()[-1])
    return before / 1024, peak / 1024, count


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Targets: LMDB train pipeline >= 1.5x the ImageFolder baseline per core; "
                                 "packing >= 3x the decode-and-re-encode packer; packer RSS flat in dataset size.")
    ap.add_argument("--images", type=int, default=300, help="photo-sized JPEGs to generate (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per pipeline, interleaved (default: %(default)s)")
    ap.add_argument("--low-res", type=int, default=128,
                    help="second train crop size, where DCT-domain downscaling applies more often (default: %(default)s)")
    ap.add_argument("--rss-scale", type=int, default=5,
                    help="the second RSS measurement packs this many times more images (default: %(default)s)")
    ap.add_argument("--workdir", help="where to build the temporary images (default: a fresh temp dir, removed after)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "data_pipeline.json"),
                    help="JSON file the results are appended to (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="print only, do not append to the JSON file")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    import torchvision
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    from wsld.config import DataConfig
    from wsld.data.datasets import build_image_datasets
    from wsld.data.pack import pack_lmdb
    from wsld.data.sampling import sample_seed

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

        # --- train pipelines -------------------------------------------------------------------------
        def imagefolder(size):
            return ImageFolder(str(root / "train"), transform=T.Compose([
                T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]))  # fmt: skip

        lmdb_dir = tmp / "lmdb"
        pack_lmdb(root, "train", lmdb_dir / "train", workers=1, progress=False, log=lambda m: None, overwrite=True)  # images made anew above
        pack_lmdb(root, "val", lmdb_dir / "val", workers=1, progress=False, log=lambda m: None, overwrite=True)

        def ours(fmt, size, fast):
            path = root if fmt == "folder" else lmdb_dir
            return build_image_datasets(DataConfig(format=fmt, data_path=str(path), image_size=size,
                                                   fast_decode=fast))[0]

        n = args.images
        int_keys = list(range(n))
        seeded = [(i, sample_seed(0, 0, i)) for i in range(n)]
        pipelines = {
            "torchvision ImageFolder (baseline)": (imagefolder(224), int_keys),
            "wsld folder": (ours("folder", 224, True), seeded),
            "wsld LMDB": (ours("lmdb", 224, True), seeded),
            "wsld LMDB, fast_decode off": (ours("lmdb", 224, False), seeded),
            f"ImageFolder @{args.low_res}px (baseline)": (imagefolder(args.low_res), int_keys),
            f"wsld LMDB @{args.low_res}px": (ours("lmdb", args.low_res, True), seeded),
            f"wsld LMDB @{args.low_res}px, fast_decode off": (ours("lmdb", args.low_res, False), seeded),
        }
        for ds, keys in pipelines.values():  # warm the page cache and the code paths
            time_dataset(ds, keys[:20])
        rates: dict[str, list[float]] = {k: [] for k in pipelines}
        for _ in range(args.repeats):
            for name, (ds, keys) in pipelines.items():
                rates[name].append(time_dataset(ds, keys))

        # fast decode vs full decode, same seeds: mean absolute difference in grey levels per image
        diffs = {}
        for size, fast_name, full_name in [(224, "wsld LMDB", "wsld LMDB, fast_decode off"),
                                           (args.low_res, f"wsld LMDB @{args.low_res}px",
                                            f"wsld LMDB @{args.low_res}px, fast_decode off")]:
            fast_ds, full_ds = pipelines[fast_name][0], pipelines[full_name][0]
            d = [(fast_ds[k][0].float() - full_ds[k][0].float()).abs().mean().item() for k in seeded]
            diffs[f"{size}px"] = {"mean": float(np.mean(d)), "max": float(np.max(d)),
                                  "share_of_images_changed": float(np.mean([x > 0 for x in d]))}

        # --- packing -------------------------------------------------------------------------------------
        pack_rates: dict[str, list[float]] = {"wsld data pack (original bytes)": [],
                                              "decode + re-encode packer (reference)": []}
        for r in range(args.repeats):
            out = tmp / f"pack_ours_{r}"
            res = pack_lmdb(root, "train", out, workers=1, progress=False, log=lambda m: None)
            pack_rates["wsld data pack (original bytes)"].append(res.count / res.seconds)
            shutil.rmtree(out)
            out = tmp / f"pack_ref_{r}"
            t0 = time.perf_counter()
            count = reencode_pack(root, "train", out)
            pack_rates["decode + re-encode packer (reference)"].append(count / (time.perf_counter() - t0))
            shutil.rmtree(out)

        # --- packer memory at two dataset sizes -------------------------------------------------------
        big = tmp / "photos_big"
        replicate(root, big, args.rss_scale)
        rss = []
        for src in (root, big):
            out = tmp / "pack_rss"
            before, peak, count = pack_rss(src, out)
            size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
            rss.append({"images": count, "rss_after_imports_mib": round(before, 1), "peak_rss_mib": round(peak, 1),
                        "lmdb_mib": round(size, 1)})
            shutil.rmtree(out)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)

    base_name = "torchvision ImageFolder (baseline)"
    low_name = f"ImageFolder @{args.low_res}px (baseline)"
    # ratio per repeat (the pipelines of one repeat ran back to back), then median and range over repeats
    ratios = {k: [a / b for a, b in zip(v, rates[low_name if "@" in k else base_name])] for k, v in rates.items()}
    speedup = {k: statistics.median(v) for k, v in ratios.items()}
    pack_ratios = [a / b for a, b in zip(pack_rates["wsld data pack (original bytes)"],
                                         pack_rates["decode + re-encode packer (reference)"])]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s): {cpu_name()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": Image.__version__,
        "images": args.images,
        "repeats": args.repeats,
        "command": "python bench/data_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_images_per_s_per_core": {k: summary(v) for k, v in rates.items()},
        "train_speedup_vs_baseline": {k: summary(v) for k, v in ratios.items()},
        "pack_images_per_s": {k: summary(v) for k, v in pack_rates.items()},
        "pack_speedup_vs_reencode": summary(pack_ratios),
        "pack_peak_rss": rss,
        "fast_decode_vs_full_decode_abs_diff": diffs,
    }

    print(f"\nmachine: {result['machine']}; torch {result['torch']}, Pillow {result['pillow']}; "
          f"{args.images} JPEGs ~500x375; {args.repeats} repeats; 1 thread")
    print(f"\n{'train pipeline (per core)':<40} {'vs baseline (min-max)':>22} {'img/s median':>13} {'(min-max)':>15}")
    for k, v in rates.items():
        r = ratios[k]
        print(f"{k:<40} {speedup[k]:>7.2f}x ({min(r):.2f}-{max(r):.2f}) {statistics.median(v):>13.1f} "
              f"({min(v):.0f}-{max(v):.0f})")
    print(f"\n{'packing (1 thread)':<40} {'vs re-encode (min-max)':>22} {'img/s median':>13} {'(min-max)':>15}")
    for k, v in pack_rates.items():
        r = pack_ratios if k.startswith("wsld") else [1.0]
        print(f"{k:<40} {statistics.median(r):>7.2f}x ({min(r):.2f}-{max(r):.2f}) {statistics.median(v):>13.1f} "
              f"({min(v):.0f}-{max(v):.0f})")
    print("\npacker peak RSS: " + "; ".join(
        f"{r['images']} images -> {r['peak_rss_mib']} MiB (after imports {r['rss_after_imports_mib']} MiB; "
        f"LMDB {r['lmdb_mib']} MiB)" for r in rss))
    for size, d in diffs.items():
        print(f"fast decode vs full decode at {size}: {d['share_of_images_changed']:.0%} of crops differ (decoded at "
              f"reduced scale); mean |diff| {d['mean']:.2f} grey levels (worst image {d['max']:.2f})")
    if not args.no_save:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        history = json.loads(out.read_text()) if out.exists() else []
        history.append(result)
        out.write_text(json.dumps(history, indent=1) + "\n")
        print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

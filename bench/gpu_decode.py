#!/usr/bin/env python
"""The data.decode=gpu path against the CPU path: images/s per core, device decode rate, pixel differences.

On photo-sized JPEGs (crops of scikit-learn's sample photos, ~500x375, quality 90, as
bench/data_pipeline.py makes them), for the train transform (RandomResizedCrop + flip) and the
val transform (Resize + CenterCrop), this times, interleaved repeat by repeat:

- ``cpu path``: ``ds[(i, seed)]``, what a loader worker does per image with data.decode=cpu;
- ``gpu path, worker``: ``EncodedPhotoDataset[(i, seed)]`` + ``collate_encoded``, what a worker
  does with data.decode=gpu (read the bytes, draw the crop box);
- ``gpu path, decode``: ``GpuDecoder(batch)`` on ``--device``, the main process's decode, crop,
  resize, flip and normalisation (on CUDA, ended by a synchronisation).

Per core: with ``--device cpu`` and one thread the gpu path's two parts run on the same core, so
``gpu path total`` (worker + decode) compares with the CPU path image for image. Pixel
differences (device path vs CPU path, grey levels, uint8 scale) are reported with
``data.fast_decode`` off and on.

Prints a table and appends a record to bench/results/gpu_decode.json.
Examples:
  python bench/gpu_decode.py --threads 1                               # CPU: per-core rates
  python bench/gpu_decode.py --device cuda --images 512 --batch-size 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, append_result, command_line, machine, now  # noqa: E402


def build(root: Path, image_size: int, fast_decode: bool):
    from wsld.config import Config
    from wsld.data.datasets import build_image_datasets

    cfg = Config().data
    cfg.format, cfg.data_path, cfg.image_size = "folder", str(root), image_size
    cfg.val_resize, cfg.fast_decode = int(image_size * 8 / 7), fast_decode
    return build_image_datasets(cfg)


def time_split(ds, keys: list, batch: int, device, sync) -> dict[str, float]:
    """Seconds per image of the CPU path, the gpu path's worker part and its decode part."""
    from wsld.data.gpu_decode import EncodedPhotoDataset, GpuDecoder, collate_encoded

    enc = EncodedPhotoDataset(ds)
    decoder = GpuDecoder([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], ds.transform.size, device,
                         channels_last=device.type == "cuda")  # fmt: skip
    t0 = time.perf_counter()
    for k in keys:
        ds[k]
    cpu = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = [collate_encoded([enc[k] for k in keys[j : j + batch]]) for j in range(0, len(keys), batch)]
    worker = time.perf_counter() - t0
    decoder(batches[0])  # warm-up (CUDA: nvJPEG handles, kernels)
    sync()
    t0 = time.perf_counter()
    for b in batches:
        decoder(b)
    sync()
    decode = time.perf_counter() - t0
    n = len(keys)
    return {"cpu": cpu / n, "worker": worker / n, "decode": decode / n}


def pixel_diff(ds, keys: list) -> dict[str, Any]:
    """Mean and max |device path - CPU path| in grey levels over ``keys``, per image and overall."""
    import torch

    from wsld.data.gpu_decode import EncodedPhotoDataset, GpuDecoder, collate_encoded

    enc = EncodedPhotoDataset(ds)
    got = GpuDecoder([0.0] * 3, [1 / 255] * 3, ds.transform.size, "cpu")(collate_encoded([enc[k] for k in keys])).images
    ref = torch.stack([ds[k][0] for k in keys]).float()
    d = (got - ref).abs()
    per_image = d.mean(dim=(1, 2, 3))
    return {"mean": float(d.mean()), "max": float(d.max()), "worst_image_mean": float(per_image.max()),
            "share_of_values_off": float((d > 0).float().mean())}  # fmt: skip


def main(argv=None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--images", type=int, default=96, help="photo-sized JPEGs to generate (default: %(default)s)")
    ap.add_argument("--image-size", type=int, default=224, help="crop size (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per decoded batch (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes, interleaved (default: %(default)s)")
    ap.add_argument("--diff-sizes", default="224,128", help="crop sizes of the pixel comparison (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="where GpuDecoder decodes: cpu or cuda[:N] (default: %(default)s)")
    ap.add_argument("--workdir", default=None, help="where to build the images (default: a temp dir, removed after)")
    ap.add_argument("--out", default=str(RESULTS / "gpu_decode.json"), help="JSON file the record is appended to (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="print only, append nothing")
    args = ap.parse_args(argv)

    import torch

    from data_pipeline import make_photos
    from wsld.data.sampling import sample_seed

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda given but CUDA is not available")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="wsld-bench-gpu-decode-"))
    root = work / "photos"
    make_photos(root, args.images, classes=4)
    for c in range(4):  # val: the train images of each class too (any photo-sized JPEG will do)
        for f in sorted((root / "train" / f"c{c:02d}").iterdir()):
            (root / "val" / f"c{c:02d}" / f.name).write_bytes(f.read_bytes())

    train, val = build(root, args.image_size, fast_decode=True)
    times: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    for r in range(args.repeats):
        order = ["train", "val"] if r % 2 == 0 else ["val", "train"]
        for split in order:
            ds = train if split == "train" else val
            keys = [(i, sample_seed(r, 0, i)) for i in range(len(ds))] if split == "train" else list(range(len(ds)))
            times[split].append(time_split(ds, keys, args.batch_size, device, sync))
    diffs: dict[str, Any] = {}
    n_diff = min(args.images, 48)
    for size in [int(s) for s in args.diff_sizes.split(",") if s]:
        for fast in (False, True):
            tr, va = build(root, size, fast_decode=fast)
            diffs[f"train {size} px, fast_decode={fast}"] = pixel_diff(tr, [(i, sample_seed(7, 0, i)) for i in range(n_diff)])
            diffs[f"val {size} px, fast_decode={fast}"] = pixel_diff(va, list(range(n_diff)))

    info = machine(device if device.type == "cuda" else None)
    print(f"{info['device']} ({info['host']}), torch {info['torch']}, {torch.get_num_threads()} thread(s), "
          f"load average {info['load_average_1min']}; {args.images} JPEGs ~500x375, crop {args.image_size}, "
          f"batches of {args.batch_size}, median of {args.repeats} repeats")  # fmt: skip
    summary: dict[str, Any] = {}
    print(f"{'':<8}{'cpu path':>14}{'gpu: worker':>14}{'gpu: decode':>14}{'gpu: total':>14}   images/s")
    for split, runs in times.items():
        med = {k: statistics.median(t[k] for t in runs) for k in ("cpu", "worker", "decode")}
        ips = {k: 1.0 / v for k, v in med.items()}
        ips["total"] = 1.0 / (med["worker"] + med["decode"])
        summary[split] = {"img_per_s": ips, "ms_per_image": {k: v * 1e3 for k, v in med.items()},
                          "repeats": runs}  # fmt: skip
        print(f"{split:<8}{ips['cpu']:>14.0f}{ips['worker']:>14.0f}{ips['decode']:>14.0f}{ips['total']:>14.0f}")
    print("\npixels, device path vs CPU path (grey levels): mean / max / worst image's mean / share of values off")
    for name, d in diffs.items():
        print(f"  {name:<34}{d['mean']:.3f} / {d['max']:.0f} / {d['worst_image_mean']:.2f} / {d['share_of_values_off']:.3f}")
    record = {"date": now(), "command": command_line("gpu_decode.py", argv), "machine": info, "device": str(device),
              "images": args.images, "image_size": args.image_size, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "times": summary, "pixel_diff": diffs}  # fmt: skip
    if not args.no_save:
        print(f"\nappended to {append_result(args.out, record)}")
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

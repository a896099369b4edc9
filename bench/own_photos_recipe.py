"""Time the README's two "Your own data" commands (configs/own_photos_small.yaml) on N photos.

Makes ROOT/train|val/<class>/*.jpg from crops of scikit-learn's two sample photos (4 classes: the left
and right halves of each photo, square crops of 180-300 pixels; a fifth of each class for val), puts random networks where torchvision's
cache holds the config's ImageNet weights (nothing is downloaded; the accuracies are therefore not the
recipe's), then runs `wsld train CONFIG --teacher-only` and the distillation command, each timed in
wall seconds and CPU seconds (user + system of the command and its loader workers).

    python bench/own_photos_recipe.py --out /tmp/own_photos [--photos 300] [--results FILE] [key=value ...]

Extra key=value items go to both commands (the test runs it tiny that way).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "own_photos_small.yaml"


def make_photos(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images  # two 427x640 RGB photos
    rng = np.random.default_rng(0)
    classes = {"china_left": (0, 0), "china_right": (0, 1), "flower_left": (1, 0), "flower_right": (1, 1)}
    n_val = n // 20  # per class: a fifth of its photos
    for split, count in (("train", n // 4 - n_val), ("val", n_val)):
        for name, (src, half) in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            im = images[src]
            h, w = im.shape[:2]
            for i in range(count):
                s = int(rng.integers(180, 300))
                x0 = (w // 2) * half
                x = min(int(rng.integers(x0, max(x0 + 1, x0 + w // 2 - s))) if w // 2 > s else x0, w - s)
                y = int(rng.integers(0, h - s))
                Image.fromarray(np.ascontiguousarray(im[y : y + s, x : x + s])).save(folder / f"{i:03d}.jpg", quality=90)


def stand_in_weights(torch_home: Path, overrides: list[str]) -> None:
    """Random 1000-class networks under the file names torchvision's cache looks for."""
    import torch
    import torchvision

    from wsld.config import load_config

    cfg = load_config(CONFIG, ["data.data_path=/unused", *overrides])
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for name, weights in ((cfg.model.teacher, cfg.model.teacher_weights), (cfg.model.student, cfg.model.student_weights)):
        w = torchvision.models.get_model_weights(name)[weights]
        path = folder / os.path.basename(w.url)
        if not path.exists():
            torch.manual_seed(0)
            torch.save(torchvision.models.get_model(name).state_dict(), path)


def timed(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="working folder (photos, weights, runs)")
    p.add_argument("--photos", type=int, default=300)
    p.add_argument("--results", type=Path, help="also write the numbers as JSON here")
    args, overrides = p.parse_known_args()
    root, home, runs = args.out / "photos", args.out / "torch_home", args.out / "runs"
    if not root.exists():
        make_photos(root, args.photos)
    stand_in_weights(home, overrides)
    env = {**os.environ, "TORCH_HOME": str(home)}
    wsld = [sys.executable, "-m", "wsld", "train", str(CONFIG), f"data.data_path={root}", "train.progress=false", *overrides]
    teacher = runs / "teacher"
    rows = {
        "teacher": timed([*wsld, "--teacher-only", "--out", str(teacher)], env, args.out / "teacher.log"),
        "student": timed([*wsld, f"model.teacher_weights={teacher / 'teacher.safetensors'}", "--out", str(runs / "student")],
                         env, args.out / "student.log"),
    }  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.photos} photos, {os.cpu_count()} cores, load average {load:.1f} at the end")
    print(f"{'command':<10}{'wall s':>10}{'CPU s':>10}")
    for name, r in rows.items():
        print(f"{name:<10}{r['wall_s']:>10.1f}{r['cpu_s']:>10.1f}")
    if args.results:
        args.results.write_text(json.dumps({"photos": args.photos, "load_average": load, **rows}, indent=2))


if __name__ == "__main__":
    main()

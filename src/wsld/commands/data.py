"""``wsld data list | pack | verify``: prepare ImageNet-style photo folders for training.

Heavy modules are imported inside the handlers so ``wsld --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="list, pack (LMDB) and verify ImageNet-style image folders",
        description="Prepare photo datasets laid out as ROOT/<split>/<class>/<image> (ImageNet's layout). "
        "Labels are the index of the class folder in sorted order, as torchvision's ImageFolder and its "
        "pretrained ImageNet models use. See docs/data.md.",
    )
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    lp = dsub.add_parser(
        "list",
        help="write <split>_list.txt and classes.txt for every split folder",
        description="Scan ROOT/<split>/<class>/ for images and write DIR/<split>_list.txt (one 'path<TAB>label' line "
        "per image, path relative to the split folder, sorted as torchvision's ImageFolder) and DIR/classes.txt "
        "(line number = label). Files are replaced, never appended to. Hidden files are skipped; non-image files "
        "are reported and skipped; an empty or missing class folder in any split is an error, and so is a name "
        "holding a control character (TAB, newline), a symlink leading outside ROOT, or an image name that is not "
        "a regular file (FIFO, device). "
        "Use with data.format=list and data.data_path=DIR.",
    )
    lp.add_argument("root", metavar="ROOT", help="dataset root holding split folders such as train/ and val/")
    lp.add_argument("--out", metavar="DIR", help="folder to write the lists to (default: ROOT)")
    lp.add_argument("--splits", metavar="A,B",
                    help="comma-separated split folder names (default: those of train, val, validation, valid, test "
                    "that exist)")
    lp.set_defaults(func=run_list)

    pp = dsub.add_parser(
        "pack",
        help="pack one split into an LMDB (original bytes, resumable)",
        description="Pack ROOT/<split> into one LMDB folder, storing each image file's original bytes (no "
        "decode/re-encode unless --resize-short), its label and a metadata record. An interrupted pack (Ctrl-C, "
        "kill -9) resumes when the same command is run again; training refuses an unfinished LMDB. A complete "
        "LMDB of another split, list or options is never replaced without --overwrite. "
        "Train from it with data.format=lmdb and data.data_path=the folder holding the <split> LMDB folders "
        "(ROOT/lmdb by default).",
    )
    pp.add_argument("root", metavar="ROOT", help="dataset root holding the split folders")
    pp.add_argument("--split", required=True, help="split folder to pack, e.g. train or val")
    pp.add_argument("--out", metavar="PATH",
                    help="LMDB folder to write (default: ROOT/lmdb/<split>, or ROOT/lmdb/<split>_<S> with "
                    "--resize-short S)")
    pp.add_argument("--workers", type=_positive, default=_default_workers(), metavar="N",
                    help="threads reading (and with --resize-short, re-encoding) images (default: %(default)s)")
    pp.add_argument("--resize-short", type=_positive, metavar="S",
                    help="decode and re-encode as JPEG with the shorter side S pixels (smaller images are stored "
                    "as they are); e.g. 160 for fast low-resolution training. Default: store original bytes")
    pp.add_argument("--quality", type=int, default=95, metavar="Q",
                    help="JPEG quality for --resize-short re-encoding (default: %(default)s)")
    pp.add_argument("--list", dest="list_file", metavar="FILE",
                    help="pack the images of this list file (e.g. a subset made by editing ROOT/train_list.txt; "
                    "classes.txt beside it; any file name, the images are read from <its root>/SPLIT) instead of "
                    "scanning ROOT/<split>")
    pp.add_argument("--overwrite", action="store_true",
                    help="pack from scratch even if PATH holds a complete or foreign LMDB")
    pp.add_argument("--no-progress", action="store_true", help="no progress bar")
    pp.set_defaults(func=run_pack)

    vp = dsub.add_parser(
        "verify",
        help="decode every image of a folder, list or LMDB and report bad ones",
        description="Fully decode every image and report each unusable one (empty, truncated, corrupt, not an "
        "image, decompression bomb, missing LMDB record) as ERROR and each unusual but usable one (CMYK, "
        "grayscale, palette, PNG named .JPEG) as NOTE, then images per class. PATH may be a dataset root "
        "(every split), a split folder, a <split>_list.txt, a wsld or reference-tool LMDB folder, or a folder of "
        "LMDBs. Exit status: 0 all usable, 1 some unusable, 2 bad PATH.",
    )
    vp.add_argument("path", metavar="PATH", help="dataset root, split folder, list file, or LMDB folder")
    vp.add_argument("--workers", type=_positive, default=_default_workers(), metavar="N",
                    help="decoding threads (default: %(default)s)")
    vp.add_argument("--no-counts", action="store_true", help="do not print the per-class table")
    vp.add_argument("--no-progress", action="store_true", help="no progress bar")
    vp.set_defaults(func=run_verify)


def _progress(args) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def run_list(args: argparse.Namespace) -> int:
    from wsld.data.lists import write_lists

    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    lists = write_lists(args.root, args.out, splits)
    out = args.out or args.root
    classes = next(iter(lists.values())).classes
    for split, lst in lists.items():
        print(f"{os.path.join(out, split + '_list.txt')}: {len(lst)} images in {len(classes)} classes")
    print(f"{os.path.join(out, 'classes.txt')}: {len(classes)} classes")
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from wsld.data.pack import pack_lmdb

    res = pack_lmdb(args.root, args.split, args.out, workers=args.workers, resize_short=args.resize_short,
                    quality=args.quality, list_file=args.list_file, overwrite=args.overwrite,
                    progress=_progress(args))
    if res.already_complete:
        return 0
    rate = res.written / res.seconds if res.seconds > 0 else float("inf")
    resumed = f", resumed at {res.resumed_from}" if res.resumed_from else ""
    extra = f", {res.reencoded} resized" if args.resize_short else ""
    print(f"{res.path}: {res.count} images packed ({res.written} this run{resumed}{extra}), "
          f"{res.bytes_stored / 2**20:.1f} MiB in {res.seconds:.1f} s ({rate:.0f} images/s)")
    if res.undecodable:
        print(f"warning: {len(res.undecodable)} image(s) could not be decoded for resizing and were stored as they "
              f"are, e.g. {res.undecodable[0]}; training skips them as corrupt ('wsld data verify {res.path}' lists "
              "them)", file=sys.stderr)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from wsld.data.verify import verify_path

    return verify_path(args.path, workers=args.workers, progress=_progress(args), counts=not args.no_counts)

"""``wsld demo``: the reference comparison (teacher / student alone / KD / WSLD) on real data, as a package.


The demo does what a user does on ImageNet, on the Fashion-MNIST photos that install with the tool:

1. export the built-in data as an ImageNet-shaped folder ``OUT/data/fashion-mnist/{train,val}/<class>/*.png``
   (class folders named ``0_T-shirt_top`` ... so that sorted order is label order; the 10,000 test
   images are ``val``);
2. ``wsld data list`` and ``wsld data pack`` (both splits) into ``.../lmdb``;
3. write one YAML config per run into ``OUT/configs/`` and train each one with ``wsld train`` from the
   LMDB: per variant (balanced, long-tailed) the teacher once (CE), then the student with ``ce``,
   ``kd`` and ``wsld`` for every seed, the KD/WSLD runs reading the teacher's ``last.pt``;
4. collect ``summary.json`` / ``metrics.jsonl`` of every run into ``OUT/results.json``,
   ``OUT/report.md`` and PNG plots under ``OUT/plots/``.

Runs go through the same engine and config system as ``wsld train``; with ``--jobs N > 1`` they
run as N parallel ``wsld train`` processes (one thread each on a small CPU machine: the small CNNs
do not profit from intra-op threads, two processes do), with ``--jobs 1`` in this process. A
finished run (``summary.json``) is reused, an unfinished one resumed (``wsld train --resume``), so
re-running the same command after an interruption continues where it stopped. See docs/demo.md.
"""


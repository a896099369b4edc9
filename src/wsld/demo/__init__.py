"""``wsld compare`` and ``wsld demo`` (``wsld compare`` on the built-in Fashion-MNIST), as a package.

``plan`` (rows, settings, every run's config), ``search`` (the bracketing grids), ``estimate`` (the time
printed first), ``data`` (IDX subsets), ``runner`` (processes in dependency order), ``collect``
(results.json), ``stats`` (mean ± std, paired 95% CIs), ``plots``, ``report`` and ``pipeline`` (the
command from start to end). See docs/compare.md and docs/demo.md.
"""

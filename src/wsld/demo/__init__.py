"""``wsld demo``: the reference comparison (teacher / CE / KD / WSLD / WSLD with weights fixed at 1) on Fashion-MNIST, as a package.

``plan`` (settings, rows, every run's config), ``data`` (IDX subsets), ``runner`` (processes in
dependency order), ``collect`` (results.json), ``stats`` (mean ± std, paired 95% CIs), ``plots``,
``report`` and ``pipeline`` (the command from start to end). See docs/demo.md.
"""

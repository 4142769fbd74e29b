"""Benchmark harness: our flow models vs anomalib's per backend (``benchmarks/benchmark.py`` is the entry point).

- ``models``: the six benchmarked Lightning modules, built side by side with the same backbone where possible.
- ``grid``: the grid (models × backends × sizes × devices × batches) and its driver, one subprocess per task.
- ``runner``: one task in a fresh process (export, timing, training), peak RSS included.
- ``machine``: CPU, cores, RAM, GPU, versions.
- ``report``: schema check, ours/anomalib ratios, markdown, README section, plot.
- ``local_defects``: small synthetic defects on real normal images, for the validation of ``decisions.py``.
"""

"""The parts of ``bench/bench.py``, the side-by-side benchmark (see bench/README.md).

A package, not loose modules next to ``bench.py``: run as a script, ``bench/`` is ``sys.path[0]``, and a module
there named ``report`` or ``options`` would shadow any installed top-level module of that name. Only the name
``benchlib`` is taken; the modules inside import each other relatively.

- ``common``: the repository root (put on ``sys.path`` for the server's modules), byte units, progress log.
- ``stats``: measurements (``Sample``, ``Run``, ``Stats``) and the ``PeakRSS`` sampler.
- ``options``: GPU options of the serial-opt arm (fused QKV, SDPA backend, compile) and the FLOP estimate.
- ``arms``: the arms (``SerialArm``, ``ServerArm``) and ``make_arm``.
- ``workloads``: bursts and Poisson arrivals (``Workload``), and the per-request seeds (``Seeds``).
- ``driver``: runs every workload on every arm (``benchmark``).
- ``report``: the collected results (``Report``), the machine description and the Markdown tables.
"""

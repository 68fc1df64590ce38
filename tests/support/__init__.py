"""Helpers the tests share and the runtime packages never ship: ``pki`` (a throw-away certificate
authority, never for production) and ``reliability`` (the result files behind RELIABILITY.md, also
written by ``bench/soak.py`` and tabulated by ``scripts/reliability_table.py``).

Importable as ``tests.support`` from the repository root (``python -m pytest``, ``python -m bench.soak``).
"""

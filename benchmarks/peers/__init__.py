"""The jobs that `benchmarks/bench_peers.py` runs, one script per tool, each in that tool's own venv.

Every script here imports only the standard library, `caption.py` beside it and its own tool, so
that a venv holding nothing but that tool (and Pillow) can run it.
"""

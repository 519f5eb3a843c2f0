"""Benchmarking streamer: ``streamer bench`` and what it needs beside the product.

:mod:`~streamer.benchmark.bench` is ``streamer bench``; :mod:`~streamer.benchmark.clips`
writes the clips it feeds the server and :mod:`~streamer.benchmark.servers` starts real
``streamer serve`` processes (the tests use both too). Sits at the top, beside the CLI: may
import every layer, and nothing but the CLI, the tests and ``benchmarks/`` imports it.
"""

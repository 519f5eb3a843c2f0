"""Benchmarking streamer: ``streamer bench`` and what it needs beside the product.

Today the clips it feeds the server (:mod:`~streamer.benchmark.clips`, which the tests use
too); ``streamer bench`` itself (now ``streamer.bench``) moves here. Sits at the top, beside
the CLI: may import every layer, and nothing but the CLI and the tests imports it.
"""

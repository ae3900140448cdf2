"""Side-by-side serving benchmark: hybridserve against the in-process limit and other servers.

``python -m benchmarks.run`` (``make bench``) runs everything and writes BENCHMARKS.md.
"""

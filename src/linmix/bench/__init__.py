"""Benchmarks that ship with the package (``linmix bench``): decode throughput (:mod:`linmix.bench.decode`)."""

"""Measurements shared by the benchmarks: alternating timing, activation memory."""

from condcomp.bench.measure import Prepared, parameter_storages, prepare, saved_bytes, timed_pair

__all__ = ["Prepared", "parameter_storages", "prepare", "saved_bytes", "timed_pair"]

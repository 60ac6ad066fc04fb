"""Measurements shared by the benchmarks: alternating timing, activation memory."""

from condcomp.bench.measure import Prepared, gemm_rate, parameter_storages, prepare, saved_bytes, timed_pair

__all__ = ["Prepared", "gemm_rate", "parameter_storages", "prepare", "saved_bytes", "timed_pair"]

"""Benchmarks: throughput, compile time and memory of the detectors and their parts (see run.py)."""

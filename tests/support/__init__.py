"""Test doubles and helpers shared by the tests (and benchmarks/replicas.py); never shipped."""

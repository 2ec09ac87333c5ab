"""Conformance tests: the same behaviour from ProcessPoolExecutor and ClusterExecutor (see conftest)."""

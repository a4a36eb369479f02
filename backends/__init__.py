"""Backends: how processes are grouped and how the primitives run. Chosen from a table."""

"""Scheduling and KV-cache memory: pure Python, no tensors."""

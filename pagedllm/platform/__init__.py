"""What the machine can do, probed once: the CPU's instruction sets (platform/cpu.py)."""

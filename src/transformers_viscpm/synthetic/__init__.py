"""Tiny seeded checkpoints in the ORIGINAL layouts, for tests, benchmarks and the demo.

Each builder mirrors the reference recipe (`init_random_` of ../shared/reference/original_on_cpu.py
applied to the original module), so golden values recorded from the original apply to them.
"""

"""Compiler passes: profile, smooth, allocate, lower. Each is a function of the compile context, nothing else."""

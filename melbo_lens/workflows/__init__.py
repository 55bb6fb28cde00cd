"""Workflows compose methods, generation and analysis into whole studies: the run
analysis behind the report, the radius sweep, the planted-behaviour benchmark and the
speed benchmark."""

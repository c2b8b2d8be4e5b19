"""Benchmark of the backup pipelines (see __main__)."""

"""The benchmarks, each a command that prints a header and a table and can write them as JSON.

Each module says how to run it; :mod:`~stager.benchmarks.common` holds what they share.
"""

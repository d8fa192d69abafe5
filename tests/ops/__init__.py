"""The ops' tests, one folder per op, one file per concern (tests/README.md has the map).

A package, so that files of the same name in each op's folder (test_parity.py, ...) import as distinct modules.
"""

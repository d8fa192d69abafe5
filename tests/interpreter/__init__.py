"""The Triton kernels under TRITON_INTERPRET=1 (see conftest.py). A package, so that files of the same name in each op's folder import as distinct modules."""

"""instance_mean's Triton kernels in the interpreter, one file per concern (tests/README.md has the map)."""

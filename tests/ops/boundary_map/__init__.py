"""boundary_map's tests: test_contract, test_parity, test_layouts, test_cuda (GPU only)."""

"""instance_norm_act's tests: test_contract, test_parity, test_layouts, test_autograd, test_hard_inputs, test_cuda (GPU only)."""

"""instance_mean's tests: test_contract, test_parity, test_layouts, test_autograd, test_cuda and test_cuda_graph_safe (GPU only)."""

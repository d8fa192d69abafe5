"""sparse_input_conv2d's tests: the C++ kernel against F.conv2d."""

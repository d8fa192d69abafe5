// The Python module stub of the extension.
//
// The operators' schemas are defined in Python, in one place (fastp2phd/ops/_library.py),
// which imports this module afterwards. Its kernels live beside their op
// (boundary_map_cpu.cpp, boundary_map_cuda.cu, instance_mean_cpu.cpp, sparse_input_conv2d_cpu.cpp) and register
// themselves with TORCH_LIBRARY_IMPL when the library loads; fake kernels and
// autograd formulas are registered from Python in fastp2phd/ops/, next to each
// op's reference, except instance_norm_act's autograd (instance_norm_act_autograd.cpp),
// which is in C++ to cut the host time per call.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fastp2phd._C` loads this shared library, which runs the kernels' static
// TORCH_LIBRARY_IMPL registrations; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastp2phd C++/CUDA operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Schemas of the fastp2phd operators and the Python module stub.
//
// Kernels live beside their op: boundary_map_cpu.cpp, boundary_map_cuda.cu,
// instance_mean_cpu.cpp. Fake (meta) kernels and autograd formulas are
// registered from Python in fastp2phd/ops/, next to each op's reference.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fastp2phd._C` loads this shared library, which runs the static
// TORCH_LIBRARY registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastp2phd C++/CUDA operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastp2phd, m) {
  // (N,1,H,W) instance ids -> (N,1,H,W) 4-neighbour boundary map in `dtype`.
  m.def("boundary_map(Tensor inst, ScalarType dtype) -> Tensor");
  // Every pixel of each (batch, id) segment gets its segment's mean feature.
  m.def("instance_mean(Tensor feat, Tensor inst) -> Tensor");
}

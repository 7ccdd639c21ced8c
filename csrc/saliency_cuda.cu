#include <pybind11/pybind11.h>
__global__ void k(float* x) { x[threadIdx.x] = 1.f; }
PYBIND11_MODULE(_saliency_cuda, m) { m.def("ping", []() { return 1; }); }

// One empty function with the CUDA GEMV's 26 arguments, bound twice: as a pybind11 function (how
// codequant's CUDA extension is called) and as a TORCH_LIBRARY op (the dispatcher path). Used by
// benchmarks/op_call_overhead.py to measure the host cost of each call.
#include <torch/extension.h>
void gemv_args(torch::Tensor x, bool xdirect, torch::Tensor xscale, torch::Tensor idx, torch::Tensor cb, torch::Tensor cb8,
          torch::Tensor wscale, torch::Tensor wd,
          torch::Tensor bias, torch::Tensor y, torch::Tensor bexp, torch::Tensor rows, torch::Tensor rw, int64_t M, int64_t K,
          int64_t nslots, int64_t bm, int64_t epi, int64_t inter, bool bf16_dot, int64_t R, int64_t W, int64_t stages, bool slut,
          int64_t xtopk, int64_t pdl) { TORCH_CHECK(M >= 0); }
#define CQ_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
CQ_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("gemv(Tensor x, bool xdirect, Tensor xscale, Tensor idx, Tensor cb, Tensor cb8, Tensor wscale, Tensor wd, Tensor bias, Tensor(a!) y, Tensor bexp, Tensor rows, Tensor rw, int M, int K, int nslots, int bm, int epi, int inter, bool bf16_dot, int R, int W, int stages, bool slut, int xtopk, int pdl) -> ()");
  m.impl("gemv", c10::DispatchKey::CPU, &gemv_args);
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv", &gemv_args); }

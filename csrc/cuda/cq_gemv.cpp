// PyTorch binding of the CodeQuant W4A16 decode kernel (cq_gemv.cu).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

int cq_gemv_launch(const void* x, int xtype, int ldx, int M, int K, const uint8_t* idx, const void* cb, int N, int KP,
                   int NG, int G, const float* bias, void* y, void* xp, int R, int W, cudaStream_t st);
void cq_gemv_set_force_prologue(bool v);

// x [M, K] (bf16 / fp16 / fp32, unit column stride), indices uint8 [N, KP/2], codebook fp16 [N, NG, 16],
// bias fp32 [N] or empty, y [M, N] in x's dtype, xp int32 [M, KP/2] scratch.
void gemv(torch::Tensor x, torch::Tensor idx, torch::Tensor cb, torch::Tensor bias, torch::Tensor y, torch::Tensor xp,
          int64_t K, int64_t R, int64_t W) {
  TORCH_CHECK(x.is_cuda() && idx.is_cuda() && cb.is_cuda() && y.is_cuda() && xp.is_cuda(), "CUDA tensors expected");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with unit column stride");
  TORCH_CHECK(idx.dtype() == torch::kUInt8 && idx.is_contiguous() && idx.dim() == 2, "indices must be contiguous uint8 [N, KP/2]");
  TORCH_CHECK(cb.dtype() == torch::kFloat16 && cb.is_contiguous() && cb.dim() == 3 && cb.size(2) == 16, "codebook must be fp16 [N, NG, 16]");
  TORCH_CHECK(y.is_contiguous() && y.dtype() == x.dtype(), "y must be contiguous in x's dtype");
  const int M = (int)x.size(0), N = (int)idx.size(0), KP = (int)idx.size(1) * 2, NG = (int)cb.size(1);
  TORCH_CHECK(KP % 64 == 0 && K <= KP && K > KP - 64, "indices width does not match K");
  TORCH_CHECK(xp.numel() >= (int64_t)M * (KP / 2) && xp.element_size() == 4, "xp scratch too small");
  int xtype;
  if (x.dtype() == torch::kBFloat16) xtype = 0;
  else if (x.dtype() == torch::kFloat16) xtype = 1;
  else if (x.dtype() == torch::kFloat32) xtype = 2;
  else TORCH_CHECK(false, "x must be bf16, fp16 or fp32");
  const float* b = nullptr;
  if (bias.numel()) {
    TORCH_CHECK(bias.dtype() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == N, "bias must be fp32 [N]");
    b = bias.data_ptr<float>();
  }
  const int G = (int)(K / NG);
  cudaStream_t st = at::cuda::getCurrentCUDAStream();
  int err = cq_gemv_launch(x.data_ptr(), xtype, (int)x.stride(0), M, (int)K, idx.data_ptr<uint8_t>(), cb.data_ptr(), N, KP,
                           NG, G, b, y.data_ptr(), xp.data_ptr(), (int)R, (int)W, st);
  TORCH_CHECK(err == 0, "cq_gemv launch failed: ", cudaGetErrorString((cudaError_t)err));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "CodeQuant W4A16 decode GEMM (M <= 16)");
  m.def("set_force_prologue", &cq_gemv_set_force_prologue, "testing: always pair x in the prologue kernel");
}

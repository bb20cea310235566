// PyTorch binding of the CodeQuant decode kernels (cq_gemv.cu). Empty tensors stand for "none".
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#include "cq_gemv.h"

namespace {

template <typename T>
const T* ptr_or_null(const torch::Tensor& t) {
  return t.numel() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}

int dtype_code(const torch::Tensor& t) {
  if (t.dtype() == torch::kBFloat16) return 0;
  if (t.dtype() == torch::kFloat16) return 1;
  if (t.dtype() == torch::kFloat32) return 2;
  TORCH_CHECK(false, "expected a bf16, fp16 or fp32 tensor, got ", t.dtype());
  return -1;
}

void check(int err, const char* what) { TORCH_CHECK(err == 0, what, " launch failed: ", cudaGetErrorString((cudaError_t)err)); }

}  // namespace

// xp [rows_out, KP/2] int32 <- rows of x [*, K] (gathered through `rows` when given), paired
// in bf16 or fp16, or quantized per row to `bits` (codes in fp16, scales to xscale [rows_out]);
// i8: the codes as int8 pairs instead, xp [rows_out, KP/4]; pdl: launched with PDL after the kernel writing x.
void prep_x(torch::Tensor x, torch::Tensor xp, torch::Tensor xscale, torch::Tensor rows, int64_t nslots, int64_t topk,
            bool bf16, int64_t bits, double clip, bool i8, bool pdl, int64_t hblock) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "x must be a CUDA [rows, K] tensor with unit column stride");
  TORCH_CHECK(xp.is_cuda() && xp.is_contiguous() && xp.dim() == 2 && xp.element_size() == 4, "xp must be contiguous int32 [rows, KP/2]");
  const int K = (int)x.size(1), KP = (int)xp.size(1) * (i8 ? 4 : 2);
  TORCH_CHECK(!i8 || bits <= 7, "int8 codes need bits <= 7");
  TORCH_CHECK(KP % 64 == 0 && K <= KP && K > KP - 64, "xp width does not match K");
  TORCH_CHECK(hblock == 0 || (hblock > 0 && (hblock & (hblock - 1)) == 0 && K % hblock == 0 && KP <= PREP_HADAMARD_MAX_KP),
              "hblock must be 0 or a power of two dividing K, with KP <= ", PREP_HADAMARD_MAX_KP);
  const bool quant = bits < 16;
  TORCH_CHECK(!quant || (xscale.numel() >= xp.size(0) && xscale.dtype() == torch::kFloat32), "xscale must be fp32 [rows]");
  TORCH_CHECK(!rows.numel() || (rows.dtype() == torch::kInt32 && rows.numel() >= xp.size(0)), "rows must be int32 [rows]");
  PrepParams p{};
  p.x = x.data_ptr();
  p.itype = dtype_code(x);
  p.ldx = (int)x.stride(0);
  p.K = K;
  p.KP = KP;
  p.xp = reinterpret_cast<uint32_t*>(xp.data_ptr());
  p.xscale = quant ? xscale.data_ptr<float>() : nullptr;
  p.rows = ptr_or_null<int>(rows);
  p.nslots = (int)nslots;
  p.topk = (int)topk;
  p.bf16 = bf16 && !quant;
  p.quant = quant;
  p.bits = (int)bits;
  p.clip = (float)clip;
  p.i8 = i8;
  p.pdl = pdl;
  p.hblock = (int)hblock;
  check(cq_prep_x(p, (int)xp.size(0), c10::cuda::getCurrentCUDAStream().stream()), "prep_x");
}

// y = x @ W^T (+ epilogue). x: raw 16-bit [M, K] (xdirect) or pair words [rows, KP/2] int32.
// pdl: launched with programmatic dependent launch (sm_90) after the launch writing x: 1 fetches the weights
// before waiting for it, 2 waits first (MoE blocks whose expert ids the previous launches wrote).
// Weights: idx uint8 [E?, N, KP/2] + cb fp16 [E?, N, NG, 16] (+ cb8 int8, wscale fp32 [E?, N] for int8
// codes x), or wd bf16 [E?, N, K].
// MoE (bexp given, int32 or int64): block y of `bm` x rows uses expert bexp[y]; rows = slot ids (none: x row
// r is slot r); rw = routing weights (bf16, fp16 or fp32); raw x with xtopk > 0: x row r reads token slot / xtopk.
void gemv(torch::Tensor x, bool xdirect, torch::Tensor xscale, torch::Tensor idx, torch::Tensor cb, torch::Tensor cb8,
          torch::Tensor wscale, torch::Tensor wd,
          torch::Tensor bias, torch::Tensor y, torch::Tensor bexp, torch::Tensor rows, torch::Tensor rw, int64_t M, int64_t K,
          int64_t nslots, int64_t bm, int64_t epi, int64_t inter, bool bf16_dot, int64_t R, int64_t W, int64_t stages, bool slut,
          int64_t xtopk, int64_t pdl) {
  TORCH_CHECK(x.is_cuda() && y.is_cuda() && x.stride(-1) == 1 && y.stride(-1) == 1, "x and y must be CUDA tensors with unit column stride");
  GemvParams p{};
  const bool dense_w = wd.numel() > 0;
  int N, KP, NG = 1;
  if (dense_w) {
    TORCH_CHECK(wd.dtype() == torch::kBFloat16 && wd.is_contiguous() && wd.size(-1) == K, "wd must be contiguous bf16 [E?, N, K]");
    N = (int)wd.size(-2);
    KP = (int)((K + 63) / 64 * 64);
    p.wd = reinterpret_cast<const __nv_bfloat16*>(wd.data_ptr());
    p.wd_es = wd.dim() == 3 ? wd.stride(0) : 0;
  } else {
    TORCH_CHECK(idx.dtype() == torch::kUInt8 && idx.is_contiguous(), "indices must be contiguous uint8 [E?, N, KP/2]");
    TORCH_CHECK(cb.dtype() == torch::kFloat16 && cb.is_contiguous() && cb.size(-1) == 16, "codebook must be contiguous fp16 [E?, N, NG, 16]");
    N = (int)cb.size(-3);
    KP = (int)((K + 63) / 64 * 64);
    NG = (int)cb.size(-2);
    TORCH_CHECK(idx.size(-2) == N && idx.size(-1) * 2 == KP, "indices width does not match K");
    p.idx = idx.data_ptr<uint8_t>();
    p.cb = reinterpret_cast<const __half*>(cb.data_ptr());
    p.idx_es = cb.dim() == 4 ? idx.stride(0) : 0;
    p.cb_es = cb.dim() == 4 ? cb.stride(0) : 0;
    if (cb8.numel()) {
      TORCH_CHECK(cb8.dtype() == torch::kInt8 && cb8.sizes() == cb.sizes() && cb8.is_contiguous(), "int8 codebook must match the codebook");
      TORCH_CHECK(wscale.dtype() == torch::kFloat32 && wscale.numel() * 16 * NG == cb.numel(), "wscale must be fp32 [E?, N]");
      p.cb8 = cb8.data_ptr<int8_t>();
      p.wscale = wscale.data_ptr<float>();
    }
  }
  if (xdirect) {
    TORCH_CHECK(x.element_size() == 2 && K % 64 == 0 && x.stride(0) % 8 == 0 && (uintptr_t)x.data_ptr() % 16 == 0,
                "direct x must be 16-bit, K % 64 == 0, 16-byte aligned rows");
    p.xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
    p.ldx = (int)x.stride(0);
  } else {
    TORCH_CHECK(x.element_size() == 4 && x.is_contiguous() && x.size(-1) * (p.cb8 ? 4 : 2) == KP,
                "x words must be int32 [rows, KP/2] (int8 codes: [rows, KP/4])");
    p.xp = reinterpret_cast<const uint32_t*>(x.data_ptr());
  }
  p.xscale = ptr_or_null<float>(xscale);
  p.bias = ptr_or_null<float>(bias);
  p.y = y.data_ptr();
  p.ldy = y.stride(0);
  p.otype = dtype_code(y);
  p.M = (int)M;
  p.N = N;
  p.K = (int)K;
  p.KP = KP;
  p.NG = NG;
  p.G = (int)(K / NG);
  if (bexp.numel()) {
    TORCH_CHECK(bexp.is_contiguous() && (bexp.dtype() == torch::kInt32 || bexp.dtype() == torch::kInt64), "bexp must be contiguous int32 or int64");
    TORCH_CHECK(rows.numel() || bm == 1, "MoE blocks without slot rows hold one slot each (bm = 1)");
    p.bexp = bexp.data_ptr();
    p.bexp64 = bexp.dtype() == torch::kInt64;
  }
  p.bm = (int)bm;
  p.rows = ptr_or_null<int>(rows);
  p.nslots = (int)nslots;
  p.xtopk = (int)xtopk;
  if (rw.numel()) {
    TORCH_CHECK(rw.is_contiguous() && rw.numel() >= nslots, "routing weights must be contiguous [slots]");
    p.rw = rw.data_ptr();
    p.rwtype = dtype_code(rw);
  }
  p.epi = (int)epi;
  p.inter = (int)inter;
  p.slut = slut ? 1 : 0;
  TORCH_CHECK(pdl >= 0 && pdl <= 2, "pdl must be 0, 1 or 2");
  p.pdl = (int)pdl;
  TORCH_CHECK(p.epi != EPI_SCATTER || (p.bexp && p.rw), "the scatter epilogue needs MoE blocks and routing weights");
  const int blocks_y = p.bexp ? (int)bexp.numel() : 1;
  check(cq_gemv(p, (int)R, (int)W, bf16_dot ? 1 : 0, (int)stages, blocks_y, c10::cuda::getCurrentCUDAStream().stream()), "gemv");
}

// The (token, k) slots of ids [S] (int32 / int64 expert ids < num_experts) grouped by expert in runs of bm
// rows: sorted [max_blocks * bm] int32 slot ids (S in padding rows), bexp [max_blocks] int32 (-1: unused block).
void moe_align(torch::Tensor ids, torch::Tensor sorted, torch::Tensor bexp, int64_t num_experts, int64_t bm) {
  TORCH_CHECK(ids.is_cuda() && ids.is_contiguous() && (ids.dtype() == torch::kInt32 || ids.dtype() == torch::kInt64),
              "ids must be contiguous CUDA int32 / int64");
  TORCH_CHECK(sorted.dtype() == torch::kInt32 && bexp.dtype() == torch::kInt32 && sorted.is_contiguous() && bexp.is_contiguous() &&
              sorted.numel() == bexp.numel() * bm, "sorted [max_blocks * bm] and bexp [max_blocks] must be contiguous int32");
  TORCH_CHECK(num_experts >= 1 && num_experts <= 4096, "num_experts must be in 1..4096");
  check(cq_moe_align(ids.data_ptr(), ids.dtype() == torch::kInt64, (int)ids.numel(), (int)num_experts, (int)bm, (int)bexp.numel(),
                     sorted.data_ptr<int>(), bexp.data_ptr<int>(), c10::cuda::getCurrentCUDAStream().stream()), "moe_align");
}

// out [T, H] (bf16, fp16 or fp32) = sum over the topk slots of each token of ys fp32 [T * topk, H].
void topk_sum(torch::Tensor ys, torch::Tensor out, int64_t topk, bool pdl) {
  TORCH_CHECK(ys.is_cuda() && ys.dtype() == torch::kFloat32 && ys.is_contiguous() && ys.dim() == 2, "ys must be contiguous fp32 [T * topk, H]");
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.dim() == 2 && out.size(1) == ys.size(1) && out.size(0) * topk == ys.size(0),
              "out must be contiguous [T, H] with T * topk = ys rows");
  check(cq_topk_sum(ys.data_ptr<float>(), out.data_ptr(), dtype_code(out), (int)out.size(0), (int)out.size(1), (int)topk, pdl,
                    c10::cuda::getCurrentCUDAStream().stream()), "topk_sum");
}

// The router in two launches: logits [T, E] (or empty), weights [T, k] (bf16, fp16 or fp32) and index int64 [T, k]
// <- x [T, H] (16-bit, 16-byte aligned rows) and W [E, H] (x's dtype), ws a float32 workspace [T, E]; see RouteParams
// in cq_gemv.h.
void route(torch::Tensor x, torch::Tensor w, torch::Tensor logits, torch::Tensor weights, torch::Tensor index, bool round_logits,
           bool renorm, double scale, torch::Tensor ws, bool pdl) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1 && x.stride(0) % 8 == 0 && (uintptr_t)x.data_ptr() % 16 == 0,
              "x must be a CUDA [T, H] tensor with unit column stride and 16-byte aligned rows");
  TORCH_CHECK(x.dtype() == torch::kBFloat16 || x.dtype() == torch::kFloat16, "x must be bf16 or fp16");
  TORCH_CHECK(w.dtype() == x.dtype() && w.is_contiguous() && w.dim() == 2 && w.size(1) == x.size(1) && (uintptr_t)w.data_ptr() % 16 == 0,
              "the router weight must be contiguous [E, H] in x's dtype");
  const int T = (int)x.size(0), E = (int)w.size(0), K = (int)index.size(1);
  TORCH_CHECK(index.dtype() == torch::kInt64 && index.is_contiguous() && index.size(0) == T, "index must be contiguous int64 [T, k]");
  TORCH_CHECK(weights.is_contiguous() && weights.sizes() == index.sizes(), "weights must be contiguous [T, k]");
  TORCH_CHECK(!logits.numel() || (logits.is_contiguous() && logits.size(0) == T && logits.size(1) == E), "logits must be contiguous [T, E]");
  TORCH_CHECK(ws.is_cuda() && ws.dtype() == torch::kFloat32 && ws.is_contiguous() && ws.numel() >= (int64_t)T * E,
              "ws must be a contiguous float32 CUDA tensor of T * E elements");
  RouteParams p{};
  p.x = x.data_ptr();
  p.ldx = (int)x.stride(0);
  p.xtype = dtype_code(x);
  p.w = w.data_ptr();
  p.T = T;
  p.E = E;
  p.H = (int)x.size(1);
  p.topk = K;
  p.round_logits = round_logits;
  p.renorm = renorm;
  p.scale = (float)scale;
  p.logits = logits.numel() ? logits.data_ptr() : nullptr;
  p.ltype = logits.numel() ? dtype_code(logits) : 2;
  p.weights = weights.data_ptr();
  p.wtype = dtype_code(weights);
  p.index = reinterpret_cast<long long*>(index.data_ptr<int64_t>());
  p.ws = ws.data_ptr<float>();
  p.pdl = pdl;
  check(cq_route(p, c10::cuda::getCurrentCUDAStream().stream()), "route");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prep_x", &prep_x, "pair / gather / (block-Hadamard) / quantize x rows into pair words");
  m.def("gemv", &gemv, "CodeQuant decode GEMV (M <= 16 rows per block), dense or per-expert");
  m.def("moe_align", &moe_align, "group MoE slots by expert into padded runs");
  m.def("topk_sum", &topk_sum, "sum each token's top-k slot rows");
  m.def("route", &route, "MoE router in two launches: logits, then softmax, top-k, renormalization");
}

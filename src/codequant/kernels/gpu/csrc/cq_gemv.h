// Parameters of the CodeQuant decode kernels (cq_gemv.cu), shared with the PyTorch binding.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

enum { EPI_PLAIN = 0, EPI_SWIGLU = 1, EPI_SCATTER = 2 };

// xp[r] = pair words of x row src(r) (src(r) = rows[r] / topk for MoE slots, r otherwise),
// optionally quantized per row to `bits` (codes q - z in fp16, scale to xscale[r]).
struct PrepParams {
  const void* x;       // [*, ldx] in itype (0 bf16, 1 fp16, 2 fp32)
  int itype, ldx, K, KP;
  uint32_t* xp;        // [rows_out, KP/2]
  float* xscale;       // [rows_out] (quant)
  const int* rows;     // [rows_out] slot ids (>= nslots: padding) or null; topk = 0: row r itself
  int nslots, topk;
  int bf16;            // pair words in bf16 (else fp16)
  int quant, bits;
  float clip;
  int i8;              // int8 codes (bytes), two per 16-bit unit, instead of 16-bit pair words
  int pdl;             // launched with PDL (x is the previous launch's output)
  int hblock;          // > 0: the block Hadamard H_hblock / sqrt(hblock) applied to each row first (K % hblock == 0,
                       // KP <= PREP_HADAMARD_MAX_KP: the row is transformed in shared memory)
};

constexpr int PREP_HADAMARD_MAX_KP = 16384;  // 64 KB of fp32 row in shared memory

// y = x @ W^T on packed weights (or dense bf16 weights wd), M <= 16 rows of x per block.
struct GemvParams {
  const uint8_t* idx;        // [E?, N, KP/2]
  const __half* cb;          // [E?, N, NG, 16]
  const int8_t* cb8;         // or int8 codebooks [E?, N, NG, 16] (W4A4, x as int8 codes) ...
  const float* wscale;       // ... with per-row scales [E?, N]
  const __nv_bfloat16* wd;   // dense [E?, N, K] instead of idx/cb (or null)
  long long idx_es, cb_es, wd_es;  // per-expert strides in elements
  const uint32_t* xp;        // pair words [rows, KP/2] (when xs is null)
  const uint16_t* xs;        // or raw 16-bit x [rows, ldx] (K % 64 == 0)
  int ldx;
  const float* xscale;       // per x row (W4A4) or null
  const float* bias;         // [N] or null (EPI_PLAIN)
  void* y;                   // output, row stride ldy, otype 0 bf16 / 1 fp16 / 2 fp32
  long long ldy;
  int otype;
  int M, N, K, KP, NG, G, cpw;
  const void* bexp;          // MoE: expert of each block of bm x rows (-1: empty), or null (dense) ...
  int bexp64;                // ... int64 (the router's top-k indices, one block per slot) or int32
  int bm;
  const int* rows;           // MoE: slot id of each x row (>= nslots: padding), or null: x row r is slot r
  int nslots;
  int xtopk;                 // MoE with raw x: x row r reads token slot(r) / xtopk (0: row r itself)
  const void* rw;            // routing weight of each slot (EPI_SCATTER), in rwtype (0 bf16, 1 fp16, 2 fp32)
  int rwtype;
  int epi;                   // EPI_PLAIN, EPI_SWIGLU (R = 2: gate rows n, up rows inter + n), EPI_SCATTER
  int inter;
  int slut;                  // dense, per-row codebooks, 16-bit dot: look up pair words in shared memory
  int pdl;                   // launched with PDL: 1 = weights and tables fetched before waiting for x (the previous
                             // launch's output), 2 = waits first (MoE gate_up: the expert ids come from the router)
};

// The router of an MoE layer in two launches (cq_gemv.cu, route_logits_kernel, route_topk_kernel): logits of
// x [T, H] against W [E, H] (16-bit, fp32 sums), softmax, top-k, optional renormalization and scale.
constexpr int ROUTE_MAX_T = 16, ROUTE_MAX_E = 1024, ROUTE_MAX_K = 32;
constexpr int ROUTE_TOPK_WARPS = 8;  // warps of the top-k launch
constexpr size_t ROUTE_MAX_SMEM = 99 * 1024;  // the top-k launch's shared memory (route_smem_bytes), sm_86's limit
// the top-k launch's shared memory: fp32 logits and their order keys [T, E], picks [T, topk], softmax partial sums
inline size_t route_smem_bytes(int T, int E, int topk) { return (size_t)T * (8 * E + 4 * topk + 4 * ROUTE_TOPK_WARPS); }
struct RouteParams {
  const void* x;       // [T, ldx] 16-bit (xtype 0 bf16, 1 fp16), 16-B aligned rows
  int ldx, xtype;
  const void* w;       // [E, H] contiguous, x's type
  int T, E, H, topk;
  int round_logits;    // logits rounded to x's type before the softmax (else kept in fp32)
  int renorm;          // top-k probabilities divided by their sum
  float scale;         // applied to the routing weights last
  void* logits;        // [T, E] in ltype (0 bf16, 1 fp16, 2 fp32), or null
  int ltype;
  void* weights;       // [T, topk] in wtype
  int wtype;
  long long* index;    // [T, topk] int64, best first
  float* ws;           // [T, E] fp32 workspace: the logits launch's output
  int pdl;             // launched with PDL (x is the previous launch's output)
};

int cq_prep_x(const PrepParams& p, int rows_out, cudaStream_t st);
int cq_gemv(GemvParams p, int R, int W, int bf16_dot, int stages, int blocks_y, cudaStream_t st);
// Slots grouped by expert into runs of bm rows: sorted [max_blocks * bm] slot ids (S: padding), bexp [max_blocks].
int cq_moe_align(const void* ids, int ids64, int S, int E, int bm, int max_blocks, int* sorted, int* bexp, cudaStream_t st);
// out[t, n] = sum_k ys[t * topk + k, n] for t < T, n < H, out in otype (0 bf16, 1 fp16, 2 fp32); pdl: launched
// with PDL (after a gemv, which lets dependents start early).
int cq_topk_sum(const float* ys, void* out, int otype, int T, int H, int topk, int pdl, cudaStream_t st);
int cq_route(const RouteParams& p, cudaStream_t st);

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
};

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
  const int* bexp;           // MoE: expert of each block of bm x rows (-1: empty), or null (dense)
  int bm;
  const int* rows;           // MoE: slot id of each x row (>= nslots: padding)
  int nslots;
  const float* rw;           // routing weight of each slot (EPI_SCATTER)
  int epi;                   // EPI_PLAIN, EPI_SWIGLU (R = 2: gate rows n, up rows inter + n), EPI_SCATTER
  int inter;
  int slut;                  // dense, per-row codebooks, 16-bit dot: look up pair words in shared memory
};

int cq_prep_x(const PrepParams& p, int rows_out, cudaStream_t st);
int cq_gemv(GemvParams p, int R, int W, int bf16_dot, int stages, int blocks_y, cudaStream_t st);

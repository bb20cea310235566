// Times ggml_mul_mat (llama.cpp's CPU backend) for one weight type and shape, the way
// llama.cpp runs a linear layer: weights [N, K] of `type` (optionally in the CPU_REPACK
// buffer, which interleaves rows at load time), f32 activations [M, K], n threads.
// Several weight copies are cycled so that, when their total exceeds the last-level
// cache, every call streams its weights from DRAM.
//
// usage: ggml_bench TYPE REPACK N K COPIES REPS M1,M2,... T1,T2,...
//   TYPE: bf16 | q4_0 | iq4_nl | f32   prints one JSON object per (M, threads), times in us
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

int main(int argc, char** argv) {
  if (argc != 9) {
    fprintf(stderr, "usage: %s TYPE REPACK N K COPIES REPS M1,M2,... T1,T2,...\n", argv[0]);
    return 2;
  }
  const char* tname = argv[1];
  const int repack = atoi(argv[2]);
  const int64_t N = atoll(argv[3]), K = atoll(argv[4]);
  const int copies = atoi(argv[5]), reps = atoi(argv[6]);
  std::vector<int64_t> ms, ts;
  for (char* p = strtok(argv[7], ","); p; p = strtok(nullptr, ",")) ms.push_back(atoll(p));
  for (char* p = strtok(argv[8], ","); p; p = strtok(nullptr, ",")) ts.push_back(atoll(p));
  ggml_type type;
  if (!strcmp(tname, "bf16")) type = GGML_TYPE_BF16;
  else if (!strcmp(tname, "q4_0")) type = GGML_TYPE_Q4_0;
  else if (!strcmp(tname, "iq4_nl")) type = GGML_TYPE_IQ4_NL;
  else if (!strcmp(tname, "f32")) type = GGML_TYPE_F32;
  else { fprintf(stderr, "unknown type %s\n", tname); return 2; }

  ggml_cpu_init();
  ggml_backend_t be = ggml_backend_cpu_init();
  ggml_backend_buffer_type_t wbuft = ggml_backend_cpu_buffer_type();
  if (repack) {
    ggml_backend_dev_t dev = ggml_backend_get_device(be);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    bool found = false;
    for (ggml_backend_buffer_type_t* p = get_extra ? get_extra(dev) : nullptr; p && *p; ++p)
      if (!strcmp(ggml_backend_buft_name(*p), "CPU_REPACK")) { wbuft = *p; found = true; }
    if (!found) { fprintf(stderr, "no CPU_REPACK buffer type in this build\n"); return 3; }
  }

  ggml_init_params wp = {ggml_tensor_overhead() * (size_t)(copies + 2), nullptr, true};
  ggml_context* ctx_w = ggml_init(wp);
  std::vector<ggml_tensor*> W(copies);
  for (int i = 0; i < copies; ++i) W[i] = ggml_new_tensor_2d(ctx_w, type, K, N);
  ggml_backend_buffer_t buf_w = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, wbuft);
  if (!buf_w) { fprintf(stderr, "weight allocation failed\n"); return 3; }

  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> src(K * N);
  std::vector<uint8_t> packed(ggml_row_size(type, K) * N);
  for (int i = 0; i < copies; ++i) {
    if (i < 2) {  // two distinct weight sets; later copies repeat them (own memory: speed does not depend on values)
      for (auto& v : src) v = normal(rng) * 0.02f;
      if (type == GGML_TYPE_BF16) ggml_fp32_to_bf16_row(src.data(), (ggml_bf16_t*)packed.data(), K * N);
      else if (type == GGML_TYPE_F32) memcpy(packed.data(), src.data(), K * N * 4);
      else ggml_quantize_chunk(type, src.data(), packed.data(), 0, N, K, nullptr);
    }
    ggml_backend_tensor_set(W[i], packed.data(), 0, ggml_nbytes(W[i]));  // CPU_REPACK repacks here
  }

  for (int64_t M : ms) {
    ggml_init_params ap = {ggml_tensor_overhead() * (size_t)(2 * copies + 4) + ggml_graph_overhead() * copies, nullptr, true};
    ggml_context* ctx_a = ggml_init(ap);
    ggml_tensor* x = ggml_new_tensor_2d(ctx_a, GGML_TYPE_F32, K, M);
    std::vector<ggml_cgraph*> graphs(copies);
    for (int i = 0; i < copies; ++i) {
      ggml_tensor* y = ggml_mul_mat(ctx_a, W[i], x);
      graphs[i] = ggml_new_graph(ctx_a);
      ggml_build_forward_expand(graphs[i], y);
    }
    ggml_backend_buffer_t buf_a = ggml_backend_alloc_ctx_tensors(ctx_a, be);
    std::vector<float> xv(K * M);
    for (auto& v : xv) v = normal(rng);
    ggml_backend_tensor_set(x, xv.data(), 0, xv.size() * 4);
    for (int64_t threads : ts) {
      ggml_backend_cpu_set_n_threads(be, (int)threads);
      for (int i = 0; i < copies; ++i) ggml_backend_graph_compute(be, graphs[i]);  // warm up
      std::vector<double> us(reps);
      for (int r = 0; r < reps; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        ggml_backend_graph_compute(be, graphs[r % copies]);
        us[r] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      }
      std::sort(us.begin(), us.end());
      printf("{\"type\": \"%s\", \"repack\": %d, \"buffer\": \"%s\", \"N\": %lld, \"K\": %lld, \"M\": %lld, "
             "\"threads\": %lld, \"copies\": %d, \"weight_bytes\": %zu, \"us_median\": %.2f, \"us_min\": %.2f}\n",
             tname, repack, ggml_backend_buft_name(wbuft), (long long)N, (long long)K, (long long)M, (long long)threads,
             copies, ggml_nbytes(W[0]), us[reps / 2], us[0]);
      fflush(stdout);
    }
    ggml_backend_buffer_free(buf_a);
    ggml_free(ctx_a);
  }
  ggml_backend_buffer_free(buf_w);
  ggml_free(ctx_w);
  ggml_backend_free(be);
  return 0;
}

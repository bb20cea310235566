// The Python extension codequant.kernels.cpu._lut: CPU-feature dispatch, a small thread
// pool, activation preparation (float copy, or per-token integer quantization that is
// bit-identical to codequant.quantizers.activations.quantize_activations), the linear
// op and the fused MoE op. Tensors arrive as data pointers of contiguous CPU tensors
// (the Python wrapper checks dtypes, shapes and contiguity).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define CQ_X86 1
#endif

#include "cq_kernels.h"

namespace cq {
int64_t g_tune[8] = {0, 0, 0, 0, 0, 0, 0, 0};
bool g_prefetch_lines = false;
std::atomic<int64_t> g_spin_us{100};  // how long an idle pool worker spins for the next job before it sleeps
namespace {

// ---------------------------------------------------------------- ISA dispatch

bool cpu_has(const char* isa) {
#ifdef CQ_X86
  __builtin_cpu_init();
  if (!strcmp(isa, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  if (!strcmp(isa, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return !strcmp(isa, "portable");
}

const Isa* isa_by_name(const char* name) {
#ifdef CQ_X86
  if (!strcmp(name, "avx512")) return &isa_avx512;
  if (!strcmp(name, "avx2")) return &isa_avx2;
#endif
  if (!strcmp(name, "portable")) return &isa_portable;
  return nullptr;
}

const Isa* best_isa() {
  for (const char* name : {"avx512", "avx2"})
    if (cpu_has(name)) return isa_by_name(name);
  return &isa_portable;
}

const Isa* g_isa = nullptr;

// ---------------------------------------------------------------- thread pool
// Workers spin briefly after a job (decode issues many small ops back to back), then
// sleep on a condition variable, so an idle pool costs no CPU. The items of a job are
// split into one contiguous range per participating thread (the caller is participant 0);
// each thread runs its own range front to back, so its rows form one sequential stream
// through memory, and a thread that runs out takes items from the back of the others'
// ranges, which balances load on a busy machine. The caller never waits for a worker that
// has not joined the job yet: once no item is left it closes the job and waits only for the
// workers inside it, so on a machine with more busy threads than cores (other processes,
// torch's spinning OpenMP workers) a descheduled worker costs nothing, and 2 threads are
// not slower than 1 by a scheduler time slice.

class Pool {
 public:
  static constexpr int kMaxThreads = 256;  // participants per job (more threads are not used)
  typedef void (*Fn)(void* ctx, int64_t item);

  void run(int threads, int64_t items, Fn fn, void* ctx) {
    if (threads <= 1 || items <= 1 || items >= ((int64_t)1 << 32)) {  // ranges hold 32-bit item numbers
      for (int64_t i = 0; i < items; ++i) fn(ctx, i);
      return;
    }
    std::lock_guard<std::mutex> job_lock(job_mu_);  // one job at a time (callers release the GIL)
    const int workers = (int)std::min<int64_t>(std::min(threads, kMaxThreads) - 1, items - 1);
    ensure(workers);
    fn_ = fn;
    ctx_ = ctx;
    for (int p = 0; p <= workers; ++p)
      ranges_[p].v.store(pack(items * p / (workers + 1), items * (p + 1) / (workers + 1)), std::memory_order_relaxed);
    job_workers_ = workers;
    open_.store(true);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work(0);
    // Every item is taken: close the job and wait for the workers that joined it (sequentially
    // consistent with join(): a worker either is counted in inside_ here or sees the job closed).
    open_.store(false);
    while (inside_.load() != 0) pause();
  }

  // Pins every worker, present and future, to `cpus` (empty: workers keep the mask they were
  // created with, their creator's). False where thread affinity is not supported.
  bool set_cpus(const std::vector<int>& cpus) {
    std::lock_guard<std::mutex> job_lock(job_mu_);
    cpus_ = cpus;
    bool ok = true;
    for (auto& t : threads_) ok = pin(t, cpus_) && ok;
    return ok;
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.detach();  // never block interpreter shutdown
  }

 private:
  static void pause() {
#ifdef CQ_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  // A range [lo, hi) of item numbers as one word, so that the owner (taking lo) and a
  // thief (taking hi - 1) can never both take the same item.
  static uint64_t pack(int64_t lo, int64_t hi) { return (uint64_t)lo | (uint64_t)hi << 32; }

  // Takes one item from participant p's range, from the front or the back; -1 when empty.
  int64_t take(int p, bool front) {
    std::atomic<uint64_t>& r = ranges_[p].v;
    uint64_t v = r.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t lo = (int64_t)(v & 0xFFFFFFFFu), hi = (int64_t)(v >> 32);
      if (lo >= hi) return -1;
      if (r.compare_exchange_weak(v, front ? pack(lo + 1, hi) : pack(lo, hi - 1), std::memory_order_relaxed))
        return front ? lo : hi - 1;
    }
  }

  void work(int self) {
    for (int64_t i; (i = take(self, true)) >= 0;) fn_(ctx_, i);
    for (int d = 1; d <= job_workers_; ++d)
      for (int64_t i; (i = take((self + d) % (job_workers_ + 1), false)) >= 0;) fn_(ctx_, i);
  }

  void ensure(int workers) {
    while ((int)threads_.size() < workers) {
      const int id = (int)threads_.size();
      const uint64_t seen = gen_.load(std::memory_order_acquire);  // before this job's increment
      threads_.emplace_back([this, id, seen] { loop(id, seen); });
      pin(threads_.back(), cpus_);
    }
  }

  static bool pin(std::thread& t, const std::vector<int>& cpus) {
    if (cpus.empty()) return true;
#ifdef __linux__
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int c : cpus)
      if (c >= 0 && c < CPU_SETSIZE) CPU_SET(c, &set);
    return pthread_setaffinity_np(t.native_handle(), sizeof(set), &set) == 0;
#else
    return false;
#endif
  }

  void loop(int id, uint64_t seen) {
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        pause();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(g_spin_us.load(std::memory_order_relaxed))) {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_) return;
      inside_.fetch_add(1);  // join job `seen` if it is still open (else it was finished without us)
      if (open_.load() && gen_.load() == seen && id < job_workers_) work(id + 1);
      inside_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> threads_;
  std::vector<int> cpus_;  // the workers' CPUs (empty: as created)
  std::mutex job_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  struct alignas(64) Range {
    std::atomic<uint64_t> v{0};
  };
  Range ranges_[kMaxThreads];
  std::atomic<bool> open_{false};  // the current job still admits workers
  std::atomic<int> inside_{0};     // workers inside a job
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  int job_workers_ = 0;
  bool stop_ = false;
};

Pool* g_pool = nullptr;

template <class F>
void parallel_for(int threads, int64_t items, F&& f) {
  struct Tramp {
    static void call(void* ctx, int64_t i) { (*static_cast<F*>(ctx))(i); }
  };
  g_pool->run(threads, items, &Tramp::call, (void*)&f);
}

// ---------------------------------------------------------------- activations

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// One token row as float32 into out[0..K), zeros up to KP.
void load_row(const void* x, int bf16, int64_t K, int64_t KP, float* out) {
  if (bf16) {
    const uint16_t* s = (const uint16_t*)x;
    for (int64_t k = 0; k < K; ++k) out[k] = bf16_to_float(s[k]);
  } else {
    memcpy(out, x, K * sizeof(float));
  }
  for (int64_t k = K; k < KP; ++k) out[k] = 0.f;
}

// A growable buffer whose data start on a 64-byte boundary (the kernels load activation
// rows 64 bytes at a time: no cache-line splits).
template <class T>
struct AlignedBuf {
  std::vector<T> v;
  T* p = nullptr;
  int64_t n = 0;
  void ensure(int64_t count) {
    if (count <= n) return;
    v.resize(count + 64 / sizeof(T));
    p = (T*)(((uintptr_t)v.data() + 63) & ~(uintptr_t)63);
    n = count;
  }
  T& operator[](int64_t i) { return p[i]; }
  const T& operator[](int64_t i) const { return p[i]; }
  T* data() { return p; }
  const T* data() const { return p; }
};

// Prepared activations of M rows for one weight shape.
struct Acts {
  bool integer = false;
  int bits = 0;
  int64_t K = 0, KP = 0, KQ = 0, GA = 0, NA = 1;
  AlignedBuf<float> xf;
  AlignedBuf<uint8_t> q;
  std::vector<float> s, z;

  // Shape only (enough for Isa::i8_ok); then init() for the buffers of the chosen ISA.
  void shape(int64_t k, int b, int64_t ga) {
    integer = b > 0 && b < 16;
    bits = b;
    K = k;
    KP = (k + 63) / 64 * 64;
    KQ = q_columns(KP);
    GA = integer && ga > 0 ? ga : k;
    NA = K / GA;
  }
  void init(int64_t M, int64_t k, int b, int64_t ga, const Isa* isa) {
    shape(k, b, ga);
    interleave_ = isa->q_interleave128;
    quant_ = isa->quantize_row;
    if (integer) {
      q.ensure(M * KQ);
      if ((int64_t)s.size() < M * NA) { s.resize(M * NA); z.resize(M * NA); }
    } else {
      xf.ensure(M * KP);
    }
  }
  // Row m from float32 data x[0..K).
  void set_row(int64_t m, const float* x, float clip) {
    if (integer)
      quant_(x, K, bits, GA, clip, KQ, interleave_, &q[m * KQ], &s[m * NA], &z[m * NA]);
    else
      load_row(x, 0, K, KP, &xf[m * KP]);
  }
  // Row m from the caller's input row (float32 or bf16).
  void set_input_row(int64_t m, const void* x, int bf16, float clip) {
    if (!integer) {
      load_row(x, bf16, K, KP, &xf[m * KP]);
    } else if (!bf16) {
      quant_((const float*)x, K, bits, GA, clip, KQ, interleave_, &q[m * KQ], &s[m * NA], &z[m * NA]);
    } else {
      thread_local std::vector<float> row;
      if ((int64_t)row.size() < KP) row.resize(KP);
      load_row(x, 1, K, KP, row.data());
      set_row(m, row.data(), clip);
    }
  }
  ActF f(int64_t m0, int64_t M) const { return ActF{xf.data() + m0 * KP, KP, M}; }
  ActQ i(int64_t m0, int64_t M) const { return ActQ{q.data() + m0 * KQ, KQ, s.data() + m0 * NA, z.data() + m0 * NA, NA, GA, M, bits}; }

 private:
  bool interleave_ = false;
  decltype(Isa::quantize_row) quant_ = quantize_row_scalar;
};

const Isa* pick(const Weight& w, const Acts& shaped) {
  if (shaped.integer) {
    const ActQ a{nullptr, shaped.KQ, nullptr, nullptr, shaped.NA, shaped.GA, 0, shaped.bits};
    return g_isa->i8_ok(w, a) ? g_isa : &isa_portable;
  }
  return g_isa->f32_ok(w) ? g_isa : &isa_portable;
}

// Shape the activations of M rows, pick the ISA for them and size the buffers.
const Isa* prepare(Acts& acts, const Weight& w, int64_t M, int64_t K, int bits, int64_t GA) {
  acts.shape(K, bits, GA);
  const Isa* isa = pick(w, acts);
  acts.init(M, K, bits, GA, isa);
  return isa;
}

// Rows per work item: enough items for balance, each at least a few KiB of weights.
int64_t rows_per_item(int64_t N, int64_t KP, int threads) {
  int64_t r = N / (8 * (int64_t)threads) + 1;
  const int64_t min_rows = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, KP / 2));
  return (std::max(r, min_rows) + 3) / 4 * 4;  // whole 4-row tiles of the interleaved layout
}

void run_rows(const Isa* isa, const Weight& w, const Acts& acts, int64_t m0, int64_t M, float* y, int64_t ldy,
              const float* bias, int64_t n0, int64_t n1) {
  if (acts.integer)
    isa->i8_rows(w, acts.i(m0, M), y, ldy, bias, n0, n1);
  else
    isa->f32_rows(w, acts.f(m0, M), y, ldy, bias, n0, n1);
}

Weight make_weight(int64_t idx, int64_t il, int64_t cb16, int64_t cb8, int64_t sc, int64_t rs8, int64_t N, int64_t K, int64_t G) {
  Weight w;
  w.idx = (const uint8_t*)idx;
  w.il = (const uint8_t*)il;
  w.cb16 = (const uint16_t*)cb16;
  w.cb8 = (const int8_t*)cb8;
  w.sc = (const float*)sc;
  w.rs8 = (const float*)rs8;
  w.N = N;
  w.K = K;
  w.KP = (K + 63) / 64 * 64;
  w.G = G;
  w.NG = K / G;
  return w;
}

Weight expert(const Weight& w, int64_t e, int64_t NA) {
  Weight r = w;
  r.idx += e * w.N * (w.KP / 2);
  if (r.il) r.il += e * w.N * (q_columns(w.KP) / 2);
  if (r.cb16) r.cb16 += e * w.N * w.NG * 16;
  if (r.cb8) r.cb8 += e * w.N * w.NG * 16;
  if (r.sc) r.sc += e * w.N * w.NG;
  if (r.rs8) r.rs8 += e * w.N * NA;
  return r;
}

// ---------------------------------------------------------------- linear

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// y [M, N] = Q(x) W^T + bias. x [M, ldx] float32 or bf16 (x_bf16); bias float32 or bf16
// (bias_bf16) or null; y float32, or bf16 when y_bf16 (float results rounded once).
void linear(const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, int bits, int64_t GA, float clip, const Weight& w,
            const void* bias, int bias_bf16, void* y, int y_bf16, int threads) {
  thread_local Acts tl_acts;  // buffers reused across calls of this calling thread
  Acts& acts = tl_acts;        // (a name the pool's workers see: thread_locals are not captured)
  const Isa* isa = prepare(acts, w, M, K, bits, GA);
  const int64_t N = w.N;
  for (int64_t m = 0; m < M; ++m) acts.set_input_row(m, (const char*)x + m * ldx * (x_bf16 ? 2 : 4), x_bf16, clip);
  const float* bf = (const float*)bias;
  thread_local std::vector<float> bias_f, y_f;
  if (bias && bias_bf16) {
    if ((int64_t)bias_f.size() < N) bias_f.resize(N);
    for (int64_t n = 0; n < N; ++n) bias_f[n] = bf16_to_float(((const uint16_t*)bias)[n]);
    bf = bias_f.data();
  }
  float* yf = (float*)y;
  if (y_bf16) {
    if ((int64_t)y_f.size() < M * N) y_f.resize(M * N);
    yf = y_f.data();
  }
  if ((N * w.KP / 2) * M < 65536) threads = 1;  // too small to be worth waking the pool
  const int64_t R = rows_per_item(N, w.KP, threads), items = (N + R - 1) / R;
  parallel_for(threads, items, [&](int64_t i) {
    run_rows(isa, w, acts, 0, M, yf, N, bf, i * R, std::min(N, (i + 1) * R));
  });
  if (y_bf16)
    for (int64_t j = 0; j < M * N; ++j) ((uint16_t*)y)[j] = float_to_bf16(yf[j]);
}

// ---------------------------------------------------------------- fused MoE

void fwht_block(float* h, int64_t n) {
  for (int64_t len = 1; len < n; len <<= 1)
    for (int64_t i = 0; i < n; i += 2 * len)
      for (int64_t j = i; j < i + len; ++j) {
        const float a = h[j], b = h[j + len];
        h[j] = a + b;
        h[j + len] = a - b;
      }
  const float c = (float)(1.0 / sqrt((double)n));
  for (int64_t j = 0; j < n; ++j) h[j] *= c;
}

struct MoeArgs {
  const void* x;
  int bf16;
  int64_t T, H, k, E;
  const int64_t* topi;
  const float* topw;
  Weight gu, dn;  // stacked over experts: gu.N = 2I, dn.N = H
  int bits, dbits;
  int64_t GA, dGA;
  float clip, dclip;
  int64_t hadamard;
  float* y;
  int threads;
};

void moe(const MoeArgs& A) {
  const int64_t T = A.T, k = A.k, P = T * k, H = A.H, I2 = A.gu.N, I = I2 / 2;
  // Assignments sorted by (expert, token, slot): contiguous token rows per expert.
  std::vector<int64_t> order(P);
  for (int64_t p = 0; p < P; ++p) order[p] = p;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return A.topi[a] < A.topi[b]; });
  std::vector<int64_t> where(P);  // assignment (t*k+slot) -> row in expert-sorted order
  for (int64_t r = 0; r < P; ++r) where[order[r]] = r;
  struct Group { int64_t e, r0, M; };
  std::vector<Group> groups;
  for (int64_t r = 0; r < P;) {
    int64_t e = A.topi[order[r]], r1 = r;
    while (r1 < P && A.topi[order[r1]] == e) ++r1;
    if (e >= 0 && e < A.E) groups.push_back({e, r, r1 - r});
    r = r1;
  }

  // Input activations, one row per assignment (quantized once per token).
  Acts ax;
  const Isa* isa_gu = prepare(ax, A.gu, P, H, A.bits, A.GA);
  {
    Acts one;
    one.init(T, H, A.bits, A.GA, isa_gu);
    for (int64_t t = 0; t < T; ++t) one.set_input_row(t, (const char*)A.x + t * H * (A.bf16 ? 2 : 4), A.bf16, A.clip);
    for (int64_t r = 0; r < P; ++r) {
      const int64_t t = order[r] / k;
      if (ax.integer) {
        memcpy(&ax.q[r * ax.KQ], &one.q[t * ax.KQ], ax.KQ);
        memcpy(&ax.s[r * ax.NA], &one.s[t * ax.NA], ax.NA * sizeof(float));
        memcpy(&ax.z[r * ax.NA], &one.z[t * ax.NA], ax.NA * sizeof(float));
      } else {
        memcpy(&ax.xf[r * ax.KP], &one.xf[t * ax.KP], ax.KP * sizeof(float));
      }
    }
  }
  const int64_t gu_na = ax.NA;

  // Too little weight data to be worth waking the pool (e.g. a small model's decode step):
  // one thread, as linear() does.
  const int threads = (int64_t)groups.size() * (I2 * A.gu.KP / 2 + H * A.dn.KP / 2) < 131072 ? 1 : A.threads;

  // Work items: (expert group, row range) for gate_up, then for down.
  struct Item { int64_t g, n0, n1; };
  auto make_items = [&](int64_t N, int64_t KP) {
    std::vector<Item> items;
    const int64_t R = rows_per_item(N * (int64_t)groups.size(), KP, threads);
    for (int64_t g = 0; g < (int64_t)groups.size(); ++g)
      for (int64_t n0 = 0; n0 < N; n0 += R) items.push_back({g, n0, std::min(N, n0 + R)});
    return items;
  };

  std::vector<float> gu_out(P * I2);
  {
    std::vector<Item> items = make_items(I2, A.gu.KP);
    parallel_for(threads, (int64_t)items.size(), [&](int64_t i) {
      const Group& g = groups[items[i].g];
      const Weight w = expert(A.gu, g.e, gu_na);
      run_rows(isa_gu, w, ax, g.r0, g.M, &gu_out[g.r0 * I2], I2, nullptr, items[i].n0, items[i].n1);
    });
  }

  // SwiGLU, online block Hadamard, down-input activations.
  Acts ad;
  const Isa* isa_dn = prepare(ad, A.dn, P, I, A.dbits, A.dGA);
  parallel_for(threads, P, [&](int64_t r) {
    std::vector<float> h(ad.KP);
    const float* gu = &gu_out[r * I2];
    for (int64_t j = 0; j < I; ++j) {
      const float g = gu[j];
      h[j] = g / (1.f + expf(-g)) * gu[I + j];
    }
    if (A.hadamard > 0)
      for (int64_t j = 0; j < I; j += A.hadamard) fwht_block(&h[j], A.hadamard);
    ad.set_row(r, h.data(), A.dclip);
  });

  std::vector<float> dn_out(P * H);
  {
    std::vector<Item> items = make_items(H, A.dn.KP);
    parallel_for(threads, (int64_t)items.size(), [&](int64_t i) {
      const Group& g = groups[items[i].g];
      const Weight w = expert(A.dn, g.e, ad.NA);
      run_rows(isa_dn, w, ad, g.r0, g.M, &dn_out[g.r0 * H], H, nullptr, items[i].n0, items[i].n1);
    });
  }

  // Combine per token in ascending expert order (the reference's accumulation order).
  parallel_for(threads, T, [&](int64_t t) {
    std::vector<int64_t> slots(k);
    for (int64_t j = 0; j < k; ++j) slots[j] = t * k + j;
    std::stable_sort(slots.begin(), slots.end(), [&](int64_t a, int64_t b) { return A.topi[a] < A.topi[b]; });
    float* yt = A.y + t * H;
    for (int64_t c = 0; c < H; ++c) yt[c] = 0.f;
    for (int64_t p : slots) {
      if (A.topi[p] < 0 || A.topi[p] >= A.E) continue;
      const float wgt = A.topw[p];
      const float* d = &dn_out[where[p] * H];
      for (int64_t c = 0; c < H; ++c) yt[c] += d[c] * wgt;
    }
  });
}

}  // namespace
}  // namespace cq

// ---------------------------------------------------------------- Python bindings

using namespace cq;

static PyObject* py_linear(PyObject*, PyObject* args) {
  long long x, M, K, ldx, GA, idx, il, cb16, cb8, sc, rs8, N, G, bias, y;
  int bf16, bits, bias_bf16, y_bf16, threads;
  double clip;
  if (!PyArg_ParseTuple(args, "LiLLLiLdLLLLLLLLLiLii", &x, &bf16, &M, &K, &ldx, &bits, &GA, &clip, &idx, &il, &cb16, &cb8, &sc,
                        &rs8, &N, &G, &bias, &bias_bf16, &y, &y_bf16, &threads))
    return nullptr;
  const Weight w = make_weight(idx, il, cb16, cb8, sc, rs8, N, K, G);
  Py_BEGIN_ALLOW_THREADS
  linear((const void*)x, bf16, M, K, ldx, bits, GA, (float)clip, w, (const void*)bias, bias_bf16, (void*)y, y_bf16, threads);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// A prepared linear layer: the weight's pointers and the activation quantization, held in a
// capsule by the Python wrapper (which keeps the tensors alive), so that a call passes
// only the per-call pointers.
struct Plan {
  Weight w;
  int bits;
  int64_t GA;
  float clip;
};

static const char* const kPlan = "codequant._lut.Plan";

static void plan_free(PyObject* cap) { delete (Plan*)PyCapsule_GetPointer(cap, kPlan); }

static PyObject* py_plan(PyObject*, PyObject* args) {
  // plan(idx, il, cb16, cb8, sc, rs8, N, K, G, bits, GA, clip) -> capsule
  long long idx, il, cb16, cb8, sc, rs8, N, K, G, GA;
  int bits;
  double clip;
  if (!PyArg_ParseTuple(args, "LLLLLLLLLiLd", &idx, &il, &cb16, &cb8, &sc, &rs8, &N, &K, &G, &bits, &GA, &clip)) return nullptr;
  Plan* p = new Plan{make_weight(idx, il, cb16, cb8, sc, rs8, N, K, G), bits, GA, (float)clip};
  PyObject* cap = PyCapsule_New(p, kPlan, plan_free);
  if (!cap) delete p;
  return cap;
}

// The pointer in the capsule args[0] (of kind `kind`) and the n integers after it, of a
// METH_FASTCALL entry point `name` taking exactly n + 1 arguments; nullptr with a Python error.
static const void* capsule_and_ints(PyObject* const* args, Py_ssize_t nargs, const char* kind, const char* name,
                                    long long* v, int n) {
  if (nargs != n + 1) {
    PyErr_Format(PyExc_TypeError, "%s() takes %d arguments", name, n + 1);
    return nullptr;
  }
  const void* p = PyCapsule_GetPointer(args[0], kind);
  for (int i = 0; p && i < n; ++i) {
    v[i] = PyLong_AsLongLong(args[i + 1]);
    if (v[i] == -1 && PyErr_Occurred()) return nullptr;
  }
  return p;
}

static PyObject* py_run(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  // run(plan, x, x_bf16, M, bias, bias_bf16, y, y_bf16, threads): linear on a plan; x [M, K]
  // contiguous, y [M, N] contiguous (float32, or bf16 when y_bf16).
  long long v[8];
  const Plan* p = (const Plan*)capsule_and_ints(args, nargs, kPlan, "run", v, 8);
  if (!p) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  linear((const void*)v[0], (int)v[1], v[2], p->w.K, p->w.K, p->bits, p->GA, p->clip, p->w, (const void*)v[3], (int)v[4],
         (void*)v[5], (int)v[6], (int)v[7]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject* py_time_run(PyObject*, PyObject* args) {
  // time_run(plans, x, x_bf16, M, y, threads, reps) -> [us per call]: run() on
  // plans[r % len(plans)] for r < reps (after one untimed call per plan), each call timed
  // with steady_clock from C++ (no Python between calls), as the ggml harness times ggml.
  PyObject* seq;
  long long x, M, y;
  int x_bf16, threads, reps;
  if (!PyArg_ParseTuple(args, "OLiLLii", &seq, &x, &x_bf16, &M, &y, &threads, &reps)) return nullptr;
  PyObject* fast = PySequence_Fast(seq, "plans must be a sequence");
  if (!fast) return nullptr;
  std::vector<const Plan*> plans;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); ++i) {
    const Plan* p = (const Plan*)PyCapsule_GetPointer(PySequence_Fast_GET_ITEM(fast, i), kPlan);
    if (!p) { Py_DECREF(fast); return nullptr; }
    plans.push_back(p);
  }
  bool same = !plans.empty();
  for (const Plan* p : plans) same = same && p->w.N == plans[0]->w.N && p->w.K == plans[0]->w.K;
  if (!same || reps < 1) {
    Py_DECREF(fast);
    PyErr_SetString(PyExc_ValueError, "time_run needs plans of one shape and reps >= 1");
    return nullptr;
  }
  std::vector<double> us(reps);
  auto call = [&](const Plan* p) {
    linear((const void*)x, x_bf16, M, p->w.K, p->w.K, p->bits, p->GA, p->clip, p->w, nullptr, 0, (void*)y, 0, threads);
  };
  Py_BEGIN_ALLOW_THREADS
  for (const Plan* p : plans) call(p);
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    call(plans[r % plans.size()]);
    us[r] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  Py_END_ALLOW_THREADS
  Py_DECREF(fast);
  PyObject* out = PyList_New(reps);
  for (int r = 0; r < reps; ++r) PyList_SET_ITEM(out, r, PyFloat_FromDouble(us[r]));
  return out;
}

static PyObject* py_moe(PyObject*, PyObject* args) {
  long long x, T, H, k, E, topi, topw, g_idx, g_il, g_cb16, g_cb8, g_sc, g_rs8, g_N, g_G, d_idx, d_il, d_cb16, d_cb8, d_sc,
      d_rs8, d_G, GA, dGA, had, y;
  int bf16, bits, dbits, threads;
  double clip, dclip;
  if (!PyArg_ParseTuple(args, "LiLLLLLLLLLLLLLLLLLLLLLiLdiLdLLi", &x, &bf16, &T, &H, &k, &E, &topi, &topw, &g_idx, &g_il, &g_cb16,
                        &g_cb8, &g_sc, &g_rs8, &g_N, &g_G, &d_idx, &d_il, &d_cb16, &d_cb8, &d_sc, &d_rs8, &d_G, &bits, &GA, &clip,
                        &dbits, &dGA, &dclip, &had, &y, &threads))
    return nullptr;
  MoeArgs A;
  A.x = (const void*)x;
  A.bf16 = bf16;
  A.T = T;
  A.H = H;
  A.k = k;
  A.E = E;
  A.topi = (const int64_t*)topi;
  A.topw = (const float*)topw;
  A.gu = make_weight(g_idx, g_il, g_cb16, g_cb8, g_sc, g_rs8, g_N, H, g_G);
  A.dn = make_weight(d_idx, d_il, d_cb16, d_cb8, d_sc, d_rs8, H, g_N / 2, d_G);
  A.bits = bits;
  A.GA = GA;
  A.clip = (float)clip;
  A.dbits = dbits;
  A.dGA = dGA;
  A.dclip = (float)dclip;
  A.hadamard = had;
  A.y = (float*)y;
  A.threads = threads;
  Py_BEGIN_ALLOW_THREADS
  moe(A);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// y [M, N] float32 = x [M, K] float32 @ w^T for a plain bf16 weight w [N, K] (an lm_head, a
// router), rows split over the pool.
static void bf16_linear(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int threads) {
  if (N * K * 2 < 65536) threads = 1;  // too small to be worth waking the pool
  const int64_t R = N / (8 * (int64_t)std::max(threads, 1)) + 1, items = (N + R - 1) / R;
  const Isa* isa = g_isa;
  parallel_for(threads, items, [&](int64_t i) { isa->bf16_rows(w, K, x, K, M, y, N, i * R, std::min<int64_t>(N, (i + 1) * R)); });
}

static PyObject* py_bf16_linear(PyObject*, PyObject* args) {
  // bf16_linear(x, M, K, w, N, y, threads): see bf16_linear.
  long long x, M, K, w, N, y;
  int threads;
  if (!PyArg_ParseTuple(args, "LLLLLLi", &x, &M, &K, &w, &N, &y, &threads)) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  bf16_linear((const float*)x, M, K, (const uint16_t*)w, N, (float*)y, threads);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// transformers' RMSNorm of one row x [N] (bf16 or float32, as are w [N] and y [N]):
// h = x / sqrt(mean(x^2) + eps) in float32, rounded to the dtype, y = w * h rounded to the
// dtype (the same arithmetic up to the order of the sum of squares).
void rms_norm_row(const void* x, int64_t N, int bf16, const void* w, void* y, float eps) {
  auto value = [&](const void* base, int64_t i) {
    return bf16 ? bf16_to_float(((const uint16_t*)base)[i]) : ((const float*)base)[i];
  };
  auto round = [&](float f) { return bf16 ? bf16_to_float(float_to_bf16(f)) : f; };
  float sum = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    const float v = value(x, n);
    sum += v * v;
  }
  const float r = 1.f / sqrtf(sum / (float)N + eps);
  for (int64_t n = 0; n < N; ++n) {
    const float out = round(value(w, n) * round(value(x, n) * r));
    if (bf16)
      ((uint16_t*)y)[n] = float_to_bf16(out);
    else
      ((float*)y)[n] = out;
  }
}

// Decode attention, one query position per sequence (GQA: query head h reads kv head h / G):
// s_t = scale * q . k_t over the T cached positions, p = softmax(s), out = sum_t p_t v_t,
// float32 arithmetic. q [B, Hq, Dk] and out [B, Hq, Dv] float32; k [B, Hkv, T, Dk] and
// v [B, Hkv, T, Dv] contiguous, bf16 or float32 (kv_f32). One work item per (b, kv head).
struct AttnArgs {
  const float* q;
  const void* k;
  const void* v;
  float* out;
  int64_t B, Hq, Hkv, T, Dk, Dv;
  int64_t ldt;  // positions per (b, kv head) in memory (>= T: a cache with room to grow)
  int kv_f32;
  float scale;
  int threads;
};

template <class T>
inline float kv_value(const T* p, int64_t i);
template <>
inline float kv_value<float>(const float* p, int64_t i) { return p[i]; }
template <>
inline float kv_value<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }

template <class T>
void attention_item(const AttnArgs& A, int64_t item) {
  const int64_t G = A.Hq / A.Hkv, b = item / A.Hkv, h = item % A.Hkv, T_ = A.T;
  const T* k = (const T*)A.k + item * A.ldt * A.Dk;
  const T* v = (const T*)A.v + item * A.ldt * A.Dv;
  const float* q = A.q + (b * A.Hq + h * G) * A.Dk;
  thread_local std::vector<float> s, acc, row, inv;
  s.resize(G * T_);
  acc.assign(G * A.Dv, 0.f);
  row.resize(A.Dv);
  inv.resize(G);
  if (sizeof(T) == 2) {
    g_isa->bf16_rows((const uint16_t*)k, A.Dk, q, A.Dk, G, s.data(), T_, 0, T_);
  } else {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t = 0; t < T_; ++t) {
        float dot = 0.f;
        for (int64_t d = 0; d < A.Dk; ++d) dot += q[g * A.Dk + d] * kv_value(k + t * A.Dk, d);
        s[g * T_ + t] = dot;
      }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = &s[g * T_];
    float mx = -INFINITY;
    for (int64_t t = 0; t < T_; ++t) mx = std::max(mx, sg[t] *= A.scale);
    float sum = 0.f;
    for (int64_t t = 0; t < T_; ++t) sum += sg[t] = expf(sg[t] - mx);
    inv[g] = 1.f / sum;
  }
  for (int64_t t = 0; t < T_; ++t) {
    for (int64_t d = 0; d < A.Dv; ++d) row[d] = kv_value(v + t * A.Dv, d);
    for (int64_t g = 0; g < G; ++g) {
      const float p = s[g * T_ + t];
      float* a = &acc[g * A.Dv];
      for (int64_t d = 0; d < A.Dv; ++d) a[d] += p * row[d];
    }
  }
  float* out = A.out + (b * A.Hq + h * G) * A.Dv;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < A.Dv; ++d) out[g * A.Dv + d] = acc[g * A.Dv + d] * inv[g];
}

static PyObject* py_attention_decode(PyObject*, PyObject* args) {
  // attention_decode(q, k, v, out, B, Hq, Hkv, T, Dk, Dv, kv_f32, scale, threads): see AttnArgs.
  long long q, k, v, out;
  AttnArgs A;
  if (!PyArg_ParseTuple(args, "LLLLLLLLLLifi", &q, &k, &v, &out, &A.B, &A.Hq, &A.Hkv, &A.T, &A.Dk, &A.Dv, &A.kv_f32,
                        &A.scale, &A.threads))
    return nullptr;
  A.ldt = A.T;
  A.q = (const float*)q;
  A.k = (const void*)k;
  A.v = (const void*)v;
  A.out = (float*)out;
  Py_BEGIN_ALLOW_THREADS
  parallel_for(A.threads, A.B * A.Hkv, [&](int64_t i) {
    if (A.kv_f32)
      attention_item<float>(A, i);
    else
      attention_item<uint16_t>(A, i);
  });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject* py_rms_norm(PyObject*, PyObject* args) {
  // rms_norm(x, M, N, bf16, w, y, eps): rms_norm_row on each row of x [M, N] (bf16 or float32,
  // as are w [N] and y [M, N]).
  long long x, M, N, w, y;
  int bf16;
  float eps;
  if (!PyArg_ParseTuple(args, "LLLiLLf", &x, &M, &N, &bf16, &w, &y, &eps)) return nullptr;
  const int64_t row = N * (bf16 ? 2 : 4);
  for (int64_t m = 0; m < M; ++m) rms_norm_row((const char*)x + m * row, N, bf16, (const void*)w, (char*)y + m * row, eps);
  Py_RETURN_NONE;
}

// ---------------------------------------------------------------- lean decode layer
// One decoder layer of a Qwen3-MoE-style model at one token in one call (bf16 residual
// stream, transformers' rounding points kept):
//   h = norm_in(x); q, k, v = h Wq^T, h Wk^T, h Wv^T (packed); q, k = per-head RMSNorm (if
//   any), rotary (q cos + rotate_half(q) sin); k, v appended to the cache at position T;
//   a = attention over T + 1 positions; x += (a H_o) Wo^T (H_o: o_proj's online block Hadamard, if any);
//   h = norm_post(x); router logits l = Q_act(h) Wr^T (bf16 Wr), p = softmax(l), the top-k
//   experts by p (ties: lower expert), weights p (/ their sum when norm_topk; rounded to bf16
//   when round_weights); x += the fused experts of h (SwiGLU, packed). Without q_norm / k_norm
//   (null) the per-head norms are skipped (Mixtral).
// Each bf16 op rounds where transformers' bf16 op rounds (the router's and the kernels'
// float sums in their own order).
struct DecodeLayer {
  const Plan *q, *k, *v, *o, *gu, *dn;  // borrowed: the Python wrapper keeps the capsules
  const uint16_t *norm_in, *norm_post, *q_norm, *k_norm, *router;  // bf16; q_norm, k_norm may be null
  int64_t H, Hq, Hkv, D, E, topk, hadamard, o_hadamard, router_ga;  // hadamard: the experts' down input's block
  int norm_topk, round_weights, router_bits;  // round_weights: the top-k weights rounded to bf16 (Qwen3-MoE)
  float eps, qk_eps, scale, router_clip;
};

static const char* const kDecodeLayer = "codequant._lut.DecodeLayer";

inline float rb(float f) { return bf16_to_float(float_to_bf16(f)); }  // round to bf16 and back

// Rotary embedding of n heads of width D in place (bf16): x cos + rotate_half(x) sin, each
// product and the sum rounded to bf16 as transformers' bf16 ops do.
static void rotary_bf16(uint16_t* x, int64_t n, int64_t D, const uint16_t* cos, const uint16_t* sin) {
  const int64_t half = D / 2;
  std::vector<float> row(D);
  for (int64_t h = 0; h < n; ++h) {
    uint16_t* xh = x + h * D;
    for (int64_t d = 0; d < D; ++d) row[d] = bf16_to_float(xh[d]);
    for (int64_t d = 0; d < D; ++d) {
      const float rot = d < half ? -row[d + half] : row[d - half];
      xh[d] = float_to_bf16(rb(row[d] * bf16_to_float(cos[d])) + rb(rot * bf16_to_float(sin[d])));
    }
  }
}

// q, k, v of one token h (bf16) in one pool job: y_j = Q(h) W_j^T rounded to bf16, as three
// linear() calls compute them (rows are independent), without two of the pool's start-ups.
static void qkv_projections(const Plan* const* p, const uint16_t* h, uint16_t* const* y, int threads) {
  thread_local Acts tl_acts[3];
  thread_local std::vector<float> tl_out[3];
  struct Item { int j; int64_t n0, n1; };
  thread_local std::vector<Item> tl_items;
  Acts* acts = tl_acts;  // the caller's buffers, seen by the pool's workers (thread_locals are not captured)
  std::vector<float>* out = tl_out;
  std::vector<Item>& items = tl_items;
  const Isa* isa[3];
  const int64_t rows = p[0]->w.N + p[1]->w.N + p[2]->w.N;
  items.clear();
  for (int j = 0; j < 3; ++j) {
    const Weight& w = p[j]->w;
    isa[j] = prepare(acts[j], w, 1, w.K, p[j]->bits, p[j]->GA);
    acts[j].set_input_row(0, h, 1, p[j]->clip);
    out[j].resize(w.N);
    const int64_t R = rows_per_item(rows, w.KP, threads);
    for (int64_t n0 = 0; n0 < w.N; n0 += R) items.push_back({j, n0, std::min(w.N, n0 + R)});
  }
  parallel_for(threads, (int64_t)items.size(), [&](int64_t i) {
    const Item& it = items[i];
    run_rows(isa[it.j], p[it.j]->w, acts[it.j], 0, 1, out[it.j].data(), p[it.j]->w.N, nullptr, it.n0, it.n1);
  });
  for (int j = 0; j < 3; ++j)
    for (int64_t n = 0; n < p[j]->w.N; ++n) y[j][n] = float_to_bf16(out[j][n]);
}

// The router's top-k of one token h [H] (bf16): expert ids and their bf16-rounded weights.
static void route(const DecodeLayer& L, const uint16_t* h, int64_t* ids, float* wts, int threads) {
  const int64_t H = L.H, E = L.E;
  std::vector<float> x(H), logits(E);
  for (int64_t c = 0; c < H; ++c) x[c] = bf16_to_float(h[c]);
  if (L.router_bits < 16) {  // fake-quantized input: h + (x_hat - h), in bf16
    const int64_t ga = L.router_ga > 0 ? L.router_ga : H, na = H / ga, KQ = q_columns((H + 63) / 64 * 64);
    std::vector<uint8_t> q(KQ);
    std::vector<float> s(na), z(na);
    g_isa->quantize_row(x.data(), H, L.router_bits, ga, L.router_clip, KQ, false, q.data(), s.data(), z.data());
    for (int64_t c = 0; c < H; ++c) {
      const float xh = rb(((float)q[c] - z[c / ga]) * s[c / ga]);
      x[c] = rb(x[c] + rb(xh - x[c]));
    }
  }
  bf16_linear(x.data(), 1, H, L.router, E, logits.data(), threads);
  float mx = -INFINITY;
  for (int64_t e = 0; e < E; ++e) mx = std::max(mx, logits[e] = rb(logits[e]));
  float sum = 0.f;
  for (int64_t e = 0; e < E; ++e) sum += logits[e] = expf(logits[e] - mx);
  std::vector<int64_t> order(E);
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::partial_sort(order.begin(), order.begin() + L.topk, order.end(),
                    [&](int64_t a, int64_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  float top = 0.f;
  for (int64_t j = 0; j < L.topk; ++j) top += wts[j] = logits[order[j]] / sum;
  for (int64_t j = 0; j < L.topk; ++j) {
    ids[j] = order[j];
    const float w = L.norm_topk ? wts[j] / top : wts[j];
    wts[j] = L.round_weights ? rb(w) : w;
  }
}

// x [H] bf16 in place; kc, vc [Hkv, ldt, D] bf16 with positions < T filled (T < ldt).
static void decode_layer(const DecodeLayer& L, uint16_t* x, const uint16_t* cos, const uint16_t* sin, uint16_t* kc, uint16_t* vc,
                         int64_t ldt, int64_t T, int threads) {
  const int64_t H = L.H, D = L.D, NQ = L.Hq * D, NK = L.Hkv * D;
  thread_local std::vector<uint16_t> h, q, k, v, a, o;
  thread_local std::vector<float> qf, af, y;
  h.resize(H); q.resize(NQ); k.resize(NK); v.resize(NK); a.resize(NQ); o.resize(H);
  qf.resize(NQ); af.resize(NQ); y.resize(H);
  auto proj = [&](const Plan* p, const uint16_t* in, uint16_t* out) {
    linear(in, 1, 1, p->w.K, p->w.K, p->bits, p->GA, p->clip, p->w, nullptr, 0, out, 1, threads);
  };
  rms_norm_row(x, H, 1, L.norm_in, h.data(), L.eps);
  const Plan* qkv[3] = {L.q, L.k, L.v};
  uint16_t* qkv_out[3] = {q.data(), k.data(), v.data()};
  qkv_projections(qkv, h.data(), qkv_out, threads);
  if (L.q_norm) {
    for (int64_t j = 0; j < L.Hq; ++j) rms_norm_row(&q[j * D], D, 1, L.q_norm, &q[j * D], L.qk_eps);
    for (int64_t j = 0; j < L.Hkv; ++j) rms_norm_row(&k[j * D], D, 1, L.k_norm, &k[j * D], L.qk_eps);
  }
  rotary_bf16(q.data(), L.Hq, D, cos, sin);
  rotary_bf16(k.data(), L.Hkv, D, cos, sin);
  for (int64_t j = 0; j < L.Hkv; ++j) {
    memcpy(kc + (j * ldt + T) * D, &k[j * D], D * 2);
    memcpy(vc + (j * ldt + T) * D, &v[j * D], D * 2);
  }
  for (int64_t i = 0; i < NQ; ++i) qf[i] = bf16_to_float(q[i]);
  AttnArgs A{qf.data(), kc, vc, af.data(), 1, L.Hq, L.Hkv, T + 1, D, D, ldt, 0, L.scale, threads};
  parallel_for(threads, L.Hkv, [&](int64_t i) { attention_item<uint16_t>(A, i); });
  for (int64_t i = 0; i < NQ; ++i) a[i] = float_to_bf16(af[i]);
  if (L.o_hadamard > 0) {
    for (int64_t i = 0; i < NQ; ++i) af[i] = bf16_to_float(a[i]);
    for (int64_t j = 0; j < NQ; j += L.o_hadamard) fwht_block(&af[j], L.o_hadamard);
    for (int64_t i = 0; i < NQ; ++i) a[i] = float_to_bf16(af[i]);
  }
  proj(L.o, a.data(), o.data());
  for (int64_t c = 0; c < H; ++c) x[c] = float_to_bf16(bf16_to_float(x[c]) + bf16_to_float(o[c]));

  rms_norm_row(x, H, 1, L.norm_post, h.data(), L.eps);
  int64_t ids[256];
  float wts[256];
  route(L, h.data(), ids, wts, threads);
  MoeArgs M;
  M.x = h.data();
  M.bf16 = 1;
  M.T = 1;
  M.H = H;
  M.k = L.topk;
  M.E = L.E;
  M.topi = ids;
  M.topw = wts;
  M.gu = L.gu->w;
  M.dn = L.dn->w;
  M.bits = L.gu->bits;
  M.GA = L.gu->GA;
  M.clip = L.gu->clip;
  M.dbits = L.dn->bits;
  M.dGA = L.dn->GA;
  M.dclip = L.dn->clip;
  M.hadamard = L.hadamard;
  M.y = y.data();
  M.threads = threads;
  moe(M);
  for (int64_t c = 0; c < H; ++c) x[c] = float_to_bf16(bf16_to_float(x[c]) + rb(y[c]));
}

static void decode_layer_free(PyObject* cap) { delete (DecodeLayer*)PyCapsule_GetPointer(cap, kDecodeLayer); }

static PyObject* py_decode_layer_plan(PyObject*, PyObject* args) {
  // decode_layer_plan(q, k, v, o, gate_up, down (plan capsules), norm_in, norm_post, q_norm,
  // k_norm, router (bf16 pointers; q_norm = k_norm = 0: none), H, Hq, Hkv, D, E, topk,
  // norm_topk, round_weights, hadamard, o_hadamard, router_bits, router_ga, router_clip, eps, qk_eps, scale) -> capsule
  PyObject* caps[6];
  long long ptr[5], H, Hq, Hkv, D, E, topk, had, o_had, rga;
  int norm_topk, round_weights, rbits;
  double rclip, eps, qk_eps, scale;
  if (!PyArg_ParseTuple(args, "OOOOOOLLLLLLLLLLLiiLLiLdddd", &caps[0], &caps[1], &caps[2], &caps[3], &caps[4], &caps[5], &ptr[0],
                        &ptr[1], &ptr[2], &ptr[3], &ptr[4], &H, &Hq, &Hkv, &D, &E, &topk, &norm_topk, &round_weights, &had, &o_had, &rbits, &rga, &rclip,
                        &eps, &qk_eps, &scale))
    return nullptr;
  const Plan* p[6];
  for (int i = 0; i < 6; ++i)
    if (!(p[i] = (const Plan*)PyCapsule_GetPointer(caps[i], kPlan))) return nullptr;
  if (topk < 1 || topk > 256 || topk > E || D % 2 || (o_had > 0 && (Hq * D) % o_had)) {
    PyErr_SetString(PyExc_ValueError, "decode_layer_plan needs 1 <= topk <= min(E, 256), an even head width and o_hadamard dividing Hq * D");
    return nullptr;
  }
  DecodeLayer* L = new DecodeLayer{p[0], p[1], p[2], p[3], p[4], p[5], (const uint16_t*)ptr[0], (const uint16_t*)ptr[1],
                                   (const uint16_t*)ptr[2], (const uint16_t*)ptr[3], (const uint16_t*)ptr[4], H, Hq, Hkv, D, E,
                                   topk, had, o_had, rga, norm_topk, round_weights, rbits, (float)eps, (float)qk_eps, (float)scale, (float)rclip};
  PyObject* cap = PyCapsule_New(L, kDecodeLayer, decode_layer_free);
  if (!cap) delete L;
  return cap;
}

static PyObject* py_decode_layer(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  // decode_layer(layer, x, cos, sin, k_cache, v_cache, ldt, T, threads): see decode_layer.
  long long v[8];
  const DecodeLayer* L = (const DecodeLayer*)capsule_and_ints(args, nargs, kDecodeLayer, "decode_layer", v, 8);
  if (!L) return nullptr;
  if (v[6] < 0 || v[6] >= v[5]) {
    PyErr_SetString(PyExc_ValueError, "decode_layer needs 0 <= T < ldt (room in the cache for the new position)");
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  decode_layer(*L, (uint16_t*)v[0], (const uint16_t*)v[1], (const uint16_t*)v[2], (uint16_t*)v[3], (uint16_t*)v[4], v[5], v[6],
               (int)v[7]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject* py_quantize(PyObject*, PyObject* args) {
  // quantize(x_f32_ptr, M, K, bits, GA, clip, q_ptr, s_ptr, z_ptr[, interleave]) with the current
  // ISA's quantizer: q [M, K] in natural column order, or [M, KQ] in the kernels' 128-column
  // interleaved layout (zero-padded to KQ = K rounded up to 128) when interleave.
  long long x, M, K, GA, q, s, z;
  int bits, interleave = 0;
  double clip;
  if (!PyArg_ParseTuple(args, "LLLiLdLLL|i", &x, &M, &K, &bits, &GA, &clip, &q, &s, &z, &interleave)) return nullptr;
  const int64_t ga = GA > 0 ? GA : K, na = K / ga, KQ = q_columns((K + 63) / 64 * 64);
  std::vector<uint8_t> buf(KQ);
  for (int64_t m = 0; m < M; ++m) {
    if (interleave) {
      g_isa->quantize_row((const float*)x + m * K, K, bits, ga, (float)clip, KQ, true, (uint8_t*)q + m * KQ, (float*)s + m * na,
                          (float*)z + m * na);
    } else {
      g_isa->quantize_row((const float*)x + m * K, K, bits, ga, (float)clip, KQ, false, buf.data(), (float*)s + m * na,
                          (float*)z + m * na);
      memcpy((uint8_t*)q + m * K, buf.data(), K);
    }
  }
  Py_RETURN_NONE;
}

static PyObject* py_rowsum8(PyObject*, PyObject* args) {
  // rowsum8(idx, cb8, sc, N, K, G, GA, out [N, K/GA]): sum over each activation group of sc * cb8[idx].
  long long idx, cb8, sc, N, K, G, GA, out;
  if (!PyArg_ParseTuple(args, "LLLLLLLL", &idx, &cb8, &sc, &N, &K, &G, &GA, &out)) return nullptr;
  const int64_t KP = (K + 63) / 64 * 64, NG = K / G, NA = K / GA;
  Py_BEGIN_ALLOW_THREADS
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = (const uint8_t*)idx + n * (KP / 2);
    for (int64_t a = 0; a < NA; ++a) {
      double acc = 0.0;
      for (int64_t c = a * GA; c < (a + 1) * GA; ++c) {
        const uint8_t b = row[(c >> 6) * 32 + (c & 31)];
        const int nib = (c & 32) ? (b >> 4) : (b & 15);
        const int64_t g = c / G;
        acc += (double)((const float*)sc)[n * NG + g] * (double)((const int8_t*)cb8)[(n * NG + g) * 16 + nib];
      }
      ((float*)out)[n * NA + a] = (float)acc;
    }
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject* py_read_bytes(PyObject*, PyObject* args) {
  // read_bytes(ptr, nbytes, threads) -> checksum: a streaming read through the pool, to
  // measure the memory bandwidth the kernels can reach.
  long long ptr, nbytes;
  int threads;
  if (!PyArg_ParseTuple(args, "LLi", &ptr, &nbytes, &threads)) return nullptr;
  const int64_t chunk = 1 << 20, items = (nbytes + chunk - 1) / chunk;
  std::vector<uint64_t> sums(items);
  Py_BEGIN_ALLOW_THREADS
  parallel_for(threads, items, [&](int64_t i) {
    const uint64_t* p = (const uint64_t*)(ptr + i * chunk);
    const int64_t n = std::min<int64_t>(chunk, nbytes - i * chunk) / 8;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {  // one 64-byte line, prefetched as the kernels prefetch their weights
#ifdef CQ_X86
      if (g_prefetch_lines) _mm_prefetch((const char*)(p + j) + 8192, _MM_HINT_T1);
#endif
      a += p[j] + p[j + 4]; b += p[j + 1] + p[j + 5]; c += p[j + 2] + p[j + 6]; d += p[j + 3] + p[j + 7];
    }
    for (; j < n; ++j) a += p[j];
    sums[i] = a + b + c + d;
  });
  Py_END_ALLOW_THREADS
  uint64_t total = 0;
  for (uint64_t v : sums) total += v;
  return PyLong_FromUnsignedLongLong(total);
}

static PyObject* py_tune(PyObject*, PyObject* args) {
  int i;
  long long v;
  if (!PyArg_ParseTuple(args, "iL", &i, &v) || i < 0 || i >= 8) return nullptr;
  const long long old = g_tune[i];
  g_tune[i] = v;
  return PyLong_FromLongLong(old);
}

static PyObject* py_spin_us(PyObject*, PyObject* args) {
  // spin_us(us) -> old: how long an idle pool worker spins for the next job before it sleeps.
  long long us;
  if (!PyArg_ParseTuple(args, "L", &us)) return nullptr;
  return PyLong_FromLongLong(g_spin_us.exchange(std::max(0LL, us)));
}

static PyObject* py_prefetch_lines(PyObject*, PyObject* args) {
  // prefetch_lines(flag) -> old: the AVX-512 kernels prefetch every line of the index stream 8 KiB
  // ahead (else one line per 128-column step, 4 KiB ahead).
  int flag;
  if (!PyArg_ParseTuple(args, "p", &flag)) return nullptr;
  const bool old = g_prefetch_lines;
  g_prefetch_lines = flag;
  return PyBool_FromLong(old);
}

static PyObject* py_worker_cpus(PyObject*, PyObject* args) {
  // worker_cpus(cpus) -> bool: pin the pool's workers to these CPU numbers (empty: as created).
  PyObject* seq;
  if (!PyArg_ParseTuple(args, "O", &seq)) return nullptr;
  PyObject* fast = PySequence_Fast(seq, "worker_cpus expects a sequence of CPU numbers");
  if (!fast) return nullptr;
  std::vector<int> cpus;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); ++i) {
    const long c = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
    if (c == -1 && PyErr_Occurred()) {
      Py_DECREF(fast);
      return nullptr;
    }
    cpus.push_back((int)c);
  }
  Py_DECREF(fast);
  bool ok;
  Py_BEGIN_ALLOW_THREADS ok = g_pool->set_cpus(cpus);
  Py_END_ALLOW_THREADS return PyBool_FromLong(ok);
}

static PyObject* py_set_isa(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  const Isa* isa = isa_by_name(name);
  if (!isa || !cpu_has(name)) {
    PyErr_Format(PyExc_ValueError, "instruction set %s is not available on this CPU or build", name);
    return nullptr;
  }
  g_isa = isa;
  Py_RETURN_NONE;
}

static PyObject* py_isa(PyObject*, PyObject*) { return PyUnicode_FromString(g_isa->name); }

static PyObject* py_available(PyObject*, PyObject*) {
  PyObject* list = PyList_New(0);
  for (const char* name : {"portable", "avx2", "avx512"})
    if (isa_by_name(name) && cpu_has(name)) {
      PyObject* s = PyUnicode_FromString(name);
      PyList_Append(list, s);
      Py_DECREF(s);
    }
  return list;
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, "y = Q(x) W_hat^T + b on packed weights (pointers; see the Python wrapper)."},
    {"plan", py_plan, METH_VARARGS, "A prepared linear layer (capsule) for run()."},
    {"run", (PyCFunction)(void (*)(void))py_run, METH_FASTCALL, "linear on a plan: run(plan, x, x_bf16, M, bias, bias_bf16, y, y_bf16, threads)."},
    {"time_run", py_time_run, METH_VARARGS, "time_run(plans, x, x_bf16, M, y, threads, reps) -> us per call of run() timed from C++."},
    {"moe", py_moe, METH_VARARGS, "Fused routed SwiGLU experts on packed weights (pointers; see the Python wrapper)."},
    {"bf16_linear", py_bf16_linear, METH_VARARGS, "y = x @ w^T for a plain bf16 weight (float32 x and y; pointers)."},
    {"attention_decode", py_attention_decode, METH_VARARGS, "Decode attention, one query position (pointers; see the Python wrapper)."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "transformers' RMSNorm of bf16 or float32 rows (pointers; see the Python wrapper)."},
    {"decode_layer_plan", py_decode_layer_plan, METH_VARARGS, "A prepared decoder layer (capsule) for decode_layer()."},
    {"decode_layer", (PyCFunction)(void (*)(void))py_decode_layer, METH_FASTCALL,
     "One decoder layer at one token: decode_layer(layer, x, cos, sin, k_cache, v_cache, ldt, T, threads)."},
    {"quantize", py_quantize, METH_VARARGS, "Per-token integer activation quantization (natural column order)."},
    {"rowsum8", py_rowsum8, METH_VARARGS, "Row sums of the int8-codebook weights per activation group."},
    {"read_bytes", py_read_bytes, METH_VARARGS, "Streaming read of a buffer (bandwidth probe); returns a checksum."},
    {"tune", py_tune, METH_VARARGS, "tune(i, v) -> old value: set switch i (see cq_kernels.h; 1: no vpermb)."},
    {"spin_us", py_spin_us, METH_VARARGS, "spin_us(us) -> old: how long idle pool workers spin before they sleep."},
    {"prefetch_lines", py_prefetch_lines, METH_VARARGS,
     "prefetch_lines(flag) -> old: prefetch every index line 8 KiB ahead (else one per step, 4 KiB ahead)."},
    {"worker_cpus", py_worker_cpus, METH_VARARGS, "worker_cpus(cpus) -> bool: pin the pool's workers to these CPUs (empty: as created)."},
    {"set_isa", py_set_isa, METH_VARARGS, "Force an instruction set: portable, avx2 or avx512."},
    {"isa", py_isa, METH_NOARGS, "The instruction set in use."},
    {"available_isas", py_available, METH_NOARGS, "Instruction sets this CPU and build support."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lut", "CodeQuant CPU lookup-table kernels.", -1, methods};

#ifdef CQ_X86
// The CPU family of an AMD processor (base + extended family of CPUID leaf 1): 0x19 Zen 3 / 4, 0x1A Zen 5.
static unsigned amd_family() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const unsigned base = (a >> 8) & 0xF;
  return base == 0xF ? base + ((a >> 20) & 0xFF) : base;
}
#endif

PyMODINIT_FUNC PyInit__lut(void) {
  g_isa = best_isa();
#ifdef CQ_X86
  __builtin_cpu_init();
  g_prefetch_lines = __builtin_cpu_is("intel") || (__builtin_cpu_is("amd") && amd_family() >= 0x1A);
#endif
  if (const char* env = getenv("CODEQUANT_CPU_ISA")) {
    if (*env) {
      const Isa* isa = isa_by_name(env);
      if (!isa || !cpu_has(env)) {
        PyErr_Format(PyExc_ImportError, "CODEQUANT_CPU_ISA=%s is not available on this CPU or build", env);
        return nullptr;
      }
      g_isa = isa;
    }
  }
  if (!g_pool) g_pool = new Pool();
  return PyModule_Create(&module);
}

// CPU kernels: the selective scan, the softplus that gives its step sizes, the convolution + SiLU before
// the scan and the gate after it, the whole mixer of a block in one call (its projections on the BLAS
// torch is linked with), and the choice of tokens, planning and application of a token-merge step.
// Plain C++ (no torch headers), built by build.py and bound with ctypes by library.py.
//
// Layouts (row-major, all contiguous):
//   u, delta, y, dy, du, ddelta: (batch, L, d)
//   At: (N, d)  -- A transposed, so a block of channels is contiguous
//   B, C: (batch, L, N);  D: (d,)
//   gradient partials: dA (batch, d, N), dB and dC (batch, n_blocks, L, N),
//   dD (batch, d); the caller sums them over batch / blocks.
//
// Work is split into tasks = (batch index, block of kBlock channels), run on
// the OpenMP team of the caller's runtime (see run_tasks) or on std::thread
// workers; no OpenMP runtime of our own is linked. Inside a task every inner
// loop runs over the kBlock channels of the block, padded with zeros when d is
// not a multiple of kBlock, so it always has the same fixed width and
// vectorises (float32 exp as vexp's polynomial; the state update written out
// for AVX-512 and for AVX2 with FMA).

#include <math.h>

// The vector code written out by hand (the state update, few_rows): AVX-512, else AVX2 with FMA, else none.
#if defined(__AVX512F__)
#define MAMBAMERGE_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define MAMBAMERGE_AVX2 1
#endif
#if defined(MAMBAMERGE_AVX512) || defined(MAMBAMERGE_AVX2)
#define MAMBAMERGE_FEW_ROWS 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <limits>
#include <exception>
#include <thread>
#include <vector>

// glibc only declares the libmvec vector variants of exp under __FAST_MATH__,
// which -fno-finite-math-only turns off; declare them here.
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));
extern "C" double exp(double) noexcept __attribute__((simd("notinbranch")));

namespace {

constexpr int64_t kBlock = 16;

// exp for float32 without libmvec's special-case handling: 2^k * p(f), k = round(x log2 e),
// p a degree-5 polynomial fitted to 2^f on |f| <= 1/2 for the least largest relative error, its constant
// term 1 so that exp(0) = 1 (relative error < 1.9e-7 evaluated in float32, about 1 ulp; the degree-6 Taylor
// polynomial it replaces: 2.4e-7, one multiply-add more in every decay of the scan).
// Arguments are clamped to [-86, 88] so the exponent arithmetic stays in the normal range: results
// below ~2.6e-38 come out as ~2.6e-38 instead of a denormal or 0, harmless for the decays
// exp(delta A) <= 1 that multiply a bounded state. NaN stays NaN. About 1.5x faster than libmvec's expf
// (which handles every special case), and the scan is bound by this exp.
constexpr float kLog2e = 1.44269504088896341f;
// p's coefficients, highest degree first (Horner's order)
constexpr float kExp2Poly[] = {1.326470879117602e-3f, 9.67151147117229e-3f, 5.550733776475789e-2f,
                               2.4022242103978847e-1f, 6.931469775940103e-1f, 1.0f};
constexpr int kExp2Terms = sizeof(kExp2Poly) / sizeof(kExp2Poly[0]);

inline float vexp(float x) {
  x = std::min(std::max(x, -86.0f), 88.0f);
  const float t = x * kLog2e;
  const float k = __builtin_rintf(t);
  const float f = t - k;
  float q = kExp2Poly[0];
  for (int i = 1; i < kExp2Terms; ++i) q = q * f + kExp2Poly[i];
  int32_t bits;
  __builtin_memcpy(&bits, &q, sizeof bits);
  bits += static_cast<int32_t>(k) << 23;
  __builtin_memcpy(&q, &bits, sizeof bits);
  return q;
}
inline double vexp(double x) { return exp(x); }

template <typename T>
struct Problem {
  const T* u;
  const T* delta;
  const T* At;
  const T* B;
  const T* C;
  const T* D;
  int64_t batch, length, d, n_state;
  bool reverse;
  int64_t bc_stride;  // values between the rows of B (and of C): n_state, or more when they are column blocks

  int64_t n_blocks() const { return (d + kBlock - 1) / kBlock; }
  int64_t n_tasks() const { return batch * n_blocks(); }
  // Time index of the s-th step in scan order.
  int64_t time_at(int64_t s) const { return reverse ? length - 1 - s : s; }
};

// One (batch index, channel block) task.
template <typename T>
struct Task {
  const Problem<T>& p;
  int64_t b, block, c0, width;

  Task(const Problem<T>& problem, int64_t task)
      : p(problem),
        b(task / problem.n_blocks()),
        block(task % problem.n_blocks()),
        c0(block * kBlock),
        width(std::min(kBlock, problem.d - block * kBlock)) {}

  // Offset of channel c0 at time t in a (batch, L, d) tensor.
  int64_t row(int64_t t) const { return (b * p.length + t) * p.d + c0; }
  // Offset of time t in B or C.
  int64_t state_row(int64_t t) const { return (b * p.length + t) * p.bc_stride; }

  // dst[0:kBlock] = src[0:width], zero padded.
  void load(const T* src, T* dst) const {
    if (width == kBlock) {
      for (int64_t c = 0; c < kBlock; ++c) dst[c] = src[c];
      return;
    }
    std::fill(dst, dst + kBlock, T(0));
    std::copy(src, src + width, dst);
  }
  // a[n * kBlock + c] = A[c0 + c, n], zero padded.
  void load_a(T* a) const {
    for (int64_t n = 0; n < p.n_state; ++n) load(p.At + n * p.d + c0, a + n * kBlock);
  }
};

// One step of the recurrence over the kBlock channels of a task and its N states:
// h[n] = exp(dt a[n]) prev[n] + du B[n] and acc += h[n] C[n] (the decays kept in e when kRecord).
template <bool kRecord, typename T>
inline void state_step(int64_t N, const T* a, const T* dt, const T* du, const T* Bt, const T* Ct, const T* prev,
                       T* h, T* e, T* acc) {
  for (int64_t n = 0; n < N; ++n) {
    const T* an = a + n * kBlock;
    const T* hp = prev + n * kBlock;
    T* hn = h + n * kBlock;
    const T bn = Bt[n], cn = Ct[n];
#pragma omp simd
    for (int64_t c = 0; c < kBlock; ++c) {
      const T decay = vexp(dt[c] * an[c]);
      if constexpr (kRecord) e[n * kBlock + c] = decay;
      hn[c] = decay * hp[c] + du[c] * bn;
      acc[c] += hn[c] * cn;
    }
  }
}

#if defined(MAMBAMERGE_AVX512)
// float32 with AVX-512: the same step with exp(x) as 2^(x log2 e) = 2^k p(f), k = round(x log2 e) applied
// by vscalefps instead of through the exponent bits (the upper clamp and the integer arithmetic go):
// log2 e multiplies dt once a step instead of every decay. vexp's polynomial (kExp2Poly); arguments are
// clamped below at 2^-124 (as vexp's e^-86), NaN stays NaN (vmaxps returns its second operand).
template <bool kRecord>
inline void state_step(int64_t N, const float* a, const float* dt, const float* du, const float* Bt,
                       const float* Ct, const float* prev, float* h, float* e, float* acc) {
  static_assert(kBlock == 16, "one AVX-512 register of channels");
  const __m512 dt2 = _mm512_mul_ps(_mm512_loadu_ps(dt), _mm512_set1_ps(kLog2e));
  const __m512 duv = _mm512_loadu_ps(du);
  const __m512 lowest = _mm512_set1_ps(-124.0f);
  __m512 sum = _mm512_loadu_ps(acc);
  for (int64_t n = 0; n < N; ++n) {
    const __m512 x = _mm512_max_ps(lowest, _mm512_mul_ps(dt2, _mm512_loadu_ps(a + n * kBlock)));
    const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, k);
    __m512 q = _mm512_set1_ps(kExp2Poly[0]);
    for (int i = 1; i < kExp2Terms; ++i) q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kExp2Poly[i]));
    const __m512 decay = _mm512_scalef_ps(q, k);
    if constexpr (kRecord) _mm512_storeu_ps(e + n * kBlock, decay);
    const __m512 hn = _mm512_fmadd_ps(decay, _mm512_loadu_ps(prev + n * kBlock),
                                      _mm512_mul_ps(duv, _mm512_set1_ps(Bt[n])));
    _mm512_storeu_ps(h + n * kBlock, hn);
    sum = _mm512_fmadd_ps(hn, _mm512_set1_ps(Ct[n]), sum);
  }
  _mm512_storeu_ps(acc, sum);
}
#elif defined(MAMBAMERGE_AVX2)
// float32 with AVX2 and FMA (no AVX-512): the kBlock channels as two 8-lane halves, exp(x) as 2^k p(f) with
// k = round(x log2 e) added to p's exponent bits, log2 e applied to dt once a step, the accumulator kept
// in registers. Arguments clamped to [-124, 127] in log2 units (vexp's [-86, 88] nats, about) by max/min
// ordered so that a NaN passes (vmaxps and vminps return their second operand): its k converts to
// 0x80000000, shifted out to 0, and p(NaN) is NaN. The generic loop clamps with compares and blends.
template <bool kRecord>
inline void state_step(int64_t N, const float* a, const float* dt, const float* du, const float* Bt,
                       const float* Ct, const float* prev, float* h, float* e, float* acc) {
  static_assert(kBlock == 16, "two AVX2 registers of channels");
  const __m256 log2e = _mm256_set1_ps(kLog2e);
  const __m256 lowest = _mm256_set1_ps(-124.0f), highest = _mm256_set1_ps(127.0f);
  __m256 dt2[2], duv[2], sum[2];
  for (int j = 0; j < 2; ++j) {
    dt2[j] = _mm256_mul_ps(_mm256_loadu_ps(dt + 8 * j), log2e);
    duv[j] = _mm256_loadu_ps(du + 8 * j);
    sum[j] = _mm256_loadu_ps(acc + 8 * j);
  }
  for (int64_t n = 0; n < N; ++n) {
    const __m256 bn = _mm256_set1_ps(Bt[n]), cn = _mm256_set1_ps(Ct[n]);
    for (int j = 0; j < 2; ++j) {
      const int64_t at = n * kBlock + 8 * j;
      __m256 x = _mm256_mul_ps(dt2[j], _mm256_loadu_ps(a + at));
      x = _mm256_min_ps(highest, _mm256_max_ps(lowest, x));
      const __m256 k = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 f = _mm256_sub_ps(x, k);
      __m256 q = _mm256_set1_ps(kExp2Poly[0]);
      for (int i = 1; i < kExp2Terms; ++i) q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kExp2Poly[i]));
      const __m256i scale = _mm256_slli_epi32(_mm256_cvttps_epi32(k), 23);
      const __m256 decay = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(q), scale));
      if constexpr (kRecord) _mm256_storeu_ps(e + at, decay);
      const __m256 hn = _mm256_fmadd_ps(decay, _mm256_loadu_ps(prev + at), _mm256_mul_ps(duv[j], bn));
      _mm256_storeu_ps(h + at, hn);
      sum[j] = _mm256_fmadd_ps(hn, cn, sum[j]);
    }
  }
  for (int j = 0; j < 2; ++j) _mm256_storeu_ps(acc + 8 * j, sum[j]);
}
#endif

// Runs the recurrence of one task and writes y (if not null). With kRecord it
// also keeps, for every step s in scan order, the state h and the decay
// exp(delta A) at states[s * N * kBlock] and decays[s * N * kBlock] (for the
// backward); otherwise the state rolls in `state`. Scratch: `state` and `a`
// (the block of A), N * kBlock values each.
template <bool kRecord, typename T>
void forward_sweep(const Task<T>& tk, T* y, T* state, T* a, T* states, T* decays) {
  const Problem<T>& p = tk.p;
  const int64_t N = p.n_state, NB = p.n_state * kBlock;
  tk.load_a(a);
  T dvec[kBlock];
  tk.load(p.D + tk.c0, dvec);
  std::fill(state, state + NB, T(0));
  const T* prev = state;
  for (int64_t s = 0; s < p.length; ++s) {
    const int64_t t = p.time_at(s);
    T* h = kRecord ? states + s * NB : state;
    T dt[kBlock], uu[kBlock], du[kBlock], acc[kBlock];
    tk.load(p.delta + tk.row(t), dt);
    tk.load(p.u + tk.row(t), uu);
    for (int64_t c = 0; c < kBlock; ++c) {
      du[c] = dt[c] * uu[c];
      acc[c] = T(0);
    }
    state_step<kRecord>(N, a, dt, du, p.B + tk.state_row(t), p.C + tk.state_row(t), prev, h,
                        kRecord ? decays + s * NB : nullptr, acc);
    if (y) {
      T* yt = y + tk.row(t);
      for (int64_t c = 0; c < tk.width; ++c) yt[c] = acc[c] + dvec[c] * uu[c];
    }
    prev = h;
  }
}

template <typename T>
struct Grads {
  const T* dy;
  T* du;
  T* ddelta;
  T* dA;  // (batch, d, N)
  T* dB;  // (batch, n_blocks, L, N)
  T* dC;  // (batch, n_blocks, L, N)
  T* dD;  // (batch, d)
};

// Backward of one task: recompute the states and decays, then run the adjoint
// recurrence g_s = C_s dy_s + exp(delta_{s+1} A) g_{s+1} from the last step in
// scan order. Scratch: (2 L + 4) * N * kBlock values.
template <typename T>
void backward_task(const Task<T>& tk, const Grads<T>& g, T* scratch) {
  const Problem<T>& p = tk.p;
  const int64_t N = p.n_state, NB = p.n_state * kBlock;
  T* states = scratch;
  T* decays = states + p.length * NB;
  T* a = decays + p.length * NB;
  T* zeros = a + NB;
  T* carry = zeros + NB;  // exp(delta_{s+1} A) g_{s+1}
  T* dA = carry + NB;
  forward_sweep<true>(tk, static_cast<T*>(nullptr), zeros, a, states, decays);
  std::fill(zeros, zeros + 3 * NB, T(0));  // zeros, carry, dA
  T dvec[kBlock], dD[kBlock] = {};
  tk.load(p.D + tk.c0, dvec);
  const int64_t part_row = (tk.b * p.n_blocks() + tk.block) * p.length;
  for (int64_t s = p.length - 1; s >= 0; --s) {
    const int64_t t = p.time_at(s);
    const T* h = states + s * NB;
    const T* prev = s > 0 ? states + (s - 1) * NB : zeros;
    const T* e_s = decays + s * NB;
    T dt[kBlock], uu[kBlock], dyv[kBlock], du[kBlock], ddt[kBlock], gb[kBlock];
    tk.load(p.delta + tk.row(t), dt);
    tk.load(p.u + tk.row(t), uu);
    tk.load(g.dy + tk.row(t), dyv);
    for (int64_t c = 0; c < kBlock; ++c) {
      du[c] = dt[c] * uu[c];
      ddt[c] = T(0);
      gb[c] = T(0);
    }
    const T* Bt = p.B + tk.state_row(t);
    const T* Ct = p.C + tk.state_row(t);
    T* dBt = g.dB + (part_row + t) * N;
    T* dCt = g.dC + (part_row + t) * N;
    for (int64_t n = 0; n < N; ++n) {
      const T* an = a + n * kBlock;
      const T* hn = h + n * kBlock;
      const T* hp = prev + n * kBlock;
      const T* en = e_s + n * kBlock;
      T* cr = carry + n * kBlock;
      T* dAn = dA + n * kBlock;
      const T bn = Bt[n], cn = Ct[n];
      T sum_b = T(0), sum_c = T(0);
#pragma omp simd reduction(+ : sum_b, sum_c)
      for (int64_t c = 0; c < kBlock; ++c) {
        const T gs = cn * dyv[c] + cr[c];
        const T x = gs * hp[c] * en[c];
        ddt[c] += x * an[c];
        gb[c] += gs * bn;
        dAn[c] += x * dt[c];
        cr[c] = en[c] * gs;
        sum_b += gs * du[c];
        sum_c += dyv[c] * hn[c];
      }
      dBt[n] = sum_b;
      dCt[n] = sum_c;
    }
    T* dut = g.du + tk.row(t);
    T* ddeltat = g.ddelta + tk.row(t);
    for (int64_t c = 0; c < tk.width; ++c) {
      ddeltat[c] = ddt[c] + gb[c] * uu[c];
      dut[c] = gb[c] * dt[c] + dvec[c] * dyv[c];
      dD[c] += dyv[c] * uu[c];
    }
  }
  for (int64_t c = 0; c < tk.width; ++c) {
    const int64_t ch = tk.b * p.d + tk.c0 + c;
    g.dD[ch] = dD[c];
    for (int64_t n = 0; n < N; ++n) g.dA[ch * N + n] = dA[n * kBlock + c];
  }
}

// Signature of GOMP_parallel(fn, data, num_threads, flags): runs fn(data) on a
// team of num_threads threads of an OpenMP runtime and returns when all are done.
using ParallelLauncher = void (*)(void (*)(void*), void*, unsigned, unsigned);

template <typename F>
void call_worker(void* worker) {
  (*static_cast<F*>(worker))();
}

// Runs fn(task, scratch) for every task on up to num_threads threads (the
// calling one included); each thread owns a scratch buffer of scratch_size.
// With a launcher (the caller passes the GOMP_parallel of the OpenMP runtime
// torch already runs, so its idle, spinning workers take the tasks instead of
// competing for the cores) the team comes from it, otherwise from std::thread.
// Returns 0 on success, 1 if a worker failed (e.g. out of memory).
template <typename T, typename Fn>
int run_tasks(int64_t n_tasks, int num_threads, ParallelLauncher launcher, size_t scratch_size, Fn fn) {
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  auto worker = [&]() {
    try {
      std::vector<T> scratch(scratch_size);
      for (int64_t task = next++; task < n_tasks && !failed; task = next++) fn(task, scratch.data());
    } catch (...) {
      failed = true;
    }
  };
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, n_tasks));
  if (n_threads == 1) {
    worker();
  } else if (launcher) {
    launcher(&call_worker<decltype(worker)>, &worker, static_cast<unsigned>(n_threads), 0);
  } else {
    std::vector<std::thread> threads;
    try {
      for (int64_t i = 1; i < n_threads; ++i) threads.emplace_back(worker);
    } catch (...) {
      // Fewer threads than asked for: the remaining ones share the tasks.
    }
    worker();
    for (auto& th : threads) th.join();
  }
  return failed ? 1 : 0;
}

template <typename T>
int scan_forward(const Problem<T>& p, T* y, int num_threads, ParallelLauncher launcher) {
  const size_t scratch = 2 * p.n_state * kBlock;
  return run_tasks<T>(p.n_tasks(), num_threads, launcher, scratch, [&](int64_t task, T* buf) {
    forward_sweep<false>(Task<T>(p, task), y, buf, buf + p.n_state * kBlock, static_cast<T*>(nullptr),
                         static_cast<T*>(nullptr));
  });
}

template <typename T>
int scan_backward(const Problem<T>& p, const Grads<T>& g, int num_threads, ParallelLauncher launcher) {
  const size_t scratch = (2 * p.length + 4) * p.n_state * kBlock;
  return run_tasks<T>(p.n_tasks(), num_threads, launcher, scratch,
                      [&](int64_t task, T* buf) { backward_task(Task<T>(p, task), g, buf); });
}

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|), stable at both ends. log1p(t) for t in (0, 1]
// is 2 atanh(s) with s = t / (2 + t) in (0, 1/3]: an odd series in s whose terms shrink by 1/9 or more,
// so 8 terms give float32 accuracy (relative error < 1e-7) everywhere, small t included.
inline float softplus_one(float x) {
  const float t = vexp(-std::fabs(x));
  const float s = t / (2.0f + t);
  const float s2 = s * s;
  float q = 1.0f / 15;
  q = q * s2 + 1.0f / 13;
  q = q * s2 + 1.0f / 11;
  q = q * s2 + 1.0f / 9;
  q = q * s2 + 1.0f / 7;
  q = q * s2 + 1.0f / 5;
  q = q * s2 + 1.0f / 3;
  q = q * s2 + 1.0f;
  return std::max(x, 0.0f) + 2.0f * s * q;
}
inline double softplus_one(double x) { return std::max(x, 0.0) + std::log1p(exp(-std::fabs(x))); }

constexpr int64_t kSoftplusChunk = 16384;  // elements per task, in whole rows

// fn(row) for rows 0..rows-1 of `row_len` values, in tasks of whole rows of about `chunk` values each.
template <typename T, typename Fn>
int for_each_row(int64_t rows, int64_t row_len, int64_t chunk, int num_threads, ParallelLauncher launcher, Fn fn) {
  const int64_t per_task = std::max<int64_t>(1, chunk / row_len);
  const int64_t n_tasks = (rows + per_task - 1) / per_task;
  return run_tasks<T>(n_tasks, num_threads, launcher, 0, [&](int64_t task, T*) {
    const int64_t end = std::min(rows, (task + 1) * per_task);
    for (int64_t row = task * per_task; row < end; ++row) fn(row);
  });
}

// y = softplus(x + bias) for `rows` rows of `row_len` values (bias: one per column, or null for none);
// with row_mean, also the mean of each row of y (the token's mean step size over channels), while the
// row is in cache.
template <typename T>
int softplus(const T* x, const T* bias, T* y, T* row_mean, int64_t rows, int64_t row_len, int num_threads,
             ParallelLauncher launcher) {
  return for_each_row<T>(rows, row_len, kSoftplusChunk, num_threads, launcher, [&](int64_t row) {
    const T* xr = x + row * row_len;
    T* yr = y + row * row_len;
    T sum = 0;
    if (bias) {
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < row_len; ++i) {
        yr[i] = softplus_one(xr[i] + bias[i]);
        sum += yr[i];
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < row_len; ++i) {
        yr[i] = softplus_one(xr[i]);
        sum += yr[i];
      }
    }
    if (row_mean) row_mean[row] = sum / static_cast<T>(row_len);
  });
}

// One token-merge step on the two residual streams of a batch (mambamerge.merge.state.MergePlan):
// out[b, j] = x[b, rep[b, j]] with x = residual + hidden (hidden alone when residual is null), then
// every row receiving movers becomes (w_t x_t + sum_k w_k x_k) / denom, t its rep and k its movers,
// denom = w_t + sum_k w_k ("mean") or w_t ("sum"); the token sizes of the members add up. Layouts:
// streams (batch, L, C), out (batch, L', C), rep and size_out (batch, L'), assign, weight and size
// (batch, L), movers and targets (batch, m). One task per image; scratch: the L' denominators.
template <typename T>
struct MergeProblem {
  const T* residual;
  const T* hidden;
  const int64_t* rep;
  const int64_t* assign;
  const int64_t* movers;
  const int64_t* targets;
  const T* weight;
  const float* size;
  int64_t batch, length, new_length, m, channels;
  bool mean;
};

template <typename T>
void merge_image(const MergeProblem<T>& p, int64_t b, T* out, float* size_out, T* denom) {
  const int64_t C = p.channels;
  const T* res = p.residual ? p.residual + b * p.length * C : nullptr;
  const T* hid = p.hidden + b * p.length * C;
  T* o = out + b * p.new_length * C;
  // dst = scale * x[i], or dst += scale * x[i] (scale 1: a plain copy, bit for bit residual + hidden)
  auto row = [&](int64_t i, T* dst, T scale, bool accumulate) {
    const T* h = hid + i * C;
    const T* r = res ? res + i * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const T v = (r ? r[c] + h[c] : h[c]) * scale;
      dst[c] = accumulate ? dst[c] + v : v;
    }
  };
  const int64_t* rep = p.rep + b * p.new_length;
  const float* size = p.size + b * p.length;
  float* new_size = size_out + b * p.new_length;
  for (int64_t j = 0; j < p.new_length; ++j) {
    row(rep[j], o + j * C, T(1), false);
    new_size[j] = size[rep[j]];
  }
  if (p.m == 0) return;
  const int64_t* assign = p.assign + b * p.length;
  const int64_t* movers = p.movers + b * p.m;
  const int64_t* targets = p.targets + b * p.m;
  for (int64_t k = 0; k < p.m; ++k) new_size[assign[targets[k]]] += size[movers[k]];
  const T* w = p.weight + b * p.length;
  for (int64_t k = 0; k < p.m; ++k) denom[assign[targets[k]]] = w[targets[k]];
  if (p.mean) {
    for (int64_t k = 0; k < p.m; ++k) denom[assign[targets[k]]] += w[movers[k]];
  }
  const T tiny = std::numeric_limits<T>::min();
  // a row receiving several movers is rewritten once per mover, to the same value
  for (int64_t k = 0; k < p.m; ++k) {
    const int64_t j = assign[targets[k]];
    row(targets[k], o + j * C, w[targets[k]] / std::max(denom[j], tiny), false);
  }
  for (int64_t k = 0; k < p.m; ++k) {
    const int64_t j = assign[targets[k]];
    row(movers[k], o + j * C, w[movers[k]] / std::max(denom[j], tiny), true);
  }
}

template <typename T>
int merge_apply(const MergeProblem<T>& p, T* out, float* size_out, int num_threads, ParallelLauncher launcher) {
  return run_tasks<T>(p.batch, num_threads, launcher, p.new_length,
                      [&](int64_t b, T* denom) { merge_image(p, b, out, size_out, denom); });
}

// The plan of a step from the tokens that leave (mambamerge.merge.state.plan_from_selection, survivors
// in their current order): src (batch, r) leaving tokens, dst (batch, r) the survivor each joins or null
// for pruning -> rep (batch, L - r) the survivors in ascending order, assign (batch, L) each token's new
// index (-1: dropped). Returns 1 if src is not r distinct tokens of [0, L) or a dst is not a survivor.
int plan_from_selection(const int64_t* src, const int64_t* dst, int64_t* rep, int64_t* assign,
                        int64_t batch, int64_t length, int64_t r) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* s = src + b * r;
    int64_t* a = assign + b * length;
    int64_t* out = rep + b * (length - r);
    std::fill(a, a + length, 0);
    for (int64_t k = 0; k < r; ++k) {
      if (s[k] < 0 || s[k] >= length || a[s[k]] != 0) return 1;
      a[s[k]] = -1;
    }
    for (int64_t i = 0, j = 0; i < length; ++i) {
      if (a[i] == 0) {
        a[i] = j;
        out[j++] = i;
      }
    }
    if (!dst) continue;
    const int64_t* d = dst + b * r;
    for (int64_t k = 0; k < r; ++k) {
      if (d[k] < 0 || d[k] >= length || a[d[k]] < 0) return 1;
    }
    for (int64_t k = 0; k < r; ++k) a[s[k]] = a[d[k]];
  }
  return 0;
}

}  // namespace

extern "C" int mm_plan_from_selection(const int64_t* src, const int64_t* dst, int64_t* rep, int64_t* assign,
                                      int64_t batch, int64_t length, int64_t r) {
  return plan_from_selection(src, dst, rep, assign, batch, length, r);
}

// The mixer's depthwise causal convolution along the sequence and its SiLU, in one pass:
// y[b, t, c] = silu(bias[c] + sum_k w[k, c] x[b, t - (K-1) + k, c]) (reverse: x[b, t + (K-1) - k, c]),
// zeros outside the sequence. x rows are `x_stride` apart (the x half of in_proj's output without a copy);
// w is (K, channels), y contiguous (batch, length, channels).
constexpr int64_t kConvChunk = 32768;  // output elements per task, in whole rows (convolution and gate)

// y = y / (1 + e^-y) over a row. The float version vectorises with vexp, whose polynomial is the same
// arithmetic in vector and scalar form; the double one stays scalar, because -ffast-math would give
// vector lanes libmvec's exp and the alignment-peeled lanes libm's, so a token's value would depend on
// where its row lies in memory (the batch it is in).
inline void silu_row(float* y, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) y[c] = y[c] / (1.0f + vexp(-y[c]));
}
__attribute__((optimize("no-tree-vectorize"))) inline void silu_row(double* y, int64_t n) {
  for (int64_t c = 0; c < n; ++c) y[c] = y[c] / (1.0 + std::exp(-y[c]));
}

template <typename T>
int conv_silu(const T* x, const T* w, const T* bias, T* y, int64_t batch, int64_t length, int64_t channels,
              int64_t x_stride, int64_t k_size, bool reverse, int num_threads, ParallelLauncher launcher) {
  return for_each_row<T>(batch * length, channels, kConvChunk, num_threads, launcher, [&](int64_t row) {
    const int64_t b = row / length, t = row % length;
    T* yr = y + row * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) yr[c] = bias[c];
    for (int64_t k = 0; k < k_size; ++k) {
      const int64_t s = reverse ? t + (k_size - 1) - k : t - (k_size - 1) + k;
      if (s < 0 || s >= length) continue;
      const T* xr = x + (b * length + s) * x_stride;
      const T* wk = w + k * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) yr[c] += wk[c] * xr[c];
    }
    silu_row(yr, channels);
  });
}

// The mixer's output gate: out = (y + y2) * silu(z), halved when `halve` (y2 optional: the second scan of a
// bidirectional mixer), over `rows` rows of `channels`; y, y2 and out contiguous, z rows `z_stride` apart
// (in_proj's z half read in place).
inline float gate_one(float y, float z) { return y * z / (1.0f + vexp(-z)); }

template <typename T>
void gate_row(const T* y, const T* y2, const T* z, T* out, int64_t n, T scale) {
  if (y2) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) out[c] = scale * gate_one(y[c] + y2[c], z[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) out[c] = scale * gate_one(y[c], z[c]);
  }
}
// double: scalar, for the reason given at silu_row
template <>
__attribute__((optimize("no-tree-vectorize"))) void gate_row(const double* y, const double* y2, const double* z,
                                                             double* out, int64_t n, double scale) {
  for (int64_t c = 0; c < n; ++c) {
    const double v = y2 ? y[c] + y2[c] : y[c];
    out[c] = scale * (v * z[c] / (1.0 + std::exp(-z[c])));
  }
}

template <typename T>
int gate(const T* y, const T* y2, const T* z, T* out, int64_t rows, int64_t channels, int64_t z_stride, bool halve,
         int num_threads, ParallelLauncher launcher) {
  const T scale = halve ? T(0.5) : T(1);
  return for_each_row<T>(rows, channels, kConvChunk, num_threads, launcher, [&](int64_t row) {
    gate_row(y + row * channels, y2 ? y2 + row * channels : nullptr, z + row * z_stride, out + row * channels,
             channels, scale);
  });
}

// The whole Mamba mixer of one block in one call, for float32 inference (mambamerge.models.mixer's
// forward, the per-step kernels above between the projections), optionally after the block's residual
// add and RMSNorm (models/blocks.Block): residual_out = residual + hidden, hidden' = rmsnorm(residual_out)
// (x / sqrt(mean(x^2) + eps) * weight); then x, z = in_proj(hidden'); per branch
// u = silu(conv(x)), (dt, B, C) = x_proj(u), delta = softplus(dt_proj(dt)); per scan y = scan(u, delta,
// -exp(A_log), B, C, D); out = out_proj((y1 + y2) * silu(z) [* 0.5]). The projections run on the sgemm_
// of the BLAS torch is linked with (its address passed in), so a block at a few tokens costs one call
// instead of tens of torch operations. Layouts: hidden and out (batch * L, d_model) rows; weights as
// nn.Linear / nn.Conv1d store them; A_log (d, N); the optional outputs delta (batch * L, d), dbc
// (batch * L, R + 2N) (x_proj's output: dt, B, C side by side) and delta_mean (batch * L,).

// gemm_ of the Fortran BLAS interface (sgemm_, dgemm_: column-major, 32-bit sizes)
template <typename T>
using Gemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                      const T*, const int*, const T*, T*, const int*);
using Sgemm = Gemm<float>;

// y = x w^T in row-major terms: x (rows, k) with rows ldx apart, w (n, k) with rows ldw apart, y (rows, n)
// with rows ldy apart; in column-major terms y^T = w x^T.
template <typename T>
void gemm_nt(Gemm<T> gemm, const T* x, int64_t ldx, const T* w, int64_t ldw, T* y, int64_t ldy, int64_t rows,
             int64_t n, int64_t k) {
  if (rows == 0 || n == 0) return;
  const int m_ = static_cast<int>(n), n_ = static_cast<int>(rows), k_ = static_cast<int>(k);
  const int lda = static_cast<int>(ldw), ldb = static_cast<int>(ldx), ldc = static_cast<int>(ldy);
  const T one = 1, zero = 0;
  gemm("T", "N", &m_, &n_, &k_, &one, w, &lda, x, &ldb, &zero, y, &ldc);
}

// A projection of at most kFewRows rows (a block of a merged model at batch 1 holds a few tokens) is bound
// by reading its weight, which a forward's blocks evict from the caches: sgemm_ reads a cold 768 x 192
// weight at 6-7 GB/s for one or two rows, few_rows reads it front to back, one row after the other, as
// the hardware prefetcher streams it (18 GB/s; four rows read side by side got 10-13 GB/s).
// A weight of fewer than kLargeWeight values stays in cache in a forward (the demo model's), where sgemm_ is
// as fast from 8 rows up: few_rows takes at most kFewRowsSmall rows of it, else up to kFewRows.
constexpr int64_t kFewRows = 12;
constexpr int64_t kFewRowsSmall = 4;
constexpr int64_t kLargeWeight = 65536;
constexpr int64_t kFewTask = 64;  // weight rows a task of few_rows takes

#if defined(MAMBAMERGE_AVX512)
// few_rows' vectors: 16 lanes, the tail of k loaded under a lane mask.
struct FewLanes {
  static constexpr int64_t kWidth = 16;
  using Vec = __m512;
  using Mask = __mmask16;
  static Mask mask(int64_t left) { return Mask((1u << left) - 1); }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static __m256 halves(Vec v) {  // lane i + lane i + 8
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
};
#elif defined(MAMBAMERGE_AVX2)
// few_rows' vectors: 8 lanes, the tail of k loaded with vmaskmovps (masked-off lanes are not read).
struct FewLanes {
  static constexpr int64_t kWidth = 8;
  using Vec = __m256;
  using Mask = __m256i;
  static Mask mask(int64_t left) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static __m256 halves(Vec v) { return v; }
};
#endif

// few_rows takes the product of rows x (k) with an (n, k) weight (it is built with AVX-512 or AVX2 and FMA).
inline bool few_rows_take(int64_t rows, int64_t n, int64_t k) {
#if defined(MAMBAMERGE_FEW_ROWS)
  return rows <= kFewRowsSmall || (rows <= kFewRows && n * k >= kLargeWeight);
#else
  return false;
#endif
}

#if defined(MAMBAMERGE_FEW_ROWS)

// The lane sums of v[0..3], in order: to 8 lanes, then two rounds of pairwise horizontal adds (a third of
// the instructions of four full reductions, which would cost as much as a 192-long dot product).
inline __m128 sums_of_4(const FewLanes::Vec* v) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(FewLanes::halves(v[0]), FewLanes::halves(v[1])),
                                  _mm256_hadd_ps(FewLanes::halves(v[2]), FewLanes::halves(v[3])));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// The lane sum of v.
inline float lane_sum(FewLanes::Vec v) {
  const __m256 h = FewLanes::halves(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// y[a][b] = x[a] . w[b] for MR rows of x (ldx apart) and NR rows of w (k apart, read one after the other),
// k in steps of FewLanes::kWidth, the last one masked; written to y (rows ldy apart).
template <int MR, int NR>
void few_tile(const float* x, int64_t ldx, const float* w, int64_t k, float* y, int64_t ldy) {
  using L = FewLanes;
  const int64_t full = k - k % L::kWidth;
  const L::Mask tail = L::mask(k - full);
  L::Vec acc[MR][NR];
  for (int b = 0; b < NR; ++b) {
    for (int a = 0; a < MR; ++a) acc[a][b] = L::zero();
    for (int64_t c = 0; c < full; c += L::kWidth) {
      const L::Vec wv = L::load(w + b * k + c);
      for (int a = 0; a < MR; ++a) acc[a][b] = L::fmadd(L::load(x + a * ldx + c), wv, acc[a][b]);
    }
    if (full < k) {
      const L::Vec wv = L::load(tail, w + b * k + full);
      for (int a = 0; a < MR; ++a) acc[a][b] = L::fmadd(L::load(tail, x + a * ldx + full), wv, acc[a][b]);
    }
  }
  for (int a = 0; a < MR; ++a) {
    if constexpr (NR == 4) {
      _mm_storeu_ps(y + a * ldy, sums_of_4(acc[a]));
    } else {
      for (int b = 0; b < NR; ++b) y[a * ldy + b] = lane_sum(acc[a][b]);
    }
  }
}

// few_tile for all `rows` (<= 4) rows of x against NR rows of w.
template <int NR>
void few_tiles(const float* x, int64_t ldx, const float* w, int64_t k, float* y, int64_t ldy, int64_t rows) {
  switch (rows) {
    case 4: return few_tile<4, NR>(x, ldx, w, k, y, ldy);
    case 3: return few_tile<3, NR>(x, ldx, w, k, y, ldy);
    case 2: return few_tile<2, NR>(x, ldx, w, k, y, ldy);
    default: return few_tile<1, NR>(x, ldx, w, k, y, ldy);
  }
}

// y = x w^T (as gemm_nt, w's rows k apart) for rows <= kFewRows, in tasks of kFewTask rows of w: 4 rows of
// w against up to 4 of x at a time, so each weight row is read from memory once and x stays in L1.
int few_rows(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t rows, int64_t n,
             int64_t k, int num_threads, ParallelLauncher launcher) {
  return run_tasks<float>((n + kFewTask - 1) / kFewTask, num_threads, launcher, 0, [&](int64_t task, float*) {
    const int64_t end = std::min(n, (task + 1) * kFewTask);
    for (int64_t j = task * kFewTask; j < end; j += 4) {
      for (int64_t i = 0; i < rows; i += 4) {
        const int64_t m = std::min<int64_t>(4, rows - i);
        if (end - j >= 4) {
          few_tiles<4>(x + i * ldx, ldx, w + j * k, k, y + i * ldy + j, ldy, m);
        } else {
          for (int64_t b = j; b < end; ++b) few_tiles<1>(x + i * ldx, ldx, w + b * k, k, y + i * ldy + b, ldy, m);
        }
      }
    }
  });
}
#endif

// gemm_nt with w an nn.Linear weight (n, k), rows k apart: a few rows on few_rows where it is built in,
// else on sgemm_. Returns 0, or 1 if a worker thread failed.
inline int linear(Sgemm sgemm, const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t rows,
                  int64_t n, int64_t k, int num_threads, ParallelLauncher launcher) {
#if defined(MAMBAMERGE_FEW_ROWS)
  if (few_rows_take(rows, n, k)) return few_rows(x, ldx, w, y, ldy, rows, n, k, num_threads, launcher);
#endif
  gemm_nt(sgemm, x, ldx, w, k, y, ldy, rows, n, k);
  return 0;
}

// gemm_bf16bf16f32_ of MKL's Fortran interface: as sgemm_ with bf16 matrices (uint16 bit patterns), float32
// alpha, beta and product, accumulated in float32 (AMX or AVX-512-BF16 where the CPU has them).
using GemmBf16 = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const uint16_t*,
                          const int*, const uint16_t*, const int*, const float*, float*, const int*);

// dst[0:n] = src[0:n] rounded to bf16, to nearest with ties to even (a NaN stays a quiet NaN), as torch's
// float32 -> bfloat16 conversion (vcvtneps2bf16 where the CPU has AVX-512-BF16).
inline void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t c = 0;
#if defined(__AVX512BF16__)
  for (; c + 16 <= n; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + c)));
#endif
  for (; c < n; ++c) {
    uint32_t bits;
    __builtin_memcpy(&bits, src + c, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    dst[c] = static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? (bits >> 16) | 0x40u : rounded);
  }
}

// The products of one mixer call: float32 on sgemm_ (and few_rows), or, with bf16gemm, in_proj, x_proj and
// out_proj on it for inputs and weights rounded to bf16 (their float32 products and everything between
// them unchanged). dt_proj (k = dt_rank, 6-12) stays float32: bf16 does not pay there and it feeds
// the step size. bf16 only past few_rows' rows, where the weight's read bounds the product.
struct Products {
  Sgemm sgemm;
  GemmBf16 bf16gemm;
  int num_threads;
  ParallelLauncher launcher;
  std::vector<uint16_t>& scratch;

  int operator()(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t rows, int64_t n,
                 int64_t k, bool may_round) const {
    if (!bf16gemm || !may_round || few_rows_take(rows, n, k) || rows == 0 || n == 0)
      return linear(sgemm, x, ldx, w, y, ldy, rows, n, k, num_threads, launcher);
    if (scratch.size() < static_cast<size_t>((rows + n) * k)) scratch.resize((rows + n) * k);
    uint16_t* xb = scratch.data();
    uint16_t* wb = xb + rows * k;
    int status = for_each_row<float>(rows + n, k, kConvChunk, num_threads, launcher, [&](int64_t row) {
      if (row < rows) {
        to_bf16(x + row * ldx, xb + row * k, k);
      } else {
        to_bf16(w + (row - rows) * k, wb + (row - rows) * k, k);
      }
    });
    const int m_ = static_cast<int>(n), n_ = static_cast<int>(rows), k_ = static_cast<int>(k);
    const int ldc = static_cast<int>(ldy);
    const float one = 1, zero = 0;
    bf16gemm("T", "N", &m_, &n_, &k_, &one, wb, &k_, xb, &k_, &zero, y, &ldc);
    return status;
  }
};

struct MixerBranch {
  const float* conv_weight;  // (d, 1, K)
  const float* conv_bias;    // (d,)
  const float* x_proj;       // (R + 2N, d)
  const float* dt_proj;      // (d, R)
  const float* dt_bias;      // (d,)
  const float* D;            // (d,)
  int64_t reverse;
  float* delta;       // out (batch * L, d), or null
  float* dbc;         // out (batch * L, R + 2N), or null
  float* delta_mean;  // out (batch * L,), or null
};

struct MixerScan {
  const float* a_log;  // (d, N)
  int64_t branch;
  int64_t reverse;
};

// Every field is 8 bytes (the caller fills the struct as an array of 64-bit words, in this order).
struct MixerProblem {
  const float* hidden;    // (batch * L, d_model)
  const float* residual;  // (batch * L, d_model), or null: none yet (the first block)
  const float* norm;      // RMSNorm weight (d_model,), or null: hidden is the mixer's input as it is
  float* residual_out;    // (batch * L, d_model): residual + hidden (with a norm)
  const float* in_proj;   // (2d, d_model)
  const float* out_proj;  // (d_model, d)
  float* out;             // (batch * L, d_model)
  int64_t batch, length, d_model, d_inner, d_state, dt_rank, k_size, n_branches, n_scans, halve;
  MixerBranch branches[2];
  MixerScan scans[2];
};

// residual_out = residual + hidden and normed = its RMSNorm, row by row.
int add_rms_norm(const MixerProblem& p, float eps, float* normed, int num_threads, ParallelLauncher launcher) {
  const int64_t C = p.d_model;
  return for_each_row<float>(p.batch * p.length, C, kConvChunk, num_threads, launcher, [&](int64_t row) {
    const float* h = p.hidden + row * C;
    const float* r = p.residual ? p.residual + row * C : nullptr;
    float* x = p.residual_out + row * C;
    float* y = normed + row * C;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < C; ++c) {
      x[c] = r ? r[c] + h[c] : h[c];
      squares += x[c] * x[c];
    }
    const float scale = 1.0f / std::sqrt(squares / static_cast<float>(C) + eps);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) y[c] = x[c] * scale * p.norm[c];
  });
}

constexpr size_t kKeptScratch = size_t(1) << 24;  // 64 MB of float32

int mixer_forward(const MixerProblem& p, float eps, Sgemm sgemm, GemmBf16 bf16gemm, int num_threads,
                  ParallelLauncher launcher) {
  const int64_t rows = p.batch * p.length, d = p.d_inner, N = p.d_state, R = p.dt_rank, W = R + 2 * N;
  const int64_t K = p.k_size, nb = p.n_branches, ns = p.n_scans;
  // One scratch per thread, kept between calls (a forward's blocks reuse it) up to kKeptScratch values.
  // Every buffer in it starts on a cache line, as torch's tensors do, so that an AVX-512 load of a row
  // stays inside one line: the start is aligned and each of the at most 15 buffers rounded up to kLine.
  constexpr int64_t kLine = 16;
  thread_local std::vector<float> scratch;
  const size_t need = rows * (p.d_model + 2 * d + nb * (2 * d + W) + ns * d + d) + ns * N * d + nb * K * d +
                      16 * kLine;
  thread_local std::vector<uint16_t> rounded;  // bf16 copies of a product's input and weight
  if (scratch.size() < need) scratch.resize(need);
  struct Release {
    std::vector<float>& buffer;
    std::vector<uint16_t>& rounded;
    ~Release() {
      if (buffer.size() > kKeptScratch) std::vector<float>().swap(buffer);
      if (rounded.size() > kKeptScratch) std::vector<uint16_t>().swap(rounded);
    }
  } release{scratch, rounded};
  const Products product{sgemm, bf16gemm, num_threads, launcher, rounded};
  const uintptr_t base = reinterpret_cast<uintptr_t>(scratch.data());
  float* next = scratch.data() + ((kLine - (base / sizeof(float)) % kLine) % kLine);
  int status = 0;
  auto take = [&](int64_t n) {
    float* at = next;
    next += (n + kLine - 1) / kLine * kLine;
    return at;
  };
  const float* input = p.hidden;
  if (p.norm) {
    float* normed = take(rows * p.d_model);
    status |= add_rms_norm(p, eps, normed, num_threads, launcher);
    input = normed;
  }
  float* xz = take(rows * 2 * d);
  status |= product(input, p.d_model, p.in_proj, xz, 2 * d, rows, 2 * d, p.d_model, true);
  float* u[2];
  float* delta[2];
  float* dbc[2];
  for (int64_t i = 0; i < nb; ++i) {
    const MixerBranch& br = p.branches[i];
    float* w = take(K * d);  // (K, d): a tap's weights side by side
    for (int64_t c = 0; c < d; ++c)
      for (int64_t k = 0; k < K; ++k) w[k * d + c] = br.conv_weight[c * K + k];
    u[i] = take(rows * d);
    float* delta_scratch = take(rows * d);
    float* dbc_scratch = take(rows * W);
    delta[i] = br.delta ? br.delta : delta_scratch;
    dbc[i] = br.dbc ? br.dbc : dbc_scratch;
    status |= conv_silu<float>(xz, w, br.conv_bias, u[i], p.batch, p.length, d, 2 * d, K, br.reverse != 0,
                               num_threads, launcher);
    status |= product(u[i], d, br.x_proj, dbc[i], W, rows, W, d, true);
    status |= product(dbc[i], W, br.dt_proj, delta[i], d, rows, d, R, false);
    status |= softplus<float>(delta[i], br.dt_bias, delta[i], br.delta_mean, rows, d, num_threads, launcher);
  }
  float* y[2] = {nullptr, nullptr};
  for (int64_t s = 0; s < ns; ++s) {
    const MixerScan& sc = p.scans[s];
    const int64_t i = sc.branch;
    float* At = take(N * d);
    for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) At[n * d + c] = -vexp(sc.a_log[c * N + n]);
    }
    y[s] = take(rows * d);
    const Problem<float> scan{u[i], delta[i], At, dbc[i] + R, dbc[i] + R + N, p.branches[i].D, p.batch,
                              p.length, d, N, sc.reverse != 0, W};
    status |= scan_forward(scan, y[s], num_threads, launcher);
  }
  float* gated = take(rows * d);
  status |= gate<float>(y[0], y[1], xz + d, gated, rows, d, 2 * d, p.halve != 0, num_threads, launcher);
  status |= product(gated, d, p.out_proj, p.out, p.d_model, rows, p.d_model, d, true);
  return status;
}

// Choosing the tokens of a merge step at inference, one call per step (mambamerge.merge: matching.py,
// tome.py, stm.py hold the differentiable torch versions these are tested against). Each writes src
// (batch, r), the tokens that leave, and dst (batch, r), the token each joins; features (batch, L, D)
// are compared by cosine similarity, their dot products on the BLAS gemm_ whose address is passed in.
// Orderings follow torch's max and topk: a NaN ranks above every number, ties go to the lower index.

template <typename T>
inline bool ranks_above(T a, T b) {
  return a > b || (std::isnan(a) && !std::isnan(b));
}

// norms[j] = max(||x_j||, 1e-12) for the L rows of x (D values each): the F.normalize floor.
template <typename T>
void row_norms(const T* x, int64_t length, int64_t dim, T* norms) {
  for (int64_t j = 0; j < length; ++j) {
    const T* row = x + j * dim;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < dim; ++c) sum += row[c] * row[c];
    norms[j] = std::max(std::sqrt(sum), T(1e-12));
  }
}

// The first index of the largest row[j] / norms[j] over the j with open[j] != 0, or -1 if none is open
// (closed entries -inf). The row is overwritten with the quotients, in vector passes.
template <typename T>
int64_t first_largest(T* row, const T* norms, const T* open, int64_t n) {
  const T neg = -std::numeric_limits<T>::infinity();
  T top = neg;
  int64_t nans = 0;
#pragma omp simd reduction(max : top) reduction(+ : nans)
  for (int64_t j = 0; j < n; ++j) {
    const T v = open[j] != 0 ? row[j] / norms[j] : neg;
    row[j] = v;
    top = std::max(top, v);
    nans += v != v ? 1 : 0;
  }
  for (int64_t j = 0; j < n; ++j) {
    if (open[j] != 0 && (nans ? std::isnan(row[j]) : row[j] == top)) return j;
  }
  return -1;
}

// first_largest over the open j in [lo, hi) alone, row left as it is; -1 when none of them has a finite
// quotient (torch's most_similar then looks anywhere).
template <typename T>
int64_t first_largest_near(const T* row, const T* norms, const T* open, int64_t lo, int64_t hi) {
  int64_t best = -1, nan = -1;
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t j = lo; j < hi; ++j) {
    if (open[j] == 0) continue;
    const T v = row[j] / norms[j];
    if (std::isnan(v)) {
      nan = nan < 0 ? j : nan;
    } else if (std::isfinite(v) && (best < 0 || v > top)) {
      best = j;
      top = v;
    }
  }
  return best < 0 ? -1 : (nan >= 0 ? nan : best);
}

// order[0..k) = the indices of the k largest of score[0..n), largest first (k <= n); with `lowest`, of
// the k smallest, smallest first (a NaN then last).
template <typename T>
void top_k(const T* score, int64_t n, int64_t k, int64_t* order, bool lowest = false) {
  std::vector<int64_t> idx(n);
  for (int64_t i = 0; i < n; ++i) idx[i] = i;
  auto before = [&](int64_t a, int64_t b) {
    return lowest ? ranks_above(score[b], score[a]) : ranks_above(score[a], score[b]);
  };
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int64_t a, int64_t b) {
    if (before(a, b)) return true;
    if (before(b, a)) return false;
    return a < b;
  });
  std::copy(idx.begin(), idx.begin() + k, order);
}

// MaMe's sources and their match (most_similar without a cap). The tokens outside the class token's window
// of `width` (cls null: no class token, no window) give r sources: with `least`, the r lowest-scoring
// (score (batch, L), lowest first: the topk of MaMe._sources); else one of each of r equal runs, the
// first (score null: matching.uniform_sources) or the lowest-scoring, the first among ties
// (spread_sources). Each joins its most similar token outside the window that does not leave: within
// `reach` positions of it where one such token has a finite similarity (reach 0: anywhere).
template <typename T>
int select_mame(const T* feat, const int64_t* cls, const float* score, int64_t* src, int64_t* dst, Gemm<T> gemm,
                int64_t batch, int64_t length, int64_t dim, int64_t width, int64_t reach, int64_t r, bool least,
                int num_threads, ParallelLauncher launcher) {
  const size_t scratch = r * dim + r * length + 2 * length;
  return run_tasks<T>(batch, num_threads, launcher, scratch, [&](int64_t b, T* buf) {
    const T* x = feat + b * length * dim;
    int64_t* s = src + b * r;
    int64_t* d = dst + b * r;
    T *rows = buf, *dots = rows + r * dim, *norms = dots + r * length, *allowed = norms + length;
    int64_t start = 0, window = 0;
    if (cls) {
      start = std::max<int64_t>(cls[b] - width, 0);
      window = std::min<int64_t>(cls[b] + width + 1, length) - start;
    }
    for (int64_t j = 0; j < length; ++j) allowed[j] = (j < start || j >= start + window) ? 1 : 0;
    const int64_t n = length - window;
    auto token = [&](int64_t rank) { return rank < start ? rank : rank + window; };
    const float* key = score ? score + b * length : nullptr;
    if (least) {
      std::vector<float> eligible(n);
      for (int64_t rank = 0; rank < n; ++rank) eligible[rank] = key[token(rank)];
      top_k(eligible.data(), n, r, s, true);
      for (int64_t k = 0; k < r; ++k) s[k] = token(s[k]);
    } else {
      for (int64_t k = 0; k < r; ++k) {  // eligible token k' is in run floor(k' r / n): run k starts at ceil(k n / r)
        const int64_t first = (k * n + r - 1) / r, end = ((k + 1) * n + r - 1) / r;
        s[k] = token(first);
        for (int64_t rank = first + 1; key && rank < end; ++rank) {
          if (ranks_above(key[s[k]], key[token(rank)])) s[k] = token(rank);  // lower, or a number after a NaN
        }
      }
    }
    for (int64_t k = 0; k < r; ++k) {
      allowed[s[k]] = 0;
      std::copy(x + s[k] * dim, x + (s[k] + 1) * dim, rows + k * dim);
    }
    gemm_nt(gemm, rows, dim, x, dim, dots, length, r, length, dim);
    row_norms(x, length, dim, norms);
    for (int64_t k = 0; k < r; ++k) {
      T* row = dots + k * length;
      d[k] = reach ? first_largest_near(row, norms, allowed, std::max<int64_t>(s[k] - reach, 0),
                                        std::min<int64_t>(s[k] + reach + 1, length))
                   : -1;
      if (d[k] < 0) d[k] = first_largest(row, norms, allowed, length);
    }
  });
}

// ToMe's bipartite match (tome.bipartite_match without a scope): even tokens A, odd tokens B; each A token's
// best B token, the edge's score cos - penalty (of the A token); the r best edges, best first. protected
// (batch, L) marks tokens that neither leave nor receive; penalty (batch, L) or null.
template <typename T>
int select_bipartite(const T* feat, const uint8_t* protect, const T* penalty, int64_t* src, int64_t* dst,
                     Gemm<T> gemm, int64_t batch, int64_t length, int64_t dim, int64_t r, int num_threads,
                     ParallelLauncher launcher) {
  const int64_t n_a = (length + 1) / 2, n_b = length / 2;
  const size_t scratch = n_a * n_b + length + n_a + 2 * n_b;
  return run_tasks<T>(batch, num_threads, launcher, scratch, [&](int64_t b, T* buf) {
    const T* x = feat + b * length * dim;
    const uint8_t* shut = protect + b * length;
    T *dots = buf, *norms = dots + n_a * n_b, *score = norms + length, *norms_b = score + n_a, *open_b = norms_b + n_b;
    std::vector<int64_t> partner(n_a);
    gemm_nt(gemm, x, 2 * dim, x + dim, 2 * dim, dots, n_b, n_a, n_b, dim);
    row_norms(x, length, dim, norms);
    for (int64_t j = 0; j < n_b; ++j) {
      norms_b[j] = norms[2 * j + 1];
      open_b[j] = shut[2 * j + 1] == 0 ? 1 : 0;
    }
    for (int64_t i = 0; i < n_a; ++i) {
      T* row = dots + i * n_b;
      const int64_t j = first_largest(row, norms_b, open_b, n_b);
      partner[i] = std::max<int64_t>(j, 0);
      const T best = j < 0 ? -std::numeric_limits<T>::infinity() : row[j];
      score[i] = best / norms[2 * i] - (penalty ? penalty[b * length + 2 * i] : T(0));
      if (shut[2 * i]) score[i] = -std::numeric_limits<T>::infinity();
    }
    int64_t* s = src + b * r;
    top_k(score, n_a, r, s);
    for (int64_t k = 0; k < r; ++k) {
      dst[b * r + k] = 2 * partner[s[k]] + 1;
      s[k] *= 2;
    }
  });
}

// STM's adjacent pairs (stm.STM.plan with scope "free"): candidates at even distances k > w_protect on each
// side of the class token, each joining the more similar of its two neighbours (the inward one only outside
// the window), scored by that cosine minus fading * gamma^k; the best r_left on the left, best first, then
// the best r - r_left on the right. Returns 2 if a side has fewer candidates than it must give.
template <typename T>
int select_adjacent(const T* feat, const int64_t* cls, int64_t* src, int64_t* dst, int64_t batch, int64_t length,
                    int64_t dim, int64_t w_protect, int64_t r, double fading, double gamma, int num_threads,
                    ParallelLauncher launcher) {
  const T neg = -std::numeric_limits<T>::infinity();
  const int64_t k0 = w_protect + 1 + (w_protect + 1) % 2;
  const int64_t n_k = k0 < length ? (length - 1 - k0) / 2 + 1 : 0;
  const size_t scratch = 2 * length + 1 + 2 * n_k;
  std::atomic<bool> short_side{false};
  const int status = run_tasks<T>(batch, num_threads, launcher, scratch, [&](int64_t b, T* buf) {
    const T* x = feat + b * length * dim;
    T *norms = buf, *sims = norms + length, *score = sims + length + 1;
    row_norms(x, length, dim, norms);
    sims[0] = sims[length] = neg;  // sims[t] = cos(t - 1, t)
    for (int64_t t = 1; t < length; ++t) {
      const T *p = x + (t - 1) * dim, *q = x + t * dim;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < dim; ++c) dot += p[c] * q[c];
      const T cos = dot / (norms[t - 1] * norms[t]);
      sims[t] = std::isnan(cos) ? T(-1) : std::isinf(cos) ? (cos > 0 ? T(1) : T(-1)) : cos;  // torch's nan_to_num
    }
    std::vector<int64_t> target(2 * n_k), ranked(n_k);
    int64_t usable[2] = {0, 0};
    for (int64_t side = 0; side < 2; ++side) {
      const int64_t step = side == 0 ? -1 : 1;  // outward
      for (int64_t i = 0; i < n_k; ++i) {
        const int64_t k = k0 + 2 * i, at = cls[b] + step * k;
        const int64_t t = std::min(std::max<int64_t>(at, 0), length - 1);
        T inward = side == 0 ? sims[t + 1] : sims[t];
        const T outward = side == 0 ? sims[t] : sims[t + 1];
        if (k - 1 <= w_protect) inward = neg;
        T v = std::max(inward, outward);
        if (fading != 0) v -= static_cast<T>(static_cast<float>(fading * std::pow(gamma, k)));
        if (at < 0 || at >= length) v = neg;
        score[side * n_k + i] = v;
        target[side * n_k + i] = at + (outward > inward ? step : -step);
        usable[side] += std::isfinite(v) ? 1 : 0;
      }
    }
    const int64_t left = cls[b] == 0 ? 0 : r / 2 + (r % 2) * (2 * cls[b] > length - 1 ? 1 : 0);
    const int64_t counts[2] = {left, r - left};
    int64_t* s = src + b * r;
    int64_t* d = dst + b * r;
    for (int64_t side = 0, out = 0; side < 2; ++side) {
      if (counts[side] > usable[side]) {
        short_side = true;
        return;
      }
      top_k(score + side * n_k, n_k, counts[side], ranked.data());
      for (int64_t i = 0; i < counts[side]; ++i, ++out) {
        const int64_t c = side * n_k + ranked[i];
        s[out] = cls[b] + (side == 0 ? -1 : 1) * (k0 + 2 * ranked[i]);
        d[out] = target[c];
      }
    }
  });
  return status != 0 ? status : (short_side ? 2 : 0);
}

#define MM_SCAN_ENTRY_POINTS(T, SUFFIX)                                                         \
  extern "C" int mm_scan_forward_##SUFFIX(const T* u, const T* delta, const T* At, const T* B,  \
                                          const T* C, const T* D, T* y, int64_t batch,          \
                                          int64_t length, int64_t d, int64_t n_state,           \
                                          int reverse, int num_threads,                         \
                                          ParallelLauncher launcher) {                          \
    const Problem<T> p{u, delta, At, B, C, D, batch, length, d, n_state, reverse != 0, n_state}; \
    return scan_forward(p, y, num_threads, launcher);                                           \
  }                                                                                             \
  extern "C" int mm_scan_backward_##SUFFIX(                                                     \
      const T* u, const T* delta, const T* At, const T* B, const T* C, const T* D, const T* dy, \
      T* du, T* ddelta, T* dA, T* dB, T* dC, T* dD, int64_t batch, int64_t length, int64_t d,   \
      int64_t n_state, int reverse, int num_threads, ParallelLauncher launcher) {               \
    const Problem<T> p{u, delta, At, B, C, D, batch, length, d, n_state, reverse != 0, n_state}; \
    const Grads<T> g{dy, du, ddelta, dA, dB, dC, dD};                                           \
    return scan_backward(p, g, num_threads, launcher);                                          \
  }                                                                                             \
  extern "C" int mm_softplus_##SUFFIX(const T* x, T* y, T* row_mean, int64_t rows,              \
                                      int64_t row_len, int num_threads,                         \
                                      ParallelLauncher launcher) {                              \
    return softplus(x, static_cast<const T*>(nullptr), y, row_mean, rows, row_len, num_threads,  \
                    launcher);                                                                  \
  }                                                                                             \
  extern "C" int mm_conv_silu_##SUFFIX(const T* x, const T* w, const T* bias, T* y, int64_t batch,    \
                                       int64_t length, int64_t channels, int64_t x_stride,           \
                                       int64_t k_size, int reverse, int num_threads,                 \
                                       ParallelLauncher launcher) {                                  \
    return conv_silu(x, w, bias, y, batch, length, channels, x_stride, k_size, reverse != 0,       \
                     num_threads, launcher);                                                         \
  }                                                                                             \
  extern "C" int mm_gate_##SUFFIX(const T* y, const T* y2, const T* z, T* out, int64_t rows,          \
                                  int64_t channels, int64_t z_stride, int halve, int num_threads,    \
                                  ParallelLauncher launcher) {                                       \
    return gate(y, y2, z, out, rows, channels, z_stride, halve != 0, num_threads, launcher);        \
  }                                                                                             \
  extern "C" int mm_merge_apply_##SUFFIX(                                                       \
      const T* residual, const T* hidden, const int64_t* rep, const int64_t* assign,            \
      const int64_t* movers, const int64_t* targets, const T* weight, const float* size, T* out, \
      float* size_out, int64_t batch, int64_t length, int64_t new_length, int64_t m,           \
      int64_t channels, int mean, int num_threads, ParallelLauncher launcher) {                 \
    const MergeProblem<T> p{residual, hidden, rep,    assign, movers,     targets, weight,      \
                            size,     batch,  length, new_length, m, channels, mean != 0};      \
    return merge_apply(p, out, size_out, num_threads, launcher);                                \
  }

MM_SCAN_ENTRY_POINTS(float, f32)
MM_SCAN_ENTRY_POINTS(double, f64)

#define MM_SELECT_ENTRY_POINTS(T, SUFFIX)                                                            \
  extern "C" int mm_select_mame_##SUFFIX(const T* feat, const int64_t* cls, const float* score,          \
                                         int64_t* src, int64_t* dst, Gemm<T> gemm, int64_t batch,        \
                                         int64_t length, int64_t dim, int64_t width, int64_t reach,      \
                                         int64_t r, int least, int num_threads,                          \
                                         ParallelLauncher launcher) {                                    \
    return select_mame(feat, cls, score, src, dst, gemm, batch, length, dim, width, reach, r, least != 0, \
                       num_threads, launcher);                                                       \
  }                                                                                                  \
  extern "C" int mm_select_bipartite_##SUFFIX(const T* feat, const uint8_t* protect, const T* penalty, \
                                              int64_t* src, int64_t* dst, Gemm<T> gemm, int64_t batch, \
                                              int64_t length, int64_t dim, int64_t r, int num_threads, \
                                              ParallelLauncher launcher) {                           \
    return select_bipartite(feat, protect, penalty, src, dst, gemm, batch, length, dim, r, num_threads, \
                            launcher);                                                               \
  }                                                                                                  \
  extern "C" int mm_select_adjacent_##SUFFIX(const T* feat, const int64_t* cls, int64_t* src, int64_t* dst, \
                                             int64_t batch, int64_t length, int64_t dim,             \
                                             int64_t w_protect, int64_t r, double fading, double gamma, \
                                             int num_threads, ParallelLauncher launcher) {           \
    return select_adjacent(feat, cls, src, dst, batch, length, dim, w_protect, r, fading, gamma,   \
                           num_threads, launcher);                                                   \
  }

MM_SELECT_ENTRY_POINTS(float, f32)
MM_SELECT_ENTRY_POINTS(double, f64)

extern "C" int mm_mixer_forward(const MixerProblem* p, double eps, Sgemm sgemm, GemmBf16 bf16gemm, int num_threads,
                                ParallelLauncher launcher) {
  try {
    return mixer_forward(*p, static_cast<float>(eps), sgemm, bf16gemm, num_threads, launcher);
  } catch (...) {  // the scratch could not grow
    return 1;
  }
}

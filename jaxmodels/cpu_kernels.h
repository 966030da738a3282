// What the CPU decode kernels share (`cpu_matvec.cc`, `cpu_attention.cc`): a register of float32
// lanes with loads that widen float32 / bf16 / int8 into it (AVX-512, AVX2, else scalar lanes the
// compiler may vectorize; built with -march=native), a vector exp, and a parallel loop on XLA's
// intra-op threads.

#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace jaxmodels_cpu {

namespace ffi = xla::ffi;

// One stored element as float32 (row tails, and the scalar path's lanes).
inline float widen(float v) { return v; }
inline float widen(uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float widen(int8_t v) { return float(v); }

// One register of float32 lanes, and loads that widen each stored format into it.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
typedef __m512 fvec;
inline fvec zero() { return _mm512_setzero_ps(); }
inline fvec fma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
inline fvec splat(float s) { return _mm512_set1_ps(s); }
inline float hsum(fvec v) { return _mm512_reduce_add_ps(v); }
inline fvec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, fvec v) { _mm512_storeu_ps(p, v); }
inline fvec vmax(fvec a, fvec b) { return _mm512_max_ps(a, b); }
inline fvec round_nearest(fvec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline fvec times_pow2(fvec v, fvec n) { return _mm512_scalef_ps(v, n); }
inline fvec load(const uint16_t* p) {  // bf16 -> float32: the 16 bits become the high half
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline fvec load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void load_pairs(const uint16_t* p, fvec& even, fvec& odd) {  // see the comment after #endif
  __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
typedef __m256 fvec;
inline fvec zero() { return _mm256_setzero_ps(); }
inline fvec fma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
inline fvec splat(float s) { return _mm256_set1_ps(s); }
inline float hsum(fvec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
inline fvec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, fvec v) { _mm256_storeu_ps(p, v); }
inline fvec vmax(fvec a, fvec b) { return _mm256_max_ps(a, b); }
inline fvec round_nearest(fvec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline fvec times_pow2(fvec v, fvec n) {  // n integral in [-126, 127]: 2^n built in the exponent bits
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(v, _mm256_castsi256_ps(e));
}
inline fvec load(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline fvec load(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void load_pairs(const uint16_t* p, fvec& even, fvec& odd) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
}
#else  // any other CPU: scalar lanes, vectorized by the compiler where it can
constexpr int kLanes = 1;
typedef float fvec;
inline fvec zero() { return 0.0f; }
inline fvec fma(fvec a, fvec b, fvec c) { return a * b + c; }
inline fvec splat(float s) { return s; }
inline float hsum(fvec v) { return v; }
inline void store(float* p, fvec v) { *p = v; }
inline fvec vmax(fvec a, fvec b) { return std::max(a, b); }
inline fvec round_nearest(fvec v) { return std::nearbyint(v); }
inline fvec times_pow2(fvec v, fvec n) { return std::ldexp(v, int(n)); }
template <typename W>
inline fvec load(const W* p) { return widen(*p); }
inline void load_pairs(const uint16_t* p, fvec& even, fvec& odd) { even = widen(p[0]); odd = widen(p[1]); }
#endif

// load_pairs(p, even, odd): 2 * kLanes bf16 from p as two registers, the elements at even offsets
// and those at odd ones. Each 32-bit lane holds a pair; a shift and a mask widen both halves of one
// load, where `load` widens half as many through a lane-crossing shuffle and a shift. Fewer
// instructions per byte keep more loads in flight: on a 2-core EPYC, SmolLM2's 210 bf16 layer
// matmuls at batch 1 in a jitted loop ran 9% faster (median of 15 interleaved rounds, 0.96-1.21x;
// +11% at 8 rows); in a C++ loop of the same calls at a moment of high bandwidth, 47 GB/s of bf16
// against 34 (float32: 44).

// e^x for x <= 0 (softmax's scores minus their max), to about one float32 ulp: x = n ln2 + r with
// |r| <= ln2 / 2, e^r by its Taylor series to r^7 (remainder under 1e-8), times 2^n. Below -87
// the result is e^-87 (1.6e-38), not 0: beside a softmax's largest term, 1, nothing can tell.
inline fvec exp_nonpositive(fvec x) {
  x = vmax(x, splat(-87.0f));
  fvec n = round_nearest(x * splat(1.44269504f));
  fvec r = fma(n, splat(-0.693359375f), x);  // ln2 in two parts (Cody and Waite): r exact enough
  r = fma(n, splat(2.12194440e-4f), r);
  fvec p = splat(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = fma(p, r, splat(c));
  return times_pow2(p, n);
}

inline void pause() {  // a spin-wait hint; the wait is short (the helpers' last chunk)
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// The cores this process may run on. XLA's intra-op pool can hold more threads than that; a task
// per pool thread then oversubscribes the cores, and decoding SmolLM2 in bf16 ran 2.3x slower.
inline int64_t usable_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// The fewest bytes worth a task of their own. Handing a task to a pool thread costs a wake-up, and
// under load a helper that claimed a task may wait for a core while the caller waits for it; a call
// with under twice this many bytes runs on the calling thread alone.
#ifndef JAXMODELS_MIN_CHUNK_BYTES
#define JAXMODELS_MIN_CHUNK_BYTES (64 << 10)
#endif

// How many pool threads to wake for `tasks` tasks reading `bytes` in all: none under twice
// JAXMODELS_MIN_CHUNK_BYTES, never more than the usable cores (the caller is one of them).
inline int64_t helpers_for(const ffi::ThreadPool& pool, int64_t tasks, int64_t bytes) {
  static const int64_t cores = usable_cores();
  int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, cores);
  int64_t worth = std::max<int64_t>(1, bytes / JAXMODELS_MIN_CHUNK_BYTES);
  return std::max<int64_t>(0, std::min({threads, tasks, worth}) - 1);
}

// task(i) for i in [0, tasks), claimed one at a time by the calling thread and `helpers` tasks on
// XLA's intra-op pool. The caller waits only for tasks already claimed, so a helper that starts
// late finds nothing left and a busy pool cannot deadlock the call; the shared state outlives the
// call for such late helpers (which never call `task` then: it may refer to the caller's frame).
template <typename Task>
void parallel_for(ffi::ThreadPool& pool, int64_t tasks, int64_t helpers, Task task) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t tasks;
    Task task;
    State(int64_t n, Task t) : tasks(n), task(std::move(t)) {}
    void drain() {
      for (int64_t i; (i = next.fetch_add(1)) < tasks;) {
        task(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(tasks, std::move(task));
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state] { state->drain(); });
  state->drain();
  while (state->done.load(std::memory_order_acquire) < tasks) pause();
}

}  // namespace jaxmodels_cpu

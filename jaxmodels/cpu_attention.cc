// Cached attention for a few new tokens per row on CPU, reading only the keys each query sees.
//
// Decoding attends each new token to a row's cached keys. XLA's path (`jaxmodels.attention`)
// multiplies and masks the whole preallocated buffer as 6-8 separate ops per layer; on SmolLM2
// (batch 1, 2-core EPYC) those read at under a tenth of the memory bandwidth. Here one call per
// layer reads each (row, KV head)'s keys and values once, up to the last position a query of the
// row sees, for every query head of the group and every new token.
//
// q [B, T, H, hd], k and v [B*KV, S, hd] (the cache's layout: row b's KV head h at b*KV + h), all
// float32; positions [B, T] int32; out [B, T, H, hd]. Query head j reads KV head j / (H / KV); a
// query at position p sees cache slots 0..min(p, S - 1) (none if p < 0: zeros out).
//
// Each query's result is computed the same way, in the same order, whatever else is in the call:
// a token verified among d others gets the bits it gets decoded alone, and a row's result does
// not depend on the rows beside it.

#include <limits>
#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace jaxmodels_cpu;

constexpr int64_t kMaxHeadDim = 256;

struct Attention {
  const float* q; const float* k; const float* v; const int32_t* positions; float* out;
  int64_t batch, tokens, heads, kv_heads, slots, head_dim;
};

// q . k for every visible slot, times 1/sqrt(hd), into scores[0, visible); returns their max.
template <int V>  // registers per head (head_dim / kLanes) when known at compile time, else 0
float scores_of(const Attention& a, const float* q, const float* keys, int64_t visible, float* scores) {
  const int64_t vecs = V ? V : a.head_dim / kLanes;
  const float scale = float(1.0 / std::sqrt(double(a.head_dim)));
  fvec qv[kMaxHeadDim / kLanes];
  for (int64_t c = 0; c < vecs; ++c) qv[c] = load(q + c * kLanes);
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < visible; ++s) {
    const float* key = keys + s * a.head_dim;
    fvec dot = zero();
    for (int64_t c = 0; c < vecs; ++c) dot = fma(qv[c], load(key + c * kLanes), dot);
    scores[s] = hsum(dot) * scale;
    best = std::max(best, scores[s]);
  }
  return best;
}

// Softmax's numerators e^(score - best) in place over whole registers (padding set to 0); their sum.
float exponentiate(float* scores, int64_t visible, int64_t padded, float best) {
  fvec sum = zero();
  for (int64_t s = 0; s < padded; s += kLanes) {
    fvec e = exp_nonpositive(load(scores + s) - splat(best));
    store(scores + s, e);
  }
  for (int64_t s = visible; s < padded; ++s) scores[s] = 0.0f;
  for (int64_t s = 0; s < padded; s += kLanes) sum = sum + load(scores + s);
  return hsum(sum);
}

// out = sum_s weights[s] * values[s] / total, over the visible slots.
template <int V>
void mix(const Attention& a, const float* weights, const float* values, int64_t visible, float total, float* out) {
  const int64_t vecs = V ? V : a.head_dim / kLanes;
  fvec acc[kMaxHeadDim / kLanes];
  for (int64_t c = 0; c < vecs; ++c) acc[c] = zero();
  for (int64_t s = 0; s < visible; ++s) {
    fvec w = splat(weights[s]);
    const float* value = values + s * a.head_dim;
    for (int64_t c = 0; c < vecs; ++c) acc[c] = fma(w, load(value + c * kLanes), acc[c]);
  }
  fvec inv = splat(1.0f / total);
  for (int64_t c = 0; c < vecs; ++c) store(out + c * kLanes, acc[c] * inv);
}

// Every query of row b whose head reads KV head h: the group's heads times the row's tokens.
template <int V>
void attend_group(const Attention& a, int64_t b, int64_t h, std::vector<float>& scores) {
  const int64_t group = a.heads / a.kv_heads, hd = a.head_dim;
  const float* keys = a.k + (b * a.kv_heads + h) * a.slots * hd;
  const float* values = a.v + (b * a.kv_heads + h) * a.slots * hd;
  for (int64_t t = 0; t < a.tokens; ++t) {
    int64_t visible = std::clamp<int64_t>(int64_t(a.positions[b * a.tokens + t]) + 1, 0, a.slots);
    int64_t padded = (visible + kLanes - 1) / kLanes * kLanes;
    if (int64_t(scores.size()) < padded) scores.resize(padded);
    for (int64_t j = h * group; j < (h + 1) * group; ++j) {
      const int64_t at = ((b * a.tokens + t) * a.heads + j) * hd;
      if (visible == 0) {
        std::fill(a.out + at, a.out + at + hd, 0.0f);
        continue;
      }
      float best = scores_of<V>(a, a.q + at, keys, visible, scores.data());
      for (int64_t s = visible; s < padded; ++s) scores[s] = best;  // padding: e^0, then zeroed
      float total = exponentiate(scores.data(), visible, padded, best);
      mix<V>(a, scores.data(), values, visible, total, a.out + at);
    }
  }
}

ffi::Error decode_attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> positions,
                            ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), pd = positions.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || vd.size() != 3 || pd.size() != 2 || pd[0] != qd[0] ||
      pd[1] != qd[1] || kd[0] != vd[0] || kd[1] != vd[1] || kd[2] != qd[3] || vd[2] != qd[3] ||
      qd[0] < 1 || kd[0] % qd[0] || out->element_count() != q.element_count())
    return ffi::Error::InvalidArgument(
        "cpu decode attention: expected q [B, T, H, hd], k and v [B*KV, S, hd], positions [B, T]");
  int64_t kv = kd[0] / qd[0];
  if (kv < 1 || qd[2] % kv || qd[3] % kLanes || qd[3] > kMaxHeadDim)
    return ffi::Error::InvalidArgument(
        "cpu decode attention: heads must be a multiple of KV heads, head_dim a multiple of 16 up to 256");
  Attention a{q.typed_data(), k.typed_data(), v.typed_data(), positions.typed_data(), (*out).typed_data(),
              qd[0], qd[1], qd[2], kv, kd[1], qd[3]};
  if (a.tokens == 0 || a.heads == 0) return ffi::Error::Success();  // nothing to attend
  int64_t bytes = 0;  // keys and values read: each row's KV heads up to its furthest query
  for (int64_t b = 0; b < a.batch; ++b) {
    int64_t furthest = *std::max_element(a.positions + b * a.tokens, a.positions + (b + 1) * a.tokens);
    bytes += 2 * kv * std::clamp<int64_t>(furthest + 1, 0, a.slots) * a.head_dim * int64_t(sizeof(float));
  }
  int64_t tasks = a.batch * kv;
  parallel_for(pool, tasks, helpers_for(pool, tasks, bytes), [&a, kv](int64_t i) {
    thread_local std::vector<float> scores;
    if (a.head_dim == 64) {  // the common head sizes, unrolled; any other multiple of 16 runs the loop
      attend_group<64 / kLanes>(a, i / kv, i % kv, scores);
    } else if (a.head_dim == 128) {
      attend_group<128 / kLanes>(a, i / kv, i % kv, scores);
    } else {
      attend_group<0>(a, i / kv, i % kv, scores);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxmodels_decode_attention, decode_attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

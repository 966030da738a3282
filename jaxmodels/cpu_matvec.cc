// A few rows times an output-major weight on CPU: y[b, j] = scale[j] * sum_i x[b, i] * w[j, i],
// or with int8 scales per group of inputs, y[b, j] = sum_g scale[g, j] * sum_{i in g} x[b, i] * w[j, i].
//
// XLA:CPU multiplies bf16 and int8 weights by converting them to float32 first (and hoists that
// conversion out of a decode loop, so the loop reads float32 bytes). Decoding a few rows is bound by
// the bytes of weight read, so this kernel reads the stored bytes (float32, bf16 or int8), widens
// them to float32 in registers, and accumulates in float32: AVX-512 or AVX2 intrinsics, else scalar
// code the compiler may vectorize (`-march=native`, built by `jaxmodels.cpu_matvec`). Rows of w are
// split into chunks that XLA's intra-op threads claim.
//
// x [B, m] float32, w [n, m] (float32 / bf16 / int8), scale [G, n] float32 (G groups of m / G
// consecutive inputs; G = 1: one per output) or [0] (none), y [B, n].
// One call may apply several weights of one dtype to the same x: a (w, scale) pair and a y each.

#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace jaxmodels_cpu;

struct Problem {
  const float* x; const void* w; const float* scale; float* y;
  int64_t batch, m, n, groups;  // groups > 1: scale [groups, n], each over m / groups inputs
  const float* x_split = nullptr;  // bf16: x's rows, each as its m / 2 even elements then its odd ones
};

// x [B, m] as pair_tile reads it: each row's elements at even offsets, then those at odd offsets;
// 64-byte aligned (a vector load across two cache lines costs more), within `storage`.
const float* split_even_odd(const float* x, int64_t batch, int64_t m, std::vector<float>& storage) {
  storage.resize(batch * m + 16);
  float* out = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t k = 0; k < m / 2; ++k) {
      out[b * m + k] = x[b * m + 2 * k];
      out[b * m + m / 2 + k] = x[b * m + 2 * k + 1];
    }
  return out;
}

// Row j of w against batch rows [b0, b0 + NB): NB float32 accumulators.
template <typename W, int NB>
void tile(const Problem& p, int64_t j, int64_t b0) {
  const W* w = static_cast<const W*>(p.w) + j * p.m;
  const float* x = p.x + b0 * p.m;
  fvec acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = zero();
  int64_t i = 0;
  for (; i + kLanes <= p.m; i += kLanes) {
    fvec wv = load(w + i);
    for (int b = 0; b < NB; ++b) acc[b] = fma(wv, load(x + b * p.m + i), acc[b]);
  }
  for (int b = 0; b < NB; ++b) {
    float s = hsum(acc[b]);
    for (int64_t k = i; k < p.m; ++k) s += widen(w[k]) * x[b * p.m + k];
    p.y[(b0 + b) * p.n + j] = p.scale ? s * p.scale[j] : s;
  }
}

// Row j of w against batch rows [b0, b0 + NB), a scale per group of inputs: each group's sum in
// its own accumulators, then added times its scale (the group size is a multiple of kLanes).
template <typename W, int NB>
void grouped_tile(const Problem& p, int64_t j, int64_t b0) {
  const W* w = static_cast<const W*>(p.w) + j * p.m;
  const float* x = p.x + b0 * p.m;
  const int64_t size = p.m / p.groups;
  fvec acc[NB], part[NB];
  for (int b = 0; b < NB; ++b) acc[b] = zero();
  for (int64_t g = 0; g < p.groups; ++g) {
    for (int b = 0; b < NB; ++b) part[b] = zero();
    for (int64_t i = g * size; i < (g + 1) * size; i += kLanes) {
      fvec wv = load(w + i);
      for (int b = 0; b < NB; ++b) part[b] = fma(wv, load(x + b * p.m + i), part[b]);
    }
    fvec s = splat(p.scale[g * p.n + j]);
    for (int b = 0; b < NB; ++b) acc[b] = fma(part[b], s, acc[b]);
  }
  for (int b = 0; b < NB; ++b) p.y[(b0 + b) * p.n + j] = hsum(acc[b]);
}

// A bf16 row j against batch rows [b0, b0 + NB), its weights read in pairs (`load_pairs`: no
// shuffle) against x split into even and odd elements (m a multiple of 2 * kLanes). Each sum runs
// in the same order whatever NB: per 2 * kLanes inputs, the even products, then the odd ones.
template <int NB>
void pair_tile(const Problem& p, int64_t j, int64_t b0) {
  const uint16_t* w = static_cast<const uint16_t*>(p.w) + j * p.m;
  const float* x = p.x_split + b0 * p.m;
  const int64_t half = p.m / 2;
  fvec acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = zero();
  for (int64_t i = 0; i < p.m; i += 2 * kLanes) {
    fvec even, odd;
    load_pairs(w + i, even, odd);
    for (int b = 0; b < NB; ++b) {
      acc[b] = fma(even, load(x + b * p.m + i / 2), acc[b]);
      acc[b] = fma(odd, load(x + b * p.m + half + i / 2), acc[b]);
    }
  }
  for (int b = 0; b < NB; ++b) p.y[(b0 + b) * p.n + j] = p.scale ? hsum(acc[b]) * p.scale[j] : hsum(acc[b]);
}

template <typename W, int NB>
void any_tile(const Problem& p, int64_t j, int64_t b0) {
  if constexpr (std::is_same_v<W, uint16_t>)
    if (p.x_split && p.groups == 1) return pair_tile<NB>(p, j, b0);
  if (p.groups > 1) grouped_tile<W, NB>(p, j, b0); else tile<W, NB>(p, j, b0);
}

// Every batch row against w's rows [j0, j1), one weight row at a time (measured faster than
// several rows at once, SmolLM2's shapes on a 2-core AVX-512 EPYC), up to 8 batch rows per pass.
template <typename W>
void rows(const Problem& p, int64_t j0, int64_t j1) {
  int64_t b0 = 0;
  for (; b0 + 8 <= p.batch; b0 += 8)
    for (int64_t j = j0; j < j1; ++j) any_tile<W, 8>(p, j, b0);
  for (; b0 + 4 <= p.batch; b0 += 4)
    for (int64_t j = j0; j < j1; ++j) any_tile<W, 4>(p, j, b0);
  for (; b0 < p.batch; ++b0)
    for (int64_t j = j0; j < j1; ++j) any_tile<W, 1>(p, j, b0);
}

// Chunks of the weights' rows, claimed by the calling thread and by XLA's intra-op pool
// (`parallel_for`). Several weights applied to the same x (a layer's q, k and v; gate and up) share
// one call and one pool of chunks: SmolLM2's k and v (221 KB in bf16) cost as much in thread
// hand-offs as in reading, and one call for q, k and v took 1.03 ms against 1.94 ms as three (30
// layers, bf16, batch 1, 2-core EPYC). About one chunk per thread over all the parts' rows.
template <typename W>
void run(ffi::ThreadPool& pool, const std::vector<Problem>& parts) {
  int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, usable_cores());
  int64_t m = parts[0].m, n = 0;
  for (const Problem& p : parts) n += p.n;
  int64_t row_bytes = std::max<int64_t>(1, m * int64_t(sizeof(W)));
  int64_t min_rows = (JAXMODELS_MIN_CHUNK_BYTES + row_bytes - 1) / row_bytes;
  int64_t chunk = std::max<int64_t>({16, min_rows, ((n + threads - 1) / threads + 3) / 4 * 4});
  std::vector<int64_t> first{0};  // parts[k]'s chunks are [first[k], first[k + 1])
  for (const Problem& p : parts) first.push_back(first.back() + (p.n + chunk - 1) / chunk);
  int64_t chunks = first.back();
  parallel_for(pool, chunks, helpers_for(pool, chunks, n * row_bytes), [&](int64_t c) {
    size_t k = 0;
    while (c >= first[k + 1]) ++k;
    int64_t j0 = (c - first[k]) * chunk;
    rows<W>(parts[k], j0, std::min(parts[k].n, j0 + chunk));
  });
}

// x, then a (weight, scale) pair per part; a result y per part (see the file's comment for shapes).
template <ffi::DataType T, typename W>
ffi::Error matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                  ffi::RemainingRets rets) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || args.size() == 0 || args.size() != 2 * rets.size())
    return ffi::Error::InvalidArgument("cpu_matvec: expected x [B, m], then (w, scale) per weight, a y per weight");
  std::vector<Problem> parts;
  std::vector<float> storage;  // bf16 weights whose rows split into pairs of whole vectors: x split
  const float* x_split = std::is_same_v<W, uint16_t> && xd[1] % (2 * kLanes) == 0
                             ? split_even_odd(x.typed_data(), xd[0], xd[1], storage) : nullptr;
  for (size_t k = 0; k < rets.size(); ++k) {
    auto w = args.get<ffi::Buffer<T>>(2 * k);
    auto scale = args.get<ffi::Buffer<ffi::F32>>(2 * k + 1);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(k);
    if (!w.has_value() || !scale.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("cpu_matvec: a weight, scale or result has the wrong dtype");
    auto wd = w->dimensions(), yd = (*y)->dimensions();
    if (wd.size() != 2 || yd.size() != 2 || xd[1] != wd[1] || yd[0] != xd[0] || yd[1] != wd[0])
      return ffi::Error::InvalidArgument("cpu_matvec: expected x [B, m], w [n, m], y [B, n]");
    int64_t count = int64_t(scale->element_count()), groups = count / std::max<int64_t>(wd[0], 1);
    if (count != 0 && (count != groups * wd[0] || (groups > 1 && (wd[1] % groups || (wd[1] / groups) % kLanes))))
      return ffi::Error::InvalidArgument(
          "cpu_matvec: scale must be [G, n] with G dividing m into groups of a multiple of 16 inputs, or none");
    parts.push_back(Problem{x.typed_data(), w->untyped_data(), count ? scale->typed_data() : nullptr,
                            (*y)->typed_data(), xd[0], xd[1], wd[0], std::max<int64_t>(groups, 1),
                            x_split});
  }
  run<W>(pool, parts);
  return ffi::Error::Success();
}

// Rows of a table in its stored dtype: out[i] = table[clamp(ids[i], 0, V - 1)]. XLA:CPU gathers
// from a bf16 table through float32, and in a decode loop it hoisted the widening of the whole
// table out of the loop: a float32 copy of the embedding on every call. This reads only the rows.
ffi::Error take_rows(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids, ffi::Result<ffi::AnyBuffer> out) {
  auto td = table.dimensions(), od = out->dimensions();
  if (td.size() != 2 || od.size() != 2 || od[0] != int64_t(ids.element_count()) || od[1] != td[1] ||
      td[0] < 1 || out->element_type() != table.element_type())
    return ffi::Error::InvalidArgument(
        "cpu take_rows: expected table [V, D], ids [N], out [N, D] in the table's dtype");
  size_t row = size_t(td[1]) * ffi::ByteWidth(table.element_type());
  const char* src = static_cast<const char*>(table.untyped_data());
  char* dst = static_cast<char*>(out->untyped_data());
  for (int64_t i = 0; i < od[0]; ++i) {
    int64_t id = std::clamp<int64_t>(ids.typed_data()[i], 0, td[0] - 1);
    std::memcpy(dst + i * row, src + id * row, row);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxmodels_take_rows, take_rows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

#define JAXMODELS_MATVEC(name, T, W)                                                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (matvec<T, W>),                                           \
                                ffi::Ffi::Bind()                                                \
                                    .Ctx<ffi::ThreadPool>()                                     \
                                    .Arg<ffi::Buffer<ffi::F32>>()                               \
                                    .RemainingArgs()                                            \
                                    .RemainingRets());

JAXMODELS_MATVEC(jaxmodels_matvec_f32, ffi::F32, float)
JAXMODELS_MATVEC(jaxmodels_matvec_bf16, ffi::BF16, uint16_t)
JAXMODELS_MATVEC(jaxmodels_matvec_s8, ffi::S8, int8_t)

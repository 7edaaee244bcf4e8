// Fused MID-L eval forwards for rows with their own masks (batch-1 decode, a few tokens), called
// through the torch ops of kernels.py (midl::output_rows, midl::input_rows, midl::top_k_rows).
//
// Output side, per row x: h = V x, s = G h + c (|s| when gate_abs) and the light output U h + b; the k largest
// s by an O(out) branch-free selection; then y_i = W_i . x + b_i over the light output for those k.
// Dense layers at batch 1 are bound by reading W, so reading only k of its rows is the saving;
// stock torch (topk + index_select + GEMV) spends more on copies than it saves.
// Input side, per row x: s_j = |x_j| scale_j, the k largest s, then y = b + sum_sel x_j Wt_j + U V x_rest,
// with W stored transposed (Wt, (in, out)) so that each picked input's column is one contiguous row,
// in float32, bfloat16 or int8 (weight-only, a scale per output): widened in registers, summed in float32;
// where the CPU has AVX-512 BF16 / VNNI, two picked rows at a time by one dot-product instruction
// (bfloat16 x bfloat16, or int8 weights against the picked inputs rounded to int16).
// Loading the build registers these as the CPU kernels of the ops that kernels.py defines, so a
// call from torch (eager, compiled or exported graphs) reaches them with no Python in between.
// Only the headers used, not <torch/extension.h>: the build takes ~10 s instead of ~27 s.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/BFloat16.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // the paired AVX-512 loops; other CPUs build without them
#endif
#include <omp.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Below this many exact multiply-adds per call, waking a second thread costs more than it saves.
constexpr int64_t kParallelWork = 1 << 17;
// Rows per call: the neuron-major loop keeps each neuron's list of rows on the stack.
constexpr int64_t kMaxRows = 64;

// One chain reads a row of W as one sequential stream: faster here than split partial sums
// (measured), since the loop is bound by memory, not by the FMA latency.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// Four dot products a[q] . b[q] at once: four chains hide the FMA latency. Either side may repeat
// one pointer (four rows of W against one input, or one row against four inputs).
inline void dot4(const float* const a[4], const float* const b[4], int64_t n, float out[4]) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  const float *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = 0; j < n; ++j) {
    s0 += a0[j] * b0[j];
    s1 += a1[j] * b1[j];
    s2 += a2[j] * b2[j];
    s3 += a3[j] * b3[j];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

// A dot product of rank length (rows of G and U): the vector sum is halved in registers, where
// `omp simd` spills it and adds 16 lanes one by one (2.4x slower on 3072 rows of 32).
#if defined(__GNUC__)
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

template <typename V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float short_dot(const float* a, const float* b, int64_t n) {
  float tail = 0.f;
  for (int64_t j = n - n % 16; j < n; ++j) tail += a[j] * b[j];
  if (n < 16) return tail;
  v16 acc = load<v16>(a) * load<v16>(b);
  for (int64_t j = 16; j + 16 <= n; j += 16) acc += load<v16>(a + j) * load<v16>(b + j);
  const v8 half = load<v8>(&acc) + load<v8>(reinterpret_cast<const char*>(&acc) + 32);
  const v4 quarter = load<v4>(&half) + load<v4>(reinterpret_cast<const char*>(&half) + 16);
  return ((quarter[0] + quarter[2]) + (quarter[1] + quarter[3])) + tail;
}
#else
inline float short_dot(const float* a, const float* b, int64_t n) { return dot(a, b, n); }
#endif

// The selection's counting passes on 512-bit vectors where the CPU has them: gcc's -march=native
// prefers 256-bit ones, which made these passes 2x slower (memory-bound loops do not care).
#if defined(__GNUC__) && !defined(__clang__)
#define WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define WIDE_VECTORS
#endif

// Order-preserving map of a float to an unsigned key; NaN ranks above every number, as in torch.topk.
inline uint32_t rank_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return std::isnan(v) ? 0xFFFFFFFFu : u;
}

// The k indices of the largest s, ascending, in picked[0..k); ties at the k-th value are taken in
// index order. The k-th largest key is found bit by bit, one branch-free counting pass per bit
// (on fresh scores, a new token's, nth_element's unpredictable branches cost 5x more), stopping
// at the first bit where exactly k keys lie above: about 12 to 16 passes instead of 32 on real scores.
// keys and picked hold n entries each.
WIDE_VECTORS void top_k(const float* s, int64_t n, int64_t k, uint32_t* keys, int64_t* picked) {
  for (int64_t i = 0; i < n; ++i) keys[i] = rank_key(s[i]);
  uint32_t kth = 0;  // the largest t with at least k keys >= t, i.e. the k-th largest key
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t t = kth | (1u << bit);
    int32_t count = 0;  // 32-bit lanes: twice the 64-bit ones per vector (n < 2^31)
#pragma omp simd reduction(+ : count)
    for (int64_t i = 0; i < n; ++i) count += keys[i] >= t;
    if (count >= k) kth = t;
    if (count == k) break;  // exactly k keys are >= t: they are the k largest, whatever the lower bits
  }
  int64_t ties = k, m = 0, at_least = 0;
#pragma omp simd reduction(+ : at_least)
  for (int64_t i = 0; i < n; ++i) at_least += keys[i] >= kth;
  if (at_least == k) {  // no tie at the k-th value is split: one short dependency chain (3x faster)
    for (int64_t i = 0; i < n; ++i) {
      picked[m] = i;
      m += keys[i] >= kth;
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) ties -= keys[i] > kth;
  for (int64_t i = 0; i < n; ++i) {  // branch-free: always written, kept when `take` advances m
    const int64_t eq = keys[i] == kth, take = (keys[i] > kth) | (eq & (ties > 0));
    ties -= eq & take;
    picked[m] = i;
    m += take;
  }
}

// Static share [lo, hi) of n items for the calling thread of the team.
inline std::pair<int64_t, int64_t> my_share(int64_t n) {
  const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
  return {n * tid / nt, n * (tid + 1) / nt};
}

struct Layer {
  const float *W, *b, *V, *U, *G, *c;  // b is null without a bias
  int64_t in, out, r, k;
  bool gate_abs;
  float threshold;  // adaptive masks: the scores above it (NaN: exactly k per mask)
};

// Picks of one mask of n scores: k, or with a threshold the scores above it (at least one), as
// the layer's torch paths count them (a NaN score is not above it).
inline int64_t picks(const float* s, int64_t n, int64_t k, float threshold) {
  if (std::isnan(threshold)) return k;
  int64_t m = 0;
#pragma omp simd reduction(+ : m)
  for (int64_t i = 0; i < n; ++i) m += s[i] > threshold;
  return std::max<int64_t>(m, 1);
}

// y[i] = W_i . x + b_i for the listed rows, four at a time.
void exact_rows(const Layer& L, const float* x, const int64_t* rows, int64_t lo, int64_t hi, float* y) {
  int64_t t = lo;
  float acc[4];
  for (; t + 4 <= hi; t += 4) {
    const int64_t* p = rows + t;
    const float* ws[4] = {L.W + p[0] * L.in, L.W + p[1] * L.in, L.W + p[2] * L.in, L.W + p[3] * L.in};
    const float* xs[4] = {x, x, x, x};
    dot4(ws, xs, L.in, acc);
    for (int u = 0; u < 4; ++u) y[p[u]] = acc[u] + (L.b ? L.b[p[u]] : 0.f);
  }
  for (; t < hi; ++t) y[rows[t]] = dot(L.W + rows[t] * L.in, x, L.in) + (L.b ? L.b[rows[t]] : 0.f);
}

// One input, all in one parallel region: h; scores and light output in one sequential pass over
// the rows of G and U (reading all of U in order was faster than the unpicked half scattered);
// the selection; then each thread overwrites an even share of the picked rows with exact ones.
void one_row(const Layer& L, const float* x, float* y, int nt) {
  std::vector<float> h(L.r), s(L.out);
  std::vector<uint32_t> keys(L.out);
  std::vector<int64_t> picked(L.out);
  int64_t k = L.k;
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < L.r; ++j) h[j] = dot(L.V + j * L.in, x, L.in);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < L.out; ++i) {
      const float v = L.c[i] + (L.r ? short_dot(L.G + i * L.r, h.data(), L.r) : 0.f);
      s[i] = L.gate_abs ? std::abs(v) : v;
      y[i] = (L.r ? short_dot(L.U + i * L.r, h.data(), L.r) : 0.f) + (L.b ? L.b[i] : 0.f);
    }
#pragma omp single
    {
      k = picks(s.data(), L.out, L.k, L.threshold);
      top_k(s.data(), L.out, k, keys.data(), picked.data());
    }
    auto [lo, hi] = my_share(k);
    exact_rows(L, x, picked.data(), lo, hi, y);
  }
}

// Neuron i for the inputs that picked it: W_i read once, against up to four inputs at a time.
void exact_neuron(const Layer& L, int64_t i, const float* X, const int64_t* rows, int64_t m, float* Y) {
  const float* w = L.W + i * L.in;
  const float bias = L.b ? L.b[i] : 0.f;
  int64_t t = 0;
  float acc[4];
  for (; t + 4 <= m; t += 4) {
    const float* ws[4] = {w, w, w, w};
    const float* xs[4] = {X + rows[t] * L.in, X + rows[t + 1] * L.in, X + rows[t + 2] * L.in, X + rows[t + 3] * L.in};
    dot4(ws, xs, L.in, acc);
    for (int u = 0; u < 4; ++u) Y[rows[t + u] * L.out + i] = acc[u] + bias;
  }
  for (; t < m; ++t) Y[rows[t] * L.out + i] = dot(w, X + rows[t] * L.in, L.in) + bias;
}

// Gate scores (B, out) and the full light output (B, out): small GEMMs, which MKL does well once
// there are several rows.
std::pair<at::Tensor, at::Tensor> gate_and_light(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& down,
                                                 const at::Tensor& up, const at::Tensor& gate,
                                                 const at::Tensor& gate_bias, bool gate_abs) {
  const int64_t B = x.size(0), out = gate_bias.size(0);
  at::Tensor s, y;
  if (down.size(0) > 0) {
    const auto h = at::mm(x, down.t());
    s = at::addmm(gate_bias, h, gate.t());
    y = bias.numel() ? at::addmm(bias, h, up.t()) : at::mm(h, up.t());
  } else {  // rank 0: the score is c, and unpicked neurons output b alone (copies: both are written)
    s = gate_bias.expand({B, out}).clone(at::MemoryFormat::Contiguous);
    y = bias.numel() ? bias.expand({B, out}).clone(at::MemoryFormat::Contiguous) : at::zeros({B, out}, x.options());
  }
  if (gate_abs) s.abs_();
  return {s, y};
}

// Several inputs: the exact rows overwrite the light output, neuron-major, so each row of W is
// read once for all the inputs that picked it.
void few_rows(const Layer& L, const float* S, const float* X, int64_t B, float* Y, int nt) {
  std::vector<uint32_t> keys(B * L.out);
  std::vector<int64_t> picked(B * L.out);
  std::vector<uint8_t> mask(B * L.out, 0);
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t row = 0; row < B; ++row) {
      const int64_t o = row * L.out;
      const int64_t k = picks(S + o, L.out, L.k, L.threshold);
      top_k(S + o, L.out, k, keys.data() + o, picked.data() + o);
      for (int64_t t = 0; t < k; ++t) mask[o + picked[o + t]] = 1;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < L.out; ++i) {
      int64_t rows[kMaxRows], m = 0;
      for (int64_t row = 0; row < B; ++row)
        if (mask[row * L.out + i]) rows[m++] = row;
      exact_neuron(L, i, X, rows, m, Y);
    }
  }
}

// The kernel reads raw memory: float32 on the CPU, made contiguous here if it is not.
at::Tensor checked(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "midl kernel: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  return t.contiguous();
}

}  // namespace

// x (B, in) with B <= 64, weight W (out, in), bias b (out) or empty, down V (r, in), up U (out, r),
// gate G (out, r), gate_bias c (out): float32 on the CPU; gate_abs: the layer's uint8 flag; k picks
// per row, or with a threshold (not NaN) each row's scores above it. Returns y (B, out).
at::Tensor output_rows(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
                       const at::Tensor& down_in, const at::Tensor& up_in, const at::Tensor& gate_in,
                       const at::Tensor& gate_bias_in, const at::Tensor& gate_abs, int64_t k, double threshold) {
  // Float32 throughout: the small GEMMs below must not be recast by an enclosing autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto x = checked(x_in, "x"), weight = checked(weight_in, "weight"), bias = checked(bias_in, "bias");
  const auto down = checked(down_in, "light_down"), up = checked(up_in, "light_up");
  const auto gate = checked(gate_in, "gate_weight"), gate_bias = checked(gate_bias_in, "gate_bias");
  const int64_t B = x.size(0), in = x.size(1), out = weight.size(0), r = down.size(0);
  TORCH_CHECK(k >= 1 && k <= out, "output_rows: k must be in [1, ", out, "], got ", k);
  TORCH_CHECK(B >= 1 && B <= kMaxRows, "output_rows: 1 to ", kMaxRows, " rows per call, got ", B);
  const Layer L{weight.data_ptr<float>(), bias.numel() ? bias.data_ptr<float>() : nullptr,
                down.data_ptr<float>(),   up.data_ptr<float>(),
                gate.data_ptr<float>(),   gate_bias.data_ptr<float>(),
                in, out, r, k, gate_abs.item<uint8_t>() != 0, static_cast<float>(threshold)};
  const int nt = B * k * in < kParallelWork ? 1 : std::max(1, at::get_num_threads());
  if (B == 1) {
    auto y = at::empty({1, out}, x.options());
    one_row(L, x.data_ptr<float>(), y.data_ptr<float>(), nt);
    return y;
  }
  auto [s, y] = gate_and_light(x, bias, down, up, gate, gate_bias, L.gate_abs);
  few_rows(L, s.data_ptr<float>(), x.data_ptr<float>(), B, y.data_ptr<float>(), nt);
  return y;
}

// Indices (B, k), ascending, of the k largest scores of each row of s (B, n): the same set as
// torch.topk, in O(32 n) branch-free work per row.
at::Tensor top_k_rows(const at::Tensor& s_in, int64_t k) {
  const auto s = checked(s_in, "scores");
  const int64_t B = s.size(0), n = s.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "top_k_rows: k must be in [1, ", n, "], got ", k);
  auto idx = at::empty({B, k}, s.options().dtype(at::kLong));
  std::vector<uint32_t> keys(B * n);
  std::vector<int64_t> picked(B * n);
  const float* S = s.data_ptr<float>();
  int64_t* I = idx.data_ptr<int64_t>();
  const int nt = B * n < kParallelWork ? 1 : std::max(1, at::get_num_threads());
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t row = 0; row < B; ++row) {
    const int64_t o = row * n;
    top_k(S + o, n, k, keys.data() + o, picked.data() + o);
    std::copy(picked.data() + o, picked.data() + o + k, I + row * k);
  }
  return idx;
}

namespace {

// Scratch of the calling thread, grown on demand and then reused: no allocation per call.
template <typename T>
T* scratch(std::vector<T>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Storage types of the input side: float32, bfloat16 (its upper 16 bits, kept as uint16_t) and
// int8 (weight-only, one scale per output applied after the sum over picked inputs). Each is
// widened to float32 in registers; sums are float32 whatever the storage.
inline float widen(float v) { return v; }
inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void narrow(float v, float* out) { *out = v; }
inline void narrow(float v, uint16_t* out) { *out = c10::BFloat16(v).x; }  // round to nearest even

template <typename T>
inline float dot_t(const T* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += widen(a[j]) * b[j];
  return acc;
}
template <>
inline float dot_t<float>(const float* a, const float* b, int64_t n) { return dot(a, b, n); }
template <typename T>
inline float short_dot_t(const T* a, const float* b, int64_t n) { return dot_t(a, b, n); }
template <>
inline float short_dot_t<float>(const float* a, const float* b, int64_t n) { return short_dot(a, b, n); }

// TW: the type of Wt; TL: the type of x, y, the bias and the light path (float, or bf16 with bf16 weights).
template <typename TW, typename TL>
struct InputLayer {
  const TW* Wt;
  const TL *b, *V, *U;  // b is null without a bias
  const float *scale, *wscale;  // wscale: int8's scale per output, else null
  int64_t in, out, r, k;
  float threshold;  // adaptive masks: the scores above it (NaN: exactly k per row)
};

// y += sum_q x_{p_q} Wt_{p_q} over G picked inputs at once: one load and store of y per G rows
// of Wt, and G streams from memory in flight. From memory, G = 8 measured up to 5% faster than 4
// on 576x1536 (16 no faster again), and one row at a time 0.6-0.7x as fast. Software prefetching
// of the next rows (their first lines, or line by line alongside these) was measured no faster
// here, and slower on 44 KB rows: the hardware prefetcher follows.
template <int G, typename TW>
inline void axpy_rows(float* y, const TW* Wt, int64_t n, const int64_t* p, const float* x) {
  const TW* w[G];
  float a[G];
  for (int q = 0; q < G; ++q) {
    w[q] = Wt + p[q] * n;
    a[q] = x[p[q]];
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float v = y[j];
    for (int q = 0; q < G; ++q) v += a[q] * widen(w[q][j]);
    y[j] = v;
  }
}

template <typename TW>
inline void axpy(float* y, const TW* w, float a, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) y[o] += a * widen(w[o]);
}

// Pairs of picked rows in one instruction, where the CPU has it (AVX-512 BF16 for bfloat16 weights,
// AVX-512 VNNI for int8): two rows of Wt are interleaved in registers (unpacklo/hi of 16-bit
// lanes) and summed against the pair (x_a, x_b) by vdpbf16ps or vpdpwssd, 64 multiply-adds per
// instruction. Widening each weight to float32 and one FMA per weight (the generic loop) spent
// its time on the widening, not on reading memory. The interleave leaves the outputs of each
// 32-output block in the order paired_slot gives; the partial sums keep that order until the
// last step reads them back. Served when out is a multiple of 32 (every transformer shape here).
#if defined(__AVX512BW__) && (defined(__AVX512BF16__) || defined(__AVX512VNNI__))
#define MIDL_PAIRED 1
#endif

constexpr int64_t kPairBlock = 32;

// Where output o's partial sum lives under the paired paths.
inline int64_t paired_slot(int64_t o) {
  return (o & ~(kPairBlock - 1)) + ((o & 4) ? 16 : 0) + ((o >> 3) & 3) * 4 + (o & 3);
}

template <typename TW>
constexpr bool paired_storage() {
#if defined(MIDL_PAIRED) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<TW, uint16_t>) return true;
#endif
#if defined(MIDL_PAIRED) && defined(__AVX512VNNI__)
  if constexpr (std::is_same_v<TW, int8_t>) return true;
#endif
  return false;
}

#ifdef MIDL_PAIRED
// The upper 16 bits of a float32 that holds a bfloat16 value (the rows were widened from bfloat16).
inline uint32_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u >> 16;
}

// One pass over acc for P pairs of rows (w[2q], w[2q+1]) with their broadcast coefficient pairs xs[q].
template <int P, typename TW>
inline void pair_pass(float* acc, const TW* const* w, const __m512i* xs, int64_t out, __m512 scale,
                      const TW* const* next) {
  for (int64_t c = 0; c < out; c += kPairBlock) {
    if (next && (c * sizeof(TW)) % 64 == 0)
      for (int q = 0; q < 8; ++q) _mm_prefetch(reinterpret_cast<const char*>(next[q] + c), _MM_HINT_T0);
    if constexpr (std::is_same_v<TW, uint16_t>) {
#ifdef __AVX512BF16__
      __m512 lo = _mm512_loadu_ps(acc + c), hi = _mm512_loadu_ps(acc + c + 16);
      for (int q = 0; q < P; ++q) {
        const __m512i a = _mm512_loadu_si512(w[2 * q] + c), b = _mm512_loadu_si512(w[2 * q + 1] + c);
        lo = _mm512_dpbf16_ps(lo, (__m512bh)_mm512_unpacklo_epi16(a, b), (__m512bh)xs[q]);
        hi = _mm512_dpbf16_ps(hi, (__m512bh)_mm512_unpackhi_epi16(a, b), (__m512bh)xs[q]);
      }
      _mm512_storeu_ps(acc + c, lo);
      _mm512_storeu_ps(acc + c + 16, hi);
#endif
    } else {
#ifdef __AVX512VNNI__
      __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
      for (int q = 0; q < P; ++q) {
        const __m512i a = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[2 * q] + c)));
        const __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[2 * q + 1] + c)));
        lo = _mm512_dpwssd_epi32(lo, _mm512_unpacklo_epi16(a, b), xs[q]);
        hi = _mm512_dpwssd_epi32(hi, _mm512_unpackhi_epi16(a, b), xs[q]);
      }
      _mm512_storeu_ps(acc + c, _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), scale, _mm512_loadu_ps(acc + c)));
      _mm512_storeu_ps(acc + c + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), scale, _mm512_loadu_ps(acc + c + 16)));
#endif
    }
  }
}

// acc (paired slots) += sum over the n picked rows p of x_p Wt_p, four pairs per pass over acc
// (an odd last row pairs with itself at coefficient 0). int8: the picked inputs are rounded to
// int16 with one scale (their largest magnitude over 32767; 8 pairs of int8 x int16 products fit
// in int32 exactly), so the error is below float32 widening's rounding of the weights' scale.
template <typename TW>
inline void pair_rows(float* acc, const TW* Wt, int64_t out, const int64_t* p, int64_t n, const float* x) {
  float step = 1.f, inv = 1.f;
  if constexpr (std::is_same_v<TW, int8_t>) {
    float m = 0.f;
    for (int64_t t = 0; t < n; ++t) m = std::max(m, std::abs(x[p[t]]));
    if (!std::isfinite(m)) {  // an inf or NaN input: NaN out, as the float sums would give (or inf)
      std::fill(acc, acc + out, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    if (m == 0.f) return;
    step = m / 32767.f;
    inv = 32767.f / m;
  }
  const auto coef = [&](int64_t t) -> uint32_t {
    if (t >= n) return 0u;
    if constexpr (std::is_same_v<TW, int8_t>)
      return static_cast<uint16_t>(static_cast<int16_t>(std::lrint(x[p[t]] * inv)));
    else
      return bf16_bits(x[p[t]]);
  };
  const __m512 scale = _mm512_set1_ps(step);
  int64_t t = 0;
  const TW* rows[2][8];
  for (int q = 0; q < 8; ++q) rows[0][q] = Wt + p[std::min<int64_t>(q, n - 1)] * out;
  for (int g = 0; t < n; t += 8, g ^= 1) {
    const TW* const* w = rows[g];
    const TW** next = t + 8 < n ? rows[g ^ 1] : nullptr;
    if (next) for (int q = 0; q < 8; ++q) next[q] = Wt + p[std::min(t + 8 + q, n - 1)] * out;
    __m512i xs[4];
    for (int q = 0; q < 4; ++q)
      xs[q] = _mm512_set1_epi32(static_cast<int32_t>(coef(t + 2 * q) | (coef(t + 2 * q + 1) << 16)));
    const int64_t pairs = std::min<int64_t>(4, (n - t + 1) / 2);
    if (pairs == 4) pair_pass<4>(acc, w, xs, out, scale, next);
    else if (pairs == 3) pair_pass<3>(acc, w, xs, out, scale, next);
    else if (pairs == 2) pair_pass<2>(acc, w, xs, out, scale, next);
    else pair_pass<1>(acc, w, xs, out, scale, next);
  }
}
#endif

// The calling thread's share of n outputs in whole cache lines (16 floats): no line of y is
// written by two threads.
inline std::pair<int64_t, int64_t> my_columns(int64_t n) {
  auto [lo, hi] = my_share((n + 15) / 16);
  return {std::min(n, lo * 16), std::min(n, hi * 16)};
}

// Rows X (R, in) into Y (R, out): the threads split each row's picked rows of Wt, each reads
// whole rows (splitting the outputs instead, each thread reading a slice of every picked row,
// measured 0.66 of the traffic limit on 3072x768 against 0.78 here: shorter runs for the prefetcher).
// Every thread selects each row's inputs itself (a few µs, in parallel) rather than wait at a
// barrier for one thread's: one barrier per call, where a sleeping OpenMP thread costs µs to wake.
template <typename TW, typename TL>
void input_kernel(const InputLayer<TW, TL>& L, const TL* X, int64_t R, TL* Y, int nt) {
  thread_local std::vector<float> s_buf, rest_buf, h_buf, part_buf, x_buf;
  thread_local std::vector<uint32_t> key_buf;
  thread_local std::vector<int64_t> pick_buf;
  const int64_t in = L.in, out = L.out, r = L.r;
  constexpr bool wide_x = !std::is_same_v<TL, float>;  // rows widened to float32 once, before the selection
  const bool every = L.k >= in && std::isnan(L.threshold);
  const bool paired = paired_storage<TW>() && out % kPairBlock == 0;
  float* S_all = scratch(s_buf, nt * in);
  uint32_t* keys_all = scratch(key_buf, nt * in);
  int64_t* picked_all = scratch(pick_buf, nt * R * in);
  float* rest_all = r ? scratch(rest_buf, nt * in) : nullptr;
  float* H_all = r ? scratch(h_buf, nt * R * r) : nullptr;
  float* partial = scratch(part_buf, nt * R * out);
  float* XF_all = wide_x ? scratch(x_buf, nt * in) : nullptr;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    float* s = S_all + tid * in;
    uint32_t* keys = keys_all + tid * in;
    float* rest = r ? rest_all + tid * in : nullptr;
    float* H = r ? H_all + tid * R * r : nullptr;
    for (int64_t row = 0; row < R; ++row) {  // scores, selection, light path; then this thread's share
      const float* x;
      if constexpr (wide_x) {
        float* xf = XF_all + tid * in;
        const TL* xr = X + row * in;
#pragma omp simd
        for (int64_t j = 0; j < in; ++j) xf[j] = widen(xr[j]);
        x = xf;
      } else {
        x = X + row * in;
      }
      int64_t* p = picked_all + (tid * R + row) * in;
      int64_t k = in;
      if (every) {  // k = in: a dense layer (Int8Linear), no scores to rank
        for (int64_t j = 0; j < in; ++j) p[j] = j;
      } else {
#pragma omp simd
        for (int64_t j = 0; j < in; ++j) s[j] = std::abs(x[j]) * L.scale[j];
        k = picks(s, in, L.k, L.threshold);
        top_k(s, in, k, keys, p);
      }
      if (r) {
        std::copy(x, x + in, rest);
        for (int64_t t = 0; t < k; ++t) rest[p[t]] = 0.f;
        const auto [jlo, jhi] = my_share(r);  // this thread's part of h = V x_rest; summed below
        for (int64_t j = 0; j < r; ++j) H[row * r + j] = j >= jlo && j < jhi ? dot_t(L.V + j * in, rest, in) : 0.f;
      }
      float* acc = partial + (tid * R + row) * out;
      std::fill(acc, acc + out, 0.f);
      const auto [lo, hi] = my_share(k);
      int64_t t = lo;
#ifdef MIDL_PAIRED
      if constexpr (paired_storage<TW>())
        if (paired) {
          pair_rows(acc, L.Wt, out, p + lo, hi - lo, x);
          t = hi;
        }
#endif
      for (; t + 8 <= hi; t += 8) axpy_rows<8>(acc, L.Wt, out, p + t, x);
      for (; t + 4 <= hi; t += 4) axpy_rows<4>(acc, L.Wt, out, p + t, x);
      for (; t < hi; ++t) axpy(acc, L.Wt + p[t] * out, x[p[t]], out);
    }
#pragma omp barrier
    const auto [clo, chi] = my_columns(out);
    thread_local std::vector<float> h_sum;
    float* h = r ? scratch(h_sum, r) : nullptr;
    for (int64_t row = 0; row < R; ++row) {
      for (int64_t j = 0; j < r; ++j) {
        h[j] = 0.f;
        for (int q = 0; q < team; ++q) h[j] += H_all[(q * R + row) * r + j];
      }
      TL* y = Y + row * out;
      for (int64_t o = clo; o < chi; ++o) {
        float e = 0.f;
        const int64_t slot = paired ? paired_slot(o) : o;
        for (int q = 0; q < team; ++q) e += partial[(q * R + row) * out + slot];
        if (L.wscale) e *= L.wscale[o];
        narrow(e + (L.b ? widen(L.b[o]) : 0.f) + (r ? short_dot_t(L.U + o * r, h, r) : 0.f), y + o);
      }
    }
  }
}

// The kernel's storage combinations: float32 throughout; bfloat16 throughout; int8 weights with
// float32 rows, bias and light path. The per-row scores' scale is float32 in all three.
enum class InputDtypes { kFloat, kBFloat16, kInt8, kNone };

InputDtypes input_dtypes(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& bias, const at::Tensor& v,
                         const at::Tensor& u, const at::Tensor& scale, const std::optional<at::Tensor>& wscale) {
  const auto all_cpu = x.device().is_cpu() && wt.device().is_cpu() && bias.device().is_cpu() && v.device().is_cpu() &&
                       u.device().is_cpu() && scale.device().is_cpu();
  const auto xt = x.scalar_type();
  const auto rest_is = [&](at::ScalarType t) {
    return (bias.numel() == 0 || bias.scalar_type() == t) && v.scalar_type() == t && u.scalar_type() == t;
  };
  if (!all_cpu || scale.scalar_type() != at::kFloat || !rest_is(xt)) return InputDtypes::kNone;
  const bool scaled = wscale.has_value() && wscale->defined();
  if (wt.scalar_type() == at::kChar && xt == at::kFloat && scaled && wscale->scalar_type() == at::kFloat &&
      wscale->device().is_cpu() && wscale->numel() == wt.size(1))
    return InputDtypes::kInt8;
  if (scaled) return InputDtypes::kNone;
  if (wt.scalar_type() == at::kFloat && xt == at::kFloat) return InputDtypes::kFloat;
  if (wt.scalar_type() == at::kBFloat16 && xt == at::kBFloat16) return InputDtypes::kBFloat16;
  return InputDtypes::kNone;
}

template <typename TW, typename TL, typename AW, typename AL>
at::Tensor run_input_kernel(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& bias, const at::Tensor& v,
                            const at::Tensor& u, const at::Tensor& scale, const float* wscale, int64_t k,
                            double threshold) {
  const int64_t R = x.size(0), in = x.size(1), out = wt.size(1), r = v.size(0);
  auto y = at::empty({R, out}, x.options());
  if (R == 0) return y;
  const auto lp = [](const at::Tensor& t) { return reinterpret_cast<const TL*>(t.data_ptr<AL>()); };
  const InputLayer<TW, TL> L{reinterpret_cast<const TW*>(wt.data_ptr<AW>()), bias.numel() ? lp(bias) : nullptr, lp(v),
                             lp(u), scale.data_ptr<float>(), wscale, in, out, r, k, static_cast<float>(threshold)};
  // Threads pay off by bytes read: the float32 count of multiply-adds, scaled to the storage's bytes per weight.
  const int nt = R * k * out * static_cast<int64_t>(sizeof(TW)) < kParallelWork ? 1 : std::max(1, at::get_num_threads());
  input_kernel(L, reinterpret_cast<const TL*>(x.data_ptr<AL>()), R, reinterpret_cast<TL*>(y.data_ptr<AL>()), nt);
  return y;
}

}  // namespace

// Input-side MID-L rows: x (R, in), wt = W^T (in, out), bias (out) or empty, v (r, in), u (out, r),
// scale (in) float32, wt_scale (out) with int8 wt: float32 throughout, bfloat16 throughout, or
// int8 wt with float32 rest (input_dtypes). Per row, the k inputs with the largest |x_j| scale_j
// (or, with a threshold that is not NaN, those above it, at least one) take the exact path:
// y = b + wt_scale * sum_sel x_j wt_j + u (v x_rest). Returns y (R, out) in x's dtype.
at::Tensor input_rows(const at::Tensor& x_in, const at::Tensor& wt_in, const at::Tensor& bias_in,
                      const at::Tensor& v_in, const at::Tensor& u_in, const at::Tensor& scale_in, int64_t k,
                      double threshold, const std::optional<at::Tensor>& wt_scale) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto kind = input_dtypes(x_in, wt_in, bias_in, v_in, u_in, scale_in, wt_scale);
  TORCH_CHECK(kind != InputDtypes::kNone, "midl kernel: input_rows takes float32 throughout, bfloat16 throughout "
              "(scale float32) or int8 wt with its float32 wt_scale and float32 rest, on the CPU; got x ",
              x_in.scalar_type(), " and wt ", wt_in.scalar_type());
  const auto x = x_in.contiguous(), wt = wt_in.contiguous(), bias = bias_in.contiguous();
  const auto v = v_in.contiguous(), u = u_in.contiguous(), scale = scale_in.contiguous();
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && wt.size(0) == x.size(1), "input_rows: x (R, in) and wt (in, out), got ",
              x.sizes(), " and ", wt.sizes());
  const int64_t in = x.size(1), out = wt.size(1), r = v.size(0);
  TORCH_CHECK(scale.numel() == in && (bias.numel() == 0 || bias.numel() == out), "input_rows: scale (in,) and bias (out,) or empty");
  TORCH_CHECK(v.dim() == 2 && u.dim() == 2 && u.size(1) == r && (r == 0 || (v.size(1) == in && u.size(0) == out)),
              "input_rows: v (r, in) and u (out, r), got ", v.sizes(), " and ", u.sizes());
  TORCH_CHECK(k >= 1 && k <= in, "input_rows: k must be in [1, ", in, "], got ", k);
  switch (kind) {
    case InputDtypes::kBFloat16:
      return run_input_kernel<uint16_t, uint16_t, at::BFloat16, at::BFloat16>(x, wt, bias, v, u, scale, nullptr, k,
                                                                             threshold);
    case InputDtypes::kInt8: {
      const auto ws = wt_scale->contiguous();
      return run_input_kernel<int8_t, float, int8_t, float>(x, wt, bias, v, u, scale, ws.data_ptr<float>(), k, threshold);
    }
    default:
      return run_input_kernel<float, float, float, float>(x, wt, bias, v, u, scale, nullptr, k, threshold);
  }
}

namespace {

// Rows per call up to which midl::input_rows runs the kernel (KERNEL_MAX_ROWS in kernels.py);
// more rows run one masked GEMM, which beats per-row axpys once rows share most of W's columns.
constexpr int64_t kInputKernelRows = 8;

bool all_float32(std::initializer_list<at::Tensor> ts) {
  for (const auto& t : ts)
    if (t.scalar_type() != at::kFloat || !t.device().is_cpu()) return false;
  return true;
}

// Each row's k largest scores, or with a threshold (not NaN) its scores above it (at least one),
// as a boolean mask: the selection of kernels.top_mask, for the dense fallbacks.
at::Tensor top_mask(const at::Tensor& s, int64_t k, double threshold) {
  auto mask = at::zeros_like(s, s.options().dtype(at::kBool));
  if (s.size(0) == 0) return mask;
  if (std::isnan(threshold)) return mask.scatter_(-1, std::get<1>(s.topk(k, -1, true, false)), true);
  // The scores above the threshold are the row's top count; its largest is among them whenever
  // any is, so marking it gives "at least one" (a sorted top-k here took 0.6 ms per SmolLM2 layer
  // on a 32-token prompt).
  return s.gt(threshold).logical_or_(s.isnan()).scatter_(-1, s.argmax(-1, true), true);
}

// |v| of a float32, or of a bfloat16 given as its bits (sign bit cleared), as float32: branch-free,
// so loops vectorise.
inline float magnitude(float v) { return std::abs(v); }
inline float magnitude(uint16_t bits) { return widen(static_cast<uint16_t>(bits & 0x7FFFu)); }

// One row's picks (see keep_picked) from xr into yr; s, keys and picked hold n entries.
// Written as first (a ternary on the bfloat16 bits, inlined into keep_picked's lambda), gcc left the
// bfloat16 loop scalar (-fopt-info-vec: control flow in loop); masked bits and no inlining vectorise it.
template <typename T>
__attribute__((noinline)) WIDE_VECTORS void keep_row(const T* xr, T* yr, const float* sc, int64_t n, int64_t k,
                                                     float threshold, float* s, uint32_t* keys, int64_t* picked) {
  if (std::isnan(threshold)) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = magnitude(xr[j]) * sc[j];
    top_k(s, n, k, keys, picked);
    std::fill(yr, yr + n, T(0));
    for (int64_t i = 0; i < k; ++i) yr[picked[i]] = xr[picked[i]];
    return;
  }
  int32_t kept = 0;
#pragma omp simd reduction(+ : kept)
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = !(magnitude(xr[j]) * sc[j] <= threshold);  // above it, or NaN
    if constexpr (std::is_same_v<T, uint16_t>)
      yr[j] = xr[j] & static_cast<uint16_t>(-static_cast<int32_t>(keep));  // the bits themselves
    else
      yr[j] = keep ? xr[j] : T(0);
    kept += keep;
  }
  if (kept) return;
  int64_t best = 0;  // none above: the row keeps its best
  for (int64_t j = 1; j < n; ++j)
    if (magnitude(xr[j]) * sc[j] > magnitude(xr[best]) * sc[best]) best = j;
  yr[best] = xr[best];
}

// Rows x (R, in), float32 or bfloat16, with the inputs a row does not pick zeroed, in one pass per
// row: with a threshold (adaptive masks) those whose score |x_j| scale_j is not above it (a NaN score
// kept; each row keeps at least its best), else all but its k best scores (top_k's O(n) selection).
// As separate torch ops (scores, compare or a sorted top-k, scatter, where) the selection took about
// as long as the 15 x 576 x 1536 bfloat16 GEMM it feeds, and a sorted top-k 2-7x longer.
at::Tensor keep_picked(const at::Tensor& x_in, const at::Tensor& scale_in, int64_t k, float threshold) {
  const auto x = x_in.contiguous(), scale = scale_in.contiguous();
  auto out = at::empty_like(x);
  const int64_t R = x.size(0), in = x.size(1);
  const float* sc = scale.data_ptr<float>();
  const auto run = [&](const auto* X, auto* Y) {
    // Rows per task: a second thread pays off from about 32k inputs compared, or 2k ranked by top_k.
    const int64_t grain = std::max<int64_t>(1, (std::isnan(threshold) ? 2048 : 32768) / std::max<int64_t>(in, 1));
    at::parallel_for(0, R, grain, [&](int64_t lo, int64_t hi) {
      std::vector<float> s(in);
      std::vector<uint32_t> keys(in);
      std::vector<int64_t> picked(in);
      for (int64_t row = lo; row < hi; ++row)
        keep_row(X + row * in, Y + row * in, sc, in, k, threshold, s.data(), keys.data(), picked.data());
    });
  };
  if (x.scalar_type() == at::kBFloat16)
    run(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
        reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  else
    run(x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

}  // namespace

// midl::output_rows: the kernel for 1 to kernel_rows (at most 64) float32 rows; dense compute plus
// masking for any other count, so a graph with a dynamic batch needs no branch on it.
at::Tensor output_rows_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& down, const at::Tensor& up, const at::Tensor& gate,
                          const at::Tensor& gate_bias, const at::Tensor& gate_abs, int64_t k, double threshold,
                          int64_t kernel_rows) {
  const int64_t B = x.size(0);
  if (B >= 1 && B <= std::min(kernel_rows, kMaxRows) && all_float32({x, weight, gate_bias}))
    return output_rows(x, weight, bias, down, up, gate, gate_bias, gate_abs, k, threshold);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto [s, light] = gate_and_light(x, bias, down, up, gate, gate_bias, gate_abs.item<uint8_t>() != 0);
  const auto dense = bias.numel() ? at::addmm(bias, x, weight.t()) : at::mm(x, weight.t());
  return at::where(top_mask(s, k, threshold), dense, light);
}

// midl::input_rows: the kernel for 1 to 8 rows in its storage combinations (input_dtypes), one
// masked GEMM otherwise (int8 weights widened to the rows' dtype, their scales applied after); with
// a centre, on x - centre (the caller folds W centre into the bias).
at::Tensor input_rows_op(const at::Tensor& x_in, const at::Tensor& wt, const at::Tensor& bias, const at::Tensor& v,
                         const at::Tensor& u, const at::Tensor& scale, int64_t k, double threshold,
                         const std::optional<at::Tensor>& wt_scale, const std::optional<at::Tensor>& centre) {
  const auto x = centre.has_value() && centre->defined() ? x_in.sub(*centre) : x_in;
  const int64_t R = x.size(0);
  if (R >= 1 && R <= kInputKernelRows && input_dtypes(x, wt, bias, v, u, scale, wt_scale) != InputDtypes::kNone)
    return input_rows(x, wt, bias, v, u, scale, k, threshold, wt_scale);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // Half-precision rows are computed in float32 and rounded once where the CPU has no native
  // bfloat16: its bfloat16 GEMM (AVX2) measured 36 ms for 32 x 576 x 1536, 20x float32's. With
  // AVX-512 BF16 (oneDNN's bfloat16 GEMM, float32 sums) bfloat16 rows stay bfloat16: widening the
  // weight to float32 on every call had cost 5.6x the dense bfloat16 layer on 15 x 576 x 1536.
  const auto dtype = x.scalar_type();
#ifdef __AVX512BF16__
  const bool native_half = dtype == at::kBFloat16 && wt.scalar_type() == at::kBFloat16;
#else
  const bool native_half = false;
#endif
  const bool half = (dtype == at::kBFloat16 || dtype == at::kHalf) && !native_half;
  const auto f = [&](const at::Tensor& t) { return half ? t.to(at::kFloat) : t; };
  const auto xf = f(x);
  const bool every = k >= x.size(1) && std::isnan(threshold);  // Int8Linear: no scores to rank
  const bool one_pass = xf.dim() == 2 && scale.scalar_type() == at::kFloat && k >= 1 && k <= xf.size(1) &&
                        (xf.scalar_type() == at::kFloat || xf.scalar_type() == at::kBFloat16);
  const auto exact = every      ? xf
                     : one_pass ? keep_picked(xf, scale, k, static_cast<float>(threshold))
                                : at::where(top_mask(xf.abs().mul(scale), k, threshold), xf, 0.0);
  const bool scaled = wt_scale.has_value() && wt_scale->defined();
  auto y = scaled ? at::mm(exact, wt.to(exact.scalar_type())).mul_(f(*wt_scale))
                  : bias.numel() ? at::addmm(f(bias), exact, f(wt)) : at::mm(exact, f(wt));
  if (scaled && bias.numel()) y.add_(f(bias));
  if (v.size(0)) y = at::addmm(y, at::mm(xf.sub(exact), f(v).t()), f(u).t());
  return half ? y.to(dtype) : y;
}

// midl::top_k_rows: the O(n) selection on float32 scores, torch.topk (sorted ascending) otherwise.
at::Tensor top_k_rows_op(const at::Tensor& s, int64_t k) {
  if (all_float32({s})) return top_k_rows(s, k);
  return std::get<0>(std::get<1>(s.topk(k, -1, true, false)).sort(-1));
}

TORCH_LIBRARY_IMPL(midl, CPU, m) {
  m.impl("output_rows", &output_rows_op);
  m.impl("input_rows", &input_rows_op);
  m.impl("top_k_rows", &top_k_rows_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("top_k_rows", &top_k_rows, "Ascending indices of the k largest scores of each row (O(n) selection)");
  m.def("input_rows", &input_rows, "The input-side kernel itself (no fallback: unsupported dtypes raise)");
}

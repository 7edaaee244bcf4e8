// Fused MID-L eval forward for rows with their own masks (batch-1 decode, a few tokens).
//
// Per row x: h = V x, s = G h + c (|s| when gate_abs) and the light output U h + b; the k largest
// s by an O(out) branch-free selection; then y_i = W_i . x + b_i over the light output for those k.
// Dense layers at batch 1 are bound by reading W, so reading only k of its rows is the saving;
// stock torch (topk + index_select + GEMV) spends more on copies than it saves.
// Only the headers used, not <torch/extension.h>: the build takes ~10 s instead of ~27 s.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <omp.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Order-preserving map of a float to an unsigned key; NaN ranks above every number, as in torch.topk.
inline uint32_t rank_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return std::isnan(v) ? 0xFFFFFFFFu : u;
}

// The k indices of the largest s, ascending, in picked[0..k); ties at the k-th value are taken in
// index order. The k-th largest key is found bit by bit, one branch-free counting pass per bit:
// on fresh scores (a new token's) nth_element's unpredictable branches cost 5x more.
// keys and picked hold n entries each.
void top_k(const float* s, int64_t n, int64_t k, uint32_t* keys, int64_t* picked) {
  for (int64_t i = 0; i < n; ++i) keys[i] = rank_key(s[i]);
  uint32_t kth = 0;  // the largest t with at least k keys >= t, i.e. the k-th largest key
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t t = kth | (1u << bit);
    int32_t count = 0;  // 32-bit lanes: twice the 64-bit ones per vector (n < 2^31)
#pragma omp simd reduction(+ : count)
    for (int64_t i = 0; i < n; ++i) count += keys[i] >= t;
    if (count >= k) kth = t;
  }
  int64_t ties = k, m = 0;
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
};

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
    top_k(s.data(), L.out, L.k, keys.data(), picked.data());
    auto [lo, hi] = my_share(L.k);
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
      top_k(S + o, L.out, L.k, keys.data() + o, picked.data() + o);
      for (int64_t t = 0; t < L.k; ++t) mask[o + picked[o + t]] = 1;
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
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "midl_rows: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  return t.contiguous();
}

}  // namespace

// x (B, in) with B <= 64, weight W (out, in), bias b (out) or empty, down V (r, in), up U (out, r),
// gate G (out, r), gate_bias c (out): float32 on the CPU; gate_abs: the layer's uint8 flag.
// Returns y (B, out).
at::Tensor midl_rows(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
                     const at::Tensor& down_in, const at::Tensor& up_in, const at::Tensor& gate_in,
                     const at::Tensor& gate_bias_in, const at::Tensor& gate_abs, int64_t k) {
  const auto x = checked(x_in, "x"), weight = checked(weight_in, "weight"), bias = checked(bias_in, "bias");
  const auto down = checked(down_in, "light_down"), up = checked(up_in, "light_up");
  const auto gate = checked(gate_in, "gate_weight"), gate_bias = checked(gate_bias_in, "gate_bias");
  const int64_t B = x.size(0), in = x.size(1), out = weight.size(0), r = down.size(0);
  TORCH_CHECK(k >= 1 && k <= out, "midl_rows: k must be in [1, ", out, "], got ", k);
  TORCH_CHECK(B >= 1 && B <= kMaxRows, "midl_rows: 1 to ", kMaxRows, " rows per call, got ", B);
  const Layer L{weight.data_ptr<float>(), bias.numel() ? bias.data_ptr<float>() : nullptr,
                down.data_ptr<float>(),   up.data_ptr<float>(),
                gate.data_ptr<float>(),   gate_bias.data_ptr<float>(),
                in, out, r, k, gate_abs.item<uint8_t>() != 0};
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("midl_rows", &midl_rows, "Fused MID-L eval forward for up to 64 rows, each with its own top-k mask");
  m.def("top_k_rows", &top_k_rows, "Ascending indices of the k largest scores of each row (O(n) selection)");
}

// GPTQ's column loop (llmquant.algorithms.gptq._column_loop) for one block of columns, compiled: in Python it
// is a dozen small tensor operations per column, thousands of columns per layer. Each row of W (an output
// channel) is independent in this loop: the rows are split over threads (from 1024 rows on), each running the
// whole block on its own rows with no synchronisation.
//
// Layout as in Python: the block's columns are rows of W^T, ``w1`` (n, rows) in processing order; ``u1`` the
// (n, n) block of the upper Cholesky factor of H^-1 (any row stride); ``st`` / ``zt`` the (groups, rows)
// scales / zero points (zt empty for symmetric grids); ``gidx`` (n,) the group of each column. Columns
// [c0, c1) are quantized; each one's error updates every later column of the block (also those past c1,
// which a later call quantizes). Outputs: ``codes`` (n, rows) int16 and ``err`` (n, rows), the scaled errors
// that the caller's lazy update multiplies into the columns after the block.
//
// The rounding is llmquant.schemes.primitives.round_to_grid / from_grid operation for operation (IEEE
// division, round half to even, clamp), so a column's codes are those of the Python loop on the same values;
// the updates may differ from torch's in the last bit (order of operations).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <immintrin.h>

#include <ATen/Parallel.h>

// no fused multiply-adds in the rounding: from_grid's (q - z) * s and w - deq are two roundings in torch
#pragma GCC optimize("fp-contract=off")

namespace {

enum Mode : int64_t { kSymmetric = 0, kZero = 1, kMin = 2 };

// round_to_grid then from_grid of one value: the code goes to ``*q``, the value it stands for is returned
inline float round_trip(float x, float s, float z, int64_t mode, float qmin, float qmax, float* q) {
  float v = mode == kMin ? (x - z) / s + qmin : (mode == kZero ? x / s + z : x / s);
  v = std::min(std::max(std::nearbyint(v), qmin), qmax);
  *q = v;
  if (mode == kMin) return (v - qmin) * s + z;
  return (mode == kZero ? v - z : v) * s;
}

void gptq_columns(torch::Tensor w1, torch::Tensor u1, torch::Tensor st, torch::Tensor zt, torch::Tensor gidx,
                  int64_t c0, int64_t c1, int64_t mode, double qmin_d, double qmax_d, torch::Tensor codes,
                  torch::Tensor err) {
  TORCH_CHECK(w1.dtype() == torch::kFloat32 && w1.dim() == 2 && w1.is_contiguous(), "w1: contiguous (n, rows) fp32");
  TORCH_CHECK(u1.dtype() == torch::kFloat32 && u1.dim() == 2 && u1.stride(1) == 1, "u1: (n, n) fp32 rows");
  TORCH_CHECK(st.dtype() == torch::kFloat32 && st.is_contiguous(), "st: contiguous fp32");
  TORCH_CHECK(gidx.dtype() == torch::kInt64 && gidx.is_contiguous(), "gidx: contiguous int64");
  TORCH_CHECK(codes.dtype() == torch::kInt16 && codes.is_contiguous() && err.dtype() == torch::kFloat32 &&
                  err.is_contiguous(), "codes int16 / err fp32, contiguous");
  TORCH_CHECK(mode == kSymmetric || zt.numel() > 0, "zt: the zero points of an asymmetric grid");
  TORCH_CHECK(mode == kSymmetric || (zt.dtype() == torch::kFloat32 && zt.is_contiguous()), "zt: contiguous fp32");
  const int64_t n = w1.size(0), rows = w1.size(1);
  TORCH_CHECK(u1.size(0) >= n && u1.size(1) >= n && gidx.numel() >= n && 0 <= c0 && c0 <= c1 && c1 <= n,
              "gptq_columns: shapes");
  TORCH_CHECK(st.size(1) == rows && codes.size(0) == n && codes.size(1) == rows && err.size(0) == n &&
                  err.size(1) == rows, "gptq_columns: row counts");
  float* W = w1.data_ptr<float>();
  const float* U = u1.data_ptr<float>();
  const int64_t ld = u1.stride(0);
  const float* S = st.data_ptr<float>();
  const float* Z = mode == kSymmetric ? nullptr : zt.data_ptr<float>();
  const int64_t* G = gidx.data_ptr<int64_t>();
  int16_t* Q = codes.data_ptr<int16_t>();
  float* E = err.data_ptr<float>();
  const float qmin = static_cast<float>(qmin_d), qmax = static_cast<float>(qmax_d);
  constexpr int64_t kChunk = 64;  // rows per task: the block's columns of 64 rows stay in L1/L2
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  // threads from 1024 rows on: below, a call is too short for a hand-off (on a busy machine a waiting
  // thread costs more than the call)
  at::parallel_for(0, chunks, 16, [&](int64_t ta, int64_t tb) {
  for (int64_t t = ta; t < tb; ++t) {
    const int64_t r0 = t * kChunk, r1 = std::min(rows, r0 + kChunk);
    for (int64_t i = c0; i < c1; ++i) {
      const float* s = S + G[i] * rows;
      const float* z = Z ? Z + G[i] * rows : nullptr;
      float* w = W + i * rows;
      float* e = E + i * rows;
      int16_t* q_out = Q + i * rows;
      const float uii = U[i * ld + i];
      for (int64_t r = r0; r < r1; ++r) {
        float q;
        const float deq = round_trip(w[r], s[r], z ? z[r] : 0.0f, mode, qmin, qmax, &q);
        q_out[r] = static_cast<int16_t>(q);
        e[r] = (w[r] - deq) / uii;
      }
      const float* urow = U + i * ld;
      for (int64_t k = i + 1; k < n; ++k) {
        const float c = urow[k];
        float* wk = W + k * rows;
        for (int64_t r = r0; r < r1; ++r) wk[r] -= c * e[r];
      }
    }
  }
  });
}

// One group's round-trip error for the qparams (s, z): sum_i imp_i (x_hat_i - x_i)^2, the rounding as
// round_to_grid / from_grid compute it, eight values at a time (AVX2), summed in float lanes then in double.
double group_error(const float* xv, const float* iv, int64_t gs, int64_t mode, float s, float z, float qmin,
                   float qmax) {
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vlo = _mm256_set1_ps(qmin),
               vhi = _mm256_set1_ps(qmax);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= gs; i += 8) {
    const __m256 x = _mm256_loadu_ps(xv + i);
    __m256 q, deq;
    if (mode == kMin) {
      q = _mm256_add_ps(_mm256_div_ps(_mm256_sub_ps(x, vz), vs), vlo);
    } else {
      q = _mm256_div_ps(x, vs);
      if (mode == kZero) q = _mm256_add_ps(q, vz);
    }
    q = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vlo), vhi);
    if (mode == kMin) {
      deq = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(q, vlo), vs), vz);
    } else {
      deq = _mm256_mul_ps(mode == kZero ? _mm256_sub_ps(q, vz) : q, vs);
    }
    __m256 d = _mm256_sub_ps(deq, x);
    d = _mm256_mul_ps(d, d);
    if (iv) d = _mm256_mul_ps(d, _mm256_loadu_ps(iv + i));
    acc = _mm256_add_ps(acc, d);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  double e = 0.0;
  for (float v : lanes) e += v;
  for (; i < gs; ++i) {
    float q;
    float d = round_trip(xv[i], s, z, mode, qmin, qmax, &q) - xv[i];
    d = d * d;
    if (iv) d = d * iv[i];
    e += d;
  }
  return e;
}

// The weight range search of llmquant.schemes.primitives.range_qparams ("mse" / "imse") in one pass per
// (row, group): each ratio r shrinks the range (lo r, hi r), the qparams follow qparams_from_minmax, and the
// group's round-trip error (weighted per column by ``imp`` when given) is summed; the first ratio of least
// error wins. ``kind``: 0 symmetric (max|x| / ((qmax - qmin) / 2)), 1 symmetric signed (x_e / qmin), 2
// asymmetric with an integer zero point, 3 with a float zero point, 4 with the float minimum as offset.
// Returns the winning ratio per (row, group). The qparams and round trips are computed as the PyTorch
// operations do; the sums are in double, so near-ties may go to another ratio than PyTorch's float sums give.
torch::Tensor range_search(torch::Tensor x, torch::Tensor lo, torch::Tensor hi, torch::Tensor imp,
                           std::vector<double> ratios, int64_t gs, int64_t kind, double qmin_d, double qmax_d) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: contiguous (rows, K) fp32");
  const int64_t rows = x.size(0), K = x.size(1);
  TORCH_CHECK(gs > 0 && K % gs == 0, "range_search: K must be a multiple of the group size");
  const int64_t G = K / gs;
  TORCH_CHECK(lo.dtype() == torch::kFloat32 && hi.dtype() == torch::kFloat32 && lo.is_contiguous() &&
                  hi.is_contiguous() && lo.numel() == rows * G && hi.numel() == rows * G, "lo / hi: (rows, groups) fp32");
  TORCH_CHECK(imp.numel() == 0 || (imp.dtype() == torch::kFloat32 && imp.is_contiguous() && imp.numel() == K),
              "imp: (K,) fp32 or empty");
  TORCH_CHECK(kind >= 0 && kind <= 4, "range_search: kind 0..4");
  const int64_t mode = kind <= 1 ? kSymmetric : kind == 4 ? kMin : kZero;  // the round trip's rule
  auto best = torch::ones({rows, G}, torch::kFloat32);
  const float* X = x.data_ptr<float>();
  const float* LO = lo.data_ptr<float>();
  const float* HI = hi.data_ptr<float>();
  const float* IMP = imp.numel() ? imp.data_ptr<float>() : nullptr;
  float* B = best.data_ptr<float>();
  const float qmin = static_cast<float>(qmin_d), qmax = static_cast<float>(qmax_d);
  const float half = static_cast<float>((qmax_d - qmin_d) / 2), span = static_cast<float>(qmax_d - qmin_d);
  constexpr float kEps = 1e-10f;
  std::vector<float> rs(ratios.begin(), ratios.end());
  at::parallel_for(0, rows * G, 64, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const int64_t r = t / G, g = t % G;
      const float* xv = X + r * K + g * gs;
      const float* iv = IMP ? IMP + g * gs : nullptr;
      double best_e = INFINITY;
      float best_r = 1.0f;
      for (float ratio : rs) {
        float l = LO[t] * ratio, h = HI[t] * ratio, s, z = 0.0f;
        switch (kind) {
          case 0: s = std::max(std::max(std::fabs(l), std::fabs(h)) / half, kEps); break;
          case 1: {
            const float ext = std::fabs(l) >= std::fabs(h) ? l : h;
            s = ext / qmin;
            s = s < 0 ? std::min(s, -kEps) : std::max(s, kEps);
            break;
          }
          case 4: s = std::max((h - l) / span, kEps); z = l; break;
          default: {
            if (kind == 2) {
              l = std::min(l, 0.0f);
              h = std::max(h, 0.0f);
            }
            s = std::max((h - l) / span, kEps);
            z = qmin - l / s;
            if (kind == 2) z = std::min(std::max(std::nearbyint(z), qmin), qmax);
          }
        }
        const double e = group_error(xv, iv, gs, mode, s, z, qmin, qmax);
        if (e < best_e) {
          best_e = e;
          best_r = ratio;
        }
      }
      B[t] = best_r;
    }
  });
  return best;
}

}  // namespace

void register_gptq(pybind11::module& m) {
  m.def("range_search", &range_search, "the weight range search (mse / imse): the winning shrink ratio per group",
        py::arg("x"), py::arg("lo"), py::arg("hi"), py::arg("imp"), py::arg("ratios"), py::arg("group_size"),
        py::arg("kind"), py::arg("qmin"), py::arg("qmax"));
  m.def("gptq_columns", &gptq_columns,
        "GPTQ's column loop over columns [c0, c1) of one block (rows of W^T), rows split over threads",
        py::arg("w1"), py::arg("u1"), py::arg("st"), py::arg("zt"), py::arg("gidx"), py::arg("c0"), py::arg("c1"),
        py::arg("mode"), py::arg("qmin"), py::arg("qmax"), py::arg("codes"), py::arg("err"));
}

// GPTQ's column loop (llmquant.algorithms.gptq._column_loop) for one block of columns, compiled: in Python it
// is a dozen small tensor operations per column, thousands of columns per layer. Each row of W (an output
// channel) is independent in this loop: the rows are split over threads, each running the whole block on its
// own rows with no synchronisation.
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

// no fused multiply-adds in the rounding: from_grid's (q - z) * s and w - deq are two roundings in torch
#pragma GCC optimize("fp-contract=off")

namespace {

enum Mode : int64_t { kSymmetric = 0, kZero = 1, kMin = 2 };

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
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < chunks; ++t) {
    const int64_t r0 = t * kChunk, r1 = std::min(rows, r0 + kChunk);
    for (int64_t i = c0; i < c1; ++i) {
      const float* s = S + G[i] * rows;
      const float* z = Z ? Z + G[i] * rows : nullptr;
      float* w = W + i * rows;
      float* e = E + i * rows;
      int16_t* q_out = Q + i * rows;
      const float uii = U[i * ld + i];
      for (int64_t r = r0; r < r1; ++r) {
        float q, deq;
        if (mode == kMin) {
          q = (w[r] - z[r]) / s[r] + qmin;
        } else {
          q = w[r] / s[r];
          if (mode == kZero) q = q + z[r];
        }
        q = std::min(std::max(std::nearbyint(q), qmin), qmax);
        if (mode == kMin) {
          deq = (q - qmin) * s[r] + z[r];
        } else {
          deq = (mode == kZero ? q - z[r] : q) * s[r];
        }
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
}

}  // namespace

void register_gptq(pybind11::module& m) {
  m.def("gptq_columns", &gptq_columns,
        "GPTQ's column loop over columns [c0, c1) of one block (rows of W^T), rows split over threads",
        py::arg("w1"), py::arg("u1"), py::arg("st"), py::arg("zt"), py::arg("gidx"), py::arg("c0"), py::arg("c1"),
        py::arg("mode"), py::arg("qmin"), py::arg("qmax"), py::arg("codes"), py::arg("err"));
}

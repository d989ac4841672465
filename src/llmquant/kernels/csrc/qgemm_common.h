// Shared by llmquant's compiled CPU kernels (qgemm_avx2.cpp, qgemm_q8act.cpp): argument checks, the weight
// segments of a fused call, a horizontal sum, and the entry points bound in qgemm_avx2.cpp (decode_step.cpp
// calls qgemm and q8gemm directly).
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace llmquant_kernels {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

// One weight segment: rows [start, start + rows) of the output, read from their own packed buffer.
struct Segment {
  const uint8_t* q;
  const float* s;
  const float* mn;  // offsets o of W = (u - b) * s + o, one per (row, group)
  int64_t start, rows;
};

// stored_bits: the bits per code of q when it differs from the codes' bits (q8gemm's 6-bit tiles of 8-bit codes)
inline void check_args(const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& mn, int64_t bits,
                       int64_t N, int64_t K, int64_t gs, bool half_scales = false, int64_t stored_bits = 0) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(K % 32 == 0 && (gs % 32 == 0 || (gs == 16 && bits == 8)),
              "in_features and group size must be multiples of 32 (groups of 16: 8-bit codes only)");
  TORCH_CHECK(q.dtype() == torch::kUInt8 && q.is_contiguous() && q.numel() == N * K * (stored_bits ? stored_bits : bits) / 8,
              "bad packed weights");
  TORCH_CHECK((s.dtype() == torch::kFloat32 || (half_scales && s.dtype() == torch::kFloat16)) && s.is_contiguous() && s.size(0) == N && s.size(1) == (K + gs - 1) / gs,
              "bad scales");
  TORCH_CHECK(mn.numel() == 0 || (mn.dtype() == torch::kFloat32 && mn.is_contiguous() && mn.sizes() == s.sizes()),
              "bad minimums");
}

// The segments of a fused call (weights sharing the input, stacked along the output); N = total rows.
inline std::vector<Segment> make_segments(const std::vector<torch::Tensor>& qs, const std::vector<torch::Tensor>& ss,
                                          const std::vector<torch::Tensor>& ms, int64_t bits, int64_t K, int64_t gs,
                                          int64_t& N) {
  TORCH_CHECK(!qs.empty() && qs.size() == ss.size() && qs.size() == ms.size(), "one scale and offset per weight");
  std::vector<Segment> segs;
  N = 0;
  for (size_t j = 0; j < qs.size(); ++j) {
    const int64_t rows = ss[j].size(0);
    check_args(qs[j], ss[j], ms[j], bits, rows, K, gs);
    TORCH_CHECK(ms[j].numel() == ss[j].numel(), "offsets (m - c*s) are required");
    TORCH_CHECK(ss[j].size(1) == ss[0].size(1), "all weights must have the same groups");
    segs.push_back({qs[j].data_ptr<uint8_t>(), ss[j].data_ptr<float>(), ms[j].data_ptr<float>(), N, rows});
    N += rows;
  }
  return segs;
}

}  // namespace llmquant_kernels

// qgemm_avx2.cpp
torch::Tensor qgemm(torch::Tensor x, std::vector<torch::Tensor> qs, std::vector<torch::Tensor> ss,
                    std::vector<torch::Tensor> ms, int64_t bits, int64_t gs);

// qgemm_q8act.cpp
torch::Tensor q8gemm(torch::Tensor x, std::vector<torch::Tensor> qs, std::vector<torch::Tensor> ss,
                     std::vector<torch::Tensor> ms, int64_t bits, int64_t gs, int64_t isa, std::vector<int64_t> cs,
                     std::vector<int64_t> tiled_rows);
torch::Tensor q8_tile(torch::Tensor q, int64_t bits, int64_t rows, int64_t K);
std::vector<torch::Tensor> q8_quantize(torch::Tensor x);
int64_t q8_best_isa();

// decode_step.cpp: the classes LinearSpec and DecodeStep, added to the module
void register_decode_step(pybind11::module& m);
void register_gptq(pybind11::module& m);  // gptq_loop.cpp

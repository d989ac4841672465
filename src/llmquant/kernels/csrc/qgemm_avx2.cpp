// Packed int4 / int8 weight-only GEMM for x86 CPUs with AVX2 + FMA.
//
// Weights are read in llmquant's own packed format (src/llmquant/packing.py), unchanged: unsigned codes
// u = q - qmin, row-major (out_features x in_features); for 4 bits byte j holds u[2j] in its low nibble and
// u[2j+1] in its high nibble. They are unpacked in registers, never written back to memory, so decode moves
// 0.5 (int4) or 1 (int8) byte per weight instead of 2 (fp16) or 4 (fp32).
//
// Numerics (weight-only up to a 16-bit rounding of the activations):
//   W[n,k] = (u[n,k] - b) * s[n,g] + o[n,g],   g = k / group_size,   o = (qmin + b - z) * s,
// with b = 0 for 4 bits and 128 for 8 bits (then u - b is the signed int8 code of a symmetric scheme, o = 0).
// Each row of x is rounded to int16 per chunk j of 256 values, x ~= xs[i,j] * xq[i,k] with |xq| <= 32767
// (an error of at most 2^-16 of the chunk's largest value, far below an fp16 rounding), so the inner loop is
// an exact integer dot product (vpmaddwd: |u - b| <= 255 times xq, int32 sums within a group and chunk):
//   y[i,n] = sum_j xs[i,j] sum_{g meets j} s[n,g] sum_{k in g, j} (u[n,k] - b) xq[i,k]  +  sum_g o[n,g] xg[i,g],
// where xg[i,g] = sum_{k in g} xs xq[i,k] are the group sums of the rounded x.
// For 4 bits the rounded x is stored permuted within each block of 32 (even positions, then odd) to match
// the nibble order, so no shuffle is needed in the inner loop.
#include "qgemm_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

using llmquant_kernels::hsum;
using llmquant_kernels::Segment;

// 32 codes of one row as two vectors of 16 int16, in the order x is given: u for 4 bits, u - 128 for 8 bits.
template <int BITS>
inline void load_block(const uint8_t* p, __m256i& wa, __m256i& wb) {
  if constexpr (BITS == 4) {
    const __m128i m0f = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    wa = _mm256_cvtepu8_epi16(_mm_and_si128(b, m0f));                     // even positions
    wb = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), m0f));  // odd positions
  } else {
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i b = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), flip);  // u - 128
    wa = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(b));
    wb = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(b, 1));
  }
}

// Activations rounded to int16 per chunk of 256 values: xq (M, K), xs (M, nch) chunk scales, and per weight
// group the sums of the rounded activations, xg (M, G) (so that offsets see the same x as the dot products).
struct QX {
  const int16_t* xq;
  const float* xs;
  const float* xg;
  int64_t nch;
};

constexpr int64_t XCHUNK = 256;

// Rows [n0, n1) of y for MT consecutive rows of x (MT = 1 or 2). mn holds the offsets m - c*s (always given).
// Each row of x keeps two float accumulators per chunk (groups, or the two halves of a block of 32 at groups of
// 16, alternate between them) so that consecutive groups' multiply-adds do not wait on each other, and the
// offsets' sum over the groups runs 8 groups per vector: both only reorder fp32 sums.
template <int BITS, int MT>
void gemm_rows(const QX& x, int64_t i0, int64_t K, const uint8_t* q, const float* s, const float* mn, float* y,
               int64_t ldy, int64_t G, int64_t gs, int64_t n0, int64_t n1) {
  const int64_t row_bytes = K * BITS / 8;
  const int64_t block_bytes = 32 * BITS / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = q + n * row_bytes;
    const float* sr = s + n * G;
    __m256 tot[MT];
    for (int i = 0; i < MT; ++i) tot[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < x.nch; ++j) {
      const int64_t c0 = j * XCHUNK, c1 = std::min(K, c0 + XCHUNK);
      __m256 tc[MT][2];
      __m256i a[MT][2];
      for (int i = 0; i < MT; ++i) {
        tc[i][0] = tc[i][1] = _mm256_setzero_ps();
        a[i][0] = a[i][1] = _mm256_setzero_si256();
      }
      if (BITS == 8 && gs == 16) {  // two groups per block of 32: the two halves (wa, wb) take their own scales
        for (int64_t k = c0; k < c1; k += 32) {
          __m256i wa, wb;
          load_block<BITS>(qr + k, wa, wb);
          const __m256 s0 = _mm256_set1_ps(sr[k / 16]), s1 = _mm256_set1_ps(sr[k / 16 + 1]);
          for (int i = 0; i < MT; ++i) {
            const int16_t* xr = x.xq + (i0 + i) * K + k;
            const __m256i pa = _mm256_madd_epi16(wa, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr)));
            const __m256i pb = _mm256_madd_epi16(wb, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16)));
            tc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pa), s0, tc[i][0]);
            tc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pb), s1, tc[i][1]);
          }
        }
      } else
      for (int64_t k = c0, g = c0 / gs; k < c1; ++g) {  // the groups (or parts of groups) in this chunk
        const int64_t ke = std::min(c1, (g + 1) * gs);
        for (; k < ke; k += 32) {
          __m256i wa, wb;
          load_block<BITS>(qr + (k >> 5) * block_bytes, wa, wb);
          for (int i = 0; i < MT; ++i) {
            const int16_t* xr = x.xq + (i0 + i) * K + k;
            a[i][0] = _mm256_add_epi32(a[i][0], _mm256_madd_epi16(wa, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))));
            a[i][1] = _mm256_add_epi32(a[i][1], _mm256_madd_epi16(wb, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16))));
          }
        }
        const __m256 sg = _mm256_set1_ps(sr[g]);  // apply the group's scale
        for (int i = 0; i < MT; ++i) {
          tc[i][g & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a[i][0], a[i][1])), sg, tc[i][g & 1]);
          a[i][0] = a[i][1] = _mm256_setzero_si256();
        }
      }
      for (int i = 0; i < MT; ++i)
        tot[i] = _mm256_fmadd_ps(_mm256_add_ps(tc[i][0], tc[i][1]), _mm256_set1_ps(x.xs[(i0 + i) * x.nch + j]), tot[i]);
    }
    const float* mr = mn + n * G;
    for (int i = 0; i < MT; ++i) {
      const float* xg = x.xg + (i0 + i) * G;
      __m256 r8 = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= G; g += 8) r8 = _mm256_fmadd_ps(_mm256_loadu_ps(mr + g), _mm256_loadu_ps(xg + g), r8);
      float r = hsum(r8);
      for (; g < G; ++g) r += mr[g] * xg[g];
      y[(i0 + i) * ldy + n] = hsum(tot[i]) + r;
    }
  }
}

template <int BITS>
void gemm_impl(const QX& qx, int64_t M, int64_t K, const std::vector<Segment>& segs, torch::Tensor& y, int64_t G,
               int64_t gs) {
  const int64_t N = y.size(1);
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(8, N / (4 * at::get_num_threads()));
  const int64_t row_bytes = K * BITS / 8;
  at::parallel_for(0, N, grain, [&](int64_t b0, int64_t b1) {
    for (const Segment& sg : segs) {  // the part of [b0, b1) that falls in this segment
      const int64_t n0 = std::max(b0, sg.start), n1 = std::min(b1, sg.start + sg.rows);
      if (n0 >= n1) continue;
      // shift pointers so that row index n (global) addresses the segment's row n - start
      const uint8_t* q = sg.q - sg.start * row_bytes;
      const float* s = sg.s - sg.start * G;
      const float* mn = sg.mn - sg.start * G;
      int64_t i = 0;
      for (; i + 2 <= M; i += 2) gemm_rows<BITS, 2>(qx, i, K, q, s, mn, yp, N, G, gs, n0, n1);
      for (; i < M; ++i) gemm_rows<BITS, 1>(qx, i, K, q, s, mn, yp, N, G, gs, n0, n1);
    }
  });
}

// Round each row of x to int16 per chunk of XCHUNK values (scale = max|x| / 32767); per-group sums of the result.
// For 4 bits the rounded values are stored permuted within each block of 32 (even positions, then odd) to
// match the nibble order of the packed codes.
void quantize_x(const float* x, int64_t M, int64_t K, int64_t gs, int64_t G, bool interleave, int16_t* xq, float* xs,
                float* xg) {
  const int64_t nch = (K + XCHUNK - 1) / XCHUNK;
  for (int64_t i = 0; i < M; ++i) {
    float* xgr = xg + i * G;
    for (int64_t g = 0; g < G; ++g) xgr[g] = 0.f;
    for (int64_t j = 0; j < nch; ++j) {
      const int64_t c0 = j * XCHUNK, c1 = std::min(K, c0 + XCHUNK);
      const float* xr = x + i * K;
      float amax = 0.f;
      for (int64_t k = c0; k < c1; ++k) amax = std::max(amax, std::fabs(xr[k]));
      const float sc = amax > 0.f ? amax / 32767.f : 1.f;
      const float inv = 1.f / sc;
      int16_t* qr = xq + i * K;
      for (int64_t k = c0; k < c1; k += 32) {  // 32-blocks never straddle a group (gs a multiple of 32, or 16:
        int32_t sum[2] = {0, 0};                // then each half of the block is a group)
        for (int64_t t = 0; t < 32; ++t) {
          const int32_t v = static_cast<int32_t>(std::nearbyint(xr[k + t] * inv));
          const int16_t vq = static_cast<int16_t>(std::max(-32767, std::min(32767, v)));
          qr[k + (interleave ? (t >> 1) + 16 * (t & 1) : t)] = vq;
          sum[gs == 16 && t >= 16] += vq;
        }
        xgr[k / gs] += sc * static_cast<float>(sum[0]);
        if (gs == 16) xgr[k / gs + 1] += sc * static_cast<float>(sum[1]);
      }
      xs[i * nch + j] = sc;
    }
  }
}

}  // namespace

// y (M, sum N_j) = x (M, K) @ [W_1; W_2; ...]^T: one call for several weights that share the input (fused
// QKV or gate/up without concatenating their buffers). x fp32 contiguous, natural order; ms_j the offsets m - c*s of W = u*s + (m - c*s).
torch::Tensor qgemm(torch::Tensor x, std::vector<torch::Tensor> qs, std::vector<torch::Tensor> ss,
                    std::vector<torch::Tensor> ms, int64_t bits, int64_t gs) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be 2-D contiguous fp32");
  const int64_t K = x.size(1), M = x.size(0);
  int64_t N = 0;
  const std::vector<Segment> segs = llmquant_kernels::make_segments(qs, ss, ms, bits, K, gs, N);
  const int64_t G = ss[0].size(1);
  const int64_t nch = (K + XCHUNK - 1) / XCHUNK;
  // scratch as plain vectors, not tensors: a decode call (M = 1) is short enough for tensor bookkeeping to show
  std::vector<int16_t> xq(M * K);
  std::vector<float> xsc(M * nch), xg(M * G);
  quantize_x(x.data_ptr<float>(), M, K, gs, G, bits == 4, xq.data(), xsc.data(), xg.data());
  const QX qx{xq.data(), xsc.data(), xg.data(), nch};
  auto y = torch::empty({M, N}, x.options());
  if (bits == 4)
    gemm_impl<4>(qx, M, K, segs, y, G, gs);
  else
    gemm_impl<8>(qx, M, K, segs, y, G, gs);
  return y;
}

// The dequantized weight (N, K) fp32 in natural column order, for large batches (then a float GEMM).
torch::Tensor dequant(torch::Tensor q, torch::Tensor s, torch::Tensor mn, int64_t bits, int64_t N, int64_t K,
                      int64_t gs) {
  llmquant_kernels::check_args(q, s, mn, bits, N, K, gs);
  auto w = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* mp = mn.numel() ? mn.data_ptr<float>() : nullptr;
  float* wp = w.data_ptr<float>();
  const int64_t G = s.size(1);
  const int64_t row_bytes = K * bits / 8;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* qr = qp + n * row_bytes;
      float* wr = wp + n * K;
      for (int64_t g = 0; g < G; ++g) {
        const float sc = sp[n * G + g], off = mp ? mp[n * G + g] : 0.f;
        const int64_t k1 = std::min(K, (g + 1) * gs);
        if (bits == 4) {
          for (int64_t k = g * gs; k < k1; k += 2) {
            const uint8_t b = qr[k >> 1];
            wr[k] = static_cast<float>(b & 0xF) * sc + off;
            wr[k + 1] = static_cast<float>(b >> 4) * sc + off;
          }
        } else {
          for (int64_t k = g * gs; k < k1; ++k) wr[k] = static_cast<float>(static_cast<int>(qr[k]) - 128) * sc + off;
        }
      }
    }
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemm", &qgemm, "packed int4/int8 weight-only GEMM (AVX2+FMA)");
  m.def("dequant", &dequant, "packed int4/int8 weights to fp32");
  m.def("q8gemm", &q8gemm, "packed int4/int8 GEMM with activations rounded to int8 per block of 32 (qgemm_q8act.cpp)",
        py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("offsets"), py::arg("bits"), py::arg("group_size"),
        py::arg("isa"), py::arg("bases"), py::arg("tiled_rows") = std::vector<int64_t>{});
  m.def("q8_tile", &q8_tile, "packed codes (row layout) to q8gemm's tiled layout (rows padded to 8)");
  m.def("q8_quantize", &q8_quantize, "rows of x rounded to int8 per block of 32: (codes int8, scales fp32)");
  m.def("q8_best_isa", &q8_best_isa, "1 when q8gemm's VNNI path runs on this CPU, 0 for the AVX2 path");
  register_decode_step(m);
  register_gptq(m);
}

// Packed int4 / int8 weight-only GEMM for x86 CPUs with AVX2 + FMA (llmquant, issue 7).
//
// Weights are read in llmquant's own packed format (src/llmquant/packing.py), unchanged: unsigned codes
// u = q - qmin, row-major (out_features x in_features); for 4 bits byte j holds u[2j] in its low nibble and
// u[2j+1] in its high nibble. They are unpacked in registers, never written back to memory, so decode moves
// 0.5 (int4) or 1 (int8) byte per weight instead of 2 (fp16) or 4 (fp32).
//
// Numerics (weight-only, fp32 activations and accumulation):
//   W[n,k] = (u[n,k] - c) * s[n,g] + m[n,g],   c = 2^(bits-1), g = k / group_size,
// with m = (c + qmin - z) * s, so symmetric schemes have m = 0. Then
//   y[i,n] = sum_g s[n,g] * sum_{k in g} x[i,k] (u[n,k] - c)  +  sum_g m[n,g] * xsum[i,g].
// For 4 bits the caller passes x permuted within each block of 32 (even positions, then odd) to match the
// nibble order, so no shuffle is needed in the inner loop.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

namespace {

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

// 32 weights of one row, centred (u - c), as four vectors of 8 floats in the order x is given.
template <int BITS>
inline void load_block(const uint8_t* p, __m256& w0, __m256& w1, __m256& w2, __m256& w3) {
  if constexpr (BITS == 4) {
    const __m128i m0f = _mm_set1_epi8(0x0F);
    const __m128i eight = _mm_set1_epi8(8);
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    __m128i lo = _mm_sub_epi8(_mm_and_si128(b, m0f), eight);
    __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m0f), eight);
    w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
  } else {
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i b = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), flip);  // u - 128
    __m128i b0 = _mm256_castsi256_si128(b);
    __m128i b1 = _mm256_extracti128_si256(b, 1);
    w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0));
    w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8)));
    w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1));
    w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8)));
  }
}

// Rows [n0, n1) of y for MT consecutive rows of x (MT = 1 or 2).
template <int BITS, int MT>
void gemm_rows(const float* x, int64_t ldx, const uint8_t* q, const float* s, const float* mn, const float* xsum,
               float* y, int64_t ldy, int64_t K, int64_t G, int64_t gs, int64_t n0, int64_t n1) {
  const int64_t row_bytes = K * BITS / 8;
  const int64_t block_bytes = 32 * BITS / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = q + n * row_bytes;
    const float* sr = s + n * G;
    __m256 tot[MT];
    for (int i = 0; i < MT; ++i) tot[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * gs;
      const int64_t k1 = std::min(K, k0 + gs);
      __m256 a[MT][4];
      for (int i = 0; i < MT; ++i)
        for (int j = 0; j < 4; ++j) a[i][j] = _mm256_setzero_ps();
      for (int64_t k = k0; k < k1; k += 32) {
        __m256 w0, w1, w2, w3;
        load_block<BITS>(qr + (k / 32) * block_bytes, w0, w1, w2, w3);
        for (int i = 0; i < MT; ++i) {
          const float* xr = x + i * ldx + k;
          a[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a[i][0]);
          a[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), a[i][1]);
          a[i][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), a[i][2]);
          a[i][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), a[i][3]);
        }
      }
      const __m256 sg = _mm256_set1_ps(sr[g]);
      for (int i = 0; i < MT; ++i) {
        __m256 acc = _mm256_add_ps(_mm256_add_ps(a[i][0], a[i][1]), _mm256_add_ps(a[i][2], a[i][3]));
        tot[i] = _mm256_fmadd_ps(acc, sg, tot[i]);
      }
    }
    for (int i = 0; i < MT; ++i) {
      float r = hsum(tot[i]);
      if (mn != nullptr) {
        const float* mr = mn + n * G;
        const float* xs = xsum + i * G;
        for (int64_t g = 0; g < G; ++g) r += mr[g] * xs[g];
      }
      y[i * ldy + n] = r;
    }
  }
}

// One weight segment: rows [start, start + rows) of the output, read from their own packed buffer.
struct Segment {
  const uint8_t* q;
  const float* s;
  const float* mn;  // nullptr: no offsets (symmetric)
  int64_t start, rows;
};

template <int BITS>
void gemm_impl(const torch::Tensor& x, const std::vector<Segment>& segs, const float* xsum, torch::Tensor& y,
               int64_t G, int64_t gs) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const float* xp = x.data_ptr<float>();
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
      const float* mn = sg.mn ? sg.mn - sg.start * G : nullptr;
      int64_t i = 0;
      for (; i + 2 <= M; i += 2)
        gemm_rows<BITS, 2>(xp + i * K, K, q, s, mn, xsum ? xsum + i * G : nullptr, yp + i * N, N, K, G, gs, n0, n1);
      for (; i < M; ++i)
        gemm_rows<BITS, 1>(xp + i * K, K, q, s, mn, xsum ? xsum + i * G : nullptr, yp + i * N, N, K, G, gs, n0, n1);
    }
  });
}

void check_args(const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& mn, int64_t bits, int64_t N,
                int64_t K, int64_t gs) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(K % 32 == 0 && gs % 32 == 0, "in_features and group size must be multiples of 32");
  TORCH_CHECK(q.dtype() == torch::kUInt8 && q.is_contiguous() && q.numel() == N * K * bits / 8, "bad packed weights");
  TORCH_CHECK(s.dtype() == torch::kFloat32 && s.is_contiguous() && s.size(0) == N && s.size(1) == (K + gs - 1) / gs,
              "bad scales");
  TORCH_CHECK(mn.numel() == 0 || (mn.dtype() == torch::kFloat32 && mn.is_contiguous() && mn.sizes() == s.sizes()),
              "bad minimums");
}

}  // namespace

// y (M, sum N_j) = x (M, K) @ [W_1; W_2; ...]^T: one call for several weights that share the input (fused
// QKV or gate/up without concatenating their buffers). x fp32 contiguous (for bits=4, permuted within
// blocks of 32); xsum (M, G) per-group sums of x, needed when any mins_j is non-empty.
torch::Tensor qgemm(torch::Tensor x, std::vector<torch::Tensor> qs, std::vector<torch::Tensor> ss,
                    std::vector<torch::Tensor> ms, torch::Tensor xsum, int64_t bits, int64_t gs) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be 2-D contiguous fp32");
  TORCH_CHECK(!qs.empty() && qs.size() == ss.size() && qs.size() == ms.size(), "one scale and min per weight");
  const int64_t K = x.size(1);
  std::vector<Segment> segs;
  int64_t N = 0;
  bool any_min = false;
  for (size_t j = 0; j < qs.size(); ++j) {
    const int64_t rows = ss[j].size(0);
    check_args(qs[j], ss[j], ms[j], bits, rows, K, gs);
    TORCH_CHECK(ss[j].size(1) == ss[0].size(1), "all weights must have the same groups");
    any_min = any_min || ms[j].numel() > 0;
    segs.push_back({qs[j].data_ptr<uint8_t>(), ss[j].data_ptr<float>(),
                    ms[j].numel() ? ms[j].data_ptr<float>() : nullptr, N, rows});
    N += rows;
  }
  const int64_t G = ss[0].size(1);
  TORCH_CHECK(!any_min || (xsum.dtype() == torch::kFloat32 && xsum.is_contiguous() && xsum.size(0) == x.size(0) &&
                           xsum.size(1) == G), "bad xsum");
  auto y = torch::empty({x.size(0), N}, x.options());
  const float* xs = any_min ? xsum.data_ptr<float>() : nullptr;
  if (bits == 4)
    gemm_impl<4>(x, segs, xs, y, G, gs);
  else
    gemm_impl<8>(x, segs, xs, y, G, gs);
  return y;
}

// The dequantized weight (N, K) fp32 in natural column order, for large batches (then a float GEMM).
torch::Tensor dequant(torch::Tensor q, torch::Tensor s, torch::Tensor mn, int64_t bits, int64_t N, int64_t K,
                      int64_t gs) {
  check_args(q, s, mn, bits, N, K, gs);
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
      for (int64_t k = 0; k < K; ++k) {
        int u = bits == 4 ? ((qr[k >> 1] >> ((k & 1) * 4)) & 0xF) : qr[k];
        const int64_t g = k / gs;
        const float c = bits == 4 ? 8.f : 128.f;
        wr[k] = (static_cast<float>(u) - c) * sp[n * G + g] + (mp ? mp[n * G + g] : 0.f);
      }
    }
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemm", &qgemm, "packed int4/int8 weight-only GEMM (AVX2+FMA)");
  m.def("dequant", &dequant, "packed int4/int8 weights to fp32");
}

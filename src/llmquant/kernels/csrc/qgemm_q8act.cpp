// Packed int4 / int8 GEMM for decode with the activations rounded to int8 per block of 32 values, as
// llama.cpp's CPU matmul does for Q4_0 / Q8_0 weights (its vec_dot_type Q8_0), and integer dot products.
//
// Weights are llmquant's packed codes as stored (see qgemm_avx2.cpp): unsigned u, W = (u - b) * s + o per
// (row, group), b = 0 at 4 bits and 128 at 8 bits, groups a multiple of 32 values.
//
// Activations: each row of x is cut into blocks of 32 values; per block d = fp16(max|x| / 127) (the scale
// kept in fp32 after that rounding) and xq = round(x / d) in [-127, 127] (round half to even; xq = 0 when d
// is 0): exactly llmquant's ``gguf:Q8_0-act`` activation scheme, and llama.cpp's Q8_0 blocks up to its
// rounding with 1 / d computed before the fp16 rounding of d. Then, exactly in int32 per block b,
//   y[i,n] = sum_g s[n,g] sum_{b in g} d[i,b] sum_{k in b} (u[n,k] - b) xq[i,k]  +  sum_g o[n,g] xg[i,g],
// xg[i,g] = sum_{b in g} d[i,b] sum_{k in b} xq[i,k] (the block sums of the rounded x), and the rest in fp32.
//
// Symmetric weights (no offsets passed) are W = (u - c) * s with an integer base c (-qmin: 8 for Q4_0, 127
// for Q8_0, 128 for int8): then sum_k (u - c) xq is exact in int32 too, and neither offsets nor the group sums
// are read. Scales may be given in fp16 (where the stored scales are fp16, as GGUF's): 2 bytes per group.
// The integer base enters as a per-lane correction -c' * (lane sum of xq) (c' = c less what the path's dot
// product already subtracts), kept per block with the rounded x and added to each block's lane sums.
//
// Unsigned times signed: the instructions multiply unsigned bytes by signed bytes. 4-bit codes u in [0, 15]
// are unsigned as stored (vpmaddubsw pairs stay below 2 * 15 * 127, no saturation). 8-bit codes: with
// AVX512-VNNI, vpdpbusd sums u * xq without saturation into an accumulator that starts at -128 times the
// lane's sum of xq (kept per block with the rounded x), which gives sum (u - 128) xq exactly; with AVX2,
// w = u - 128 is a signed byte and |w| * sign(xq, w) keeps the pairs of vpmaddubsw within int16
// (2 * 128 * 127 < 32768), llama.cpp's trick.
//
// Instruction set chosen at run time: the VNNI path (256-bit vpdpbusd, AVX512-VL + AVX512-VNNI) is compiled
// for that target only (#pragma GCC target, i.e. a target attribute on its functions) and runs when
// __builtin_cpu_supports says the CPU has it; the AVX2 path runs otherwise or when the caller asks for it.
#include "qgemm_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

using llmquant_kernels::hsum;
using llmquant_kernels::Segment;

// x rounded per block of 32: codes (M, K) (4 bits: permuted within each block to the nibble order, even
// positions then odd), scales d (M, nb), group sums xg (M, G).
struct Q8X {
  const int8_t* q;
  const float* d;
  const float* xg;
  const int32_t* bs;  // (M, nb): each block's sum of codes
  const int32_t* hs;  // (M, nb): groups of 16, the sum of each block's first 16 codes (else nullptr)
  // many rows (the prefill path): the same block-major, so that one block of consecutive rows is contiguous:
  // codes (nb, M, 32), d, bs and hs (nb, M)
  int64_t M;
  const int8_t* qb;
  const float* db;
  const int32_t* bsb;
  const int32_t* hsb;
};

// One weight segment of a fused call, its pointers shifted so that global output row n addresses its row;
// corr (M, nb, 8): -c' times the sum of the 4 codes of x each int32 lane of the dot product sees.
struct Q8Seg {
  const uint8_t* q;
  const void* s;      // fp32 or fp16 scales
  const float* mn;    // offsets, or nullptr (symmetric: the base is in corr)
  const int32_t* corr;
  bool half;
  int64_t start, rows;
  int32_t base;  // the codes' integer base (b with offsets, c without): the prefill path subtracts it per block
};

namespace avx2 {
struct Wv {
  __m256i u, a;  // 4 bits: codes; 8 bits: signed codes u - 128 and their magnitudes
};
template <int BITS>
inline Wv prep(__m256i u) {
  if constexpr (BITS == 4) {
    return {u, u};
  } else {
    const __m256i w = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
    return {w, _mm256_abs_epi8(w)};
  }
}
template <int BITS>
inline __m256i dot(const Wv& w, __m256i xv, const int32_t* corr) {
  __m256i p;
  if constexpr (BITS == 4)
    p = _mm256_maddubs_epi16(w.u, xv);
  else
    p = _mm256_maddubs_epi16(w.a, _mm256_sign_epi8(xv, w.u));
  return _mm256_add_epi32(_mm256_madd_epi16(p, _mm256_set1_epi16(1)),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr)));
}
#include "qgemm_q8act_rows.inc"
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512vnni")
namespace vnni {
struct Wv {
  __m256i u;
};
template <int BITS>
inline Wv prep(__m256i u) {
  return {u};
}
template <int BITS>
inline __m256i dot(const Wv& w, __m256i xv, const int32_t* corr) {
  return _mm256_dpbusd_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr)), w.u, xv);
}
#include "qgemm_q8act_rows.inc"

// Prefill (many rows of x): 8 output rows at a time, one per int32 lane. Each weight block of the 8 rows is
// unpacked and transposed once (lane j holds row n + j's four codes of each k-quad) and serves every row of x
// in the chunk; x's four codes of a k-quad are broadcast to the lanes. Per (block, row of x): eight vpdpbusd
// from -c times the block's sum of codes (the base), one conversion, one FMA with the 8 rows' scale times the
// block's d. The same sums as the row kernel (exact int32 per block, fp32 after), in another order.
constexpr int64_t PREFILL_CHUNK = 256;  // rows of x whose accumulators (8 floats each) stay in L1

// R rows of x against one block of 8 weight rows (w: the transposed codes): R independent chains of eight
// vpdpbusd (enough in flight to hide their latency at R = 8), then acc[i] += (s8 * d[i]) * sum. G16 (groups
// of 16, 8 bits): two chains of four per row, k-quads 0-3 (group 2b, scales s8) and 4-7 (group 2b + 1, s8b),
// each from -base times its half's sum of codes (hb: the first halves' sums). Row j of x at xb + j xs, its
// d, sum and half sum at j ds.
template <int R, bool G16 = false>
inline __attribute__((always_inline)) void rows_of_x(const __m256i (&w)[8], const int8_t* xb, const float* db,
                                                     const int32_t* sb, const int32_t* hb, float* acc, int64_t xs,
                                                     int64_t ds, __m256 s8, __m256 s8b, int32_t base) {
  auto xk = [&](int j, int k) __attribute__((always_inline)) {
    return _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xb + j * xs + 4 * k));
  };
  if constexpr (G16) {
    __m256i p[R], q[R];
    for (int j = 0; j < R; ++j) {
      p[j] = _mm256_set1_epi32(-base * hb[j * ds]);
      q[j] = _mm256_set1_epi32(-base * (sb[j * ds] - hb[j * ds]));
    }
    for (int k = 0; k < 4; ++k)
      for (int j = 0; j < R; ++j) {
        p[j] = _mm256_dpbusd_epi32(p[j], w[k], xk(j, k));
        q[j] = _mm256_dpbusd_epi32(q[j], w[k + 4], xk(j, k + 4));
      }
    for (int j = 0; j < R; ++j) {
      float* a = acc + j * 8;
      const __m256 dj = _mm256_set1_ps(db[j * ds]);
      const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[j]), _mm256_mul_ps(s8, dj), _mm256_load_ps(a));
      _mm256_store_ps(a, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[j]), _mm256_mul_ps(s8b, dj), t));
    }
    return;
  }
  __m256i p[R];
  for (int j = 0; j < R; ++j) p[j] = _mm256_set1_epi32(-base * sb[j * ds]);
  for (int k = 0; k < 8; ++k)
    for (int j = 0; j < R; ++j) p[j] = _mm256_dpbusd_epi32(p[j], w[k], xk(j, k));
  for (int j = 0; j < R; ++j) {
    float* a = acc + j * 8;
    _mm256_store_ps(a, _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[j]), _mm256_mul_ps(s8, _mm256_set1_ps(db[j * ds])),
                                       _mm256_load_ps(a)));
  }
}

// The first ``rows`` (<= 8) lanes of r to dst.
inline void store8(float* dst, __m256 r, int64_t rows) {
  if (rows == 8) {
    _mm256_storeu_ps(dst, r);
    return;
  }
  alignas(32) float o[8];
  _mm256_store_ps(o, r);
  for (int64_t j = 0; j < rows; ++j) dst[j] = o[j];
}

// R <= 4 rows of x (decode, small batches) against one tile of 8 weight rows, every block: accumulators in
// registers, two sets (even and odd blocks), and each row's eight vpdpbusd split over 8 / R chains so that
// enough of them are in flight; the rows' sums, the offsets' term, stored (``rows`` valid ones). G16 (groups
// of 16): each half block its own chains and scales, the two sets of accumulators one per half.
template <int R, bool G16, typename Codes, typename Scales, typename Offs>
inline __attribute__((always_inline)) void few8(const Q8X& x, const Q8Seg& sg, int64_t i0, int64_t K, float* y,
                                                int64_t ldy, int64_t G, int64_t nb, int64_t bpg, int64_t n,
                                                int64_t rows, Codes&& codes, Scales&& scales, Offs&& offs) {
  constexpr int C = R == 1 ? 4 : (R == 2 ? 2 : 1);  // chains per row of x
  __m256 acc[2][R];
  for (int j = 0; j < R; ++j) acc[0][j] = acc[1][j] = _mm256_setzero_ps();
  if constexpr (G16) {
    constexpr int CH = C > 1 ? C / 2 : 1;  // chains per half block
    for (int64_t b = 0; b < nb; ++b) {
      const __m256 sl = scales(2 * b), sh = scales(2 * b + 1);
      __m256i w[8];
      codes(b, w);
      for (int j = 0; j < R; ++j) {
        const int8_t* xb = x.q + (i0 + j) * K + b * 32;
        const int32_t h = x.hs[(i0 + j) * nb + b];
        __m256i pl[CH], ph[CH];
        pl[0] = _mm256_set1_epi32(-sg.base * h);
        ph[0] = _mm256_set1_epi32(-sg.base * (x.bs[(i0 + j) * nb + b] - h));
        for (int c = 1; c < CH; ++c) pl[c] = ph[c] = _mm256_setzero_si256();
        for (int k = 0; k < 4; ++k) {
          pl[k % CH] = _mm256_dpbusd_epi32(pl[k % CH], w[k], _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xb + 4 * k)));
          ph[k % CH] = _mm256_dpbusd_epi32(ph[k % CH], w[k + 4],
                                           _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xb + 16 + 4 * k)));
        }
        for (int c = 1; c < CH; ++c) pl[0] = _mm256_add_epi32(pl[0], pl[c]), ph[0] = _mm256_add_epi32(ph[0], ph[c]);
        const __m256 dj = _mm256_set1_ps(x.d[(i0 + j) * nb + b]);
        acc[0][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pl[0]), _mm256_mul_ps(sl, dj), acc[0][j]);
        acc[1][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ph[0]), _mm256_mul_ps(sh, dj), acc[1][j]);
      }
    }
  } else {
  __m256 s8 = scales(0);
  int64_t g = 0, left = bpg;  // the group advances every bpg blocks (counted: no division per block)
  for (int64_t b = 0; b < nb; ++b) {
    if (left == 0) s8 = scales(++g), left = bpg;
    --left;
    __m256i w[8];
    codes(b, w);
    for (int j = 0; j < R; ++j) {
      const int8_t* xb = x.q + (i0 + j) * K + b * 32;
      __m256i p[C];
      p[0] = _mm256_set1_epi32(-sg.base * x.bs[(i0 + j) * nb + b]);
      for (int c = 1; c < C; ++c) p[c] = _mm256_setzero_si256();
      for (int k = 0; k < 8; ++k)
        p[k % C] = _mm256_dpbusd_epi32(p[k % C], w[k], _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xb + 4 * k)));
      for (int c = 1; c < C; ++c) p[0] = _mm256_add_epi32(p[0], p[c]);
      acc[b & 1][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[0]), _mm256_mul_ps(s8, _mm256_set1_ps(x.d[(i0 + j) * nb + b])),
                                      acc[b & 1][j]);
    }
  }
  }
  for (int j = 0; j < R; ++j) {
    __m256 r = _mm256_add_ps(acc[0][j], acc[1][j]);
    if (sg.mn) r = _mm256_add_ps(r, offs(i0 + j));
    store8(y + (i0 + j) * ldy + n, r, rows);
  }
}

//
// TILED: the weights in the tiled layout (q8_tile): per tile of 8 rows (n = 8 t) and block, the codes already
// in lanes (4 bits: four 32-byte vectors, vector k holding each row's bytes 4k..4k+3 of the block, low nibbles
// k-quad k, high nibbles k-quad k + 4; 8 bits: eight vectors; 6 bits (BITS 6, tiled only): 8-bit codes c in
// [96, 159] kept as c - 96, their low nibbles as the 4-bit layout's four vectors, then two vectors of the top
// two bits, vector m's bits 2h, 2h + 1 those of k-quad m + 2h), then the 8 rows' scales (and offsets) of each
// group together; ``rows`` <= 8 valid rows in the tile (the padding rows are computed, not stored).
template <int BITS, bool HALF, bool OFFS, bool TILED = false, bool G16 = false>
void prefill8(const Q8X& x, const Q8Seg& sg, int64_t i0, int64_t i1, int64_t K, float* y, int64_t ldy, int64_t G,
              int64_t gs, int64_t n, int64_t rows = 8) {
  const int64_t nb = K / 32, bpg = gs / 32, row_bytes = K * BITS / 8;
  const __m128i m0f = _mm_set1_epi8(0x0F);
  const __m256i m0f2 = _mm256_set1_epi8(0x0F);
  const uint8_t* qr[8];
  const int64_t t8 = n - sg.start;  // the tile's first row within its segment (tiled: a multiple of 8)
  for (int r = 0; r < 8; ++r) qr[r] = sg.q + (n + r) * row_bytes;
  const uint8_t* qt = sg.q + (sg.start + t8) * row_bytes;  // tiled: the tile's codes (sg.q addresses row 0)
  auto scales = [&](int64_t g) __attribute__((always_inline)) {
    if constexpr (TILED) {
      const int64_t at = (t8 * G + g * 8) + sg.start * G;
      if constexpr (HALF)
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(sg.s) + at)));
      else
        return _mm256_loadu_ps(static_cast<const float*>(sg.s) + at);
    }
    alignas(32) float t[8];
    for (int r = 0; r < 8; ++r) {
      if constexpr (HALF)
        t[r] = _cvtsh_ss(static_cast<const uint16_t*>(sg.s)[(n + r) * G + g]);
      else
        t[r] = static_cast<const float*>(sg.s)[(n + r) * G + g];
    }
    return _mm256_load_ps(t);
  };
  // the 8 rows' codes of block b in lanes: w[k] lane j = row n + j's four codes of k-quad k
  auto codes = [&](int64_t b, __m256i (&w)[8]) __attribute__((always_inline)) {
    __m256i u[8], t[8], v[8];
      if constexpr (TILED && BITS == 6) {
        const uint8_t* qb = qt + b * 192;
        const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 128));
        const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 160));
        const __m256i m30 = _mm256_set1_epi8(0x30);
        // k-quad k's top bits: bits 2 (k / 2), 2 (k / 2) + 1 of vector k % 2, moved to bits 4, 5 (shifts of
        // 16-bit lanes: what crosses into the other byte lands outside bits 4, 5 and is masked off)
        const __m256i hb[8] = {_mm256_slli_epi16(h0, 4), _mm256_slli_epi16(h1, 4), _mm256_slli_epi16(h0, 2),
                               _mm256_slli_epi16(h1, 2), h0, h1, _mm256_srli_epi16(h0, 2), _mm256_srli_epi16(h1, 2)};
        for (int k = 0; k < 4; ++k) {
          const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 32 * k));
          w[k] = _mm256_or_si256(_mm256_and_si256(c, m0f2), _mm256_and_si256(hb[k], m30));
          w[k + 4] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), m0f2), _mm256_and_si256(hb[k + 4], m30));
        }
      } else if constexpr (TILED) {
        const uint8_t* qb = qt + b * (BITS == 4 ? 128 : 256);
        for (int k = 0; k < (BITS == 4 ? 4 : 8); ++k) {
          const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 32 * k));
          if constexpr (BITS == 4) {
            w[k] = _mm256_and_si256(c, m0f2);
            w[k + 4] = _mm256_and_si256(_mm256_srli_epi16(c, 4), m0f2);
          } else {
            w[k] = c;
          }
        }
      } else {
      for (int r = 0; r < 8; ++r) {
        if constexpr (BITS == 4) {
          const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[r] + b * 16));
          u[r] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), m0f), _mm_and_si128(p, m0f));
        } else {
          u[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr[r] + b * 32));
        }
      }
      // 8 x 8 transpose of 32-bit elements: w[k] lane j = u[j] element k
      for (int r = 0; r < 8; r += 2) {
        t[r] = _mm256_unpacklo_epi32(u[r], u[r + 1]);
        t[r + 1] = _mm256_unpackhi_epi32(u[r], u[r + 1]);
      }
      for (int r = 0; r < 8; r += 4) {
        v[r] = _mm256_unpacklo_epi64(t[r], t[r + 2]);
        v[r + 1] = _mm256_unpackhi_epi64(t[r], t[r + 2]);
        v[r + 2] = _mm256_unpacklo_epi64(t[r + 1], t[r + 3]);
        v[r + 3] = _mm256_unpackhi_epi64(t[r + 1], t[r + 3]);
      }
      for (int k = 0; k < 4; ++k) {
        w[k] = _mm256_permute2x128_si256(v[k], v[k + 4], 0x20);
        w[k + 4] = _mm256_permute2x128_si256(v[k], v[k + 4], 0x31);
      }
      }
  };
  auto offs = [&](int64_t i) __attribute__((always_inline)) {  // sum_g o[n + j, g] xg[i, g] for the 8 rows
    const float* xg = x.xg + i * G;
    __m256 r = _mm256_setzero_ps();
    if constexpr (TILED) {  // four chains of groups (a multiply-add need not wait for the one before)
      const float* o = sg.mn + sg.start * G + t8 * G;
      __m256 r4[4] = {r, r, r, r};
      int64_t g = 0;
      for (; g + 4 <= G; g += 4)
        for (int u = 0; u < 4; ++u)
          r4[u] = _mm256_fmadd_ps(_mm256_loadu_ps(o + (g + u) * 8), _mm256_set1_ps(xg[g + u]), r4[u]);
      for (; g < G; ++g) r4[0] = _mm256_fmadd_ps(_mm256_loadu_ps(o + g * 8), _mm256_set1_ps(xg[g]), r4[0]);
      return _mm256_add_ps(_mm256_add_ps(r4[0], r4[1]), _mm256_add_ps(r4[2], r4[3]));
    }
    for (int64_t g = 0; g < G; ++g) {  // the row layout: the 8 rows' offsets gathered
      alignas(32) float o[8];
      for (int j = 0; j < 8; ++j) o[j] = sg.mn[(n + j) * G + g];
      r = _mm256_fmadd_ps(_mm256_load_ps(o), _mm256_set1_ps(xg[g]), r);
    }
    return r;
  };
  if (i1 - i0 <= 4) {  // decode and small batches: the accumulators stay in registers across the blocks
    switch (i1 - i0) {
      case 1: return few8<1, G16>(x, sg, i0, K, y, ldy, G, nb, bpg, n, rows, codes, scales, offs);
      case 2: return few8<2, G16>(x, sg, i0, K, y, ldy, G, nb, bpg, n, rows, codes, scales, offs);
      case 3: return few8<3, G16>(x, sg, i0, K, y, ldy, G, nb, bpg, n, rows, codes, scales, offs);
      case 4: return few8<4, G16>(x, sg, i0, K, y, ldy, G, nb, bpg, n, rows, codes, scales, offs);
      default: return;
    }
  }
  alignas(64) float acc[PREFILL_CHUNK * 8];
  for (int64_t c0 = i0; c0 < i1; c0 += PREFILL_CHUNK) {
    const int64_t c1 = std::min(i1, c0 + PREFILL_CHUNK), m = c1 - c0;
    std::fill(acc, acc + m * 8, 0.f);
    __m256 s8 = scales(0), s8b = s8;
    int64_t g = 0, left = bpg;
    for (int64_t b = 0; b < nb; ++b) {
      if constexpr (G16) {
        s8 = scales(2 * b), s8b = scales(2 * b + 1);
      } else {
        if (left == 0) s8 = scales(++g), left = bpg;
        --left;
      }
      __m256i w[8];
      codes(b, w);
      // the block-major copies: row i of the chunk at 32 i (codes) and i (d, sums)
      const int8_t* xb = x.qb + (b * x.M + c0) * 32;
      const float* db = x.db + b * x.M + c0;
      const int32_t* sb = x.bsb + b * x.M + c0;
      const int32_t* hb = G16 ? x.hsb + b * x.M + c0 : nullptr;
      auto at = [&](int64_t i) { return G16 ? hb + i : nullptr; };
      int64_t i = 0;
      for (; i + 8 <= m; i += 8)
        rows_of_x<8, G16>(w, xb + i * 32, db + i, sb + i, at(i), acc + i * 8, 32, 1, s8, s8b, sg.base);
      for (; i + 4 <= m; i += 4)
        rows_of_x<4, G16>(w, xb + i * 32, db + i, sb + i, at(i), acc + i * 8, 32, 1, s8, s8b, sg.base);
      for (; i < m; ++i)
        rows_of_x<1, G16>(w, xb + i * 32, db + i, sb + i, at(i), acc + i * 8, 32, 1, s8, s8b, sg.base);
    }
    for (int64_t i = 0; i < m; ++i) {
      __m256 r = _mm256_load_ps(acc + i * 8);
      if constexpr (OFFS) r = _mm256_add_ps(r, offs(c0 + i));
      store8(y + (c0 + i) * ldy + n, r, rows);
    }
  }
}
}  // namespace vnni
#pragma GCC pop_options

using PrefillFn = void (*)(const Q8X&, const Q8Seg&, int64_t, int64_t, int64_t, float*, int64_t, int64_t, int64_t,
                           int64_t, int64_t);

// pf[half][offs]: prefill8 for the row layout (TILED false) or the tiled one; G16: groups of 16 (8 bits)
template <int BITS, bool TILED, bool G16 = false>
void pick_prefill(PrefillFn pf[2][2]) {
  pf[0][0] = vnni::prefill8<BITS, false, false, TILED, G16>, pf[0][1] = vnni::prefill8<BITS, false, true, TILED, G16>;
  pf[1][0] = vnni::prefill8<BITS, true, false, TILED, G16>, pf[1][1] = vnni::prefill8<BITS, true, true, TILED, G16>;
}

// the prefill8 variants for these bits and groups (bpg 0: groups of 16, 8 or 6 bits; 6: tiled only)
template <bool TILED>
void pick_prefill(int64_t bits, int64_t bpg, PrefillFn pf[2][2]) {
  if constexpr (TILED) {
    if (bits == 6) return bpg ? pick_prefill<6, true>(pf) : pick_prefill<6, true, true>(pf);
  }
  if (bits == 4)
    pick_prefill<4, TILED>(pf);
  else if (bpg)
    pick_prefill<8, TILED>(pf);
  else
    pick_prefill<8, TILED, true>(pf);
}

//: rows of x from which q8gemm takes the prefill path (VNNI; groups of 32 or more, or of 16 at 8 bits)
constexpr int64_t PREFILL_MIN_M = 8;

using RowsFn = void (*)(const Q8X&, const Q8Seg&, int64_t, int64_t, float*, int64_t, int64_t, int64_t, int64_t,
                        int64_t);

// fn[mt][half][offs] for mt = 1, 2, 4 rows of x at a time
template <int BITS, int MT>
void pick_mt(bool use_vnni, RowsFn fn[2][2]) {
  if (use_vnni) {
    fn[0][0] = vnni::rows<BITS, MT, false, false>, fn[0][1] = vnni::rows<BITS, MT, false, true>;
    fn[1][0] = vnni::rows<BITS, MT, true, false>, fn[1][1] = vnni::rows<BITS, MT, true, true>;
  } else {
    fn[0][0] = avx2::rows<BITS, MT, false, false>, fn[0][1] = avx2::rows<BITS, MT, false, true>;
    fn[1][0] = avx2::rows<BITS, MT, true, false>, fn[1][1] = avx2::rows<BITS, MT, true, true>;
  }
}

template <int BITS>
void pick(bool use_vnni, RowsFn fn[5][2][2]) {
  pick_mt<BITS, 1>(use_vnni, fn[1]);
  pick_mt<BITS, 2>(use_vnni, fn[2]);
  pick_mt<BITS, 4>(use_vnni, fn[4]);
}

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512f");
}

inline float fp16_round(float v) { return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)); }

// Rounds rows of x (M, K) to int8 per block of 32 (codes natural order, or permuted for 4 bits); d (M, K/32);
// bsum (M, K/32) the blocks' sums of codes. AVX2: divisions and rounding (half to even) as torch's.
void quantize_rows(const float* x, int64_t M, int64_t K, bool interleave, int8_t* xq, float* d, int32_t* bsum) {
  const int64_t nb = K / 32;
  const __m256 sign = _mm256_set1_ps(-0.f), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the lane interleave of the packs
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + i * K + b * 32;
      __m256 v[4];
      __m256 am = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(xb + 8 * j);
        am = _mm256_max_ps(am, _mm256_andnot_ps(sign, v[j]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);
      const float db = fp16_round(std::max(amax / 127.f, 1e-10f));  // as scale_from_absmax, then fp16
      d[i * nb + b] = db;
      int8_t* qb = xq + i * K + b * 32;
      if (!(db > 0.f)) {  // an underflowed scale: every value of the block is 0 at this scale
        std::fill(qb, qb + 32, 0);
        bsum[i * nb + b] = 0;
        continue;
      }
      const __m256 dv = _mm256_set1_ps(db);
      __m256i c[4];
      for (int j = 0; j < 4; ++j) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(v[j], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        c[j] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
      }
      const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
      __m128i s2 = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
      s2 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0x4E));
      s2 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1));
      bsum[i * nb + b] = _mm_cvtsi128_si32(s2);
      const __m256i p8 = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3])), order);
      if (interleave) {
        alignas(32) int8_t t[32];
        _mm256_store_si256(reinterpret_cast<__m256i*>(t), p8);
        for (int k = 0; k < 32; ++k) qb[(k >> 1) + 16 * (k & 1)] = t[k];
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), p8);
      }
    }
  }
}

}  // namespace

// Packed codes (rows, K * bits / 8), row layout, to the tiled layout prefill8<..., TILED> reads: rows padded
// with zero codes to a multiple of 8; per tile and block of 32, the 8 rows' bytes of the block in lanes.
// bits 6: 8-bit codes in [96, 159] (widened 2- to 6-bit codes) packed to 6 bits as c - 96 (see prefill8).
torch::Tensor q8_tile(torch::Tensor q, int64_t bits, int64_t rows, int64_t K) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "bits must be 4, 6 or 8");
  const int64_t in_bits = bits == 6 ? 8 : bits;
  TORCH_CHECK(K % 32 == 0 && q.dtype() == torch::kUInt8 && q.is_contiguous() && q.numel() == rows * K * in_bits / 8,
              "bad packed codes");
  const int64_t T = (rows + 7) / 8, nb = K / 32, bb = in_bits == 4 ? 16 : 32, row_bytes = K * in_bits / 8;
  const uint8_t* src = q.data_ptr<uint8_t>();
  if (bits == 6) {
    for (int64_t i = 0; i < rows * K; ++i)
      TORCH_CHECK(src[i] >= 96 && src[i] <= 159, "6-bit tiles hold 8-bit codes in [96, 159]");
    auto out = torch::zeros({T * 8 * K * 6 / 8}, torch::dtype(torch::kUInt8));
    uint8_t* dst = out.data_ptr<uint8_t>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* tb = dst + (t * nb + b) * 192;  // 4 vectors of low nibbles, then 2 of top bits
        for (int64_t j = 0; j < 8; ++j) {
          const bool pad = t * 8 + j >= rows;  // padding rows: code 96 (0 in the tile), as 8-bit padding is 0
          const uint8_t* rb = src + (t * 8 + j) * row_bytes + b * 32;
          for (int64_t k = 0; k < 8; ++k)
            for (int64_t e = 0; e < 4; ++e) {
              const int c = pad ? 0 : rb[4 * k + e] - 96, p = 4 * j + e;
              tb[32 * (k % 4) + p] |= static_cast<uint8_t>((c & 15) << (4 * (k / 4)));
              tb[128 + 32 * (k % 2) + p] |= static_cast<uint8_t>((c >> 4) << (2 * (k / 2)));
            }
        }
      }
    return out;
  }
  auto out = torch::zeros({T * 8 * row_bytes}, torch::dtype(torch::kUInt8));
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* tb = dst + (t * nb + b) * 8 * bb;  // bb / 4 vectors of 32 bytes: vector k, lane j = row j's 4 bytes
      for (int64_t j = 0; j < 8 && t * 8 + j < rows; ++j) {
        const uint8_t* rb = src + (t * 8 + j) * row_bytes + b * bb;
        for (int64_t k = 0; k < bb / 4; ++k) std::memcpy(tb + 32 * k + 4 * j, rb + 4 * k, 4);
      }
    }
  return out;
}

int64_t q8_best_isa() {
  static const bool has = cpu_has_vnni();
  return has ? 1 : 0;
}

// x (M, K) fp32 -> [codes (M, K) int8, scales (M, K / 32) fp32], the rounding q8gemm applies.
std::vector<torch::Tensor> q8_quantize(torch::Tensor x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() && x.size(1) % 32 == 0,
              "x must be 2-D contiguous fp32 with a multiple of 32 columns");
  const int64_t M = x.size(0), K = x.size(1);
  auto xq = torch::empty({M, K}, torch::dtype(torch::kInt8));
  auto d = torch::empty({M, K / 32}, torch::dtype(torch::kFloat32));
  auto bs = torch::empty({M, K / 32}, torch::dtype(torch::kInt32));
  quantize_rows(x.data_ptr<float>(), M, K, false, xq.data_ptr<int8_t>(), d.data_ptr<float>(), bs.data_ptr<int32_t>());
  return {xq, d};
}

// y (M, sum N_j) = Q8_0(x) @ [W_1; W_2; ...]^T for weights sharing the input. Per weight j: packed codes,
// scales (fp32 or fp16), and either offsets (W = (u - b) * s + o, b = 0 / 128 at 4 / 8 bits) or no offsets
// (an empty tensor) and the integer base cs[j] of W = (u - c) * s. isa: -1 the best this CPU has, 0 the
// AVX2 path, 1 the VNNI path (an error where the CPU lacks it). tiled_rows: the weights are in q8_tile's
// layout (VNNI), their row counts; bits 6: q8_tile's 6-bit tiles of 8-bit codes (offsets and bases as for 8
// bits: the kernel takes the 96 off).
torch::Tensor q8gemm(torch::Tensor x, std::vector<torch::Tensor> qs, std::vector<torch::Tensor> ss,
                     std::vector<torch::Tensor> ms, int64_t bits, int64_t gs, int64_t isa, std::vector<int64_t> cs,
                     std::vector<int64_t> tiled_rows) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be 2-D contiguous fp32");
  TORCH_CHECK(isa >= -1 && isa <= 1, "isa must be -1 (best), 0 (AVX2) or 1 (VNNI)");
  TORCH_CHECK(isa != 1 || q8_best_isa() == 1, "this CPU has no AVX512-VNNI");
  TORCH_CHECK(!qs.empty() && qs.size() == ss.size() && qs.size() == ms.size() && qs.size() == cs.size(),
              "one scale, offset and base per weight");
  const bool use_vnni = isa == -1 ? q8_best_isa() == 1 : isa == 1;
  const int64_t K = x.size(1), M = x.size(0);
  const int64_t G = ss[0].size(1), nb = K / 32, bpg = gs / 32;  // bpg 0: groups of 16 (8 bits), two per block
  const bool tiled = !tiled_rows.empty();
  const bool g16 = bpg == 0;  // (check_args: groups of 16 with 8-bit codes only)
  TORCH_CHECK(!tiled || (use_vnni && tiled_rows.size() == qs.size()),
              "the tiled layout (q8_tile) runs on the VNNI path, one row count per weight");
  TORCH_CHECK(bits != 6 || tiled, "6-bit codes come in the tiled layout only");

  // scratch as plain vectors, not tensors: a decode call (M = 1) is short enough for tensor bookkeeping to show
  std::vector<int8_t> xq(M * K);
  std::vector<float> d(M * nb), xg(M * G, 0.f);
  std::vector<int32_t> bs(M * nb), hs(g16 ? M * nb : 0);
  const float* xp = x.data_ptr<float>();
  if (M >= PREFILL_MIN_M) {  // a prompt: its rows are rounded in parallel (each row on its own, as on one thread)
    at::parallel_for(0, M, 16, [&](int64_t i0, int64_t i1) {
      quantize_rows(xp + i0 * K, i1 - i0, K, bits == 4, xq.data() + i0 * K, d.data() + i0 * nb, bs.data() + i0 * nb);
    });
  } else {
    quantize_rows(xp, M, K, bits == 4, xq.data(), d.data(), bs.data());
  }
  const int8_t* xqp = xq.data();
  const float* dp = d.data();
  const int32_t* bsp = bs.data();
  float* xgp = xg.data();
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      if (bpg) {
        xgp[i * G + b / bpg] += dp[i * nb + b] * static_cast<float>(bsp[i * nb + b]);
      } else {  // groups of 16 (natural code order at 8 bits): each half of the block
        const int8_t* v = xqp + i * K + b * 32;
        int32_t h = 0;
        for (int t = 0; t < 16; ++t) h += v[t];
        hs[i * nb + b] = h;
        xgp[i * G + 2 * b] += dp[i * nb + b] * static_cast<float>(h);
        xgp[i * G + 2 * b + 1] += dp[i * nb + b] * static_cast<float>(bsp[i * nb + b] - h);
      }
    }

  // the row kernel reads per-lane corrections (also for a segment's last rows below a whole tile in the row
  // layout's many-row path); the tiled layout subtracts the base per block instead
  const bool row_kernel = !tiled;
  // what each path's dot product already subtracts from the codes: 128 for AVX2 at 8 bits (|w| sign(x, w))
  const int64_t done = (bits == 8 && !use_vnni) ? 128 : 0;
  std::vector<std::pair<int64_t, std::vector<int32_t>>> corrs;  // one lane-correction buffer per distinct c'
  corrs.reserve(qs.size());  // no reallocation: the pointers handed out stay valid
  auto corr_for = [&](int64_t c) -> const int32_t* {
    for (auto& kv : corrs)
      if (kv.first == c) return kv.second.data();
    std::vector<int32_t> t(M * nb * 8);
    int32_t* cp = t.data();
    for (int64_t i = 0; i < M * nb * 8; ++i) {
      const int8_t* v = xqp + 4 * i;  // lane i % 8 of block i / 8 (rows are whole blocks)
      cp[i] = static_cast<int32_t>(-c * (v[0] + v[1] + v[2] + v[3]));
    }
    corrs.emplace_back(c, std::move(t));
    return corrs.back().second.data();
  };
  std::vector<Q8Seg> segs;
  int64_t N = 0;
  const int64_t row_bytes = K * bits / 8;
  for (size_t j = 0; j < qs.size(); ++j) {
    const int64_t rows = tiled ? tiled_rows[j] : ss[j].size(0);
    const bool half = ss[j].dtype() == torch::kFloat16;
    // q8_tile's 6-bit tiles: the 8-bit codes' checks, on a 6-bit size
    llmquant_kernels::check_args(qs[j], ss[j], ms[j], bits == 6 ? 8 : bits, ss[j].size(0), K, gs, true, bits);
    TORCH_CHECK(!tiled || (ss[j].size(0) == (rows + 7) / 8 * 8), "a tiled weight holds its rows padded to 8");
    TORCH_CHECK(ss[j].size(1) == G, "all weights must have the same groups");
    const bool offs = ms[j].numel() > 0;
    // offsets: the codes' base is b (0 at 4 bits, 128 at 8); none: the integer base c; 6-bit tiles: 96 less
    const int64_t c = (offs ? (bits == 4 ? 0 : 128) : cs[j]) - done - (bits == 6 ? 96 : 0);
    const void* sp = half ? static_cast<const void*>(ss[j].data_ptr<at::Half>()) : static_cast<const void*>(ss[j].data_ptr<float>());
    const int64_t sz = half ? 2 : 4;
    segs.push_back({qs[j].data_ptr<uint8_t>() - N * row_bytes,
                    static_cast<const char*>(sp) - N * G * sz,
                    offs ? ms[j].data_ptr<float>() - N * G : nullptr, row_kernel ? corr_for(c) : nullptr, half, N, rows,
                    static_cast<int32_t>(c + done)});
    N += rows;
  }
  // the calls that run prefill8's chunks (the tiled layout past 4 rows, the row layout's prefill path) read
  // block-major copies of the rounded x, made in parallel
  std::vector<int8_t> xqb;
  std::vector<float> dbm;
  std::vector<int32_t> bsb, hsb;
  if (tiled ? M > 4 : use_vnni && M >= PREFILL_MIN_M) {
    xqb.resize(M * K), dbm.resize(M * nb), bsb.resize(M * nb), hsb.resize(g16 ? M * nb : 0);
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t i = 0; i < M; ++i) {
          std::memcpy(xqb.data() + (b * M + i) * 32, xqp + i * K + b * 32, 32);
          dbm[b * M + i] = dp[i * nb + b];
          bsb[b * M + i] = bsp[i * nb + b];
          if (g16) hsb[b * M + i] = hs[i * nb + b];
        }
    });
  }
  const Q8X qx{xqp, dp, xgp, bsp, g16 ? hs.data() : nullptr, M, xqb.data(), dbm.data(), bsb.data(), hsb.data()};

  RowsFn fn[5][2][2] = {};
  if (bits == 4)
    pick<4>(use_vnni, fn);
  else
    pick<8>(use_vnni, fn);
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  PrefillFn pf[2][2];
  if (tiled) {  // every tile of 8 rows (a segment's last one partly padding), every row of x
    pick_prefill<true>(bits, bpg, pf);
    std::vector<std::pair<const Q8Seg*, int64_t>> tiles;
    for (const Q8Seg& sg : segs)
      for (int64_t n = sg.start; n < sg.start + sg.rows; n += 8) tiles.emplace_back(&sg, n);
    const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(tiles.size()) / (4 * at::get_num_threads()));
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const Q8Seg& sg = *tiles[t].first;
        const int64_t n = tiles[t].second;
        pf[sg.half ? 1 : 0][sg.mn ? 1 : 0](qx, sg, 0, M, K, yp, N, G, gs, n, std::min<int64_t>(8, sg.start + sg.rows - n));
      }
    });
    return y;
  }
  if (use_vnni && M >= PREFILL_MIN_M) {  // prefill: tiles of 8 output rows, every row of x
    pick_prefill<false>(bits, bpg, pf);
    at::parallel_for(0, (N + 7) / 8, 1, [&](int64_t t0, int64_t t1) {
      for (const Q8Seg& sg : segs) {
        const int h = sg.half ? 1 : 0, o = sg.mn ? 1 : 0;
        const int64_t n0 = std::max(t0 * 8, sg.start), n1 = std::min(t1 * 8, sg.start + sg.rows);
        int64_t n = n0;
        for (; n + 8 <= n1; n += 8) pf[h][o](qx, sg, 0, M, K, yp, N, G, gs, n, 8);
        if (n < n1)  // a segment's last rows when they are fewer than 8: the row kernel
          for (int64_t i = 0; i < M; ++i) fn[1][h][o](qx, sg, i, K, yp, N, G, gs, n, n1);
      }
    });
    return y;
  }
  const int64_t grain = std::max<int64_t>(8, N / (4 * at::get_num_threads()));
  at::parallel_for(0, N, grain, [&](int64_t b0, int64_t b1) {
    for (const Q8Seg& sg : segs) {  // the part of [b0, b1) that falls in this segment
      const int64_t n0 = std::max(b0, sg.start), n1 = std::min(b1, sg.start + sg.rows);
      if (n0 >= n1) continue;
      const int h = sg.half ? 1 : 0, o = sg.mn ? 1 : 0;
      int64_t i = 0;
      for (; i + 4 <= M; i += 4) fn[4][h][o](qx, sg, i, K, yp, N, G, gs, n0, n1);
      for (; i + 2 <= M; i += 2) fn[2][h][o](qx, sg, i, K, yp, N, G, gs, n0, n1);
      for (; i < M; ++i) fn[1][h][o](qx, sg, i, K, yp, N, G, gs, n0, n1);
    }
  });
  return y;
}

// The lean runtime's decode step in C++: one new token of each sequence of a batch through every layer of a
// Llama-family decoder (pre-norm, RoPE, GQA attention against a preallocated KV cache, gated MLP) and the
// head, with no Python between the operations (llmquant.runtime.compiled builds it from a LeanModel). The
// batch's rows go through each linear together (one call reads each weight once for all of them).
//
// Each linear (a group sharing its input, stacked along the output: q/k/v, gate/up) is a LinearSpec: a list
// of parts whose outputs are concatenated, each part one of
//   packed  the packed_avx2 kernel: qgemm (below in qgemm_avx2.cpp) on the packed codes, scales, offsets
//   q8      the packed_q8act kernel: q8gemm (qgemm_q8act.cpp) on the codes, scales, offsets or integer bases
//   dense   a float weight (+ bias): at::linear
//   python  any other kernel: a Python callable x -> y (the GIL is then held for the whole step)
// The kernels' arguments are the very tensors their Python states hold, so a linear computes exactly what the
// Python path computes on the same input.
//
// The rest is done here on fp32 rows: RMSNorm (sum of squares in fp32, x * 1/sqrt(mean + eps) * w),
// optional per-head q/k RMSNorm, RoPE from the cos/sin table row of the position (x * cos + rotate_half(x) *
// sin), the k/v rows written into the cache at the position, attention of the query row against the cached
// positions 0..pos (GQA: query head h reads kv head h / (heads / kv_heads); scores scaled, softmax with the
// maximum subtracted, fp32 throughout), the MLP activation through ATen's own function (at::silu_ etc.), the
// residual adds. These differ from the Python path's ATen ops only in fp32 summation order. A left-padded
// batch gives each row its own RoPE position and a key mask (pad positions take no part in its attention).
#include "qgemm_common.h"

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using llmquant_kernels::hsum;

enum class Kind { Packed, Q8, Dense, Python };

struct LinearPart {
  Kind kind = Kind::Dense;
  std::vector<torch::Tensor> codes, scales, offsets;  // packed / q8: one per stacked weight
  std::vector<int64_t> bases;                         // q8: integer base per weight (used where offsets are empty)
  std::vector<int64_t> tiled_rows;                    // q8: rows per weight in the tiled layout (empty: row layout)
  int64_t bits = 0, gs = 0, isa = -1;
  torch::Tensor weight, bias;  // dense: weight (N, K), optional bias; packed / q8: optional stacked bias
  py::object fn;               // python: x (B, K) -> y (..., N)

  torch::Tensor run(const torch::Tensor& x) const {
    torch::Tensor y;
    switch (kind) {
      case Kind::Packed:
        y = qgemm(x, codes, scales, offsets, bits, gs);
        if (bias.defined()) y.add_(bias);
        return y;
      case Kind::Q8:
        y = q8gemm(x, codes, scales, offsets, bits, gs, isa, bases, tiled_rows);
        if (bias.defined()) y.add_(bias);
        return y;
      case Kind::Dense:
        return at::linear(x, weight, bias.defined() ? std::optional<torch::Tensor>(bias) : std::nullopt);
      case Kind::Python: {
        py::gil_scoped_acquire gil;
        y = fn(x).cast<torch::Tensor>();
        return y.reshape({x.size(0), -1}).to(torch::kFloat32).contiguous();
      }
    }
    return y;
  }
};

}  // namespace

// What one linear group computes: its parts' outputs side by side.
struct LinearSpec {
  std::vector<LinearPart> parts;

  bool needs_python() const {
    for (const auto& p : parts)
      if (p.kind == Kind::Python) return true;
    return false;
  }

  // x (B, K) fp32 contiguous -> y (B, N) fp32 contiguous
  torch::Tensor run(const torch::Tensor& x) const {
    if (parts.size() == 1) return parts[0].run(x);
    std::vector<torch::Tensor> ys;
    ys.reserve(parts.size());
    for (const auto& p : parts) ys.push_back(p.run(x));
    return at::cat(ys, 1);
  }

  static LinearSpec one(LinearPart p) {
    LinearSpec s;
    s.parts.push_back(std::move(p));
    return s;
  }
};

namespace {

std::optional<torch::Tensor> as_fp32(const std::optional<torch::Tensor>& b) {
  if (!b) return std::nullopt;
  return b->to(torch::kFloat32).contiguous();
}

// ---- fp32 row helpers --------------------------------------------------------------------------------------

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
inline void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// y = x / sqrt(mean(x^2) + eps) * w (y may be x)
inline void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  const float inv = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// x (hd) in place: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[h:], x[:h])
inline void rope(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t h = hd / 2;
  for (int64_t j = 0; j < h; ++j) {
    const float a = x[j], b = x[j + h];
    x[j] = a * cos[j] - b * sin[j];
    x[j + h] = b * cos[j + h] + a * sin[j + h];
  }
}

}  // namespace

// Every layer of a decoder for one new token of each sequence of a batch; see the top of the file.
class DecodeStep {
 public:
  DecodeStep(std::vector<torch::Tensor> in_norms, std::vector<torch::Tensor> post_norms,
             std::vector<std::optional<torch::Tensor>> q_norms, std::vector<std::optional<torch::Tensor>> k_norms,
             std::vector<LinearSpec> qkv, std::vector<LinearSpec> o, std::vector<LinearSpec> gate_up,
             std::vector<LinearSpec> down, torch::Tensor final_norm, LinearSpec head, int64_t n_heads,
             int64_t n_kv, int64_t head_dim, int64_t hidden, double eps, double scale,
             std::string act)
      : in_norms_(std::move(in_norms)), post_norms_(std::move(post_norms)), q_norms_(std::move(q_norms)),
        k_norms_(std::move(k_norms)), qkv_(std::move(qkv)), o_(std::move(o)), gate_up_(std::move(gate_up)),
        down_(std::move(down)), final_norm_(final_norm.to(torch::kFloat32).contiguous()), head_(std::move(head)),
        nh_(n_heads), nkv_(n_kv), hd_(head_dim), d_(hidden), eps_(static_cast<float>(eps)),
        scale_(static_cast<float>(scale)), act_(std::move(act)) {
    const size_t L = in_norms_.size();
    TORCH_CHECK(post_norms_.size() == L && q_norms_.size() == L && k_norms_.size() == L && qkv_.size() == L &&
                    o_.size() == L && gate_up_.size() == L && down_.size() == L,
                "one of each per layer");
    TORCH_CHECK(nh_ % nkv_ == 0 && hd_ % 2 == 0, "heads must be a multiple of kv heads, head_dim even");
    TORCH_CHECK(act_ == "silu" || act_ == "gelu" || act_ == "gelu_tanh" || act_ == "relu", "unknown activation ", act_);
    for (auto* v : {&in_norms_, &post_norms_})
      for (auto& t : *v) {
        t = t.to(torch::kFloat32).contiguous();
        TORCH_CHECK(t.numel() == d_, "norm weights must have hidden entries");
      }
    for (auto* v : {&q_norms_, &k_norms_})
      for (auto& t : *v)
        if (t) {
          t = t->to(torch::kFloat32).contiguous();
          TORCH_CHECK(t->numel() == hd_, "q/k norm weights must have head_dim entries");
        }
    needs_python_ = head_.needs_python();
    for (auto* v : {&qkv_, &o_, &gate_up_, &down_})
      for (const auto& s : *v) needs_python_ = needs_python_ || s.needs_python();
  }

  bool needs_python() const { return needs_python_; }
  int64_t layers() const { return static_cast<int64_t>(in_norms_.size()); }

  // h: the new tokens' embeddings (B rows of hidden values, fp32); kc, vc: (layers, B, kv_heads, max_len,
  // head_dim) fp32; cos, sin: (n, head_dim) fp32 RoPE tables; pos: the cache position the tokens are written
  // at (the cache's length). positions: None (every row's RoPE position is pos) or (B,) int64, each row's
  // own (a left-padded batch); key_mask: None or (B, >= pos + 1) bool, true at the cache positions a row
  // attends to. Writes the cache at pos and returns the logits (B, 1, vocab).
  torch::Tensor step(torch::Tensor h_in, torch::Tensor kc, torch::Tensor vc, torch::Tensor cos, torch::Tensor sin,
                     int64_t pos, std::optional<torch::Tensor> positions, std::optional<torch::Tensor> key_mask) {
    TORCH_CHECK(h_in.dtype() == torch::kFloat32 && h_in.numel() % d_ == 0 && h_in.numel() > 0,
                "h must be rows of hidden values, fp32");
    const int64_t B = h_in.numel() / d_;
    TORCH_CHECK(kc.dtype() == torch::kFloat32 && vc.dtype() == torch::kFloat32 && kc.is_contiguous() &&
                    vc.is_contiguous() && kc.dim() == 5 && kc.sizes() == vc.sizes() && kc.size(0) == layers() &&
                    kc.size(1) == B && kc.size(2) == nkv_ && kc.size(4) == hd_,
                "the cache must be (layers, batch, kv_heads, max_len, head_dim) fp32 contiguous, batch = h's rows");
    const int64_t max_len = kc.size(3);
    TORCH_CHECK(pos >= 0 && pos < max_len, "position ", pos, " outside the cache (", max_len, ")");
    TORCH_CHECK(cos.dtype() == torch::kFloat32 && sin.dtype() == torch::kFloat32 && cos.dim() == 2 &&
                    cos.size(1) == hd_ && cos.is_contiguous() && sin.sizes() == cos.sizes() && sin.is_contiguous(),
                "cos/sin must be (n, head_dim) fp32 contiguous");
    std::vector<int64_t> rope_pos(static_cast<size_t>(B), pos);
    if (positions) {
      torch::Tensor p = positions->reshape({-1}).to(torch::kLong).contiguous();
      TORCH_CHECK(p.numel() == B, "positions must have one entry per row");
      std::copy(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + B, rope_pos.begin());
    }
    for (int64_t r : rope_pos) TORCH_CHECK(r >= 0 && r < cos.size(0), "RoPE position ", r, " outside the table");
    const int64_t len = pos + 1;
    torch::Tensor mask;
    if (key_mask) {
      mask = key_mask->to(torch::kBool).contiguous();
      TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) >= len, "key_mask must be (batch, >= pos + 1)");
    }
    const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    const int64_t mstride = mask.defined() ? mask.size(1) : 0;
    std::optional<py::gil_scoped_release> nogil;
    if (!needs_python_) nogil.emplace();

    torch::Tensor h = h_in.reshape({B, d_}).clone();
    torch::Tensor x = torch::empty({B, d_}, h.options());
    torch::Tensor attn = torch::empty({B, nh_ * hd_}, h.options());
    float* hp = h.data_ptr<float>();
    float* xp = x.data_ptr<float>();
    float* ap = attn.data_ptr<float>();
    const float* cos0 = cos.data_ptr<float>();
    const float* sin0 = sin.data_ptr<float>();
    std::vector<float> scores(static_cast<size_t>(B * nh_ * len));
    const int64_t group = nh_ / nkv_, qn = nh_ * hd_, kn = nkv_ * hd_, row = qn + 2 * kn;
    const int64_t per_head = nkv_ * max_len * hd_;  // one (layer, row)'s keys or values

    for (int64_t i = 0; i < layers(); ++i) {
      norm_rows(hp, in_norms_[i], xp, B);
      torch::Tensor qkv = qkv_[i].run(x);
      TORCH_CHECK(qkv.numel() == B * row, "q/k/v output size");
      const float* qw = q_norms_[i] ? q_norms_[i]->data_ptr<float>() : nullptr;
      const float* kw = k_norms_[i] ? k_norms_[i]->data_ptr<float>() : nullptr;
      float* kl = kc.data_ptr<float>() + i * B * per_head;  // layer i, row 0, head 0, position 0
      float* vl = vc.data_ptr<float>() + i * B * per_head;
      for (int64_t b = 0; b < B; ++b) {
        float* q = qkv.data_ptr<float>() + b * row;
        const float* k = q + qn;
        const float* v = k + kn;
        const float* cr = cos0 + rope_pos[b] * hd_;
        const float* sr = sin0 + rope_pos[b] * hd_;
        for (int64_t j = 0; j < nh_; ++j) {
          if (qw) rms_norm(q + j * hd_, qw, q + j * hd_, hd_, eps_);
          rope(q + j * hd_, cr, sr, hd_);
        }
        for (int64_t j = 0; j < nkv_; ++j) {
          float* kd = kl + b * per_head + (j * max_len + pos) * hd_;
          std::copy(k + j * hd_, k + (j + 1) * hd_, kd);
          if (kw) rms_norm(kd, kw, kd, hd_, eps_);
          rope(kd, cr, sr, hd_);
          std::copy(v + j * hd_, v + (j + 1) * hd_, vl + b * per_head + (j * max_len + pos) * hd_);
        }
      }
      // attention of each (row, query head) against positions 0..pos of its kv head (those the row's mask
      // allows); parallel over them only when there is enough work to pay for the threads
      const int64_t units = B * nh_, grain = len * hd_ >= 16384 ? 1 : units;
      at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t b = u / nh_, j = u % nh_;
          const float* qh = qkv.data_ptr<float>() + b * row + j * hd_;
          const float* kh = kl + b * per_head + (j / group) * max_len * hd_;
          const float* vh = vl + b * per_head + (j / group) * max_len * hd_;
          const bool* allowed = mp ? mp + b * mstride : nullptr;
          float* s = scores.data() + u * len;
          float mx = -INFINITY;
          for (int64_t t = 0; t < len; ++t) {
            if (allowed && !allowed[t]) continue;
            s[t] = dot(qh, kh + t * hd_, hd_) * scale_;
            mx = std::max(mx, s[t]);
          }
          float sum = 0.f;
          for (int64_t t = 0; t < len; ++t) {
            if (allowed && !allowed[t]) continue;
            s[t] = std::exp(s[t] - mx);
            sum += s[t];
          }
          const float inv = 1.f / sum;
          float* out = ap + u * hd_;
          std::fill(out, out + hd_, 0.f);
          for (int64_t t = 0; t < len; ++t)
            if (!allowed || allowed[t]) axpy(s[t] * inv, vh + t * hd_, out, hd_);
        }
      });
      add_into(hp, o_[i].run(attn), B);
      norm_rows(hp, post_norms_[i], xp, B);
      torch::Tensor gu = gate_up_[i].run(x);
      const int64_t inter = gu.size(1) / 2;  // gate, then up
      torch::Tensor gate = gu.narrow(1, 0, inter);
      activate(gate);
      gate.mul_(gu.narrow(1, inter, inter));
      add_into(hp, down_[i].run(gate.contiguous()), B);
    }
    norm_rows(hp, final_norm_, xp, B);
    torch::Tensor logits = head_.run(x);
    return logits.view({B, 1, -1});
  }

  // One linear spec run on its own (tests): x (..., K) -> (rows, N).
  static torch::Tensor run_spec(const LinearSpec& spec, torch::Tensor x) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1, "x must be fp32");
    return spec.run(x.reshape({-1, x.size(-1)}).contiguous());
  }

 private:
  void add_into(float* hp, const torch::Tensor& y, int64_t rows) const {
    TORCH_CHECK(y.numel() == rows * d_ && y.is_contiguous(), "linear output size");
    const float* yp = y.data_ptr<float>();
    for (int64_t j = 0; j < rows * d_; ++j) hp[j] += yp[j];
  }

  void norm_rows(const float* hp, const torch::Tensor& w, float* xp, int64_t rows) const {
    for (int64_t b = 0; b < rows; ++b) rms_norm(hp + b * d_, w.data_ptr<float>(), xp + b * d_, d_, eps_);
  }

  void activate(torch::Tensor& g) const {  // ATen's functions: the Python path's numerics
    if (act_ == "silu")
      at::silu_(g);
    else if (act_ == "gelu")
      at::gelu_(g);
    else if (act_ == "gelu_tanh")
      at::gelu_(g, "tanh");
    else
      at::relu_(g);
  }

  std::vector<torch::Tensor> in_norms_, post_norms_;
  std::vector<std::optional<torch::Tensor>> q_norms_, k_norms_;
  std::vector<LinearSpec> qkv_, o_, gate_up_, down_;
  torch::Tensor final_norm_;
  LinearSpec head_;
  int64_t nh_, nkv_, hd_, d_;
  float eps_, scale_;
  std::string act_;
  bool needs_python_ = false;
};

void register_decode_step(py::module& m) {
  py::class_<LinearSpec>(m, "LinearSpec", "One linear group of the compiled decode step (see decode_step.cpp)")
      .def_static(
          "packed",
          [](std::vector<torch::Tensor> codes, std::vector<torch::Tensor> scales, std::vector<torch::Tensor> offsets,
             int64_t bits, int64_t gs, std::optional<torch::Tensor> bias) {
            LinearPart p;
            p.kind = Kind::Packed;
            p.codes = std::move(codes), p.scales = std::move(scales), p.offsets = std::move(offsets);
            p.bits = bits, p.gs = gs;
            if (auto b = as_fp32(bias)) p.bias = *b;
            return LinearSpec::one(std::move(p));
          },
          py::arg("codes"), py::arg("scales"), py::arg("offsets"), py::arg("bits"), py::arg("group_size"),
          py::arg("bias") = py::none(), "qgemm's arguments (packed_avx2), stacked bias or None")
      .def_static(
          "q8",
          [](std::vector<torch::Tensor> codes, std::vector<torch::Tensor> scales, std::vector<torch::Tensor> offsets,
             int64_t bits, int64_t gs, int64_t isa, std::vector<int64_t> bases, std::vector<int64_t> tiled_rows,
             std::optional<torch::Tensor> bias) {
            LinearPart p;
            p.kind = Kind::Q8;
            p.codes = std::move(codes), p.scales = std::move(scales), p.offsets = std::move(offsets);
            p.bits = bits, p.gs = gs, p.isa = isa, p.bases = std::move(bases), p.tiled_rows = std::move(tiled_rows);
            if (auto b = as_fp32(bias)) p.bias = *b;
            return LinearSpec::one(std::move(p));
          },
          py::arg("codes"), py::arg("scales"), py::arg("offsets"), py::arg("bits"), py::arg("group_size"),
          py::arg("isa"), py::arg("bases"), py::arg("tiled_rows") = std::vector<int64_t>{}, py::arg("bias") = py::none(),
          "q8gemm's arguments (packed_q8act)")
      .def_static(
          "dense",
          [](torch::Tensor weight, std::optional<torch::Tensor> bias) {
            TORCH_CHECK(weight.dtype() == torch::kFloat32 && weight.dim() == 2, "a dense spec takes an fp32 weight");
            LinearPart p;
            p.kind = Kind::Dense;
            p.weight = weight;
            if (auto b = as_fp32(bias)) p.bias = *b;
            return LinearSpec::one(std::move(p));
          },
          py::arg("weight"), py::arg("bias") = py::none(), "at::linear with an fp32 weight")
      .def_static(
          "python",
          [](py::function fn) {
            LinearPart p;
            p.kind = Kind::Python;
            p.fn = fn;
            return LinearSpec::one(std::move(p));
          },
          py::arg("fn"), "a Python callable x (B, K) -> y (B, N)")
      .def_static(
          "join",
          [](const std::vector<LinearSpec>& specs) {
            LinearSpec s;
            for (const auto& t : specs) s.parts.insert(s.parts.end(), t.parts.begin(), t.parts.end());
            return s;
          },
          "the specs' outputs side by side")
      .def_property_readonly("needs_python", &LinearSpec::needs_python)
      .def("__call__", &DecodeStep::run_spec, py::arg("x"));
  py::class_<DecodeStep>(m, "DecodeStep", "A decoder's whole decode step: one new token of each sequence of a batch")
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<std::optional<torch::Tensor>>,
                    std::vector<std::optional<torch::Tensor>>, std::vector<LinearSpec>, std::vector<LinearSpec>,
                    std::vector<LinearSpec>, std::vector<LinearSpec>, torch::Tensor, LinearSpec, int64_t, int64_t,
                    int64_t, int64_t, double, double, std::string>(),
           py::arg("in_norms"), py::arg("post_norms"), py::arg("q_norms"), py::arg("k_norms"), py::arg("qkv"),
           py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("final_norm"), py::arg("head"),
           py::arg("n_heads"), py::arg("n_kv"), py::arg("head_dim"), py::arg("hidden"),
           py::arg("eps"), py::arg("scale"), py::arg("act"))
      .def("step", &DecodeStep::step, py::arg("h"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cos"),
           py::arg("sin"), py::arg("pos"), py::arg("positions") = py::none(), py::arg("key_mask") = py::none())
      .def_property_readonly("needs_python", &DecodeStep::needs_python)
      .def_property_readonly("layers", &DecodeStep::layers);
}

// Attention with dropout on the attention probabilities, fused per (batch, head) for CPUs.
//
// Why: with dropout_p > 0, torch's scaled_dot_product_attention leaves its fused CPU kernel for the unfused math
// path, which materialises [B, H, S, S] scores, probabilities and a Bernoulli mask in memory and makes some ten
// passes over them; that cost more than all the model's linear layers together (torch.profiler,
// all-MiniLM-L6-v2 at 16 x 256 on a 2-core Intel Xeon, 2026-12-02). Here each
// (batch, head) is one task whose S x S scores stay in a per-thread buffer (in L2 for SQuAD's lengths), the
// keep-mask comes from a counter-based hash of (seed, element index) — no mask is stored, backward recomputes the
// very same one — and the five products go to the BLAS gemm that ATen uses, in float32: a bfloat16 gemm did not pay
// at these sizes (a 155 x 155 x 64 product on one thread of a 2-core AMD EPYC, 2026-12-07: float32 74-83 GFLOP/s,
// oneDNN's bfloat16, which rounds the scores to bfloat16, 97-107, MKL's bfloat16-to-float32 72-83).
//
// Semantics equal SDPA's math path: P = softmax(scale * Q K^T + mask), Z = keep / (1 - p) with keep ~ Bernoulli(1 - p)
// per element, O = (P * Z) V. Rows whose keys are all masked give zeros.
//
// Layouts: q, k, v are [B, H, S, D] views with unit stride in D (transformers passes transposed [B, S, H, D] tensors
// this way), all float32 or all bfloat16; the mask is a float32 additive [B, H, Sq, Sk] view (broadcast dimensions as
// stride 0). Outputs and gradients are written in q's dtype as contiguous [B, S, H, D] (out) or [B, H, S, D]
// (gradients). Bfloat16 slices are converted to float32 per (batch, head) task, so that what backward keeps is the
// bfloat16 tensors themselves, not float32 copies.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// C (m x n) = alpha * op(A) * op(B), all row-major with the given leading dimensions, through ATen's mm (the BLAS
// call torch makes itself; inside parallel_for it runs on the calling thread).
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto A = at::from_blob(const_cast<float*>(a), {m, k}, ta ? at::IntArrayRef{1, lda} : at::IntArrayRef{lda, 1}, opts);
  auto B = at::from_blob(const_cast<float*>(b), {k, n}, tb ? at::IntArrayRef{1, ldb} : at::IntArrayRef{ldb, 1}, opts);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(C, C, A, B, /*beta=*/0.0, /*alpha=*/alpha);
}

// splitmix64's output function on the element's counter: a stateless, well-mixed 32-bit draw per element.
inline uint32_t draw(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

// dst[j] = src[j] * keep(j) * inv_keep for n elements (in place when dst == src); counter = the first element's
// global index.
inline void dropout_row(const float* src, float* dst, int64_t n, uint64_t seed, uint64_t counter,
                        uint32_t threshold, float inv_keep) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = src[j] * (draw(seed, counter + j) >= threshold ? inv_keep : 0.0f);  // NaN * 0 stays NaN, as in torch
  }
}

inline void apply_dropout(float* row, int64_t n, uint64_t seed, uint64_t counter, uint32_t threshold,
                          float inv_keep) {
  dropout_row(row, row, n, seed, counter, threshold, inv_keep);
}

struct Shapes {
  int64_t B, H, Sq, Sk, D;
  int64_t q_b, q_h, q_s, k_b, k_h, k_s, v_b, v_h, v_s;
  int64_t m_b, m_h, m_q;
};

Shapes shapes_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "4-d q, k, v and mask expected");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
              k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v: all float32 or all bfloat16 expected");
  TORCH_CHECK(mask.scalar_type() == at::kFloat, "a float32 mask expected");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && mask.stride(3) == 1,
              "unit stride in the last dimension expected");
  Shapes s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3),
           q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2), mask.stride(0), mask.stride(1), mask.stride(2)};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B && k.size(1) == s.H && v.size(1) == s.H &&
              v.size(2) == s.Sk && k.size(3) == s.D && v.size(3) == s.D, "q, k, v shapes do not match");
  TORCH_CHECK(mask.size(0) == s.B && mask.size(1) == s.H && mask.size(2) == s.Sq && mask.size(3) == s.Sk,
              "mask must be expanded to [B, H, Sq, Sk]");
  return s;
}

// Scores row i → probabilities in place (row of length n); returns the log-sum-exp (+inf for a fully masked row,
// so that exp(score - lse) is 0 everywhere in backward).
inline float softmax_row(float* row, const float* mask_row, int64_t n) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float lanes[Vec::size()];
  Vec vmax(neg_inf);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {  // written out: gcc does not vectorise a float max reduction
    Vec x = Vec::loadu(row + j) + Vec::loadu(mask_row + j);
    x.store(row + j);
    vmax = at::vec::maximum(vmax, x);
  }
  vmax.store(lanes);
  float mx = neg_inf;
  for (int64_t l = 0; l < Vec::size(); ++l) mx = std::max(mx, lanes[l]);
  for (; j < n; ++j) {
    row[j] += mask_row[j];
    mx = std::max(mx, row[j]);
  }
  if (mx == -std::numeric_limits<float>::infinity()) {
    std::fill(row, row + n, 0.0f);
    return std::numeric_limits<float>::infinity();
  }
  const Vec vmx(mx);
  Vec vsum(0.0f);
  for (j = 0; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(row + j) - vmx).exp_u20();
    e.store(row + j);
    vsum = vsum + e;
  }
  vsum.store(lanes);
  float sum = 0.0f;
  for (int64_t l = 0; l < Vec::size(); ++l) sum += lanes[l];
  for (; j < n; ++j) {
    row[j] = std::exp(row[j] - mx);
    sum += row[j];
  }
  const float inv = 1.0f / sum;
  for (j = 0; j < n; ++j) row[j] *= inv;
  return mx + std::log(sum);
}

// probabilities from saved log-sum-exp: row[j] = exp(row[j] + mask[j] - lse)
inline void probs_row(float* row, const float* mask_row, int64_t n, float lse) {
  const Vec vlse(lse);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    ((Vec::loadu(row + j) + Vec::loadu(mask_row + j)) - vlse).exp_u20().store(row + j);
  }
  for (; j < n; ++j) row[j] = std::exp(row[j] + mask_row[j] - lse);
}

// A [rows, D] slice with row stride `stride` as float32 rows: float32 slices are used where they are; bfloat16 ones
// are converted into `buf` (D contiguous), so the kernel computes in float32 whatever the inputs' dtype.
struct Rows {
  const float* p;
  int64_t ld;
};

inline Rows as_float(const float* src, int64_t, int64_t, int64_t stride, std::vector<float>&) { return {src, stride}; }

inline Rows as_float(const at::BFloat16* src, int64_t rows, int64_t d, int64_t stride, std::vector<float>& buf) {
  buf.resize(rows * d);
  for (int64_t r = 0; r < rows; ++r) at::vec::convert(src + r * stride, buf.data() + r * d, d);
  return {buf.data(), d};
}

// Where float32 results for a [rows, D] slice of `dst` (row stride `stride`) go: `dst` itself for float32, else
// `buf`, which store() then rounds into `dst`.
inline float* result_rows(float* dst, int64_t, int64_t, std::vector<float>&) { return dst; }

inline float* result_rows(at::BFloat16*, int64_t rows, int64_t d, std::vector<float>& buf) {
  buf.resize(rows * d);
  return buf.data();
}

inline void store(float*, const std::vector<float>&, int64_t, int64_t, int64_t) {}

inline void store(at::BFloat16* dst, const std::vector<float>& buf, int64_t rows, int64_t d, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) at::vec::convert(buf.data() + r * d, dst + r * stride, d);
}

uint32_t threshold_of(double p) {
  TORCH_CHECK(p > 0.0 && p < 1.0, "dropout probability must be in (0, 1)");
  return static_cast<uint32_t>(std::llround(p * 4294967296.0));
}

}  // namespace

namespace {

template <typename T>
void forward_impl(const Shapes& s, const T* qp, const T* kp, const T* vp, const float* mp, T* op, float* lp,
                  double scale, uint32_t threshold, float inv_keep, int64_t seed) {
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(s.Sq * s.Sk), qbuf, kbuf, vbuf, obuf;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      const Rows q = as_float(qp + b * s.q_b + h * s.q_h, s.Sq, s.D, s.q_s, qbuf);
      const Rows k = as_float(kp + b * s.k_b + h * s.k_h, s.Sk, s.D, s.k_s, kbuf);
      const Rows v = as_float(vp + b * s.v_b + h * s.v_h, s.Sk, s.D, s.v_s, vbuf);
      gemm_rm(false, true, s.Sq, s.Sk, s.D, static_cast<float>(scale), q.p, q.ld, k.p, k.ld, scores.data(), s.Sk);
      for (int64_t i = 0; i < s.Sq; ++i) {
        float* row = scores.data() + i * s.Sk;
        lp[bh * s.Sq + i] = softmax_row(row, mp + b * s.m_b + h * s.m_h + i * s.m_q, s.Sk);
        apply_dropout(row, s.Sk, static_cast<uint64_t>(seed), static_cast<uint64_t>((bh * s.Sq + i) * s.Sk),
                      threshold, inv_keep);
      }
      T* out = op + b * s.Sq * s.H * s.D + h * s.D;
      float* o = result_rows(out, s.Sq, s.D, obuf);
      const int64_t ldo = std::is_same<T, float>::value ? s.H * s.D : s.D;
      gemm_rm(false, false, s.Sq, s.D, s.Sk, 1.0f, scores.data(), s.Sk, v.p, v.ld, o, ldo);
      store(out, obuf, s.Sq, s.D, s.H * s.D);
    }
  });
}

template <typename T>
void backward_impl(const Shapes& s, const T* gp, const T* qp, const T* kp, const T* vp, const float* mp,
                   const T* op, const float* lp, T* dqp, T* dkp, T* dvp, float fscale, uint32_t threshold,
                   float inv_keep, int64_t seed) {
  const int64_t row_stride = s.H * s.D;  // of out and grad_out
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(s.Sq * s.Sk), grads(s.Sq * s.Sk), di(s.Sq), qbuf, kbuf, vbuf, gbuf, obuf, dqbuf,
        dkbuf, dvbuf;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      const Rows q = as_float(qp + b * s.q_b + h * s.q_h, s.Sq, s.D, s.q_s, qbuf);
      const Rows k = as_float(kp + b * s.k_b + h * s.k_h, s.Sk, s.D, s.k_s, kbuf);
      const Rows v = as_float(vp + b * s.v_b + h * s.v_h, s.Sk, s.D, s.v_s, vbuf);
      const Rows g = as_float(gp + b * s.Sq * row_stride + h * s.D, s.Sq, s.D, row_stride, gbuf);
      const Rows o = as_float(op + b * s.Sq * row_stride + h * s.D, s.Sq, s.D, row_stride, obuf);
      const uint64_t first = static_cast<uint64_t>(bh * s.Sq * s.Sk);
      // P from the saved log-sum-exp; P * Z (the dropped probabilities) beside it.
      gemm_rm(false, true, s.Sq, s.Sk, s.D, fscale, q.p, q.ld, k.p, k.ld, probs.data(), s.Sk);
      for (int64_t i = 0; i < s.Sq; ++i) {
        float* row = probs.data() + i * s.Sk;
        probs_row(row, mp + b * s.m_b + h * s.m_h + i * s.m_q, s.Sk, lp[bh * s.Sq + i]);
        float* dropped = grads.data() + i * s.Sk;
        std::copy(row, row + s.Sk, dropped);
        apply_dropout(dropped, s.Sk, static_cast<uint64_t>(seed), first + i * s.Sk, threshold, inv_keep);
        float acc = 0.0f;  // D_i = rowsum(dO * O) = rowsum(dP * P)
        for (int64_t d = 0; d < s.D; ++d) acc += g.p[i * g.ld + d] * o.p[i * o.ld + d];
        di[i] = acc;
      }
      T* dq = dqp + bh * s.Sq * s.D;
      T* dk = dkp + bh * s.Sk * s.D;
      T* dv = dvp + bh * s.Sk * s.D;
      // dV = (P * Z)^T dO
      gemm_rm(true, false, s.Sk, s.D, s.Sq, 1.0f, grads.data(), s.Sk, g.p, g.ld, result_rows(dv, s.Sk, s.D, dvbuf),
              s.D);
      store(dv, dvbuf, s.Sk, s.D, s.D);
      // d(P * Z) = dO V^T, then dS = P * (d(P * Z) * Z - D_i)
      gemm_rm(false, true, s.Sq, s.Sk, s.D, 1.0f, g.p, g.ld, v.p, v.ld, grads.data(), s.Sk);
      for (int64_t i = 0; i < s.Sq; ++i) {
        float* gr = grads.data() + i * s.Sk;
        const float* prow = probs.data() + i * s.Sk;
        apply_dropout(gr, s.Sk, static_cast<uint64_t>(seed), first + i * s.Sk, threshold, inv_keep);
        for (int64_t j = 0; j < s.Sk; ++j) gr[j] = prow[j] * (gr[j] - di[i]);
      }
      // dQ = scale * dS K, dK = scale * dS^T Q
      gemm_rm(false, false, s.Sq, s.D, s.Sk, fscale, grads.data(), s.Sk, k.p, k.ld, result_rows(dq, s.Sq, s.D, dqbuf),
              s.D);
      store(dq, dqbuf, s.Sq, s.D, s.D);
      gemm_rm(true, false, s.Sk, s.D, s.Sq, fscale, grads.data(), s.Sk, q.p, q.ld, result_rows(dk, s.Sk, s.D, dkbuf),
              s.D);
      store(dk, dkbuf, s.Sk, s.D, s.D);
    }
  });
}

}  // namespace

// Returns (out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] float32).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                                double scale, double p, int64_t seed) {
  const Shapes s = shapes_of(q, k, v, mask);
  auto out = at::empty({s.B, s.Sq, s.H, s.D}, q.options());
  auto lse = at::empty({s.B, s.H, s.Sq}, q.options().dtype(at::kFloat));
  const uint32_t threshold = threshold_of(p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
  if (q.scalar_type() == at::kBFloat16) {
    forward_impl(s, q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(),
                 mask.data_ptr<float>(), out.data_ptr<at::BFloat16>(), lse.data_ptr<float>(), scale, threshold,
                 inv_keep, seed);
  } else {
    forward_impl(s, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), mask.data_ptr<float>(),
                 out.data_ptr<float>(), lse.data_ptr<float>(), scale, threshold, inv_keep, seed);
  }
  return {out, lse};
}

// Returns (dq, dk, dv), each [B, H, S, D] contiguous in q's dtype. grad_out and out are [B, Sq, H, D] contiguous.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& mask, const at::Tensor& out,
                                 const at::Tensor& lse, double scale, double p, int64_t seed) {
  const Shapes s = shapes_of(q, k, v, mask);
  TORCH_CHECK(grad_out.is_contiguous() && out.is_contiguous() && lse.is_contiguous(), "contiguous grad/out/lse");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "grad_out and out in q's dtype expected");
  auto dq = at::empty({s.B, s.H, s.Sq, s.D}, q.options());
  auto dk = at::empty({s.B, s.H, s.Sk, s.D}, q.options());
  auto dv = at::empty({s.B, s.H, s.Sk, s.D}, q.options());
  const uint32_t threshold = threshold_of(p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
  const float fscale = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) {
    using B16 = at::BFloat16;
    backward_impl(s, grad_out.data_ptr<B16>(), q.data_ptr<B16>(), k.data_ptr<B16>(), v.data_ptr<B16>(),
                  mask.data_ptr<float>(), out.data_ptr<B16>(), lse.data_ptr<float>(), dq.data_ptr<B16>(),
                  dk.data_ptr<B16>(), dv.data_ptr<B16>(), fscale, threshold, inv_keep, seed);
  } else {
    backward_impl(s, grad_out.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                  mask.data_ptr<float>(), out.data_ptr<float>(), lse.data_ptr<float>(), dq.data_ptr<float>(),
                  dk.data_ptr<float>(), dv.data_ptr<float>(), fscale, threshold, inv_keep, seed);
  }
  return {dq, dk, dv};
}

// x * Z, Z = keep / (1 - p) per element from the same hash: the forward of a dropout layer on its input, and its
// backward on the incoming gradient (the same seed gives the same mask). Float32 or bfloat16, written in x's dtype:
// bfloat16 is computed in float32 and rounded once, as x.float() * Z then .to(bfloat16) would be.
at::Tensor dropout(const at::Tensor& x, double p, int64_t seed) {
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.is_contiguous(),
              "contiguous float32 or bfloat16 tensor expected");
  auto y = at::empty_like(x);
  const uint32_t threshold = threshold_of(p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
  const uint64_t useed = static_cast<uint64_t>(seed);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  constexpr int64_t chunk = 4096;  // elements a task converts through its float32 buffer
  at::parallel_for(0, (x.numel() + chunk - 1) / chunk, 4, [&](int64_t begin, int64_t end) {
    float buf[chunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * chunk, n = std::min(chunk, x.numel() - first);
      if (bf16) {
        at::vec::convert(x.data_ptr<at::BFloat16>() + first, buf, n);
        dropout_row(buf, buf, n, useed, static_cast<uint64_t>(first), threshold, inv_keep);
        at::vec::convert(buf, y.data_ptr<at::BFloat16>() + first, n);
      } else {
        dropout_row(x.data_ptr<float>() + first, y.data_ptr<float>() + first, n, useed,
                    static_cast<uint64_t>(first), threshold, inv_keep);
      }
    }
  });
  return y;
}

// How many threads at::parallel_for ran `n` items on: the build's check that it is parallel at all (without
// OpenMP at compile time, ATen's inline parallel_for runs every item on the calling thread).
int64_t parallel_threads(int64_t n) {
  std::vector<int> seen(at::get_num_threads(), 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { seen[at::get_thread_num()] = 1; });
  int64_t used = 0;
  for (int s : seen) used += s;
  return used;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_threads", &parallel_threads, "threads parallel_for used for n items");
  m.def("forward", &forward, "attention with dropout, forward");
  m.def("backward", &backward, "attention with dropout, backward");
  m.def("dropout", &dropout, "x * keep / (1 - p), the keep-mask hashed from (seed, index)");
}

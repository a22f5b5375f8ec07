// Attention with dropout on the attention probabilities, fused per (batch, head) for CPUs.
//
// Why: with dropout_p > 0, torch's scaled_dot_product_attention leaves its fused CPU kernel for the unfused math
// path, which materialises [B, H, S, S] scores, probabilities and a Bernoulli mask in memory and makes some ten
// passes over them; that cost more than all the model's linear layers together (torch.profiler,
// all-MiniLM-L6-v2 at 16 x 256 on a 2-core Intel Xeon, 2026-12-02). Here each
// (batch, head) is one task whose S x S scores stay in a per-thread buffer (in L2 for SQuAD's lengths), the
// keep-mask comes from a counter-based hash of (seed, element index) — no mask is stored, backward recomputes the
// very same one — and the five products go to the BLAS gemm that ATen uses.
//
// Semantics equal SDPA's math path: P = softmax(scale * Q K^T + mask), Z = keep / (1 - p) with keep ~ Bernoulli(1 - p)
// per element, O = (P * Z) V. Rows whose keys are all masked give zeros.
//
// Layouts: q, k, v are [B, H, S, D] views with unit stride in D (transformers passes transposed [B, S, H, D] tensors
// this way); the mask is a float additive [B, H, Sq, Sk] view (broadcast dimensions as stride 0). Outputs and
// gradients are written as contiguous [B, S, H, D] (out) or [B, H, S, D] (gradients).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
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

// row[j] *= keep(j) * inv_keep for one row; counter = first element's global index.
inline void apply_dropout(float* row, int64_t n, uint64_t seed, uint64_t counter, uint32_t threshold,
                          float inv_keep) {
  for (int64_t j = 0; j < n; ++j) {
    row[j] *= draw(seed, counter + j) >= threshold ? inv_keep : 0.0f;  // NaN * 0 stays NaN, as in torch
  }
}

struct Shapes {
  int64_t B, H, Sq, Sk, D;
  int64_t q_b, q_h, q_s, k_b, k_h, k_s, v_b, v_h, v_s;
  int64_t m_b, m_h, m_q;
};

Shapes shapes_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "4-d q, k, v and mask expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
              mask.scalar_type() == at::kFloat, "float32 tensors expected");
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

uint32_t threshold_of(double p) {
  TORCH_CHECK(p > 0.0 && p < 1.0, "dropout probability must be in (0, 1)");
  return static_cast<uint32_t>(std::llround(p * 4294967296.0));
}

}  // namespace

// Returns (out [B, Sq, H, D], lse [B, H, Sq]).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                                double scale, double p, int64_t seed) {
  const Shapes s = shapes_of(q, k, v, mask);
  auto out = at::empty({s.B, s.Sq, s.H, s.D}, q.options());
  auto lse = at::empty({s.B, s.H, s.Sq}, q.options());
  const uint32_t threshold = threshold_of(p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* mp = mask.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(s.Sq * s.Sk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      const float* qb = qp + b * s.q_b + h * s.q_h;
      const float* kb = kp + b * s.k_b + h * s.k_h;
      const float* vb = vp + b * s.v_b + h * s.v_h;
      gemm_rm(false, true, s.Sq, s.Sk, s.D, static_cast<float>(scale), qb, s.q_s, kb, s.k_s,
              scores.data(), s.Sk);
      for (int64_t i = 0; i < s.Sq; ++i) {
        float* row = scores.data() + i * s.Sk;
        lp[bh * s.Sq + i] = softmax_row(row, mp + b * s.m_b + h * s.m_h + i * s.m_q, s.Sk);
        apply_dropout(row, s.Sk, static_cast<uint64_t>(seed), static_cast<uint64_t>((bh * s.Sq + i) * s.Sk),
                      threshold, inv_keep);
      }
      gemm_rm(false, false, s.Sq, s.D, s.Sk, 1.0f, scores.data(), s.Sk, vb, s.v_s,
              op + b * s.Sq * s.H * s.D + h * s.D, s.H * s.D);
    }
  });
  return {out, lse};
}

// Returns (dq, dk, dv), each [B, H, S, D] contiguous. grad_out and out are [B, Sq, H, D] contiguous.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& mask, const at::Tensor& out,
                                 const at::Tensor& lse, double scale, double p, int64_t seed) {
  const Shapes s = shapes_of(q, k, v, mask);
  TORCH_CHECK(grad_out.is_contiguous() && out.is_contiguous() && lse.is_contiguous(), "contiguous grad/out/lse");
  auto dq = at::empty({s.B, s.H, s.Sq, s.D}, q.options());
  auto dk = at::empty({s.B, s.H, s.Sk, s.D}, q.options());
  auto dv = at::empty({s.B, s.H, s.Sk, s.D}, q.options());
  const uint32_t threshold = threshold_of(p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
  const float fscale = static_cast<float>(scale);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* mp = mask.data_ptr<float>();
  const float* gp = grad_out.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  const int64_t row_stride = s.H * s.D;  // of out and grad_out
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(s.Sq * s.Sk), grads(s.Sq * s.Sk), di(s.Sq);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      const float* qb = qp + b * s.q_b + h * s.q_h;
      const float* kb = kp + b * s.k_b + h * s.k_h;
      const float* vb = vp + b * s.v_b + h * s.v_h;
      const float* gb = gp + b * s.Sq * row_stride + h * s.D;
      const float* ob = op + b * s.Sq * row_stride + h * s.D;
      const uint64_t first = static_cast<uint64_t>(bh * s.Sq * s.Sk);
      // P from the saved log-sum-exp; P * Z (the dropped probabilities) beside it.
      gemm_rm(false, true, s.Sq, s.Sk, s.D, fscale, qb, s.q_s, kb, s.k_s, probs.data(), s.Sk);
      for (int64_t i = 0; i < s.Sq; ++i) {
        float* row = probs.data() + i * s.Sk;
        probs_row(row, mp + b * s.m_b + h * s.m_h + i * s.m_q, s.Sk, lp[bh * s.Sq + i]);
        float* dropped = grads.data() + i * s.Sk;
        std::copy(row, row + s.Sk, dropped);
        apply_dropout(dropped, s.Sk, static_cast<uint64_t>(seed), first + i * s.Sk, threshold, inv_keep);
        float acc = 0.0f;  // D_i = rowsum(dO * O) = rowsum(dP * P)
        for (int64_t d = 0; d < s.D; ++d) acc += gb[i * row_stride + d] * ob[i * row_stride + d];
        di[i] = acc;
      }
      // dV = (P * Z)^T dO
      gemm_rm(true, false, s.Sk, s.D, s.Sq, 1.0f, grads.data(), s.Sk, gb, row_stride,
              dvp + bh * s.Sk * s.D, s.D);
      // d(P * Z) = dO V^T, then dS = P * (d(P * Z) * Z - D_i)
      gemm_rm(false, true, s.Sq, s.Sk, s.D, 1.0f, gb, row_stride, vb, s.v_s, grads.data(), s.Sk);
      for (int64_t i = 0; i < s.Sq; ++i) {
        float* g = grads.data() + i * s.Sk;
        const float* prow = probs.data() + i * s.Sk;
        apply_dropout(g, s.Sk, static_cast<uint64_t>(seed), first + i * s.Sk, threshold, inv_keep);
        for (int64_t j = 0; j < s.Sk; ++j) g[j] = prow[j] * (g[j] - di[i]);
      }
      // dQ = scale * dS K, dK = scale * dS^T Q
      gemm_rm(false, false, s.Sq, s.D, s.Sk, fscale, grads.data(), s.Sk, kb, s.k_s,
              dqp + bh * s.Sq * s.D, s.D);
      gemm_rm(true, false, s.Sk, s.D, s.Sq, fscale, grads.data(), s.Sk, qb, s.q_s,
              dkp + bh * s.Sk * s.D, s.D);
    }
  });
  return {dq, dk, dv};
}

// x * Z, Z = keep / (1 - p) per element from the same hash: the forward of a dropout layer on its input, and its
// backward on the incoming gradient (the same seed gives the same mask).
at::Tensor dropout(const at::Tensor& x, double p, int64_t seed) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "contiguous float32 tensor expected");
  auto y = at::empty_like(x);
  const uint32_t threshold = threshold_of(p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      yp[i] = xp[i] * (draw(static_cast<uint64_t>(seed), static_cast<uint64_t>(i)) >= threshold ? inv_keep : 0.0f);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "attention with dropout, forward");
  m.def("backward", &backward, "attention with dropout, backward");
  m.def("dropout", &dropout, "x * keep / (1 - p), the keep-mask hashed from (seed, index)");
}

// Fused kernels for MLX's CPU backend, as MLX primitives: the embeddings, causal
// self-attention, GPT-2's GELU, layer norm, dropout and cross-entropy, each with its
// vector-Jacobian product, and the whole model's decoding step for generation. Built at
// first use by mlx_model.ops.native (with the system C++ compiler, against the installed
// MLX's headers and nanobind); without it the model uses pure MLX.
//
// Attention takes the fused q/k/v projection (B, T, 3C) and returns the heads' output
// already laid out as (B, T, C), plus each row's log-sum-exp (B, H, T). For each
// (batch, head) the T x T scores live in a buffer that stays in cache: the products go
// to the BLAS that MLX uses (cblas_sgemm, resolved at load time), and the masked
// softmax, its dropout and their gradients are single loops over that buffer. The
// pure-MLX formulation makes six to eight passes over the scores in main memory, and
// two transposes of q/k/v and y; this makes none of them.
//
// Exactness: the softmax is the usual max-subtracted one; exp is 2^n * 2^f with a
// degree-7 polynomial for 2^f (as accurate as float32 expf to a few ulp); masked
// keys get exactly zero weight. The backward recomputes the weights from the saved
// log-sum-exp instead of storing them (as flash attention does).
//
// Dropout on the attention weights matches mlx_model.fastops.dropout: the element
// at flat index i of the (B, H, T, T) weights is kept when
// lowbias32(i + seed * 0x9E3779B9) >= round(p * 2^32), and kept weights are scaled
// by 1 / (1 - p). The seed is an input (a uint32 array of shape (1,)), so it comes
// from MLX's generator.
//
// GELU and layer norm are plain loops: built with -march=native they vectorise for
// this CPU, where MLX's own compiled element-wise kernels use SSE2 only.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"
#include "mlx/utils.h"

namespace mx = mlx::core;
namespace nb = nanobind;

extern "C" void cblas_sgemm(
    int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
    const float* a, int lda, const float* b, int ldb, float beta, float* c,
    int ldc);

namespace {

constexpr int kRowMajor = 101, kNo = 111, kT = 112;
constexpr int kBlock = 32;  // query rows per block: keys past the block's last row are skipped

inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a,
                 int lda, const float* b, int ldb, float* c, int ldc) {
  cblas_sgemm(kRowMajor, ta ? kT : kNo, tb ? kT : kNo, m, n, k, alpha, a, lda, b, ldb,
              0.0f, c, ldc);
}

template <class U>
inline U hash32(U x) {  // Chris Wellons' lowbias32, of one uint32 or a vector of them
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// Loops in the widest vector registers this CPU has: the library is built on
// the machine that runs it, for it (-march=native), so AVX-512 where present, else AVX,
// else SSE, written with the compiler's vector types: left to the auto-vectoriser, the
// GELU loop ran six times slower and row reductions (one accumulator may not be
// reordered; eight scalar partial sums) five times slower.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors stay inside this library
using vfloat = float __attribute__((vector_size(kLanes * sizeof(float))));
using vint = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));
using vuint = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float lanes_sum(vfloat v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// exp(x) for x in [-87, 87]: 2^n from the exponent bits, 2^f (|f| <= 1/2) by the same
// degree-7 polynomial as mlx_model.ops.cpu.exp, in Estrin's scheme. For a float or a
// vector of them.
template <class F>
inline F exp_poly(F f) {
  F f2 = f * f;
  F p01 = 1.0f + 0.6931471805599453f * f;
  F p23 = 0.2402265069591007f + 0.05550410866482158f * f;
  F p45 = 0.009618129107628477f + 0.0013333558146428443f * f;
  F p67 = 0.00015403530393381606f + 1.525273380405984e-05f * f;
  F f4 = f2 * f2;
  return (p01 + p23 * f2) + (p45 + p67 * f2) * f4;
}

inline float exp_core(float x) {
  float t = x * 1.4426950408889634f;
  float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest, |t| < 2^22
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return exp_poly(t - n) * scale;
}

inline vfloat exp_core(vfloat x) {
  vfloat t = x * 1.4426950408889634f;
  vfloat n = (t + 12582912.0f) - 12582912.0f;
  vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  return exp_poly(t - n) * reinterpret_cast<vfloat>(bits);
}

// exp(x) for x <= 0 (scores minus their row maximum); below -87 it is ~1e-38, not 0.
template <class F>
inline F exp_nonpositive(F x) {
  return exp_core(x > -87.0f ? x : F{} - 87.0f);
}

// exp(x) clamped to [-87, 87], where a sigmoid is 0 or 1 to float32 anyway
template <class F>
inline F exp_clamped(F x) {
  x = x > -87.0f ? x : F{} - 87.0f;
  return exp_core(x < 87.0f ? x : F{} + 87.0f);
}

// out[i] = f(i) for i < n, kLanes at a time; f(i) loads its own inputs at i. The tail is
// computed on a full vector of which only the valid part is stored: f reads the inputs
// through `load`, which pads past n with zeros.
template <class Fn>
inline void vmap(float* out, size_t n, Fn&& f) {
  size_t i = 0;
  auto full = [](const float* p, size_t) { return vload(p); };
  for (; i + kLanes <= n; i += kLanes) vstore(out + i, f(i, full));
  if (i < n) {
    size_t rest = n - i;
    auto part = [rest](const float* p, size_t) {
      float tmp[kLanes] = {};
      std::memcpy(tmp, p, rest * sizeof(float));
      return vload(tmp);
    };
    float tmp[kLanes];
    vstore(tmp, f(i, part));
    std::memcpy(out + i, tmp, rest * sizeof(float));
  }
}

struct Shape4 {
  int B, T, H, D;
  int C() const { return H * D; }
};

struct Params {
  int heads;
  float scale;
  float p;  // dropout probability on the attention weights
  bool operator==(const Params& o) const {
    return heads == o.heads && scale == o.scale && p == o.p;
  }
};

// The dropout of one call: an element is kept when the hash of its flat index mixed
// with the seed is >= threshold, and kept ones are scaled by 1 / (1 - p).
struct DropMask {
  uint32_t threshold, seed_mix;
  float keep_scale;
  DropMask(float p, uint32_t seed)
      : threshold(threshold_of(p)), seed_mix(seed * 0x9E3779B9u), keep_scale(1.0f / (1.0f - p)) {}

  static uint32_t threshold_of(float p) {
    double t = std::round(static_cast<double>(p) * 4294967296.0);
    return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
  }
};

inline float row_max(const float* x, int n) {
  float m = x[0];
  int j = 0;
  if (n >= kLanes) {
    vfloat acc = vload(x);
    for (j = kLanes; j + kLanes <= n; j += kLanes) {
      vfloat v = vload(x + j);
      acc = acc > v ? acc : v;
    }
    for (int l = 0; l < kLanes; ++l) m = m > acc[l] ? m : acc[l];
  }
  for (; j < n; ++j) m = m > x[j] ? m : x[j];
  return m;
}

inline float row_dot(const float* a, const float* b, int n) {
  vfloat acc0 = {}, acc1 = {};
  int j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    acc0 += vload(a + j) * vload(b + j);
    acc1 += vload(a + j + kLanes) * vload(b + j + kLanes);
  }
  for (; j + kLanes <= n; j += kLanes) acc0 += vload(a + j) * vload(b + j);
  float sum = lanes_sum(acc0 + acc1);
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

inline float row_sum(const float* x, int n) {
  vfloat acc0 = {}, acc1 = {};
  int j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    acc0 += vload(x + j);
    acc1 += vload(x + j + kLanes);
  }
  for (; j + kLanes <= n; j += kLanes) acc0 += vload(x + j);
  float sum = lanes_sum(acc0 + acc1);
  for (; j < n; ++j) sum += x[j];
  return sum;
}

// dst[j] = src[j] * keep_j / (1 - p) for j < n, where element j's flat index is start + j
inline void drop_row(const float* src, float* dst, size_t n, uint32_t start, const DropMask& m) {
  vuint lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = static_cast<uint32_t>(l);
  const uint32_t base = start + m.seed_mix;
  vmap(dst, n, [&](size_t j, auto load) {
    vuint h = hash32(lane + (base + static_cast<uint32_t>(j)));
    return h >= m.threshold ? load(src + j, j) * m.keep_scale : vfloat{};
  });
}

// P (T x T, row-major, zero above the diagonal) for one (batch, head): scores of the
// rows [r0, r1) against keys [0, r1), then the masked softmax. With lse == nullptr
// the rows' maxima and sums are computed (forward) and their log-sum-exp written to
// lse_out; otherwise the saved log-sum-exp is used (backward).
void weights(const float* q, const float* k, int ld, int T, int D, float scale, float* P,
             const float* lse, float* lse_out) {
  for (int r0 = 0; r0 < T; r0 += kBlock) {
    int r1 = std::min(r0 + kBlock, T);
    gemm(false, true, r1 - r0, r1, D, scale, q + r0 * ld, ld, k, ld, P + r0 * T, T);
    for (int i = r0; i < r1; ++i) {
      float* row = P + i * T;
      int n = i + 1;
      float shift = lse == nullptr ? row_max(row, n) : lse[i];
      vmap(row, n, [&](size_t j, auto load) { return exp_nonpositive(load(row + j, j) - shift); });
      if (lse == nullptr) {
        float sum = row_sum(row, n), inv = 1.0f / sum;
        for (int j = 0; j < n; ++j) row[j] *= inv;
        lse_out[i] = shift + std::log(sum);
      }
      std::fill(row + n, row + T, 0.0f);
    }
  }
}

// dst = src * keep / (1 - p) over the lower triangle of one (batch, head), zero above.
// `base` is the flat index of element (0, 0).
void apply_dropout(const float* src, float* dst, int T, uint32_t base, const DropMask& m) {
  for (int i = 0; i < T; ++i) {
    uint32_t row = base + static_cast<uint32_t>(i) * static_cast<uint32_t>(T);
    drop_row(src + i * T, dst + i * T, i + 1, row, m);
    std::fill(dst + i * T + i + 1, dst + (i + 1) * T, 0.0f);
  }
}

void forward(const Shape4& s, const Params& prm, const float* qkv, uint32_t seed, float* y,
             float* lse) {
  const int T = s.T, D = s.D, C = s.C(), ld = 3 * C;
  std::vector<float> P(static_cast<size_t>(T) * T), Pd;
  const DropMask mask(prm.p, seed);
  if (prm.p > 0) Pd.resize(P.size());
  for (int b = 0; b < s.B; ++b) {
    for (int h = 0; h < s.H; ++h) {
      const float* q = qkv + static_cast<size_t>(b) * T * ld + h * D;
      const float* k = q + C;
      const float* v = q + 2 * C;
      float* yo = y + static_cast<size_t>(b) * T * C + h * D;
      weights(q, k, ld, T, D, prm.scale, P.data(), nullptr,
              lse + (static_cast<size_t>(b) * s.H + h) * T);
      const float* W = P.data();
      if (prm.p > 0) {
        uint32_t base = static_cast<uint32_t>((static_cast<size_t>(b) * s.H + h) * T * T);
        apply_dropout(P.data(), Pd.data(), T, base, mask);
        W = Pd.data();
      }
      for (int r0 = 0; r0 < T; r0 += kBlock) {
        int r1 = std::min(r0 + kBlock, T);
        gemm(false, false, r1 - r0, D, r1, 1.0f, W + r0 * T, T, v, ld, yo + r0 * C, C);
      }
    }
  }
}

void backward(const Shape4& s, const Params& prm, const float* qkv, uint32_t seed,
              const float* lse, const float* dy, float* dqkv) {
  const int T = s.T, D = s.D, C = s.C(), ld = 3 * C;
  const size_t TT = static_cast<size_t>(T) * T;
  std::vector<float> P(TT), dP(TT), Pd;
  const DropMask mask(prm.p, seed);
  if (prm.p > 0) Pd.resize(TT);
  for (int b = 0; b < s.B; ++b) {
    for (int h = 0; h < s.H; ++h) {
      size_t off = static_cast<size_t>(b) * T * ld + h * D;
      const float* q = qkv + off;
      const float* k = q + C;
      const float* v = q + 2 * C;
      float* dq = dqkv + off;
      float* dk = dq + C;
      float* dv = dq + 2 * C;
      const float* go = dy + static_cast<size_t>(b) * T * C + h * D;
      size_t bh = static_cast<size_t>(b) * s.H + h;
      weights(q, k, ld, T, D, prm.scale, P.data(), lse + bh * T, nullptr);
      const float* W = P.data();
      uint32_t base = static_cast<uint32_t>(bh * TT);
      if (prm.p > 0) {
        apply_dropout(P.data(), Pd.data(), T, base, mask);
        W = Pd.data();
      }
      // d(weights after dropout) = dO V^T, rows [r0, r1) against keys [0, r1)
      for (int r0 = 0; r0 < T; r0 += kBlock) {
        int r1 = std::min(r0 + kBlock, T);
        gemm(false, true, r1 - r0, r1, D, 1.0f, go + r0 * C, C, v, ld, dP.data() + r0 * T, T);
      }
      // through dropout and softmax: dS = P * (dP - rowsum(P * dP)), zero above the diagonal
      for (int i = 0; i < T; ++i) {
        float* g = dP.data() + i * T;
        const float* p = P.data() + i * T;
        int n = i + 1;
        if (prm.p > 0) {
          uint32_t row = base + static_cast<uint32_t>(i) * static_cast<uint32_t>(T);
          drop_row(g, g, n, row, mask);
        }
        float dot = row_dot(p, g, n);
        for (int j = 0; j < n; ++j) g[j] = p[j] * (g[j] - dot);
        std::fill(g + n, g + T, 0.0f);
      }
      // dQ = scale dS K over rows [r0, r1) and keys [0, r1);
      // dK = scale dS^T Q and dV = W^T dO over keys [c0, c1) and rows [c0, T)
      for (int r0 = 0; r0 < T; r0 += kBlock) {
        int r1 = std::min(r0 + kBlock, T);
        gemm(false, false, r1 - r0, D, r1, prm.scale, dP.data() + r0 * T, T, k, ld,
             dq + r0 * ld, ld);
        gemm(true, false, r1 - r0, D, T - r0, prm.scale, dP.data() + r0 * T + r0, T,
             q + r0 * ld, ld, dk + r0 * ld, ld);
        gemm(true, false, r1 - r0, D, T - r0, 1.0f, W + r0 * T + r0, T, go + r0 * C, C,
             dv + r0 * ld, ld);
      }
    }
  }
}

// A primitive that runs on the CPU only, with its parameters compared for equivalence.
template <class P>
class CpuPrimitive : public mx::Primitive {
 public:
  CpuPrimitive(mx::Stream stream, P prm) : mx::Primitive(stream), prm_(prm) {}

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU only");
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return prm_ == static_cast<const CpuPrimitive&>(other).prm_;
  }

 protected:
  // allocates the outputs, then runs fn on this primitive's stream
  template <class F>
  void dispatch(std::vector<mx::array>& outputs, F&& fn) {
    for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
    dispatch_only(std::forward<F>(fn));
  }

  // runs fn on this primitive's stream (the outputs already have their buffers)
  template <class F>
  void dispatch_only(F&& fn) {
    mx::cpu::get_command_encoder(stream()).dispatch(std::forward<F>(fn));
  }

  P prm_;
};

struct NoParams {
  bool operator==(const NoParams&) const { return true; }
};

struct Scalar {  // one float parameter: layer norm's eps, dropout's p
  float value;
  bool operator==(const Scalar& o) const { return value == o.value; }
};

mx::Stream cpu_stream() {
  auto stream = mx::default_stream(mx::default_device());
  if (stream.device != mx::Device::cpu) {
    throw std::invalid_argument("the fused CPU kernels run on the CPU only");
  }
  return stream;
}

void check_float32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) {
    std::ostringstream bad;
    bad << what << " must be float32, got " << a.dtype();
    throw std::invalid_argument(bad.str());
  }
}

Shape4 shape_of(const mx::array& qkv, int heads) {
  int C3 = qkv.shape(2);
  return {qkv.shape(0), qkv.shape(1), heads, C3 / 3 / heads};
}

class CausalAttentionGrad : public CpuPrimitive<Params> {
 public:
  using CpuPrimitive::CpuPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    auto qkv = inputs[0], seed = inputs[1], lse = inputs[2], dy = inputs[3];
    auto dqkv = outputs[0];
    dispatch(outputs, [qkv, seed, lse, dy, dqkv, prm = prm_, s = shape_of(qkv, prm_.heads)]() mutable {
      backward(s, prm, qkv.data<float>(), seed.data<uint32_t>()[0], lse.data<float>(),
               dy.data<float>(), dqkv.data<float>());
    });
  }

  const char* name() const override { return "CausalAttentionGrad"; }
};

class CausalAttention : public CpuPrimitive<Params> {
 public:
  using CpuPrimitive::CpuPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    auto qkv = inputs[0], seed = inputs[1];
    auto y = outputs[0], lse = outputs[1];
    dispatch(outputs, [qkv, seed, y, lse, prm = prm_, s = shape_of(qkv, prm_.heads)]() mutable {
      forward(s, prm, qkv.data<float>(), seed.data<uint32_t>()[0], y.data<float>(),
              lse.data<float>());
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override {
    // the log-sum-exp is an internal output: its cotangent is ignored
    auto dy = mx::contiguous(cotangents[0], false, stream());
    auto dqkv = mx::array(primals[0].shape(), mx::float32,
                          std::make_shared<CausalAttentionGrad>(stream(), prm_),
                          {primals[0], primals[1], outputs[1], dy});
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      grads.push_back(arg == 0 ? dqkv : mx::zeros_like(primals[1], stream()));
    }
    return grads;
  }

  const char* name() const override { return "CausalAttention"; }
};

mx::array causal_attention(const mx::array& qkv, const mx::array& seed, int heads,
                           float scale, float p) {
  std::ostringstream bad;
  if (heads < 1) {
    bad << "heads must be >= 1, got " << heads;
  } else if (qkv.ndim() != 3 || qkv.shape(2) % (3 * heads) != 0) {
    bad << "qkv must be (B, T, 3 * heads * head_dim) with heads=" << heads << ", got shape "
        << qkv.shape();
  } else if (qkv.dtype() != mx::float32) {
    bad << "qkv must be float32, got " << qkv.dtype();
  } else if (seed.dtype() != mx::uint32 || seed.size() != 1) {
    bad << "seed must be a uint32 array of one element, got " << seed.dtype() << " "
        << seed.shape();
  } else if (!(p >= 0.0f && p < 1.0f)) {
    bad << "dropout p must be in [0, 1), got " << p;
  } else if (p > 0 && static_cast<double>(qkv.shape(0)) * heads * qkv.shape(1) * qkv.shape(1) >=
             4294967296.0) {
    bad << "B * heads * T * T must be below 2^32 (32-bit dropout indices), got shape "
        << qkv.shape() << " with heads=" << heads;
  }
  if (!bad.str().empty()) throw std::invalid_argument(bad.str());
  auto stream = cpu_stream();
  int B = qkv.shape(0), T = qkv.shape(1), C = qkv.shape(2) / 3;
  auto outs = mx::array::make_arrays(
      {{B, T, C}, {B, heads, T}}, {mx::float32, mx::float32},
      std::make_shared<CausalAttention>(stream, Params{heads, scale, p}),
      {mx::contiguous(qkv, false, stream), mx::contiguous(seed, false, stream)});
  return outs[0];
}

// ---------------------------------------------------------------------------
// GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed as the
// identical x * sigmoid(2u), and its derivative, element-wise over float32.

constexpr float kGeluK = 0.7978845608028654f, kGeluC = 0.044715f;

inline vfloat sigmoid_2u(vfloat x) {
  vfloat u = kGeluK * (x + kGeluC * x * x * x);
  return 1.0f / (1.0f + exp_clamped(-2.0f * u));
}

void gelu_forward(const float* x, float* y, size_t n) {
  vmap(y, n, [x](size_t i, auto load) {
    vfloat v = load(x + i, i);
    return v * sigmoid_2u(v);
  });
}

void gelu_backward(const float* x, const float* dy, float* dx, size_t n) {
  vmap(dx, n, [x, dy](size_t i, auto load) {
    vfloat v = load(x + i, i), s = sigmoid_2u(v);
    vfloat du = kGeluK * (1.0f + 3.0f * kGeluC * v * v);
    return load(dy + i, i) * (s + v * s * (1.0f - s) * 2.0f * du);
  });
}

class GeluGrad : public CpuPrimitive<NoParams> {
 public:
  explicit GeluGrad(mx::Stream stream) : CpuPrimitive(stream, {}) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    auto x = inputs[0], dy = inputs[1], dx = outputs[0];
    dispatch(outputs, [x, dy, dx]() mutable {
      gelu_backward(x.data<float>(), dy.data<float>(), dx.data<float>(), x.size());
    });
  }

  const char* name() const override { return "GeluGrad"; }
};

class Gelu : public CpuPrimitive<NoParams> {
 public:
  explicit Gelu(mx::Stream stream) : CpuPrimitive(stream, {}) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    auto x = inputs[0], y = outputs[0];
    dispatch(outputs, [x, y]() mutable { gelu_forward(x.data<float>(), y.data<float>(), x.size()); });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>&,
                             const std::vector<mx::array>&) override {
    auto dy = mx::contiguous(cotangents[0], false, stream());
    return {mx::array(primals[0].shape(), mx::float32, std::make_shared<GeluGrad>(stream()),
                      {primals[0], dy})};
  }

  const char* name() const override { return "Gelu"; }
};

mx::array gelu(const mx::array& x) {
  check_float32(x, "x");
  auto stream = cpu_stream();
  return mx::array(x.shape(), mx::float32, std::make_shared<Gelu>(stream),
                   {mx::contiguous(x, false, stream)});
}

// ---------------------------------------------------------------------------
// Inverted dropout with mlx_model.ops.cpu.dropout's hashed masks: element i (flat
// index) is kept when lowbias32(i + seed * 0x9E3779B9) >= round(p * 2^32), and kept
// elements are scaled by 1 / (1 - p). The map is linear in x with a mask that only the
// seed decides, so its vector-Jacobian product is the same map of the cotangent: no
// mask is stored.

class Dropout : public CpuPrimitive<Scalar> {
 public:
  using CpuPrimitive::CpuPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    auto x = inputs[0], seed = inputs[1], y = outputs[0];
    dispatch(outputs, [x, seed, y, p = prm_.value]() mutable {
      DropMask m(p, seed.data<uint32_t>()[0]);
      drop_row(x.data<float>(), y.data<float>(), x.size(), 0u, m);
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    auto dy = mx::contiguous(cotangents[0], false, stream());
    auto dx = mx::array(dy.shape(), mx::float32, std::make_shared<Dropout>(stream(), prm_),
                        {dy, primals[1]});
    std::vector<mx::array> grads;
    for (int arg : argnums) grads.push_back(arg == 0 ? dx : mx::zeros_like(primals[1], stream()));
    return grads;
  }

  const char* name() const override { return "Dropout"; }
};

mx::array dropout(const mx::array& x, const mx::array& seed, float p) {
  check_float32(x, "x");
  std::ostringstream bad;
  if (seed.dtype() != mx::uint32 || seed.size() != 1) {
    bad << "seed must be a uint32 array of one element, got " << seed.dtype() << " "
        << seed.shape();
  } else if (!(p >= 0.0f && p < 1.0f)) {
    bad << "dropout p must be in [0, 1), got " << p;
  } else if (static_cast<double>(x.size()) >= 4294967296.0) {
    bad << "x must have fewer than 2^32 elements (32-bit mask indices), got shape " << x.shape();
  }
  if (!bad.str().empty()) throw std::invalid_argument(bad.str());
  auto stream = cpu_stream();
  return mx::array(x.shape(), mx::float32, std::make_shared<Dropout>(stream, Scalar{p}),
                   {mx::contiguous(x, false, stream), mx::contiguous(seed, false, stream)});
}

// ---------------------------------------------------------------------------
// Layer norm over the last axis (C), with weight and bias; the forward also returns
// each row's mean and 1/std for the backward.

void layer_norm_forward(const float* x, const float* w, const float* b, float eps, size_t rows,
                        int C, float* y, float* mean, float* rstd) {
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    float m = row_sum(xr, C) / C;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, var = 0.0f;
    int j = 0;
    for (; j + 8 <= C; j += 8)
      for (int l = 0; l < 8; ++l) acc[l] += (xr[j + l] - m) * (xr[j + l] - m);
    for (; j < C; ++j) var += (xr[j] - m) * (xr[j] - m);
    for (int l = 0; l < 8; ++l) var += acc[l];
    float rs = 1.0f / std::sqrt(var / C + eps);
    for (int c = 0; c < C; ++c) yr[c] = (xr[c] - m) * rs * w[c] + b[c];
    mean[r] = m;
    rstd[r] = rs;
  }
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy w; dw = sum dy xhat; db = sum dy
void layer_norm_backward(const float* x, const float* w, const float* mean, const float* rstd,
                         const float* dy, size_t rows, int C, float* dx, float* dw, float* db) {
  std::vector<float> g(C), xhat(C);
  std::fill(dw, dw + C, 0.0f);
  std::fill(db, db + C, 0.0f);
  float* __restrict gp = g.data();
  float* __restrict xh = xhat.data();
  float* __restrict dwp = dw;
  float* __restrict dbp = db;
  for (size_t r = 0; r < rows; ++r) {
    const float* __restrict xr = x + r * C;
    const float* __restrict dyr = dy + r * C;
    float m = mean[r], rs = rstd[r];
    for (int c = 0; c < C; ++c) {
      xh[c] = (xr[c] - m) * rs;
      gp[c] = dyr[c] * w[c];
      dwp[c] += dyr[c] * xh[c];
      dbp[c] += dyr[c];
    }
    float mg = row_sum(gp, C) / C, mgx = row_dot(gp, xh, C) / C;
    float* dxr = dx + r * C;
    for (int c = 0; c < C; ++c) dxr[c] = rs * (gp[c] - mg - xh[c] * mgx);
  }
}

class LayerNormGrad : public CpuPrimitive<Scalar> {
 public:
  using CpuPrimitive::CpuPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    auto x = inputs[0], w = inputs[1], mean = inputs[2], rstd = inputs[3], dy = inputs[4];
    auto dx = outputs[0], dw = outputs[1], db = outputs[2];
    int C = x.shape(-1);
    size_t rows = x.size() / C;
    dispatch(outputs, [x, w, mean, rstd, dy, dx, dw, db, rows, C]() mutable {
      layer_norm_backward(x.data<float>(), w.data<float>(), mean.data<float>(),
                          rstd.data<float>(), dy.data<float>(), rows, C, dx.data<float>(),
                          dw.data<float>(), db.data<float>());
    });
  }

  const char* name() const override { return "LayerNormGrad"; }
};

class LayerNorm : public CpuPrimitive<Scalar> {
 public:
  using CpuPrimitive::CpuPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    auto x = inputs[0], w = inputs[1], b = inputs[2];
    auto y = outputs[0], mean = outputs[1], rstd = outputs[2];
    int C = x.shape(-1);
    size_t rows = x.size() / C;
    dispatch(outputs, [x, w, b, y, mean, rstd, rows, C, eps = prm_.value]() mutable {
      layer_norm_forward(x.data<float>(), w.data<float>(), b.data<float>(), eps, rows, C,
                         y.data<float>(), mean.data<float>(), rstd.data<float>());
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override {
    auto dy = mx::contiguous(cotangents[0], false, stream());
    const auto& x = primals[0];
    auto grads = mx::array::make_arrays(
        {x.shape(), primals[1].shape(), primals[2].shape()},
        {mx::float32, mx::float32, mx::float32}, std::make_shared<LayerNormGrad>(stream(), prm_),
        {x, primals[1], outputs[1], outputs[2], dy});
    std::vector<mx::array> out;
    for (int arg : argnums) out.push_back(grads[arg]);
    return out;
  }

  const char* name() const override { return "LayerNorm"; }
};

mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias,
                     float eps) {
  check_float32(x, "x");
  check_float32(weight, "weight");
  check_float32(bias, "bias");
  if (x.ndim() < 1 || weight.ndim() != 1 || bias.ndim() != 1 ||
      weight.shape(0) != x.shape(-1) || bias.shape(0) != x.shape(-1)) {
    std::ostringstream bad;
    bad << "layer_norm needs weight and bias of shape (C,) for x of shape (..., C), got x "
        << x.shape() << ", weight " << weight.shape() << ", bias " << bias.shape();
    throw std::invalid_argument(bad.str());
  }
  if (!(eps > 0.0f)) {
    throw std::invalid_argument("eps must be > 0, got " + std::to_string(eps));
  }
  auto stream = cpu_stream();
  auto rows_shape = x.shape();
  rows_shape.pop_back();
  auto outs = mx::array::make_arrays(
      {x.shape(), rows_shape, rows_shape}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<LayerNorm>(stream, Scalar{eps}),
      {mx::contiguous(x, false, stream), mx::contiguous(weight, false, stream),
       mx::contiguous(bias, false, stream)});
  return outs[0];
}

// ---------------------------------------------------------------------------
// GPT-2's input: token embedding plus position embedding, x[b, t] = wte[idx[b, t]] +
// wpe[t], for ids (B, T) int32. The backward adds each position's cotangent into its
// token's row of dwte and sums it over the batch into dwpe: as MLX operations, a gather,
// a broadcast and their general scatter-add took a tenth of the seed model's step. An id
// outside [0, V) gives a NaN row and no gradient.

// dst[j] = a[j] + b[j] for j < n (dst may be a)
inline void add_rows(float* dst, const float* a, const float* b, int n) {
  vmap(dst, n, [a, b](size_t j, auto load) { return load(a + j, j) + load(b + j, j); });
}

void embed_forward(const int32_t* idx, const float* wte, const float* wpe, int B, int T, int V,
                   int C, float* x) {
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      int32_t v = idx[b * T + t];
      float* xr = x + (static_cast<size_t>(b) * T + t) * C;
      if (v < 0 || v >= V) {
        std::fill(xr, xr + C, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      add_rows(xr, wte + static_cast<size_t>(v) * C, wpe + static_cast<size_t>(t) * C, C);
    }
  }
}

// dwpe has wpe's S >= T rows; those past T get zeros
void embed_backward(const int32_t* idx, const float* dx, int B, int T, int V, int S, int C,
                    float* dwte, float* dwpe) {
  std::fill(dwte, dwte + static_cast<size_t>(V) * C, 0.0f);
  std::fill(dwpe, dwpe + static_cast<size_t>(S) * C, 0.0f);
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      int32_t v = idx[b * T + t];
      const float* d = dx + (static_cast<size_t>(b) * T + t) * C;
      float* p = dwpe + static_cast<size_t>(t) * C;
      add_rows(p, p, d, C);
      if (v < 0 || v >= V) continue;
      float* e = dwte + static_cast<size_t>(v) * C;
      add_rows(e, e, d, C);
    }
  }
}

class EmbedGrad : public CpuPrimitive<NoParams> {
 public:
  explicit EmbedGrad(mx::Stream stream) : CpuPrimitive(stream, {}) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    auto idx = inputs[0], dx = inputs[1], dwte = outputs[0], dwpe = outputs[1];
    int B = idx.shape(0), T = idx.shape(1), V = dwte.shape(0), S = dwpe.shape(0);
    int C = dwte.shape(1);
    dispatch(outputs, [idx, dx, dwte, dwpe, B, T, V, S, C]() mutable {
      embed_backward(idx.data<int32_t>(), dx.data<float>(), B, T, V, S, C, dwte.data<float>(),
                     dwpe.data<float>());
    });
  }

  const char* name() const override { return "EmbedGrad"; }
};

class Embed : public CpuPrimitive<NoParams> {
 public:
  explicit Embed(mx::Stream stream) : CpuPrimitive(stream, {}) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    auto idx = inputs[0], wte = inputs[1], wpe = inputs[2], x = outputs[0];
    int B = idx.shape(0), T = idx.shape(1), V = wte.shape(0), C = wte.shape(1);
    dispatch(outputs, [idx, wte, wpe, x, B, T, V, C]() mutable {
      embed_forward(idx.data<int32_t>(), wte.data<float>(), wpe.data<float>(), B, T, V, C,
                    x.data<float>());
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    const auto& idx = primals[0];
    auto dx = mx::contiguous(cotangents[0], false, stream());
    auto grads = mx::array::make_arrays({primals[1].shape(), primals[2].shape()},
                                        {mx::float32, mx::float32},
                                        std::make_shared<EmbedGrad>(stream()), {idx, dx});
    std::vector<mx::array> out;
    for (int arg : argnums) {
      out.push_back(arg == 0 ? mx::zeros_like(idx, stream()) : grads[arg - 1]);
    }
    return out;
  }

  const char* name() const override { return "Embed"; }
};

mx::array embed(const mx::array& idx, const mx::array& wte, const mx::array& wpe) {
  check_float32(wte, "wte");
  check_float32(wpe, "wpe");
  std::ostringstream bad;
  if (idx.dtype() != mx::int32 || idx.ndim() != 2) {
    bad << "ids must be int32 of shape (B, T), got " << idx.dtype() << " " << idx.shape();
  } else if (wte.ndim() != 2 || wpe.ndim() != 2 || wte.shape(1) != wpe.shape(1)) {
    bad << "embed needs wte (V, C) and wpe (S, C), got " << wte.shape() << " and "
        << wpe.shape();
  } else if (idx.shape(1) > wpe.shape(0)) {
    bad << "sequence length " << idx.shape(1) << " exceeds the " << wpe.shape(0)
        << " positions of wpe";
  }
  if (!bad.str().empty()) throw std::invalid_argument(bad.str());
  auto stream = cpu_stream();
  return mx::array({idx.shape(0), idx.shape(1), wte.shape(1)}, mx::float32,
                   std::make_shared<Embed>(stream),
                   {mx::contiguous(idx, false, stream), mx::contiguous(wte, false, stream),
                    mx::contiguous(wpe, false, stream)});
}

// ---------------------------------------------------------------------------
// Cross-entropy of each row of logits (..., V) against its target id (...) int32:
// loss = lse - logits[target] with lse = log(sum(exp(logits))), max-subtracted. The
// forward also returns lse, from which the backward recomputes the softmax:
// dlogits = dloss * (softmax - onehot(target)). As MLX operations this is a log-sum-exp,
// a gather and, backward, a scatter over the (rows, V) logits, each a pass of scalar
// loops: with the vocabulary of 65 characters they cost more than the head's product.
// A target outside [0, V) gives a NaN loss (and no gradient); a non-finite logit makes
// its row's loss non-finite.

void cross_entropy_forward(const float* logits, const int32_t* target, size_t rows, int V,
                           float* loss, float* lse) {
  for (size_t r = 0; r < rows; ++r) {
    const float* x = logits + r * V;
    float m = row_max(x, V);
    vfloat acc = {}, poison = {};
    int j = 0;
    for (; j + kLanes <= V; j += kLanes) {
      vfloat v = vload(x + j);
      acc += exp_nonpositive(v - m);
      poison += v * 0.0f;  // NaN where a logit is NaN or infinite
    }
    float s = lanes_sum(acc), bad = lanes_sum(poison);
    for (; j < V; ++j) {
      s += exp_nonpositive(x[j] - m);
      bad += x[j] * 0.0f;
    }
    float l = m + std::log(s) + bad;
    int32_t t = target[r];
    lse[r] = l;
    loss[r] = (t >= 0 && t < V) ? l - x[t] : std::numeric_limits<float>::quiet_NaN();
  }
}

void cross_entropy_backward(const float* logits, const int32_t* target, const float* lse,
                            const float* dloss, size_t rows, int V, float* dlogits) {
  for (size_t r = 0; r < rows; ++r) {
    const float* x = logits + r * V;
    float* dx = dlogits + r * V;
    float g = dloss[r], l = lse[r];
    vmap(dx, V, [x, g, l](size_t j, auto load) { return g * exp_nonpositive(load(x + j, j) - l); });
    int32_t t = target[r];
    if (t >= 0 && t < V) dx[t] -= g;
  }
}

class CrossEntropyGrad : public CpuPrimitive<NoParams> {
 public:
  explicit CrossEntropyGrad(mx::Stream stream) : CpuPrimitive(stream, {}) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    auto x = inputs[0], t = inputs[1], lse = inputs[2], dl = inputs[3], dx = outputs[0];
    int V = x.shape(-1);
    dispatch(outputs, [x, t, lse, dl, dx, V]() mutable {
      cross_entropy_backward(x.data<float>(), t.data<int32_t>(), lse.data<float>(),
                             dl.data<float>(), t.size(), V, dx.data<float>());
    });
  }

  const char* name() const override { return "CrossEntropyGrad"; }
};

class CrossEntropy : public CpuPrimitive<NoParams> {
 public:
  explicit CrossEntropy(mx::Stream stream) : CpuPrimitive(stream, {}) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    auto x = inputs[0], t = inputs[1], loss = outputs[0], lse = outputs[1];
    int V = x.shape(-1);
    dispatch(outputs, [x, t, loss, lse, V]() mutable {
      cross_entropy_forward(x.data<float>(), t.data<int32_t>(), t.size(), V,
                            loss.data<float>(), lse.data<float>());
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override {
    auto dl = mx::contiguous(cotangents[0], false, stream());
    auto dx = mx::array(primals[0].shape(), mx::float32,
                        std::make_shared<CrossEntropyGrad>(stream()),
                        {primals[0], primals[1], outputs[1], dl});
    std::vector<mx::array> grads;
    for (int arg : argnums) grads.push_back(arg == 0 ? dx : mx::zeros_like(primals[1], stream()));
    return grads;
  }

  const char* name() const override { return "CrossEntropy"; }
};

mx::array cross_entropy(const mx::array& logits, const mx::array& target) {
  check_float32(logits, "logits");
  std::ostringstream bad;
  if (target.dtype() != mx::int32) {
    bad << "targets must be int32, got " << target.dtype();
  } else if (logits.ndim() != target.ndim() + 1 ||
             !std::equal(target.shape().begin(), target.shape().end(), logits.shape().begin())) {
    bad << "cross_entropy needs logits (..., V) for targets (...), got logits "
        << logits.shape() << " and targets " << target.shape();
  } else if (logits.shape(-1) < 1) {
    bad << "logits need at least one class, got shape " << logits.shape();
  }
  if (!bad.str().empty()) throw std::invalid_argument(bad.str());
  auto stream = cpu_stream();
  auto outs = mx::array::make_arrays(
      {target.shape(), target.shape()}, {mx::float32, mx::float32},
      std::make_shared<CrossEntropy>(stream),
      {mx::contiguous(logits, false, stream), mx::contiguous(target, false, stream)});
  return outs[0];
}

// ---------------------------------------------------------------------------
// One step of generation for the whole model: each sequence's newest token through
// every block against its KV cache, to the next-token logits, in one primitive. At
// batch 1 the model is a chain of matrix-vector products over a few hundred floats;
// as MLX operations that is some eighty primitives per token, each costing more to
// dispatch than to compute. Here it is one loop nest over the weights.
//
// Inputs: tokens (B,) int32; offset (1,) int32, the positions the caches hold; wte
// (V, C); wpe (S, C); the head (V, C); ln_f's weight and bias; per layer, in order,
// ln_1 w, b, c_attn W (3C, C), b, attn c_proj W (C, C), b, ln_2 w, b, c_fc W (4C, C),
// b, mlp c_proj W (C, 4C), b; then per layer the keys and the values (B, H, S, D).
// Outputs: logits (B, V), offset + 1, and the updated keys and values of every layer
// (written in place when MLX lets the primitive donate the input buffers).

constexpr int kPerLayer = 12;

// the elements of `a` (any strides) in row-major order into out
template <class T>
void copy_to_rows(const mx::array& a, T* out) {
  const T* src = a.data<T>();
  if (a.flags().row_contiguous) {
    std::memcpy(out, src, a.nbytes());
    return;
  }
  const int nd = a.ndim();
  std::vector<int> idx(nd, 0);
  for (size_t i = 0; i < a.size(); ++i) {
    int64_t at = 0;
    for (int d = 0; d < nd; ++d) at += idx[d] * a.strides()[d];
    out[i] = src[at];
    for (int d = nd - 1; d >= 0 && ++idx[d] == a.shape(d); --d) idx[d] = 0;
  }
}

// y[b, o] = bias[o] + dot(W[o, :], x[b, :]) for a (out, in) row-major W: each weight row
// is read once for all B sequences.
void matvec(const float* W, const float* bias, const float* x, int B, int in, int out, float* y) {
  for (int o = 0; o < out; ++o) {
    const float* w = W + static_cast<size_t>(o) * in;
    for (int b = 0; b < B; ++b) y[b * out + o] = bias[o] + row_dot(w, x + b * in, in);
  }
}

void layer_norm_rows(const float* x, const float* w, const float* b, float eps, int rows, int C,
                     float* y) {
  float mean, rstd;
  for (int r = 0; r < rows; ++r)
    layer_norm_forward(x + r * C, w, b, eps, 1, C, y + r * C, &mean, &rstd);
}

struct DecodeParams {
  int layers, heads;
  float eps;
  bool operator==(const DecodeParams& o) const {
    return layers == o.layers && heads == o.heads && eps == o.eps;
  }
};

// keys and values: per layer (B, H, S, D), already holding the inputs' contents
void decode(const DecodeParams& prm, int B, int C, int V, int S, const int32_t* tok, int pos,
            const std::vector<const float*>& w, const std::vector<float*>& keys,
            const std::vector<float*>& values, float* logits) {
  const int H = prm.heads, D = C / H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> x(B * C), h(B * C), qkv(B * 3 * C), y(B * C), a(B * C), f(B * 4 * C),
      p(pos + 1);
  const float *wte = w[0], *wpe = w[1], *head = w[2];
  for (int b = 0; b < B; ++b)
    for (int c = 0; c < C; ++c) x[b * C + c] = wte[tok[b] * C + c] + wpe[pos * C + c];
  for (int l = 0; l < prm.layers; ++l) {
    const float* const* lw = w.data() + 5 + l * kPerLayer;
    layer_norm_rows(x.data(), lw[0], lw[1], prm.eps, B, C, h.data());
    matvec(lw[2], lw[3], h.data(), B, C, 3 * C, qkv.data());
    for (int b = 0; b < B; ++b) {
      for (int hd = 0; hd < H; ++hd) {
        const float* q = qkv.data() + b * 3 * C + hd * D;
        size_t base = (static_cast<size_t>(b) * H + hd) * S * D;
        float* K = keys[l] + base;
        float* Vv = values[l] + base;
        std::memcpy(K + pos * D, q + C, D * sizeof(float));
        std::memcpy(Vv + pos * D, q + 2 * C, D * sizeof(float));
        for (int j = 0; j <= pos; ++j) p[j] = scale * row_dot(q, K + j * D, D);
        float shift = row_max(p.data(), pos + 1);
        for (int j = 0; j <= pos; ++j) p[j] = exp_nonpositive(p[j] - shift);  // a few keys
        float inv = 1.0f / row_sum(p.data(), pos + 1);
        float* out = y.data() + b * C + hd * D;
        std::fill(out, out + D, 0.0f);
        for (int j = 0; j <= pos; ++j) {
          float pj = p[j] * inv;
          const float* vj = Vv + j * D;
          for (int d = 0; d < D; ++d) out[d] += pj * vj[d];
        }
      }
    }
    matvec(lw[4], lw[5], y.data(), B, C, C, a.data());
    for (int i = 0; i < B * C; ++i) x[i] += a[i];
    layer_norm_rows(x.data(), lw[6], lw[7], prm.eps, B, C, h.data());
    matvec(lw[8], lw[9], h.data(), B, C, 4 * C, f.data());
    gelu_forward(f.data(), f.data(), f.size());
    matvec(lw[10], lw[11], f.data(), B, 4 * C, C, a.data());
    for (int i = 0; i < B * C; ++i) x[i] += a[i];
  }
  layer_norm_rows(x.data(), w[3], w[4], prm.eps, B, C, h.data());
  std::vector<float> zero(V, 0.0f);
  matvec(head, zero.data(), h.data(), B, C, V, logits);
}

class DecodeStep : public CpuPrimitive<DecodeParams> {
 public:
  using CpuPrimitive::CpuPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override {
    const int L = prm_.layers, nw = 5 + L * kPerLayer;
    outputs[0].set_data(mx::allocator::malloc(outputs[0].nbytes()));
    outputs[1].set_data(mx::allocator::malloc(outputs[1].nbytes()));
    // the caches: updated in place where MLX lets this primitive have the input's
    // buffer, else copied first (inside the dispatched task, off this thread)
    std::vector<std::pair<mx::array, mx::array>> copies;
    for (int i = 0; i < 2 * L; ++i) {
      const auto& in = inputs[2 + nw + i];
      auto& out = outputs[2 + i];
      if (in.is_donatable() && in.flags().row_contiguous) {
        out.copy_shared_buffer(in);
      } else {
        out.set_data(mx::allocator::malloc(out.nbytes()));
        copies.emplace_back(in, out);
      }
    }
    dispatch_only([inputs, outputs, copies, prm = prm_, nw, L]() mutable {
      for (auto& [in, out] : copies) copy_to_rows(in, out.data<float>());
      const auto& keys0 = outputs[2];
      int B = keys0.shape(0), S = keys0.shape(2), C = inputs[2].shape(1),
          V = inputs[2].shape(0);
      std::vector<int32_t> tok(B);
      copy_to_rows(inputs[0], tok.data());
      int pos = inputs[1].data<int32_t>()[0];
      std::vector<const float*> w(nw);
      for (int i = 0; i < nw; ++i) w[i] = inputs[2 + i].data<float>();
      std::vector<float*> keys(L), values(L);
      for (int l = 0; l < L; ++l) {
        keys[l] = outputs[2 + l].data<float>();
        values[l] = outputs[2 + L + l].data<float>();
      }
      outputs[1].data<int32_t>()[0] = pos + 1;
      if (pos < 0 || pos >= S) {
        std::fill(outputs[0].data<float>(), outputs[0].data<float>() + B * V, NAN);
        return;  // a full cache: generation re-encodes before this happens
      }
      decode(prm, B, C, V, S, tok.data(), pos, w, keys, values, outputs[0].data<float>());
    });
  }

  const char* name() const override { return "DecodeStep"; }
};

// tokens (B,), offset (1,), weights as listed above, keys and values per layer
std::vector<mx::array> decode_step(const mx::array& tokens, const mx::array& offset,
                                   const std::vector<mx::array>& weights,
                                   const std::vector<mx::array>& keys,
                                   const std::vector<mx::array>& values, int heads, float eps) {
  std::ostringstream bad;
  int L = static_cast<int>(keys.size());
  if (L < 1 || values.size() != keys.size() ||
      weights.size() != static_cast<size_t>(5 + L * kPerLayer)) {
    bad << "decode_step needs 5 + 12 per layer weights and one keys and values array per "
           "layer, got " << weights.size() << " weights, " << keys.size() << " keys, "
        << values.size() << " values";
  } else if (tokens.ndim() != 1 || tokens.dtype() != mx::int32) {
    bad << "tokens must be int32 of shape (B,), got " << tokens.dtype() << " " << tokens.shape();
  } else if (offset.size() != 1 || offset.dtype() != mx::int32) {
    bad << "offset must be an int32 array of one element, got " << offset.dtype() << " "
        << offset.shape();
  } else if (weights[0].ndim() != 2 || heads < 1 || weights[0].shape(1) % heads != 0) {
    bad << "wte must be (V, C) with C a multiple of heads=" << heads << ", got "
        << weights[0].shape();
  }
  if (!bad.str().empty()) throw std::invalid_argument(bad.str());
  int B = tokens.shape(0), C = weights[0].shape(1), V = weights[0].shape(0);
  for (size_t i = 0; i < weights.size(); ++i) check_float32(weights[i], "every weight");
  for (int l = 0; l < L; ++l) {
    for (const auto* cache : {&keys[l], &values[l]}) {
      check_float32(*cache, "the cache");
      if (cache->ndim() != 4 || cache->shape(0) != B || cache->shape(1) != heads ||
          cache->shape(1) * cache->shape(3) != C || cache->shape() != keys[0].shape()) {
        bad << "every cache must be (B, heads, S, C / heads) = (" << B << ", " << heads
            << ", S, " << C / heads << "), got " << cache->shape();
        throw std::invalid_argument(bad.str());
      }
    }
  }
  auto stream = cpu_stream();
  // no copies as graph nodes (each costs more to schedule than this step takes): the
  // weights are parameters, already evaluated and contiguous; tokens and caches of any
  // layout are read as they are
  auto as_rows = [&](const mx::array& a) {
    return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, stream);
  };
  std::vector<mx::array> inputs = {tokens, offset};
  for (const auto& a : weights) inputs.push_back(as_rows(a));
  std::vector<mx::Shape> shapes = {{B, V}, {1}};
  std::vector<mx::Dtype> dtypes = {mx::float32, mx::int32};
  for (const auto* group : {&keys, &values}) {
    for (const auto& a : *group) {
      inputs.push_back(a);
      shapes.push_back(a.shape());
      dtypes.push_back(mx::float32);
    }
  }
  return mx::array::make_arrays(std::move(shapes), std::move(dtypes),
                                std::make_shared<DecodeStep>(stream, DecodeParams{L, heads, eps}),
                                std::move(inputs));
}

}  // namespace

NB_MODULE(_cpu_kernels, m) {
  m.doc() = "Fused CPU primitives for MLX: embeddings, attention, GELU, layer norm, dropout, "
            "cross-entropy, decoding";
  m.def("causal_attention", &causal_attention, nb::arg("qkv"), nb::arg("seed"),
        nb::arg("heads"), nb::arg("scale"), nb::arg("p"),
        "Causal attention of the fused projection qkv (B, T, 3C) -> (B, T, C).");
  m.def("gelu", &gelu, nb::arg("x"), "GPT-2's tanh GELU, element-wise.");
  m.def("dropout", &dropout, nb::arg("x"), nb::arg("seed"), nb::arg("p"),
        "Inverted dropout with hashed masks seeded by a uint32 (1,) array.");
  m.def("layer_norm", &layer_norm, nb::arg("x"), nb::arg("weight"), nb::arg("bias"),
        nb::arg("eps"), "Layer norm over the last axis.");
  m.def("embed", &embed, nb::arg("ids"), nb::arg("wte"), nb::arg("wpe"),
        "Token plus position embeddings: wte[ids[b, t]] + wpe[t] -> (B, T, C).");
  m.def("cross_entropy", &cross_entropy, nb::arg("logits"), nb::arg("targets"),
        "Cross-entropy of logits (..., V) against int32 targets (...) -> loss (...).");
  m.def("decode_step", &decode_step, nb::arg("tokens"), nb::arg("offset"), nb::arg("weights"),
        nb::arg("keys"), nb::arg("values"), nb::arg("heads"), nb::arg("eps"),
        "One generation step of the whole model from its KV cache -> [logits, offset, "
        "keys..., values...].");
}

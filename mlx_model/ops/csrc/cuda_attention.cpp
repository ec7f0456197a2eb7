// Causal self-attention with dropout on its weights (p > 0), as GPT-2 trains it, in one
// cuDNN kernel forward and one backward: MLX primitives for MLX's CUDA backend. Built at first
// use by mlx_model.ops.cuda (the system C++ compiler, against the installed MLX's
// headers, cuDNN's frontend headers and nanobind); without it the model computes the
// weights, their dropout and the product with the values as separate MLX operations.
//
// MLX's own fused attention (mx.fast.scaled_dot_product_attention, cuDNN's graph API
// underneath) has no dropout. cuDNN's fused attention does: the mask comes from a Philox
// generator seeded by two int64 values read from GPU memory (seed, offset) when the
// kernel runs, and the backward regenerates the same mask from them. The seed is an
// input array, drawn from MLX's generator, so a run's masks follow its MLX seed, and a
// compiled step or a CUDA graph replayed with new seeds draws new masks.
//
// Layout: the input is the fused projection qkv (B, T, 3C), row-contiguous; q, k and v
// are handed to cuDNN as strided (B, H, T, D) views of it (no transposes), the output is
// written as (B, T, H, D), which is (B, T, C) with the heads merged, and the gradient of
// qkv is written into one (B, T, 3C) buffer through the same strided views. The forward
// also returns each row's log-sum-exp (B, H, T, float32), which the backward reads.
//
// Buffers: MLX allocates GPU memory for an array only inside its own code (its
// stream-ordered allocator is not exported). So each output takes over the buffer of an
// input made for it alone: a broadcast value copied to a fresh array of the output's size
// (`fresh` below). Nothing else reads those arrays, so writing into them is safe; their
// value depends on qkv and the seed, so MLX's compiler never merges two of them. cuDNN's
// workspace, where a plan needs one, is such an array too.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <cudnn_frontend.h>
#include <nanobind/nanobind.h>

#include "mlx/array.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"
#include "mlx/utils.h"

namespace mx = mlx::core;
namespace fe = cudnn_frontend;
namespace nb = nanobind;

namespace {

constexpr int kSequenceMultiple = 128;  // the sequence lengths the backward runs correctly

enum Uid : int64_t { Q = 1, K, V, O, STATS, SEED, OFFSET, D_O, D_Q, D_K, D_V };

struct Params {
  int heads;
  float scale;
  float p;
  bool operator==(const Params& o) const {
    return heads == o.heads && scale == o.scale && p == o.p;
  }
};

struct Key {
  int device, B, T, H, D;
  bool bf16, backward;
  float scale, p;
  auto tie() const { return std::tie(device, B, T, H, D, bf16, backward, scale, p); }
  bool operator<(const Key& o) const { return tie() < o.tie(); }
};

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;  // bytes
};

void check(fe::error_t err, const char* what) {
  if (!err.is_good()) {
    throw std::runtime_error(std::string("cuDNN attention: ") + what + ": " + err.get_message());
  }
}

std::recursive_mutex& lock() {  // the plans, the handles, and a handle's stream in use
  static std::recursive_mutex m;
  return m;
}

cudnnHandle_t handle(int device) {
  static std::map<int, cudnnHandle_t> handles;
  auto it = handles.find(device);
  if (it == handles.end()) {
    mx::cu::device(device).make_current();
    cudnnHandle_t h;
    if (cudnnCreate(&h) != CUDNN_STATUS_SUCCESS) {
      throw std::runtime_error("cuDNN attention: cudnnCreate failed");
    }
    it = handles.emplace(device, h).first;
  }
  return it->second;
}

// The (B, H, T, D) strides of q, k or v in qkv (B, T, 3C), and of the output (B, T, C).
std::vector<int64_t> in_strides(const Key& k) {
  int64_t C = int64_t(k.H) * k.D;
  return {int64_t(k.T) * 3 * C, k.D, 3 * C, 1};
}
std::vector<int64_t> out_strides(const Key& k) {
  int64_t C = int64_t(k.H) * k.D;
  return {int64_t(k.T) * C, k.D, C, 1};
}

Plan build(const Key& k) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(k.bf16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  std::vector<int64_t> dims{k.B, k.H, k.T, k.D};
  std::vector<int64_t> stats_dims{k.B, k.H, k.T, 1}, stats_strides{int64_t(k.H) * k.T, k.T, 1, 1};
  auto tensor = [&](const char* name, Uid uid, const std::vector<int64_t>& d,
                    const std::vector<int64_t>& s) {
    return g->tensor(
        fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(d).set_stride(s));
  };
  auto scalar = [&](const char* name, Uid uid) {
    return g->tensor(fe::graph::Tensor_attributes()
                         .set_name(name)
                         .set_uid(uid)
                         .set_dim({1, 1, 1, 1})
                         .set_stride({1, 1, 1, 1})
                         .set_data_type(fe::DataType_t::INT64));
  };
  auto q = tensor("Q", Q, dims, in_strides(k));
  auto kk = tensor("K", K, dims, in_strides(k));
  auto v = tensor("V", V, dims, in_strides(k));
  auto seed = scalar("Seed", SEED), offset = scalar("Offset", OFFSET);  // p > 0: dropout
  if (!k.backward) {
    auto options = fe::graph::SDPA_attributes()
                       .set_name("causal_attention")
                       .set_generate_stats(true)
                       .set_causal_mask(true)
                       .set_attn_scale(k.scale);
    options.set_dropout(k.p, seed, offset);
    auto [o, stats] = g->sdpa(q, kk, v, options);
    o->set_output(true).set_uid(O).set_dim(dims).set_stride(out_strides(k));
    stats->set_output(true)
        .set_uid(STATS)
        .set_data_type(fe::DataType_t::FLOAT)
        .set_dim(stats_dims)
        .set_stride(stats_strides);
  } else {
    auto o = tensor("O", O, dims, out_strides(k));
    auto d_o = tensor("dO", D_O, dims, out_strides(k));
    auto stats = tensor("Stats", STATS, stats_dims, stats_strides);
    stats->set_data_type(fe::DataType_t::FLOAT);
    auto options = fe::graph::SDPA_backward_attributes()
                       .set_name("causal_attention_backward")
                       .set_causal_mask(true)
                       .set_attn_scale(k.scale);
    options.set_dropout(k.p, seed, offset);
    auto [d_q, d_k, d_v] = g->sdpa_backward(q, kk, v, o, d_o, stats, options);
    d_q->set_output(true).set_uid(D_Q).set_dim(dims).set_stride(in_strides(k));
    d_k->set_output(true).set_uid(D_K).set_dim(dims).set_stride(in_strides(k));
    d_v->set_output(true).set_uid(D_V).set_dim(dims).set_stride(in_strides(k));
  }
  auto h = handle(k.device);
  check(g->validate(), "validate");
  check(g->build_operation_graph(h), "build_operation_graph");
  check(g->create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans");
  check(g->check_support(h), "check_support");
  check(g->build_plans(h), "build_plans");
  Plan plan{g, 0};
  check(g->get_workspace_size(plan.workspace), "get_workspace_size");
  if (std::getenv("SHAKESPEARE_GPT_CUDNN_TRACE")) {
    std::string name;
    (void)g->get_plan_name(name);
    std::fprintf(stderr, "plan %s B=%d T=%d H=%d D=%d: %s, workspace %lld\n",
                 k.backward ? "backward" : "forward", k.B, k.T, k.H, k.D, name.c_str(),
                 (long long)plan.workspace);
  }
  return plan;
}

// The plan for `k`, built once per process (cuDNN picks and builds a kernel: tens of ms).
Plan plan_for(const Key& k) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  static std::map<Key, Plan> plans;
  auto it = plans.find(k);
  if (it == plans.end()) it = plans.emplace(k, build(k)).first;
  return it->second;
}

// A fresh array of `shape` and `dtype` that only its caller reads: element `which` of qkv
// plus the seed, broadcast and copied (a copy of a broadcast always allocates). Gradients
// stop at qkv: without that, each backward pass sent zeros back through the copy, the
// broadcast (a sum) and the slice (a full-size update of qkv's gradient).
mx::array fresh(const mx::array& qkv, const mx::array& seed, int which, const mx::Shape& shape,
                mx::Dtype dtype, mx::Stream s) {
  auto flat = mx::reshape(mx::stop_gradient(qkv, s), {-1}, s);
  auto one = mx::add(mx::astype(mx::slice(flat, {which}, {which + 1}, s), mx::float32, s),
                     mx::astype(mx::slice(mx::stop_gradient(seed, s), {0}, {1}, s),
                                mx::float32, s),
                     s);
  return mx::contiguous(mx::broadcast_to(mx::astype(one, dtype, s), shape, s), false, s);
}

mx::Shape workspace_shape(int64_t bytes) { return {int((bytes + 3) / 4)}; }

// The workspace input's pointer, after checking it holds the plan's bytes.
void* workspace_of(const Plan& plan, const std::vector<mx::array>& in, size_t index) {
  if (plan.workspace <= 0) return nullptr;
  if (in.size() <= index || int64_t(in[index].nbytes()) < plan.workspace) {
    throw std::runtime_error("cuDNN attention: the workspace is smaller than the plan's");
  }
  return const_cast<void*>(mx::gpu_ptr<void>(in[index]));
}

// Takes over `donor`'s buffer as `out`'s (same byte size, row-contiguous).
void adopt(mx::array& out, const mx::array& donor, const mx::array& qkv) {
  if (donor.nbytes() != out.nbytes() || !donor.flags().row_contiguous ||
      donor.data_shared_ptr() == qkv.data_shared_ptr()) {
    throw std::runtime_error("cuDNN attention: an output buffer is not a fresh array");
  }
  mx::Strides strides(out.ndim(), 1);
  for (int i = out.ndim() - 2; i >= 0; --i) strides[i] = strides[i + 1] * out.shape(i + 1);
  mx::array::Flags flags{};
  flags.contiguous = true;
  flags.row_contiguous = true;
  flags.col_contiguous = out.ndim() <= 1;
  out.copy_shared_buffer(donor, strides, flags, out.size(), 0);
}

template <typename T = void>
T* gpu(const mx::array& a) {
  return const_cast<T*>(mx::gpu_ptr<T>(a));
}

Key key_of(const mx::array& qkv, const Params& prm, bool backward, int device) {
  int C = qkv.shape(2) / 3;
  return {device, qkv.shape(0), qkv.shape(1), prm.heads, C / prm.heads,
          qkv.dtype() == mx::bfloat16, backward, prm.scale, prm.p};
}

// SHAKESPEARE_GPT_CUDNN_TRACE=1: each call's buffers (address, bytes) on stderr, to match
// an address that compute-sanitizer reports with the array it falls in
void trace(const char* what, const std::vector<mx::array>& in, const std::vector<mx::array>& out,
           const Plan& plan) {
  static const bool on = std::getenv("SHAKESPEARE_GPT_CUDNN_TRACE") != nullptr;
  if (!on) return;
  std::fprintf(stderr, "%s workspace %lld bytes\n", what, (long long)plan.workspace);
  auto show = [](const char* kind, size_t i, const mx::array& a) {
    std::fprintf(stderr, "  %s %zu: %p + %zu bytes (size %zu, data_size %zu, row_contiguous %d)\n",
                 kind, i, mx::gpu_ptr<void>(a), a.nbytes(), a.size(), a.data_size(),
                 int(a.flags().row_contiguous));
  };
  for (size_t i = 0; i < in.size(); ++i) show("in", i, in[i]);
  for (size_t i = 0; i < out.size(); ++i) show("out", i, out[i]);
}

void run(const Plan& plan, mx::Stream s, std::unordered_map<int64_t, void*>& pack,
         void* workspace) {
  auto& encoder = mx::cu::get_command_encoder(s);
  std::lock_guard<std::recursive_mutex> guard(lock());  // one handle: its stream is set per call
  auto h = handle(encoder.device().cuda_device());
  auto capture = encoder.capture_context();  // a node of MLX's CUDA graph (or direct)
  cudnnSetStream(h, encoder.stream());
  auto err = plan.graph->execute(h, pack, workspace);
  if (!err.is_good()) {
    capture.discard = true;
    check(err, "execute");
  }
}

class GpuPrimitive : public mx::Primitive {
 public:
  GpuPrimitive(mx::Stream stream, Params prm) : mx::Primitive(stream), prm_(prm) {}
  void eval_cpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string(name()) + " runs on an NVIDIA GPU only");
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return prm_ == static_cast<const GpuPrimitive&>(other).prm_;
  }

 protected:
  Params prm_;
};

// inputs: qkv, seed (int64 (4,): seed, seed, offset, offset), o, stats, dO (the output's
// cotangent), the dqkv buffer, [workspace]; output: dqkv (B, T, 3C)
class CausalAttentionGrad : public GpuPrimitive {
 public:
  using GpuPrimitive::GpuPrimitive;

  void eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto &qkv = in[0], &seed = in[1], &o = in[2], &stats = in[3], &d_o = in[4];
    auto& encoder = mx::cu::get_command_encoder(stream());
    auto k = key_of(qkv, prm_, true, encoder.device().cuda_device());
    auto plan = plan_for(k);
    adopt(out[0], in[5], qkv);
    void* workspace = workspace_of(plan, in, 6);
    for (auto& a : in) encoder.set_input_array(a);
    encoder.set_output_array(out[0]);
    int64_t C = int64_t(k.H) * k.D;
    auto* dqkv = gpu<char>(out[0]);
    auto* src = gpu<char>(qkv);
    size_t item = qkv.itemsize();
    std::unordered_map<int64_t, void*> pack{
        {Q, src}, {K, src + C * item}, {V, src + 2 * C * item},
        {O, gpu(o)}, {D_O, gpu(d_o)}, {STATS, gpu(stats)},
        {SEED, gpu<int64_t>(seed)}, {OFFSET, gpu<int64_t>(seed) + 2},
        {D_Q, dqkv}, {D_K, dqkv + C * item}, {D_V, dqkv + 2 * C * item}};
    trace(name(), in, out, plan);
    run(plan, stream(), pack, workspace);
  }

  const char* name() const override { return "CudnnCausalAttentionGrad"; }
};

// inputs: qkv, seed (int64 (4,), as above), the o buffer, the stats buffer, [workspace];
// outputs: o (B, T, C), stats (B, H, T) float32
class CausalAttention : public GpuPrimitive {
 public:
  using GpuPrimitive::GpuPrimitive;

  void eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto &qkv = in[0], &seed = in[1];
    auto& encoder = mx::cu::get_command_encoder(stream());
    auto k = key_of(qkv, prm_, false, encoder.device().cuda_device());
    auto plan = plan_for(k);
    adopt(out[0], in[2], qkv);
    adopt(out[1], in[3], qkv);
    void* workspace = workspace_of(plan, in, 4);
    for (auto& a : in) encoder.set_input_array(a);
    for (auto& a : out) encoder.set_output_array(a);
    int64_t C = int64_t(k.H) * k.D;
    auto* src = gpu<char>(qkv);
    size_t item = qkv.itemsize();
    std::unordered_map<int64_t, void*> pack{
        {Q, src}, {K, src + C * item}, {V, src + 2 * C * item},
        {O, gpu(out[0])}, {STATS, gpu(out[1])},
        {SEED, gpu<int64_t>(seed)}, {OFFSET, gpu<int64_t>(seed) + 2}};
    trace(name(), in, out, plan);
    run(plan, stream(), pack, workspace);
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override {
    // the log-sum-exp is an internal output: its cotangent is ignored
    auto s = stream();
    const auto &qkv = primals[0], &seed = primals[1];
    auto d_o = mx::contiguous(mx::astype(cotangents[0], qkv.dtype(), s), false, s);
    auto device = mx::cu::get_command_encoder(s).device().cuda_device();
    auto plan = plan_for(key_of(qkv, prm_, true, device));
    std::vector<mx::array> inputs{qkv, seed, outputs[0], outputs[1], d_o,
                                  fresh(qkv, seed, 2, qkv.shape(), qkv.dtype(), s)};
    if (plan.workspace > 0) {
      inputs.push_back(fresh(qkv, seed, 4, workspace_shape(plan.workspace), mx::float32, s));
    }
    auto dqkv = mx::array(qkv.shape(), qkv.dtype(),
                          std::make_shared<CausalAttentionGrad>(s, prm_), std::move(inputs));
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      grads.push_back(arg == 0 ? dqkv : mx::zeros_like(primals[arg], s));
    }
    return grads;
  }

  const char* name() const override { return "CudnnCausalAttention"; }
};

mx::array causal_attention(const mx::array& qkv_in, const mx::array& seed_in, int heads,
                           float scale, float p) {
  std::ostringstream bad;
  int C3 = qkv_in.ndim() == 3 ? qkv_in.shape(2) : 0;
  if (heads < 1) {
    bad << "heads must be >= 1, got " << heads;
  } else if (qkv_in.ndim() != 3 || C3 % (3 * heads) != 0) {
    bad << "qkv must be (B, T, 3 * heads * head_dim) with heads=" << heads << ", got shape "
        << qkv_in.shape();
  } else if (qkv_in.dtype() != mx::bfloat16 && qkv_in.dtype() != mx::float16) {
    bad << "qkv must be bfloat16 or float16, got " << qkv_in.dtype();
  } else if (qkv_in.shape(0) < 1) {
    bad << "batch must be >= 1, got " << qkv_in.shape(0);
  } else if (int D = C3 / 3 / heads; D < 8 || D % 8 != 0 || D > 128) {
    bad << "head_dim must be a multiple of 8 up to 128, got " << D;
  } else if ((qkv_in.shape(1) < kSequenceMultiple || qkv_in.shape(1) % kSequenceMultiple != 0) &&
             !std::getenv("SHAKESPEARE_GPT_CUDNN_ANY_T")) {  // bench/cudnn_attention_check.py
    // cuDNN 9.14's backward on an H200 reads out of bounds (an illegal memory access)
    // at T = 64, 192 and 320, with every engine it offers; at T = 128, 256 and 512 its
    // gradients match the forward's mask (docs/runs/cudnn-verify-h200-20261201.log)
    bad << "sequence length must be a multiple of " << kSequenceMultiple << ", got "
        << qkv_in.shape(1);
  } else if (seed_in.size() != 2) {
    bad << "seed must hold two values (seed, offset), got shape " << seed_in.shape();
  } else if (!(p > 0.0f && p < 1.0f)) {
    bad << "dropout p must be in (0, 1) (without dropout, use MLX's fused attention), got "
        << p;
  }
  if (!bad.str().empty()) throw std::invalid_argument(bad.str());
  auto s = mx::default_stream(mx::default_device());
  if (s.device != mx::Device::gpu) {
    throw std::invalid_argument("cuDNN attention runs on the GPU only");
  }
  auto qkv = mx::contiguous(qkv_in, false, s);
  // (seed, offset) as [seed, seed, offset, offset]: each value 16-byte aligned, as cuDNN
  // takes its tensors
  auto seed = mx::contiguous(mx::repeat(mx::astype(seed_in, mx::int64, s), 2, 0, s), false, s);
  int B = qkv.shape(0), T = qkv.shape(1), C = C3 / 3;
  Params prm{heads, scale, p};
  auto device = mx::cu::get_command_encoder(s).device().cuda_device();
  auto plan = plan_for(key_of(qkv, prm, false, device));  // fails here if cuDNN cannot
  plan_for(key_of(qkv, prm, true, device));
  std::vector<mx::array> inputs{qkv, seed, fresh(qkv, seed, 0, {B, T, C}, qkv.dtype(), s),
                                fresh(qkv, seed, 1, {B, heads, T}, mx::float32, s)};
  if (plan.workspace > 0) {
    inputs.push_back(fresh(qkv, seed, 3, workspace_shape(plan.workspace), mx::float32, s));
  }
  auto outs = mx::array::make_arrays({{B, T, C}, {B, heads, T}}, {qkv.dtype(), mx::float32},
                                     std::make_shared<CausalAttention>(s, prm),
                                     std::move(inputs));
  return outs[0];
}

}  // namespace

NB_MODULE(_cuda_attention, m) {
  m.doc() = "cuDNN's fused causal attention with dropout, as MLX primitives";
  m.def("causal_attention", &causal_attention, nb::arg("qkv"), nb::arg("seed"),
        nb::arg("heads"), nb::arg("scale"), nb::arg("p"),
        "Causal attention of the fused projection qkv (B, T, 3C), bfloat16 or float16, with "
        "dropout p on its weights seeded by seed (two int64: seed, offset) -> (B, T, C).");
}

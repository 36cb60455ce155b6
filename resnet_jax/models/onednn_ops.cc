// oneDNN's convolution and batch normalization as XLA FFI handlers for the CPU backend, float32:
// the forward conv, its input gradient and its weight gradient (NHWC activations, HWIO kernels, as
// jax.lax.conv_general_dilated computes them with no input dilation and one group), and the backward
// pass of training-mode BatchNorm over the leading axes of a channels-last array; and, not oneDNN's, SGD's
// guarded momentum update of every parameter in one pass. Built and loaded by resnet_jax/models/onednn.py;
// why it exists is in experiments/perf/CPU_NOTES.md.
//
// Each distinct op (kind and shapes, strides, padding, dilation, epsilon) gets its primitive made once
// and kept. Conv kernels are reordered between HWIO and the layout oneDNN chose on every call (they
// are small); activations stay channels-last, which oneDNN reads and writes directly.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Kind : int64_t { kForward = 0, kInputGrad = 1, kWeightGrad = 2, kNormBackward = 3 };

// One conv's geometry: x is (n, h, w, c), the kernel (kh, kw, c, o), y (n, ho, wo, o).
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, ho, wo;
  memory::dims strides, dilates, pad_lo, pad_hi;

  memory::desc x(tag t = tag::nhwc) const { return {{n, c, h, w}, memory::data_type::f32, t}; }
  memory::desc y(tag t = tag::nhwc) const { return {{n, o, ho, wo}, memory::data_type::f32, t}; }
  memory::desc k(tag t) const { return {{o, c, kh, kw}, memory::data_type::f32, t}; }
  std::vector<int64_t> key(Kind kind) const {
    std::vector<int64_t> key{kind, n, h, w, c, kh, kw, o, ho, wo};
    for (const auto* v : {&strides, &dilates, &pad_lo, &pad_hi}) key.insert(key.end(), v->begin(), v->end());
    return key;
  }
};

dnnl::engine& cpu() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc forward_pd(const Geometry& g) {
  const auto alg = dnnl::algorithm::convolution_direct;
  const auto prop = dnnl::prop_kind::forward_training;
#if DNNL_VERSION_MAJOR >= 3
  return {cpu(), prop, alg, g.x(), g.k(tag::any), g.y(), g.strides, g.dilates, g.pad_lo, g.pad_hi,
          user_scratchpad()};
#else
  return {{prop, alg, g.x(), g.k(tag::any), g.y(), g.strides, g.dilates, g.pad_lo, g.pad_hi},
          user_scratchpad(), cpu()};
#endif
}

// A primitive ready to run: for a conv, the kernel's layout inside oneDNN; its scratchpad size.
struct Prepared {
  dnnl::primitive primitive;
  memory::desc kernel, scratchpad;
};

// The primitive made for `key` by `make`, made on the first call with that key.
template <typename Make>
const Prepared& cached(const std::vector<int64_t>& key, Make make) {
  static std::mutex mutex;
  static std::map<std::vector<int64_t>, std::unique_ptr<Prepared>> made;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = made[key];
  if (!slot) slot = std::make_unique<Prepared>(make());
  return *slot;
}

Prepared prepare(const Geometry& g, Kind kind) {
  const auto alg = dnnl::algorithm::convolution_direct;
  auto hint = forward_pd(g);
  if (kind == kForward) return {dnnl::convolution_forward(hint), hint.weights_desc(), hint.scratchpad_desc()};
  if (kind == kInputGrad) {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_data::primitive_desc pd(cpu(), alg, g.x(), g.k(tag::any), g.y(), g.strides,
                                                       g.dilates, g.pad_lo, g.pad_hi, hint, user_scratchpad());
#else
    dnnl::convolution_backward_data::primitive_desc pd(
        {alg, g.x(), g.k(tag::any), g.y(), g.strides, g.dilates, g.pad_lo, g.pad_hi}, user_scratchpad(), cpu(),
        hint);
#endif
    return {dnnl::convolution_backward_data(pd), pd.weights_desc(), pd.scratchpad_desc()};
  }
#if DNNL_VERSION_MAJOR >= 3
  dnnl::convolution_backward_weights::primitive_desc pd(cpu(), alg, g.x(), g.k(tag::any), g.y(), g.strides,
                                                        g.dilates, g.pad_lo, g.pad_hi, hint, user_scratchpad());
#else
  dnnl::convolution_backward_weights::primitive_desc pd(
      {alg, g.x(), g.k(tag::any), g.y(), g.strides, g.dilates, g.pad_lo, g.pad_hi}, user_scratchpad(), cpu(), hint);
#endif
  return {dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(), pd.scratchpad_desc()};
}


// Per-thread scratch space that only grows, so that steady-state calls allocate nothing.
void* grown(std::vector<uint8_t>& buffer, size_t bytes) {
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

ffi::Error run(Kind kind, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> y,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
               ffi::Span<const int64_t> dilation) {
  const auto xd = x.dimensions(), kd = kernel.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || strides.size() != 2 || padding.size() != 4 ||
      dilation.size() != 2)
    return ffi::Error::InvalidArgument("onednn conv: expects NHWC x, HWIO kernel, 2 strides, 4 pads, 2 dilations");
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], yd[1], yd[2],
             {strides[0], strides[1]}, {dilation[0] - 1, dilation[1] - 1},
             {padding[0], padding[2]}, {padding[1], padding[3]}};
  try {
    const Prepared& p = cached(g.key(kind), [&] { return prepare(g, kind); });
    dnnl::stream stream(cpu());
    thread_local std::vector<uint8_t> kernel_space, scratch_space;
    memory user_kernel(g.k(tag::hwio), cpu(), kernel.typed_data());
    memory inner_kernel = p.kernel == user_kernel.get_desc()
                              ? user_kernel
                              : memory(p.kernel, cpu(), grown(kernel_space, p.kernel.get_size()));
    memory scratch(p.scratchpad, cpu(), grown(scratch_space, p.scratchpad.get_size()));
    memory xm(g.x(), cpu(), x.typed_data()), ym(g.y(), cpu(), y.typed_data());
    if (kind == kWeightGrad) {
      p.primitive.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, ym}, {DNNL_ARG_DIFF_WEIGHTS, inner_kernel},
                              {DNNL_ARG_SCRATCHPAD, scratch}});
      if (inner_kernel != user_kernel) dnnl::reorder(inner_kernel, user_kernel).execute(stream, inner_kernel, user_kernel);
    } else {
      if (inner_kernel != user_kernel) dnnl::reorder(user_kernel, inner_kernel).execute(stream, user_kernel, inner_kernel);
      if (kind == kForward)
        p.primitive.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, inner_kernel}, {DNNL_ARG_DST, ym},
                                {DNNL_ARG_SCRATCHPAD, scratch}});
      else
        p.primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, xm}, {DNNL_ARG_WEIGHTS, inner_kernel}, {DNNL_ARG_DIFF_DST, ym},
                                {DNNL_ARG_SCRATCHPAD, scratch}});
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

// BatchNorm over all but the last axis of x (m values per channel, c channels).
const auto kNormFlags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;

dnnl::batch_normalization_forward::primitive_desc norm_forward_pd(const memory::desc& x, float epsilon) {
  const auto prop = dnnl::prop_kind::forward_training;
#if DNNL_VERSION_MAJOR >= 3
  return {cpu(), prop, x, x, epsilon, kNormFlags, user_scratchpad()};
#else
  return {{prop, x, epsilon, kNormFlags}, user_scratchpad(), cpu()};
#endif
}

Prepared prepare_norm_backward(const memory::desc& x, float epsilon) {
  auto forward = norm_forward_pd(x, epsilon);  // the hint oneDNN asks for
  const auto prop = dnnl::prop_kind::backward;
#if DNNL_VERSION_MAJOR >= 3
  dnnl::batch_normalization_backward::primitive_desc pd(cpu(), prop, x, x, x, epsilon, kNormFlags, forward,
                                                        user_scratchpad());
#else
  dnnl::batch_normalization_backward::primitive_desc pd({prop, x, x, epsilon, kNormFlags}, user_scratchpad(), cpu(),
                                                        forward);
#endif
  return {dnnl::batch_normalization_backward(pd), {}, pd.scratchpad_desc()};
}

// Runs BatchNorm's backward primitive on buffers given by argument id; x is the normalised array.
ffi::Error run_norm_backward(ffi::Buffer<ffi::F32> x, float epsilon, const std::map<int, void*>& buffers) {
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("onednn batch norm: expects (..., channels)");
  int64_t m = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) m *= dims[i];
  const int64_t c = dims[dims.size() - 1];
  // (m, c, 1, 1) in NHWC is x's memory, and takes oneDNN's channels-last (jit) BatchNorm.
  const memory::desc xd({m, c, 1, 1}, memory::data_type::f32, tag::nhwc);
  const memory::desc vd({c}, memory::data_type::f32, tag::a);
  int32_t bits;
  std::memcpy(&bits, &epsilon, sizeof bits);
  try {
    const Prepared& p = cached({kNormBackward, m, c, bits}, [&] { return prepare_norm_backward(xd, epsilon); });
    dnnl::stream stream(cpu());
    thread_local std::vector<uint8_t> scratch_space;
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SCRATCHPAD, memory(p.scratchpad, cpu(), grown(scratch_space, p.scratchpad.get_size()))}};
    for (const auto& [arg, data] : buffers) {
      const bool per_channel = arg != DNNL_ARG_SRC && arg != DNNL_ARG_DST && arg != DNNL_ARG_DIFF_SRC &&
                               arg != DNNL_ARG_DIFF_DST;
      args.emplace(arg, memory(per_channel ? vd : xd, cpu(), data));
    }
    p.primitive.execute(stream, args);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn batch norm: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error NormBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var, ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dshift, float epsilon) {
  return run_norm_backward(x, epsilon,
                  {{DNNL_ARG_SRC, x.typed_data()}, {DNNL_ARG_DIFF_DST, dy.typed_data()},
                   {DNNL_ARG_SCALE, scale.typed_data()},
#if DNNL_VERSION_MAJOR < 3  // 2.x also asks for the shift, which the gradient does not depend on
                   {DNNL_ARG_SHIFT, scale.typed_data()},
#endif
                   {DNNL_ARG_MEAN, mean.typed_data()},
                   {DNNL_ARG_VARIANCE, var.typed_data()}, {DNNL_ARG_DIFF_SRC, dx->typed_data()},
                   {DNNL_ARG_DIFF_SCALE, dscale->typed_data()}, {DNNL_ARG_DIFF_SHIFT, dshift->typed_data()}});
}

using Attrs = ffi::Span<const int64_t>;

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                   Attrs strides, Attrs padding, Attrs dilation) {
  return run(kForward, x, kernel, *y, strides, padding, dilation);
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> dx,
                     Attrs strides, Attrs padding, Attrs dilation) {
  return run(kInputGrad, *dx, kernel, dy, strides, padding, dilation);
}

ffi::Error WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dkernel,
                      Attrs strides, Attrs padding, Attrs dilation) {
  return run(kWeightGrad, x, *dkernel, dy, strides, padding, dilation);
}

// SGD with momentum (optax's add_decayed_weights, trace and scale_by_learning_rate, then apply_updates),
// in place on every parameter p and momentum m at once: d = g + decay * p, m' = d + momentum * m,
// p' = p + step * m' (nesterov: p + step * (d + momentum * m')). XLA:CPU contracts these multiply-adds to
// fused ones where the machine has them, so the same does this, and the results are XLA's to the bit. One
// pass reading p, m, g and writing p', m', spread over OpenMP's threads, against XLA's two loops per
// parameter (each recomputing m') plus copies: CPU_NOTES.md, entry 28.
struct Sgd {
  std::vector<const float*> p, m, g;
  std::vector<float*> p_out, m_out;
  std::vector<int64_t> size;
  ffi::Span<const float> decay;
  float momentum, step;
  bool nesterov;
};

template <bool kDecay, bool kNesterov, typename Mad>
[[gnu::always_inline]] inline void sgd_leaf(const float* p, const float* m, const float* g, float* p_out, float* m_out,
                                            int64_t lo, int64_t hi, float decay, float momentum, float step, Mad mad) {
#pragma omp simd  // p_out and m_out are p and m or apart from them: each element is read before it is written
  for (int64_t i = lo; i < hi; ++i) {
    const float d = kDecay ? mad(decay, p[i], g[i]) : g[i];
    const float t = mad(momentum, m[i], d);
    m_out[i] = t;
    p_out[i] = mad(step, kNesterov ? mad(momentum, t, d) : t, p[i]);
  }
}

template <typename Mad>
[[gnu::always_inline]] inline void sgd_range(const Sgd& s, int64_t begin, int64_t end, Mad mad) {
  int64_t offset = 0;
  for (size_t k = 0; k < s.size.size(); offset += s.size[k++]) {
    const int64_t lo = std::max(begin, offset) - offset, hi = std::min(end, offset + s.size[k]) - offset;
    if (lo >= hi) continue;
    const float *p = s.p[k], *m = s.m[k], *g = s.g[k];
    float *p_out = s.p_out[k], *m_out = s.m_out[k];
    const float decay = s.decay[k], momentum = s.momentum, step = s.step;
    if (decay != 0.0f && s.nesterov) sgd_leaf<true, true>(p, m, g, p_out, m_out, lo, hi, decay, momentum, step, mad);
    else if (decay != 0.0f) sgd_leaf<true, false>(p, m, g, p_out, m_out, lo, hi, decay, momentum, step, mad);
    else if (s.nesterov) sgd_leaf<false, true>(p, m, g, p_out, m_out, lo, hi, decay, momentum, step, mad);
    else sgd_leaf<false, false>(p, m, g, p_out, m_out, lo, hi, decay, momentum, step, mad);
  }
}

#if defined(__x86_64__)
__attribute__((target("fma"))) void sgd_range_fma(const Sgd& s, int64_t begin, int64_t end) {
  sgd_range(s, begin, end, [](float a, float b, float c) [[gnu::always_inline]] { return __builtin_fmaf(a, b, c); });
}
bool has_fma() { return __builtin_cpu_supports("fma"); }
#else
void sgd_range_fma(const Sgd& s, int64_t begin, int64_t end) {
  sgd_range(s, begin, end, [](float a, float b, float c) { return std::fma(a, b, c); });
}
bool has_fma() { return true; }
#endif

void sgd_range_plain(const Sgd& s, int64_t begin, int64_t end) {
  sgd_range(s, begin, end, [](float a, float b, float c) { return a * b + c; });  // built with -ffp-contract=off
}

// Arguments: step (the signed learning rate), finite, then the k parameters, k momenta, k gradients;
// results: the k new parameters and k new momenta, aliased to the parameters' and momenta's buffers. Not
// finite: the state stays as it is.
ffi::Error SgdUpdate(ffi::Buffer<ffi::F32> step, ffi::Buffer<ffi::PRED> finite, ffi::RemainingArgs args,
                     ffi::RemainingRets rets, float momentum, bool nesterov, ffi::Span<const float> decay) {
  const size_t k = decay.size();
  if (args.size() != 3 * k || rets.size() != 2 * k)
    return ffi::Error::InvalidArgument("sgd_update: expected 3 arguments and 2 results per decay value");
  Sgd s{{}, {}, {}, {}, {}, {}, decay, momentum, step.typed_data()[0], nesterov};
  int64_t total = 0;
  for (size_t i = 0; i < k; ++i) {
    auto p = args.get<ffi::Buffer<ffi::F32>>(i), m = args.get<ffi::Buffer<ffi::F32>>(k + i),
         g = args.get<ffi::Buffer<ffi::F32>>(2 * k + i);
    auto p_out = rets.get<ffi::Buffer<ffi::F32>>(i), m_out = rets.get<ffi::Buffer<ffi::F32>>(k + i);
    if (!p.has_value() || !m.has_value() || !g.has_value() || !p_out.has_value() || !m_out.has_value())
      return ffi::Error::InvalidArgument("sgd_update: every operand must be float32");
    s.p.push_back(p->typed_data());
    s.m.push_back(m->typed_data());
    s.g.push_back(g->typed_data());
    s.p_out.push_back((*p_out)->typed_data());
    s.m_out.push_back((*m_out)->typed_data());
    s.size.push_back(p->element_count());
    total += p->element_count();
  }
  if (!finite.typed_data()[0]) {  // the results alias the inputs; copy only if XLA gave them other buffers
    for (size_t i = 0; i < k; ++i) {
      if (s.p_out[i] != s.p[i]) std::memcpy(s.p_out[i], s.p[i], s.size[i] * sizeof(float));
      if (s.m_out[i] != s.m[i]) std::memcpy(s.m_out[i], s.m[i], s.size[i] * sizeof(float));
    }
    return ffi::Error::Success();
  }
  const bool fma = has_fma();
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t begin = total * t / threads, end = total * (t + 1) / threads;
    fma ? sgd_range_fma(s, begin, end) : sgd_range_plain(s, begin, end);
  }
  return ffi::Error::Success();
}

}  // namespace

#define CONV_HANDLER(symbol, impl)                                                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                                       \
                                ffi::Ffi::Bind()                                                    \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                   \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                   \
                                    .Ret<ffi::Buffer<ffi::F32>>()                                   \
                                    .Attr<Attrs>("strides")                                         \
                                    .Attr<Attrs>("padding")                                         \
                                    .Attr<Attrs>("dilation"));

CONV_HANDLER(ResnetJaxOnednnConvForward, Forward)
CONV_HANDLER(ResnetJaxOnednnConvInputGrad, InputGrad)
CONV_HANDLER(ResnetJaxOnednnConvWeightGrad, WeightGrad)

using F32 = ffi::Buffer<ffi::F32>;
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxOnednnNormBackward, NormBackward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Ret<F32>().Ret<F32>().Ret<F32>().Attr<float>("epsilon"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxSgdUpdate, SgdUpdate,
                              ffi::Ffi::Bind().Arg<F32>().Arg<ffi::Buffer<ffi::PRED>>().RemainingArgs().RemainingRets()
                                  .Attr<float>("momentum").Attr<bool>("nesterov")
                                  .Attr<ffi::Span<const float>>("decay"));

// oneDNN's convolution and batch normalization as XLA FFI handlers for the CPU backend, float32:
// the forward conv, its input gradient and its weight gradient (NHWC activations, HWIO kernels, as
// jax.lax.conv_general_dilated computes them with no input dilation and one group), and the backward
// pass of training-mode BatchNorm over the leading axes of a channels-last array. Built and loaded by
// resnet_jax/models/onednn.py; why it exists is in experiments/perf/CPU_NOTES.md.
//
// Each distinct op (kind and shapes, strides, padding, dilation, epsilon) gets its primitive made once
// and kept. Conv kernels are reordered between HWIO and the layout oneDNN chose on every call (they
// are small); activations stay channels-last, which oneDNN reads and writes directly.

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

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

// Argument checks shared by every backend of every op: one message format, one place.
#pragma once
#include <cstdio>
#include <string>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

// Value and type errors surface in Python as ValueError / TypeError (TORCH_CHECK_VALUE / _TYPE), so
// the wrappers' reference fallback can raise the same class with the same text. `op` is a string
// literal naming the op; every message starts with it.
#define OV_CHECK_ARG(cond, op, ...) TORCH_CHECK_VALUE(cond, op ": ", __VA_ARGS__)
#define OV_CHECK_ARG_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, op ": ", __VA_ARGS__)

namespace otherview {

// Integers and shapes are formatted with std::to_string, never streamed: on the GPU machine's
// toolchain (/opt/gcc, whose libstdc++ pieces are linked into the extension) streaming an integer
// into the std::ostringstream behind TORCH_CHECK segfaults, while strings stream fine.
inline std::string int_str(int64_t v) { return std::to_string(v); }

inline std::string num_str(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

inline std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Python's spelling of a dtype ("torch.bfloat16"), so C++ and Python messages read the same.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// unit_sumsq_(x, unit_width, segments, out): every backend runs these checks first. The Python
// fake kernel and the reference fallback (otherview/ops/rms.py) repeat them word for word.
inline void check_unit_sumsq_args(const at::Tensor& x, int64_t unit_width,
                                  at::IntArrayRef segments, const at::Tensor& out) {
  OV_CHECK_ARG(x.dim() == 3, "unit_sumsq_", "x must be 3-d [B, T, C], got shape ",
               shape_str(x.sizes()));
  const auto xt = x.scalar_type();
  OV_CHECK_ARG_TYPE(xt == at::kBFloat16 || xt == at::kHalf || xt == at::kFloat, "unit_sumsq_",
                    "x must be torch.bfloat16, torch.float16 or torch.float32, got ",
                    dtype_name(xt));
  OV_CHECK_ARG(unit_width > 0, "unit_sumsq_", "unit_width must be positive, got ",
               int_str(unit_width));
  const int64_t T = x.size(1), C = x.size(2);
  OV_CHECK_ARG(C % unit_width == 0, "unit_sumsq_", "x.shape[2] = ", int_str(C),
               " channels is not a multiple of unit_width = ", int_str(unit_width));
  OV_CHECK_ARG(segments.size() % 2 == 0, "unit_sumsq_",
               "segments must be flat [start0, end0, start1, end1, ...] pairs, got ",
               int_str(static_cast<int64_t>(segments.size())), " values");
  for (size_t i = 0; i < segments.size(); i += 2) {
    const int64_t start = segments[i], end = segments[i + 1];
    OV_CHECK_ARG(0 <= start && start <= end && end <= T, "unit_sumsq_", "segment ",
                 int_str(static_cast<int64_t>(i / 2)), " = [", int_str(start), ", ", int_str(end),
                 ") must satisfy 0 <= start <= end <= T = ", int_str(T));
  }
  OV_CHECK_ARG_TYPE(out.scalar_type() == at::kFloat, "unit_sumsq_",
                    "out must be torch.float32, got ", dtype_name(out.scalar_type()));
  const std::vector<int64_t> want = {x.size(0), static_cast<int64_t>(segments.size() / 2),
                                     C / unit_width};
  OV_CHECK_ARG(out.sizes() == at::IntArrayRef(want), "unit_sumsq_",
               "out must have shape [B, S, C / unit_width] = ", shape_str(want), ", got ",
               shape_str(out.sizes()));
  OV_CHECK_ARG(x.device() == out.device(), "unit_sumsq_",
               "x and out must be on one device, got ", x.device().str(), " and ",
               out.device().str());
  OV_CHECK_ARG(at::has_internal_overlap(out) != at::MemOverlap::Yes, "unit_sumsq_",
               "out must not have overlapping memory (an expanded view, say): it is accumulated "
               "in place");
}

}  // namespace otherview

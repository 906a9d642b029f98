// unit_sumsq_ on the CPU: out[b, s, u] += sum over tokens of segment s and channels of unit u of
// x[b, t, c]^2, accumulated in fp32.
//
// Each (batch row, block of units) is one task of at::parallel_for and owns its outputs, so every
// sum is formed by one thread in a fixed order and the result does not depend on the thread count.
// Segments are handled one after another (overlapping ones re-read their shared tokens): on the
// CPU the pass is bandwidth-cheap next to everything else, and the simple loop is the clearest
// statement of the arithmetic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace otherview {
namespace {

// Units per task: enough channels per row that the inner loop streams a few KB contiguously.
constexpr int64_t kUnitsPerTask = 64;

template <typename scalar_t>
void sumsq_rows(const scalar_t* xb, int64_t st, int64_t sc, int64_t t0, int64_t t1, int64_t c0,
                int64_t unit_width, int64_t n_units, float* acc) {
  std::fill(acc, acc + n_units, 0.f);
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* row = xb + t * st + c0 * sc;
    for (int64_t u = 0; u < n_units; ++u) {
      float s = 0.f;
      const scalar_t* p = row + u * unit_width * sc;
      for (int64_t k = 0; k < unit_width; ++k) {
        const float v = static_cast<float>(p[k * sc]);
        s += v * v;
      }
      acc[u] += s;
    }
  }
}

void unit_sumsq_cpu(const at::Tensor& x, int64_t unit_width, at::IntArrayRef segments,
                    const at::Tensor& out) {
  check_unit_sumsq_args(x, unit_width, segments, out);
  const int64_t B = x.size(0), C = x.size(2);
  const int64_t S = static_cast<int64_t>(segments.size() / 2), U = C / unit_width;
  if (B == 0 || S == 0 || U == 0) return;
  const int64_t n_blocks = (U + kUnitsPerTask - 1) / kUnitsPerTask;
  const std::vector<int64_t> seg(segments.begin(), segments.end());  // outlives the tasks' views
  float* const o = out.data_ptr<float>();
  const int64_t ob = out.stride(0), os = out.stride(1), ou = out.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "unit_sumsq_cpu", [&] {
    const scalar_t* const xp = x.const_data_ptr<scalar_t>();
    const int64_t sb = x.stride(0), st = x.stride(1), sc = x.stride(2);
    at::parallel_for(0, B * n_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(kUnitsPerTask);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / n_blocks, u0 = (task % n_blocks) * kUnitsPerTask;
        const int64_t nu = std::min(kUnitsPerTask, U - u0);
        for (int64_t s = 0; s < S; ++s) {
          sumsq_rows(xp + b * sb, st, sc, seg[2 * s], seg[2 * s + 1], u0 * unit_width, unit_width,
                     nu, acc.data());
          float* dst = o + b * ob + s * os + u0 * ou;
          for (int64_t u = 0; u < nu; ++u) dst[u * ou] += acc[u];
        }
      }
    });
  });
}

}  // namespace
}  // namespace otherview

TORCH_LIBRARY_IMPL(otherview, CPU, m) { m.impl("unit_sumsq_", &otherview::unit_sumsq_cpu); }

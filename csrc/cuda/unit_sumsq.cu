// unit_sumsq_ on CUDA: out[b, s, u] += sum over tokens of segment s and channels of unit u of
// x[b, t, c]^2, accumulated in fp32, in one pass over x.
//
// Layout. A block of 256 threads owns a tile of kCols 16-byte column vectors (128 bf16 channels, 256
// contiguous bytes of a row) and walks rows with kRows row lanes, kUnroll loads in flight per
// thread. Rows of one job (a token range of one batch row) are split among the kCluster blocks of a
// thread-block cluster; each block reduces its tile in a fixed order (registers, then warp
// shuffles, then shared memory), and block rank 0 of the cluster sums the blocks' partials through
// distributed shared memory in rank order and writes the result. There are no float atomics and the
// launch shape depends only on the shapes and the device, so the result is bitwise the same run to
// run, and one kernel does the whole op (no workspace, no second launch) in the common case.
//
// Jobs. When the non-empty segments are pairwise disjoint, each one is a job that adds straight
// into out. Otherwise the token axis is cut at every segment boundary into elementary intervals,
// each read once into a workspace, and a small second kernel adds, for each segment, the intervals
// it covers in increasing order. The same route is taken when a unit is wider than one tile (its
// tile-sized pieces are summed by the second kernel).
// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in the cuBLAS/cuSPARSE headers): the
// file then compiles against the headers of a CPU torch wheel plus the CUDA toolkit alone.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace otherview {
namespace {

namespace cg = cooperative_groups;

constexpr int kCols = 16;                  // column vectors per tile (lanes of one row)
constexpr int kThreads = 256;              // threads per block
constexpr int kRows = kThreads / kCols;    // row lanes per block
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 8;                 // independent 16-byte loads in flight per thread
constexpr int kMaxCluster = 8;             // portable cluster size
constexpr int kMaxJobs = 64;               // jobs per launch (kernel parameters stay under 4 KB)
constexpr int kMaxSegments = kMaxJobs / 2; // segments per launch: 2S - 1 intervals fit kMaxJobs

struct Job {
  int64_t t0, t1;  // token range [t0, t1)
  int64_t row;     // row of the destination (a segment of out, or an interval of the workspace)
};

struct SumsqParams {
  const void* x;
  int64_t sb, st, sc;     // x's strides in elements
  int64_t n_cols;         // column vectors per row: C / VEC
  float* dst;             // out (accumulated) or the workspace (overwritten)
  int64_t db, dr, du;     // dst strides in elements: batch, row, kernel unit
  int64_t n_kunits;       // kernel units per row
  int lanes_per_kunit;    // column vectors per kernel unit: a power of two <= kCols
  int accumulate;         // add into dst (1) or store (0)
  int n_jobs;
  int cluster;            // blocks splitting one job's rows (= the launch's cluster size)
  Job jobs[kMaxJobs];
};

struct CombineParams {
  const float* ws;         // [B, n_intervals, n_kunits], contiguous
  int64_t n_intervals, n_kunits;
  float* out;
  int64_t ob, os, ou;      // out strides
  int64_t B, U;
  int kunits_per_unit;
  int n_segments;
  int seg_row[kMaxSegments];   // row of out
  int seg_lo[kMaxSegments];    // first covered interval
  int seg_hi[kMaxSegments];    // one past the last covered interval
};

// Streaming 16-byte load: x is read once, so skip L1 allocation.
__device__ __forceinline__ uint4 load16(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

template <typename T>
struct Vec;  // VEC elements of T in 16 bytes; acc[i] += element i squared

template <>
struct Vec<__nv_bfloat16> {
  static constexpr int kN = 8;
  __device__ __forceinline__ static void sumsq(const uint4& v, float (&acc)[kN]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
      acc[2 * i] = fmaf(f.x, f.x, acc[2 * i]);
      acc[2 * i + 1] = fmaf(f.y, f.y, acc[2 * i + 1]);
    }
  }
};

template <>
struct Vec<__half> {
  static constexpr int kN = 8;
  __device__ __forceinline__ static void sumsq(const uint4& v, float (&acc)[kN]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      acc[2 * i] = fmaf(f.x, f.x, acc[2 * i]);
      acc[2 * i + 1] = fmaf(f.y, f.y, acc[2 * i + 1]);
    }
  }
};

template <>
struct Vec<float> {
  static constexpr int kN = 4;
  __device__ __forceinline__ static void sumsq(const uint4& v, float (&acc)[kN]) {
    const float f[4] = {__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z),
                        __uint_as_float(v.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = fmaf(f[i], f[i], acc[i]);
  }
};

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// Sum of squares of this thread's column over rows [r0, r1) stepping by kRows. kVector: the column
// is one aligned 16-byte vector of contiguous channels; otherwise one element at any stride.
template <typename T, bool kVector>
__device__ __forceinline__ float column_sumsq(const char* col_ptr, int64_t row_bytes, int64_t r0,
                                              int64_t r1) {
  if constexpr (kVector) {
    constexpr int N = Vec<T>::kN;
    float acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = 0.f;
    const char* p = col_ptr + r0 * row_bytes;
    const int64_t step = kRows * row_bytes;
    int64_t r = r0;
    for (; r + (kUnroll - 1) * kRows < r1; r += kUnroll * kRows, p += kUnroll * step) {
      uint4 v[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) v[k] = load16(p + k * step);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) Vec<T>::sumsq(v[k], acc);
    }
    for (; r < r1; r += kRows, p += step) Vec<T>::sumsq(load16(p), acc);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) s += acc[i];
    return s;
  } else {
    float acc[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) acc[k] = 0.f;
    int64_t r = r0;
    for (; r + (kUnroll - 1) * kRows < r1; r += kUnroll * kRows) {
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const float v = to_float(*reinterpret_cast<const T*>(col_ptr + (r + k * kRows) * row_bytes));
        acc[k] = fmaf(v, v, acc[k]);
      }
    }
    for (; r < r1; r += kRows) {
      const float v = to_float(*reinterpret_cast<const T*>(col_ptr + r * row_bytes));
      acc[0] = fmaf(v, v, acc[0]);
    }
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) s += acc[k];
    return s;
  }
}

// grid.x = cluster * B * n_jobs (clusters along x), grid.y = column tiles.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    unit_sumsq_kernel(const __grid_constant__ SumsqParams p) {
  constexpr int VEC = kVector ? Vec<T>::kN : 1;
  __shared__ float warp_part[kWarps][kCols];
  __shared__ float block_part[kCols];

  const int rank = static_cast<int>(blockIdx.x) % p.cluster;
  const int64_t bj = blockIdx.x / p.cluster;
  const Job& job = p.jobs[bj % p.n_jobs];
  const int64_t b = bj / p.n_jobs;
  const int lane_col = threadIdx.x % kCols, lane_row = threadIdx.x / kCols;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kCols + lane_col;

  // This block's share of the job's rows: contiguous, in rank order.
  const int64_t n = job.t1 - job.t0;
  const int64_t r0 = job.t0 + n * rank / p.cluster, r1 = job.t0 + n * (rank + 1) / p.cluster;
  float s = 0.f;
  if (col < p.n_cols) {
    const char* col_ptr = static_cast<const char*>(p.x) +
                          (b * p.sb + col * VEC * p.sc) * static_cast<int64_t>(sizeof(T));
    s = column_sumsq<T, kVector>(col_ptr, p.st * static_cast<int64_t>(sizeof(T)), r0 + lane_row, r1);
  }

  // Fixed-order reduction. xor-shuffles pair the same lanes in every run, and a + b == b + a, so
  // every lane of a group ends with the same bits.
  for (int m = 1; m < p.lanes_per_kunit; m <<= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
  static_assert(kCols == 16, "a warp holds two row lanes");
  s += __shfl_xor_sync(0xffffffffu, s, 16);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane < kCols) warp_part[warp][lane] = s;
  __syncthreads();
  const int kunits_per_tile = kCols / p.lanes_per_kunit;
  if (threadIdx.x < kunits_per_tile) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += warp_part[w][threadIdx.x * p.lanes_per_kunit];
    block_part[threadIdx.x] = t;
  }

  // Sum the cluster's blocks in rank order in rank 0, through distributed shared memory. Every
  // block waits at the second barrier so its shared memory outlives rank 0's reads.
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int64_t kunit = static_cast<int64_t>(blockIdx.y) * kunits_per_tile + threadIdx.x;
  if (rank == 0 && threadIdx.x < kunits_per_tile && kunit < p.n_kunits) {
    float t = 0.f;
    for (int r = 0; r < p.cluster; ++r) t += cluster.map_shared_rank(block_part, r)[threadIdx.x];
    float* d = p.dst + b * p.db + job.row * p.dr + kunit * p.du;
    *d = p.accumulate ? *d + t : t;
  }
  cluster.sync();
}

// out[b, row(s), u] += sum over the intervals e of segment s (in order) and the kernel units k of
// unit u (in order) of ws[b, e, k]. One thread per output; the work is a few adds each.
__global__ void combine_kernel(const __grid_constant__ CombineParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B * p.n_segments * p.U) return;
  const int64_t u = i % p.U, s = (i / p.U) % p.n_segments, b = i / (p.U * p.n_segments);
  float t = 0.f;
  for (int e = p.seg_lo[s]; e < p.seg_hi[s]; ++e) {
    const float* w = p.ws + (b * p.n_intervals + e) * p.n_kunits + u * p.kunits_per_unit;
    for (int k = 0; k < p.kunits_per_unit; ++k) t += w[k];
  }
  float* d = p.out + b * p.ob + p.seg_row[s] * p.os + u * p.ou;
  *d += t;
}

// How the kernel covers x: 16-byte vectors where layout and alignment allow, else scalars.
struct Plan {
  bool vector;
  int vec;              // channels per column
  int lanes_per_kunit;  // columns per kernel unit
  int64_t kunit_width;  // channels per kernel unit (divides unit_width)
};

Plan make_plan(const at::Tensor& x, int64_t unit_width) {
  const int64_t es = x.element_size();
  const int vec16 = static_cast<int>(16 / es);
  const auto aligned = [&](int64_t dim) { return x.size(dim) <= 1 || (x.stride(dim) * es) % 16 == 0; };
  const bool vector = x.stride(2) == 1 && unit_width % vec16 == 0 &&
                      reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 && aligned(0) &&
                      aligned(1);
  Plan plan{vector, vector ? vec16 : 1, 1, 0};
  const int64_t lanes = unit_width / plan.vec;
  // The largest power of two dividing a unit's columns, at most a tile: units of that many
  // columns never straddle a tile (C is a multiple of the unit width).
  while (plan.lanes_per_kunit < kCols && lanes % (2 * plan.lanes_per_kunit) == 0) plan.lanes_per_kunit *= 2;
  plan.kunit_width = static_cast<int64_t>(plan.lanes_per_kunit) * plan.vec;
  return plan;
}

template <typename T, bool kVector>
int cluster_size(int64_t base_blocks, int64_t max_rows) {
  // Split rows across a cluster only while the whole grid stays resident in one wave: a second
  // partial wave would cost more than the extra parallelism gains.
  static thread_local int cached_device = -1;
  static thread_local int capacity = 0;
  const int device = c10::cuda::current_device();
  if (device != cached_device) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, unit_sumsq_kernel<T, kVector>, kThreads, 0));
    int n_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device));
    capacity = per_sm * n_sm;
    cached_device = device;
  }
  int cl = 1;
  while (cl < kMaxCluster && base_blocks * cl * 2 <= capacity && max_rows >= 2 * cl * kRows) cl *= 2;
  return cl;
}

template <typename T, bool kVector>
void launch_sumsq(SumsqParams& p, int64_t B, int64_t n_tiles, int64_t max_rows, cudaStream_t stream) {
  p.cluster = cluster_size<T, kVector>(B * p.n_jobs * n_tiles, max_rows);
  TORCH_CHECK(n_tiles <= 65535, "unit_sumsq_: x.shape[2] is too wide for one launch");
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(p.cluster * B * p.n_jobs), static_cast<unsigned>(n_tiles), 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = p.cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, unit_sumsq_kernel<T, kVector>, p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One launch group: at most kMaxSegments segments (their indices in out are seg_idx).
template <typename T, bool kVector>
void run_group(const at::Tensor& x, const Plan& plan, int64_t unit_width,
               const std::vector<int64_t>& seg, const std::vector<int64_t>& seg_idx,
               const at::Tensor& out, cudaStream_t stream) {
  const int64_t B = x.size(0), C = x.size(2);
  SumsqParams p{};
  p.x = x.const_data_ptr();
  p.sb = x.stride(0);
  p.st = x.stride(1);
  p.sc = x.stride(2);
  p.n_cols = C / plan.vec;
  p.n_kunits = C / plan.kunit_width;
  p.lanes_per_kunit = plan.lanes_per_kunit;
  const int64_t n_tiles = (p.n_cols + kCols - 1) / kCols;

  // Disjoint segments of whole units go straight into out.
  std::vector<std::pair<int64_t, int64_t>> ranges;  // (start, end) of non-empty segments
  for (int64_t i : seg_idx)
    if (seg[2 * i] < seg[2 * i + 1]) ranges.emplace_back(seg[2 * i], seg[2 * i + 1]);
  if (ranges.empty()) return;
  std::vector<std::pair<int64_t, int64_t>> sorted = ranges;
  std::sort(sorted.begin(), sorted.end());
  bool disjoint = true;
  for (size_t i = 1; i < sorted.size(); ++i) disjoint &= sorted[i].first >= sorted[i - 1].second;
  int64_t max_rows = 0;

  if (disjoint && plan.kunit_width == unit_width) {
    p.dst = out.data_ptr<float>();
    p.db = out.stride(0);
    p.dr = out.stride(1);
    p.du = out.stride(2);
    p.accumulate = 1;
    for (int64_t i : seg_idx) {
      if (seg[2 * i] == seg[2 * i + 1]) continue;
      p.jobs[p.n_jobs++] = {seg[2 * i], seg[2 * i + 1], i};
      max_rows = std::max(max_rows, seg[2 * i + 1] - seg[2 * i]);
    }
    launch_sumsq<T, kVector>(p, B, n_tiles, max_rows, stream);
    return;
  }

  // Elementary intervals: cut at every boundary, keep the pieces some segment covers.
  std::vector<int64_t> cuts;
  for (const auto& r : ranges) {
    cuts.push_back(r.first);
    cuts.push_back(r.second);
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<std::pair<int64_t, int64_t>> intervals;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    const int64_t a = cuts[i], z = cuts[i + 1];
    const bool covered = std::any_of(ranges.begin(), ranges.end(),
                                     [&](const auto& r) { return r.first <= a && z <= r.second; });
    if (covered) intervals.emplace_back(a, z);
  }
  const int64_t E = static_cast<int64_t>(intervals.size());
  // Not zeroed: every (b, interval, kernel unit) is stored by the first kernel.
  at::Tensor ws = at::empty({B, E, p.n_kunits}, out.options());
  p.dst = ws.data_ptr<float>();
  p.db = E * p.n_kunits;
  p.dr = p.n_kunits;
  p.du = 1;
  p.accumulate = 0;
  for (int64_t e = 0; e < E; ++e) {
    p.jobs[p.n_jobs++] = {intervals[e].first, intervals[e].second, e};
    max_rows = std::max(max_rows, intervals[e].second - intervals[e].first);
  }
  launch_sumsq<T, kVector>(p, B, n_tiles, max_rows, stream);

  CombineParams c{};
  c.ws = ws.data_ptr<float>();
  c.n_intervals = E;
  c.n_kunits = p.n_kunits;
  c.out = out.data_ptr<float>();
  c.ob = out.stride(0);
  c.os = out.stride(1);
  c.ou = out.stride(2);
  c.B = B;
  c.U = C / unit_width;
  c.kunits_per_unit = static_cast<int>(unit_width / plan.kunit_width);
  for (int64_t i : seg_idx) {
    const int64_t a = seg[2 * i], z = seg[2 * i + 1];
    if (a == z) continue;
    const auto lo = std::lower_bound(intervals.begin(), intervals.end(), std::make_pair(a, a));
    int e_hi = static_cast<int>(lo - intervals.begin());
    while (e_hi < E && intervals[e_hi].second <= z) ++e_hi;
    c.seg_row[c.n_segments] = static_cast<int>(i);
    c.seg_lo[c.n_segments] = static_cast<int>(lo - intervals.begin());
    c.seg_hi[c.n_segments] = e_hi;
    ++c.n_segments;
  }
  const int64_t n_out = B * c.n_segments * c.U;
  const int threads = 256;
  combine_kernel<<<static_cast<unsigned>((n_out + threads - 1) / threads), threads, 0, stream>>>(c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void unit_sumsq_cuda(const at::Tensor& x, int64_t unit_width, at::IntArrayRef segments,
                     const at::Tensor& out) {
  check_unit_sumsq_args(x, unit_width, segments, out);
  TORCH_CHECK(x.is_cuda(), "unit_sumsq_: x must be a CUDA tensor, got ", x.device());
  const int64_t B = x.size(0), C = x.size(2), S = static_cast<int64_t>(segments.size() / 2);
  if (B == 0 || C == 0 || S == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Plan plan = make_plan(x, unit_width);
  const std::vector<int64_t> seg(segments.begin(), segments.end());
  // Segment groups are independent (each writes its own rows of out); more than one group means
  // more than one pass over the tokens the groups share.
  for (int64_t g0 = 0; g0 < S; g0 += kMaxSegments) {
    std::vector<int64_t> seg_idx;
    for (int64_t i = g0; i < std::min(S, g0 + kMaxSegments); ++i) seg_idx.push_back(i);
    AT_DISPATCH_SWITCH(
        x.scalar_type(), "unit_sumsq_cuda",
        AT_DISPATCH_CASE(at::kBFloat16, [&] {
          if (plan.vector) run_group<__nv_bfloat16, true>(x, plan, unit_width, seg, seg_idx, out, stream);
          else run_group<__nv_bfloat16, false>(x, plan, unit_width, seg, seg_idx, out, stream);
        }) AT_DISPATCH_CASE(at::kHalf, [&] {
          if (plan.vector) run_group<__half, true>(x, plan, unit_width, seg, seg_idx, out, stream);
          else run_group<__half, false>(x, plan, unit_width, seg, seg_idx, out, stream);
        }) AT_DISPATCH_CASE(at::kFloat, [&] {
          if (plan.vector) run_group<float, true>(x, plan, unit_width, seg, seg_idx, out, stream);
          else run_group<float, false>(x, plan, unit_width, seg, seg_idx, out, stream);
        }));
  }
}

}  // namespace
}  // namespace otherview

TORCH_LIBRARY_IMPL(otherview, CUDA, m) { m.impl("unit_sumsq_", &otherview::unit_sumsq_cuda); }

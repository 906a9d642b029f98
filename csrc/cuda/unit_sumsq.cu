// unit_sumsq_ on CUDA: out[b, s, u] += sum over tokens of segment s and channels of unit u of
// x[b, t, c]^2, accumulated in fp32, in one pass over x.
//
// Two kernels, no float atomics, so the result is bitwise the same run to run:
//
// 1. partials: the token axis is cut at every segment boundary into elementary intervals (one pass
//    over x however the segments overlap), each interval into chunks of `chunk` rows, and the
//    channels into tiles of kCols 16-byte column vectors (256 contiguous bytes of a row for bf16).
//    One block of 256 threads reads one (batch row, chunk, tile) with kRows row lanes and kUnroll
//    loads in flight per thread, reduces it in a fixed order (registers, warp shuffles, shared
//    memory) and stores one partial per kernel unit into a workspace slot of its own. Blocks are
//    small (tens of KB) and many (several waves), so the block scheduler balances the SMs and the
//    grid drains like a copy kernel instead of waiting on its slowest fat block.
// 2. finish: one warp per output (b, s, u) sums its slots (the chunks of the intervals inside
//    segment s, the kernel units of unit u) in a fixed lane assignment and shuffle tree, and adds
//    the total into out. It is launched with programmatic dependent launch so its launch overlaps
//    the tail of the first kernel; it waits (griddepcontrol.wait) before reading anything.
// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in the cuBLAS/cuSPARSE headers): the
// file then compiles against the headers of a CPU torch wheel plus the CUDA toolkit alone.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "checks.h"

namespace otherview {
namespace {

constexpr int kCols = 16;                // column vectors per tile (lanes of one row)
constexpr int kThreads = 256;            // threads per partials block
constexpr int kRows = kThreads / kCols;  // row lanes per block
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 8;               // independent loads in flight per thread
constexpr int kMaxJobs = 64;             // intervals per launch (kernel parameters stay small)
constexpr int kMaxSegments = kMaxJobs / 2;  // segments per launch: at most 2S - 1 intervals
constexpr int kMinChunk = 4 * kRows;     // rows per block: at least 4 rows per thread
constexpr int kMaxChunk = 32 * kRows;
constexpr int kMaxGridY = 65535;

struct Job {
  int64_t t0, t1;   // token range [t0, t1) of one elementary interval
  int64_t item0;    // index of its first chunk among the chunks of one batch row
};

struct PartialsParams {
  const void* x;
  int64_t sb, st, sc;       // x's strides in elements
  int64_t n_cols;           // column vectors per row: C / VEC
  int64_t chunk;            // rows per block
  int64_t items_per_batch;  // chunks of all jobs of one batch row
  float* ws;                // [n_kunits, B * items_per_batch]
  int64_t n_items;          // B * items_per_batch
  int64_t n_kunits;
  int lanes_per_kunit;      // column vectors per kernel unit: a power of two <= kCols
  int n_jobs;
  Job jobs[kMaxJobs];
};

struct FinishParams {
  const float* ws;
  int64_t n_items, items_per_batch;
  float* out;
  int64_t ob, os, ou;        // out strides
  int64_t B, U;
  int kunits_per_unit;
  int n_segments;
  int seg_row[kMaxSegments];      // row of out
  int64_t seg_item0[kMaxSegments];  // first chunk of the segment within a batch row
  int64_t seg_items[kMaxSegments];  // chunks of the segment
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
struct Vec;  // kN elements of T in 16 bytes; acc[i] += element i squared

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

// Sum of squares of this thread's column over rows r0, r0 + kRows, ... below r1. kVector: the
// column is one aligned 16-byte vector of contiguous channels; otherwise one element at any
// stride. Out-of-range rows of the last batch are predicated off (read as zero, adding nothing),
// so short chunks keep all their loads in flight too.
template <typename T, bool kVector>
__device__ __forceinline__ float column_sumsq(const char* col_ptr, int64_t row_bytes, int64_t r0,
                                              int64_t r1) {
  constexpr int N = kVector ? Vec<T>::kN : 1;
  float acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.f;
  for (int64_t r = r0; r < r1; r += kUnroll * kRows) {
    if constexpr (kVector) {
      uint4 v[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k)
        v[k] = r + k * kRows < r1 ? load16(col_ptr + (r + k * kRows) * row_bytes) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) Vec<T>::sumsq(v[k], acc);
    } else {
      float v[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k)
        v[k] = r + k * kRows < r1 ? to_float(*reinterpret_cast<const T*>(col_ptr + (r + k * kRows) * row_bytes)) : 0.f;
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) acc[0] = fmaf(v[k], v[k], acc[0]);
    }
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) s += acc[i];
  return s;
}

// grid.x = column tiles, grid.y = chunks (batch-row major), so the blocks resident at one time
// read whole rows, as a copy kernel does.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) partials_kernel(const __grid_constant__ PartialsParams p) {
  // Let the finishing kernel's launch begin while this grid drains; it waits for our completion.
  asm volatile("griddepcontrol.launch_dependents;");
  constexpr int VEC = kVector ? Vec<T>::kN : 1;
  __shared__ float warp_part[kWarps][kCols];

  // Last chunk first: the tail of a freshly written x is what L2 still holds, and the head, read
  // last, is then in L2 for the projection that reads x next. Slots are indexed by chunk, so the
  // order blocks run in never changes the result.
  const int64_t item = p.n_items - 1 - blockIdx.y;
  const int64_t b = item / p.items_per_batch, chunk_idx = item % p.items_per_batch;
  int j = 0;  // the job holding this chunk: jobs are few and sorted by item0
  while (j + 1 < p.n_jobs && p.jobs[j + 1].item0 <= chunk_idx) ++j;
  const Job& job = p.jobs[j];
  const int64_t r0 = job.t0 + (chunk_idx - job.item0) * p.chunk;
  const int64_t r1 = min(job.t1, r0 + p.chunk);

  const int lane_col = threadIdx.x % kCols, lane_row = threadIdx.x / kCols;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + lane_col;
  float s = 0.f;
  if (col < p.n_cols) {
    const char* col_ptr = static_cast<const char*>(p.x) +
                          (b * p.sb + col * VEC * p.sc) * static_cast<int64_t>(sizeof(T));
    s = column_sumsq<T, kVector>(col_ptr, p.st * static_cast<int64_t>(sizeof(T)), r0 + lane_row, r1);
  }

  // Fixed-order reduction. xor-shuffles pair the same lanes in every run and a + b == b + a, so
  // every lane of a group ends with the same bits.
  for (int m = 1; m < p.lanes_per_kunit; m <<= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
  static_assert(kCols == 16, "a warp holds two row lanes");
  s += __shfl_xor_sync(0xffffffffu, s, 16);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane < kCols) warp_part[warp][lane] = s;
  __syncthreads();
  const int kunits_per_tile = kCols / p.lanes_per_kunit;
  const int64_t kunit = static_cast<int64_t>(blockIdx.x) * kunits_per_tile + threadIdx.x;
  if (threadIdx.x < kunits_per_tile && kunit < p.n_kunits) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += warp_part[w][threadIdx.x * p.lanes_per_kunit];
    p.ws[kunit * p.n_items + item] = t;
  }
}

// out[b, row(s), u] += the slots of segment s's chunks (batch row b) and unit u's kernel units,
// summed by one warp: lane l takes chunks l, l + 32, ... of each kernel unit in order, then a fixed
// shuffle tree.
__global__ void __launch_bounds__(256) finish_kernel(const __grid_constant__ FinishParams p) {
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the partials are complete and visible
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (o >= p.B * p.n_segments * p.U) return;  // whole warps leave together
  const int64_t u = o % p.U, s = (o / p.U) % p.n_segments, b = o / (p.U * p.n_segments);
  const int64_t n = p.seg_items[s], first = b * p.items_per_batch + p.seg_item0[s];
  float t = 0.f;
  for (int k = 0; k < p.kunits_per_unit; ++k) {
    const float* w = p.ws + (u * p.kunits_per_unit + k) * p.n_items + first;
    for (int64_t i = lane; i < n; i += 32) t += w[i];
  }
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) t += __shfl_xor_sync(0xffffffffu, t, m);
  if (lane == 0) {
    float* d = p.out + b * p.ob + p.seg_row[s] * p.os + u * p.ou;
    *d += t;
  }
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
  // The largest power of two dividing a unit's columns, at most a tile: such kernel units never
  // straddle a tile (C is a multiple of the unit width). Wider units add up in the finish kernel.
  while (plan.lanes_per_kunit < kCols && lanes % (2 * plan.lanes_per_kunit) == 0) plan.lanes_per_kunit *= 2;
  plan.kunit_width = static_cast<int64_t>(plan.lanes_per_kunit) * plan.vec;
  return plan;
}

template <typename T, bool kVector>
int64_t resident_blocks() {
  static thread_local int cached_device = -1;
  static thread_local int64_t capacity = 0;
  const int device = c10::cuda::current_device();
  if (device != cached_device) {
    int per_sm = 0, n_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, partials_kernel<T, kVector>, kThreads, 0));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device));
    capacity = static_cast<int64_t>(per_sm) * n_sm;
    cached_device = device;
  }
  return capacity;
}

// Rows per block: the largest that still gives about 8 waves of blocks (so the tail is a small
// fraction of the run), between 4 and 32 rows per thread; larger only if the grid's y limit needs.
int64_t choose_chunk(const std::vector<std::pair<int64_t, int64_t>>& intervals, int64_t B,
                     int64_t n_tiles, int64_t resident) {
  const auto items_for = [&](int64_t chunk) {
    int64_t n = 0;
    for (const auto& iv : intervals) n += (iv.second - iv.first + chunk - 1) / chunk;
    return n * B;
  };
  int64_t chunk = kMaxChunk;
  while (chunk > kMinChunk && items_for(chunk) * n_tiles < 8 * resident) chunk /= 2;
  while (items_for(chunk) > kMaxGridY) chunk *= 2;
  return chunk;
}

// One launch group: at most kMaxSegments segments (their rows in out are seg_idx).
template <typename T, bool kVector>
void run_group(const at::Tensor& x, const Plan& plan, int64_t unit_width,
               const std::vector<int64_t>& seg, const std::vector<int64_t>& seg_idx,
               const at::Tensor& out, cudaStream_t stream) {
  const int64_t B = x.size(0), C = x.size(2);

  // Elementary intervals: cut at every boundary, keep the pieces some segment covers. Disjoint
  // segments are their own intervals; overlapping ones share the pieces they have in common.
  std::vector<std::pair<int64_t, int64_t>> ranges;
  std::vector<int64_t> cuts;
  for (int64_t i : seg_idx) {
    if (seg[2 * i] == seg[2 * i + 1]) continue;
    ranges.emplace_back(seg[2 * i], seg[2 * i + 1]);
    cuts.push_back(seg[2 * i]);
    cuts.push_back(seg[2 * i + 1]);
  }
  if (ranges.empty()) return;
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<std::pair<int64_t, int64_t>> intervals;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    const int64_t a = cuts[i], z = cuts[i + 1];
    if (std::any_of(ranges.begin(), ranges.end(), [&](const auto& r) { return r.first <= a && z <= r.second; }))
      intervals.emplace_back(a, z);
  }

  PartialsParams p{};
  p.x = x.const_data_ptr();
  p.sb = x.stride(0);
  p.st = x.stride(1);
  p.sc = x.stride(2);
  p.n_cols = C / plan.vec;
  p.n_kunits = C / plan.kunit_width;
  p.lanes_per_kunit = plan.lanes_per_kunit;
  const int64_t n_tiles = (p.n_cols + kCols - 1) / kCols;
  p.chunk = choose_chunk(intervals, B, n_tiles, resident_blocks<T, kVector>());
  std::vector<int64_t> item0;  // first chunk of each interval, then the total
  for (const auto& iv : intervals) {
    item0.push_back(p.items_per_batch);
    p.jobs[p.n_jobs++] = {iv.first, iv.second, p.items_per_batch};
    p.items_per_batch += (iv.second - iv.first + p.chunk - 1) / p.chunk;
  }
  item0.push_back(p.items_per_batch);
  p.n_items = B * p.items_per_batch;
  TORCH_CHECK(n_tiles <= INT32_MAX && p.n_items <= kMaxGridY,
              "unit_sumsq_: x is too large for one launch, got shape ", shape_str(x.sizes()));
  // Not zeroed: the partials kernel stores every slot.
  const at::Tensor ws = at::empty({p.n_kunits, p.n_items}, out.options());
  p.ws = ws.data_ptr<float>();
  partials_kernel<T, kVector><<<dim3(static_cast<unsigned>(n_tiles), static_cast<unsigned>(p.n_items)), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  FinishParams f{};
  f.ws = p.ws;
  f.n_items = p.n_items;
  f.items_per_batch = p.items_per_batch;
  f.out = out.data_ptr<float>();
  f.ob = out.stride(0);
  f.os = out.stride(1);
  f.ou = out.stride(2);
  f.B = B;
  f.U = C / unit_width;
  f.kunits_per_unit = static_cast<int>(unit_width / plan.kunit_width);
  for (int64_t i : seg_idx) {
    const int64_t a = seg[2 * i], z = seg[2 * i + 1];
    if (a == z) continue;
    // A segment covers a contiguous run of intervals, hence of chunks.
    const auto lo = std::lower_bound(intervals.begin(), intervals.end(), std::make_pair(a, a)) - intervals.begin();
    auto hi = lo;
    while (hi < static_cast<int64_t>(intervals.size()) && intervals[hi].second <= z) ++hi;
    f.seg_row[f.n_segments] = static_cast<int>(i);
    f.seg_item0[f.n_segments] = item0[lo];
    f.seg_items[f.n_segments] = item0[hi] - item0[lo];
    ++f.n_segments;
  }
  const int64_t n_threads = B * f.n_segments * f.U * 32;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>((n_threads + 255) / 256));
  cfg.blockDim = dim3(256);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, finish_kernel, f));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void unit_sumsq_cuda(const at::Tensor& x, int64_t unit_width, at::IntArrayRef segments,
                     const at::Tensor& out) {
  check_unit_sumsq_args(x, unit_width, segments, out);
  TORCH_CHECK(x.is_cuda(), "unit_sumsq_: x must be a CUDA tensor, got ", x.device().str());
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

// signflip_null on CUDA. The integers every kernel compares are the op's inputs, prepared once on
// the host (otherview/ops/fixedpoint.py), so this file and the CPU one return bitwise identical
// counts; see csrc/cpu/signflip_null.cpp's header for the integer formulation.
//
// Two kernels share one per-flip reduction scheme. A block owns a chunk of F flips and loops over
// tiles of units; per flip it accumulates, in shared memory, the number of units above each
// threshold (warp sums, 32 flips' sums collected into one lane each, then one shared atomicAdd per
// lane) and the max of r_fix (warp max, then shared atomicMax). Integer atomics commute, so the
// result does not depend on scheduling. Once every tile is done the block histograms its F flips
// into global count_hist / max_hist / bins_hi / bins_lo with warp-aggregated atomics.
//  - exact_tree_kernel (exact mode, N >= 6): pairs 1..3 are enumerated in registers (8 flips from
//    one base sum: base +- c_p, c_p = q1 +- q2 +- q3), pairs 4..N-1 are walked in Gray-code order
//    (one add per unit per 8 flips). Each thread owns 4 units: ~1 add per unit-flip for S.
//  - explicit_kernel (random mode, and exact mode for N <= 5): each flip's sign bits come from the
//    counter-based generator (or the Gray code); S is summed from per-unit tables of the 16 partial
//    sums of each group of 4 pairs (N <= 64), else pair by pair.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <vector>

#include "checks.h"

namespace otherview {

// Shared with the CPU backend (csrc/cpu/signflip_null.cpp).
int64_t signflip_total(c10::string_view mode, int64_t n_pairs, int64_t n_flips);
void check_signflip_args(const at::Tensor& q, const at::Tensor& thr, const at::Tensor& a_obs,
                         const at::Tensor& kinv, c10::string_view mode, int64_t n_flips,
                         int64_t n_max_bins, int64_t flip_start, std::optional<int64_t> flip_stop);
at::Tensor signflip_r_obs(const at::Tensor& a_obs, const at::Tensor& kinv);
at::Tensor signflip_fwer_from_bins(const at::Tensor& fwer_bins, const at::Tensor& r_obs);

namespace {

constexpr int kRBits = 28;                             // r_fix = r * 2^28
constexpr int kTreeThreads = 256;
constexpr int kTreeUnits = 4;                          // units per thread in the tree kernel
constexpr int kTreeTile = kTreeThreads * kTreeUnits;   // units per tile; U is padded to this
constexpr int kExplicitThreads = 128;                  // one unit per thread
constexpr int kGroup = 4;                              // pairs per partial-sum table
constexpr int kTableMaxPairs = 64;
constexpr int kBatch = 8;                              // flips per batch in explicit_kernel

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One atomicAdd per distinct index in the warp (flip counts pile up on a few bins). Every lane of
// the warp must call it; invalid lanes pass valid = false.
__device__ __forceinline__ void warp_count(unsigned long long* base, int idx, bool valid) {
  const unsigned active = __ballot_sync(0xffffffffu, valid);
  if (!valid) return;
  const unsigned peers = __match_any_sync(active, idx);
  if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(base + idx, (unsigned long long)__popc(peers));
}

struct Outputs {
  unsigned long long* count_hist;  // [K, U + 1]
  unsigned long long* exceed;      // [U]
  unsigned long long* bins_hi;     // [U + 1]: flips by #observed r_fix <= max + 1
  unsigned long long* bins_lo;     // [U + 1]: flips by #observed r_fix <= max - 2
  unsigned long long* max_hist;    // [nb]
  int k_real;                      // thresholds of this launch (count_hist rows)
  bool primary;                    // also writes exceed / bins_hi / bins_lo / max_hist
};

struct Units {
  const int32_t* q;        // [N, Upad], zero in the padding
  const int32_t* thr;      // [KM, Upad], INT_MAX in the padding (never exceeded)
  const int32_t* a_obs;    // [Upad], INT_MAX in the padding
  const uint32_t* kinv;    // [Upad], 0 in the padding
  const int32_t* r_sorted; // [U], ascending
  int n, u, upad, nb;
};

// Histograms a finished chunk of nf flips (per-flip counts cnt[f * KM + k], maxima mx[f]).
template <int KM>
__device__ void flush_flips(const Units& p, const Outputs& o, const int32_t* cnt,
                            const uint32_t* mx, int nf) {
  for (int f0 = 0; f0 < nf; f0 += blockDim.x) {  // block-uniform loop: whole warps enter
    const int f = f0 + threadIdx.x;
    const bool valid = f < nf;
    for (int k = 0; k < o.k_real; ++k) {
      warp_count(o.count_hist + (int64_t)k * (p.u + 1), valid ? cnt[f * KM + k] : 0, valid);
    }
    if (!o.primary) continue;
    const uint32_t r = valid ? mx[f] : 0u;
    const int bin = (int)min(((int64_t)r * p.nb) >> kRBits, (int64_t)p.nb - 1);
    warp_count(o.max_hist, bin, valid);
    // upper_bound: observed r values <= this flip's max + 1 (hi) and max - 2 (lo), as the CPU op
    for (int side = 0; side < 2; ++side) {
      const int64_t key = side == 0 ? (int64_t)r + 1 : (int64_t)r - 2;
      int lo = 0, hi = p.u;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if ((int64_t)p.r_sorted[mid] <= key) lo = mid + 1; else hi = mid;
      }
      warp_count(side == 0 ? o.bins_hi : o.bins_lo, lo, valid);
    }
  }
}

// Exact mode, N >= 6. Block b walks Gray steps [s0 + b*C, s0 + (b+1)*C) of pairs 4..N-1; each step
// is 8 flips (the signs of pairs 1..3). Local flip index f = 8 * step + leaf. Step j's 8 flips are
// the CPU's Gray flips [8j, 8j + 8) (the Gray code of 8j + leaf is that of j above its 3 low bits),
// in another order.
template <int KM>
__global__ void __launch_bounds__(kTreeThreads, 2)
exact_tree_kernel(Units p, Outputs o, int steps_per_block, int64_t step_begin) {
  extern __shared__ int32_t smem[];
  const int nf = steps_per_block * 8;
  int32_t* cnt = smem;                                   // [nf, KM]
  uint32_t* mx = reinterpret_cast<uint32_t*>(smem + nf * KM);  // [nf]
  for (int i = threadIdx.x; i < nf * (KM + 1); i += blockDim.x) smem[i] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const uint64_t step0 = (uint64_t)step_begin + (uint64_t)blockIdx.x * steps_per_block;
  const uint64_t g0 = step0 ^ (step0 >> 1);

  for (int tile0 = 0; tile0 < p.upad; tile0 += kTreeTile) {
    const int u = tile0 + threadIdx.x * kTreeUnits;
    int32_t base[kTreeUnits], comb[kTreeUnits][4], thr[KM][kTreeUnits], ao[kTreeUnits];
    uint32_t kv[kTreeUnits];
    int32_t ex[kTreeUnits];
    {
      const int4 q0 = *reinterpret_cast<const int4*>(p.q + u);
      const int4 q1 = *reinterpret_cast<const int4*>(p.q + p.upad + u);
      const int4 q2 = *reinterpret_cast<const int4*>(p.q + 2 * p.upad + u);
      const int4 q3 = *reinterpret_cast<const int4*>(p.q + 3 * p.upad + u);
      const int a0[4] = {q0.x, q0.y, q0.z, q0.w}, a1[4] = {q1.x, q1.y, q1.z, q1.w};
      const int a2[4] = {q2.x, q2.y, q2.z, q2.w}, a3[4] = {q3.x, q3.y, q3.z, q3.w};
#pragma unroll
      for (int j = 0; j < kTreeUnits; ++j) {
        base[j] = a0[j];
        comb[j][0] = a1[j] + a2[j] + a3[j];
        comb[j][1] = a1[j] + a2[j] - a3[j];
        comb[j][2] = a1[j] - a2[j] + a3[j];
        comb[j][3] = a1[j] - a2[j] - a3[j];
        ex[j] = 0;
      }
      for (int i = 4; i < p.n; ++i) {  // the chunk's first step, from scratch
        const int4 qi = *reinterpret_cast<const int4*>(p.q + (int64_t)i * p.upad + u);
        const int s = ((g0 >> (i - 4)) & 1) ? -1 : 1;
        base[0] += s * qi.x; base[1] += s * qi.y; base[2] += s * qi.z; base[3] += s * qi.w;
      }
      const int4 a = *reinterpret_cast<const int4*>(p.a_obs + u);
      const uint4 k = *reinterpret_cast<const uint4*>(p.kinv + u);
      ao[0] = a.x; ao[1] = a.y; ao[2] = a.z; ao[3] = a.w;
      kv[0] = k.x; kv[1] = k.y; kv[2] = k.z; kv[3] = k.w;
#pragma unroll
      for (int kk = 0; kk < KM; ++kk) {
        const int4 t = *reinterpret_cast<const int4*>(p.thr + (int64_t)kk * p.upad + u);
        thr[kk][0] = t.x; thr[kk][1] = t.y; thr[kk][2] = t.z; thr[kk][3] = t.w;
      }
    }

    for (int s = 0; s < steps_per_block; s += 4) {
      int32_t acc[KM];
      uint32_t accm = 0;
#pragma unroll
      for (int kk = 0; kk < KM; ++kk) acc[kk] = 0;
#pragma unroll
      for (int s4 = 0; s4 < 4; ++s4) {
        // Issue the load for the move to the next step first: the 8 leaves below hide it.
        const uint64_t jn = step0 + s + s4 + 1;
        const bool more = s + s4 + 1 < steps_per_block;
        const int bit = __ffsll((long long)jn) - 1;
        const bool neg = ((jn ^ (jn >> 1)) >> bit) & 1;
        int4 dq = make_int4(0, 0, 0, 0);
        if (more) dq = __ldg(reinterpret_cast<const int4*>(p.q + (int64_t)(4 + bit) * p.upad + u));

        int32_t c[8][KM];
        uint32_t m[8];
#pragma unroll
        for (int l = 0; l < 8; ++l) {
          m[l] = 0;
#pragma unroll
          for (int kk = 0; kk < KM; ++kk) c[l][kk] = 0;
        }
#pragma unroll
        for (int j = 0; j < kTreeUnits; ++j) {
#pragma unroll
          for (int l = 0; l < 8; ++l) {
            const int32_t sv = (l & 1) ? base[j] - comb[j][l >> 1] : base[j] + comb[j][l >> 1];
            const int32_t a = abs(sv);
            ex[j] += a >= ao[j];
            m[l] = max(m[l], __umulhi((uint32_t)a, kv[j]));
#pragma unroll
            for (int kk = 0; kk < KM; ++kk) c[l][kk] += a > thr[kk][j];
          }
        }
#pragma unroll
        for (int l = 0; l < 8; ++l) {
#pragma unroll
          for (int kk = 0; kk < KM; ++kk) {
            const int32_t v = __reduce_add_sync(0xffffffffu, c[l][kk]);
            if (lane == s4 * 8 + l) acc[kk] = v;
          }
          const uint32_t v = __reduce_max_sync(0xffffffffu, m[l]);
          if (lane == s4 * 8 + l) accm = v;
        }
        const int sg = neg ? -2 : 2;
        base[0] += sg * dq.x; base[1] += sg * dq.y; base[2] += sg * dq.z; base[3] += sg * dq.w;
      }
      const int f = s * 8 + lane;  // step s + lane / 8, leaf lane % 8
#pragma unroll
      for (int kk = 0; kk < KM; ++kk) atomicAdd(&cnt[f * KM + kk], acc[kk]);
      atomicMax(&mx[f], accm);
    }
    if (o.primary) {
#pragma unroll
      for (int j = 0; j < kTreeUnits; ++j) {
        if (u + j < p.u) atomicAdd(o.exceed + u + j, (unsigned long long)ex[j]);
      }
    }
  }
  __syncthreads();
  flush_flips<KM>(p, o, cnt, mx, nf);
}

// Random mode, exact mode for N <= 5, and exact flips outside the tree kernel's whole blocks: block
// b takes flips [f_begin + b*F, f_begin + (b+1)*F) of [f_begin, f_end), by flip index.
template <int KM>
__global__ void __launch_bounds__(kExplicitThreads)
explicit_kernel(Units p, Outputs o, int64_t f_begin, int64_t f_end, int flips_per_block, bool exact,
                uint64_t key, bool table) {
  extern __shared__ int32_t smem[];
  const int nw = (p.n + 63) / 64;
  const int64_t f_start = f_begin + (int64_t)blockIdx.x * flips_per_block;
  const int nf = (int)min((int64_t)flips_per_block, f_end - f_start);
  int32_t* cnt = smem;                                               // [F, KM]
  uint32_t* mx = reinterpret_cast<uint32_t*>(cnt + flips_per_block * KM);  // [F]
  uint64_t* words = reinterpret_cast<uint64_t*>(mx + flips_per_block + (flips_per_block & 1));
  int32_t* tab = reinterpret_cast<int32_t*>(words + (int64_t)flips_per_block * nw);  // [G*16, T]
  for (int i = threadIdx.x; i < flips_per_block * (KM + 1); i += blockDim.x) smem[i] = 0;
  for (int i = threadIdx.x; i < flips_per_block * nw; i += blockDim.x) {
    const uint64_t f = (uint64_t)(f_start + i / nw);
    const uint64_t w = (uint64_t)(i % nw);
    // exact: pair i >= 1 negated when bit i-1 of the Gray code is set (N <= 40: one word).
    // Words past the chunk's last flip are 0 (the batches of 8 may read them).
    words[i] = i / nw >= nf ? 0ull
               : exact    ? ((f ^ (f >> 1)) << 1)
                          : (f == 0 ? 0ull : mix64(mix64(key ^ f) ^ w));
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int groups = (p.n + kGroup - 1) / kGroup;

  for (int tile0 = 0; tile0 < p.upad; tile0 += kExplicitThreads) {
    const int u = tile0 + threadIdx.x;
    int32_t s_obs = 0;
    if (!table) {
      for (int i = 0; i < p.n; ++i) s_obs += p.q[(int64_t)i * p.upad + u];
    } else {
      // Each thread writes and reads only its own column of tab: no barrier needed.
      for (int g = 0; g < groups; ++g) {
        for (int pat = 0; pat < 16; ++pat) {
          int32_t v = 0;
          for (int b = 0; b < kGroup && g * kGroup + b < p.n; ++b) {
            const int32_t qi = p.q[(int64_t)(g * kGroup + b) * p.upad + u];
            v += ((pat >> b) & 1) ? -qi : qi;
          }
          tab[(g * 16 + pat) * kExplicitThreads + threadIdx.x] = v;
        }
      }
    }
    const int32_t ao = p.a_obs[u];
    const uint32_t kv = p.kinv[u];
    int32_t thr[KM];
#pragma unroll
    for (int kk = 0; kk < KM; ++kk) thr[kk] = p.thr[(int64_t)kk * p.upad + u];
    int32_t ex = 0;
    const int32_t* col = tab + threadIdx.x;

    for (int fb = 0; fb < nf; fb += 32) {
      int32_t acc[KM];
      uint32_t accm = 0;
#pragma unroll
      for (int kk = 0; kk < KM; ++kk) acc[kk] = 0;
      const int nb32 = min(32, nf - fb);
      // Eight flips at a time: their table loads are independent, which is what hides the
      // shared-memory latency (one block holds few warps: the tables take most of the SM).
      for (int b8 = 0; b8 < nb32; b8 += kBatch) {
        int32_t sv[kBatch];
        if (table) {
          uint64_t w[kBatch];
#pragma unroll
          for (int l = 0; l < kBatch; ++l) {
            w[l] = words[(int64_t)(fb + b8 + l) * nw];
            sv[l] = 0;
          }
#pragma unroll 2
          for (int g = 0; g < groups; ++g) {
            const int32_t* tg = col + (g << 4) * kExplicitThreads;
#pragma unroll
            for (int l = 0; l < kBatch; ++l) {
              sv[l] += tg[(int)((w[l] >> (g * kGroup)) & 15) * kExplicitThreads];
            }
          }
        } else {
#pragma unroll
          for (int l = 0; l < kBatch; ++l) sv[l] = s_obs;
          for (int i = 0; i < p.n; ++i) {
            const int32_t q2 = 2 * p.q[(int64_t)i * p.upad + u];
#pragma unroll
            for (int l = 0; l < kBatch; ++l) {
              if ((words[(int64_t)(fb + b8 + l) * nw + (i >> 6)] >> (i & 63)) & 1) sv[l] -= q2;
            }
          }
        }
#pragma unroll
        for (int l = 0; l < kBatch; ++l) {
          const int32_t a = abs(sv[l]);
          ex += (a >= ao) & (b8 + l < nb32);  // the batch may run past the chunk's last flip
          const uint32_t r = __umulhi((uint32_t)a, kv);
#pragma unroll
          for (int kk = 0; kk < KM; ++kk) {
            const int32_t v = __reduce_add_sync(0xffffffffu, (int32_t)(a > thr[kk]));
            if (lane == b8 + l) acc[kk] = v;
          }
          const uint32_t vm = __reduce_max_sync(0xffffffffu, r);
          if (lane == b8 + l) accm = vm;
        }
      }
      if (lane < nb32) {
#pragma unroll
        for (int kk = 0; kk < KM; ++kk) atomicAdd(&cnt[(fb + lane) * KM + kk], acc[kk]);
        atomicMax(&mx[fb + lane], accm);
      }
    }
    if (o.primary && u < p.u) atomicAdd(o.exceed + u, (unsigned long long)ex);
  }
  __syncthreads();
  flush_flips<KM>(p, o, cnt, mx, nf);
}

template <int KM>
void launch_explicit(const Units& p, const Outputs& o, bool exact, int64_t f_begin, int64_t f_end,
                     uint64_t key, cudaStream_t stream) {
  if (f_end <= f_begin) return;  // an empty range: a grid of 0 blocks is a launch error
  const bool table = p.n <= kTableMaxPairs;
  const int nw = (p.n + 63) / 64;
  const int groups = (p.n + kGroup - 1) / kGroup;
  // flips per block: a multiple of 32; 512 lets three blocks' tables (64 KB at N <= 32) share an SM
  const int per_block = (int)std::max<int64_t>(32, std::min<int64_t>(512, 8192 / nw) / 32 * 32);
  const size_t smem = (size_t)per_block * (KM + 1) * 4 + 8 + (size_t)per_block * nw * 8 +
                      (table ? (size_t)groups * 16 * kExplicitThreads * 4 : 0);
  auto kern = explicit_kernel<KM>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const int64_t blocks = (f_end - f_begin + per_block - 1) / per_block;
  kern<<<(unsigned)blocks, kExplicitThreads, smem, stream>>>(p, o, f_begin, f_end, per_block, exact,
                                                            key, table);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Flips [f_begin, f_end). Exact mode, N >= 6: the tree kernel takes whole blocks of C steps (8
// flips each) from the first whole step on; the few flips before and after them (fewer than
// 8 * C + 8) go to the explicit kernel. The whole range is whole blocks: one tree launch, as before.
template <int KM>
void launch(const Units& p, const Outputs& o, bool exact, int64_t f_begin, int64_t f_end,
            uint64_t key, int n_sm, cudaStream_t stream) {
  if (exact && p.n >= 6) {
    const int64_t s_begin = (f_begin + 7) / 8;
    const int64_t steps = std::max<int64_t>(0, f_end / 8 - s_begin);
    // Chunks of up to 512 steps (4096 flips), fewer when that would leave SMs idle.
    int64_t c = KM <= 2 ? 512 : 256;
    while (c > 4 && steps / c < 2 * n_sm) c >>= 1;
    const int64_t blocks = steps / c;
    if (blocks == 0) {
      launch_explicit<KM>(p, o, exact, f_begin, f_end, key, stream);
      return;
    }
    const size_t smem = (size_t)c * 8 * (KM + 1) * sizeof(int32_t);
    auto kern = exact_tree_kernel<KM>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    kern<<<(unsigned)blocks, kTreeThreads, smem, stream>>>(p, o, (int)c, s_begin);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_explicit<KM>(p, o, exact, f_begin, 8 * s_begin, key, stream);
    launch_explicit<KM>(p, o, exact, 8 * (s_begin + blocks * c), f_end, key, stream);
    return;
  }
  launch_explicit<KM>(p, o, exact, f_begin, f_end, key, stream);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> signflip_null_cuda(
    const at::Tensor& q_in, const at::Tensor& thr_in, const at::Tensor& a_obs_in,
    const at::Tensor& kinv_in, c10::string_view mode, int64_t n_flips, int64_t seed,
    int64_t n_max_bins, int64_t flip_start, std::optional<int64_t> flip_stop) {
  check_signflip_args(q_in, thr_in, a_obs_in, kinv_in, mode, n_flips, n_max_bins, flip_start,
                      flip_stop);
  TORCH_CHECK(q_in.is_cuda(), "signflip_null_cuda: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = q_in.size(0), u = q_in.size(1), k_all = thr_in.size(0);
  const int64_t upad = (u + kTreeTile - 1) / kTreeTile * kTreeTile;
  const auto i32 = q_in.options().dtype(at::kInt);
  const auto i64 = q_in.options().dtype(at::kLong);
  const at::Tensor r_obs = signflip_r_obs(a_obs_in, kinv_in);
  // Padded copies: the kernels then need no bounds checks inside the flip loops.
  at::Tensor q = at::zeros({n, upad}, i32);
  q.narrow(1, 0, u).copy_(q_in);
  at::Tensor a_obs = at::full({upad}, INT_MAX, i32);
  a_obs.narrow(0, 0, u).copy_(a_obs_in);
  // kinv < 2^32: the int64 -> int32 conversion keeps its low 32 bits, read back as uint32.
  at::Tensor kinv = at::zeros({upad}, i32);
  kinv.narrow(0, 0, u).copy_(kinv_in.to(at::kInt));
  at::Tensor r_sorted = std::get<0>(r_obs.sort()).to(at::kInt).contiguous();  // r_fix <= 2^28

  at::Tensor count_hist = at::zeros({k_all, u + 1}, i64);
  at::Tensor exceed = at::zeros({u}, i64);
  at::Tensor bins_hi = at::zeros({u + 1}, i64);
  at::Tensor bins_lo = at::zeros({u + 1}, i64);
  at::Tensor max_hist = at::zeros({n_max_bins}, i64);
  const bool exact = mode == "exact";
  const int64_t f_end = flip_stop.value_or(signflip_total(mode, n, n_flips));
  const uint64_t key = [&] {  // mix64(seed) on the host, as the CPU op does
    uint64_t z = (uint64_t)seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }();
  int n_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, q_in.get_device()));

  // Up to 4 thresholds per launch (more would spill the tree kernel's per-leaf counters); later
  // launches only add their count_hist rows.
  for (int64_t k0 = 0; k0 == 0 || k0 < k_all; k0 += 4) {
    const int64_t kg = std::min<int64_t>(4, k_all - k0);
    const int km = kg <= 1 ? 1 : kg <= 2 ? 2 : 4;
    at::Tensor thr = at::full({km, upad}, INT_MAX, i32);
    if (kg > 0) thr.narrow(0, 0, kg).narrow(1, 0, u).copy_(thr_in.narrow(0, k0, kg));
    Units p{q.data_ptr<int32_t>(), thr.data_ptr<int32_t>(), a_obs.data_ptr<int32_t>(),
            reinterpret_cast<const uint32_t*>(kinv.data_ptr<int32_t>()),
            r_sorted.data_ptr<int32_t>(), (int)n, (int)u, (int)upad, (int)n_max_bins};
    Outputs o{reinterpret_cast<unsigned long long*>(count_hist.data_ptr<int64_t>() + k0 * (u + 1)),
              reinterpret_cast<unsigned long long*>(exceed.data_ptr<int64_t>()),
              reinterpret_cast<unsigned long long*>(bins_hi.data_ptr<int64_t>()),
              reinterpret_cast<unsigned long long*>(bins_lo.data_ptr<int64_t>()),
              reinterpret_cast<unsigned long long*>(max_hist.data_ptr<int64_t>()),
              (int)std::max<int64_t>(kg, 0), k0 == 0};
    switch (km) {
      case 1: launch<1>(p, o, exact, flip_start, f_end, key, n_sm, stream); break;
      case 2: launch<2>(p, o, exact, flip_start, f_end, key, n_sm, stream); break;
      default: launch<4>(p, o, exact, flip_start, f_end, key, n_sm, stream); break;
    }
  }
  return {count_hist, exceed, signflip_fwer_from_bins(bins_hi, r_obs),
          signflip_fwer_from_bins(bins_lo, r_obs), max_hist};
}

}  // namespace otherview

TORCH_LIBRARY_IMPL(otherview, CUDA, m) { m.impl("signflip_null", &otherview::signflip_null_cuda); }

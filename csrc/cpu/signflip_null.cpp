// signflip_null on the CPU, plus the checks and the finishing step that every backend shares.
//
// The statistic: for a flip s in {+1,-1}^N the paired t of unit u depends on s only through
// S_u = sum_i s_i q_iu, since Q_u = sum_i q_iu^2 is unchanged by sign flips:
//   t^2 = S^2 (N-1) / (N Q - S^2),   |t| > c  <=>  S^2 (N-1+c^2) > c^2 N Q.
// The op takes integers prepared once on the host (otherview/ops/fixedpoint.py: a power-of-two or
// decimal-grid fixed point of d with sum_i |q_iu| < 2^30, so S, every partial sum and 2q fit int32):
//   exceeds threshold k:  |S| > thr[k, u]                                  (int32 compare, exact)
//   exceed (p-value):     |S| >= a_obs[u]                                  (int32 compare, exact)
//   r = |S| / sqrt(N Q):  r_fix = (|S| * K_u) >> 32, K_u = floor(2^60 / sqrt(N Q_u)) < 2^32,
//                         r * 2^28 in [r_fix, r_fix + 1.25)                (one 32x32->64 multiply)
// The family-wise counts come as a bracket around the exact count: hi counts flips whose max r_fix
// is >= r_fix_obs - 1 (possibly reaches the unit's observed r), lo those >= r_fix_obs + 2
// (certainly). Every backend sees the same integers and returns bitwise identical counts. r is fixed
// point rather than float because on Hopper an int-to-float conversion issues at 1/8 of the integer
// rate and would dominate the exact kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"

namespace otherview {

namespace {
constexpr int64_t kMaxPairs = 4096;       // keeps K_u < 2^32 (fixedpoint.py)
constexpr int64_t kMaxExactPairs = 40;    // 2^39 flips: ~5 h on an H100 at 16k units
constexpr int64_t kMaxBins = int64_t(1) << 20;
constexpr int kRBits = 28;                // r_fix = r * 2^28
}  // namespace

// Flips in the whole null: 2^(N-1) in exact mode, n_flips in random mode.
int64_t signflip_total(c10::string_view mode, int64_t n_pairs, int64_t n_flips) {
  return mode == "exact" ? (int64_t(1) << (n_pairs - 1)) : n_flips;
}

// Argument checks of signflip_null, run first by every backend; otherview/ops/signflip.py repeats
// them word for word in its fake kernel and wrapper.
void check_signflip_args(const at::Tensor& q, const at::Tensor& thr, const at::Tensor& a_obs,
                         const at::Tensor& kinv, c10::string_view mode, int64_t n_flips,
                         int64_t n_max_bins, int64_t flip_start, std::optional<int64_t> flip_stop) {
  OV_CHECK_ARG(q.dim() == 2 && q.scalar_type() == at::kInt, "signflip_null",
               "q must be 2-d int32 [n_pairs, n_units], got ", dtype_name(q.scalar_type()), " ",
               shape_str(q.sizes()));
  const int64_t n = q.size(0), u = q.size(1);
  OV_CHECK_ARG(n >= 1 && n <= kMaxPairs && u >= 1, "signflip_null", "q must have 1 to ",
               int_str(kMaxPairs), " pairs and at least one unit, got ", shape_str(q.sizes()));
  OV_CHECK_ARG(thr.dim() == 2 && thr.scalar_type() == at::kInt && thr.size(1) == u, "signflip_null",
               "thr must be int32 [n_thresholds, ", int_str(u), "], got ",
               dtype_name(thr.scalar_type()), " ", shape_str(thr.sizes()));
  OV_CHECK_ARG(a_obs.dim() == 1 && a_obs.scalar_type() == at::kInt && a_obs.size(0) == u,
               "signflip_null", "a_obs must be int32 [", int_str(u), "], got ",
               dtype_name(a_obs.scalar_type()), " ", shape_str(a_obs.sizes()));
  OV_CHECK_ARG(kinv.dim() == 1 && kinv.scalar_type() == at::kLong && kinv.size(0) == u,
               "signflip_null", "kinv must be int64 [", int_str(u), "], got ",
               dtype_name(kinv.scalar_type()), " ", shape_str(kinv.sizes()));
  OV_CHECK_ARG(q.device() == thr.device() && q.device() == a_obs.device() &&
                   q.device() == kinv.device(),
               "signflip_null", "q, thr, a_obs and kinv must be on one device");
  OV_CHECK_ARG(mode == "exact" || mode == "random", "signflip_null",
               "mode must be \"exact\" or \"random\", got \"", std::string(mode), "\"");
  if (mode == "exact") {
    OV_CHECK_ARG(n <= kMaxExactPairs, "signflip_null", "exact mode enumerates 2^(n_pairs-1) flips "
                 "and accepts at most ", int_str(kMaxExactPairs), " pairs, got ", int_str(n), "; use mode=\"random\"");
  } else {
    OV_CHECK_ARG(n_flips >= 1, "signflip_null",
                 "random mode needs n_flips >= 1 (flip 0 is the identity), got ", int_str(n_flips));
  }
  OV_CHECK_ARG(n_max_bins >= 1 && n_max_bins <= kMaxBins, "signflip_null",
               "n_max_bins must be in [1, ", int_str(kMaxBins), "], got ", int_str(n_max_bins));
  const int64_t total = signflip_total(mode, n, n_flips);
  const int64_t stop = flip_stop.value_or(total);
  OV_CHECK_ARG(0 <= flip_start && flip_start <= stop && stop <= total, "signflip_null",
               "flip range [", int_str(flip_start), ", ", int_str(stop),
               ") must satisfy 0 <= flip_start <= flip_stop <= ", int_str(total), ", the null's flips");
}

// r_obs[u] = (a_obs[u] * kinv[u]) >> 32 (int64, on the inputs' device).
at::Tensor signflip_r_obs(const at::Tensor& a_obs, const at::Tensor& kinv) {
  return (a_obs.to(at::kLong) * kinv).div(int64_t(1) << 32, "floor");
}

// fwer[u] = number of flips whose max r_fix m has m + shift >= r_obs[u], from bins[b] = number of
// flips with exactly b observed values <= m + shift (b in [0, U]). A flip counts iff more than
// lower_bound(r_obs[u]) sorted observed values are <= m + shift. The kernels bin with shift = +1
// (hi: m >= r_obs - 1) and shift = -2 (lo: m >= r_obs + 2).
at::Tensor signflip_fwer_from_bins(const at::Tensor& fwer_bins, const at::Tensor& r_obs) {
  const at::Tensor sorted = std::get<0>(r_obs.sort());
  const at::Tensor lb = at::searchsorted(sorted, r_obs, /*out_int32=*/false, /*right=*/false);
  // tail[b] = sum_{b' >= b} bins[b']; flips with ub > lb are tail[lb + 1].
  const at::Tensor tail = fwer_bins.flip(0).cumsum(0).flip(0);
  return tail.index_select(0, lb + 1);
}

namespace {

constexpr int64_t kChunk = 4096;  // flips per task chunk (per-flip counters stay in L1/L2)

inline uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Prep {
  int64_t n, u, k, nb;
  const int32_t* q;      // [N, U]
  const int32_t* t;      // [K, U]
  const int32_t* a_obs;  // [U]
  std::vector<uint32_t> kinv;
  std::vector<int64_t> r_sorted;  // sorted r_obs, for the fwer bins
};

struct Partial {  // one task's counts; integer sums, so merge order cannot change the result
  std::vector<int64_t> count_hist, exceed, bins_hi, bins_lo, max_hist;
  explicit Partial(const Prep& p)
      : count_hist(p.k * (p.u + 1), 0), exceed(p.u, 0), bins_hi(p.u + 1, 0), bins_lo(p.u + 1, 0),
        max_hist(p.nb, 0) {}
};

// Scratch for one chunk: per-flip counts and maxima, and the state of one unit tile.
struct Chunk {
  std::vector<int32_t> cnt;   // [F, K]
  std::vector<uint32_t> mx;   // [F]
  std::vector<int32_t> s, a, ex;
};

// One flip over units [u0, u0 + w): given the flip's S in c.s, counts and maxima for flip f.
inline void score_flip(const Prep& p, Chunk& c, int64_t u0, int64_t w, int64_t f) {
  const int32_t* ao = p.a_obs + u0;
  const uint32_t* kv = p.kinv.data() + u0;
  int32_t* s = c.s.data();
  int32_t* a = c.a.data();
  int32_t* ex = c.ex.data();
  uint32_t m = 0;
  for (int64_t j = 0; j < w; ++j) {  // vectorisable: no branches, no cross-iteration state but m
    const int32_t v = s[j] < 0 ? -s[j] : s[j];
    a[j] = v;
    ex[j] += v >= ao[j];
    const uint32_t r = static_cast<uint32_t>((static_cast<uint64_t>(v) * kv[j]) >> 32);
    m = r > m ? r : m;
  }
  c.mx[f] = std::max(c.mx[f], m);
  for (int64_t k = 0; k < p.k; ++k) {
    const int32_t* tk = p.t + k * p.u + u0;
    int32_t n_over = 0;
    for (int64_t j = 0; j < w; ++j) n_over += a[j] > tk[j];
    c.cnt[f * p.k + k] += n_over;
  }
}

// S of flip pattern `neg` (bit i-1 set: pair i negative; pair 0 positive) from scratch.
inline void exact_start(const Prep& p, Chunk& c, int64_t u0, int64_t w, uint64_t neg) {
  int32_t* s = c.s.data();
  std::fill(s, s + w, 0);
  for (int64_t i = 0; i < p.n; ++i) {
    const int32_t* qi = p.q + i * p.u + u0;
    const bool minus = i > 0 && ((neg >> (i - 1)) & 1);
    if (minus) {
      for (int64_t j = 0; j < w; ++j) s[j] -= qi[j];
    } else {
      for (int64_t j = 0; j < w; ++j) s[j] += qi[j];
    }
  }
}

// Exact flips [j0, j1) of the Gray enumeration: flip j is pattern g(j) = j ^ (j >> 1); going from
// j-1 to j changes one sign, bit ctz(j), so S moves by +-2 q_i (one add per unit).
void exact_chunk(const Prep& p, Chunk& c, Partial& part, int64_t j0, int64_t j1, int64_t tile) {
  for (int64_t u0 = 0; u0 < p.u; u0 += tile) {
    const int64_t w = std::min(tile, p.u - u0);
    std::fill(c.ex.begin(), c.ex.begin() + w, 0);
    const uint64_t g0 = static_cast<uint64_t>(j0) ^ (static_cast<uint64_t>(j0) >> 1);
    exact_start(p, c, u0, w, g0);
    score_flip(p, c, u0, w, 0);
    int32_t* s = c.s.data();
    for (int64_t j = j0 + 1; j < j1; ++j) {
      const int bit = __builtin_ctzll(static_cast<uint64_t>(j));
      const uint64_t g = static_cast<uint64_t>(j) ^ (static_cast<uint64_t>(j) >> 1);
      const int32_t* qi = p.q + (bit + 1) * p.u + u0;
      if ((g >> bit) & 1) {  // pair bit+1 turned negative
        for (int64_t x = 0; x < w; ++x) s[x] -= 2 * qi[x];
      } else {
        for (int64_t x = 0; x < w; ++x) s[x] += 2 * qi[x];
      }
      score_flip(p, c, u0, w, j - j0);
    }
    for (int64_t x = 0; x < w; ++x) part.exceed[u0 + x] += c.ex[x];
  }
}

// Random flips [f0, f1): flip f > 0 negates pair i when bit i % 64 of
// mix64(mix64(mix64(seed) ^ f) ^ (i / 64)) is set; flip 0 is the identity. S is rebuilt per flip
// as S_obs - 2 * (sum of the negated pairs' q).
void random_chunk(const Prep& p, const std::vector<int32_t>& s_obs, Chunk& c, Partial& part,
                  uint64_t seed_key, int64_t f0, int64_t f1, int64_t tile) {
  const int64_t n_words = (p.n + 63) / 64;
  std::vector<uint64_t> bits(static_cast<size_t>((f1 - f0) * n_words));
  for (int64_t f = f0; f < f1; ++f) {
    for (int64_t wd = 0; wd < n_words; ++wd) {
      bits[(f - f0) * n_words + wd] =
          f == 0 ? 0 : mix64(mix64(seed_key ^ static_cast<uint64_t>(f)) ^ static_cast<uint64_t>(wd));
    }
  }
  for (int64_t u0 = 0; u0 < p.u; u0 += tile) {
    const int64_t w = std::min(tile, p.u - u0);
    std::fill(c.ex.begin(), c.ex.begin() + w, 0);
    int32_t* s = c.s.data();
    for (int64_t f = f0; f < f1; ++f) {
      std::copy(s_obs.begin() + u0, s_obs.begin() + u0 + w, s);
      const uint64_t* fb = bits.data() + (f - f0) * n_words;
      for (int64_t i = 0; i < p.n; ++i) {
        if (!((fb[i >> 6] >> (i & 63)) & 1)) continue;
        const int32_t* qi = p.q + i * p.u + u0;
        for (int64_t x = 0; x < w; ++x) s[x] -= 2 * qi[x];
      }
      score_flip(p, c, u0, w, f - f0);
    }
    for (int64_t x = 0; x < w; ++x) part.exceed[u0 + x] += c.ex[x];
  }
}

// Histograms a finished chunk's per-flip counts and maxima into the task's partial counts.
void flush_chunk(const Prep& p, const Chunk& c, Partial& part, int64_t n_chunk) {
  for (int64_t f = 0; f < n_chunk; ++f) {
    for (int64_t k = 0; k < p.k; ++k) part.count_hist[k * (p.u + 1) + c.cnt[f * p.k + k]] += 1;
    const int64_t r = c.mx[f];
    part.max_hist[std::min((r * p.nb) >> kRBits, p.nb - 1)] += 1;
    const auto& rs = p.r_sorted;
    part.bins_hi[std::upper_bound(rs.begin(), rs.end(), r + 1) - rs.begin()] += 1;
    part.bins_lo[std::upper_bound(rs.begin(), rs.end(), r - 2) - rs.begin()] += 1;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> signflip_null_cpu(
    const at::Tensor& q_in, const at::Tensor& thr_in, const at::Tensor& a_obs_in,
    const at::Tensor& kinv_in, c10::string_view mode, int64_t n_flips, int64_t seed,
    int64_t n_max_bins, int64_t flip_start, std::optional<int64_t> flip_stop) {
  check_signflip_args(q_in, thr_in, a_obs_in, kinv_in, mode, n_flips, n_max_bins, flip_start,
                      flip_stop);
  TORCH_CHECK(q_in.device().is_cpu(), "signflip_null_cpu: q must be a CPU tensor");
  const at::Tensor q = q_in.contiguous(), thr = thr_in.contiguous();
  const at::Tensor a_obs = a_obs_in.contiguous(), kinv = kinv_in.contiguous();
  const at::Tensor r_obs = signflip_r_obs(a_obs, kinv);
  Prep p;
  p.n = q.size(0);
  p.u = q.size(1);
  p.k = thr.size(0);
  p.nb = n_max_bins;
  p.q = q.data_ptr<int32_t>();
  p.t = thr.data_ptr<int32_t>();
  p.a_obs = a_obs.data_ptr<int32_t>();
  const int64_t* kv = kinv.data_ptr<int64_t>();
  p.kinv.assign(kv, kv + p.u);
  const int64_t* ro = r_obs.data_ptr<int64_t>();
  p.r_sorted.assign(ro, ro + p.u);
  std::sort(p.r_sorted.begin(), p.r_sorted.end());
  std::vector<int32_t> s_obs(p.u, 0);
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t x = 0; x < p.u; ++x) s_obs[x] += p.q[i * p.u + x];

  const bool exact = mode == "exact";
  // Flips [begin, end) in chunks from begin: every flip is scored from its own index (exact: S of
  // its Gray pattern, computed directly at each chunk's start), so any range counts exactly its
  // flips and ranges tiling [0, total) add up to the whole null.
  const int64_t begin = flip_start;
  const int64_t end = flip_stop.value_or(signflip_total(mode, p.n, n_flips));
  const int64_t n_chunks = (end - begin + kChunk - 1) / kChunk;
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
  // Small tiles keep S, |S| and the per-unit integers in L1 while a chunk walks its flips.
  const int64_t tile = std::min<int64_t>(p.u, 2048);
  const uint64_t seed_key = mix64(static_cast<uint64_t>(seed));
  std::vector<Partial> parts;
  parts.reserve(n_tasks);
  for (int64_t t = 0; t < n_tasks; ++t) parts.emplace_back(p);

  at::parallel_for(0, n_tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      Chunk c;
      c.cnt.resize(kChunk * p.k);
      c.mx.resize(kChunk);
      c.s.resize(tile);
      c.a.resize(tile);
      c.ex.resize(tile);
      // Contiguous chunk ranges per task; the result does not depend on the split.
      for (int64_t ch = n_chunks * t / n_tasks; ch < n_chunks * (t + 1) / n_tasks; ++ch) {
        const int64_t f0 = begin + ch * kChunk, f1 = std::min(end, f0 + kChunk);
        std::fill(c.cnt.begin(), c.cnt.end(), 0);
        std::fill(c.mx.begin(), c.mx.end(), 0u);
        if (exact) {
          exact_chunk(p, c, parts[t], f0, f1, tile);
        } else {
          random_chunk(p, s_obs, c, parts[t], seed_key, f0, f1, tile);
        }
        flush_chunk(p, c, parts[t], f1 - f0);
      }
    }
  });

  const auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor count_hist = at::zeros({p.k, p.u + 1}, opts);
  at::Tensor exceed = at::zeros({p.u}, opts);
  at::Tensor bins_hi = at::zeros({p.u + 1}, opts);
  at::Tensor bins_lo = at::zeros({p.u + 1}, opts);
  at::Tensor max_hist = at::zeros({p.nb}, opts);
  auto add = [](at::Tensor& dst, const std::vector<int64_t>& src) {
    int64_t* o = dst.data_ptr<int64_t>();
    for (size_t i = 0; i < src.size(); ++i) o[i] += src[i];
  };
  for (const auto& part : parts) {  // fixed order (integer sums are exact in any order anyway)
    add(count_hist, part.count_hist);
    add(exceed, part.exceed);
    add(bins_hi, part.bins_hi);
    add(bins_lo, part.bins_lo);
    add(max_hist, part.max_hist);
  }
  return {count_hist, exceed, signflip_fwer_from_bins(bins_hi, r_obs),
          signflip_fwer_from_bins(bins_lo, r_obs), max_hist};
}

}  // namespace otherview

TORCH_LIBRARY_IMPL(otherview, CPU, m) { m.impl("signflip_null", &otherview::signflip_null_cpu); }

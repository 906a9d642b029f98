// The schemas of every otherview op, in one place (after pytorch/extension-cpp).
// Implementations register themselves with TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu. Python wrappers, fake (meta) kernels and plain-PyTorch references live in
// otherview/ops/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing otherview._C registers the ops below; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(otherview, m) {
  // out[b, s, u] += sum over tokens t in segment s and channels c of unit u of x[b, t, c]^2 (fp32).
  // x: [B, T, C] (bf16/fp16/fp32, any strides with unit channel stride); segments: flat
  // [start0, end0, start1, end1, ...] token ranges; out: fp32 [B, S, C / unit_width], unit stride 1.
  m.def("unit_sumsq_(Tensor x, int unit_width, int[] segments, Tensor(a!) out) -> ()");
  // Sign-flip null of the paired t from integers prepared on the host (otherview/ops/fixedpoint.py):
  // q int32 [N, U], thr int32 [K, U], a_obs int32 [U], kinv int64 [U]. mode "exact" walks all
  // 2^(N-1) flips (first sign held), "random" draws n_flips seeded flips (flip 0 is the identity).
  // Counts only flips [flip_start, flip_stop) (None: to the last): ranges tiling the flips add up.
  // Returns (count_hist [K, U+1], exceed [U], fwer_hi [U], fwer_lo [U], max_hist [n_max_bins]), int64.
  m.def("signflip_null(Tensor q, Tensor thr, Tensor a_obs, Tensor kinv, str mode, int n_flips, int seed, int n_max_bins, int flip_start=0, int? flip_stop=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

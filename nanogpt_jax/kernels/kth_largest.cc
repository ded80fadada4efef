// Each row's k-th largest logit, on a CPU: where top-k sampling cuts a row.
//
//   y[r] = the k[r]-th largest of x[r, :V],   k clamped to [1, V]
//
// in the order of float32's bit patterns made unsigned (`sampling.ordered_bits`: -0 below +0,
// NaNs past the infinities), so the answer is one of the row's own numbers, exactly. Radix
// selection: one pass counts the row's keys by their top bits, which names the bin the k-th
// largest falls in; a second pass gathers that bin's keys, and a selection among those few
// finds it. XLA:CPU selects a lone row's top k in ~0.13 ms, but a batch inside a loop either
// sorts every row or goes one row at a time through the loop's own overhead; here the rows
// are split over the intra-op threads, each row read twice.
//
// Compiled on the machine that runs it (`-march=native`).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace nanogpt_jax;

constexpr int kBinBits = 11;  // 2,048 bins, each a quarter of an octave
constexpr int kTables = 4;    // 32 KiB of counts: in L1
constexpr int kShift = 32 - kBinBits;

inline uint32_t ordered(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return (bits >> 31) ? ~bits : (bits | 0x80000000u);
}

inline float unordered(uint32_t key) {
  const uint32_t bits = (key >> 31) ? (key & 0x7fffffffu) : ~key;
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// The k-th largest of x[0 .. V), 1 <= k <= V; `bin` (kept for the thread's next row) holds
// the keys of the bin it falls in.
float kth_largest_row(const float* x, int64_t V, int64_t k, std::vector<uint32_t>& bin) {
  // counted in kTables tables, so that runs of keys in one bin (a row's logits crowd a few
  // bins) do not wait on each other's increments
  uint32_t tables[kTables][1 << kBinBits] = {};
  int64_t j = 0;
  for (; j + kTables <= V; j += kTables) {
    for (int t = 0; t < kTables; ++t) ++tables[t][ordered(x[j + t]) >> kShift];
  }
  for (; j < V; ++j) ++tables[0][ordered(x[j]) >> kShift];
  uint32_t* counts = tables[0];
  for (int t = 1; t < kTables; ++t) {
    for (int b = 0; b < (1 << kBinBits); ++b) counts[b] += tables[t][b];
  }
  int64_t above = 0;  // keys in the bins past `top`
  uint32_t top = (1u << kBinBits) - 1;
  while (above + counts[top] < k) above += counts[top--];  // stops: all V keys reach k
  bin.clear();
  for (j = 0; j < V; ++j) {
    const uint32_t key = ordered(x[j]);
    if ((key >> kShift) == top) bin.push_back(key);
  }
  const auto at = bin.begin() + (k - above - 1);  // the (k - above)-th largest in the bin
  std::nth_element(bin.begin(), at, bin.end(), std::greater<uint32_t>());
  return unordered(*at);
}

ffi::Error KthLargestImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S32> k, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto dims = x.dimensions();
  if (dims.size() < 1 || dims.back() < 1 || k.element_count() * dims.back() != x.element_count()) {
    return ffi::Error::InvalidArgument("kth_largest: x (..., V) with V >= 1, k (...) expected");
  }
  const int64_t V = dims.back(), rows = k.element_count();
  const float* xs = x.typed_data();
  const int32_t* ks = k.typed_data();
  float* ys = y->typed_data();
  parallel_for(pool, rows, [=](int64_t r) {
    thread_local std::vector<uint32_t> bin;
    ys[r] = kth_largest_row(xs + r * V, V, std::clamp<int64_t>(ks[r], 1, V), bin);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KthLargest, KthLargestImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

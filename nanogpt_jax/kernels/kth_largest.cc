// Each row's k-th largest logit, on a CPU: where top-k sampling cuts a row.
//
//   y[r] = the k[r]-th largest of x[r, :V],   k clamped to [1, V]
//
// in the order of float32's bit patterns made unsigned (`sampling.ordered_bits`: -0 below +0,
// NaNs past the infinities), so the answer is one of the row's own numbers, exactly. XLA:CPU
// selects a lone row's top k in ~0.13 ms, but a batch inside a loop either sorts every row or
// goes one row at a time through the loop's own overhead; here the rows are split over the
// intra-op threads.
//
// Top-k sampling keeps a few hundred of 50,257 logits, and they lie close below the row's
// largest: one vector pass finds the largest key, a second counts the keys within each of a
// few distances below it, and the nearest distance holding k keys, if it holds few, names the
// keys that are gathered and selected among. Otherwise (a large k, a flat row) radix
// selection: one pass counts the row's keys by their top bits, which names the bin the k-th
// largest falls in; a second gathers that bin's keys, and a selection among those few finds
// it. gpt2's 8 rows at nanoGPT's top_k 200 in a decode loop: 0.33 ms a step by radix alone,
// 0.20 ms with the near selection first.
//
// Compiled on the machine that runs it (`-march=native`).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "parallel.h"
#include "vectors.h"
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

// Distances below the row's largest key for the near selection: 2^18 keys is 1/32 of an
// octave of float32 numbers, 2^28 is 32 octaves.
constexpr int kDistances = 11;
constexpr int kFirstDistanceBits = 18, kDistanceBitsStep = 1;
constexpr int64_t kFew = 4096;  // the most keys the near selection gathers

typedef int32_t Signed __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Word ordered(Word bits) {  // `ordered`, a vector at a time
  const Word negative = (Word)((Signed)bits >> 31);
  return bits ^ (negative | 0x80000000u);
}

inline bool any(Word lanes) {
  uint64_t words[sizeof(Word) / sizeof(uint64_t)];
  std::memcpy(words, &lanes, sizeof(words));
  uint64_t all = 0;
  for (uint64_t w : words) all |= w;
  return all != 0;
}

inline Word load_keys(const float* x) {
  Word bits;
  std::memcpy(&bits, x, sizeof(bits));
  return ordered(bits);
}

// The k-th largest key of x[0 .. V) if it lies within the distances of the row's largest and
// no more than kFew keys do, gathered in `near`; else false.
bool near_kth_largest(const float* x, int64_t V, int64_t k, std::vector<uint32_t>& near,
                      uint32_t& kth) {
  const int64_t whole = V - V % kLanes;
  Word top = {};
  for (int64_t j = 0; j < whole; j += kLanes) {
    const Word keys = load_keys(x + j);
    top = keys > top ? keys : top;
  }
  uint32_t largest = 0;
  for (int i = 0; i < kLanes; ++i) largest = std::max(largest, top[i]);
  for (int64_t j = whole; j < V; ++j) largest = std::max(largest, ordered(x[j]));
  uint32_t cuts[kDistances];
  Signed counts[kDistances] = {};
  for (int d = 0; d < kDistances; ++d) {
    const uint32_t distance = 1u << (kFirstDistanceBits + kDistanceBitsStep * d);
    cuts[d] = largest > distance ? largest - distance : 0;
  }
  for (int64_t j = 0; j < whole; j += kLanes) {
    const Word keys = load_keys(x + j);
    for (int d = 0; d < kDistances; ++d) counts[d] -= (Signed)(keys >= cuts[d]);  // -1 if so
  }
  int d = 0;
  int64_t count = 0;
  for (; d < kDistances; ++d) {
    count = 0;
    for (int i = 0; i < kLanes; ++i) count += counts[d][i];
    for (int64_t j = whole; j < V; ++j) count += ordered(x[j]) >= cuts[d];
    if (count >= k) break;
  }
  if (d == kDistances || count > kFew) return false;
  const uint32_t cut = cuts[d];
  near.clear();
  for (int64_t j = 0; j < whole; j += kLanes) {
    const Word keys = load_keys(x + j);
    const Word hit = (Word)(keys >= cut);
    if (!any(hit)) continue;
    for (int i = 0; i < kLanes; ++i) {
      if (hit[i]) near.push_back(keys[i]);
    }
  }
  for (int64_t j = whole; j < V; ++j) {
    if (ordered(x[j]) >= cut) near.push_back(ordered(x[j]));
  }
  const auto at = near.begin() + (k - 1);
  std::nth_element(near.begin(), at, near.end(), std::greater<uint32_t>());
  kth = *at;
  return true;
}

// The k-th largest of x[0 .. V), 1 <= k <= V; `bin` (kept for the thread's next row) holds
// the keys gathered for the selection.
float kth_largest_row(const float* x, int64_t V, int64_t k, std::vector<uint32_t>& bin) {
  if (uint32_t kth; near_kth_largest(x, V, k, bin, kth)) return unordered(kth);
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

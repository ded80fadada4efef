// A few rows times a weight matrix on a CPU: y (R, N) = x (R, K) . w (N, K)^T, in float32.
//
// A decode step multiplies 1 to 16 rows by each weight: it reads every weight once and does
// little arithmetic per byte. XLA:CPU's library products run such shapes well below the memory
// bandwidth (8 rows of float32 at ~10-18 GB/s), and multiply bfloat16 on CPUs without
// AVX512-BF16 slower than float32. Here each weight row is read once for every row of x in
// registers, converted from bfloat16 in registers (a 16-bit shift), and accumulated in float32
// with fused multiply-adds; bfloat16 rows against bfloat16 weights, on a CPU with AVX512-BF16,
// go two numbers at a time through its pair products instead (gpt2's 8-row bfloat16 products
// twice as fast on a Zen 4: they were bound by the arithmetic, not the reads). The work is
// split over XLA's intra-op threads by output blocks.
//
// Written with the compiler's vector extensions (vectors.h): it is compiled on the machine
// that runs it (`-march=native`).

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ahead.h"
#include "parallel.h"
#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace nanogpt_jax;

// Whether a step of k takes 2 * kLanes pair products (bfloat16 rows and weights, on a CPU with
// AVX512-BF16: half the instructions of converting each weight and multiplying in float32)
// rather than kLanes float32 products.
template <typename X, typename W>
constexpr bool kPaired =
    kBfloat16Pairs && std::is_same_v<X, uint16_t> && std::is_same_v<W, uint16_t>;

// AVX-512: 32 vector registers, and the CPUs the 8-row pass and the prefetch distance below were
// measured on (a Zen 4); elsewhere (AVX2, measured on a Zen 3) the kernel works as it did before.
constexpr bool kAvx512 =
#if defined(__AVX512VL__)
    true;
#else
    false;
#endif

// How far ahead of the weight rows it multiplies a block asks for the next ones: one block (3 to
// 9 KB) left the 8-row products waiting on memory; 16 KB ahead, gpt2's 49 bfloat16 products at 6
// and 8 rows were 10-20% faster, and no row count slower (a C++ copy of the kernel on a Zen 4,
// two threads; docs/benchmarks.md). 0: the next block.
constexpr int64_t kAheadBytes = kAvx512 ? 16 * 1024 : 0;

// Rows [r0, r0 + RB) of y, outputs [n0, n0 + NB): RB * NB accumulators in registers. While it
// works, it asks for weight rows further on (`ahead`, or nothing) as fast as it reads its own:
// the hardware prefetcher alone, starting over at every short weight row, left a one-row
// bfloat16 product at half the memory bandwidth.
template <int RB, int NB, typename X, typename W>
void block(const X* x, const W* w, float* y, int64_t K, int64_t N, int64_t r0, int64_t n0,
           const W* ahead) {
  constexpr int64_t kStep = kPaired<X, W> ? 2 * kLanes : kLanes;  // of k
  constexpr int64_t kStepBytes = NB * kStep * sizeof(W);            // of w read per step
  const char* asked = reinterpret_cast<const char*>(ahead);        // as far as this step reads
  Ahead fetch(ahead);
  Vec acc[RB][NB] = {};
  const int64_t whole = K - K % kStep;
  for (int64_t k = 0; k < whole; k += kStep) {
    if (ahead != nullptr) fetch.until(asked += kStepBytes);
    if constexpr (kPaired<X, W>) {
      Pairs wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = load_pairs(w + (n0 + j) * K + k);
      for (int r = 0; r < RB; ++r) {
        const Pairs xv = load_pairs(x + (r0 + r) * K + k);
        for (int j = 0; j < NB; ++j) acc[r][j] = add_pair_products(xv, wv[j], acc[r][j]);
      }
    } else {
      Vec wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = load(w + (n0 + j) * K + k);
      for (int r = 0; r < RB; ++r) {
        const Vec xv = load(x + (r0 + r) * K + k);
        for (int j = 0; j < NB; ++j) acc[r][j] = multiply_add(xv, wv[j], acc[r][j]);
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int j = 0; j < NB; ++j) {
      float total = sum(acc[r][j]);
      for (int64_t k = whole; k < K; ++k) {
        total += to_float(x[(r0 + r) * K + k]) * to_float(w[(n0 + j) * K + k]);
      }
      y[(r0 + r) * N + n0 + j] = total;
    }
  }
}

// Every row of x times outputs [n0, n1): rows in groups the registers hold. The first group of
// rows fetches weight rows kAheadBytes on (at least the next NB); the others find this group's
// in the cache.
template <int RB, int NB, typename X, typename W>
void rows_in_groups(const X* x, const W* w, float* y, int64_t R, int64_t K, int64_t N,
                    int64_t n0, int64_t n1) {
  const int64_t blocks_ahead = std::max<int64_t>(1, kAheadBytes / (NB * K * int64_t(sizeof(W))));
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    const int64_t next = n + blocks_ahead * NB;
    const W* ahead = next + NB <= N ? w + next * K : nullptr;
    int64_t r = 0;
    for (; r + RB <= R; r += RB) block<RB, NB>(x, w, y, K, N, r, n, r == 0 ? ahead : nullptr);
    for (; r < R; ++r) block<1, NB>(x, w, y, K, N, r, n, r == 0 ? ahead : nullptr);
  }
  for (; n < n1; ++n) {
    for (int64_t r = 0; r < R; ++r) block<1, 1, X, W>(x, w, y, K, N, r, n, nullptr);
  }
}

// 5 to 7 rows in one pass over two outputs at a time: each weight vector read once, for every
// row, with up to 14 of the 16 vector registers as accumulators; measured faster than a pass
// of 4 rows and the rest one row at a time (gpt2's products at 6 rows: ~1.4x in float32 and
// bfloat16, docs/benchmarks.md). At 8 rows a pass of 8 over one output at a time was no faster
// inside XLA's programs than two of 4 over 3 (the second finds the weights in the cache); with
// AVX-512's 32 vector registers a pass of 8 over three outputs is (24 accumulators: gpt2's
// float32 products ~1.35x, bfloat16 ~1.1x faster on a Zen 4, docs/benchmarks.md).
template <typename X, typename W>
void outputs(const X* x, const W* w, float* y, int64_t R, int64_t K, int64_t N, int64_t n0,
             int64_t n1) {
  if (kAvx512 && R == 8) return rows_in_groups<8, 3>(x, w, y, R, K, N, n0, n1);
  switch (R) {
    case 1: return rows_in_groups<1, 8>(x, w, y, R, K, N, n0, n1);
    case 2: return rows_in_groups<2, 5>(x, w, y, R, K, N, n0, n1);
    case 3: return rows_in_groups<3, 3>(x, w, y, R, K, N, n0, n1);
    case 4: return rows_in_groups<4, 3>(x, w, y, R, K, N, n0, n1);
    case 5: return rows_in_groups<5, 2>(x, w, y, R, K, N, n0, n1);
    case 6: return rows_in_groups<6, 2>(x, w, y, R, K, N, n0, n1);
    case 7: return rows_in_groups<7, 2>(x, w, y, R, K, N, n0, n1);
    default: return rows_in_groups<4, 3>(x, w, y, R, K, N, n0, n1);
  }
}

template <typename X, typename W>
void product(ffi::ThreadPool& pool, const X* x, const W* w, float* y, int64_t R, int64_t K,
             int64_t N) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // a few blocks a thread, each a multiple of 24 outputs (of every group size but 5: past the
  // last whole group, one output at a time)
  const int64_t per_block = std::max<int64_t>(24, (N / (4 * threads) + 23) / 24 * 24);
  const int64_t blocks = (N + per_block - 1) / per_block;
  nanogpt_jax::parallel_for(pool, blocks, [=](int64_t b) {
    outputs(x, w, y, R, K, N, b * per_block, std::min(N, (b + 1) * per_block));
  });
}

ffi::Error RowsTimesImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                         ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("rows_times: x (R, K) and w (N, K) expected");
  }
  const int64_t R = xd[0], K = xd[1], N = wd[0];
  const auto bfloat16 = [](ffi::AnyBuffer b) {
    return reinterpret_cast<const uint16_t*>(b.untyped_data());
  };
  if (w.element_type() != ffi::F32 && w.element_type() != ffi::BF16) {
    return ffi::Error::InvalidArgument("rows_times: w must be float32 or bfloat16");
  }
  if (x.element_type() == ffi::BF16 && w.element_type() == ffi::BF16 && kBfloat16Pairs) {
    product(pool, bfloat16(x), bfloat16(w), y->typed_data(), R, K, N);
    return ffi::Error::Success();
  }
  std::vector<float> widened;  // bfloat16 rows as float32 (exactly), where not taken in pairs
  const float* xs;
  if (x.element_type() == ffi::F32) {
    xs = x.typed_data<float>();
  } else if (x.element_type() == ffi::BF16) {
    widened.resize(R * K);
    for (int64_t i = 0; i < R * K; ++i) widened[i] = to_float(bfloat16(x)[i]);
    xs = widened.data();
  } else {
    return ffi::Error::InvalidArgument("rows_times: x must be float32 or bfloat16");
  }
  if (w.element_type() == ffi::F32) {
    product(pool, xs, w.typed_data<float>(), y->typed_data(), R, K, N);
  } else {
    product(pool, xs, bfloat16(w), y->typed_data(), R, K, N);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsTimes, RowsTimesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

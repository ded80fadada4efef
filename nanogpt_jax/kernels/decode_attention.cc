// One query a row against the filled slots of its cache, on a CPU: a decode step's attention.
//
//   y[r] = softmax(q[r] . k[r, :L]^T / sqrt(D)) . v[r, :L],   L = lengths[r]
//
// q (R, D) in float32, k and v (R', S, D) with R' >= R (a cache may hold more rows than a step
// reads) in float32 or bfloat16 (as bfloat16 or as its bits, uint16): a bfloat16 slot is
// widened exactly, so a cache of bfloat16 numbers gives the same result in either dtype while
// the 16-bit one is half the bytes to read. XLA reads a cache of S slots whole, or copies each
// block of slots out of it before multiplying; here each (row, head) reads its own L slots
// where they lie, once for the scores and once for the values, and nothing past them. A row's
// result depends only on its own query, slots and length: never on the other rows, nor on S.
// A row asks for its values and the next row's slots while it scores its own (`attend_row`).
//
// Written with the compiler's vector extensions (vectors.h): it is compiled on the machine
// that runs it (`-march=native`).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ahead.h"
#include "parallel.h"
#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace nanogpt_jax;

// q . k for one slot, and for eight at once (eight chains of fused multiply-adds, their lane
// sums in one vector): the same order either way, lanes across D, the lanes as a tree
// (lane_sum), then D's tail.
template <typename T>
float dot_slot(const float* q, const T* k, int64_t D) {
  const int64_t whole = D - D % kLanes;
  Vec acc = {};
  for (int64_t d = 0; d < whole; d += kLanes) acc = multiply_add(load(q + d), load(k + d), acc);
  float total = lane_sum(acc);
  for (int64_t d = whole; d < D; ++d) total += q[d] * to_float(k[d]);
  return total;
}

template <typename T>
Vec dot_8_slots(const float* q, const T* k, int64_t D) {
  const int64_t whole = D - D % kLanes;
  Vec acc[8] = {};
  for (int64_t d = 0; d < whole; d += kLanes) {
    const Vec qv = load(q + d);
    for (int g = 0; g < 8; ++g) acc[g] = multiply_add(qv, load(k + g * D + d), acc[g]);
  }
  Vec totals = lane_sums(acc);
  for (int g = 0; g < 8; ++g) {
    for (int64_t d = whole; d < D; ++d) totals[g] += q[d] * to_float(k[g * D + d]);
  }
  return totals;
}

// out[d .. d + V * kLanes) = sum over slots j of weights[j] * v[j, d ..]: V accumulators.
template <int V, typename T>
void weigh_values(const float* weights, const T* v, float* out, int64_t L, int64_t D,
                  int64_t d) {
  Vec acc[V] = {};
  for (int64_t j = 0; j < L; ++j) {
    const Vec w = Vec{} + weights[j];
    for (int i = 0; i < V; ++i) acc[i] = multiply_add(w, load(v + j * D + d + i * kLanes), acc[i]);
  }
  for (int i = 0; i < V; ++i) std::memcpy(out + d + i * kLanes, &acc[i], sizeof(Vec));
}

// e^x for x <= 0, kLanes at a time: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by Cephes' degree-6
// polynomial (within 2 ulp of float32's e^r), 2^n written into the exponent bits. Below
// e^-87, past float32's normal numbers, it is 0: a weight that small moves no float32 sum.
inline Vec exp_at_most_zero(Vec x) {
  typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const Ints kept = x >= -87.0f;
  x = kept ? x : Vec{} - 87.0f;
  const Vec round = Vec{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to a whole number
  const Vec n = (x * 1.44269504088896341f + round) - round;
  const Vec r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const Ints bits = (__builtin_convertvector(n, Ints) + 127) << 23;
  Vec two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof(two_to_n));
  const Vec e = p * two_to_n;
  return kept ? e : Vec{};
}

// y = softmax(scores) . v over L slots, in `buffer` (grown as needed, kept for the next row):
// the scores, then their weights. While it scores its slots, a row asks for its own values
// and for the next row's keys and values (next_k, next_v, next_L: the row its thread reads
// next), a share of them for each share of its own: left to the hardware prefetcher, which
// starts over at every row's few KB of keys and of values, a step's cache was read at a
// third of the memory's rate (gpt2, batch 8, 80 slots a row: docs/benchmarks.md).
template <typename T>
void attend_row(const float* q, const T* k, const T* v, float* y, int64_t L, int64_t D,
                const T* next_k, const T* next_v, int64_t next_L, std::vector<float>& buffer) {
  if (L == 0) {  // nothing to attend to (no step asks for it): zeros, not a 0/0
    std::fill(y, y + D, 0.0f);
    return;
  }
  // the scores padded to whole vectors with -inf: weights of 0 that change no sum
  const int64_t padded = (L + kLanes - 1) / kLanes * kLanes;
  if (static_cast<int64_t>(buffer.size()) < padded) buffer.resize(padded);
  float* scores = buffer.data();
  const float scale = std::sqrt(static_cast<float>(D));
  Ahead values(v), next_keys(next_k), next_values(next_v);
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) {
    values.until(v + (j + 8) * D);
    const int64_t share = (j + 8) * next_L / L;  // of the next row's slots
    next_keys.until(next_k + share * D);
    next_values.until(next_v + share * D);
    const Vec s = dot_8_slots(q, k + j * D, D) / scale;
    std::memcpy(scores + j, &s, sizeof(s));
  }
  values.until(v + L * D);
  next_keys.until(next_k + next_L * D);
  next_values.until(next_v + next_L * D);
  for (; j < L; ++j) scores[j] = dot_slot(q, k + j * D, D) / scale;
  std::fill(scores + L, scores + padded, -INFINITY);
  Vec peaks = load(scores);
  for (j = kLanes; j < padded; j += kLanes) {
    const Vec s = load(scores + j);
    peaks = peaks > s ? peaks : s;
  }
  float peak = peaks[0];
  for (int i = 1; i < kLanes; ++i) peak = std::max(peak, peaks[i]);
  Vec totals = {};
  for (j = 0; j < padded; j += kLanes) {
    const Vec e = exp_at_most_zero(load(scores + j) - peak);
    std::memcpy(scores + j, &e, sizeof(e));
    totals += e;
  }
  const float total = sum(totals);
  const int64_t whole = D - D % kLanes;
  int64_t d = 0;
  for (; d + 8 * kLanes <= whole; d += 8 * kLanes) weigh_values<8>(scores, v, y, L, D, d);
  for (; d < whole; d += kLanes) weigh_values<1>(scores, v, y, L, D, d);
  for (; d < D; ++d) {
    float acc = 0.0f;
    for (j = 0; j < L; ++j) acc += scores[j] * to_float(v[j * D + d]);
    y[d] = acc;
  }
  for (d = 0; d < D; ++d) y[d] /= total;
}

// Rows in runs, two a thread: each row knows the one its thread reads next.
template <typename T>
void attend_rows(ffi::ThreadPool pool, const float* qs, const T* ks, const T* vs,
                 const int32_t* ls, float* ys, int64_t R, int64_t S, int64_t D) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_run = std::max<int64_t>(1, R / (2 * threads));
  const auto length = [=](int64_t r) { return std::clamp<int64_t>(ls[r], 0, S); };
  parallel_for(pool, (R + per_run - 1) / per_run, [=](int64_t run) {
    thread_local std::vector<float> buffer;  // a row's scores, then its weights: reused
    const int64_t end = std::min(R, (run + 1) * per_run);
    for (int64_t r = run * per_run; r < end; ++r) {
      const int64_t next = r + 1 < end ? r + 1 : r;  // the last row asks for nothing more
      attend_row(qs + r * D, ks + r * S * D, vs + r * S * D, ys + r * D, length(r), D,
                 ks + next * S * D, vs + next * S * D, next == r ? 0 : length(next), buffer);
    }
  });
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                               ffi::AnyBuffer v, ffi::Buffer<ffi::S32> lengths,
                               ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 2 || kd.size() != 3 || vd.size() != 3 || kd[2] != qd[1] ||
      kd[0] < qd[0] || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] ||
      lengths.element_count() != qd[0]) {
    return ffi::Error::InvalidArgument(
        "decode_attention: q (R, D), k and v (R' >= R, S, D), lengths (R,) expected");
  }
  const auto type = k.element_type();
  const bool bfloat16 = type == ffi::BF16 || type == ffi::U16;  // as numbers or as their bits
  if (v.element_type() != type || (type != ffi::F32 && !bfloat16)) {
    return ffi::Error::InvalidArgument(
        "decode_attention: k and v both float32, or both bfloat16 (or its bits, uint16)");
  }
  const int64_t R = qd[0], S = kd[1], D = kd[2];
  if (bfloat16) {
    const auto bits = [](ffi::AnyBuffer b) {
      return reinterpret_cast<const uint16_t*>(b.untyped_data());
    };
    attend_rows(pool, q.typed_data(), bits(k), bits(v), lengths.typed_data(), y->typed_data(),
                R, S, D);
  } else {
    attend_rows(pool, q.typed_data(), k.typed_data<float>(), v.typed_data<float>(),
                lengths.typed_data(), y->typed_data(), R, S, D);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

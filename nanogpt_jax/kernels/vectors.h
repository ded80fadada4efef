// Eight float32 lanes, written with the compiler's vector extensions (an x86 FMA intrinsic
// where the CPU has FMA), for this folder's kernels: each is compiled on the machine that runs
// it (`-march=native`).

#ifndef NANOGPT_JAX_KERNELS_VECTORS_H_
#define NANOGPT_JAX_KERNELS_VECTORS_H_

#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace nanogpt_jax {

constexpr int kLanes = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint16_t Half __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t Word __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// bfloat16: the high half of a float32. With AVX2 in one widening load and a shift: the
// compiler's own code for the conversion below takes six instructions (GCC 12).
inline Vec load(const uint16_t* p) {
#if defined(__AVX2__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (Vec)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  Half h;
  std::memcpy(&h, p, sizeof(h));
  Word w = __builtin_convertvector(h, Word) << 16;
  Vec v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
#endif
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  uint32_t w = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

// a * b + c: fused where the CPU has FMA. Built with -ffp-contract=off, so that every row is
// summed the same way in every block shape: a row's result does not depend on the other rows.
inline Vec multiply_add(Vec a, Vec b, Vec c) {
#if defined(__FMA__)
  return (Vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

inline float sum(Vec v) {
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
}

// The sum of a vector's lanes as a tree, ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)): the order
// in which lane_sums adds each of eight vectors' lanes.
inline float lane_sum(Vec v) {
  static_assert(kLanes == 8, "lane_sum adds eight lanes");
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// The lane sums of eight vectors, vector g's in lane g, each added as lane_sum adds it (with
// AVX: 6 horizontal adds and a vertical one for the eight, not 56 scalar adds).
inline Vec lane_sums(const Vec (&v)[8]) {
#if defined(__AVX__)
  // hadd(a, b) = a01 a23 b01 b23 | a45 a67 b45 b67 (xy: lane x + lane y)
  const __m256 v01 = _mm256_hadd_ps((__m256)v[0], (__m256)v[1]);
  const __m256 v23 = _mm256_hadd_ps((__m256)v[2], (__m256)v[3]);
  const __m256 v45 = _mm256_hadd_ps((__m256)v[4], (__m256)v[5]);
  const __m256 v67 = _mm256_hadd_ps((__m256)v[6], (__m256)v[7]);
  // each vector's (01 + 23) in the low half, its (45 + 67) in the high half
  const __m256 low = _mm256_hadd_ps(v01, v23), high = _mm256_hadd_ps(v45, v67);
  return (Vec)_mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20),
                            _mm256_permute2f128_ps(low, high, 0x31));
#else
  Vec sums;
  for (int g = 0; g < 8; ++g) sums[g] = lane_sum(v[g]);
  return sums;
#endif
}

// AVX512-BF16's pair products: 2 * kLanes bfloat16 numbers of a row against as many of a
// weight, each pair's two products (exact in float32) added to a float32 lane.
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
constexpr bool kBfloat16Pairs = true;
#else
constexpr bool kBfloat16Pairs = false;
#endif
typedef uint16_t Pairs __attribute__((vector_size(2 * kLanes * sizeof(uint16_t))));

inline Pairs load_pairs(const uint16_t* p) {
  Pairs v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// c + a . b pair by pair (with inputs below float32's normal range taken as 0, as the
// instruction does); only called where kBfloat16Pairs.
inline Vec add_pair_products(Pairs a, Pairs b, Vec c) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  return (Vec)_mm256_dpbf16_ps((__m256)c, (__m256bh)a, (__m256bh)b);
#else
  (void)a, (void)b;
  return c;
#endif
}

}  // namespace nanogpt_jax

#endif  // NANOGPT_JAX_KERNELS_VECTORS_H_

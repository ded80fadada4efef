// A prefetch stream for this folder's kernels: the cache lines of a span asked for in order, as
// far as the caller has come, each line once, into L2 (asked into L1, long streams pushed each
// other out: rows_times' weights, decode_attention's cache rows; docs/benchmarks.md).

#ifndef NANOGPT_JAX_KERNELS_AHEAD_H_
#define NANOGPT_JAX_KERNELS_AHEAD_H_

namespace nanogpt_jax {

class Ahead {
 public:
  explicit Ahead(const void* begin) : next_(static_cast<const char*>(begin)) {}
  // Asks for every line before `end` not asked for yet.
  void until(const void* end) {
    for (; next_ < static_cast<const char*>(end); next_ += 64) __builtin_prefetch(next_, 0, 2);
  }

 private:
  const char* next_;
};

}  // namespace nanogpt_jax

#endif  // NANOGPT_JAX_KERNELS_AHEAD_H_

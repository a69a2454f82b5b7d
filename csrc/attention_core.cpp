// The attention core for CPUs: out = softmax(q @ k.T * scale) @ v, one (image, head) per work item.
//
// SDPA's CPU flash kernel walks keys in small blocks with an online softmax, which pays for long sequences but not
// for a ViT's 197 tokens. Here a work item packs its head's keys and values once, then for each tile of queries runs
// one brgemm for the scores (a tile x keys float buffer that stays in cache, never the whole (B, H, L, L) tensor),
// the softmax in place in float, and one brgemm for the weighted values, normalised in the epilogue and written
// straight into a (B, L, H, D) output that the output projection reads as (B, L, E) with no copy.
//
// bfloat16 runs oneDNN's pair-interleaved (VNNI) micro-kernels (AMX or AVX-512 BF16), so keys are packed as
// [D/2][keys][2] and values as [keys/2][D][2], both zero-padded to a multiple of 32 keys; the probabilities are
// rounded to bfloat16 before the second product, as SDPA's math backend rounds them. float32 reads the values in
// place. bfloat16 inputs can also be widened to float32 as they are packed and multiplied as float32
// (float_products): on some CPUs that outruns the bfloat16 micro-kernels, so the caller measures both. Each item is
// computed start to end by one thread: the result is the same bit for bit at any thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "avx512_float.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using at::native::cpublas::brgemm;

constexpr int64_t kKeyPadding = 32;  // keys padded to this multiple for the bfloat16 micro-kernels

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

using superblock::to_bfloat16_bits;

// Minimax-style fit of 2^f on [0, 1), highest power first: relative error below 2e-7.
constexpr int kExp2Degree = 5;
constexpr float kExp2Coefficients[kExp2Degree + 1] = {1.8762329e-3f, 8.992584e-3f, 5.5823606e-2f,
                                                      2.4015453e-1f, 6.9315296e-1f, 9.9999994e-1f};
// A degree-3 fit, relative error below 7.5e-5, for bfloat16 outputs (steps of 2^-9 of the value): "coarse".
constexpr float kExp2Coefficients3[4] = {7.80244917e-2f, 2.26067230e-1f, 6.95833504e-1f, 9.99925196e-1f};

// 2^x for x <= 0 (the softmax's shifted scores); NaN stays NaN, -inf gives 0.
inline float exp2_nonpositive(float x) {
  const float clamped = x < -126.f ? -126.f : x;  // NaN compares false and passes through
  const float whole = __builtin_floorf(clamped);
  const float f = clamped - whole;  // [0, 1)
  float p = kExp2Coefficients[0];
  for (int c = 1; c < kExp2Degree + 1; ++c) p = p * f + kExp2Coefficients[c];
  const int32_t exponent = int32_t(whole) + 127;
  const float result = p * bits_to_float(uint32_t(exponent) << 23);
  return x < -126.f ? 0.f : result;
}

// Softmax numerators of one row of raw scores: exp((s - max) * scale), written over the row, or as bfloat16 to
// `rounded` when it is given. Returns 1 / their sum. A NaN or +inf score makes the whole row NaN, as in SDPA: its
// numerator is NaN, hence the sum and every output.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// The build targets this CPU (-march=native), so its instruction sets are known at compile time; the compiler does
// not vectorize the portable loop below (its exp polynomial stays scalar), which made the softmax most of the time.

using superblock::first_lanes;

// kRows rows at a time: their max and exp chains are independent, so they overlap in the pipeline (one row's
// reductions are long dependency chains: max, then horizontal max, then exp, then horizontal sum).
template <int kRows, bool kRounded, bool kCoarse>
inline void softmax_rows(float* scores, int64_t stride, int64_t count, float scale, uint16_t* rounded,
                         float* inverse) {
  const __m512 negative_infinity = _mm512_set1_ps(-INFINITY);
  __m512 max16[kRows];
  for (int r = 0; r < kRows; ++r) max16[r] = negative_infinity;
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 mask = first_lanes(count - j);
    for (int r = 0; r < kRows; ++r) {
      max16[r] = _mm512_max_ps(max16[r], _mm512_mask_loadu_ps(negative_infinity, mask, scores + r * stride + j));
    }
  }
  const __m512 log2_scale = _mm512_set1_ps(scale * 1.4426950408889634f);
  const __m512 lowest = _mm512_set1_ps(-150.f);  // below it 2^x is 0 in float
  __m512 shift[kRows], sum16[kRows];
  for (int r = 0; r < kRows; ++r) {
    shift[r] = _mm512_set1_ps(_mm512_reduce_max_ps(max16[r]));
    sum16[r] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 mask = first_lanes(count - j);
    for (int r = 0; r < kRows; ++r) {
      float* row = scores + r * stride;
      // max_ps returns its second operand when either is NaN, so NaN passes the clamp.
      // (s - max) * c, not one fused s * c - max * c: with huge scores that leaves max * c's rounding, 2^x overflows.
      const __m512 x = _mm512_max_ps(
          lowest, _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + j), shift[r]), log2_scale));
      const __m512 whole = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      const __m512 fraction = _mm512_sub_ps(x, whole);
      __m512 p;
      if constexpr (kCoarse) {
        p = _mm512_set1_ps(kExp2Coefficients3[0]);
        for (int c = 1; c < 4; ++c) p = _mm512_fmadd_ps(p, fraction, _mm512_set1_ps(kExp2Coefficients3[c]));
      } else {
        p = _mm512_set1_ps(kExp2Coefficients[0]);
        for (int c = 1; c < kExp2Degree + 1; ++c) {
          p = _mm512_fmadd_ps(p, fraction, _mm512_set1_ps(kExp2Coefficients[c]));
        }
      }
      const __m512 e = _mm512_scalef_ps(p, whole);  // p * 2^whole
      if constexpr (kRounded) {
        _mm256_mask_storeu_epi16(rounded + r * stride + j, mask, superblock::bfloat16_bits16(e));
      } else {
        _mm512_mask_storeu_ps(row + j, mask, e);
      }
      sum16[r] = _mm512_mask_add_ps(sum16[r], mask, sum16[r], e);
    }
  }
  for (int r = 0; r < kRows; ++r) inverse[r] = 1.f / _mm512_reduce_add_ps(sum16[r]);
}

template <int kRows>
inline void softmax_rows_of(float* scores, int64_t stride, int64_t count, float scale, uint16_t* rounded, bool coarse,
                            float* inverse) {
  if (rounded) {
    softmax_rows<kRows, true, true>(scores, stride, count, scale, rounded, inverse);
  } else if (coarse) {
    softmax_rows<kRows, false, true>(scores, stride, count, scale, nullptr, inverse);
  } else {
    softmax_rows<kRows, false, false>(scores, stride, count, scale, nullptr, inverse);
  }
}

// Every row of a tile of scores (rows x count, row stride `stride`); `rounded` as the scores when given. `coarse`:
// the output is bfloat16, so the degree-3 exp2 serves (rounded implies it).
inline void softmax_tile(float* scores, int64_t rows, int64_t stride, int64_t count, float scale, uint16_t* rounded,
                         bool coarse, float* inverse) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    softmax_rows_of<4>(scores + r * stride, stride, count, scale, rounded ? rounded + r * stride : nullptr, coarse,
                       inverse + r);
  }
  for (; r < rows; ++r) {
    softmax_rows_of<1>(scores + r * stride, stride, count, scale, rounded ? rounded + r * stride : nullptr, coarse,
                       inverse + r);
  }
}

// dst[c][r] = src[r][c] for 4-byte words: 16 rows at a time, each output vector gathered from them. `src` rows may
// start at any 2-byte boundary (a bfloat16 head inside a qkv row), which gathers with byte offsets allow.
inline void transpose_words(const void* src, int64_t src_stride_bytes, int64_t rows, int64_t cols, uint32_t* dst,
                            int64_t dst_stride) {
  const __m512i row_offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(int(src_stride_bytes)));
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const __mmask16 mask = first_lanes(rows - r0);
    const char* base = static_cast<const char*>(src) + r0 * src_stride_bytes;
    for (int64_t c = 0; c < cols; ++c) {
      const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, row_offsets, base + c * 4, 1);
      _mm512_mask_storeu_epi32(dst + c * dst_stride + r0, mask, words);
    }
  }
}
#else
inline float softmax_numerators(float* row, int64_t count, float scale, uint16_t* rounded) {
  float max = -INFINITY;
  for (int64_t j = 0; j < count; ++j) max = row[j] > max ? row[j] : max;
  const float log2_scale = scale * 1.4426950408889634f;
  float sum = 0.f;
  for (int64_t j = 0; j < count; ++j) {
    const float e = exp2_nonpositive((row[j] - max) * log2_scale);
    sum += e;
    if (rounded) {
      rounded[j] = to_bfloat16_bits(e);
    } else {
      row[j] = e;
    }
  }
  return 1.f / sum;
}

inline void softmax_tile(float* scores, int64_t rows, int64_t stride, int64_t count, float scale, uint16_t* rounded,
                         bool /*coarse: the portable loops keep degree 5*/, float* inverse) {
  for (int64_t r = 0; r < rows; ++r) {
    inverse[r] = softmax_numerators(scores + r * stride, count, scale, rounded ? rounded + r * stride : nullptr);
  }
}

// dst[c][r] = src[r][c] for 4-byte words, in 16 x 16 blocks so that reads and writes both stay in a few cache lines.
// `src` rows may start at any 2-byte boundary (a bfloat16 head inside a qkv row), hence the memcpy loads.
inline void transpose_words(const void* src, int64_t src_stride_bytes, int64_t rows, int64_t cols, uint32_t* dst,
                            int64_t dst_stride) {
  const char* base = static_cast<const char*>(src);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t r1 = std::min(rows, r0 + 16);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t c1 = std::min(cols, c0 + 16);
      for (int64_t r = r0; r < r1; ++r) {
        const char* row = base + r * src_stride_bytes;
        for (int64_t c = c0; c < c1; ++c) std::memcpy(dst + c * dst_stride + r, row + c * 4, 4);
      }
    }
  }
}
#endif

// A buffer of `size` elements whose padding (what the item never writes) is zero. Zero-filled only when its size
// changes: an op's items all have one shape and write the same places, so the padding stays zero from item to item.
template <typename T>
void zeroed(std::vector<T>& buffer, int64_t size) {
  if (int64_t(buffer.size()) != size) buffer.assign(size, T(0));
}

struct Heads {
  int64_t batch, heads, queries, keys, dim;
};

inline float widen(at::BFloat16 value) {
  uint16_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits_to_float(uint32_t(bits) << 16);
}

inline void store(float* out, float value) { *out = value; }
inline void store(at::BFloat16* out, float value) {
  const uint16_t bits = to_bfloat16_bits(value);
  std::memcpy(out, &bits, sizeof(bits));
}

// rows x dim values of `src` (row stride `stride`) as contiguous floats in `dst`.
inline void widen_rows(const at::BFloat16* src, int64_t stride, int64_t rows, int64_t dim, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const at::BFloat16* row = src + r * stride;
    for (int64_t d = 0; d < dim; ++d) dst[r * dim + d] = widen(row[d]);
  }
}

// A Products type computes one (image, head): its keys packed for the scores' product, values for the second, then
// tile after tile of queries.

// float32 products. float32 inputs are read in place (the values too); bfloat16 ones are widened as they are packed,
// which some CPUs run faster than their bfloat16 micro-kernels (measured at conversion: "fused-fp32").
template <typename In>
struct FloatProducts {
  std::vector<float> keys_t, scores, acc, widened_queries, widened_keys, widened_values;

  void run(const In* q, int64_t q_stride, const In* k, int64_t k_stride, const In* v, int64_t v_stride, In* out,
           int64_t out_stride, const Heads& s, float scale, int64_t tile) {
    constexpr bool in_place = std::is_same_v<In, float>;
    const int64_t padded = (s.keys + 15) / 16 * 16;
    const float* keys = reinterpret_cast<const float*>(k);
    const float* values = reinterpret_cast<const float*>(v);
    int64_t keys_stride = k_stride, values_stride = v_stride;
    if constexpr (!in_place) {
      widened_keys.resize(s.keys * s.dim);
      widened_values.resize(s.keys * s.dim);
      widen_rows(k, k_stride, s.keys, s.dim, widened_keys.data());
      widen_rows(v, v_stride, s.keys, s.dim, widened_values.data());
      keys = widened_keys.data();
      values = widened_values.data();
      keys_stride = values_stride = s.dim;
      widened_queries.resize(tile * s.dim);
    }
    zeroed(keys_t, s.dim * padded);  // k transposed: dim x keys
    transpose_words(keys, keys_stride * sizeof(float), s.keys, s.dim, reinterpret_cast<uint32_t*>(keys_t.data()),
                    padded);
    scores.resize(tile * padded);
    acc.resize(tile * s.dim);
    for (int64_t i0 = 0; i0 < s.queries; i0 += tile) {
      const int64_t m = std::min(tile, s.queries - i0);
      const float* queries = reinterpret_cast<const float*>(q + i0 * q_stride);
      int64_t queries_stride = q_stride;
      if constexpr (!in_place) {
        widen_rows(q + i0 * q_stride, q_stride, m, s.dim, widened_queries.data());
        queries = widened_queries.data();
        queries_stride = s.dim;
      }
      brgemm(m, padded, s.dim, queries_stride, padded, padded, false, queries, keys_t.data(), scores.data(), false);
      float inverse[256];
      softmax_tile(scores.data(), m, padded, s.keys, scale, nullptr, !in_place, inverse);  // bfloat16 out: coarse
      brgemm(m, s.dim, s.keys, padded, values_stride, s.dim, false, scores.data(), values, acc.data(), false);
      for (int64_t r = 0; r < m; ++r) {
        In* o = out + (i0 + r) * out_stride;
        for (int64_t d = 0; d < s.dim; ++d) store(o + d, acc[r * s.dim + d] * inverse[r]);
      }
    }
  }
};

// Our own bfloat16 products for CPUs with AVX-512 BF16 (vdpbf16ps), an alternative to oneDNN's micro-kernels,
// which ran these short products slowly with AMX hidden. Function target attributes let the file build on any x86;
// they run only where the CPU says it has the instructions.
#if defined(__x86_64__)
#define SUPERBLOCK_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

bool has_avx512_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// c (kRows x 16 kBlocks floats, row stride ldc) = sum over p of a[r][p] . b[p][...]: each a[r][p] and each 32-bit
// lane of b[p] a pair of bfloat16 (a: row stride lda bytes, any alignment; b: row stride ldb words).
template <int kRows, int kBlocks>
SUPERBLOCK_AVX512_BF16 void dot_pairs(const char* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t pairs,
                                      float* c, int64_t ldc) {
  __m512 acc[kRows][kBlocks];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kBlocks; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh columns[kBlocks];
    for (int j = 0; j < kBlocks; ++j) columns[j] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 16 * j);
    for (int r = 0; r < kRows; ++r) {
      int32_t word;
      std::memcpy(&word, a + r * lda + 4 * p, sizeof(word));
      const __m512bh pair = (__m512bh)_mm512_set1_epi32(word);
      for (int j = 0; j < kBlocks; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pair, columns[j]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kBlocks; ++j) _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
  }
}

template <int kRows>
void dot_pairs_blocks(int64_t blocks, const char* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t pairs,
                      float* c, int64_t ldc) {
  switch (blocks) {
    case 4: dot_pairs<kRows, 4>(a, lda, b, ldb, pairs, c, ldc); break;
    case 3: dot_pairs<kRows, 3>(a, lda, b, ldb, pairs, c, ldc); break;
    case 2: dot_pairs<kRows, 2>(a, lda, b, ldb, pairs, c, ldc); break;
    default: dot_pairs<kRows, 1>(a, lda, b, ldb, pairs, c, ldc); break;
  }
}

// c (m x n floats, row stride ldc) = a (m x 2 pairs bfloat16, row stride lda bytes) @ b ([pairs][n] words, row
// stride ldb words); n a multiple of 16. Blocks of 4 rows x 64 columns: 16 accumulators in registers.
void bfloat16_product(const void* a, int64_t lda, int64_t m, const uint32_t* b, int64_t ldb, int64_t pairs,
                      int64_t n, float* c, int64_t ldc) {
  const char* rows = static_cast<const char*>(a);
  for (int64_t n0 = 0; n0 < n; n0 += 64) {
    const int64_t blocks = std::min<int64_t>(4, (n - n0) / 16);
    int64_t r0 = 0;
    for (; r0 + 4 <= m; r0 += 4) {
      dot_pairs_blocks<4>(blocks, rows + r0 * lda, lda, b + n0, ldb, pairs, c + r0 * ldc + n0, ldc);
    }
    for (; r0 < m; ++r0) dot_pairs_blocks<1>(blocks, rows + r0 * lda, lda, b + n0, ldb, pairs, c + r0 * ldc + n0, ldc);
  }
}
#else
bool has_avx512_bf16() { return false; }

void bfloat16_product(const void*, int64_t, int64_t, const uint32_t*, int64_t, int64_t, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "attention_core: products 'avx512_bf16' need an x86 CPU");
}
#endif

// bfloat16 products, on oneDNN's pair-interleaved micro-kernels, on bfloat16_product above, or on our AMX tile
// kernel (amx_tiles.h; the same pair-interleaved operands), the probabilities rounded to bfloat16 in between.
enum class Bfloat16Kernel { onednn, avx512_bf16, amx };

struct Bfloat16Products {
  Bfloat16Kernel kernel = Bfloat16Kernel::onednn;
  std::vector<uint32_t> keys_t, values;  // pairs of bfloat16
  std::vector<float> scores, acc;
  std::vector<uint16_t> probabilities;

  void run(const at::BFloat16* q, int64_t q_stride, const at::BFloat16* k, int64_t k_stride, const at::BFloat16* v,
           int64_t v_stride, at::BFloat16* out, int64_t out_stride, const Heads& s, float scale, int64_t tile) {
    // Our AVX-512 kernel takes any multiple of 16 keys (its column blocks); oneDNN's and the tiles want kKeyPadding.
    const bool own_kernel = kernel == Bfloat16Kernel::avx512_bf16, tiles = kernel == Bfloat16Kernel::amx;
    const int64_t padding = own_kernel ? 16 : kKeyPadding;
    const int64_t padded = (s.keys + padding - 1) / padding * padding, pairs = s.dim / 2;
    // keys_t[p][j] = (k[j][2p], k[j][2p+1]): the [D/2][keys][2] layout of k.T.
    zeroed(keys_t, pairs * padded);
    transpose_words(k, k_stride * sizeof(at::BFloat16), s.keys, pairs, keys_t.data(), padded);
    // values[p][d] = (v[2p][d], v[2p+1][d]): the [keys/2][D][2] layout, padding keys zero.
    values.resize(padded / 2 * s.dim);
    for (int64_t p = 0; p < padded / 2; ++p) {
      const int64_t j = 2 * p;
      const uint16_t* even = j < s.keys ? reinterpret_cast<const uint16_t*>(v + j * v_stride) : nullptr;
      const uint16_t* odd = j + 1 < s.keys ? reinterpret_cast<const uint16_t*>(v + (j + 1) * v_stride) : nullptr;
      uint32_t* packed = values.data() + p * s.dim;
      if (even && odd) {
        for (int64_t d = 0; d < s.dim; ++d) packed[d] = uint32_t(even[d]) | (uint32_t(odd[d]) << 16);
      } else {
        for (int64_t d = 0; d < s.dim; ++d) packed[d] = even ? uint32_t(even[d]) : 0u;
      }
    }
    scores.resize(tile * padded);
    zeroed(probabilities, tile * padded);  // the padding columns stay zero
    acc.resize(tile * s.dim);
    const auto* keys_bf16 = reinterpret_cast<const at::BFloat16*>(keys_t.data());
    const auto* values_bf16 = reinterpret_cast<const at::BFloat16*>(values.data());
    const auto* probabilities_bf16 = reinterpret_cast<const at::BFloat16*>(probabilities.data());
    for (int64_t i0 = 0; i0 < s.queries; i0 += tile) {
      const int64_t m = std::min(tile, s.queries - i0);
      if (own_kernel) {
        bfloat16_product(q + i0 * q_stride, q_stride * 2, m, keys_t.data(), padded, pairs, padded, scores.data(), padded);
      } else if (tiles) {
        superblock::amx_product<superblock::TileProduct::bfloat16>(q + i0 * q_stride, q_stride, m, keys_t.data(),
                                                                   nullptr, 1, s.dim, padded, scores.data(), padded);
      } else {
        brgemm(m, padded, s.dim, q_stride, padded, padded, false, q + i0 * q_stride, keys_bf16, scores.data(), true);
      }
      float inverse[256];
      softmax_tile(scores.data(), m, padded, s.keys, scale, probabilities.data(), true, inverse);
      if (own_kernel) {
        bfloat16_product(probabilities.data(), padded * 2, m, values.data(), s.dim, padded / 2, s.dim, acc.data(), s.dim);
      } else if (tiles) {
        superblock::amx_product<superblock::TileProduct::bfloat16>(probabilities_bf16, padded, m, values.data(),
                                                                   nullptr, 1, padded, s.dim, acc.data(), s.dim);
      } else {
        brgemm(m, s.dim, padded, padded, s.dim, s.dim, false, probabilities_bf16, values_bf16, acc.data(), true);
      }
      for (int64_t r = 0; r < m; ++r) {
        uint16_t* o = reinterpret_cast<uint16_t*>(out + (i0 + r) * out_stride);
        for (int64_t d = 0; d < s.dim; ++d) o[d] = to_bfloat16_bits(acc[r * s.dim + d] * inverse[r]);
      }
    }
  }
};

template <typename T, typename Products>
void attention_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, const Heads& s,
                     float scale, int64_t tile, const Products& settings = Products()) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    Products item = settings;
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / s.heads, h = index % s.heads;
      item.run(qp + b * q.stride(0) + h * q.stride(1), q.stride(2), kp + b * k.stride(0) + h * k.stride(1),
               k.stride(2), vp + b * v.stride(0) + h * v.stride(1), v.stride(2),
               op + b * out.stride(0) + h * out.stride(2), out.stride(1), s, scale, tile);
    }
    at::native::cpublas::brgemm_release(std::is_same_v<Products, Bfloat16Products>);
  });
}

// q (B, H, Lq, D), k and v (B, H, Lk, D), each with unit stride along D -> out (B, Lq, H, D), contiguous.
// products, for bfloat16 inputs: "onednn" (oneDNN's bfloat16 micro-kernels), "float32" (widened while packed,
// float32 micro-kernels), "avx512_bf16" (our own kernel above) or "amx" (our tile kernel). float32 inputs always take
// float32 products.
at::Tensor attention_core(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                          int64_t query_tile, c10::string_view products) {
  TORCH_CHECK(products == "onednn" || products == "float32" || products == "avx512_bf16" || products == "amx",
              "attention_core: products must be onednn, float32, avx512_bf16 or amx, not ", products);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_core: q, k and v must be (B, H, L, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "attention_core: q, k and v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "attention_core: float32 or bfloat16 only");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3) && k.sizes() == v.sizes(),
              "attention_core: q, k and v shapes disagree");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention_core: D must be contiguous");
  TORCH_CHECK(query_tile >= 1 && query_tile <= 256, "attention_core: query_tile must be in [1, 256]");
  TORCH_CHECK(k.size(2) >= 1, "attention_core: at least one key");
  const Heads s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(q.scalar_type() == at::kFloat || s.dim % 2 == 0, "attention_core: bfloat16 needs an even head size");
  auto out = at::empty({s.batch, s.queries, s.heads, s.dim}, q.options());
  if (out.numel() == 0) return out;
  if (q.scalar_type() == at::kFloat) {
    attention_heads<float, FloatProducts<float>>(q, k, v, out, s, float(scale), query_tile);
  } else if (products == "float32") {
    attention_heads<at::BFloat16, FloatProducts<at::BFloat16>>(q, k, v, out, s, float(scale), query_tile);
  } else {
    Bfloat16Products settings;
    if (products == "avx512_bf16") {
      settings.kernel = Bfloat16Kernel::avx512_bf16;
      TORCH_CHECK(has_avx512_bf16(), "attention_core: products 'avx512_bf16' need AVX-512 BF16 (avx512_bf16), which "
                  "this CPU lacks");
      TORCH_CHECK(s.dim % 16 == 0, "attention_core: products 'avx512_bf16' need a head size that is a multiple of "
                  "16, not ", s.dim);
    } else if (products == "amx") {
      settings.kernel = Bfloat16Kernel::amx;
      TORCH_CHECK(superblock::amx_runs(), "attention_core: products 'amx' need AMX (amx_bf16), which this CPU lacks "
                  "or SUPERBLOCK_HIDE_ISA hides");
      TORCH_CHECK(s.dim % 32 == 0, "attention_core: products 'amx' need a head size that is a multiple of 32, not ",
                  s.dim);
    }
    attention_heads<at::BFloat16, Bfloat16Products>(q, k, v, out, s, float(scale), query_tile, settings);
  }
  return out;
}

// The products attention_core can take for bfloat16 inputs on this CPU.
std::vector<std::string> attention_core_products() {
  std::vector<std::string> products{"onednn", "float32"};
  if (has_avx512_bf16()) products.push_back("avx512_bf16");
  if (superblock::amx_runs()) products.push_back("amx");
  return products;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(superblock, m) {
  m.def("attention_core(Tensor q, Tensor k, Tensor v, float scale, int query_tile, str products) -> Tensor");
  m.def("attention_core_products() -> str[]", &attention_core_products);
}

TORCH_LIBRARY_IMPL(superblock, CPU, m) {
  m.impl("attention_core", &attention_core);
}

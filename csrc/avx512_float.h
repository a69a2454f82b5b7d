// Float vectors in AVX-512 registers, shared by the kernels: bfloat16 loads and stores (torch's rounding), exp, and
// the MLP activations, which run where the first Linear's outputs are written so the hidden activations are written
// once, already activated.
//
// GELU ("gelu") is not ATen's: erf(x / sqrt 2) = c Q(c^2) with c = x clamped to +-2.75 sqrt 2 and Q of degree 6 (a
// minimax fit), within 8.1e-5 max(1, |x|) of nn.GELU over [-12, 12], in 12 instructions. ATen's exp-based erf
// measured as long as all the rest of the MLP's elementwise work, and the degree-8 fit this replaced was still a
// fifth of the fused bfloat16 MLP's time. Either is far below what the bfloat16 and int8 callers keep (bfloat16
// rounds in steps of 4e-3 of the value, int8 in steps of amax / 127). float32 MLPs take "gelu_precise", the exp-based erf of
// Abramowitz & Stegun (7.1.26, within 1.5e-7). The tanh form uses exp by range reduction and a degree-7 polynomial,
// and one Newton step per reciprocal. The tests compare each with nn.GELU.
//
// Every function carries its target attribute, so the files build on any x86 CPU; callers check has_avx512() first.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <string>

#define SUPERBLOCK_AVX512_FLOAT __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

namespace superblock {

// Whether SUPERBLOCK_HIDE_ISA (comma-separated names, blocksparse_int8.py) names `isa`: the tests hide AVX-512 so
// that the portable loops run on a CPU that has it.
inline bool hidden_by_environment(const std::string& isa) {
  const char* names = std::getenv("SUPERBLOCK_HIDE_ISA");
  std::string name;
  for (const char* p = names ? names : ""; ; ++p) {
    if (*p == ',' || *p == '\0') {
      if (name == isa) return true;
      name.clear();
      if (*p == '\0') return false;
    } else if (*p != ' ') {
      name += *p;
    }
  }
}

// Whether the CPU has the AVX-512 these helpers use (read once per process).
inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          !hidden_by_environment("avx512");
  return yes;
}

// gelu_precise is GELU with erf within 1.5e-7 (float32 MLPs); "gelu" names the cheaper polynomial.
enum class Activation { identity, relu, gelu, gelu_tanh, gelu_precise };

inline Activation activation_of(const std::string& name) {
  if (name == "gelu") return Activation::gelu;
  if (name == "gelu_tanh") return Activation::gelu_tanh;
  if (name == "relu") return Activation::relu;
  return Activation::identity;
}

SUPERBLOCK_AVX512_FLOAT inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: x - n ln 2 stays exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

SUPERBLOCK_AVX512_FLOAT inline __m512 reciprocal16(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}

template <Activation act>
SUPERBLOCK_AVX512_FLOAT inline __m512 activate16(__m512 x) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.f);
  switch (act) {
    case Activation::relu:
      return _mm512_max_ps(x, _mm512_setzero_ps());
    case Activation::gelu: {  // x/2 (1 + erf(x / sqrt 2)), erf(x / sqrt 2) = c Q(c^2), c = x clamped to +-2.75 sqrt 2
      const __m512 limit = _mm512_set1_ps(3.8890873f);
      const __m512 c = _mm512_min_ps(_mm512_max_ps(x, _mm512_sub_ps(_mm512_setzero_ps(), limit)), limit);
      const __m512 c2 = _mm512_mul_ps(c, c);
      __m512 q = _mm512_set1_ps(6.522969187e-08f);
      q = _mm512_fmadd_ps(q, c2, _mm512_set1_ps(-4.192306278e-06f));
      q = _mm512_fmadd_ps(q, c2, _mm512_set1_ps(1.155143327e-04f));
      q = _mm512_fmadd_ps(q, c2, _mm512_set1_ps(-1.817003475e-03f));
      q = _mm512_fmadd_ps(q, c2, _mm512_set1_ps(1.845966466e-02f));
      q = _mm512_fmadd_ps(q, c2, _mm512_set1_ps(-1.311650872e-01f));
      q = _mm512_fmadd_ps(q, c2, _mm512_set1_ps(7.972329259e-01f));
      const __m512 half_x = _mm512_mul_ps(x, half);  // x itself, not c: NaN and the tails come through
      return _mm512_fmadd_ps(half_x, _mm512_mul_ps(c, q), half_x);
    }
    case Activation::gelu_precise: {  // x/2 (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26
      // erf |z| = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-z^2), t = 1 / (1 + p |z|): error below 1.5e-7.
      const __m512 z = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
      const __m512 t = reciprocal16(_mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), z, one));
      __m512 p = _mm512_set1_ps(1.061405429f);
      p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
      p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
      p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
      p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
      const __m512 tail = _mm512_mul_ps(_mm512_mul_ps(p, t), exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z))));
      const __m512 erf_abs = _mm512_sub_ps(one, tail);
      // erf is odd: 1 + erf(x / sqrt 2) is 1 + erf|z| for x >= 0 and 1 - erf|z| = tail for x < 0 (no cancellation).
      const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
      const __m512 one_plus_erf = _mm512_mask_blend_ps(negative, _mm512_add_ps(one, erf_abs), tail);
      return _mm512_mul_ps(_mm512_mul_ps(x, half), one_plus_erf);
    }
    case Activation::gelu_tanh: {  // x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh u = 1 - 2 / (e^2u + 1)
      const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
      const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
      const __m512 e = exp16(_mm512_add_ps(u, u));
      const __m512 tanh = _mm512_fnmadd_ps(_mm512_set1_ps(2.f), reciprocal16(_mm512_add_ps(e, one)), one);
      return _mm512_mul_ps(_mm512_mul_ps(x, half), _mm512_add_ps(one, tanh));
    }
    default:
      return x;
  }
}

// Round-to-nearest-even float -> bfloat16 bits, NaN to the quiet NaN 0x7fc0 (torch's conversion), one value: the
// portable loops' store, written without branches so the loops around it vectorize.
inline uint16_t to_bfloat16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return nan ? uint16_t(0x7fc0) : uint16_t(rounded);
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
}

SUPERBLOCK_AVX512_FLOAT inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

SUPERBLOCK_AVX512_FLOAT inline __m512 load16(const at::BFloat16* p, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Round to nearest even, as torch's float -> bfloat16 conversion: one instruction where the CPU has AVX-512 BF16
// (the build targets this CPU), which keeps a NaN's sign and payload where torch writes 0x7fc0 (a NaN all the same).
SUPERBLOCK_AVX512_FLOAT inline __m256i bfloat16_bits16(__m512 v) {
#if defined(__AVX512BF16__)
  return __m256i(_mm512_cvtneps_pbh(v));
#endif
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(rounded);
}

SUPERBLOCK_AVX512_FLOAT inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }

SUPERBLOCK_AVX512_FLOAT inline void store16(at::BFloat16* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bfloat16_bits16(v));
}

SUPERBLOCK_AVX512_FLOAT inline void store16(float* out, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(out, mask, v); }

SUPERBLOCK_AVX512_FLOAT inline void store16(at::BFloat16* out, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(out, mask, bfloat16_bits16(v));
}

// v as a tensor of dtype T holds it: rounded to bfloat16 and widened back, or itself for float.
SUPERBLOCK_AVX512_FLOAT inline __m512 as_stored(const float*, __m512 v) { return v; }

SUPERBLOCK_AVX512_FLOAT inline __m512 as_stored(const at::BFloat16*, __m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bfloat16_bits16(v)), 16));
}

}  // namespace superblock

// 16 float32 lanes ("a vector", v::f32) and their lane masks (v::mask, bit i = lane i) for lm's
// kernels, on AVX-512 (one zmm register, native masks) or on AVX2 + FMA (two ymm registers;
// masks as 16-bit integers turned into vector masks where an operation needs one). The kernels
// are written once against these names; a CPU without AVX-512 (AMD Zen, most laptops before
// 2020) runs the same code at half the width per instruction instead of falling back to XLA.
//
// Every operation is what the AVX-512 intrinsic of the same name does (e.g. maskz_loadu:
// lanes outside the mask read as 0 and are not read from memory, so a tail never faults).
// On AVX2 half the registers are left (16 ymm against 32 zmm) and each vector takes two, so
// the kernels size their register tiles by kAvx512 (see small_matmul.cc).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace v {

// e^r for |r| <= ln2 / 2 by its degree-6 Taylor polynomial (relative error < 2e-7), Horner's
// form: the part of e^x = 2^n e^r that both instruction sets share (fma(a, b, c) = a b + c).
template <typename V, typename Fma, typename Set1>
inline V exp_taylor6(V r, Fma fma, Set1 set1) {
  V p = set1(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = fma(p, r, set1(c));
  return p;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

constexpr bool kAvx512 = true;
using f32 = __m512;
using mask = __mmask16;

inline f32 setzero() { return _mm512_setzero_ps(); }
inline f32 set1(float x) { return _mm512_set1_ps(x); }
inline f32 loadu(const float* p) { return _mm512_loadu_ps(p); }
inline f32 maskz_loadu(mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline void storeu(float* p, f32 a) { _mm512_storeu_ps(p, a); }
inline void mask_storeu(float* p, mask m, f32 a) { _mm512_mask_storeu_ps(p, m, a); }
inline f32 add(f32 a, f32 b) { return _mm512_add_ps(a, b); }
inline f32 sub(f32 a, f32 b) { return _mm512_sub_ps(a, b); }
inline f32 mul(f32 a, f32 b) { return _mm512_mul_ps(a, b); }
inline f32 div(f32 a, f32 b) { return _mm512_div_ps(a, b); }
inline f32 max(f32 a, f32 b) { return _mm512_max_ps(a, b); }
inline f32 min(f32 a, f32 b) { return _mm512_min_ps(a, b); }
inline f32 fmadd(f32 a, f32 b, f32 c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
inline f32 fnmadd(f32 a, f32 b, f32 c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
inline float reduce_add(f32 a) { return _mm512_reduce_add_ps(a); }
inline float reduce_max(f32 a) { return _mm512_reduce_max_ps(a); }
inline f32 mask_blend(mask m, f32 a, f32 b) { return _mm512_mask_blend_ps(m, a, b); }
inline f32 maskz_mov(mask m, f32 a) { return _mm512_maskz_mov_ps(m, a); }
inline f32 maskz_mul(mask m, f32 a, f32 b) { return _mm512_maskz_mul_ps(m, a, b); }
inline f32 mask_max(f32 src, mask m, f32 a, f32 b) { return _mm512_mask_max_ps(src, m, a, b); }
inline f32 mask_add(f32 src, mask m, f32 a, f32 b) { return _mm512_mask_add_ps(src, m, a, b); }
inline mask positive(f32 a) { return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ); }

// bfloat16 is the top half of a float32: widen to 32 bits and shift left by 16.
inline f32 load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline f32 maskz_load_bf16(mask m, const uint16_t* p) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The lanes of m whose byte p[i] is nonzero (bytes outside m are not read).
inline mask nonzero16(const uint8_t* p, mask m) {
  const __m128i b = _mm_maskz_loadu_epi8(m, p);
  return _mm_test_epi8_mask(b, b);
}
inline uint64_t nonzero64(const uint8_t* p, uint64_t m) {
  const __m512i b = _mm512_maskz_loadu_epi8(m, p);
  return _mm512_test_epi8_mask(b, b);
}

// e^x: x = n ln2 + r, |r| <= ln2 / 2, e^r by exp_taylor6, times 2^n by vscalefps. Inputs
// below -87.3 give 0 (a masked key).
inline f32 exp(f32 x) {
  const mask live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 p = exp_taylor6(
      r, [](__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); },
      [](float c) { return _mm512_set1_ps(c); });
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// The 16 sums of a[0..15] as the lanes of one vector, lane i = sum of a[i]'s lanes: pairs of
// vectors interleaved and added, then 64-bit halves, then 128-bit quarters (45 instructions
// where 16 separate reductions take ~160).
inline f32 sum16x16(const f32 (&a)[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
    c[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  for (int i = 0; i < 2; ++i) {
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr bool kAvx512 = false;
struct f32 {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
using mask = uint16_t;
constexpr mask kAll = 0xFFFF;

// Lanes [8 h, 8 h + 8) of m as a vector mask (all ones where set).
inline __m256i half_mask(mask m, int h) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_set1_epi32((m >> (8 * h)) & 0xFF);
  return _mm256_cmpeq_epi32(_mm256_and_si256(b, bit), bit);
}
inline __m256 half_maskf(mask m, int h) { return _mm256_castsi256_ps(half_mask(m, h)); }

inline f32 setzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline f32 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline f32 loadu(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline f32 maskz_loadu(mask m, const float* p) {
  if (m == kAll) return loadu(p);
  return {_mm256_maskload_ps(p, half_mask(m, 0)), _mm256_maskload_ps(p + 8, half_mask(m, 1))};
}
inline void storeu(float* p, f32 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline void mask_storeu(float* p, mask m, f32 a) {
  if (m == kAll) return storeu(p, a);
  // A masked store is slow on AMD (microcoded): whole halves plainly, the ragged one masked.
  if ((m & 0xFF) == 0xFF) {
    _mm256_storeu_ps(p, a.lo);
  } else if (m & 0xFF) {
    _mm256_maskstore_ps(p, half_mask(m, 0), a.lo);
  }
  if ((m >> 8) == 0xFF) {
    _mm256_storeu_ps(p + 8, a.hi);
  } else if (m >> 8) {
    _mm256_maskstore_ps(p + 8, half_mask(m, 1), a.hi);
  }
}
inline f32 add(f32 a, f32 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline f32 sub(f32 a, f32 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline f32 mul(f32 a, f32 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline f32 div(f32 a, f32 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline f32 max(f32 a, f32 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline f32 min(f32 a, f32 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline f32 fmadd(f32 a, f32 b, f32 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline f32 fnmadd(f32 a, f32 b, f32 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline float reduce8(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_add(f32 a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  return reduce8(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}
inline float reduce_max(f32 a) {
  const __m256 s = _mm256_max_ps(a.lo, a.hi);
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  t = _mm_max_ss(t, _mm_movehdup_ps(t));
  return _mm_cvtss_f32(t);
}
inline f32 mask_blend(mask m, f32 a, f32 b) {
  return {_mm256_blendv_ps(a.lo, b.lo, half_maskf(m, 0)),
          _mm256_blendv_ps(a.hi, b.hi, half_maskf(m, 1))};
}
inline f32 maskz_mov(mask m, f32 a) {
  return {_mm256_and_ps(a.lo, half_maskf(m, 0)), _mm256_and_ps(a.hi, half_maskf(m, 1))};
}
inline f32 maskz_mul(mask m, f32 a, f32 b) { return maskz_mov(m, mul(a, b)); }
inline f32 mask_max(f32 src, mask m, f32 a, f32 b) { return mask_blend(m, src, max(a, b)); }
inline f32 mask_add(f32 src, mask m, f32 a, f32 b) { return mask_blend(m, src, add(a, b)); }
inline mask positive(f32 a) {
  const __m256 z = _mm256_setzero_ps();
  return static_cast<mask>(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, z, _CMP_GT_OQ)) |
                           (_mm256_movemask_ps(_mm256_cmp_ps(a.hi, z, _CMP_GT_OQ)) << 8));
}

inline __m256 widen_bf16(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline f32 load_bf16(const uint16_t* p) {
  return {widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline f32 maskz_load_bf16(mask m, const uint16_t* p) {
  if (m == kAll) return load_bf16(p);
  alignas(32) uint16_t buf[16] = {};  // AVX2 has no 16-bit masked load: the lanes one by one
  for (int i = 0; i < 16; ++i) {
    if (m >> i & 1) buf[i] = p[i];
  }
  return load_bf16(buf);
}

inline mask nonzero16(const uint8_t* p, mask m) {
  __m128i b;
  if (m == kAll) {
    b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint8_t buf[16] = {};
    for (int i = 0; i < 16; ++i) {
      if (m >> i & 1) buf[i] = p[i];
    }
    b = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  }
  const int zero = _mm_movemask_epi8(_mm_cmpeq_epi8(b, _mm_setzero_si128()));
  return static_cast<mask>(~zero & m);
}
inline uint64_t nonzero64(const uint8_t* p, uint64_t m) {
  alignas(32) uint8_t buf[64] = {};
  const uint8_t* src = p;
  if (m != ~0ull) {
    for (int i = 0; i < 64; ++i) {
      if (m >> i & 1) buf[i] = p[i];
    }
    src = buf;
  }
  const __m256i z = _mm256_setzero_si256();
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
  const uint64_t za = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(a, z)));
  const uint64_t zb = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(b, z)));
  return ~(za | zb << 32) & m;
}

// e^x as the AVX-512 form, with 2^n built in the exponent bits: n in [-126, 128], as two
// factors 2^(n/2) 2^(n - n/2) so that n = 128 (x up to ln of float32's largest) stays finite.
inline __m256 exp8(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.72f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 p = exp_taylor6(
      r, [](__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); },
      [](float c) { return _mm256_set1_ps(c); });
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_and_ps(_mm256_mul_ps(_mm256_mul_ps(p, s1), s2), live);
}
inline f32 exp(f32 x) { return {exp8(x.lo), exp8(x.hi)}; }

inline f32 sum16x16(const f32 (&a)[16]) {
  alignas(32) float s[16];
  for (int i = 0; i < 16; ++i) s[i] = reduce_add(a[i]);
  return loadu(s);
}

#else
#error "lm's kernels need AVX-512 (F, BW, VL) or AVX2 with FMA; lm falls back to XLA without them"
#endif

}  // namespace v

/* Portable 8-wide float vectors (GCC/Clang vector extensions) and the helpers every kernel
 * shares. Built with -march=native, so they become AVX2/AVX-512/NEON instructions as the
 * machine allows; the loads tolerate any alignment. */
#ifndef NPUSERVE_VEC_H
#define NPUSERVE_VEC_H

#include <math.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));
typedef int8_t v8b __attribute__((vector_size(8), aligned(1)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE v8f vsplat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

ALWAYS_INLINE v8f vload(const float *p) { return *(const v8f *)p; }

/* Eight int8 widened to float32. GCC scalarises the generic conversion, so x86 says it. */
ALWAYS_INLINE v8f vload_i8(const int8_t *p) {
#ifdef __AVX2__
    return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    return __builtin_convertvector(__builtin_convertvector(*(const v8b *)p, v8i), v8f);
#endif
}

ALWAYS_INLINE void vstore(float *p, v8f v) { *(v8f *)p = v; }

/* a * b + c, rounded once where the CPU has FMA. Said explicitly for code built without
 * contraction (attention.c), which fuses where it writes this and nowhere else. */
ALWAYS_INLINE v8f vfma(v8f a, v8f b, v8f c) {
#ifdef __FMA__
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* bfloat16 is the upper half of a float32: widening it is a 16-bit shift, exact. */
typedef uint16_t v8h __attribute__((vector_size(16), aligned(2)));
typedef uint32_t v8u __attribute__((vector_size(32)));

ALWAYS_INLINE float bf16_float(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even (NaN stays NaN). */
ALWAYS_INLINE uint16_t float_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Eight bfloat16 widened to float32. x86 says it: GCC 12 splits the generic conversion into
 * two halves and a lane insert (five instructions where two do). */
ALWAYS_INLINE v8f vload_bf16(const uint16_t *p) {
#ifdef __AVX2__
    return (v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    return (v8f)(__builtin_convertvector(*(const v8h *)p, v8u) << 16);
#endif
}

/* Eight float32 (BF 0) or bfloat16 (BF 1, widened) at element c of p; BF is a constant after
 * inlining. */
ALWAYS_INLINE v8f vload_any(const void *p, int64_t c, int BF) {
    return BF ? vload_bf16((const uint16_t *)p + c) : vload((const float *)p + c);
}

ALWAYS_INLINE float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* {hsum(a[0]), ..., hsum(a[7])}, each summed in hsum's order (so bit for bit the same):
 * fifteen instructions on AVX for eight sums, where eight hsum take about forty. */
ALWAYS_INLINE v8f hsum8(const v8f a[8]) {
#ifdef __AVX2__
    __m256 half[4]; /* [lo + hi of a[u] | lo + hi of a[u + 4]] */
    for (int u = 0; u < 4; u++)
        half[u] = _mm256_add_ps(_mm256_permute2f128_ps((__m256)a[u], (__m256)a[u + 4], 0x20),
                                _mm256_permute2f128_ps((__m256)a[u], (__m256)a[u + 4], 0x31));
    return (v8f)_mm256_hadd_ps(_mm256_hadd_ps(half[0], half[1]), _mm256_hadd_ps(half[2], half[3]));
#else
    v8f r;
    for (int u = 0; u < 8; u++) r[u] = hsum(a[u]);
    return r;
#endif
}

/* mask ? a : b per lane, mask from a vector comparison (all ones or all zeros). */
ALWAYS_INLINE v8f vselect(v8i mask, v8f a, v8f b) {
    return (v8f)(((v8i)a & mask) | ((v8i)b & ~mask));
}

/* The largest of sc[0 .. len), eight lanes at a time (a scalar loop is a chain of compares,
 * three cycles a token). Exact: the order of a max does not matter. */
ALWAYS_INLINE float row_max(const float *sc, int64_t len) {
    v8f m = vsplat(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) {
        const v8f x = vload(sc + t);
        m = vselect(x > m, x, m);
    }
    float max = -INFINITY;
    for (int u = 0; u < 8; u++) max = m[u] > max ? m[u] : max;
    for (; t < len; t++) max = sc[t] > max ? sc[t] : max;
    return max;
}

/* exp(x) to about 1 ulp (Cephes' expf): x = n ln2 + r, exp(r) by a degree-5 polynomial,
 * 2^n through the exponent bits. Inputs below -87.3 give 0, as expf does. */
ALWAYS_INLINE v8f vexp(v8f x) {
    const v8f hi = vsplat(88.3762626647949f), lo = vsplat(-87.3365447504f);
    x = vselect(x > hi, hi, x);
    v8i under = x < lo;
    v8f fx = x * vsplat(1.44269504088896341f) + vsplat(0.5f);
    v8i n = __builtin_convertvector(fx, v8i);
    v8f nf = __builtin_convertvector(n, v8f);
    nf = vselect(nf > fx, nf - vsplat(1.0f), nf); /* floor */
    n = __builtin_convertvector(nf, v8i);
    x = x - nf * vsplat(0.693359375f) - nf * vsplat(-2.12194440e-4f);
    v8f y = vsplat(1.9875691500e-4f);
    y = y * x + vsplat(1.3981999507e-3f);
    y = y * x + vsplat(8.3334519073e-3f);
    y = y * x + vsplat(4.1665795894e-2f);
    y = y * x + vsplat(1.6666665459e-1f);
    y = y * x + vsplat(5.0000001201e-1f);
    y = y * x * x + x + vsplat(1.0f);
    v8i bits = (n + 127) << 23;
    return vselect(under, vsplat(0.0f), y * (v8f)bits);
}

#endif

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

/* mask ? a : b per lane for any width (VF floats, VI their integer lanes), mask from a vector
 * comparison (all ones or all zeros). */
#define VSELECT(VF, VI, mask, a, b) ((VF)(((VI)(a) & (mask)) | ((VI)(b) & ~(mask))))

ALWAYS_INLINE v8f vselect(v8i mask, v8f a, v8f b) { return VSELECT(v8f, v8i, mask, a, b); }

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
 * 2^n through the exponent bits. Inputs below -87.3 give 0, as expf does. NAME takes and
 * returns VF, VI being the integer vector of as many lanes. */
#define DEFINE_VEXP(NAME, VF, VI)                                                              \
    ALWAYS_INLINE VF NAME(VF x) {                                                              \
        const VF zero = (VF){0}, hi = zero + 88.3762626647949f, lo = zero - 87.3365447504f;    \
        x = VSELECT(VF, VI, x > hi, hi, x);                                                    \
        const VI under = x < lo;                                                               \
        const VF fx = x * (zero + 1.44269504088896341f) + (zero + 0.5f);                       \
        VI n = __builtin_convertvector(fx, VI);                                                \
        VF nf = __builtin_convertvector(n, VF);                                                \
        nf = VSELECT(VF, VI, nf > fx, nf - (zero + 1.0f), nf); /* floor */                     \
        n = __builtin_convertvector(nf, VI);                                                   \
        x = x - nf * (zero + 0.693359375f) - nf * (zero - 2.12194440e-4f);                     \
        VF y = zero + 1.9875691500e-4f;                                                        \
        y = y * x + (zero + 1.3981999507e-3f);                                                 \
        y = y * x + (zero + 8.3334519073e-3f);                                                 \
        y = y * x + (zero + 4.1665795894e-2f);                                                 \
        y = y * x + (zero + 1.6666665459e-1f);                                                 \
        y = y * x + (zero + 5.0000001201e-1f);                                                 \
        y = y * x * x + x + (zero + 1.0f);                                                     \
        const VI bits = (n + 127) << 23;                                                       \
        return VSELECT(VF, VI, under, zero, y * (VF)bits);                                     \
    }
DEFINE_VEXP(vexp, v8f, v8i)
#ifdef __AVX512F__
typedef float v16f __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));
DEFINE_VEXP(vexp16, v16f, v16i)
#endif

#ifdef __AVX512F__
/* out[q][r] = the sum of acc[q][r]'s sixteen lanes, for a whole 4 x 4 tile at once (the
 * projections' tiles in linear.c, decode attention's scores in attention.c), columns r from R
 * on taken as zero: the sixteen vectors halve into each other in four rounds of shuffles and
 * adds (about 45 instructions where sixteen separate reductions take some 130, a seventh of a
 * 4 x 4 tile's pass over 576 columns): SmolLM2's layers in float32 at 16 / 32 / 64 rows took
 * 25.9-27.2 / 33.8-34.2 / 54.4-54.7 ms against 27.8-27.9 / 36.8-37.1 / 60.6-61.0 on a Xeon. A
 * tile's last pass of one to three rows reduces through it too, its missing rows zero: with a
 * separate sum per product there, a call of 7 / 11 / 15 rows (a pass of three last) took
 * 26.0-26.2 / 27.6-30.8 / 35.0-36.6 ms over those layers on a Zen 4, more than 8 / 12 / 16
 * rows, against 16.6-17.6 / 22.3-23.9 / 25.6-28.7 after; and a row's sums no longer depend on
 * which pass it falls in, so a decode's output is the same whatever shares its step. */
ALWAYS_INLINE void reduce_4x4(const __m512 acc[4][4], int R, float out[4][4]) {
    __m512 a[8], b[4], c[2];
    const __m512 zero = _mm512_setzero_ps();
    for (int i = 0; i < 8; i++) { /* v = 4q + r; a[i]: 8 partial sums of v 2i, then of 2i + 1 */
        const __m512 lo = (2 * i) % 4 < R ? acc[(2 * i) / 4][(2 * i) % 4] : zero;
        const __m512 hi = (2 * i + 1) % 4 < R ? acc[(2 * i + 1) / 4][(2 * i + 1) % 4] : zero;
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, 0x44), _mm512_shuffle_f32x4(lo, hi, 0xEE));
    }
    for (int i = 0; i < 4; i++) /* b[i]: 4 partial sums of each of v 4i .. 4i + 3 */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) /* c[i], 128-bit lane l: 2 each of v 8i + l, then 8i + 4 + l */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    /* element 4l + e: the sum of v = 4e + l, that is out[e][l] */
    float sums[16];
    _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88),
                                         _mm512_shuffle_ps(c[0], c[1], 0xDD)));
    for (int q = 0; q < 4; q++)
        for (int r = 0; r < 4; r++) out[q][r] = sums[4 * r + q];
}
#endif

#endif

/* The AMX tile path of the bfloat16 and int8 projections (amx.c), internal to the library. */
#ifndef NPUSERVE_AMX_H
#define NPUSERVE_AMX_H

#include <stdint.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) &&              \
    defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__x86_64__) && defined(__linux__)
#define NPUSERVE_AMX 1
#endif

#define HIDDEN __attribute__((visibility("hidden")))

/* 1 where this build has the tile path and the OS lets the process use the tiles. */
HIDDEN int amx_ready(void);

/* Bytes of scratch amx_linear_bf16 and amx_linear_i8 take for m rows of k columns. */
HIDDEN int64_t amx_workspace(int64_t m, int64_t k);

/* y [m, n] = x [m, k] W^T (+ bias) with W bfloat16 [n, k] and k a multiple of 32; x float32
 * (rounded to bfloat16) or bfloat16, bias and y float32 or bfloat16 as the flags say. */
HIDDEN void amx_linear_bf16(const void *x, int x_f32, int64_t m, int64_t k, const uint16_t *w,
                            int64_t n, const void *bias, int bias_bf16, void *y, int y_bf16,
                            void *work);

/* y [m, n] = (x W^T) (+ bias) with x rounded to int16 (xq, and xscale per row), W int8 [n, k]
 * with float32 scales [n, k / group]; k and group multiples of 64. */
HIDDEN void amx_linear_i8(const int16_t *xq, const float *xscale, int64_t m, int64_t k,
                          const int8_t *w, const float *scale, int64_t group, int64_t n,
                          const float *bias, float *y, void *work);

#endif

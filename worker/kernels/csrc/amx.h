/* The AMX tile path of the bfloat16 projections (amx.c), internal to the library. */
#ifndef NPUSERVE_AMX_H
#define NPUSERVE_AMX_H

#include <stdint.h>

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__) &&           \
    defined(__x86_64__) && defined(__linux__)
#define NPUSERVE_AMX 1
#endif

#define HIDDEN __attribute__((visibility("hidden")))

/* 1 where this build has the tile path and the OS lets the process use the tiles. */
HIDDEN int amx_bf16_ready(void);

/* Bytes of scratch amx_linear_bf16 takes for m rows of k columns (k a multiple of 32). */
HIDDEN int64_t amx_workspace(int64_t m, int64_t k);

/* y [m, n] = x [m, k] W^T (+ bias) with W bfloat16 [n, k] and k a multiple of 32; x float32
 * (rounded to bfloat16) or bfloat16, bias and y float32 or bfloat16 as the flags say. */
HIDDEN void amx_linear_bf16(const void *x, int x_f32, int64_t m, int64_t k, const uint16_t *w,
                            int64_t n, const void *bias, int bias_bf16, void *y, int y_bf16,
                            void *work);

#endif

/* y = x W^T (+ b) for a few rows of x: the decode-time projection, bound by reading W.
 *
 * W is [n, k] row-major, float32 or int8 with float32 scales per output channel and group of
 * `group` columns. Each thread takes a contiguous range of W's rows and reads every weight
 * once for up to two rows of x (x stays in L1/L2), four weight rows at a time so four
 * streams of reads and their FMA chains overlap. int8 weights are widened to float32 in
 * registers: the activations keep their float32 precision and only a quarter of the bytes
 * leave memory. */
#include <stddef.h>
#include <stdint.h>

#include "vec.h"

#define WR 4 /* weight rows per tile: four interleaved streams keep more reads in flight */
#define XR 2 /* rows of x per pass over a tile (WR * XR accumulators fit the registers) */

/* Weight row pointers of the tile starting at row j; rows past n repeat the last real one
 * (computed, never stored). */
ALWAYS_INLINE void tile_rows(const char *w, int64_t row_bytes, int64_t j, int64_t n,
                             const char *rows[WR]) {
    for (int q = 0; q < WR; q++) rows[q] = w + (j + q < n ? j + q : n - 1) * row_bytes;
}

/* Dot products of the tile's weight rows with R rows of x over columns [c0, c1), added into
 * acc. `INT8` selects the weight type at compile time after inlining. */
ALWAYS_INLINE void tile(const char *const rows[WR], const float *const *xs, int R, int64_t c0,
                        int64_t c1, int INT8, v8f acc[WR][XR]) {
    for (int64_t c = c0; c < c1; c += 8) {
        v8f wv[WR];
        for (int q = 0; q < WR; q++)
            wv[q] = INT8 ? vload_i8((const int8_t *)rows[q] + c) : vload((const float *)rows[q] + c);
        for (int r = 0; r < R; r++) {
            v8f xv = vload(xs[r] + c);
            for (int q = 0; q < WR; q++) acc[q][r] += wv[q] * xv;
        }
    }
}

ALWAYS_INLINE void tile_f32(const float *x, int64_t k, const float *w, int64_t j, int64_t n,
                            int64_t i, int R, float out[WR][XR]) {
    const float *xs[XR];
    for (int r = 0; r < R; r++) xs[r] = x + (i + r) * k;
    const char *rows[WR];
    tile_rows((const char *)w, k * (int64_t)sizeof(float), j, n, rows);
    v8f acc[WR][XR] = {{{0}}};
    int64_t k8 = k & ~(int64_t)7;
    tile(rows, xs, R, 0, k8, 0, acc);
    for (int q = 0; q < WR; q++) {
        const float *wq = (const float *)rows[q];
        for (int r = 0; r < R; r++) {
            out[q][r] = hsum(acc[q][r]);
            for (int64_t c = k8; c < k; c++) out[q][r] += wq[c] * xs[r][c];
        }
    }
}

/* int8: k and group are multiples of 8 (checked by the caller). */
ALWAYS_INLINE void tile_i8(const float *x, int64_t k, const int8_t *w, const float *scale,
                           int64_t group, int64_t j, int64_t n, int64_t i, int R,
                           float out[WR][XR]) {
    const float *xs[XR];
    for (int r = 0; r < R; r++) xs[r] = x + (i + r) * k;
    const char *rows[WR];
    tile_rows((const char *)w, k, j, n, rows);
    int64_t groups = k / group;
    v8f total[WR][XR] = {{{0}}};
    for (int64_t g = 0; g < groups; g++) {
        v8f acc[WR][XR] = {{{0}}};
        tile(rows, xs, R, g * group, (g + 1) * group, 1, acc);
        for (int q = 0; q < WR; q++) {
            v8f s = vsplat(scale[(j + q < n ? j + q : n - 1) * groups + g]);
            for (int r = 0; r < R; r++) total[q][r] += acc[q][r] * s;
        }
    }
    for (int q = 0; q < WR; q++)
        for (int r = 0; r < R; r++) out[q][r] = hsum(total[q][r]);
}

ALWAYS_INLINE void store(float out[WR][XR], int R, int64_t i, int64_t j, int64_t n,
                         const float *bias, float *y) {
    for (int q = 0; q < WR && j + q < n; q++)
        for (int r = 0; r < R; r++) y[(i + r) * n + j + q] = out[q][r] + (bias ? bias[j + q] : 0.0f);
}

/* x: [m, k]; w: [n, k]; bias: [n] or NULL; y: [m, n]. */
void npu_linear_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n,
                    const float *bias, float *y) {
#pragma omp parallel for schedule(static) if (n * k > 65536)
    for (int64_t jt = 0; jt < (n + WR - 1) / WR; jt++) {
        int64_t j = jt * WR;
        for (int64_t i = 0; i < m; i += XR) {
            float out[WR][XR];
            if (m - i == 1) tile_f32(x, k, w, j, n, i, 1, out);
            else tile_f32(x, k, w, j, n, i, XR, out);
            store(out, m - i == 1 ? 1 : XR, i, j, n, bias, y);
        }
    }
}

/* As npu_linear_f32 with int8 w and scale [n, k / group]. */
void npu_linear_i8(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale,
                   int64_t group, int64_t n, const float *bias, float *y) {
#pragma omp parallel for schedule(static) if (n * k > 65536)
    for (int64_t jt = 0; jt < (n + WR - 1) / WR; jt++) {
        int64_t j = jt * WR;
        for (int64_t i = 0; i < m; i += XR) {
            float out[WR][XR];
            if (m - i == 1) tile_i8(x, k, w, scale, group, j, n, i, 1, out);
            else tile_i8(x, k, w, scale, group, j, n, i, XR, out);
            store(out, m - i == 1 ? 1 : XR, i, j, n, bias, y);
        }
    }
}

/* y = x W^T (+ b) for a few rows of x: the decode-time projection, bound by reading W.
 *
 * W is [n, k] row-major, float32 or int8 with float32 scales per output channel and group of
 * `group` columns. Each thread takes a contiguous range of W's rows and reads every weight
 * from memory once, a small tile of rows at a time, and multiplies it with every row of x
 * (x stays in L1/L2) before moving on. int8 weights are widened to float32 in
 * registers: the activations keep their float32 precision and only a quarter of the bytes
 * leave memory. */
#include <stddef.h>
#include <stdint.h>

#include "vec.h"

#define MAX_WR 4
#define MAX_XR 4

/* Weight row pointers of the tile starting at row j; rows past n repeat the last real one
 * (computed, never stored). */
ALWAYS_INLINE void tile_rows(const char *w, int64_t row_bytes, int64_t j, int64_t n, int WR,
                             const char *rows[MAX_WR]) {
    for (int q = 0; q < WR; q++) rows[q] = w + (j + q < n ? j + q : n - 1) * row_bytes;
}

/* Dot products of the tile's WR weight rows with R rows of x over columns [c0, c1), added
 * into acc. WR, R and INT8 are constants after inlining, so acc stays in registers. */
ALWAYS_INLINE void tile(const char *const rows[MAX_WR], int WR, const float *const *xs, int R,
                        int64_t c0, int64_t c1, int INT8, v8f acc[MAX_WR][MAX_XR]) {
    for (int64_t c = c0; c < c1; c += 8) {
        v8f wv[MAX_WR];
        for (int q = 0; q < WR; q++)
            wv[q] = INT8 ? vload_i8((const int8_t *)rows[q] + c) : vload((const float *)rows[q] + c);
        for (int r = 0; r < R; r++) {
            v8f xv = vload(xs[r] + c);
            for (int q = 0; q < WR; q++) acc[q][r] += wv[q] * xv;
        }
    }
}

ALWAYS_INLINE void tile_f32(const float *x, int64_t k, const float *w, int64_t j, int64_t n,
                            int WR, int64_t i, int R, float out[MAX_WR][MAX_XR]) {
    const float *xs[MAX_XR];
    for (int r = 0; r < R; r++) xs[r] = x + (i + r) * k;
    const char *rows[MAX_WR];
    tile_rows((const char *)w, k * (int64_t)sizeof(float), j, n, WR, rows);
    v8f acc[MAX_WR][MAX_XR];
    for (int q = 0; q < WR; q++)
        for (int r = 0; r < R; r++) acc[q][r] = vsplat(0.0f);
    int64_t k8 = k & ~(int64_t)7;
    tile(rows, WR, xs, R, 0, k8, 0, acc);
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
                           int64_t group, int64_t j, int64_t n, int WR, int64_t i, int R,
                           float out[MAX_WR][MAX_XR]) {
    const float *xs[MAX_XR];
    for (int r = 0; r < R; r++) xs[r] = x + (i + r) * k;
    const char *rows[MAX_WR];
    tile_rows((const char *)w, k, j, n, WR, rows);
    int64_t groups = k / group;
    v8f total[MAX_WR][MAX_XR];
    for (int q = 0; q < WR; q++)
        for (int r = 0; r < R; r++) total[q][r] = vsplat(0.0f);
    for (int64_t g = 0; g < groups; g++) {
        v8f acc[MAX_WR][MAX_XR];
        for (int q = 0; q < WR; q++)
            for (int r = 0; r < R; r++) acc[q][r] = vsplat(0.0f);
        tile(rows, WR, xs, R, g * group, (g + 1) * group, 1, acc);
        for (int q = 0; q < WR; q++) {
            v8f s = vsplat(scale[(j + q < n ? j + q : n - 1) * groups + g]);
            for (int r = 0; r < R; r++) total[q][r] += acc[q][r] * s;
        }
    }
    for (int q = 0; q < WR; q++)
        for (int r = 0; r < R; r++) out[q][r] = hsum(total[q][r]);
}

ALWAYS_INLINE void store(float out[MAX_WR][MAX_XR], int WR, int R, int64_t i, int64_t j,
                         int64_t n, const float *bias, float *y) {
    for (int q = 0; q < WR && j + q < n; q++)
        for (int r = 0; r < R; r++) y[(i + r) * n + j + q] = out[q][r] + (bias ? bias[j + q] : 0.0f);
}

/* One x row: four weight rows per tile, so four streams of reads overlap. Several rows:
 * three weight rows by four x rows per pass (twelve accumulators and three weight vectors
 * fill the sixteen AVX2 registers), the tile's weights re-read from L1 for each pass. */
#define FOR_TILES(WR, TILE)                                                                    \
    _Pragma("omp parallel for schedule(static) if (n * k > 65536)")                           \
    for (int64_t jt = 0; jt < (n + WR - 1) / WR; jt++) {                                       \
        int64_t j = jt * WR;                                                                   \
        for (int64_t i = 0; i < m; i += MAX_XR) {                                              \
            float out[MAX_WR][MAX_XR];                                                         \
            int R = m - i < MAX_XR ? (int)(m - i) : MAX_XR;                                    \
            switch (R) {                                                                       \
            case 1: TILE(WR, 1); break;                                                        \
            case 2: TILE(WR, 2); break;                                                        \
            case 3: TILE(WR, 3); break;                                                        \
            default: TILE(WR, 4); break;                                                       \
            }                                                                                  \
            store(out, WR, R, i, j, n, bias, y);                                               \
        }                                                                                      \
    }

/* x: [m, k]; w: [n, k]; bias: [n] or NULL; y: [m, n]. */
void npu_linear_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n,
                    const float *bias, float *y) {
#define TILE_F32(WR_, R_) tile_f32(x, k, w, j, n, WR_, i, R_, out)
    if (m == 1) {
        FOR_TILES(4, TILE_F32)
    } else {
        FOR_TILES(3, TILE_F32)
    }
#undef TILE_F32
}

/* As npu_linear_f32 with int8 w and scale [n, k / group]. */
void npu_linear_i8(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale,
                   int64_t group, int64_t n, const float *bias, float *y) {
#define TILE_I8(WR_, R_) tile_i8(x, k, w, scale, group, j, n, WR_, i, R_, out)
    if (m == 1) {
        FOR_TILES(4, TILE_I8)
    } else {
        FOR_TILES(3, TILE_I8)
    }
#undef TILE_I8
}

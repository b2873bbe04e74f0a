/* bfloat16 projections on AMX tiles: y = x W^T for two or more rows of x, with W bfloat16
 * [n, k] row-major as the checkpoint stores it (no repacked copy) and x bfloat16 or float32.
 *
 * A tile multiply (tdpbf16ps) takes A [16 rows, 32 bfloat16] and B [16 pairs of k, 16
 * columns of 2 bfloat16] into a float32 C [16, 16]. W's rows are A directly: sixteen rows of
 * 32 columns at W's row stride. x is B: each call packs its rows, sixteen at a time, into
 * that pair-interleaved layout in the caller's scratch (a 16 x 16 transpose of bfloat16
 * pairs per 32 columns; float32 x is rounded to bfloat16 on the way, as AVX512-BF16's path
 * rounds it). So each tile computes C^T = W_block x_block^T, and the store transposes it.
 *
 * One tile multiply does 8192 products, where vdpbf16ps does 32: the kernel stays bound by
 * reading W at far more rows than the vector path, which is arithmetic-bound from about 8.
 * Each thread takes contiguous blocks of 32 rows of W (two A tiles) and runs every block of
 * 32 rows of x (two B tiles) past them, so W is read from memory once; four C tiles
 * accumulate the 2 x 2 products.
 *
 * Linux hands out the tile registers' state only to a process that asks for it
 * (arch_prctl ARCH_REQ_XCOMP_PERM), once; where the kernel refuses, or the CPU lacks AMX,
 * amx_bf16_ready() is 0 and callers keep the vector path. */
#include <stdint.h>
#include <string.h>

#include "amx.h"
#include "vec.h"

#ifdef NPUSERVE_AMX
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#define TILE_K 32     /* bfloat16 columns of k per tile multiply */
#define TILE_ROWS 16  /* rows of an A or C tile, pairs of k of a B tile */
#define TILE_BYTES 64 /* bytes per tile row */

int amx_bf16_ready(void) {
    static int ready = -1; /* -1: not asked yet; the question is idempotent, races harmless */
    int r = __atomic_load_n(&ready, __ATOMIC_RELAXED);
    if (r < 0) {
        r = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
        __atomic_store_n(&ready, r, __ATOMIC_RELAXED);
    }
    return r;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* Tiles 0-3: C for (W block a, x block b) at 2a + b; 4-5: W blocks of wr[0] and wr[1] rows;
 * 6-7: x blocks of xr[0] and xr[1] rows (a block not used is configured at 16). */
static void configure(const int wr[2], const int xr[2]) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int a = 0; a < 2; a++) {
        for (int b = 0; b < 2; b++) {
            c.rows[2 * a + b] = (uint8_t)wr[a];
            c.colsb[2 * a + b] = (uint16_t)(xr[b] * 4);
        }
        c.rows[4 + a] = (uint8_t)wr[a];
        c.colsb[4 + a] = TILE_BYTES;
        c.rows[6 + a] = TILE_ROWS;
        c.colsb[6 + a] = (uint16_t)(xr[a] * 4);
    }
    _tile_loadconfig(&c);
}

/* out[j] = column j of the 16 x 16 32-bit matrix whose rows are in[0..15]. */
static inline void transpose16(__m512i v[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        v[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        v[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

/* The B tiles of x: block b (rows 16b..16b+15) and step s (columns 32s..32s+31) at
 * xp + (b * steps + s) * 512, row r holding pair r of every x row in turn. Rows past m are
 * zeros. */
static void pack_x(const void *x, int x_f32, int64_t m, int64_t k, uint16_t *xp) {
    const int64_t steps = k / TILE_K, blocks = (m + 15) / 16;
#pragma omp parallel for schedule(static) if (m * k > 65536)
    for (int64_t t = 0; t < blocks * steps; t++) {
        const int64_t b = t / steps, s = t % steps;
        __m512i v[16];
        for (int r = 0; r < 16; r++) {
            const int64_t row = b * 16 + r;
            if (row >= m) {
                v[r] = _mm512_setzero_si512();
            } else if (x_f32) {
                const float *p = (const float *)x + row * k + s * TILE_K;
                v[r] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
            } else {
                v[r] = _mm512_loadu_si512((const uint16_t *)x + row * k + s * TILE_K);
            }
        }
        transpose16(v);
        uint16_t *tile = xp + t * (TILE_ROWS * TILE_K);
        for (int r = 0; r < 16; r++) _mm512_storeu_si512(tile + r * TILE_K, v[r]);
    }
}

int64_t amx_workspace(int64_t m, int64_t k) {
    return (m + 15) / 16 * 16 * k * (int64_t)sizeof(uint16_t);
}

/* A C tile (W rows j.., x rows i..) into y, transposed, with the bias added in float32 and
 * (bfloat16 y) one rounding: rows of y are contiguous, sixteen columns at a time. */
static inline void store_tile(const float ct[16][16], int64_t j, int wr, int64_t i, int xr,
                              int64_t n, const void *bias, int bias_bf16, void *y, int y_bf16) {
    __m512i v[16];
    for (int q = 0; q < 16; q++) v[q] = _mm512_loadu_si512(ct[q]);
    transpose16(v);
    const __mmask16 lanes = (__mmask16)((1u << wr) - 1u);
    __m512 b = _mm512_setzero_ps();
    if (bias && bias_bf16)
        b = (__m512)_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)bias + j)), 16);
    else if (bias)
        b = _mm512_maskz_loadu_ps(lanes, (const float *)bias + j);
    for (int r = 0; r < xr; r++) {
        const __m512 row = _mm512_add_ps((__m512)v[r], b);
        if (y_bf16)
            _mm256_mask_storeu_epi16((uint16_t *)y + (i + r) * n + j, lanes,
                                     (__m256i)_mm512_cvtneps_pbh(row));
        else
            _mm512_mask_storeu_ps((float *)y + (i + r) * n + j, lanes, row);
    }
}

/* One pass of the W blocks at row j (two, or one at the end) over the x blocks at row i (two,
 * or one at the end), as configured. WB and XB are constants after inlining: tile numbers
 * must be. */
static inline void pass(const uint16_t *w, int64_t k, int64_t j, const int wr[2],
                        const uint16_t *xp, int64_t i, const int xr[2], int WB, int XB,
                        int64_t n, const void *bias, int bias_bf16, void *y, int y_bf16) {
    const int64_t stride = k * 2, steps = k / TILE_K;
    const uint16_t *w0 = w + j * k, *w1 = w0 + 16 * k;
    const uint16_t *x0 = xp + i / 16 * steps * 512, *x1 = x0 + steps * 512;
    _tile_zero(0);
    if (XB == 2) _tile_zero(1);
    if (WB == 2) _tile_zero(2);
    if (WB == 2 && XB == 2) _tile_zero(3);
    for (int64_t s = 0; s < steps; s++) {
        _tile_loadd(4, w0 + s * TILE_K, stride);
        _tile_loadd(6, x0 + s * 512, TILE_BYTES);
        _tile_dpbf16ps(0, 4, 6);
        if (XB == 2) {
            _tile_loadd(7, x1 + s * 512, TILE_BYTES);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (WB == 2) {
            _tile_loadd(5, w1 + s * TILE_K, stride);
            _tile_dpbf16ps(2, 5, 6);
            if (XB == 2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    float ct[16][16];
    _tile_stored(0, ct, 64);
    store_tile(ct, j, wr[0], i, xr[0], n, bias, bias_bf16, y, y_bf16);
    if (XB == 2) {
        _tile_stored(1, ct, 64);
        store_tile(ct, j, wr[0], i + 16, xr[1], n, bias, bias_bf16, y, y_bf16);
    }
    if (WB == 2) {
        _tile_stored(2, ct, 64);
        store_tile(ct, j + 16, wr[1], i, xr[0], n, bias, bias_bf16, y, y_bf16);
    }
    if (WB == 2 && XB == 2) {
        _tile_stored(3, ct, 64);
        store_tile(ct, j + 16, wr[1], i + 16, xr[1], n, bias, bias_bf16, y, y_bf16);
    }
}

/* The rows of the blocks of 16 from `at` of `total`, the first two: 16, 16 / 16, t / t, 0. */
static inline void block_rows(int64_t at, int64_t total, int out[2]) {
    const int64_t left = total - at;
    out[0] = left < 16 ? (int)left : 16;
    out[1] = left <= 16 ? 0 : left < 32 ? (int)(left - 16) : 16;
}

void amx_linear_bf16(const void *x, int x_f32, int64_t m, int64_t k, const uint16_t *w,
                     int64_t n, const void *bias, int bias_bf16, void *y, int y_bf16,
                     void *work) {
    uint16_t *xp = work;
    pack_x(x, x_f32, m, k, xp);
#pragma omp parallel if (n * k > 65536)
    {
        int64_t configured = -1; /* the shape of the loaded configuration */
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j += 32) { /* a block of W's rows: memory is read once */
            int wr[2];
            block_rows(j, n, wr);
            for (int64_t i = 0; i < m; i += 32) {
                int xr[2];
                block_rows(i, m, xr);
                const int64_t shape = ((wr[0] * 17 + wr[1]) * 17 + xr[0]) * 17 + xr[1];
                if (shape != configured) {
                    const int wc[2] = {wr[0], wr[1] ? wr[1] : 16},
                              xc[2] = {xr[0], xr[1] ? xr[1] : 16};
                    configure(wc, xc);
                    configured = shape;
                }
                if (wr[1] && xr[1]) pass(w, k, j, wr, xp, i, xr, 2, 2, n, bias, bias_bf16, y, y_bf16);
                else if (wr[1]) pass(w, k, j, wr, xp, i, xr, 2, 1, n, bias, bias_bf16, y, y_bf16);
                else if (xr[1]) pass(w, k, j, wr, xp, i, xr, 1, 2, n, bias, bias_bf16, y, y_bf16);
                else pass(w, k, j, wr, xp, i, xr, 1, 1, n, bias, bias_bf16, y, y_bf16);
            }
        }
        if (configured >= 0) _tile_release();
    }
}
#else
int amx_bf16_ready(void) { return 0; }
int64_t amx_workspace(int64_t m, int64_t k) {
    (void)m;
    (void)k;
    return 0;
}
void amx_linear_bf16(const void *x, int x_f32, int64_t m, int64_t k, const uint16_t *w,
                     int64_t n, const void *bias, int bias_bf16, void *y, int y_bf16,
                     void *work) {
    (void)x, (void)x_f32, (void)m, (void)k, (void)w, (void)n, (void)bias, (void)bias_bf16;
    (void)y, (void)y_bf16, (void)work;
}
#endif

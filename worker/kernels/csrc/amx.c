/* Projections on AMX tiles, y = x W^T for two or more rows of x, with W [n, k] row-major as
 * the checkpoint or `npuserve quantize` stores it (no repacked copy): bfloat16 W with x
 * bfloat16 or float32, and int8 W with x rounded to int16 per row.
 *
 * A tile multiply takes A [16 rows, 64 bytes] and B [16 rows, 16 columns of 4 bytes] into a
 * 32-bit C [16, 16]: tdpbf16ps multiplies pairs of bfloat16 (A 32 columns of k, B pairs of k
 * per column) into float32, tdpbssd / tdpbsud fours of signed int8 by signed / unsigned int8
 * into int32. W's rows are A directly: sixteen rows of one step of k at W's row stride. x is
 * B: each call packs its rows, sixteen at a time, into that interleaved layout in the
 * caller's scratch (a 16 x 16 transpose of 4-byte groups per step of k). So each tile
 * computes C^T = W_block x_block^T, and the store transposes it.
 *
 * bfloat16: float32 x is rounded to bfloat16 on the way, as AVX512-BF16's vector path rounds
 * it. int8: x is rounded to int16 (as the vector path does) and split exactly into a signed
 * high byte and an unsigned low byte, x = 256 hi + lo, two tile multiplies whose int32 sums
 * are combined, scaled per group of columns and summed in float32 at each group's end.
 *
 * One tile multiply does 8192 (bfloat16) or 16384 (int8) products, where a vector
 * instruction does 32 or 64: the kernel stays bound by reading W at far more rows than the
 * vector path, which is arithmetic-bound from about 8. Each thread takes contiguous blocks
 * of 32 rows of W (two A tiles) and runs every block of x past them, so W is read from
 * memory once.
 *
 * Linux hands out the tile registers' state only to a process that asks for it
 * (arch_prctl ARCH_REQ_XCOMP_PERM), once; where the kernel refuses, or the CPU lacks AMX,
 * amx_ready() is 0 and callers keep the vector path. */
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

/* Step s of a pass over one block of W also prefetches line s of each of the next block's 32
 * rows into L2 (a pass has as many steps as a row has lines), so the next block's tiles load
 * from cache: the hardware prefetcher does not keep up with 32 short rows at once. */
static inline void prefetch_next_block(const char *next, int64_t row_bytes, int64_t s,
                                       int64_t rows) {
    for (int64_t q = 0; q < rows; q++) __builtin_prefetch(next + q * row_bytes + s * 64, 0, 2);
}

int amx_ready(void) {
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

/* x packed for the tiles, bfloat16 or int16's two bytes: two bytes per element, rows in
 * whole blocks of 16. */
int64_t amx_workspace(int64_t m, int64_t k) { return (m + 15) / 16 * 16 * k * 2; }

/* A C tile (W rows j.., x rows i..) into y, transposed, times xscale[i + r] for x row r
 * (unless NULL), with the bias added in float32 and (bfloat16 y) one rounding: rows of y are
 * contiguous, sixteen columns at a time. */
static inline void store_tile(const float ct[16][16], int64_t j, int wr, int64_t i, int xr,
                              const float *xscale, int64_t n, const void *bias, int bias_bf16,
                              void *y, int y_bf16) {
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
        const __m512 row = xscale ? _mm512_fmadd_ps((__m512)v[r], _mm512_set1_ps(xscale[i + r]), b)
                                  : _mm512_add_ps((__m512)v[r], b);
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
                        int64_t next_rows, int64_t n, const void *bias, int bias_bf16, void *y,
                        int y_bf16) {
    const int64_t stride = k * 2, steps = k / TILE_K;
    const uint16_t *w0 = w + j * k, *w1 = w0 + 16 * k;
    const uint16_t *x0 = xp + i / 16 * steps * 512, *x1 = x0 + steps * 512;
    _tile_zero(0);
    if (XB == 2) _tile_zero(1);
    if (WB == 2) _tile_zero(2);
    if (WB == 2 && XB == 2) _tile_zero(3);
    for (int64_t s = 0; s < steps; s++) {
        prefetch_next_block((const char *)(w0 + 32 * k), stride, s, next_rows);
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
    store_tile(ct, j, wr[0], i, xr[0], NULL, n, bias, bias_bf16, y, y_bf16);
    if (XB == 2) {
        _tile_stored(1, ct, 64);
        store_tile(ct, j, wr[0], i + 16, xr[1], NULL, n, bias, bias_bf16, y, y_bf16);
    }
    if (WB == 2) {
        _tile_stored(2, ct, 64);
        store_tile(ct, j + 16, wr[1], i, xr[0], NULL, n, bias, bias_bf16, y, y_bf16);
    }
    if (WB == 2 && XB == 2) {
        _tile_stored(3, ct, 64);
        store_tile(ct, j + 16, wr[1], i + 16, xr[1], NULL, n, bias, bias_bf16, y, y_bf16);
    }
}

/* Rows of the block of 32 after the one at row j (0 after the last). */
static inline int64_t next_rows(int64_t j, int64_t n) {
    return n - (j + 32) < 0 ? 0 : n - (j + 32) < 32 ? n - (j + 32) : 32;
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
                const int64_t next = i == 0 ? next_rows(j, n) : 0;
                if (wr[1] && xr[1]) pass(w, k, j, wr, xp, i, xr, 2, 2, next, n, bias, bias_bf16, y, y_bf16);
                else if (wr[1]) pass(w, k, j, wr, xp, i, xr, 2, 1, next, n, bias, bias_bf16, y, y_bf16);
                else if (xr[1]) pass(w, k, j, wr, xp, i, xr, 1, 2, next, n, bias, bias_bf16, y, y_bf16);
                else pass(w, k, j, wr, xp, i, xr, 1, 1, next, n, bias, bias_bf16, y, y_bf16);
            }
        }
        if (configured >= 0) _tile_release();
    }
}

/* int8 W: the B tiles of x rounded to int16, block b (rows 16b..) and step s (columns
 * 64s..64s+63) at xp + (b * steps + s) * 2048: the high bytes' tile, then the low bytes'.
 * Rows past m are zeros. */
#define I8_K 64 /* int8 columns of k per tile multiply */
static void pack_x16(const int16_t *xq, int64_t m, int64_t k, int8_t *xp) {
    const int64_t steps = k / I8_K, blocks = (m + 15) / 16;
#pragma omp parallel for schedule(static) if (m * k > 65536)
    for (int64_t t = 0; t < blocks * steps; t++) {
        const int64_t b = t / steps, s = t % steps;
        __m512i hi[16], lo[16];
        for (int r = 0; r < 16; r++) {
            const int64_t row = b * 16 + r;
            if (row >= m) {
                hi[r] = lo[r] = _mm512_setzero_si512();
                continue;
            }
            const int16_t *p = xq + row * k + s * I8_K;
            const __m512i v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + 32);
            /* vpmovwb keeps each int16's low byte: lo exactly, and hi after the shift */
            lo[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(v0)),
                                       _mm512_cvtepi16_epi8(v1), 1);
            hi[r] = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm512_cvtepi16_epi8(_mm512_srai_epi16(v0, 8))),
                _mm512_cvtepi16_epi8(_mm512_srai_epi16(v1, 8)), 1);
        }
        transpose16(hi);
        transpose16(lo);
        int8_t *tile = xp + t * 2048;
        for (int r = 0; r < 16; r++) {
            _mm512_storeu_si512(tile + r * 64, hi[r]);
            _mm512_storeu_si512(tile + 1024 + r * 64, lo[r]);
        }
    }
}

/* Tiles 0-1: C of W block 0 against x's high and low bytes, 2-3: of W block 1; 4-5: W
 * blocks of wr[0] and wr[1] rows; 6-7: x's high and low bytes, xr rows. */
static void configure_i8(const int wr[2], int xr) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int a = 0; a < 2; a++) {
        for (int h = 0; h < 2; h++) {
            c.rows[2 * a + h] = (uint8_t)wr[a];
            c.colsb[2 * a + h] = (uint16_t)(xr * 4);
        }
        c.rows[4 + a] = (uint8_t)wr[a];
        c.colsb[4 + a] = TILE_BYTES;
        c.rows[6 + a] = TILE_ROWS;
        c.colsb[6 + a] = (uint16_t)(xr * 4);
    }
    _tile_loadconfig(&c);
}

/* acc[q][r] += (256 hi + lo)[q][r] * scale of W row j + q, for the wr rows of one W block. */
static inline void flush_i8(const int32_t hi[16][16], const int32_t lo[16][16], int wr,
                            const float *scale, int64_t j, int64_t groups, int64_t g,
                            float acc[16][16]) {
    for (int q = 0; q < wr; q++) {
        const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(hi[q])),
                                           _mm512_set1_ps(256.0f),
                                           _mm512_cvtepi32_ps(_mm512_loadu_si512(lo[q])));
        _mm512_storeu_ps(acc[q], _mm512_fmadd_ps(sum, _mm512_set1_ps(scale[(j + q) * groups + g]),
                                                 _mm512_loadu_ps(acc[q])));
    }
}

/* One pass of the W blocks at row j (two, or one at the end) over the x block at row i. */
static inline void pass_i8(const int8_t *w, int64_t k, int64_t j, const int wr[2],
                           const int8_t *xp, int64_t i, int xr, const float *xscale,
                           const float *scale, int64_t group, int WB, int64_t next_rows,
                           int64_t n, const float *bias, float *y) {
    const int64_t steps = k / I8_K, group_steps = group / I8_K, groups = k / group;
    const int8_t *w0 = w + j * k, *w1 = w0 + 16 * k;
    const int8_t *x0 = xp + i / 16 * steps * 2048;
    float acc[2][16][16];
    memset(acc, 0, sizeof acc);
    int32_t hi[16][16], lo[16][16];
    for (int64_t g = 0; g < groups; g++) {
        _tile_zero(0);
        _tile_zero(1);
        if (WB == 2) {
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int64_t s = g * group_steps; s < (g + 1) * group_steps; s++) {
            prefetch_next_block((const char *)(w0 + 32 * k), k, s, next_rows);
            _tile_loadd(4, w0 + s * I8_K, k);
            _tile_loadd(6, x0 + s * 2048, TILE_BYTES);
            _tile_loadd(7, x0 + s * 2048 + 1024, TILE_BYTES);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbsud(1, 4, 7);
            if (WB == 2) {
                _tile_loadd(5, w1 + s * I8_K, k);
                _tile_dpbssd(2, 5, 6);
                _tile_dpbsud(3, 5, 7);
            }
        }
        _tile_stored(0, hi, 64);
        _tile_stored(1, lo, 64);
        flush_i8((const int32_t(*)[16])hi, (const int32_t(*)[16])lo, wr[0], scale, j, groups, g,
                 acc[0]);
        if (WB == 2) {
            _tile_stored(2, hi, 64);
            _tile_stored(3, lo, 64);
            flush_i8((const int32_t(*)[16])hi, (const int32_t(*)[16])lo, wr[1], scale, j + 16,
                     groups, g, acc[1]);
        }
    }
    store_tile((const float(*)[16])acc[0], j, wr[0], i, xr, xscale, n, bias, 0, y, 0);
    if (WB == 2)
        store_tile((const float(*)[16])acc[1], j + 16, wr[1], i, xr, xscale, n, bias, 0, y, 0);
}

void amx_linear_i8(const int16_t *xq, const float *xscale, int64_t m, int64_t k,
                   const int8_t *w, const float *scale, int64_t group, int64_t n,
                   const float *bias, float *y, void *work) {
    int8_t *xp = work;
    pack_x16(xq, m, k, xp);
#pragma omp parallel if (n * k > 65536)
    {
        int64_t configured = -1; /* the shape of the loaded configuration */
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j += 32) { /* a block of W's rows: memory is read once */
            int wr[2];
            block_rows(j, n, wr);
            for (int64_t i = 0; i < m; i += 16) {
                const int xr = m - i < 16 ? (int)(m - i) : 16;
                const int64_t shape = (wr[0] * 17 + wr[1]) * 17 + xr;
                if (shape != configured) {
                    const int wc[2] = {wr[0], wr[1] ? wr[1] : 16};
                    configure_i8(wc, xr);
                    configured = shape;
                }
                const int64_t next = i == 0 ? next_rows(j, n) : 0;
                if (wr[1]) pass_i8(w, k, j, wr, xp, i, xr, xscale, scale, group, 2, next, n, bias, y);
                else pass_i8(w, k, j, wr, xp, i, xr, xscale, scale, group, 1, next, n, bias, y);
            }
        }
        if (configured >= 0) _tile_release();
    }
}
#else
int amx_ready(void) { return 0; }
int64_t amx_workspace(int64_t m, int64_t k) {
    (void)m;
    (void)k;
    return 0;
}
void amx_linear_i8(const int16_t *xq, const float *xscale, int64_t m, int64_t k,
                   const int8_t *w, const float *scale, int64_t group, int64_t n,
                   const float *bias, float *y, void *work) {
    (void)xq, (void)xscale, (void)m, (void)k, (void)w, (void)scale, (void)group, (void)n;
    (void)bias, (void)y, (void)work;
}
void amx_linear_bf16(const void *x, int x_f32, int64_t m, int64_t k, const uint16_t *w,
                     int64_t n, const void *bias, int bias_bf16, void *y, int y_bf16,
                     void *work) {
    (void)x, (void)x_f32, (void)m, (void)k, (void)w, (void)n, (void)bias, (void)bias_bf16;
    (void)y, (void)y_bf16, (void)work;
}
#endif

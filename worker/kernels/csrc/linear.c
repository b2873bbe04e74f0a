/* y = x W^T (+ b) for a few rows of x: the decode-time projection, bound by reading W (and
 * the int8 one for any rows: x is swept in blocks of X_BLOCK rows).
 *
 * W is [n, k] row-major, float32 or int8 with float32 scales per output channel and group of
 * `group` columns. Each thread takes a contiguous range of W's rows and reads every weight
 * from memory once, a small tile of rows at a time, and multiplies it with every row of x
 * (x stays in L1/L2) before moving on. float32 runs on the widest vectors the CPU has (16
 * lanes with AVX-512, where the 32 registers also hold a 4 x 4 tile; 8 otherwise), and so
 * does bfloat16, widened to float32 in registers (half the bytes of float32 from memory), or
 * for several rows on AVX512-BF16 multiplied in pairs by vdpbf16ps (on AMX tiles where the
 * CPU has them, amx.c, and int8 of several rows too). int8
 * weights move a quarter of the bytes; on AVX2 and AVX-512 they are multiplied in integers
 * with x rounded to int16 (below), elsewhere widened to float32 in registers.
 *
 * Weights are prefetched a few tiles ahead. Where the prefetched lines go is a property of
 * the machine, not of the code: on a Zen 3 non-temporal prefetches (into L1 only) were the
 * fastest, on a Sapphire Rapids Xeon they run 2-4x slower than prefetches into every level,
 * and on a later Xeon prefetches into L2 only streamed 1.2x faster than into every level
 * (25.7 against 21.3 GB/s at one row), so it is a setting (cpuk_set_prefetch) that
 * worker/kernels/dispatch.py times per machine.
 *
 * One row of x can instead stream each thread's weight rows one after another, for the
 * hardware prefetcher to follow, with one software prefetch a kilobyte ahead, the threads
 * taking over each other's last rows (steal.h): float32 and bfloat16 W (cpuk_set_row_stream,
 * tile_stream below) and int8 W (cpuk_set_row_stream_i8). Also timed per machine. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "amx.h"
#include "kernels.h"
#include "steal.h"
#include "vec.h"

/* GCC's loop vectoriser turns each tile's epilogue (R horizontal sums and the scalar tail)
 * into vector code over the R rows of x, and on AVX2's sixteen registers that pushes an
 * accumulator of the hot loop onto the stack: float32 at 8-32 rows ran at 55-70% of the
 * speed it has without it on a Zen 3. The hot loops are written in vectors already. Only
 * measured without AVX-512, so only there. */
#if defined(__GNUC__) && !defined(__clang__) && !defined(__AVX512F__)
#pragma GCC optimize("no-tree-loop-vectorize")
#endif

#define MAX_WR 4
#define MAX_XR 4
#define X_BLOCK 64 /* rows of x per sweep over W, so a prefill's x stays in L2 */
#define PREFETCH_TILES 3 /* a tile's rows are contiguous, so the next tiles are known: fetch
                            them this far ahead (the rows are too short for the hardware
                            prefetcher to ramp up on its own) */

#ifdef __AVX512F__
#define VW 16
#define WR_ROWS 4 /* weight rows per tile for several x rows: 16 accumulators + 4 weights */
#else
#define VW 8
#define WR_ROWS 3 /* 12 accumulators and 3 weight vectors fill the sixteen AVX2 registers */
#endif
typedef float vwf __attribute__((vector_size(VW * 4), aligned(4)));

ALWAYS_INLINE vwf vw_splat(float x) { return (vwf){0} + x; }

ALWAYS_INLINE float vw_hsum(vwf v) {
#if VW == 16
    v8f lo, hi;
    __builtin_memcpy(&lo, &v, sizeof lo);
    __builtin_memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    return hsum(lo + hi);
#else
    return hsum(v);
#endif
}

static int prefetch_mode = PREFETCH_ALL_LEVELS;
static int row_stream = 0;
static int row_stream_i8 = 0;
static int amx_allowed = 1;

void cpuk_set_prefetch(int64_t mode) {
    prefetch_mode = mode == PREFETCH_L2 ? PREFETCH_L2 : mode ? PREFETCH_ALL_LEVELS : PREFETCH_NTA;
}

int64_t cpuk_get_prefetch(void) { return prefetch_mode; }

void cpuk_set_row_stream(int64_t on) { row_stream = on != 0; }

int64_t cpuk_get_row_stream(void) { return row_stream; }

void cpuk_set_row_stream_i8(int64_t on) { row_stream_i8 = on != 0; }

int64_t cpuk_get_row_stream_i8(void) { return row_stream_i8; }

void cpuk_set_amx(int64_t on) { amx_allowed = on != 0; }

int64_t cpuk_get_amx(void) { return amx_allowed && amx_ready(); }

/* Whether a bfloat16 / int8 projection of m rows of k columns (and groups) runs on AMX tiles
 * (amx.c), where k and the groups are whole tiles. On a 2-core Xeon with AMX, bfloat16 on
 * tiles streamed Qwen3-0.6B's layers at 21.5 GB/s from one row, where the vector path read
 * 16.4 (batch-1 decode 54 against 66 ms). int8 tied the vector path at 4 rows on SmolLM2's
 * layers, which sit in that Xeon's L3 (3.9-4.2 ms against 4.0), and was 1.3x slower at 2, but
 * 1.03-1.13x faster at 1-2 rows on layers too big for it: so the rows from which int8 takes
 * the tiles are a setting that worker/kernels/dispatch.py times on each model's own
 * projections (AMX_I8_MIN_ROWS until then). */
#define AMX_BF16_MIN_ROWS 1
#define AMX_I8_MIN_ROWS 4
static int64_t amx_i8_rows = AMX_I8_MIN_ROWS;

void cpuk_set_amx_i8_rows(int64_t rows) { amx_i8_rows = rows > 1 ? rows : 1; }

int64_t cpuk_get_amx_i8_rows(void) { return amx_i8_rows; }

static int amx_takes(int64_t m, int64_t k) {
    return m >= AMX_BF16_MIN_ROWS && k % 32 == 0 && amx_allowed && amx_ready();
}
static int amx_i8_takes(int64_t m, int64_t k, int64_t group) {
    return m >= amx_i8_rows && k % 64 == 0 && group % 64 == 0 && amx_allowed && amx_ready();
}

/* __builtin_prefetch takes its locality as a constant: PF, the prefetch mode, is one after
 * inlining. */
#define PREFETCH(p, PF)                                                                       \
    do {                                                                                      \
        if ((PF) == PREFETCH_ALL_LEVELS) __builtin_prefetch((p), 0, 3);                      \
        else if ((PF) == PREFETCH_L2) __builtin_prefetch((p), 0, 2);                         \
        else __builtin_prefetch((p), 0, 0);                                                   \
    } while (0)

/* The prefetches of the tile PREFETCH_TILES ahead, made as a tile's passes step through k.
 * A tile meets x in passes of MAX_XR rows; with one pass each step fetches the next `chunk`
 * bytes. With several, the lines are spread over all the passes: issued all in the first
 * pass, they came in bursts that filled the L1 miss buffers: on a Xeon, SmolLM2's layers at
 * 16 / 32 rows took 26.6-27.4 / 35.2-37.3 ms against 32.5-33.4 / 46.7-48.0 in float32, and
 * 18.7-19.2 / 36.3 against 23.5-23.9 / 42.1-42.4 in bfloat16 (vdpbf16ps). The int8 vector
 * path, bound by its arithmetic there, measured 4% slower spread and keeps the bursts. */
typedef struct {
    const char *base;
    int64_t passes, next, frac, span, steps;
} ahead_t;

ALWAYS_INLINE ahead_t ahead_start(const char *base, int64_t bytes, int64_t steps, int64_t pass,
                                  int64_t passes) {
    const int64_t lines = bytes / 64, l0 = lines * pass / passes;
    return (ahead_t){base, passes, l0, 0, lines * (pass + 1) / passes - l0, steps > 0 ? steps : 1};
}

/* Step s of the pass, which (with one pass) reads the tile's chunk bytes at s * chunk. */
ALWAYS_INLINE void ahead_step(ahead_t *a, int64_t s, int chunk, int PF) {
    if (a->passes == 1)
        for (int b = 0; b < chunk; b += 64) PREFETCH(a->base + s * chunk + b, PF);
    else
        for (a->frac += a->span; a->frac >= a->steps; a->frac -= a->steps)
            PREFETCH(a->base + 64 * a->next++, PF);
}

/* Keeps a loaded vector in a register: without it GCC folds the load into every multiply-add
 * that uses the value, so a 4 x 4 tile made 32 loads per 16 multiply-adds where it needs 8,
 * and several rows ran at half the arithmetic rate. */
#if defined(__x86_64__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

/* Weight row pointers of the tile starting at row j; rows past n repeat the last real one
 * (computed, never stored). */
ALWAYS_INLINE void tile_rows(const char *w, int64_t row_bytes, int64_t j, int64_t n, int WR,
                             const char *rows[MAX_WR]) {
    for (int q = 0; q < WR; q++) rows[q] = w + (j + q < n ? j + q : n - 1) * row_bytes;
}

typedef uint16_t vwh __attribute__((vector_size(VW * 2), aligned(2)));
typedef uint32_t vwu __attribute__((vector_size(VW * 4)));

/* VW elements of float32 (BF 0) or bfloat16 (BF 1, widened) at element c of row p. */
ALWAYS_INLINE vwf vw_load(const char *p, int64_t c, int BF) {
#if VW == 8
    if (BF) return vload_bf16((const uint16_t *)p + c);
#else
    if (BF) return (vwf)(__builtin_convertvector(*(const vwh *)((const uint16_t *)p + c), vwu) << 16);
#endif
    return *(const vwf *)((const float *)p + c);
}

ALWAYS_INLINE float load1(const char *p, int64_t c, int BF) {
    return BF ? bf16_float(((const uint16_t *)p)[c]) : ((const float *)p)[c];
}

/* Where a tile of bfloat16 W takes its weights from (tile_float's WM). */
#define W_AS_IS 0 /* W itself, widened in registers where WBF */
#define W_KEEP 1  /* W widened, and kept in wbuf for the tile's later passes */
#define W_KEPT 2  /* wbuf, as an earlier pass kept it */

/* A tile's dot products from its accumulators (one per weight row and x row, each summed
 * lane by lane in the order of the columns), then the columns past the last whole vector. */
ALWAYS_INLINE void tile_sums(vwf acc[MAX_WR][MAX_XR], int WR, int R,
                             const char *const rows[MAX_WR], const char *const xs[MAX_XR],
                             int64_t kv, int64_t k, int XBF, int WBF,
                             float out[MAX_WR][MAX_XR]) {
#if VW == 16
    if (WR == 4) {
        reduce_4x4((const __m512(*)[MAX_XR])acc, R, out); /* __m512 may alias vwf */
    } else
#endif
    {
        for (int q = 0; q < WR; q++)
            for (int r = 0; r < R; r++) out[q][r] = vw_hsum(acc[q][r]);
    }
    for (int q = 0; q < WR; q++)
        for (int r = 0; r < R; r++)
            for (int64_t c = kv; c < k; c++)
                out[q][r] += load1(rows[q], c, WBF) * load1(xs[r], c, XBF);
}

/* float32 (or, with XBF / WBF, bfloat16 x / W widened to float32 in registers): dot products
 * of the tile's WR weight rows with R rows of x, VW columns at a time. WR, R, PF, XBF, WBF
 * and WM are constants after inlining, so acc stays in registers. The tile consumes WR * VW
 * elements of W per step, which the prefetches cover a few tiles ahead. */
ALWAYS_INLINE void tile_float(const void *x, int64_t k, const void *w, int64_t j, int64_t n,
                              int WR, int64_t i, int R, int PF, int XBF, int WBF,
                              int64_t pass, int64_t passes, float *wbuf, int WM,
                              float out[MAX_WR][MAX_XR]) {
    const int64_t es = WBF ? 2 : 4, xes = XBF ? 2 : 4; /* element bytes */
    const char *xs[MAX_XR];
    for (int r = 0; r < R; r++) xs[r] = (const char *)x + (i + r) * k * xes;
    const char *rows[MAX_WR];
    tile_rows((const char *)w, k * es, j, n, WR, rows);
    vwf acc[MAX_WR][MAX_XR];
    for (int q = 0; q < WR; q++)
        for (int r = 0; r < R; r++) acc[q][r] = vw_splat(0.0f);
    const int64_t kv = k - k % VW;
    ahead_t ahead = ahead_start(rows[0] + PREFETCH_TILES * WR * k * es, WR * k * es, kv / VW,
                                pass, passes);
    for (int64_t c = 0; c < kv; c += VW) {
        ahead_step(&ahead, c / VW, WR * VW * es, PF);
        vwf wv[MAX_WR];
        for (int q = 0; q < WR; q++) {
            if (WM == W_KEPT) {
                wv[q] = *(const vwf *)(wbuf + q * k + c);
            } else {
                wv[q] = vw_load(rows[q], c, WBF);
                if (WM == W_KEEP) *(vwf *)(wbuf + q * k + c) = wv[q];
            }
            IN_REGISTER(wv[q]);
        }
        for (int r = 0; r < R; r++) {
            vwf xv = vw_load(xs[r], c, XBF);
            IN_REGISTER(xv);
            for (int q = 0; q < WR; q++) acc[q][r] += wv[q] * xv;
        }
    }
    tile_sums(acc, WR, R, rows, xs, kv, k, XBF, WBF, out);
}

/* One row of x against the tile of four weight rows at j, as tile_float's with R = 1 (the
 * same sums, bit for bit), but each weight row read to its end before the next: a single
 * stream, for the hardware prefetcher to follow (cpuk_set_row_stream). On a Zen 4 with the
 * weights on huge pages, 538 MB at one row took 10.5 / 17.6 ms in a fast / slow minute, near
 * a plain read of the same bytes (9.7 / 16.7), where the tiles' rows read side by side took
 * 14.4-15.0 / 19.9-21.2 with prefetches into L2 and 19.4-22.2 without. A batch-1 decode step
 * of SmolLM2 took 16.4 / 19.1 ms (best / median of 8) against 19.1 / 21.8 in tiles. One
 * prefetch into L2 STREAM_AHEAD bytes ahead of each vector still helps the hardware's: the
 * same 538 MB took 11.6-12.5 / 12.9-14.3 ms (best / first quartile of 75, three runs)
 * against 11.4-12.7 / 14.0-15.3 without it, on the same Zen 4 another day, its plain read
 * 9.6-10.1 / 10.3-11.2; a prefetch of every line a few tiles ahead had cost a plain read
 * 1.35x there. */
#define STREAM_AHEAD 1024
ALWAYS_INLINE void tile_stream(const void *x, int64_t k, const void *w, int64_t j, int64_t n,
                               int XBF, int WBF, float out[MAX_WR][MAX_XR]) {
    const char *xs[MAX_XR] = {x};
    const char *rows[MAX_WR];
    tile_rows((const char *)w, k * (WBF ? 2 : 4), j, n, 4, rows);
    const int64_t kv = k - k % VW;
    vwf acc[MAX_WR][MAX_XR];
    for (int q = 0; q < 4; q++) {
        vwf a = vw_splat(0.0f);
        for (int64_t c = 0; c < kv; c += VW) {
            __builtin_prefetch(rows[q] + c * (WBF ? 2 : 4) + STREAM_AHEAD, 0, 2);
            a += vw_load(rows[q], c, WBF) * vw_load(xs[0], c, XBF);
        }
        acc[q][0] = a;
    }
    tile_sums(acc, 4, 1, rows, xs, kv, k, XBF, WBF, out);
}

/* Every tile of W against one row of x, the threads taking contiguous ranges. A macro, so
 * that each caller's parallel loop has its dtypes as constants. */
#define STREAM_TILES(XBF, WBF, STORE)                                                          \
    FOR_STOLEN_TILES((n + 3) / 4, n * k > 65536, jt, {                                         \
        float out[MAX_WR][MAX_XR];                                                             \
        tile_stream(x, k, w, jt * 4, n, XBF, WBF, out);                                        \
        STORE(out, 4, 1, 0, jt * 4, n, bias, y);                                               \
    })

#ifdef __AVX512BF16__
/* bfloat16 x and W on AVX512-BF16: vdpbf16ps multiplies 32 pairs of bfloat16 (exactly, in
 * float32) and adds each pair's sum to one of 16 float32 lanes, twice the products per
 * instruction of widening to float32 and one fused multiply-add. As tile_float, 32 columns at
 * a time; a last part of fewer than 32 columns is a masked load (zeros add nothing). */
#define DW 32
ALWAYS_INLINE __m512bh dp_load(const uint16_t *p, int64_t c, int64_t k) {
    if (k - c >= DW) return (__m512bh)_mm512_loadu_si512(p + c);
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1u << (k - c)) - 1u), p + c);
}

ALWAYS_INLINE void tile_dpbf16(const uint16_t *x, int64_t k, const uint16_t *w, int64_t j,
                               int64_t n, int WR, int64_t i, int R, int PF, int64_t pass,
                               int64_t passes, float out[MAX_WR][MAX_XR]) {
    const uint16_t *xs[MAX_XR];
    for (int r = 0; r < R; r++) xs[r] = x + (i + r) * k;
    const char *rows[MAX_WR];
    tile_rows((const char *)w, k * 2, j, n, WR, rows);
    __m512 acc[MAX_WR][MAX_XR];
    for (int q = 0; q < WR; q++)
        for (int r = 0; r < R; r++) acc[q][r] = _mm512_setzero_ps();
    ahead_t ahead = ahead_start(rows[0] + PREFETCH_TILES * WR * k * 2, WR * k * 2,
                                (k + DW - 1) / DW, pass, passes);
    for (int64_t c = 0; c < k; c += DW) {
        ahead_step(&ahead, c / DW, WR * DW * 2, PF);
        __m512bh wv[MAX_WR];
        for (int q = 0; q < WR; q++) wv[q] = dp_load((const uint16_t *)rows[q], c, k);
        for (int r = 0; r < R; r++) {
            __m512bh xv = dp_load(xs[r], c, k);
            for (int q = 0; q < WR; q++) acc[q][r] = _mm512_dpbf16_ps(acc[q][r], wv[q], xv);
        }
    }
    if (WR == 4) { /* as tile_float's: a 960 x 576 projection from L2 on a Zen 4, float32 x
                      of 4 / 8 / 16 / 32 rows, took 17.7 / 30.6 / 55.1 / 101 us against 19.2 /
                      32.5 / 57.6 / 114 with a sum per product (fastest of four alternations) */
        reduce_4x4(acc, R, out);
        return;
    }
    for (int q = 0; q < WR; q++)
        for (int r = 0; r < R; r++) out[q][r] = _mm512_reduce_add_ps(acc[q][r]);
}
#endif

/* int8 widened to float32 (no integer path on this CPU): as tile_f32, 8 columns at a time
 * over [c0, c1). */
ALWAYS_INLINE void tile_i8_cols(const char *const rows[MAX_WR], int WR, int64_t k,
                                const float *const *xs, int R, int64_t c0, int64_t c1, int PF,
                                v8f acc[MAX_WR][MAX_XR]) {
    const char *ahead = rows[0] + PREFETCH_TILES * WR * k;
    for (int64_t c = c0; c < c1; c += 8) {
        PREFETCH(ahead + c * WR, PF);
        v8f wv[MAX_WR];
        for (int q = 0; q < WR; q++) wv[q] = vload_i8((const int8_t *)rows[q] + c);
        for (int r = 0; r < R; r++) {
            v8f xv = vload(xs[r] + c);
            for (int q = 0; q < WR; q++) acc[q][r] += wv[q] * xv;
        }
    }
}

/* int8: k and group are multiples of 8 (checked by the caller). */
ALWAYS_INLINE void tile_i8(const float *x, int64_t k, const int8_t *w, const float *scale,
                           int64_t group, int64_t j, int64_t n, int WR, int64_t i, int R, int PF,
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
        tile_i8_cols(rows, WR, k, xs, R, g * group, (g + 1) * group, PF, acc);
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

/* The bias added in float32, then one rounding to bfloat16. */
ALWAYS_INLINE void store_bf16(float out[MAX_WR][MAX_XR], int WR, int R, int64_t i, int64_t j,
                              int64_t n, const uint16_t *bias, uint16_t *y) {
    for (int q = 0; q < WR && j + q < n; q++)
        for (int r = 0; r < R; r++)
            y[(i + r) * n + j + q] = float_bf16(out[q][r] + (bias ? bf16_float(bias[j + q]) : 0.0f));
}

/* Inside FOR_TILES: this pass of x's rows over the tile, and how many there are. */
#define PASS ((i - i0) / MAX_XR)
#define PASSES ((i1 - i0 + MAX_XR - 1) / MAX_XR)

/* One x row: four weight rows per tile, so four streams of reads overlap. Several rows:
 * WR_ROWS weight rows by four x rows per pass, the tile's weights re-read from L1 for each
 * pass. TILE(WR, R, PF) computes one tile into out; wbuf, WBUF floats on the thread's stack,
 * is there for it to keep the tile's weights in. */
#define FOR_TILES_PF(WR, TILE, PF, STORE, WBUF)                                                \
    for (int64_t i0 = 0; i0 < m; i0 += X_BLOCK) {                                              \
        const int64_t i1 = m - i0 < X_BLOCK ? m : i0 + X_BLOCK;                                \
        _Pragma("omp parallel for schedule(static) if (n * k > 65536)")                       \
        for (int64_t jt = 0; jt < (n + WR - 1) / WR; jt++) {                                   \
            int64_t j = jt * WR;                                                               \
            float wbuf[WBUF] __attribute__((aligned(64)));                                     \
            (void)wbuf;                                                                        \
            for (int64_t i = i0; i < i1; i += MAX_XR) {                                        \
                float out[MAX_WR][MAX_XR];                                                     \
                int R = i1 - i < MAX_XR ? (int)(i1 - i) : MAX_XR;                              \
                switch (R) {                                                                   \
                case 1: TILE(WR, 1, PF); break;                                                \
                case 2: TILE(WR, 2, PF); break;                                                \
                case 3: TILE(WR, 3, PF); break;                                                \
                default: TILE(WR, 4, PF); break;                                               \
                }                                                                              \
                STORE(out, WR, R, i, j, n, bias, y);                                           \
            }                                                                                  \
        }                                                                                      \
    }

#define FOR_TILES_WBUF(TILE, STORE, WBUF)                                                      \
    do {                                                                                       \
        if (m == 1 && prefetch_mode == PREFETCH_ALL_LEVELS)                                    \
            FOR_TILES_PF(4, TILE, PREFETCH_ALL_LEVELS, STORE, 1)                               \
        else if (m == 1 && prefetch_mode == PREFETCH_L2)                                       \
            FOR_TILES_PF(4, TILE, PREFETCH_L2, STORE, 1)                                       \
        else if (m == 1) FOR_TILES_PF(4, TILE, PREFETCH_NTA, STORE, 1)                         \
        else if (prefetch_mode == PREFETCH_ALL_LEVELS)                                         \
            FOR_TILES_PF(WR_ROWS, TILE, PREFETCH_ALL_LEVELS, STORE, WBUF)                      \
        else if (prefetch_mode == PREFETCH_L2)                                                 \
            FOR_TILES_PF(WR_ROWS, TILE, PREFETCH_L2, STORE, WBUF)                              \
        else FOR_TILES_PF(WR_ROWS, TILE, PREFETCH_NTA, STORE, WBUF)                            \
    } while (0)
#define FOR_TILES_STORE(TILE, STORE) FOR_TILES_WBUF(TILE, STORE, 1)
#define FOR_TILES(TILE) FOR_TILES_STORE(TILE, store)

/* x: [m, k]; w: [n, k]; bias: [n] or NULL; y: [m, n]. */
void cpuk_linear_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n,
                     const float *bias, float *y) {
    if (m == 1 && row_stream) {
        STREAM_TILES(0, 0, store);
        return;
    }
#define TILE_F32(WR_, R_, PF_)                                                                 \
    tile_float(x, k, w, j, n, WR_, i, R_, PF_, 0, 0, PASS, PASSES, NULL, W_AS_IS, out)
    FOR_TILES(TILE_F32);
#undef TILE_F32
}

/* Several rows of float32 x over bfloat16 W without AVX512-BF16. Widening a vector of W
 * costs two instructions on the ports that multiply, and a tile met by several passes of x
 * widened its weights in each: on an AVX-512 Xeon without AVX512-BF16, SmolLM2's 3072 x 576
 * took 728 / 1404 us at 16 / 32 rows of bfloat16 x against float32's 470 / 861. So each tile
 * widens its weights once, in its first pass, keeping them on the thread's stack (WR_ROWS x k
 * floats: 9 KB for 576 columns) for its other passes (and bfloat16 x is widened once per
 * call): 308-332 / 592-594 us after; past WIDEN_MAX_K columns every pass widens. */
#define WIDEN_MAX_K 8192
#define WIDEN_FLOATS(k) ((k) <= WIDEN_MAX_K ? WR_ROWS * (k) : 1)

ALWAYS_INLINE void tile_widened(const float *x, int64_t k, const uint16_t *w, int64_t j,
                                int64_t n, int WR, int64_t i, int R, int PF, int64_t pass,
                                int64_t passes, float *wbuf, float out[MAX_WR][MAX_XR]) {
    if (passes == 1 || k > WIDEN_MAX_K)
        tile_float(x, k, w, j, n, WR, i, R, PF, 0, 1, pass, passes, NULL, W_AS_IS, out);
    else if (pass == 0)
        tile_float(x, k, w, j, n, WR, i, R, PF, 0, 1, pass, passes, wbuf, W_KEEP, out);
    else
        tile_float(x, k, w, j, n, WR, i, R, PF, 0, 1, pass, passes, wbuf, W_KEPT, out);
}

/* As cpuk_linear_f32 with x, w, bias and y in bfloat16: products and sums in float32, one
 * rounding per output. Several rows without AVX512-BF16 widen x into the caller's scratch
 * once. Returns 0, or (computing nothing) the bytes of scratch it needs when work_bytes is
 * short (cpuk_linear_wbf16_workspace is enough with AVX512-BF16). */
int64_t cpuk_linear_bf16(const uint16_t *x, int64_t m, int64_t k, const uint16_t *w, int64_t n,
                         const uint16_t *bias, uint16_t *y, void *work, int64_t work_bytes) {
    if (amx_takes(m, k)) {
        const int64_t need = amx_workspace(m, k);
        if (need > work_bytes) return need;
        amx_linear_bf16(x, 0, m, k, w, n, bias, 1, y, 1, work);
        return 0;
    }
#ifdef __AVX512BF16__
    if (m > 1) {
#define TILE_DP(WR_, R_, PF_) tile_dpbf16(x, k, w, j, n, WR_, i, R_, PF_, PASS, PASSES, out)
        FOR_TILES_STORE(TILE_DP, store_bf16);
#undef TILE_DP
        return 0;
    }
#endif
#ifndef __AVX512BF16__
    if (m > 1) {
        const int64_t need = m * k * (int64_t)sizeof(float);
        if (need > work_bytes) return need;
        float *xf = work;
        int64_t c = 0;
        for (; c + VW <= m * k; c += VW) *(vwf *)(xf + c) = vw_load((const char *)x, c, 1);
        for (; c < m * k; c++) xf[c] = bf16_float(x[c]);
#define TILE_WIDE(WR_, R_, PF_) tile_widened(xf, k, w, j, n, WR_, i, R_, PF_, PASS, PASSES, wbuf, out)
        FOR_TILES_WBUF(TILE_WIDE, store_bf16, WIDEN_FLOATS(k));
#undef TILE_WIDE
        return 0;
    }
#endif
    if (m == 1 && row_stream) {
        STREAM_TILES(1, 1, store_bf16);
        return 0;
    }
#define TILE_BF16(WR_, R_, PF_)                                                                \
    tile_float(x, k, w, j, n, WR_, i, R_, PF_, 1, 1, PASS, PASSES, NULL, W_AS_IS, out)
    FOR_TILES_STORE(TILE_BF16, store_bf16);
#undef TILE_BF16
    return 0;
}

/* Scratch of the projections over bfloat16 W: x packed for AMX tiles, or (float32 x) rounded
 * to bfloat16 for vdpbf16ps, where those paths are taken. */
int64_t cpuk_linear_wbf16_workspace(int64_t m, int64_t k) {
    if (amx_takes(m, k)) return amx_workspace(m, k);
#ifdef __AVX512BF16__
    if (m > 1) return m * k * (int64_t)sizeof(uint16_t);
#endif
    (void)m;
    (void)k;
    return 0;
}

/* As cpuk_linear_f32 with W in bfloat16 (x, bias and y float32): a bfloat16 model's
 * projection in the one-call decode step, whose activations are float32. With AMX, x is
 * rounded to bfloat16 (as PyTorch's bfloat16 operators hold it) for the tiles; without, one
 * row widens W to float32 in registers, and several round x into the caller's scratch and
 * take vdpbf16ps on AVX512-BF16, which is compute-bound there, or widen each tile's weights
 * once elsewhere (tile_widened). Returns 0, or (computing nothing) the bytes of scratch it
 * needs when work_bytes is short. */
int64_t cpuk_linear_f32_wbf16(const float *x, int64_t m, int64_t k, const uint16_t *w,
                              int64_t n, const float *bias, float *y, void *work,
                              int64_t work_bytes) {
    const int64_t need = cpuk_linear_wbf16_workspace(m, k);
    if (need > work_bytes) return need;
    if (amx_takes(m, k)) {
        amx_linear_bf16(x, 1, m, k, w, n, bias, 0, y, 0, work);
        return 0;
    }
#ifdef __AVX512BF16__
    if (need > 0) {
        uint16_t *xh = work;
        int64_t c = 0;
        for (; c + 16 <= m * k; c += 16)
            _mm256_storeu_si256((__m256i *)(xh + c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + c)));
        for (; c < m * k; c++) xh[c] = float_bf16(x[c]);
#define TILE_DP(WR_, R_, PF_) tile_dpbf16(xh, k, w, j, n, WR_, i, R_, PF_, PASS, PASSES, out)
        FOR_TILES(TILE_DP);
#undef TILE_DP
        return 0;
    }
#endif
    (void)work;
    if (m == 1 && row_stream) {
        STREAM_TILES(0, 1, store);
        return 0;
    }
#define TILE_WIDE(WR_, R_, PF_) tile_widened(x, k, w, j, n, WR_, i, R_, PF_, PASS, PASSES, wbuf, out)
    FOR_TILES_WBUF(TILE_WIDE, store, WIDEN_FLOATS(k));
#undef TILE_WIDE
    return 0;
}

#ifdef __AVX2__
/* The integer path of the int8 projection: x rounded to int16 per row (15 bits, 2^-15
 * relative, against int8 weights' 2^-8), then int8 x int16 products summed pairwise in int32:
 * vpmaddwd and an add on AVX2 (three instructions per sixteen weights where widening to float
 * takes six), and on AVX-512 thirty-two weights per vector, with AVX512-VNNI's vpdpwssd fusing
 * the multiply and the add. The int32 sums are moved to float every FLUSH columns, long before
 * they could overflow (a lane sums at most FLUSH / 8 products: 128 * 127 * 32767 < 2^31). */
#define X16_MAX 32767.0f
#define FLUSH 1024

#ifdef __AVX512BW__
#define XW 32 /* int16 lanes per vector */
typedef __m512i xvec;
typedef __m512 xsum;
#define HALF_MASK 0xFFFF /* the first 16 of the 32 lanes: a last step of 16 columns */
ALWAYS_INLINE xvec xv_zero(void) { return _mm512_setzero_si512(); }
ALWAYS_INLINE xvec xv_w(const char *p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}
ALWAYS_INLINE xvec xv_w_half(const char *p) {
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(HALF_MASK, p));
}
ALWAYS_INLINE xvec xv_x(const int16_t *p) { return _mm512_loadu_si512(p); }
ALWAYS_INLINE xvec xv_x_half(const int16_t *p) { return _mm512_maskz_loadu_epi16(HALF_MASK, p); }
ALWAYS_INLINE xvec xv_dot(xvec acc, xvec w, xvec x) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, w, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}
ALWAYS_INLINE xsum xs_splat(float s) { return _mm512_set1_ps(s); }
ALWAYS_INLINE xsum xs_float(xvec acc) { return _mm512_cvtepi32_ps(acc); }
ALWAYS_INLINE float xs_hsum(xsum v) { return _mm512_reduce_add_ps(v); }
#else
#define XW 16
typedef __m256i xvec;
typedef v8f xsum;
ALWAYS_INLINE xvec xv_zero(void) { return _mm256_setzero_si256(); }
ALWAYS_INLINE xvec xv_w(const char *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}
ALWAYS_INLINE xvec xv_x(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
ALWAYS_INLINE xvec xv_dot(xvec acc, xvec w, xvec x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
}
ALWAYS_INLINE xsum xs_splat(float s) { return vsplat(s); }
ALWAYS_INLINE xsum xs_float(xvec acc) { return (v8f)_mm256_cvtepi32_ps(acc); }
ALWAYS_INLINE float xs_hsum(xsum v) { return hsum(v); }
#endif

/* [c0, c1) is a multiple of 16 columns: whole vectors, then on AVX-512 maybe a half one. */
ALWAYS_INLINE void tile_x16(const char *const rows[MAX_WR], int WR, int64_t k,
                            const int16_t *const *xs, int R, int64_t c0, int64_t c1, int PF,
                            xvec acc[MAX_WR][MAX_XR]) {
    const char *ahead = rows[0] + PREFETCH_TILES * WR * k;
    int64_t c = c0;
    for (; c + XW <= c1; c += XW) {
        for (int b = 0; b < WR * XW; b += 64) PREFETCH(ahead + c * WR + b, PF);
        xvec wv[MAX_WR];
        for (int q = 0; q < WR; q++) {
            wv[q] = xv_w(rows[q] + c);
            IN_REGISTER(wv[q]);
        }
        for (int r = 0; r < R; r++) {
            xvec xv = xv_x(xs[r] + c);
            IN_REGISTER(xv);
            for (int q = 0; q < WR; q++) acc[q][r] = xv_dot(acc[q][r], wv[q], xv);
        }
    }
#if XW == 32
    if (c < c1) {
        xvec wv[MAX_WR];
        for (int q = 0; q < WR; q++) wv[q] = xv_w_half(rows[q] + c);
        for (int r = 0; r < R; r++) {
            xvec xv = xv_x_half(xs[r] + c);
            for (int q = 0; q < WR; q++) acc[q][r] = xv_dot(acc[q][r], wv[q], xv);
        }
    }
#endif
}

/* k and group are multiples of 16; xq: x as int16, xs: its per-row scales. */
ALWAYS_INLINE void tile_i8_x16(const int16_t *xq, const float *xscale, int64_t k,
                               const int8_t *w, const float *scale, int64_t group, int64_t j,
                               int64_t n, int WR, int64_t i, int R, int PF,
                               float out[MAX_WR][MAX_XR]) {
    const int16_t *xs[MAX_XR];
    for (int r = 0; r < R; r++) xs[r] = xq + (i + r) * k;
    const char *rows[MAX_WR];
    tile_rows((const char *)w, k, j, n, WR, rows);
    const int64_t groups = k / group;
    xsum total[MAX_WR][MAX_XR];
    for (int q = 0; q < WR; q++)
        for (int r = 0; r < R; r++) total[q][r] = xs_splat(0.0f);
    for (int64_t g = 0; g < groups; g++) {
        xsum s[MAX_WR];
        for (int q = 0; q < WR; q++) s[q] = xs_splat(scale[(j + q < n ? j + q : n - 1) * groups + g]);
        for (int64_t c0 = g * group; c0 < (g + 1) * group; c0 += FLUSH) {
            int64_t c1 = c0 + FLUSH < (g + 1) * group ? c0 + FLUSH : (g + 1) * group;
            xvec acc[MAX_WR][MAX_XR];
            for (int q = 0; q < WR; q++)
                for (int r = 0; r < R; r++) acc[q][r] = xv_zero();
            tile_x16(rows, WR, k, xs, R, c0, c1, PF, acc);
            for (int q = 0; q < WR; q++)
                for (int r = 0; r < R; r++) total[q][r] += xs_float(acc[q][r]) * s[q];
        }
    }
#if XW == 32
    if (WR == 4) { /* as tile_float's: per channel, the projection above took 23.1 / 40.0 /
                      74.4 / 137 us against 23.8 / 41.5 / 76.3 / 147 (groups of 64, whose
                      per-group conversions outweigh it, the same) */
        reduce_4x4(total, R, out);
        for (int q = 0; q < WR; q++)
            for (int r = 0; r < R; r++) out[q][r] *= xscale[i + r];
        return;
    }
#endif
    for (int q = 0; q < WR; q++)
        for (int r = 0; r < R; r++) out[q][r] = xs_hsum(total[q][r]) * xscale[i + r];
}

/* One row of x (row_stream_i8): the tile's four weight rows read one after another, as
 * tile_stream reads float32's, prefetching STREAM_AHEAD bytes ahead. Each row's FLUSH block
 * sums in two int32 accumulators, the even and the odd vectors, which add up to tile_x16's
 * one exactly (integer sums), so the float sums that follow, and the result, are the tiles'
 * bit for bit. */
ALWAYS_INLINE xvec row_x16(const char *row, const int16_t *x, int64_t c0, int64_t c1) {
    xvec a0 = xv_zero(), a1 = xv_zero();
    int64_t c = c0;
    for (; c + 2 * XW <= c1; c += 2 * XW) {
        __builtin_prefetch(row + c + STREAM_AHEAD, 0, 2);
        a0 = xv_dot(a0, xv_w(row + c), xv_x(x + c));
        a1 = xv_dot(a1, xv_w(row + c + XW), xv_x(x + c + XW));
    }
    if (c + XW <= c1) {
        a0 = xv_dot(a0, xv_w(row + c), xv_x(x + c));
        c += XW;
    }
#if XW == 32
    if (c < c1) a1 = xv_dot(a1, xv_w_half(row + c), xv_x_half(x + c));
#endif
#ifdef __AVX512BW__
    return _mm512_add_epi32(a0, a1);
#else
    return _mm256_add_epi32(a0, a1);
#endif
}

ALWAYS_INLINE void tile_i8_x16_stream(const int16_t *xq, const float *xscale, int64_t k,
                                      const int8_t *w, const float *scale, int64_t group,
                                      int64_t j, int64_t n, float out[MAX_WR][MAX_XR]) {
    const char *rows[MAX_WR];
    tile_rows((const char *)w, k, j, n, 4, rows);
    const int64_t groups = k / group;
    xsum total[MAX_WR][MAX_XR];
    for (int q = 0; q < 4; q++) {
        const float *s = scale + (j + q < n ? j + q : n - 1) * groups;
        xsum t = xs_splat(0.0f);
        for (int64_t g = 0; g < groups; g++)
            for (int64_t c0 = g * group; c0 < (g + 1) * group; c0 += FLUSH) {
                int64_t c1 = c0 + FLUSH < (g + 1) * group ? c0 + FLUSH : (g + 1) * group;
                t += xs_float(row_x16(rows[q], xq, c0, c1)) * xs_splat(s[g]);
            }
        total[q][0] = t;
    }
#if XW == 32
    reduce_4x4(total, 1, out);
    for (int q = 0; q < 4; q++) out[q][0] *= xscale[0];
#else
    for (int q = 0; q < 4; q++) out[q][0] = xs_hsum(total[q][0]) * xscale[0];
#endif
}

/* x rows to int16 with per-row scales max|x| / 32767 (0 rows get scale 0). Eight columns at
 * a time: vcvtps2dq rounds as lrintf does (to nearest even, the MXCSR mode), and a scalar
 * lrintf is a libm call, which had made this a quarter of a 16-row projection's time. */
static void quantize_x16(const float *x, int64_t m, int64_t k, int16_t *xq, float *xscale) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < m; i++) {
        const float *row = x + i * k;
        int16_t *out = xq + i * k;
        const int64_t kv = k - k % 8;
        __m256 vmax = _mm256_setzero_ps();
        for (int64_t c = 0; c < kv; c += 8)
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(row + c), abs_mask));
        float lanes[8];
        _mm256_storeu_ps(lanes, vmax);
        float amax = 0.0f;
        for (int l = 0; l < 8; l++) amax = lanes[l] > amax ? lanes[l] : amax;
        for (int64_t c = kv; c < k; c++) amax = fabsf(row[c]) > amax ? fabsf(row[c]) : amax;
        const float inv = amax > 0.0f ? X16_MAX / amax : 0.0f;
        xscale[i] = amax / X16_MAX;
        const __m256 vinv = _mm256_set1_ps(inv);
        for (int64_t c = 0; c < kv; c += 8) {
            const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + c), vinv));
            const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(q),
                                              _mm256_extracti128_si256(q, 1));
            _mm_storeu_si128((__m128i *)(out + c), h);
        }
        for (int64_t c = kv; c < k; c++) out[c] = (int16_t)lrintf(row[c] * inv);
    }
}
#endif

/* The integer path, where it is taken, rounds x to int16 into the caller's scratch: m
 * per-row scales, then the m * k values; then on AMX the tiles' copy of them. */
int64_t cpuk_linear_i8_workspace(int64_t m, int64_t k, int64_t group) {
#ifdef __AVX2__
    if (k % 16 == 0 && group % 16 == 0)
        return m * (int64_t)sizeof(float) + m * k * (int64_t)sizeof(int16_t) +
               (amx_i8_takes(m, k, group) ? amx_workspace(m, k) : 0);
#endif
    (void)m;
    (void)k;
    (void)group;
    return 0;
}

/* As cpuk_linear_f32 with int8 w and scale [n, k / group]; k and group are multiples of 8.
 * Returns 0, or (computing nothing) the bytes of scratch it needs when work_bytes is short. */
int64_t cpuk_linear_i8(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale,
                       int64_t group, int64_t n, const float *bias, float *y, void *work,
                       int64_t work_bytes) {
    const int64_t need = cpuk_linear_i8_workspace(m, k, group);
    if (need > work_bytes) return need;
#ifdef __AVX2__
    if (need > 0) {
        float *xscale = work;
        int16_t *xq = (int16_t *)(xscale + m);
        quantize_x16(x, m, k, xq, xscale);
        if (amx_i8_takes(m, k, group)) {
            amx_linear_i8(xq, xscale, m, k, w, scale, group, n, bias, y, xq + m * k);
            return 0;
        }
        if (m == 1 && row_stream_i8) {
            FOR_STOLEN_TILES((n + 3) / 4, n * k > 65536, jt, {
                float out[MAX_WR][MAX_XR];
                tile_i8_x16_stream(xq, xscale, k, w, scale, group, jt * 4, n, out);
                store(out, 4, 1, 0, jt * 4, n, bias, y);
            });
            return 0;
        }
#define TILE_X16(WR_, R_, PF_) tile_i8_x16(xq, xscale, k, w, scale, group, j, n, WR_, i, R_, PF_, out)
        FOR_TILES(TILE_X16);
#undef TILE_X16
        return 0;
    }
#endif
    (void)work;
#define TILE_I8(WR_, R_, PF_) tile_i8(x, k, w, scale, group, j, n, WR_, i, R_, PF_, out)
    FOR_TILES(TILE_I8);
#undef TILE_I8
    return 0;
}

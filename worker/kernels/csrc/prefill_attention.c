/* Causal attention of a prefill chunk, fused (flash attention): queries in tasks of
 * PA_ROWS (query, head) rows of one kv head, keys and values in steps of PA_STEP, a running
 * max and sum per row, no score matrix in memory.
 *
 * The scores of a step are a small GEMM with the keys along the vector: the keys are
 * transposed once per call ([block][d][PA_KEYS]), so each of the d columns is PA_NV loads and
 * PA_ROWS x PA_NV multiply-adds with a query element broadcast from memory, and the weighted
 * values add into accumulators that stay in registers for a group of rows. Both are compiled
 * with head_dim 64 and 128 as constants. Each row reads only the keys it can see (the mask is
 * applied to the step that straddles its position), so the masked half of the scores is
 * never computed.
 *
 * It replaces two batched GEMMs around a causal softmax (cpu_ops.py, cpuk_causal_softmax),
 * which ran at a fifth to a half of the two cores' peak on their small inner dimension
 * (head_dim), on AVX-512 only: on a Zen 4, SmolLM2's heads (9 x 64, 3 kv heads) over 256-2,048
 * tokens took 1.92-2.34x less time than the GEMMs, Qwen3's (16 x 128, 8 kv heads)
 * 1.26-1.70x. An eight-lane version (built for AVX2 there; AVX2's multiply-adds cannot
 * broadcast from memory) ran 0.84-1.34x the GEMMs, slower on the longer contexts, and was not
 * kept: AVX2 keeps the GEMMs. */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "kernels.h"
#include "vec.h"

#define MAX_D 256

#ifdef __AVX512F__
#define PA_KEYS 16
typedef v16f vk;
typedef v16i vki;
#define PA_ROWS 12 /* (query, head) rows a task computes: their scores fill 12 registers; 8,
                      16 and 24 rows ran 1.06-1.39x slower on a Zen 4 */
#define PV_REGS 24 /* accumulators of the weighted values a group of rows keeps in registers */
#define PA_NV 2 /* vectors of scores a row takes a step: 24 registers with PA_ROWS (one vector
                   a step ran 1.05-1.17x slower on a Zen 4) */
#define PA_STEP (PA_NV * PA_KEYS) /* keys a step */

/* Rows of one task: their scaled queries [PA_ROWS][d], the last key each may see, and where
 * their outputs go (NULL: a row that pads the last task, computed and dropped). */
typedef struct {
    float q[PA_ROWS][MAX_D] __attribute__((aligned(64)));
    int64_t last[PA_ROWS];
    float *out[PA_ROWS];
} pa_rows;

/* o[r] = o[r] * corr[r] + p[r] . v for the block's keys (v: the first one's values), over
 * the vectors c0 .. c0 + cw of each row, rows in groups whose accumulators fill PV_REGS. */
ALWAYS_INLINE void add_values(float o[PA_ROWS][MAX_D], const float p[PA_ROWS][PA_STEP],
                              const float *corr, const float *v, int64_t D, int64_t keys,
                              int64_t c0, int64_t cw) {
    const int rg = (int)(PV_REGS / cw);
    for (int r0 = 0; r0 < PA_ROWS; r0 += rg) {
        const int rn = PA_ROWS - r0 < rg ? PA_ROWS - r0 : rg;
        vk acc[PV_REGS];
        for (int r = 0; r < rn; r++)
            for (int64_t c = 0; c < cw; c++)
                acc[r * cw + c] = *(const vk *)(o[r0 + r] + (c0 + c) * PA_KEYS) * corr[r0 + r];
        for (int64_t j = 0; j < keys; j++) {
            const float *vj = v + j * D + c0 * PA_KEYS;
            for (int64_t c = 0; c < cw; c++) {
                const vk vv = *(const vk *)(vj + c * PA_KEYS);
                for (int r = 0; r < rn; r++) acc[r * cw + c] += p[r0 + r][j] * vv;
            }
        }
        for (int r = 0; r < rn; r++)
            for (int64_t c = 0; c < cw; c++)
                *(vk *)(o[r0 + r] + (c0 + c) * PA_KEYS) = acc[r * cw + c];
    }
}

/* The task's rows against keys kt ([block][D][PA_KEYS], transposed) and values v ([key][D]).
 * D is a constant after inlining (64, 128) or the runtime head_dim. */
ALWAYS_INLINE void attend_rows(const pa_rows *rows, const float *kt, const float *v, int64_t D) {
    float o[PA_ROWS][MAX_D] __attribute__((aligned(64)));
    float p[PA_ROWS][PA_STEP] __attribute__((aligned(64)));
    float m[PA_ROWS], l[PA_ROWS], corr[PA_ROWS];
    int64_t lo = rows->last[0], hi = rows->last[0];
    for (int r = 0; r < PA_ROWS; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int64_t c = 0; c < D; c++) o[r][c] = 0.0f;
        lo = rows->last[r] < lo ? rows->last[r] : lo;
        hi = rows->last[r] > hi ? rows->last[r] : hi;
    }
    const int64_t vd = D / PA_KEYS; /* vectors per row of values (D is a multiple) */
    vki lane;
    for (int j = 0; j < PA_KEYS; j++) lane[j] = j;
    for (int64_t first = 0; first <= hi; first += PA_STEP) {
        const float *kb = kt + first * D;
        vk s[PA_ROWS][PA_NV];
        for (int r = 0; r < PA_ROWS; r++)
            for (int u = 0; u < PA_NV; u++) s[r][u] = (vk){0};
        for (int64_t c = 0; c < D; c++) {
            vk kv[PA_NV];
            for (int u = 0; u < PA_NV; u++) kv[u] = *(const vk *)(kb + (u * D + c) * PA_KEYS);
            for (int r = 0; r < PA_ROWS; r++)
                for (int u = 0; u < PA_NV; u++) s[r][u] += rows->q[r][c] * kv[u];
        }
        for (int r = 0; r < PA_ROWS; r++) {
            if (first + PA_STEP - 1 > lo) /* the step straddles some row's last key */
                for (int u = 0; u < PA_NV; u++) {
                    const vki hidden = lane > (vki){0} + (int32_t)(rows->last[r] - first - u * PA_KEYS);
                    s[r][u] = VSELECT(vk, vki, hidden, (vk){0} - INFINITY, s[r][u]);
                }
            vk top = s[r][0];
            for (int u = 1; u < PA_NV; u++) top = (vk)_mm512_max_ps((__m512)top, (__m512)s[r][u]);
            const float mx = _mm512_reduce_max_ps((__m512)top);
            if (mx == -INFINITY) { /* this row sees none of these keys */
                corr[r] = 1.0f;
                for (int u = 0; u < PA_NV; u++) *(vk *)(p[r] + u * PA_KEYS) = (vk){0};
                continue;
            }
            const float mnew = mx > m[r] ? mx : m[r];
            corr[r] = mnew == m[r] ? 1.0f : expf(m[r] - mnew);
            vk sum = (vk){0};
            for (int u = 0; u < PA_NV; u++) {
                const vk e = vexp16(s[r][u] - mnew);
                sum += e;
                *(vk *)(p[r] + u * PA_KEYS) = e;
            }
            l[r] = l[r] * corr[r] + _mm512_reduce_add_ps((__m512)sum);
            m[r] = mnew;
        }
        const int64_t keys = hi - first + 1 < PA_STEP ? hi - first + 1 : PA_STEP;
        /* The values' vectors in chunks of at most PV_REGS / 3, so that a group of at least
         * three rows shares each vector loaded (cw is a constant for a constant D). */
        const int64_t cw = vd < PV_REGS / 3 ? vd : PV_REGS / 3;
        int64_t c0 = 0;
        for (; c0 + cw <= vd; c0 += cw) add_values(o, p, corr, v + first * D, D, keys, c0, cw);
        if (c0 < vd) add_values(o, p, corr, v + first * D, D, keys, c0, vd - c0);
    }
    for (int r = 0; r < PA_ROWS; r++) {
        if (rows->out[r] == NULL) continue;
        const float inv = 1.0f / l[r];
        for (int64_t c = 0; c < D; c++) rows->out[r][c] = o[r][c] * inv;
    }
}

int64_t cpuk_prefill_attention_takes(int64_t head_dim) {
    return head_dim > 0 && head_dim % PA_KEYS == 0 && head_dim <= MAX_D;
}

/* Blocks of PA_KEYS keys that hold a context, in whole steps (zeros past its end). */
static int64_t key_blocks(int64_t context) { return (context + PA_STEP - 1) / PA_STEP * PA_NV; }

int64_t cpuk_prefill_attention(const float *q, int64_t t, int64_t heads, int64_t kv_heads,
                               int64_t head_dim, const float *k, const float *v,
                               int64_t context, float scale, float *out, void *work,
                               int64_t work_bytes) {
    if (!cpuk_prefill_attention_takes(head_dim) || context < t) return -1;
    const int64_t d = head_dim, group = heads / kv_heads;
    const int64_t blocks = key_blocks(context);
    /* The scratch holds the keys, transposed. */
    const int64_t need = (int64_t)sizeof(float) * kv_heads * blocks * PA_KEYS * d;
    if (need > work_bytes) return need;
    float *kt = work;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t h = 0; h < kv_heads; h++)
        for (int64_t b = 0; b < blocks; b++) {
            float *dst = kt + (h * blocks + b) * d * PA_KEYS;
            for (int j = 0; j < PA_KEYS; j++) {
                const int64_t key = b * PA_KEYS + j;
                for (int64_t c = 0; c < d; c++)
                    dst[c * PA_KEYS + j] = key < context ? k[(h * context + key) * d + c] : 0.0f;
            }
        }
    const int64_t rows_per_head = t * group, tasks = (rows_per_head + PA_ROWS - 1) / PA_ROWS;
    /* Later queries see more keys: the tasks go from the longest down, taken as threads free. */
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t h = 0; h < kv_heads; h++)
        for (int64_t i = 0; i < tasks; i++) {
            const int64_t task = tasks - 1 - i;
            pa_rows rows;
            for (int r = 0; r < PA_ROWS; r++) {
                const int64_t row = task * PA_ROWS + r < rows_per_head ? task * PA_ROWS + r
                                                                       : rows_per_head - 1;
                const int64_t qi = row / group, head = h * group + row % group;
                const float *src = q + (qi * heads + head) * d;
                for (int64_t c = 0; c < d; c++) rows.q[r][c] = src[c] * scale;
                rows.last[r] = context - t + qi;
                rows.out[r] = task * PA_ROWS + r < rows_per_head ? out + (qi * heads + head) * d
                                                                 : NULL;
            }
            const float *kh = kt + h * blocks * d * PA_KEYS, *vh = v + h * context * d;
            if (d == 64) attend_rows(&rows, kh, vh, 64);
            else if (d == 128) attend_rows(&rows, kh, vh, 128);
            else attend_rows(&rows, kh, vh, d);
        }
    return 0;
}

#else
int64_t cpuk_prefill_attention_takes(int64_t head_dim) {
    (void)head_dim;
    return 0;
}

int64_t cpuk_prefill_attention(const float *q, int64_t t, int64_t heads, int64_t kv_heads,
                               int64_t head_dim, const float *k, const float *v,
                               int64_t context, float scale, float *out, void *work,
                               int64_t work_bytes) {
    (void)q, (void)t, (void)heads, (void)kv_heads, (void)head_dim, (void)k, (void)v;
    (void)context, (void)scale, (void)out, (void)work, (void)work_bytes;
    return -1;
}
#endif

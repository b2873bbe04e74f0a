/* Decode attention straight from the paged KV cache: one query token per sequence.
 *
 * The cache of a layer is [2, kv_heads, slots, head_dim] (keys, then values), token t of a
 * sequence in slot block_table[t / block_size] * block_size + t % block_size. Each task is
 * one (sequence, kv head), or a part of its context when there are fewer of those than
 * threads, reading keys and values in place, block by block, so no gathered copy of the
 * context is made. The scores and the parts' partial results live in the caller's scratch.
 * A bfloat16 cache is widened to float32 as it is read; the arithmetic is float32 either way,
 * and the same bit for bit: the multiply-adds are fused where the code says so (vfma) and
 * nowhere else, as the compiler otherwise decides per instantiation which products it fuses
 * (on a Zen 4 GCC 12 fused the two caches' loops differently, 1-2 ulp apart). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "kernels.h"
#include "vec.h"

#define ACC 8 /* output vectors a head's weighted sum of values keeps in registers */
#define MIN_PART 64 /* fewest context tokens worth a separate task */

/* scores[t] = scale * q . k_t for the block's `count` tokens, keys from element `at` of the
 * cache (bfloat16 with BF): eight tokens at a time, their eight sums reduced together. */
ALWAYS_INLINE void block_scores(const float *q, int64_t dv, const void *cache, int64_t at,
                                int BF, int64_t count, float scale, float *scores) {
    int64_t t = 0;
    for (; t + 8 <= count; t += 8) {
        v8f a[8];
        for (int u = 0; u < 8; u++) a[u] = vsplat(0.0f);
        for (int64_t c = 0; c < dv; c++) {
            const v8f qc = vload(q + 8 * c);
            for (int u = 0; u < 8; u++)
                a[u] = vfma(qc, vload_any(cache, at + ((t + u) * dv + c) * 8, BF), a[u]);
        }
        vstore(scores + t, hsum8(a) * vsplat(scale));
    }
    for (; t < count; t++) {
        v8f a = vsplat(0.0f);
        for (int64_t c = 0; c < dv; c++)
            a = vfma(vload(q + 8 * c), vload_any(cache, at + (t * dv + c) * 8, BF), a);
        scores[t] = hsum(a) * scale;
    }
}

/* The cache element of token t0's slot (head offset `head`) and the tokens left in its block
 * before `t_end`. */
ALWAYS_INLINE int64_t slot_of(const int32_t *table, int64_t t0, int64_t t_end,
                              int64_t block_size, int64_t head, int64_t d, int64_t *count) {
    const int64_t stop = (t0 / block_size + 1) * block_size;
    *count = (stop < t_end ? stop : t_end) - t0;
    return head + ((int64_t)table[t0 / block_size] * block_size + t0 % block_size) * d;
}

/* Fetches the block after the one at t0 (keys or values from element `head`) into L2 while
 * this one is worked on: a block is one 4 KiB page for 16 tokens of head_dim 64, and the
 * hardware prefetchers stop at each page's end. Into L2, not L1: a block's 64 lines at once
 * overran L1's miss buffers. On a Zen 4, 16 sequences of 250 tokens over 30 layers with
 * their blocks scattered (as a serving cache's become) took 22.1-24.8 ms on one thread and
 * 12.3-16.0 on two, against 29.1-32.7 and 16.1-19.0 prefetching into L1; with each
 * sequence's blocks in order 20.1-22.2 and 11.0-12.0 against 22.5-24.5 and 11.6-14.8. */
ALWAYS_INLINE void prefetch_block(const void *cache, int BF, const int32_t *table, int64_t t,
                                  int64_t t_end, int64_t block_size, int64_t head, int64_t d) {
    if (t >= t_end) return;
    int64_t count;
    const int64_t at = slot_of(table, t, t_end, block_size, head, d, &count);
    const char *p = (const char *)cache + at * (BF ? 2 : 4);
    for (int64_t b = 0; b < count * d * (BF ? 2 : 4); b += 64) __builtin_prefetch(p + b, 0, 2);
}

/* Or (cpuk_set_attention_prefetch(1)) the first lines of each of the next PAGE_AHEAD blocks
 * only, for the hardware's page prefetcher to fetch the rest of each page: software prefetches
 * wait in L1's few miss buffers, the hardware's do not. On a Xeon with AMX (family 6 model 167
 * as its VM reports it, 2 threads, SmolLM2's heads over 30 layers, alternated in one process),
 * with the blocks scattered: 12 sequences of 400 tokens 12.3-12.6 against 13.8-14.4 ms (1.10-
 * 1.15x), 4 of 2,000 20.9-21.1 against 23.5-24.6, 16 of 250 11.3 against 12.2; with each
 * sequence's blocks in order 11.0-11.3 against 10.9-11.1. A machine property, like the
 * projections' prefetches, so worker/kernels/attention_tuning.py times the two per machine. */
#define PAGE_AHEAD 5
#define PAGE_LINES 2
static int64_t prefetch_pages = 0;

void cpuk_set_attention_prefetch(int64_t pages) { prefetch_pages = pages != 0; }

int64_t cpuk_get_attention_prefetch(void) { return prefetch_pages; }

ALWAYS_INLINE void prefetch_next(const void *cache, int BF, const int32_t *table, int64_t t0,
                                 int64_t count, int64_t t_end, int64_t block_size,
                                 int64_t head, int64_t d) {
    int64_t t = t0 + count;
    if (!prefetch_pages) {
        prefetch_block(cache, BF, table, t, t_end, block_size, head, d);
        return;
    }
    for (int i = 0; i < PAGE_AHEAD && t < t_end; i++, t = (t / block_size + 1) * block_size) {
        int64_t left;
        const char *p = (const char *)cache
                        + slot_of(table, t, t_end, block_size, head, d, &left) * (BF ? 2 : 4);
        for (int l = 0; l < PAGE_LINES; l++) __builtin_prefetch(p + 64 * l, 0, 2);
    }
}

/* A part's scores sc[0 .. len) become e^(s - max), in place; stats gets the max and the sum
 * of the exponentials. */
ALWAYS_INLINE void softmax_part(float *sc, int64_t len, float stats[2]) {
    const float max = row_max(sc, len);
    float sum = 0.0f;
    int64_t t = 0;
#ifdef __AVX512F__
    v16f wide = (v16f){0};
    for (; t + 16 <= len; t += 16) {
        const v16f e = vexp16(*(const v16f *)(sc + t) - max);
        *(v16f *)(sc + t) = e;
        wide += e;
    }
    sum = _mm512_reduce_add_ps((__m512)wide);
#endif
    v8f vsum = vsplat(0.0f);
    for (; t + 8 <= len; t += 8) {
        v8f e = vexp(vload(sc + t) - vsplat(max));
        vstore(sc + t, e);
        vsum += e;
    }
    sum += hsum(vsum);
    for (; t < len; t++) {
        sc[t] = expf(sc[t] - max);
        sum += sc[t];
    }
    stats[0] = max;
    stats[1] = sum;
}

/* One (sequence, kv head, part of the context [t_begin, t_end)), block by block, every query
 * head of the group on each block in turn: the block's keys and values (4 KiB each for 16
 * tokens of head_dim 64) come from memory once and from L1 for the group's other heads.
 * Writes per head the unnormalised output (sum_t e^(s_t - max) v_t), the max and the sum to
 * part, [group][d + 2], which holds the partial output between blocks. keys, values: the
 * head's first element in the cache (bfloat16 with BF). scores: head g's t_end - t_begin
 * floats at g * sstride of scratch. */
ALWAYS_INLINE void attend(const float *qs, int64_t group, int64_t dv, const void *cache,
                          int BF, int64_t keys, int64_t values, const int32_t *table,
                          int64_t t_begin, int64_t t_end, int64_t block_size, float scale,
                          float *scores, int64_t sstride, float *part) {
    const int64_t d = dv * 8, len = t_end - t_begin;
    int64_t count;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += count) {
        const int64_t k = slot_of(table, t0, t_end, block_size, keys, d, &count);
        prefetch_next(cache, BF, table, t0, count, t_end, block_size, keys, d);
        for (int64_t g = 0; g < group; g++)
            block_scores(qs + g * d, dv, cache, k, BF, count, scale,
                         scores + g * sstride + (t0 - t_begin));
    }
    for (int64_t g = 0; g < group; g++) {
        float *o = part + g * (d + 2);
        softmax_part(scores + g * sstride, len, o + d);
        for (int64_t c = 0; c < d; c++) o[c] = 0.0f;
    }
    for (int64_t t0 = t_begin; t0 < t_end; t0 += count) {
        const int64_t v = slot_of(table, t0, t_end, block_size, values, d, &count);
        prefetch_next(cache, BF, table, t0, count, t_end, block_size, values, d);
        for (int64_t g = 0; g < group; g++) {
            const float *p = scores + g * sstride + (t0 - t_begin);
            float *o = part + g * (d + 2);
            /* eight vectors of the output at a time, kept in registers over the block's
             * tokens (with head_dim a constant, see attend_cache) */
            for (int64_t c0 = 0; c0 < dv; c0 += ACC) {
                const int64_t w = dv - c0 < ACC ? dv - c0 : ACC;
                v8f acc[ACC];
                for (int64_t c = 0; c < w; c++) acc[c] = vload(o + 8 * (c0 + c));
                for (int64_t i = 0; i < count; i++) {
                    const v8f pv = vsplat(p[i]);
                    for (int64_t c = 0; c < w; c++)
                        acc[c] = vfma(pv, vload_any(cache, v + i * d + 8 * (c0 + c), BF),
                                      acc[c]);
                }
                for (int64_t c = 0; c < w; c++) vstore(o + 8 * (c0 + c), acc[c]);
            }
        }
    }
}

#ifdef __AVX512F__
/* attend on sixteen lanes, for head_dim a multiple of 16: all the group's query heads (up to
 * four at a time, GH) take each key and value vector from one load. Keys: four tokens at a
 * time against every head, their 4 x 4 sums reduced together (reduce_4x4); values: each
 * token's vectors multiplied into every head's output, which for a group of up to four stays
 * in registers over the whole context (CW vectors of it at a time). The eight-lane attend,
 * which AVX2 and other head_dims keep, reloads a block's keys and values from L1 for each head
 * of the group and sums each token's scores apart: on a Xeon (family 6 model 207, 2 threads),
 * 16 sequences of 400 tokens of SmolLM2's heads took 570-743 us a layer with it against
 * 489-648 (0.78-0.87x) with this, reading 16-20 GB/s where one row of a projection streams at
 * 28-31; a bfloat16 cache 0.61-0.77x, Qwen3-0.6B's heads (16 over 8, head_dim 128)
 * 0.83-0.87x, Qwen2.5-7B's (28 over 4) 0.87-0.91x and 0.55-0.61x on a bfloat16 cache. */
ALWAYS_INLINE __m512 load16(const void *p, int64_t c, int BF) {
    if (BF)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + c))),
            16));
    return _mm512_loadu_ps((const float *)p + c);
}

/* scores[h * sstride + t] = scale * q_h . k_t for the GH heads at qs and R (1-4) tokens from
 * element `at`. */
ALWAYS_INLINE void scores_4x4(const float *qs, int GH, int64_t d16, const void *cache,
                              int64_t at, int BF, int R, float scale, float *scores,
                              int64_t sstride) {
    const int64_t d = d16 * 16;
    __m512 acc[4][4];
    for (int h = 0; h < 4; h++)
        for (int r = 0; r < 4; r++) acc[h][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d16; c++) {
        __m512 kv[4];
        for (int r = 0; r < R; r++) kv[r] = load16(cache, at + r * d + 16 * c, BF);
        for (int h = 0; h < GH; h++) {
            const __m512 qv = _mm512_loadu_ps(qs + h * d + 16 * c);
            for (int r = 0; r < R; r++) acc[h][r] = _mm512_fmadd_ps(qv, kv[r], acc[h][r]);
        }
    }
    float out[4][4];
    reduce_4x4(acc, R, out);
    for (int h = 0; h < GH; h++)
        for (int r = 0; r < R; r++) scores[h * sstride + r] = out[h][r] * scale;
}

/* acc[h][c] += p_h,i v_i over a block's `count` tokens, for the w vectors of head_dim from
 * c0 (values from element v): each value vector loaded once for the GH heads. */
ALWAYS_INLINE void block_values(__m512 acc[4][8], const float *p, int64_t sstride, int GH,
                                int64_t d16, int64_t c0, int64_t w, const void *cache, int BF,
                                int64_t v, int64_t count) {
    const int64_t d = d16 * 16;
    for (int64_t i = 0; i < count; i++) {
        __m512 vv[8];
        for (int64_t c = 0; c < w; c++) vv[c] = load16(cache, v + i * d + 16 * (c0 + c), BF);
        for (int h = 0; h < GH; h++) {
            const __m512 pv = _mm512_set1_ps(p[h * sstride + i]);
            for (int64_t c = 0; c < w; c++) acc[h][c] = _mm512_fmadd_ps(pv, vv[c], acc[h][c]);
        }
    }
}

/* The GH heads' (unnormalised) outputs over the task's tokens: o_h += p_h,t v_t, every
 * head's CW vectors kept in registers over the whole context (the caller takes it where they
 * cover head_dim in one pass). */
ALWAYS_INLINE void values_16(const float *scores, int64_t sstride, int GH, int64_t d16, int CW,
                             const void *cache, int BF, int64_t values, const int32_t *table,
                             int64_t t_begin, int64_t t_end, int64_t block_size, float *part,
                             int64_t pstride) {
    const int64_t d = d16 * 16;
    for (int64_t c0 = 0; c0 < d16; c0 += CW) {
        const int64_t w = d16 - c0 < CW ? d16 - c0 : CW;
        __m512 acc[4][8];
        for (int h = 0; h < GH; h++)
            for (int64_t c = 0; c < w; c++) acc[h][c] = _mm512_setzero_ps();
        int64_t count;
        for (int64_t t0 = t_begin; t0 < t_end; t0 += count) {
            const int64_t v = slot_of(table, t0, t_end, block_size, values, d, &count);
            if (c0 == 0) prefetch_next(cache, BF, table, t0, count, t_end, block_size, values, d);
            block_values(acc, scores + (t0 - t_begin), sstride, GH, d16, c0, w, cache, BF, v,
                         count);
        }
        for (int h = 0; h < GH; h++)
            for (int64_t c = 0; c < w; c++) _mm512_storeu_ps(part + h * pstride + 16 * (c0 + c), acc[h][c]);
    }
}

/* The group's values where its outputs do not fit in registers (more than four heads, or
 * three or four of head_dim over 64), block by block: each block's vectors are loaded once
 * for four heads at a time (from L1 for the next four), and the outputs kept in part between
 * blocks, as the eight-lane attend does. Taking the heads four at a time over the whole
 * context instead read every key and value again for the next four: Qwen2.5-7B's heads (28
 * over 4, head_dim 128) over 4,096 tokens took 1.32x the eight-lane code's time. */
ALWAYS_INLINE void values_block(const float *p, int64_t sstride, int GH, int64_t d16,
                                const void *cache, int BF, int64_t v, int64_t count, float *o,
                                int64_t pstride) {
    for (int64_t c0 = 0; c0 < d16; c0 += 4) {
        const int64_t w = d16 - c0 < 4 ? d16 - c0 : 4;
        __m512 acc[4][8];
        for (int h = 0; h < GH; h++)
            for (int64_t c = 0; c < w; c++) acc[h][c] = _mm512_loadu_ps(o + h * pstride + 16 * (c0 + c));
        block_values(acc, p, sstride, GH, d16, c0, w, cache, BF, v, count);
        for (int h = 0; h < GH; h++)
            for (int64_t c = 0; c < w; c++) _mm512_storeu_ps(o + h * pstride + 16 * (c0 + c), acc[h][c]);
    }
}

/* FN(GH, args) with GH = n (1-4) a constant. */
#define BY_HEADS(n, FN, ...)                                                                   \
    do {                                                                                     \
        switch (n) {                                                                         \
        case 1: FN(1, __VA_ARGS__); break;                                                   \
        case 2: FN(2, __VA_ARGS__); break;                                                   \
        case 3: FN(3, __VA_ARGS__); break;                                                   \
        default: FN(4, __VA_ARGS__); break;                                                  \
        }                                                                                    \
    } while (0)

/* As attend (same arguments, d16 = head_dim / 16). Every block of keys and values is read
 * from memory once for the whole group, four query heads at a time. */
ALWAYS_INLINE void attend16(const float *qs, int64_t group, int64_t d16, const void *cache,
                            int BF, int64_t keys, int64_t values, const int32_t *table,
                            int64_t t_begin, int64_t t_end, int64_t block_size, float scale,
                            float *scores, int64_t sstride, float *part) {
    const int64_t d = d16 * 16, len = t_end - t_begin;
    int64_t count;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += count) {
        const int64_t k = slot_of(table, t0, t_end, block_size, keys, d, &count);
        prefetch_next(cache, BF, table, t0, count, t_end, block_size, keys, d);
        for (int64_t h0 = 0; h0 < group; h0 += 4) {
            const float *q = qs + h0 * d;
            float *sc = scores + h0 * sstride + (t0 - t_begin);
            int64_t t = 0;
#define SCORES(GH, R) scores_4x4(q, GH, d16, cache, k + t * d, BF, R, scale, sc + t, sstride)
            for (; t + 4 <= count; t += 4) BY_HEADS(group - h0, SCORES, 4);
            if (t < count) BY_HEADS(group - h0, SCORES, (int)(count - t));
#undef SCORES
        }
    }
    prefetch_block(cache, BF, table, t_begin, t_end, block_size, values, d);
    for (int64_t h = 0; h < group; h++)
        softmax_part(scores + h * sstride, len, part + h * (d + 2) + d);
    if (group <= 4 && d16 <= (group <= 2 ? 8 : 4)) { /* the outputs fit in registers */
#define VALUES(GH, _)                                                                        \
    values_16(scores, sstride, GH, d16, GH <= 2 ? 8 : 4, cache, BF, values, table, t_begin,   \
              t_end, block_size, part, d + 2)
        BY_HEADS(group, VALUES, 0);
#undef VALUES
        return;
    }
    for (int64_t h = 0; h < group; h++)
        for (int64_t c = 0; c < d; c++) part[h * (d + 2) + c] = 0.0f;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += count) {
        const int64_t v = slot_of(table, t0, t_end, block_size, values, d, &count);
        prefetch_next(cache, BF, table, t0, count, t_end, block_size, values, d);
        for (int64_t h0 = 0; h0 < group; h0 += 4) {
#define BLOCK(GH, _)                                                                         \
    values_block(scores + h0 * sstride + (t0 - t_begin), sstride, GH, d16, cache, BF, v, count, \
                 part + h0 * (d + 2), d + 2)
            BY_HEADS(group - h0, BLOCK, 0);
#undef BLOCK
        }
    }
}
#undef BY_HEADS
#endif

/* attend for either cache dtype, kept out of line (inlined into the parallel loop it ran a few
 * percent slower); each branch is an instantiation with BF constant, and with head_dim
 * constant for 64 and 128. The sum of values then keeps its accumulators in registers: with
 * head_dim a variable GCC 12 kept them on the stack, loaded and stored for every token. On a
 * Zen 3, one thread, SmolLM2's 9 heads of 64 over 800-3,000 cached tokens: 39-44 cycles a
 * token and head before, 20-25 with this and row_max (1.8-1.9x). */
static __attribute__((noinline)) void attend_cache(const float *qs, int64_t group, int64_t dv,
                                                   const void *cache, int64_t cache_bf16,
                                                   int64_t keys, int64_t values,
                                                   const int32_t *table, int64_t t_begin,
                                                   int64_t t_end, int64_t block_size,
                                                   float scale, float *scores, int64_t sstride,
                                                   float *part) {
#define ATTEND(DV, BF)                                                                      \
    attend(qs, group, DV, cache, BF, keys, values, table, t_begin, t_end, block_size, scale,   \
           scores, sstride, part)
#ifdef __AVX512F__
#define ATTEND16(D16, BF)                                                                   \
    attend16(qs, group, D16, cache, BF, keys, values, table, t_begin, t_end, block_size, scale, \
             scores, sstride, part)
    if (dv % 2 == 0) {
        if (dv == 8) {
            if (cache_bf16) ATTEND16(4, 1); else ATTEND16(4, 0);
        } else if (dv == 16) {
            if (cache_bf16) ATTEND16(8, 1); else ATTEND16(8, 0);
        } else {
            if (cache_bf16) ATTEND16(dv / 2, 1); else ATTEND16(dv / 2, 0);
        }
        return;
    }
#undef ATTEND16
#endif
    if (dv == 8) {
        if (cache_bf16) ATTEND(8, 1); else ATTEND(8, 0);
    } else if (dv == 16) {
        if (cache_bf16) ATTEND(16, 1); else ATTEND(16, 0);
    } else {
        if (cache_bf16) ATTEND(dv, 1); else ATTEND(dv, 0);
    }
#undef ATTEND
}

/* Merge the parts of one head (softmax over their union) into out [d]. */
static void combine(const float *parts, int64_t nparts, int64_t stride, int64_t d, float *out) {
    float max = -INFINITY;
    for (int64_t p = 0; p < nparts; p++) max = parts[p * stride + d] > max ? parts[p * stride + d] : max;
    float sum = 0.0f;
    for (int64_t c = 0; c < d; c++) out[c] = 0.0f;
    for (int64_t p = 0; p < nparts; p++) {
        const float *part = parts + p * stride;
        const float w = expf(part[d] - max);
        sum += part[d + 1] * w;
        for (int64_t c = 0; c < d; c++) out[c] += part[c] * w;
    }
    const float inv = 1.0f / sum;
    for (int64_t c = 0; c < d; c++) out[c] *= inv;
}

static int64_t parts_per_thread = 2;

void cpuk_set_attention_parts(int64_t per_thread) { parts_per_thread = per_thread; }

int64_t cpuk_get_attention_parts(void) { return parts_per_thread; }

/* Few (sequence, kv head) pairs would leave threads idle: split each context into parts of
 * at least MIN_PART tokens, merged afterwards (flash-decoding), until there are
 * parts_per_thread tasks per thread (0: never split). Which count is fastest depends on the
 * machine (the merge against idle threads and cache sharing), so it is a setting that
 * worker/kernels/dispatch.py times per machine and model. */
static int64_t split_count(int64_t pairs, int64_t max_context) {
    const int64_t target = parts_per_thread * omp_get_max_threads();
    if (target <= pairs) return 1;
    int64_t splits = (target + pairs - 1) / pairs;
    if (splits > max_context / MIN_PART) splits = max_context / MIN_PART > 0 ? max_context / MIN_PART : 1;
    return splits;
}

/* Scratch for n sequences of up to max_context tokens at the current thread count: the
 * scores, max_context floats per (sequence, query head), then every part's [group][d + 2]. */
int64_t cpuk_decode_attention_workspace(int64_t n, int64_t heads, int64_t kv_heads,
                                        int64_t head_dim, int64_t max_context) {
    const int64_t pairs = n * kv_heads, splits = split_count(pairs, max_context);
    return (int64_t)sizeof(float) * (n * heads * max_context
                                     + pairs * splits * (heads / kv_heads) * (head_dim + 2));
}

/* q: [n, heads, d]; cache: this layer's [2, kv_heads, slots, d], float32 or (cache_bf16)
 * bfloat16; block_tables: [n, max_blocks]; context_lens: [n]; out: [n, heads, d]. head_dim is
 * a multiple of 8 up to 256 (checked by the caller). Returns 0, or (computing nothing) the
 * bytes of scratch it needs when work_bytes is short. */
int64_t cpuk_decode_attention(const float *q, int64_t n, int64_t heads, int64_t kv_heads,
                              int64_t head_dim, const void *cache, int64_t cache_bf16,
                              int64_t slots,
                              const int32_t *block_tables, int64_t max_blocks,
                              const int32_t *context_lens, int64_t block_size, float scale,
                              float *out, void *work, int64_t work_bytes) {
    const int64_t group = heads / kv_heads, d = head_dim, stride = d + 2, pairs = n * kv_heads;
    int64_t max_ctx = 0;
    for (int64_t s = 0; s < n; s++) max_ctx = context_lens[s] > max_ctx ? context_lens[s] : max_ctx;
    const int64_t need = cpuk_decode_attention_workspace(n, heads, kv_heads, d, max_ctx);
    if (need > work_bytes) return need;
    const int64_t splits = split_count(pairs, max_ctx);
    float *scores = work, *parts = scores + n * heads * max_ctx;
#pragma omp parallel for collapse(3) schedule(dynamic, 1)
    for (int64_t s = 0; s < n; s++) {
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            for (int64_t p = 0; p < splits; p++) {
                const int64_t ctx = context_lens[s], first = s * heads + kh * group;
                const int64_t t_begin = ctx * p / splits, t_end = ctx * (p + 1) / splits;
                float *part = parts + ((s * kv_heads + kh) * splits + p) * group * stride;
                if (t_end <= t_begin) { /* an empty part: no weight in the merge */
                    for (int64_t g = 0; g < group; g++) {
                        part[g * stride + d] = -INFINITY;
                        part[g * stride + d + 1] = 0.0f;
                        for (int64_t c = 0; c < d; c++) part[g * stride + c] = 0.0f;
                    }
                    continue;
                }
                const int64_t keys = kh * slots * d, values = (kv_heads + kh) * slots * d;
                float *sc = scores + first * max_ctx + t_begin;
                attend_cache(q + first * d, group, d / 8, cache, cache_bf16, keys, values,
                             block_tables + s * max_blocks, t_begin, t_end, block_size, scale,
                             sc, max_ctx, part);
            }
        }
    }
#pragma omp parallel for collapse(2) schedule(static) if (pairs * group > 64)
    for (int64_t pair = 0; pair < pairs; pair++) {
        for (int64_t g = 0; g < group; g++) {
            const int64_t s = pair / kv_heads, kh = pair % kv_heads;
            combine(parts + (pair * splits * group + g) * stride, splits, group * stride, d,
                    out + (s * heads + kh * group + g) * d);
        }
    }
    return 0;
}

/* The CPU kernels' whole ABI: every function the library exports and every struct passed
 * across the boundary. worker/kernels/abi.py mirrors it in ctypes and refuses a library whose
 * CPUK_ABI_VERSION or struct sizes differ from its own; tests/worker/kernels/test_abi.py
 * parses this file to keep the two in step. Change both together, and bump the version.
 *
 * Kernels that need scratch memory take it from the caller (work, work_bytes), so a step
 * allocates nothing: they return 0, or, having done nothing, the bytes of scratch they need. */
#ifndef NPUSERVE_KERNELS_H
#define NPUSERVE_KERNELS_H

#include <stdint.h>

#define CPUK_ABI_VERSION 7

/* One projection: float32 or bfloat16 weights, or int8 with per-(row, group) scales. */
typedef struct {
    const void *weight;
    const float *scale; /* NULL for float32 and bfloat16 weights */
    const float *bias;  /* or NULL */
    int64_t out, in, group;
    int64_t bf16; /* 1: the weight is bfloat16 */
} cpuk_proj;

typedef struct {
    const float *input_norm, *post_norm;
    const float *next_norm;       /* the next layer's input norm; the final norm after the last */
    const float *q_norm, *k_norm; /* or NULL */
    cpuk_proj qkv, o, gate_up, down;
    void *cache; /* this layer's [2, kv_heads, slots, head_dim] */
} cpuk_layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter, slots, block_size;
    int64_t max_context; /* the longest context cpuk_decode_workspace sizes attention for */
    int64_t cache_bf16;  /* 1: the KV cache is bfloat16 (activations stay float32) */
    float eps;
    const float *cos, *sin; /* [positions, head_dim] */
    /* per step */
    int64_t n, max_blocks;
    const int64_t *positions, *slot_mapping;
    const int32_t *block_tables, *context_lens;
    float *residual; /* [n, hidden]: the embeddings in, the residual stream after the last layer out */
    float *out;      /* [n, hidden]: the final norm's output */
    void *work;      /* scratch of work_bytes, cpuk_decode_workspace(s, layers, n) at most */
    int64_t work_bytes;
} cpuk_decode_step;

/* The ABI check. */
int64_t cpuk_abi_version(void);
int64_t cpuk_sizeof_proj(void);
int64_t cpuk_sizeof_layer(void);
int64_t cpuk_sizeof_decode_step(void);

/* linear.c */
#define PREFETCH_NTA 0        /* non-temporal, into L1 (prefetchnta) */
#define PREFETCH_ALL_LEVELS 1 /* into every cache level (prefetcht0), the default */
#define PREFETCH_L2 2         /* into L2 and below (prefetcht1) */
void cpuk_set_prefetch(int64_t mode); /* where the projections prefetch weights: PREFETCH_* */
int64_t cpuk_get_prefetch(void);
void cpuk_set_row_stream(int64_t on); /* 1: one row of x over float32 or bfloat16 W streams
                                         each thread's weight rows one after another, the
                                         threads taking over each other's last rows; 0: in
                                         tiles, as several rows (the default) */
int64_t cpuk_get_row_stream(void);
void cpuk_set_row_stream_i8(int64_t on); /* 1: one row of x over int8 W streams as well */
int64_t cpuk_get_row_stream_i8(void);
void cpuk_linear_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n,
                     const float *bias, float *y);
void cpuk_set_amx(int64_t on); /* 1: bfloat16 and int8 projections of several rows on AMX
                                  tiles where the CPU and OS allow (the default); 0: vector
                                  code only */
int64_t cpuk_get_amx(void);    /* 1 while AMX tiles serve them */
void cpuk_set_amx_i8_rows(int64_t rows); /* int8 projections take the tiles from this many
                                            rows (default 4) */
int64_t cpuk_get_amx_i8_rows(void);
int64_t cpuk_linear_bf16(const uint16_t *x, int64_t m, int64_t k, const uint16_t *w, int64_t n,
                         const uint16_t *bias, uint16_t *y, void *work, int64_t work_bytes);
int64_t cpuk_linear_wbf16_workspace(int64_t m, int64_t k);
int64_t cpuk_linear_f32_wbf16(const float *x, int64_t m, int64_t k, const uint16_t *w,
                              int64_t n, const float *bias, float *y, void *work,
                              int64_t work_bytes);
int64_t cpuk_linear_i8_workspace(int64_t m, int64_t k, int64_t group);
int64_t cpuk_linear_i8(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale,
                       int64_t group, int64_t n, const float *bias, float *y, void *work,
                       int64_t work_bytes);

/* norm.c */
void cpuk_rms_norm(const float *x, const float *w, float eps, int64_t t, int64_t h, float *out);
void cpuk_add_rms_norm(float *residual, const float *delta, const float *w, float eps, int64_t t,
                       int64_t h, float *out);
void cpuk_silu_mul(const float *gate_up, int64_t t, int64_t inter, float *out);
void cpuk_causal_softmax(float *scores, int64_t rows, int64_t cols, int64_t chunk, float scale);

/* prefill_attention.c */
int64_t cpuk_prefill_attention_takes(int64_t head_dim); /* 1: it computes this head_dim (with
                                                           AVX-512, multiples of 16 to 256) */
/* q: [t, heads, d], the last t positions of a context whose keys and values are k, v
 * [kv_heads, context, d] (float32, contiguous) -> out [t, heads, d], causal. Returns 0, the
 * bytes of scratch it needs (computing nothing), or -1 (computing nothing) where
 * cpuk_prefill_attention_takes(head_dim) is 0 or context < t. */
int64_t cpuk_prefill_attention(const float *q, int64_t t, int64_t heads, int64_t kv_heads,
                               int64_t head_dim, const float *k, const float *v,
                               int64_t context, float scale, float *out, void *work,
                               int64_t work_bytes);

/* rope.c */
void cpuk_qk_rope_store(const float *qkv, int64_t t, int64_t heads, int64_t kv_heads, int64_t d,
                        const int64_t *positions, const float *cos, const float *sin,
                        const float *q_norm, const float *k_norm, float eps, float *q_out,
                        float *k_out, void *cache, int64_t cache_bf16, int64_t slots,
                        const int64_t *slot_mapping);

/* attention.c */
void cpuk_set_attention_parts(int64_t per_thread); /* decode attention's tasks per thread when
                                                      splitting contexts (default 2; 0: never) */
int64_t cpuk_get_attention_parts(void);
void cpuk_set_attention_prefetch(int64_t pages); /* 0 (default): decode attention prefetches
                                                  the next block whole; 1: the first lines of
                                                  the next few blocks */
int64_t cpuk_get_attention_prefetch(void);
int64_t cpuk_decode_attention_workspace(int64_t n, int64_t heads, int64_t kv_heads,
                                        int64_t head_dim, int64_t max_context);
int64_t cpuk_decode_attention(const float *q, int64_t n, int64_t heads, int64_t kv_heads,
                              int64_t head_dim, const void *cache, int64_t cache_bf16,
                              int64_t slots,
                              const int32_t *block_tables, int64_t max_blocks,
                              const int32_t *context_lens, int64_t block_size, float scale,
                              float *out, void *work, int64_t work_bytes);

/* decoder.c */
int64_t cpuk_decode_workspace(const cpuk_decode_step *s, const cpuk_layer *layers, int64_t n);
int64_t cpuk_decode_forward(const cpuk_decode_step *s, const cpuk_layer *layers);

/* memory.c */
int cpuk_advise_hugepages(void *p, int64_t nbytes);

/* isa.c */
const char *cpuk_isa(void); /* the vector extensions the library was compiled to use */

#endif

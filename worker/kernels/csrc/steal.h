/* Contiguous ranges of tiles that threads which finish early take over from the others' ends.
 *
 * A one-row projection is a few tens of microseconds, and a decode step runs some hundred of
 * them, each a parallel region whose threads meet at its end. Split evenly (schedule(static)),
 * the thread that started later, or shares its core, kept the other waiting: on 2 Zen 4
 * vCPUs, 11-14% of SmolLM2's int8 layers' time at one row was one thread idle at the barrier.
 * Here each thread starts on its own even share, front to back, STEAL_CHUNK tiles at a time,
 * so it still streams one run of memory; one that runs out takes STEAL_CHUNK tiles at a time
 * from the back of the share with most left. Which thread computes a tile changes nothing in
 * it, so results do not depend on who took what. */
#ifndef NPUSERVE_STEAL_H
#define NPUSERVE_STEAL_H

#include <omp.h>
#include <stdatomic.h>
#include <stdint.h>

#define STEAL_CHUNK 4

/* One thread's share: tiles [lo, hi) still to take, as lo | hi << 32, on its own line. */
typedef struct {
    _Alignas(64) _Atomic uint64_t span;
} steal_range;

/* Takes up to STEAL_CHUNK tiles from the front (or the back) of r: how many, from *start. */
static inline int64_t steal_take(steal_range *r, int back, int64_t *start) {
    uint64_t v = atomic_load_explicit(&r->span, memory_order_relaxed);
    for (;;) {
        const uint64_t lo = v & 0xffffffffu, hi = v >> 32;
        if (lo >= hi) return 0;
        const uint64_t m = hi - lo < STEAL_CHUNK ? hi - lo : STEAL_CHUNK;
        const uint64_t nv = back ? lo | (hi - m) << 32 : (lo + m) | hi << 32;
        if (atomic_compare_exchange_weak_explicit(&r->span, &v, nv, memory_order_relaxed,
                                                  memory_order_relaxed)) {
            *start = (int64_t)(back ? hi - m : lo);
            return (int64_t)m;
        }
    }
}

/* The share (other than self's) with most tiles left, or -1 when none has any. */
static inline int steal_victim(steal_range *ranges, int threads, int self) {
    int victim = -1;
    uint64_t most = 0;
    for (int u = 0; u < threads; u++) {
        const uint64_t v = atomic_load_explicit(&ranges[u].span, memory_order_relaxed);
        const uint64_t lo = v & 0xffffffffu, hi = v >> 32;
        if (u != self && hi > lo && hi - lo > most) {
            most = hi - lo;
            victim = u;
        }
    }
    return victim;
}

/* Runs the statement given last once for each tile JT in [0, TILES) (fewer than 2^32), in a
 * parallel region when PARALLEL. The shares are set before the region starts, so no thread
 * waits for another to begin: on cores shared with other processes, a thread that starts
 * late finds its share taken by the others, where a barrier would have held them until it
 * came. Every share is drained whoever runs, so a team smaller than asked for (or a region
 * that is not parallel) still covers every tile. A macro, so that the statement's constants
 * stay constants. */
#define FOR_STOLEN_TILES(TILES, PARALLEL, JT, ...)                                            \
    do {                                                                                       \
        const int64_t tiles_ = (TILES);                                                        \
        const int parallel_ = (PARALLEL), shares_ = parallel_ ? omp_get_max_threads() : 1;     \
        steal_range ranges_[shares_];                                                          \
        for (int s_ = 0; s_ < shares_; s_++)                                                   \
            atomic_init(&ranges_[s_].span, (uint64_t)(tiles_ * s_ / shares_) |                 \
                                               (uint64_t)(tiles_ * (s_ + 1) / shares_) << 32); \
        _Pragma("omp parallel num_threads(shares_) if (parallel_)") {                          \
            const int self_ = omp_get_thread_num();                                            \
            int64_t start_, count_;                                                            \
            while ((count_ = steal_take(&ranges_[self_], 0, &start_)) > 0)                     \
                for (int64_t JT = start_; JT < start_ + count_; JT++) __VA_ARGS__              \
            for (int v_; (v_ = steal_victim(ranges_, shares_, self_)) >= 0;)                   \
                while ((count_ = steal_take(&ranges_[v_], 1, &start_)) > 0)                    \
                    for (int64_t JT = start_; JT < start_ + count_; JT++) __VA_ARGS__          \
        }                                                                                      \
    } while (0)

#endif

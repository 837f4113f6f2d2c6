/* Splitting a matrix's rows between threads, and fetching them ahead, for the product kernels of
 * cpu_matmul.c (AVX-512) and cpu_matmul_avx2.c (AVX2): both include this, and only one of them is
 * compiled into a given library, so these static functions exist once per build. */

#ifndef ROW_GROUPS_H
#define ROW_GROUPS_H

#include <omp.h>
#include <stdlib.h>

/* Software prefetches bring weights into L2, not L1 (_MM_HINT_T0), and the q4/q5/q6/q8 products
 * fetch the rows a few work items ahead (ahead_rows below), their scales (and minimums, fifth bits) with them:
 * 2 threads, 1B layer shapes, medians of 7, q4 18.8 -> 24.1 GB/s and q8 27.2 -> 32.0 with the
 * scales (their separate stream was left to the hardware prefetcher, which fell behind). Measured on AMD Zen 5 (2 threads, 1B layer shapes from
 * DRAM, 7 interleaved runs, medians): q4 13.9 -> 20.7 GB/s, q8 14.1 -> 22.9, f16 22.4 -> 34.5, and
 * the read-bound loop 23.6 -> 29.5 (2 KB ahead). Into L1, the lines still on their way occupied
 * the few L1 miss buffers the core has and stalled the loads behind them; the L2 has more, and
 * its lines reach L1 in a few cycles. (On the Xeon the kernels were first tuned on, L1 and L2 had
 * measured the same for f16.) */
#define PREFETCH_HINT _MM_HINT_T1

/* How far ahead, in weight rows: whole work items of `item_rows` rows, about PREFETCH_BYTES of them
 * and at least two. Two items were tuned on 1B shapes (rows of 1 KB and more: 8 KB and more ahead);
 * the default model's q4 rows are 288 bytes, and two items (2.3 KB) left its small products waiting
 * on memory: 8 KB ahead made its layers 1.15x faster, and the 1B files measured the same. */
#define PREFETCH_BYTES 8192
static inline int ahead_rows(int item_rows, size_t row_bytes) {
    size_t item = (size_t)item_rows * row_bytes;
    int items = (int)((PREFETCH_BYTES + item - 1) / item);
    return (items < 2 ? 2 : items) * item_rows;
}

/* Each thread owns a contiguous range of row groups, as OpenMP's static schedule would give it (so it
 * streams its own part of the matrix and its prefetches serve itself), but takes its range a few
 * groups at a time from a counter, and a thread that finishes its range takes what is left of the
 * others'. Why: two cores do not read memory at the same speed from one moment to the next (other
 * guests, interrupts), and with a static split one thread waits for the other at the end of every
 * product (measurements: docs/performance.md). */
#define CHUNK_GROUPS 4

typedef struct {
    int next;
    int pad[15]; /* one counter per cache line, so taking groups does not bounce a shared line */
} GroupCounter;

typedef struct {
    GroupCounter *counters;
    int groups, threads, thread, visited; /* visited: owners whose ranges this thread has emptied */
} GroupSplit;

/* Before the parallel region, with counters for omp_get_max_threads() threads: thread t's range
 * starts at groups * t / threads. Returns the number of counters. */
static int split_groups(GroupCounter *counters, int groups) {
    int threads = omp_get_max_threads();
    for (int t = 0; t < threads; t++) counters[t].next = (int)((long)groups * t / threads);
    return threads;
}

/* The next groups [*first, *end) for the calling thread; 0 when none are left. Every thread visits
 * every owner's range, so all groups are taken even if the region runs fewer threads than counters. */
static int take_groups(GroupSplit *s, int *first, int *end) {
    while (s->visited < s->threads) {
        int owner = (s->thread + s->visited) % s->threads;
        int owner_end = (int)((long)s->groups * (owner + 1) / s->threads);
        int g = __atomic_fetch_add(&s->counters[owner].next, CHUNK_GROUPS, __ATOMIC_RELAXED);
        if (g < owner_end) {
            *first = g;
            *end = g + CHUNK_GROUPS < owner_end ? g + CHUNK_GROUPS : owner_end;
            return 1;
        }
        s->visited++;
    }
    return 0;
}

/* A buffer of at least `bytes` for the calling thread, 64-byte aligned and kept for its next
 * products, or NULL where it cannot be had (the caller then takes its usual path). The many-rows
 * paths of prompts keep a work item's unpacked weight rows in it; one product at a time uses it. */
static inline void *thread_buffer(size_t bytes) {
    static _Thread_local void *buffer;
    static _Thread_local size_t capacity;
    if (capacity < bytes) {
        free(buffer);
        buffer = aligned_alloc(64, (bytes + 63) / 64 * 64);
        capacity = buffer ? bytes : 0;
    }
    return buffer;
}

/* Part `part` of `parts` of the bytes [start, start + bytes) fetched into L2. The many-rows paths of
 * prompts unpack a work item's weight rows once and then spend a long while on tiles of x; spread
 * over those tiles, the next work item's rows (the same thread's, as take_groups hands them out)
 * arrive before they are unpacked, instead of the unpacking waiting on memory line by line. */
static inline void fetch_part(const void *start, size_t bytes, int part, int parts) {
    size_t lines = (bytes + 63) / 64, per = (lines + parts - 1) / parts;
    size_t first = (size_t)part * per, end = first + per < lines ? first + per : lines;
    for (size_t l = first; l < end; l++) _mm_prefetch((const char *)start + 64 * l, PREFETCH_HINT);
}

typedef void GroupFn(const void *product, int gi);

/* group(product, gi) for every group gi in [0, groups), split between the threads as above. */
static void for_each_group(int groups, GroupFn *group, const void *product) {
    GroupCounter counters[omp_get_max_threads()];
    int threads = split_groups(counters, groups);
#pragma omp parallel
    {
        GroupSplit split = {counters, groups, threads, omp_get_thread_num(), 0};
        for (int first, end; take_groups(&split, &first, &end);)
            for (int gi = first; gi < end; gi++) group(product, gi);
    }
}

#endif

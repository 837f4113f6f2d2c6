/* Splitting a matrix's rows between threads, for the product kernels of cpu_matmul.c (AVX-512)
 * and cpu_matmul_avx2.c (AVX2): both include this, and only one of them is compiled into a given
 * library, so these static functions exist once per build. */

#ifndef ROW_GROUPS_H
#define ROW_GROUPS_H

#include <omp.h>

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

/* q8 rows put in the order of q8_lanes.h, in place, when a Q8_0 matrix is loaded (packed.py). Plain
 * C: every build has it. */

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "plainllama.h"
#include "q8_lanes.h"

int q8_to_lanes(int8_t *qs, long N, int K) {
    if (K % 32) return STATUS_BAD_WIDTH;
    int groups = K / 512;
#pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++)
        for (int g = 0; g < groups; g++) {
            int8_t *group = qs + (size_t)n * K + (size_t)512 * g, natural[512];
            memcpy(natural, group, sizeof natural);
            for (int s = 0; s < 8; s++)
                for (int l = 0; l < 16; l++) memcpy(group + 64 * s + 4 * l, natural + 32 * Q8_LANES[l] + 4 * s, 4);
        }
    return STATUS_OK;
}

/* q4 rows put in the order of q4_lanes.h, in place, when a q4 or q5 matrix is loaded (packed.py).
 * Plain C: every build has it. */

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "plainllama.h"
#include "q4_lanes.h"

int q4_to_lanes(uint8_t *qs, long N, int K) {
    if (K % 32) return STATUS_BAD_WIDTH;
    int nb = K / 32, groups = (nb + 15) / 16;
#pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++)
        for (int g = 0; g < groups; g++) {
            int blocks = nb - 16 * g < 16 ? nb - 16 * g : 16;
            uint8_t *group = qs + (size_t)n * (K / 2) + (size_t)256 * g, natural[256];
            memcpy(natural, group, (size_t)16 * blocks);
            for (int p = 0; p < 4; p++)
                for (int b = 0; b < blocks; b++) memcpy(group + 4 * blocks * p + 4 * b, natural + 16 * b + 4 * p, 4);
        }
    return STATUS_OK;
}

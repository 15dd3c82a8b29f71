/* The forward pass's thread pool: every item of every job runs exactly once, and never after
 * its job has returned, when small and large jobs alternate (the pattern that once let a helper
 * claim an item of the next job with the previous job's function). White-box: the pool is
 * private to src/model. */
#include <stdatomic.h>
#include <stdio.h>

#include "../../src/model/internal.h"
#include "../check.h"

#define MAX_ITEMS 64

struct job {
    atomic_int hits[MAX_ITEMS];
};

static atomic_int out_of_range;

static void count(void *ctx, int item, int thread)
{
    struct job *j = ctx;
    (void)thread;
    if (item < 0 || item >= MAX_ITEMS) {
        atomic_fetch_add(&out_of_range, 1);
        return;
    }
    atomic_fetch_add(&j->hits[item], 1);
}

int main(void)
{
    struct ad_pool *p = ad_pool_new(2);
    CHECK(p);
    long wrong = 0;
    for (int spin = 0; spin < 2; spin++) {
        ad_pool_spin(p, spin);
        for (int it = 0; it < 100000; it++) {
            struct job j;
            for (int i = 0; i < MAX_ITEMS; i++)
                atomic_init(&j.hits[i], 0);
            int n = (it & 1) ? MAX_ITEMS : 2;
            ad_pool_run(p, n, count, &j);
            for (int i = 0; i < MAX_ITEMS; i++)
                wrong += atomic_load(&j.hits[i]) != (i < n);
        }
    }
    ad_pool_free(p);
    CHECK_INT(wrong, ==, 0);
    CHECK_INT(atomic_load(&out_of_range), ==, 0);
    printf("pool: ok\n");
    return 0;
}

/* Helpers of the C checkers that compare with files a PyTorch reference script wrote. */
#pragma once

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "adapterd/util.h"
#include "check.h"

/* dir/name, which must hold exactly n little-endian f32 values (caller frees). */
static inline float *read_f32(const char *dir, const char *name, size_t n)
{
    char path[4096];
    char *buf;
    size_t len;
    struct ad_err err;

    CHECK(ad_path_join(path, sizeof(path), dir, name) == 0);
    if (ad_read_file(path, (size_t)1 << 31, &buf, &len, &err) < 0) {
        fprintf(stderr, "%s\n", err.msg);
        exit(1);
    }
    CHECK_INT(len, ==, n * sizeof(float));
    return (float *)buf;
}

/* max |a - b|; a NaN counts as infinitely wrong. */
static inline double max_diff(const float *a, const float *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= m))
            m = isnan(d) ? INFINITY : d;
    }
    return m;
}

/* Small helpers shared by the benchmarks. */
#pragma once

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* An integer option in [lo, hi]: 0, or -EINVAL. */
static inline int bench_parse_int(const char *s, int lo, int hi, int *ret)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return -EINVAL;
    *ret = (int)v;
    return 0;
}

/* /proc/loadavg without its newline ("" if unreadable): other processes' load skews figures. */
static inline void bench_loadavg(char *buf, size_t size)
{
    FILE *f = fopen("/proc/loadavg", "r");
    buf[0] = '\0';
    if (f) {
        if (!fgets(buf, (int)size, f))
            buf[0] = '\0';
        fclose(f);
    }
    buf[strcspn(buf, "\n")] = '\0';
}

static inline void bench_print_loadavg(const char *when)
{
    char buf[128];
    bench_loadavg(buf, sizeof(buf));
    printf("load average %-9s%s\n", when, buf[0] ? buf : "(unknown)");
}

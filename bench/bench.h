/* Small helpers shared by the benchmarks. */
#pragma once

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "adapterd/util.h"

/* xorshift64*: the benchmarks' random numbers (inputs, adapter weights, request mixes), each
 * benchmark with its own state and seed, so that its runs draw the same sequence. */
static inline uint32_t bench_rand32(uint64_t *state)
{
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 2685821657736338717ull) >> 32);
}

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

/* Finds a program next to this binary (build/bench/ -> build/, build/tools/) into buf. */
static inline int bench_find_tool(const char *name, char *buf, size_t size)
{
    static const char *const rel[] = {".", "..", "../tools"};
    char self[PATH_MAX], rel_name[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);

    if (n <= 0)
        return -ENOENT;
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (!slash)
        return -ENOENT;
    *slash = '\0';
    for (size_t i = 0; i < sizeof(rel) / sizeof(rel[0]); i++) {
        int len = snprintf(rel_name, sizeof(rel_name), "%s/%s", rel[i], name);
        if (len > 0 && (size_t)len < sizeof(rel_name) &&
            ad_path_join(buf, size, self, rel_name) == 0 && access(buf, X_OK) == 0)
            return 0;
    }
    return -ENOENT;
}

/* Generates the SmolLM2-135M-shaped model into dir with adapterd-mkmodel (via a temporary
 * directory, then rename) unless it is already there. prog names the caller in messages. */
static inline int bench_ensure_model(const char *prog, const char *dir)
{
    char mk[PATH_MAX], tmp[PATH_MAX], path[PATH_MAX];
    struct stat st;

    if (ad_path_join(path, sizeof(path), dir, "model.safetensors") == 0 && stat(path, &st) == 0 &&
        ad_path_join(path, sizeof(path), dir, "config.json") == 0 && stat(path, &st) == 0)
        return 0;
    if (bench_find_tool("adapterd-mkmodel", mk, sizeof(mk)) < 0) {
        fprintf(stderr, "%s: adapterd-mkmodel not found next to this binary\n", prog);
        return -ENOENT;
    }
    int len = snprintf(tmp, sizeof(tmp), "%s.tmp-%ld", dir, (long)getpid());
    if (len < 0 || (size_t)len >= sizeof(tmp))
        return -ENAMETOOLONG;
    fprintf(stderr, "%s: generating the model into '%s' (once)...\n", prog, dir);
    double t0 = ad_now();
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        dup2(2, 1); /* mkmodel's chatter goes to stderr, the report stays clean */
        execl(mk, mk, "--preset", "smollm2-135m", tmp, (char *)NULL);
        _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "%s: '%s' failed\n", prog, mk);
        return -EIO;
    }
    if (rename(tmp, dir) < 0) {
        int e = errno;
        fprintf(stderr, "%s: cannot rename '%s' to '%s': %s\n", prog, tmp, dir, strerror(e));
        return -e;
    }
    fprintf(stderr, "%s: generated in %.1f s\n", prog, ad_now() - t0);
    return 0;
}

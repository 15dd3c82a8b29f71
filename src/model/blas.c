/* OpenBLAS's kernel set ("core"), chosen from CPUID before anything runs (include/adapterd/
 * blas.h).
 *
 * Cores are compared by the widest instructions their kernels use: the names are those of
 * OpenBLAS 0.3.21's driver/others/dynamic.c (OPENBLAS_CORETYPE matches them ignoring case), and
 * what each needs follows the flags OpenBLAS compiles its kernels with (Cooperlake:
 * -march=cooperlake from GCC 10 on, which allows AVX512_VNNI and AVX512_BF16; SkylakeX:
 * -march=skylake-avx512; Haswell and Zen: AVX2 and FMA; Sandybridge and the Bulldozer family:
 * 256-bit AVX). Only the first four are ever forced. */
#include <cblas.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "adapterd/blas.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <cpuid.h>
#define AD_X86 1
#endif

/* ==========================================================================================
 * Widths */

enum width { W_UNKNOWN, W_SSE, W_AVX, W_AVX2, W_AVX512, W_AVX512_BF16 };

/* The core to force for each width (none below AVX: every x86-64 OpenBLAS core runs SSE). */
static const char *const width_core[] = {
    [W_AVX] = "Sandybridge", [W_AVX2] = "Haswell", [W_AVX512] = "SkylakeX",
    [W_AVX512_BF16] = "Cooperlake",
};

static const struct {
    const char *name;
    enum width width;
} cores[] = {
    {"Katmai", W_SSE},       {"Coppermine", W_SSE},   {"Northwood", W_SSE},
    {"Prescott", W_SSE},     {"Banias", W_SSE},       {"Atom", W_SSE},
    {"Core2", W_SSE},        {"Penryn", W_SSE},       {"Dunnington", W_SSE},
    {"Nehalem", W_SSE},      {"Athlon", W_SSE},       {"Opteron", W_SSE},
    {"Opteron_SSE3", W_SSE}, {"Barcelona", W_SSE},    {"Nano", W_SSE},
    {"Bobcat", W_SSE},       {"Sandybridge", W_AVX},  {"Bulldozer", W_AVX},
    {"Piledriver", W_AVX},   {"Steamroller", W_AVX},  {"Excavator", W_AVX},
    {"Haswell", W_AVX2},     {"Zen", W_AVX2},         {"SkylakeX", W_AVX512},
    {"Cooperlake", W_AVX512_BF16},
};

static enum width core_width(const char *name)
{
    for (size_t i = 0; i < sizeof(cores) / sizeof(cores[0]); i++)
        if (!strcasecmp(name, cores[i].name))
            return cores[i].width;
    return W_UNKNOWN;
}

/* ==========================================================================================
 * CPUID */

#ifdef AD_X86
static unsigned long long xgetbv0(void)
{
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

void ad_cpu_features_read(struct ad_cpu_features *ret)
{
    struct ad_cpu_features c = {0};
#ifdef AD_X86
    unsigned max, a, b, cx, d;
    if (!__get_cpuid(0, &max, &b, &cx, &d)) {
        *ret = c;
        return;
    }
    memcpy(c.vendor, &b, 4);
    memcpy(c.vendor + 4, &d, 4);
    memcpy(c.vendor + 8, &cx, 4);
    if (max >= 1 && __get_cpuid(1, &a, &b, &cx, &d)) {
        unsigned family = (a >> 8) & 0xf, model = (a >> 4) & 0xf;
        c.family = family == 0xf ? family + ((a >> 20) & 0xff) : family;
        c.model = family == 0x6 || family == 0xf ? model | ((a >> 12) & 0xf0) : model;
        c.avx = cx & bit_AVX;
        c.fma = cx & bit_FMA;
        if (cx & bit_OSXSAVE) { /* else xgetbv faults; no OS state means no AVX either */
            unsigned long long xcr0 = xgetbv0();
            c.os_ymm = (xcr0 & 0x6) == 0x6;
            c.os_zmm = (xcr0 & 0xe6) == 0xe6;
        }
    }
    if (max >= 7 && __get_cpuid_count(7, 0, &a, &b, &cx, &d)) {
        unsigned max7 = a;
        c.avx2 = b & bit_AVX2;
        c.avx512f = b & bit_AVX512F;
        c.avx512cd = b & bit_AVX512CD;
        c.avx512bw = b & bit_AVX512BW;
        c.avx512dq = b & bit_AVX512DQ;
        c.avx512vl = b & bit_AVX512VL;
        c.avx512_vnni = cx & bit_AVX512VNNI;
        if (max7 >= 1 && __get_cpuid_count(7, 1, &a, &b, &cx, &d))
            c.avx512_bf16 = a & bit_AVX512BF16;
    }
#endif
    *ret = c;
}

/* The widest the CPU and its OS run, and why, in words ("AuthenticAMD family 25 model 17 has
 * AVX-512 F/CD/BW/DQ/VL with VNNI and BF16"). */
static enum width cpu_width(const struct ad_cpu_features *c, char *buf, size_t n)
{
    int k = snprintf(buf, n, "%s family %u model %u has ", c->vendor[0] ? c->vendor : "a CPU",
                     c->family, c->model);
    if (k < 0 || (size_t)k >= n)
        k = 0;
    char *p = buf + k;
    size_t left = n - (size_t)k;
    bool avx = c->avx && c->os_ymm, avx2 = avx && c->avx2 && c->fma;
    bool avx512 = avx2 && c->avx512f && c->avx512cd && c->avx512bw && c->avx512dq &&
                  c->avx512vl;
    if (avx512 && c->os_zmm) {
        bool bf16 = c->avx512_bf16 && c->avx512_vnni;
        snprintf(p, left, "AVX-512 F/CD/BW/DQ/VL%s", bf16 ? " with VNNI and BF16" : "");
        return bf16 ? W_AVX512_BF16 : W_AVX512;
    }
    const char *why512 = !c->avx512f ? ""
                         : avx512    ? "AVX-512, but the OS does not enable its registers; "
                                     : "AVX-512F without all of CD/BW/DQ/VL; ";
    if (avx2) {
        snprintf(p, left, "%sAVX2 and FMA", why512);
        return W_AVX2;
    }
    if (avx) {
        snprintf(p, left, "AVX%s", c->avx2 ? " (AVX2 without FMA)" : "");
        return W_AVX;
    }
    snprintf(p, left, "%s", c->avx ? "AVX, but the OS does not enable its registers" : "no AVX");
    return W_SSE;
}

/* ==========================================================================================
 * The choice */

static void say(struct ad_blas_choice *ret, const char *lib, const char *core, const char *fmt,
                ...) __attribute__((format(printf, 4, 5)));

static void say(struct ad_blas_choice *ret, const char *lib, const char *core, const char *fmt,
                ...)
{
    int k = snprintf(ret->msg, sizeof(ret->msg), "%s core %s (", lib, core);
    if (k < 0 || (size_t)k >= sizeof(ret->msg))
        return;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(ret->msg + k, sizeof(ret->msg) - (size_t)k, fmt, ap);
    va_end(ap);
    size_t len = m < 0 ? (size_t)k : strlen(ret->msg);
    if (len + 2 <= sizeof(ret->msg))
        memcpy(ret->msg + len, ")", 2);
}

void ad_blas_choose(const struct ad_cpu_features *cpu, const char *core, const char *config,
                    const struct ad_blas_env *env, struct ad_blas_choice *ret)
{
    char lib[64] = "OpenBLAS", have[200];
    const char *sp = strchr(config, ' ');
    /* "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH ...": the first two words */
    if (!strncmp(config, "OpenBLAS ", 9) && sp) {
        size_t n = strcspn(sp + 1, " ");
        if (9 + n < sizeof(lib))
            snprintf(lib, sizeof(lib), "OpenBLAS %.*s", (int)n, sp + 1);
    }
    enum width runs = cpu_width(cpu, have, sizeof(have)), own = core_width(core);
    ret->force[0] = '\0';
    ret->warn = false;

    if (env->coretype) {
        size_t n = env->chosen ? strcspn(env->chosen, ",") : 0;
        bool ours = env->chosen && strlen(env->coretype) == n &&
                    !strncmp(env->chosen, env->coretype, n) && env->chosen[n] == ',';
        const char *was = ours ? env->chosen + n + 1 : "";
        if (strcasecmp(env->coretype, core)) {
            ret->warn = true;
            say(ret, lib, core, "OPENBLAS_CORETYPE='%s'%s is not a core this OpenBLAS knows; "
                "it chose %s itself", env->coretype, ours ? ", set by adapterd," : "", core);
        } else if (ours) {
            say(ret, lib, core, "OPENBLAS_CORETYPE unset, so chosen from CPUID: %s; "
                "OpenBLAS's own table chose %s", have, was);
        } else if (own > runs) {
            ret->warn = true;
            say(ret, lib, core, "OPENBLAS_CORETYPE=%s set in the environment, but its kernels "
                "need more than this CPU runs: %s", env->coretype, have);
        } else {
            say(ret, lib, core, "OPENBLAS_CORETYPE=%s set in the environment; %s",
                env->coretype, have);
        }
        return;
    }
    if (!strstr(config, "DYNAMIC_ARCH")) {
        say(ret, lib, core, "built for this core alone, without DYNAMIC_ARCH; %s", have);
        return;
    }
    const char *best = runs >= W_AVX ? width_core[runs] : NULL;
    if (env->autoset && !strcmp(env->autoset, "0")) {
        bool narrower = best && own != W_UNKNOWN && own < runs;
        say(ret, lib, core, "OPENBLAS_CORETYPE unset, ADAPTERD_BLAS_AUTO=0: OpenBLAS's own "
            "choice%s%s; %s", narrower ? ", though the CPU runs " : "", narrower ? best : "",
            have);
        return;
    }
    if (own == W_UNKNOWN) {
        say(ret, lib, core, "OPENBLAS_CORETYPE unset: OpenBLAS's own choice, a core newer than "
            "adapterd's table; %s", have);
        return;
    }
    if (!best || own >= runs) {
        say(ret, lib, core, "OPENBLAS_CORETYPE unset: OpenBLAS's own choice, %s; %s",
            best ? "as wide as this CPU runs" : "the CPU runs nothing wider", have);
        return;
    }
    snprintf(ret->force, sizeof(ret->force), "%s", best);
    say(ret, lib, core, "OPENBLAS_CORETYPE unset: OpenBLAS's own table chose it, but %s; "
        "executing again with OPENBLAS_CORETYPE=%s", have, best);
}

/* ==========================================================================================
 * Start-up */

int ad_blas_reexec(const char *core, const char *own, char *const argv[])
{
    char chosen[64];
    int n = snprintf(chosen, sizeof(chosen), "%s,%s", core, own), r;
    if (n < 0 || (size_t)n >= sizeof(chosen))
        return -ENAMETOOLONG;
    if (setenv("ADAPTERD_BLAS_CHOSEN", chosen, 1) < 0 || setenv("OPENBLAS_CORETYPE", core, 1) < 0)
        goto fail;
    fflush(NULL);
    execv("/proc/self/exe", argv);
fail:
    r = -errno;
    unsetenv("OPENBLAS_CORETYPE");
    unsetenv("ADAPTERD_BLAS_CHOSEN");
    return r;
}

void ad_blas_startup(char *const argv[], struct ad_blas_choice *ret)
{
    struct ad_cpu_features cpu;
    struct ad_blas_env env = {.coretype = getenv("OPENBLAS_CORETYPE"),
                              .chosen = getenv("ADAPTERD_BLAS_CHOSEN"),
                              .autoset = getenv("ADAPTERD_BLAS_AUTO")};
    const char *core = openblas_get_corename();
    ad_cpu_features_read(&cpu);
    ad_blas_choose(&cpu, core, openblas_get_config(), &env, ret);
    if (!ret->force[0])
        return;
    int r = ad_blas_reexec(ret->force, core, argv); /* returns only on failure */
    size_t len = strlen(ret->msg);
    snprintf(ret->msg + len, sizeof(ret->msg) - len, ": failed (%s), kept %s", strerror(-r),
             core);
    ret->force[0] = '\0';
    ret->warn = true;
}

/* OpenBLAS's core, chosen from CPUID (include/adapterd/blas.h): the decision over a table of
 * CPUs and what OpenBLAS reports; CPUID as read here against the kernel's /proc/cpuinfo; and the
 * re-execution itself, in a child, into the core OpenBLAS already runs (so no test here, or
 * anywhere in the suites, runs on another core than its environment gives). */
#include <cblas.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "adapterd/blas.h"
#include "../check.h"

#define CONFIG "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Cooperlake MAX_THREADS=64"

/* ==========================================================================================
 * The decision, over a table of CPUs and what OpenBLAS reports */

#define INTEL(m) .vendor = "GenuineIntel", .family = 6, .model = (m)
#define AMD(f, m) .vendor = "AuthenticAMD", .family = (f), .model = (m)
#define AVX2_FMA .avx = true, .avx2 = true, .fma = true, .os_ymm = true
#define AVX512 .avx512f = true, .avx512cd = true, .avx512bw = true, .avx512dq = true, \
               .avx512vl = true
#define VNNI_BF16 .avx512_vnni = true, .avx512_bf16 = true
#define OS_ZMM .os_zmm = true
/* the machine; Sapphire Rapids has the same features */
#define EMERALD_RAPIDS {INTEL(207), AVX2_FMA, AVX512, VNNI_BF16, OS_ZMM}

struct env_case {
    const char *coretype, *chosen, *autoset;
};

static const struct choice_case {
    const char *what;
    struct ad_cpu_features cpu;
    const char *core;   /* openblas_get_corename() */
    const char *config; /* openblas_get_config(); NULL: Debian 12's */
    struct env_case env;
    const char *force; /* "" = keep */
    bool warn;
    const char *msg; /* the whole message, or NULL */
    const char *has; /* or a part of it, or NULL */
} cases[] = {
    {"0.3.21's table does not know model 207 and runs SSE3: AVX-512 with BF16",
     EMERALD_RAPIDS, "Prescott", NULL, {0}, "Cooperlake", false,
     "OpenBLAS 0.3.21 core Prescott (OPENBLAS_CORETYPE unset: OpenBLAS's own table chose it, "
     "but GenuineIntel family 6 model 207 has AVX-512 F/CD/BW/DQ/VL with VNNI and BF16; "
     "executing again with OPENBLAS_CORETYPE=Cooperlake)", NULL},
    {"after the re-execution: the log line names both cores",
     EMERALD_RAPIDS, "Cooperlake", NULL, {"Cooperlake", "Cooperlake,Prescott", NULL}, "", false,
     "OpenBLAS 0.3.21 core Cooperlake (OPENBLAS_CORETYPE unset, so chosen from CPUID: "
     "GenuineIntel family 6 model 207 has AVX-512 F/CD/BW/DQ/VL with VNNI and BF16; OpenBLAS's "
     "own table chose Prescott)", NULL},
    {"the re-executed OpenBLAS did not take the core it was given",
     EMERALD_RAPIDS, "Prescott", NULL, {"Cooperlake", "Cooperlake,Prescott", NULL}, "", true,
     NULL, "OPENBLAS_CORETYPE='Cooperlake', set by adapterd, is not a core this OpenBLAS knows"},
    {"AVX-512 without BF16 (Skylake-SP)",
     {INTEL(85), AVX2_FMA, AVX512, OS_ZMM}, "Prescott", NULL, {0}, "SkylakeX", false, NULL,
     "family 6 model 85 has AVX-512 F/CD/BW/DQ/VL;"},
    {"BF16 without VNNI does not meet Cooperlake's -march",
     {INTEL(207), AVX2_FMA, AVX512, .avx512_bf16 = true, OS_ZMM}, "Haswell", NULL, {0},
     "SkylakeX", false, NULL, NULL},
    {"AVX-512, but the OS does not save the ZMM registers: AVX2",
     {INTEL(207), AVX2_FMA, AVX512, VNNI_BF16}, "Prescott", NULL, {0}, "Haswell", false, NULL,
     "AVX-512, but the OS does not enable its registers; AVX2 and FMA"},
    {"... where OpenBLAS's Haswell is already that wide",
     {INTEL(207), AVX2_FMA, AVX512, VNNI_BF16}, "Haswell", NULL, {0}, "", false, NULL,
     "as wide as this CPU runs"},
    {"part of AVX-512 (F without BW, as Knights Landing): AVX2",
     {INTEL(87), AVX2_FMA, .avx512f = true, .avx512cd = true, OS_ZMM}, "Prescott", NULL, {0},
     "Haswell", false, NULL, "AVX-512F without all of CD/BW/DQ/VL; AVX2 and FMA"},
    {"this machine's kind: OpenBLAS's own choice is already the widest",
     {AMD(25, 17), AVX2_FMA, AVX512, VNNI_BF16, OS_ZMM}, "Cooperlake", NULL, {0}, "", false,
     "OpenBLAS 0.3.21 core Cooperlake (OPENBLAS_CORETYPE unset: OpenBLAS's own choice, as wide "
     "as this CPU runs; AuthenticAMD family 25 model 17 has AVX-512 F/CD/BW/DQ/VL with VNNI and "
     "BF16)", NULL},
    {"Zen and Haswell are the same width", {AMD(23, 49), AVX2_FMA}, "Zen", NULL, {0}, "", false,
     NULL, "AuthenticAMD family 23 model 49 has AVX2 and FMA"},
    {"an AVX2 CPU on Prescott", {INTEL(60), AVX2_FMA}, "Prescott", NULL, {0}, "Haswell", false,
     NULL, NULL},
    {"core names in any case", {INTEL(60), AVX2_FMA}, "prescott", NULL, {0}, "Haswell", false,
     NULL, NULL},
    {"AVX2 without FMA: AVX", {INTEL(60), .avx = true, .avx2 = true, .os_ymm = true},
     "Prescott", NULL, {0}, "Sandybridge", false, NULL, "has AVX (AVX2 without FMA)"},
    {"AVX, but the OS does not save YMM: nothing wider than SSE",
     {INTEL(60), .avx = true, .avx2 = true, .fma = true}, "Prescott", NULL, {0}, "", false,
     NULL, "nothing wider; GenuineIntel family 6 model 60 has AVX, but the OS does not enable"},
    {"no AVX", {INTEL(23)}, "Prescott", NULL, {0}, "", false, NULL, "has no AVX"},
    {"a core 0.3.21 does not have (a newer OpenBLAS's) is trusted",
     EMERALD_RAPIDS, "SapphireRapids", NULL, {0}, "", false, NULL, "newer than adapterd's"},

    {"OPENBLAS_CORETYPE set: respected", EMERALD_RAPIDS, "Haswell", NULL, {"Haswell", 0, 0}, "",
     false, "OpenBLAS 0.3.21 core Haswell (OPENBLAS_CORETYPE=Haswell set in the environment; "
     "GenuineIntel family 6 model 207 has AVX-512 F/CD/BW/DQ/VL with VNNI and BF16)", NULL},
    {"... in any case", EMERALD_RAPIDS, "SkylakeX", NULL, {"skylakex", 0, 0}, "", false, NULL,
     "OPENBLAS_CORETYPE=skylakex set in the environment;"},
    {"... and said so when OpenBLAS does not know it (0.3.21 has no SapphireRapids)",
     EMERALD_RAPIDS, "Prescott", NULL, {"SapphireRapids", 0, 0}, "", true, NULL,
     "OPENBLAS_CORETYPE='SapphireRapids' is not a core this OpenBLAS knows; it chose Prescott "
     "itself"},
    {"... or when the CPU cannot run it", {INTEL(60), AVX2_FMA}, "SkylakeX", NULL,
     {"SkylakeX", 0, 0}, "", true, NULL, "need more than this CPU runs"},
    {"a stale ADAPTERD_BLAS_CHOSEN does not make a user's value adapterd's", EMERALD_RAPIDS,
     "Haswell", NULL, {"Haswell", "Cooperlake,Prescott", NULL}, "", false, NULL,
     "OPENBLAS_CORETYPE=Haswell set in the environment"},
    {"... nor one whose core only starts the same", EMERALD_RAPIDS, "SkylakeX", NULL,
     {"SkylakeX", "SkylakeXY,Prescott", NULL}, "", false, NULL,
     "OPENBLAS_CORETYPE=SkylakeX set in the environment"},

    {"ADAPTERD_BLAS_AUTO=0 (the test suites): OpenBLAS's own choice, and what it leaves",
     EMERALD_RAPIDS, "Prescott", NULL, {NULL, NULL, "0"}, "", false, NULL,
     "ADAPTERD_BLAS_AUTO=0: OpenBLAS's own choice, though the CPU runs Cooperlake; GenuineIntel"},
    {"ADAPTERD_BLAS_AUTO other than 0", EMERALD_RAPIDS, "Prescott", NULL, {NULL, NULL, "1"},
     "Cooperlake", false, NULL, NULL},
    {"an OpenBLAS built for one core ignores OPENBLAS_CORETYPE: no re-execution for it",
     EMERALD_RAPIDS, "Haswell", "OpenBLAS 0.3.21 NO_LAPACKE Haswell MAX_THREADS=64", {0}, "",
     false, NULL, "(built for this core alone, without DYNAMIC_ARCH;"},
    {"a configuration string of another shape still names the library",
     EMERALD_RAPIDS, "Prescott", "DYNAMIC_ARCH", {0}, "Cooperlake", false, NULL,
     "OpenBLAS core Prescott ("},
};

static void test_choice(void)
{
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct choice_case *t = &cases[i];
        struct ad_blas_env env = {t->env.coretype, t->env.chosen, t->env.autoset};
        struct ad_blas_choice c;
        memset(&c, 0x55, sizeof(c)); /* every field must be written */
        ad_blas_choose(&t->cpu, t->core, t->config ? t->config : CONFIG, &env, &c);
        printf("%s:\n  %-14s -> %-11s %s%s\n", t->what, t->core, c.force[0] ? c.force : "(keep)",
               c.warn ? "WARN " : "", c.msg);
        CHECK(memchr(c.msg, '\0', sizeof(c.msg)));
        CHECK_STR(c.force, t->force);
        CHECK_INT(c.warn, ==, t->warn);
        if (t->msg)
            CHECK_STR(c.msg, t->msg);
        if (t->has)
            CHECK_CONTAINS(c.msg, t->has);
        CHECK(!strncmp(c.msg, "OpenBLAS ", 9)); /* the log line starts with the library */
    }
}

/* ==========================================================================================
 * CPUID against the kernel's view */

/* The "flags" line of the first processor in /proc/cpuinfo has flag. */
static bool cpuinfo_has(const char *flags, const char *flag)
{
    size_t n = strlen(flag);
    for (const char *p = flags; (p = strstr(p, flag)); p += n)
        if ((p == flags || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\n' || p[n] == '\0'))
            return true;
    return false;
}

static void test_cpuid(void)
{
    struct ad_cpu_features c;
    ad_cpu_features_read(&c);
    FILE *f = fopen("/proc/cpuinfo", "r");
    CHECK(f);
    char line[8192], flags[8192] = "", vendor[64] = "";
    unsigned family = 0, model = 0;
    while (fgets(line, sizeof(line), f)) {
        if (!strncmp(line, "flags", 5) && !flags[0])
            snprintf(flags, sizeof(flags), "%s", strchr(line, ':') + 1);
        else if (!strncmp(line, "vendor_id", 9) && !vendor[0])
            sscanf(strchr(line, ':') + 1, "%63s", vendor);
        else if (!strncmp(line, "cpu family", 10) && !family)
            sscanf(strchr(line, ':') + 1, "%u", &family);
        else if (!strncmp(line, "model\t", 6) && !model)
            sscanf(strchr(line, ':') + 1, "%u", &model);
    }
    fclose(f);
    CHECK(flags[0]);
    printf("CPUID: %s family %u model %u\n", c.vendor, c.family, c.model);
    CHECK_STR(c.vendor, vendor);
    CHECK_INT(c.family, ==, family);
    CHECK_INT(c.model, ==, model);
    /* Linux lists an extension only when it also saves its registers */
    CHECK_INT(c.avx && c.os_ymm, ==, cpuinfo_has(flags, "avx"));
    CHECK_INT(c.fma && c.os_ymm, ==, cpuinfo_has(flags, "fma"));
    CHECK_INT(c.avx2 && c.os_ymm, ==, cpuinfo_has(flags, "avx2"));
    CHECK_INT(c.avx512f && c.os_zmm, ==, cpuinfo_has(flags, "avx512f"));
    CHECK_INT(c.avx512cd && c.os_zmm, ==, cpuinfo_has(flags, "avx512cd"));
    CHECK_INT(c.avx512bw && c.os_zmm, ==, cpuinfo_has(flags, "avx512bw"));
    CHECK_INT(c.avx512dq && c.os_zmm, ==, cpuinfo_has(flags, "avx512dq"));
    CHECK_INT(c.avx512vl && c.os_zmm, ==, cpuinfo_has(flags, "avx512vl"));
    CHECK_INT(c.avx512_vnni && c.os_zmm, ==, cpuinfo_has(flags, "avx512_vnni"));
    CHECK_INT(c.avx512_bf16 && c.os_zmm, ==, cpuinfo_has(flags, "avx512_bf16"));
}

/* ==========================================================================================
 * The re-execution */

/* The new image: the same pid, the pipe still open with its byte, OPENBLAS_CORETYPE read by
 * OpenBLAS's constructor, the other variables kept, and start-up now content. */
static int reexec_child(char **argv)
{
    long pid = strtol(argv[2], NULL, 10);
    int fd = (int)strtol(argv[3], NULL, 10);
    const char *core = argv[4];
    char byte = 0;
    CHECK_INT(getpid(), ==, pid);
    CHECK_INT(read(fd, &byte, 1), ==, 1);
    CHECK_INT(byte, ==, 'x');
    CHECK_STR(getenv("OPENBLAS_CORETYPE"), core);
    CHECK_STR(openblas_get_corename(), core);
    char chosen[64];
    snprintf(chosen, sizeof(chosen), "%s,TestOwn", core);
    CHECK_STR(getenv("ADAPTERD_BLAS_CHOSEN"), chosen);
    CHECK_STR(getenv("LISTEN_PID"), argv[2]);
    CHECK_STR(getenv("LISTEN_FDS"), "1");
    struct ad_blas_choice c;
    ad_blas_startup(argv, &c);
    CHECK_STR(c.force, "");
    CHECK_CONTAINS(c.msg, "so chosen from CPUID");
    CHECK_CONTAINS(c.msg, "OpenBLAS's own table chose TestOwn");
    return 0;
}

static void test_reexec(const char *self)
{
    /* The child executes again into the core OpenBLAS already runs here: the mechanism, never
     * another core than the environment gives. */
    const char *core = openblas_get_corename();
    int pfd[2];
    CHECK_INT(pipe(pfd), ==, 0);
    CHECK_INT(write(pfd[1], "x", 1), ==, 1);
    fflush(NULL); /* or the child would write this process's buffered output again */
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        char spid[24], sfd[24], score[32];
        snprintf(spid, sizeof(spid), "%ld", (long)getpid());
        snprintf(sfd, sizeof(sfd), "%d", pfd[0]);
        snprintf(score, sizeof(score), "%s", core);
        /* as systemd passes a socket: LISTEN_PID is this pid, and stays it */
        setenv("LISTEN_PID", spid, 1);
        setenv("LISTEN_FDS", "1", 1);
        char *args[] = {(char *)self, "--reexec-child", spid, sfd, score, NULL};
        int r = ad_blas_reexec(core, "TestOwn", args);
        fprintf(stderr, "ad_blas_reexec returned %d\n", r);
        _exit(3);
    }
    int status;
    CHECK_INT(waitpid(pid, &status, 0), ==, pid);
    CHECK(WIFEXITED(status));
    CHECK_INT(WEXITSTATUS(status), ==, 0);
    close(pfd[0]);
    close(pfd[1]);
}

/* Start-up that must not execute again returns with its message: ADAPTERD_BLAS_AUTO=0, or
 * OPENBLAS_CORETYPE set to the core already running (both in a child only: this process keeps
 * the environment's values, and OpenBLAS read its own at load time anyway). */
static void test_startup_stays(const char *self)
{
    for (int k = 0; k < 2; k++) {
        fflush(NULL);
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            const char *what = k == 0 ? "ADAPTERD_BLAS_AUTO=0" : "set in the environment";
            unsetenv("ADAPTERD_BLAS_CHOSEN");
            if (k == 0) {
                unsetenv("OPENBLAS_CORETYPE");
                setenv("ADAPTERD_BLAS_AUTO", "0", 1);
            } else {
                setenv("OPENBLAS_CORETYPE", openblas_get_corename(), 1);
            }
            struct ad_blas_choice c;
            char *args[] = {(char *)self, "--must-not-run", NULL};
            ad_blas_startup(args, &c); /* an execution again would fail on the argument */
            printf("start-up: %s%s\n", c.warn ? "WARN " : "", c.msg);
            CHECK_STR(c.force, "");
            CHECK_CONTAINS(c.msg, what);
            fflush(stdout);
            _exit(0);
        }
        int status;
        CHECK_INT(waitpid(pid, &status, 0), ==, pid);
        CHECK(WIFEXITED(status));
        CHECK_INT(WEXITSTATUS(status), ==, 0);
    }
}

int main(int argc, char **argv)
{
    if (argc >= 5 && !strcmp(argv[1], "--reexec-child"))
        return reexec_child(argv);
    if (argc >= 2) {
        fprintf(stderr, "test-blas: unexpected arguments (an unwanted execution again?)\n");
        return 1;
    }
    test_choice();
    test_cpuid();
    test_reexec(argv[0]);
    test_startup_stays(argv[0]);
    printf("blas: ok\n");
    return 0;
}

/* adapterd: which kernel set (OpenBLAS calls it a "core") OpenBLAS runs, chosen from what the
 * CPU runs before anything is timed (blas.c in src/model).
 *
 * Debian 12's OpenBLAS 0.3.21 is a DYNAMIC_ARCH build: a constructor picks its core when the
 * library is loaded, from the variable OPENBLAS_CORETYPE if it is set, else from OpenBLAS's own
 * table of CPU models. That table does not know some CPUs newer than itself: an Emerald Rapids
 * (family 6 model 207, AVX-512 with BF16) gets the SSE3 kernels ("Prescott") and prefills a
 * third as fast as with its AVX-512 ones. The variable is read only at load time, before
 * main(), so a program that wants another core sets it and executes itself again
 * (ad_blas_startup).
 *
 * Variables: OPENBLAS_CORETYPE, when set, is respected (and reported if this OpenBLAS does not
 * know it, or the CPU cannot run it). ADAPTERD_BLAS_AUTO=0 leaves OpenBLAS's own choice (the
 * test suites set it, so that they run on the core their environment gives).
 * ADAPTERD_BLAS_CHOSEN ("CORE,OWN") is set by the re-execution itself: it tells the new image,
 * and the processes it starts, that OPENBLAS_CORETYPE=CORE came from adapterd, not from the
 * user, and that OpenBLAS's own table had chosen OWN. */
#pragma once

#include <stdbool.h>

/* What CPUID says the CPU has and its OS enables (XCR0). */
struct ad_cpu_features {
    char vendor[13];        /* "GenuineIntel", "AuthenticAMD", ...; "" if unknown */
    unsigned family, model; /* display family and model (extended fields folded in) */
    bool avx, fma, avx2;
    bool avx512f, avx512cd, avx512bw, avx512dq, avx512vl, avx512_vnni, avx512_bf16;
    bool os_ymm; /* the OS saves the AVX registers (OSXSAVE, XCR0 bits 1-2) */
    bool os_zmm; /* ... and the AVX-512 ones (XCR0 bits 5-7: opmask, ZMM_Hi256, Hi16_ZMM) */
};

/* Reads CPUID and XCR0 into ret (all false on a CPU that is not x86). Thread-safe. */
void ad_cpu_features_read(struct ad_cpu_features *ret);

/* The variables the choice reads, each NULL when unset. */
struct ad_blas_env {
    const char *coretype; /* OPENBLAS_CORETYPE */
    const char *chosen;   /* ADAPTERD_BLAS_CHOSEN */
    const char *autoset;  /* ADAPTERD_BLAS_AUTO */
};

struct ad_blas_choice {
    char force[24]; /* the core to set OPENBLAS_CORETYPE to and execute again with; "" = none */
    bool warn;      /* msg reports a problem: log it as a warning */
    /* for the start-up log: "OpenBLAS 0.3.21 core SkylakeX (why)" */
    char msg[400];
};

/* Decides from the CPU's features, the core OpenBLAS runs (openblas_get_corename()), its build
 * (openblas_get_config()) and the variables. A core is forced only when OPENBLAS_CORETYPE is
 * unset, ADAPTERD_BLAS_AUTO is not "0", OpenBLAS is a DYNAMIC_ARCH build, its core is one that
 * 0.3.21 knows and narrower than the widest the CPU runs (AVX-512 with BF16 and VNNI:
 * Cooperlake; AVX-512 F/CD/BW/DQ/VL: SkylakeX; AVX2 with FMA: Haswell; AVX: Sandybridge). A
 * core it does not know (a newer OpenBLAS's) is kept. Pure: reads only its arguments. */
void ad_blas_choose(const struct ad_cpu_features *cpu, const char *core, const char *config,
                    const struct ad_blas_env *env, struct ad_blas_choice *ret);

/* Sets OPENBLAS_CORETYPE=core and ADAPTERD_BLAS_CHOSEN=core,own and executes /proc/self/exe
 * with argv: the same pid, file descriptors (those without FD_CLOEXEC), signal mask, working
 * directory and otherwise the same environment (so systemd's LISTEN_FDS, LISTEN_PID and
 * NOTIFY_SOCKET stay valid). Flushes stdio first. Returns only on failure: -errno, with both
 * variables unset again. Not thread-safe (setenv): call it before any thread starts. */
int ad_blas_reexec(const char *core, const char *own, char *const argv[]);

/* The start-up call of every program that runs BLAS, first thing in main(): reads the CPU, the
 * library and the variables, and when ad_blas_choose says to force a core, executes the program
 * again with it (and does not return). Otherwise fills ret for the caller to log once; a failed
 * re-execution is reported there (warn) and the program goes on with OpenBLAS's own core. Not
 * thread-safe: call it before any thread starts. */
void ad_blas_startup(char *const argv[], struct ad_blas_choice *ret);

/* Assertion macros for tests: on failure they print both sides and abort (libuv's task.h). */
#pragma once

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);           \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

#define CHECK_INT(a, op, b)                                                                    \
    do {                                                                                       \
        int64_t a_ = (int64_t)(a), b_ = (int64_t)(b);                                          \
        if (!(a_ op b_)) {                                                                     \
            fprintf(stderr, "%s:%d: %s %s %s failed: %" PRId64 " vs %" PRId64 "\n", __FILE__,  \
                    __LINE__, #a, #op, #b, a_, b_);                                            \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

#define CHECK_STR(a, b)                                                                        \
    do {                                                                                       \
        const char *a_ = (a), *b_ = (b);                                                       \
        if (!a_ || !b_ || strcmp(a_, b_)) {                                                    \
            fprintf(stderr, "%s:%d: %s == %s failed: '%s' vs '%s'\n", __FILE__, __LINE__, #a,  \
                    #b, a_ ? a_ : "(null)", b_ ? b_ : "(null)");                               \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                                  \
    do {                                                                                       \
        double a_ = (a), b_ = (b);                                                             \
        if (!(fabs(a_ - b_) <= (tol))) {                                                       \
            fprintf(stderr, "%s:%d: %s ~ %s failed: %.9g vs %.9g (tol %g)\n", __FILE__,        \
                    __LINE__, #a, #b, a_, b_, (double)(tol));                                  \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

/* Contains: the error message mentions every given substring. */
#define CHECK_CONTAINS(hay, needle)                                                            \
    do {                                                                                       \
        const char *h_ = (hay), *n_ = (needle);                                                \
        if (!strstr(h_, n_)) {                                                                 \
            fprintf(stderr, "%s:%d: '%s' does not contain '%s'\n", __FILE__, __LINE__, h_,     \
                    n_);                                                                       \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

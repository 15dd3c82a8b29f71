#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "adapterd/util.h"

int ad_err_set(struct ad_err *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

void ad_err_prefix(struct ad_err *err, const char *fmt, ...)
{
    char buf[2 * sizeof(err->msg) + 2];
    va_list ap;
    int n;

    if (!err)
        return;
    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(err->msg), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    n = n < (int)sizeof(err->msg) ? n : (int)sizeof(err->msg) - 1;
    memcpy(buf + n, ": ", 2);
    memcpy(buf + n + 2, err->msg, sizeof(err->msg)); /* msg is NUL-terminated within */
    memcpy(err->msg, buf, sizeof(err->msg) - 1);      /* truncate to fit */
    err->msg[sizeof(err->msg) - 1] = '\0';
}

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "adapterd/util.h"

static enum ad_log_level max_level = AD_LOG_INFO;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

void ad_log_set_level(enum ad_log_level level)
{
    max_level = level;
}

void ad_log(enum ad_log_level level, const char *fmt, ...)
{
    static const char *const names[] = {[AD_LOG_ERROR] = "error", [AD_LOG_WARN] = "warn",
                                        [AD_LOG_INFO] = "info", [AD_LOG_DEBUG] = "debug"};
    char line[2048];
    va_list ap;

    if (level > max_level)
        return;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);

    pthread_mutex_lock(&log_lock);
    if (getenv("JOURNAL_STREAM")) {
        /* systemd reads the priority from a "<N>" prefix and adds its own timestamps. */
        fprintf(stderr, "<%d>%s\n", (int)level, line);
    } else {
        char stamp[32];
        struct tm tm;
        time_t now = time(NULL);
        localtime_r(&now, &tm);
        strftime(stamp, sizeof(stamp), "%Y-%m-%d %H:%M:%S", &tm);
        fprintf(stderr, "%s %s: %s\n", stamp, names[level], line);
    }
    pthread_mutex_unlock(&log_lock);
}

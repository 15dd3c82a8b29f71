/* adapterd: small shared utilities: error reports, logging, file helpers. */
#pragma once

#include <stddef.h>

/* An error report from a parser of user input or a loader: an -errno code and a message that
 * names the file, key or position and the reason. Filled by the callee on failure only. */
struct ad_err {
    int code;
    char msg[256];
};

/* Fills err (if non-NULL) and returns code, so that `return ad_err_set(err, -EINVAL, ...)` reads
 * as one statement. code is a negative errno value. */
int ad_err_set(struct ad_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefixes the message already in err (if non-NULL) with "context: ". */
void ad_err_prefix(struct ad_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

enum ad_log_level {
    AD_LOG_ERROR = 3, /* syslog priorities, as systemd reads them from stderr */
    AD_LOG_WARN = 4,
    AD_LOG_INFO = 6,
    AD_LOG_DEBUG = 7,
};

/* Logging is for the edges (main, http): modules return errors instead. Thread-safe. */
void ad_log_set_level(enum ad_log_level max_level);
void ad_log(enum ad_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_error(...) ad_log(AD_LOG_ERROR, __VA_ARGS__)
#define log_warn(...) ad_log(AD_LOG_WARN, __VA_ARGS__)
#define log_info(...) ad_log(AD_LOG_INFO, __VA_ARGS__)
#define log_debug(...) ad_log(AD_LOG_DEBUG, __VA_ARGS__)

/* A read-only memory map of a whole file. */
struct ad_mmap {
    void *data;
    size_t size;
};

/* Maps path read-only. Returns 0 or -errno (err says which file and why). An empty file maps
 * to data == NULL, size == 0. Unmap with ad_mmap_fini. */
int ad_mmap_init(struct ad_mmap *m, const char *path, struct ad_err *err);
/* The same for the file name inside the directory open at dirfd, which must be a regular file
 * and not a symbolic link (O_NOFOLLOW): for files a client names (adapter directories). Errors
 * name `name`, not the directory. */
int ad_mmap_init_at(struct ad_mmap *m, int dirfd, const char *name, struct ad_err *err);
void ad_mmap_fini(struct ad_mmap *m);

/* n bytes (not zeroed; free() them), from 2 MB on aligned to 2 MB and in transparent huge pages
 * where the kernel allows them (madvise): memory streamed every step (adapter factors, the KV
 * cache) then costs one TLB entry per 2 MB instead of per 4 KB. NULL if out of memory. */
void *ad_alloc_large(size_t n);

/* Reads a whole file into a new NUL-terminated buffer (caller frees). Files above max_bytes are
 * refused with -E2BIG. Returns 0 or -errno. */
int ad_read_file(const char *path, size_t max_bytes, char **ret_buf, size_t *ret_len,
                 struct ad_err *err);
/* The same for the file name inside the directory open at dirfd: a regular file, not a
 * symbolic link (O_NOFOLLOW); errors name `name` only. */
int ad_read_file_at(int dirfd, const char *name, size_t max_bytes, char **ret_buf,
                    size_t *ret_len, struct ad_err *err);

/* Removes path and everything below it (no error if it does not exist). Returns 0 or -errno. */
int ad_rm_rf(const char *path);
/* fsyncs a directory, so that renames and creations in it are durable. Returns 0 or -errno. */
int ad_fsync_dir(const char *path);
/* Writes len bytes to path (created or truncated, 0644) and fsyncs it. Returns 0 or -errno. */
int ad_write_file(const char *path, const void *data, size_t len);

/* Joins dir and name into buf; returns -ENAMETOOLONG if it does not fit. */
int ad_path_join(char *buf, size_t size, const char *dir, const char *name);

/* Monotonic clock in seconds. */
double ad_now(void);

/* SplitMix64 (Steele, Lea, Flood 2014): z + 0x9E3779B97F4A7C15, then its two xor-shift-multiply
 * rounds. The counter-based generator of training's random choices (initialisation, dropout,
 * child-tuning masks): element i of stream k draws ad_splitmix64(key + (k << 40) + i), so any
 * element is drawn without the others, identically on any thread and in a reference. */
static inline unsigned long long ad_splitmix64(unsigned long long z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A uniform double in [0, 1) from 64 random bits (their top 53). */
static inline double ad_unit(unsigned long long x)
{
    return (double)(x >> 11) * 0x1.0p-53;
}

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "adapterd/util.h"

/* Opens a regular file for reading: name relative to dirfd (AT_FDCWD: a path), through no
 * symlink at its last component if nofollow (one is -EINVAL: the file is refused, not missing).
 * Returns the fd or -errno, err naming `name`. */
static int open_regular(int dirfd, const char *name, bool nofollow, struct stat *st,
                        struct ad_err *err)
{
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | (nofollow ? O_NOFOLLOW : 0));
    if (fd < 0 && errno == ELOOP && nofollow)
        return ad_err_set(err, -EINVAL, "%s: a symbolic link (not followed)", name);
    if (fd < 0)
        return ad_err_set(err, -errno, "%s: %s", name, strerror(errno));
    int r = fd;
    if (fstat(fd, st) < 0)
        r = ad_err_set(err, -errno, "%s: %s", name, strerror(errno));
    else if (!S_ISREG(st->st_mode))
        r = ad_err_set(err, -EINVAL, "%s: not a regular file", name);
    if (r < 0)
        close(fd);
    return r;
}

static int mmap_at(struct ad_mmap *m, int dirfd, const char *name, bool nofollow,
                   struct ad_err *err)
{
    struct stat st;
    m->data = NULL;
    m->size = 0;
    int fd = open_regular(dirfd, name, nofollow, &st, err), r = 0;
    if (fd < 0)
        return fd;
    if (st.st_size > 0) {
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            r = ad_err_set(err, -errno, "%s: mmap: %s", name, strerror(errno));
        } else {
            m->data = p;
            m->size = (size_t)st.st_size;
        }
    }
    close(fd);
    return r;
}

int ad_mmap_init(struct ad_mmap *m, const char *path, struct ad_err *err)
{
    return mmap_at(m, AT_FDCWD, path, false, err);
}

int ad_mmap_init_at(struct ad_mmap *m, int dirfd, const char *name, struct ad_err *err)
{
    return mmap_at(m, dirfd, name, true, err);
}

void ad_mmap_fini(struct ad_mmap *m)
{
    if (m->data)
        munmap(m->data, m->size);
    m->data = NULL;
    m->size = 0;
}

static int read_at(int dirfd, const char *name, bool nofollow, size_t max_bytes,
                   char **ret_buf, size_t *ret_len, struct ad_err *err)
{
    struct stat st;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int fd = open_regular(dirfd, name, nofollow, &st, err), r = 0;

    if (fd < 0)
        return fd;
    for (;;) {
        if (cap - len < 4096 + 1) {
            size_t ncap = cap ? cap * 2 : 65536;
            char *nb = realloc(buf, ncap);
            if (!nb) {
                r = ad_err_set(err, -ENOMEM, "%s: out of memory", name);
                break;
            }
            buf = nb;
            cap = ncap;
        }
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            r = ad_err_set(err, -errno, "%s: %s", name, strerror(errno));
            break;
        }
        len += (size_t)n;
        if (len > max_bytes) {
            r = ad_err_set(err, -E2BIG, "%s: larger than %zu bytes", name, max_bytes);
            break;
        }
        if (n == 0)
            break;
    }
    close(fd);
    if (r < 0) {
        free(buf);
        return r;
    }
    buf[len] = '\0';
    *ret_buf = buf;
    if (ret_len)
        *ret_len = len;
    return 0;
}

int ad_read_file(const char *path, size_t max_bytes, char **ret_buf, size_t *ret_len,
                 struct ad_err *err)
{
    return read_at(AT_FDCWD, path, false, max_bytes, ret_buf, ret_len, err);
}

int ad_read_file_at(int dirfd, const char *name, size_t max_bytes, char **ret_buf,
                    size_t *ret_len, struct ad_err *err)
{
    return read_at(dirfd, name, true, max_bytes, ret_buf, ret_len, err);
}

#define HUGE_PAGE ((size_t)2 << 20)

void *ad_alloc_large(size_t n)
{
    if (n < HUGE_PAGE)
        return malloc(n ? n : 1);
    size_t rounded = (n + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    void *p = aligned_alloc(HUGE_PAGE, rounded);
    if (p)
        (void)madvise(p, rounded, MADV_HUGEPAGE); /* a hint: without it, small pages */
    return p;
}

int ad_path_join(char *buf, size_t size, const char *dir, const char *name)
{
    int n = snprintf(buf, size, "%s/%s", dir, name);
    return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

double ad_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    return (flag == FTW_DP ? rmdir(path) : unlink(path)) < 0 ? -errno : 0;
}

int ad_rm_rf(const char *path)
{
    int r = nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    if (r < 0 && errno == ENOENT)
        return 0;
    return r < 0 ? -errno : r;
}

int ad_fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int r = fsync(fd) < 0 ? -errno : 0;
    close(fd);
    return r;
}

int ad_write_file(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    const char *p = data;
    int r = 0;

    if (fd < 0)
        return -errno;
    while (len > 0 && r == 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno != EINTR)
            r = -errno;
        if (w > 0) {
            p += w;
            len -= (size_t)w;
        }
    }
    if (r == 0 && fsync(fd) < 0)
        r = -errno;
    close(fd);
    return r;
}

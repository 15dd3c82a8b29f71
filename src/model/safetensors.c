/* safetensors reader and writer. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapterd/safetensors.h"
#include "adapterd/util.h"

#define ST_MAX_HEADER (100u << 20) /* the reference implementation's limit */

struct ad_st_file {
    struct ad_mmap map; /* zero when parsed from a caller's buffer */
    json_t *header;     /* keeps the names alive */
    struct ad_tensor *tensors;
    size_t n_tensors;
};

static const struct {
    const char *name;
    size_t size;
} dtypes[AD_DTYPE_COUNT] = {
    [AD_DTYPE_F32] = {"F32", 4},         [AD_DTYPE_F16] = {"F16", 2},
    [AD_DTYPE_BF16] = {"BF16", 2},       [AD_DTYPE_F64] = {"F64", 8},
    [AD_DTYPE_I64] = {"I64", 8},         [AD_DTYPE_I32] = {"I32", 4},
    [AD_DTYPE_I16] = {"I16", 2},         [AD_DTYPE_I8] = {"I8", 1},
    [AD_DTYPE_U8] = {"U8", 1},           [AD_DTYPE_BOOL] = {"BOOL", 1},
    [AD_DTYPE_F8_E4M3] = {"F8_E4M3", 1}, [AD_DTYPE_F8_E5M2] = {"F8_E5M2", 1},
};

const char *ad_dtype_name(enum ad_dtype t)
{
    return (unsigned)t < AD_DTYPE_COUNT ? dtypes[t].name : "?";
}

size_t ad_dtype_size(enum ad_dtype t)
{
    return (unsigned)t < AD_DTYPE_COUNT ? dtypes[t].size : 0;
}

bool ad_dtype_is_float(enum ad_dtype t)
{
    return t == AD_DTYPE_F32 || t == AD_DTYPE_F16 || t == AD_DTYPE_BF16;
}

/* ------------------------------------------------------------------------------------------
 * Half-precision conversions */

float ad_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    float f;

    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3ff;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t ad_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffff;

    if (((x >> 23) & 0xff) == 0xff) /* inf or nan */
        return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    if (exp >= 31)
        return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10)
            return (uint16_t)sign;
        mant |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = sign | ((uint32_t)exp << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1)))
        h++; /* may carry into the exponent, which is the right answer */
    return (uint16_t)h;
}

float ad_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t ad_f32_to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) /* nan: keep it a nan */
        return (uint16_t)((x >> 16) | 0x40);
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

void ad_tensor_to_f32(const struct ad_tensor *t, float *dst)
{
    const unsigned char *src = t->data;
    int64_t n = t->n_elems;

    switch (t->dtype) {
    case AD_DTYPE_F32:
        memcpy(dst, src, (size_t)n * 4);
        break;
    case AD_DTYPE_F16:
        for (int64_t i = 0; i < n; i++)
            dst[i] = ad_f16_to_f32((uint16_t)(src[2 * i] | src[2 * i + 1] << 8));
        break;
    case AD_DTYPE_BF16:
        /* Byte loads (any alignment, little-endian file) into the high half of an f32: a
         * loop the compiler vectorises, about 4x faster than a call per element. */
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)src[2 * i] << 16 | (uint32_t)src[2 * i + 1] << 24;
            memcpy(&dst[i], &bits, 4);
        }
        break;
    default:
        /* programmer error: callers check ad_dtype_is_float first */
        memset(dst, 0, (size_t)n * 4);
        break;
    }
}

/* Bits of element i of p, es bytes little-endian (es a constant once inlined). */
static inline uint32_t bits_at(const unsigned char *p, size_t es, int64_t i)
{
    const unsigned char *q = p + (size_t)i * es;
    return es == 4 ? (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 |
                         (uint32_t)q[3] << 24
                   : (uint32_t)q[0] | (uint32_t)q[1] << 8;
}

/* The first of n elements whose exponent bits (mask) are all ones, or -1. Blocks without one
 * take a loop without exits, which the compiler vectorises. */
static inline int64_t find_all_ones(const unsigned char *p, size_t es, int64_t n, uint32_t mask)
{
    for (int64_t i0 = 0; i0 < n; i0 += 1024) {
        int64_t i1 = n - i0 < 1024 ? n : i0 + 1024;
        uint32_t any = 0;
        for (int64_t i = i0; i < i1; i++)
            any |= (bits_at(p, es, i) & mask) == mask;
        for (int64_t i = i0; any && i < i1; i++)
            if ((bits_at(p, es, i) & mask) == mask)
                return i;
    }
    return -1;
}

int64_t ad_tensor_find_nonfinite(const struct ad_tensor *t)
{
    switch (t->dtype) {
    case AD_DTYPE_F32:
        return find_all_ones(t->data, 4, t->n_elems, 0x7f800000u);
    case AD_DTYPE_F16:
        return find_all_ones(t->data, 2, t->n_elems, 0x7c00u);
    case AD_DTYPE_BF16:
        return find_all_ones(t->data, 2, t->n_elems, 0x7f80u);
    default:
        return -1;
    }
}

/* ------------------------------------------------------------------------------------------
 * Reader */

static int cmp_tensor(const void *a, const void *b)
{
    return strcmp(((const struct ad_tensor *)a)->name, ((const struct ad_tensor *)b)->name);
}

/* By data offsets: begin, then end (a tensor of zero bytes before one that starts there too),
 * then name (equal ranges: a stable order for the message). */
static int cmp_offsets(const void *a, const void *b)
{
    const struct ad_tensor *x = a, *y = b;
    const unsigned char *xb = x->data, *yb = y->data;
    if (xb != yb)
        return xb < yb ? -1 : 1;
    if (x->n_bytes != y->n_bytes)
        return x->n_bytes < y->n_bytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int unindexed(struct ad_err *err, size_t from, size_t to)
{
    return ad_err_set(err, -EINVAL, "bytes [%zu, %zu) of the data are not part of any tensor",
                      from, to);
}

/* The format's rule, as the reference reader checks it: sorted by offsets, each tensor begins
 * where the one before ends and the last ends with the data, so that no byte belongs to two
 * tensors and every byte to one. A tensor of zero bytes lies on such a boundary. Leaves the
 * tensors sorted by offset. */
static int check_layout(struct ad_tensor *t, size_t n, const unsigned char *data, size_t data_len,
                        struct ad_err *err)
{
    size_t end = 0; /* of t[i - 1] */

    qsort(t, n, sizeof(*t), cmp_offsets);
    for (size_t i = 0; i < n; i++) {
        size_t b = (size_t)((const unsigned char *)t[i].data - data);
        if (b < end)
            return ad_err_set(err, -EINVAL, "tensors '%.80s' [%zu, %zu] and '%.80s' [%zu, %zu] "
                              "overlap", t[i - 1].name, end - t[i - 1].n_bytes, end, t[i].name,
                              b, b + t[i].n_bytes);
        if (b > end)
            return unindexed(err, end, b);
        end = b + t[i].n_bytes;
    }
    return end < data_len ? unindexed(err, end, data_len) : 0;
}

static int parse_entry(const char *name, json_t *v, const unsigned char *data, size_t data_len,
                       struct ad_tensor *t, struct ad_err *err)
{
    json_t *jd = json_object_get(v, "dtype");
    json_t *js = json_object_get(v, "shape");
    json_t *jo = json_object_get(v, "data_offsets");
    const char *dt;
    int64_t n = 1;

    if (!json_is_object(v) || !json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
        json_array_size(jo) != 2)
        return ad_err_set(err, -EINVAL,
                          "tensor '%s': expected {dtype, shape, data_offsets: [begin, end]}", name);
    dt = json_string_value(jd);
    t->dtype = AD_DTYPE_COUNT;
    for (int i = 0; i < AD_DTYPE_COUNT; i++)
        if (!strcmp(dt, dtypes[i].name))
            t->dtype = (enum ad_dtype)i;
    if (t->dtype == AD_DTYPE_COUNT)
        return ad_err_set(err, -EINVAL, "tensor '%s': unknown dtype '%.32s'", name, dt);
    if (json_array_size(js) > AD_TENSOR_MAX_DIMS)
        return ad_err_set(err, -EINVAL, "tensor '%s': more than %d dimensions", name,
                          AD_TENSOR_MAX_DIMS);
    t->n_dims = (int)json_array_size(js);
    for (int i = 0; i < t->n_dims; i++) {
        json_t *d = json_array_get(js, (size_t)i);
        json_int_t dim = json_is_integer(d) ? json_integer_value(d) : -1;
        if (dim < 0 || dim > INT32_MAX)
            return ad_err_set(err, -EINVAL, "tensor '%s': bad shape", name);
        t->shape[i] = dim;
        if (dim != 0 && n > INT64_MAX / 16 / dim)
            return ad_err_set(err, -EINVAL, "tensor '%s': shape too large", name);
        n *= dim;
    }
    t->n_elems = n;
    json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
    if (!json_is_integer(jb) || !json_is_integer(je))
        return ad_err_set(err, -EINVAL, "tensor '%s': data_offsets must be integers", name);
    json_int_t b = json_integer_value(jb), e = json_integer_value(je);
    if (b < 0 || e < b || (uint64_t)e > data_len)
        return ad_err_set(err, -EINVAL,
                          "tensor '%s': data_offsets [%lld, %lld] outside the %zu data bytes "
                          "(truncated file?)",
                          name, (long long)b, (long long)e, data_len);
    if ((uint64_t)(e - b) != (uint64_t)n * dtypes[t->dtype].size)
        return ad_err_set(err, -EINVAL,
                          "tensor '%s': %lld bytes for %lld elements of %s", name,
                          (long long)(e - b), (long long)n, dtypes[t->dtype].name);
    t->name = name;
    t->data = data + b;
    t->n_bytes = (size_t)(e - b);
    return 0;
}

int ad_st_parse(const void *buf, size_t len, struct ad_st_file **ret, struct ad_err *err)
{
    const unsigned char *p = buf;
    struct ad_st_file *f = NULL;
    json_error_t jerr;
    uint64_t hlen = 0;
    const char *key;
    json_t *v;
    int r;

    if (len < 8)
        return ad_err_set(err, -EINVAL, "file too short for a safetensors header (%zu bytes)",
                          len);
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | p[i];
    if (hlen > ST_MAX_HEADER)
        return ad_err_set(err, -EINVAL, "header length %llu is above the %u limit",
                          (unsigned long long)hlen, ST_MAX_HEADER);
    if (hlen > len - 8)
        return ad_err_set(err, -EINVAL,
                          "header length %llu runs past the end of the %zu-byte file (truncated?)",
                          (unsigned long long)hlen, len);
    f = calloc(1, sizeof(*f));
    if (!f)
        return ad_err_set(err, -ENOMEM, "out of memory");
    f->header = json_loadb((const char *)p + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!f->header) {
        r = ad_err_set(err, -EINVAL, "malformed header JSON at byte %d: %s", jerr.position,
                       jerr.text);
        goto fail;
    }
    if (!json_is_object(f->header)) {
        r = ad_err_set(err, -EINVAL, "header is not a JSON object");
        goto fail;
    }
    json_t *meta = json_object_get(f->header, "__metadata__");
    if (meta) {
        json_t *mv;
        if (!json_is_object(meta)) {
            r = ad_err_set(err, -EINVAL, "__metadata__ is not an object");
            goto fail;
        }
        json_object_foreach(meta, key, mv) {
            if (!json_is_string(mv)) {
                r = ad_err_set(err, -EINVAL, "__metadata__ value for '%s' is not a string", key);
                goto fail;
            }
        }
    }
    size_t n = json_object_size(f->header) - (meta ? 1 : 0);
    f->tensors = calloc(n ? n : 1, sizeof(*f->tensors));
    if (!f->tensors) {
        r = ad_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    json_object_foreach(f->header, key, v) {
        if (!strcmp(key, "__metadata__"))
            continue;
        r = parse_entry(key, v, p + 8 + hlen, len - 8 - (size_t)hlen, &f->tensors[f->n_tensors],
                        err);
        if (r < 0)
            goto fail;
        f->n_tensors++;
    }
    r = check_layout(f->tensors, f->n_tensors, p + 8 + hlen, len - 8 - (size_t)hlen, err);
    if (r < 0)
        goto fail;
    qsort(f->tensors, f->n_tensors, sizeof(*f->tensors), cmp_tensor);
    *ret = f;
    return 0;
fail:
    ad_st_close(f);
    return r;
}

int ad_st_open(const char *path, struct ad_st_file **ret, struct ad_err *err)
{
    struct ad_mmap map;
    struct ad_st_file *f;
    int r;

    r = ad_mmap_init(&map, path, err);
    if (r < 0)
        return r;
    r = ad_st_parse(map.data, map.size, &f, err);
    if (r < 0) {
        ad_mmap_fini(&map);
        ad_err_prefix(err, "%s", path);
        return r;
    }
    f->map = map;
    *ret = f;
    return 0;
}

void ad_st_close(struct ad_st_file *f)
{
    if (!f)
        return;
    free(f->tensors);
    json_decref(f->header);
    ad_mmap_fini(&f->map);
    free(f);
}

size_t ad_st_n_tensors(const struct ad_st_file *f)
{
    return f->n_tensors;
}

const struct ad_tensor *ad_st_tensor(const struct ad_st_file *f, size_t i)
{
    return i < f->n_tensors ? &f->tensors[i] : NULL;
}

const struct ad_tensor *ad_st_find(const struct ad_st_file *f, const char *name)
{
    struct ad_tensor key = {.name = name};
    return bsearch(&key, f->tensors, f->n_tensors, sizeof(key), cmp_tensor);
}

const char *ad_st_metadata(const struct ad_st_file *f, const char *key)
{
    json_t *meta = json_object_get(f->header, "__metadata__");
    return json_string_value(json_object_get(meta, key));
}

/* ------------------------------------------------------------------------------------------
 * Writer */

static int write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int ad_st_write(const char *path, const struct ad_st_entry *entries, size_t n,
                const char *const *metadata, struct ad_err *err)
{
    json_t *hdr = json_object();
    char *text = NULL;
    uint64_t off = 0;
    int fd = -1, r;

    if (!hdr)
        return ad_err_set(err, -ENOMEM, "out of memory");
    if (metadata && metadata[0]) {
        json_t *meta = json_object();
        if (json_object_set_new(hdr, "__metadata__", meta) < 0) {
            r = ad_err_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        for (size_t i = 0; metadata[i] && metadata[i + 1]; i += 2)
            if (json_object_set_new(meta, metadata[i], json_string(metadata[i + 1])) < 0) {
                r = ad_err_set(err, -EINVAL, "%s: metadata '%.60s': not UTF-8, or out of memory",
                               path, metadata[i]);
                goto out;
            }
    }
    for (size_t i = 0; i < n; i++) {
        const struct ad_st_entry *e = &entries[i];
        uint64_t elems = 1;
        /* The header is a JSON object: a second entry of a name would replace the first one's
         * offsets while its data is still written, and the file would not read back. */
        bool reserved = !strcmp(e->name, "__metadata__");
        if (reserved || json_object_get(hdr, e->name)) {
            r = ad_err_set(err, -EINVAL, "%s: tensor '%.120s' %s", path, e->name,
                           reserved ? "is a reserved name" : "appears twice");
            goto out;
        }
        if ((unsigned)e->dtype >= AD_DTYPE_COUNT || e->n_dims < 0 ||
            e->n_dims > AD_TENSOR_MAX_DIMS) {
            r = ad_err_set(err, -EINVAL, "%s: tensor '%.120s': bad dtype or rank", path, e->name);
            goto out;
        }
        json_t *shape = json_array();
        for (int d = 0; shape && d < e->n_dims; d++) {
            if (e->shape[d] < 0 || json_array_append_new(shape, json_integer(e->shape[d])) < 0) {
                json_decref(shape);
                shape = NULL;
            }
            elems *= (uint64_t)(e->shape[d] < 0 ? 0 : e->shape[d]);
        }
        uint64_t bytes = elems * ad_dtype_size(e->dtype);
        json_t *v = shape ? json_pack("{s:s, s:o, s:[I,I]}", "dtype", ad_dtype_name(e->dtype),
                                      "shape", shape, "data_offsets", (json_int_t)off,
                                      (json_int_t)(off + bytes))
                          : NULL;
        if (!v) {
            r = ad_err_set(err, shape ? -ENOMEM : -EINVAL, "%s: tensor '%.120s': %s", path,
                           e->name, shape ? "out of memory" : "negative dimension");
            goto out;
        }
        if (json_object_set_new(hdr, e->name, v) < 0) { /* takes v, even on failure */
            r = ad_err_set(err, -EINVAL, "%s: tensor name '%.120s' is not UTF-8", path, e->name);
            goto out;
        }
        off += bytes;
    }
    text = json_dumps(hdr, JSON_COMPACT | JSON_SORT_KEYS);
    if (!text) {
        r = ad_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    /* Pad the header with spaces so the data starts 8-byte aligned, as the reference does. */
    size_t tlen = strlen(text);
    size_t hlen = (tlen + 7) & ~(size_t)7;
    unsigned char lenbuf[8];
    for (int i = 0; i < 8; i++)
        lenbuf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));

    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        r = ad_err_set(err, -errno, "%s: %s", path, strerror(errno));
        goto out;
    }
    r = write_all(fd, lenbuf, 8);
    if (r >= 0)
        r = write_all(fd, text, tlen);
    if (r >= 0 && hlen > tlen)
        r = write_all(fd, "       ", hlen - tlen);
    for (size_t i = 0; r >= 0 && i < n; i++) {
        const struct ad_st_entry *e = &entries[i];
        uint64_t elems = 1;
        for (int d = 0; d < e->n_dims; d++)
            elems *= (uint64_t)e->shape[d];
        r = write_all(fd, e->data, elems * ad_dtype_size(e->dtype));
    }
    if (r >= 0 && fsync(fd) < 0)
        r = -errno;
    if (r < 0)
        ad_err_set(err, r, "%s: write: %s", path, strerror(-r));
out:
    if (fd >= 0)
        close(fd);
    free(text);
    json_decref(hdr);
    return r;
}

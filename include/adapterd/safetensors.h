/* adapterd: the safetensors file format (reader and writer).
 *
 * Format: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
 * {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the byte buffer that
 * follows the header) and an optional "__metadata__" object of strings, then the data. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ad_err;

enum ad_dtype {
    AD_DTYPE_F32,
    AD_DTYPE_F16,
    AD_DTYPE_BF16,
    AD_DTYPE_F64,
    AD_DTYPE_I64,
    AD_DTYPE_I32,
    AD_DTYPE_I16,
    AD_DTYPE_I8,
    AD_DTYPE_U8,
    AD_DTYPE_BOOL,
    AD_DTYPE_F8_E4M3,
    AD_DTYPE_F8_E5M2,
    AD_DTYPE_COUNT,
};

#define AD_TENSOR_MAX_DIMS 8

struct ad_tensor {
    const char *name; /* owned by the file */
    enum ad_dtype dtype;
    int n_dims;
    int64_t shape[AD_TENSOR_MAX_DIMS];
    int64_t n_elems;
    const void *data; /* points into the file's buffer; alignment is not guaranteed */
    size_t n_bytes;
};

/* A parsed safetensors file. Immutable after open: safe to read from several threads. */
struct ad_st_file;

/* Maps and parses path. Returns 0 and a new file, or -errno with err naming the file and the
 * problem (-EINVAL for a malformed header, offsets outside the file, tensors that overlap, or
 * data bytes that no tensor covers: as the reference, every byte of the data is one tensor's). */
int ad_st_open(const char *path, struct ad_st_file **ret, struct ad_err *err);

/* Parses a safetensors image already in memory (borrowed: must outlive the result). Used by
 * ad_st_open, the fuzzer and uploads. Returns 0 or -errno. */
int ad_st_parse(const void *buf, size_t len, struct ad_st_file **ret, struct ad_err *err);

void ad_st_close(struct ad_st_file *f);

size_t ad_st_n_tensors(const struct ad_st_file *f);
/* Tensors sorted by name. Borrowed, valid until ad_st_close. */
const struct ad_tensor *ad_st_tensor(const struct ad_st_file *f, size_t i);
/* Finds a tensor by exact name, or NULL. */
const struct ad_tensor *ad_st_find(const struct ad_st_file *f, const char *name);
/* Value of a "__metadata__" key, or NULL. Borrowed. */
const char *ad_st_metadata(const struct ad_st_file *f, const char *key);

const char *ad_dtype_name(enum ad_dtype t);
size_t ad_dtype_size(enum ad_dtype t);
bool ad_dtype_is_float(enum ad_dtype t); /* F32, F16 or BF16: convertible to f32 */

/* Converts n elements of a float tensor (F32/F16/BF16, any alignment) to f32. */
void ad_tensor_to_f32(const struct ad_tensor *t, float *dst);
/* The index of the first NaN or infinite element of a float tensor (F32/F16/BF16, read as
 * stored: any alignment, any NaN payload), or -1 if every element is finite or t is not a float
 * tensor. Thread-safe. */
int64_t ad_tensor_find_nonfinite(const struct ad_tensor *t);

float ad_f16_to_f32(uint16_t h);
uint16_t ad_f32_to_f16(float f);
float ad_bf16_to_f32(uint16_t h);
uint16_t ad_f32_to_bf16(float f); /* round to nearest even */

/* One tensor to write: data in dtype, n_bytes must match shape. */
struct ad_st_entry {
    const char *name;
    enum ad_dtype dtype;
    int n_dims;
    int64_t shape[AD_TENSOR_MAX_DIMS];
    const void *data;
};

/* Writes a safetensors file to path (created or truncated, then fsync'd). metadata is a NULL-
 * terminated list of key, value strings, or NULL. Returns 0, -EINVAL (a name given twice or
 * "__metadata__", a name that is not UTF-8, a bad dtype, rank or dimension; nothing is written),
 * -ENOMEM or the -errno of the write. Not atomic: callers that need atomicity write to a
 * temporary name and rename. */
int ad_st_write(const char *path, const struct ad_st_entry *entries, size_t n,
                const char *const *metadata, struct ad_err *err);

/* Fuzz target: safetensors parsing, then reading every tensor the parser accepted. */
#include <stdint.h>
#include <stdlib.h>

#include "adapterd/safetensors.h"
#include "adapterd/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ad_st_file *f;
    struct ad_err err;

    if (ad_st_parse(data, size, &f, &err) < 0)
        return 0;
    for (size_t i = 0; i < ad_st_n_tensors(f); i++) {
        const struct ad_tensor *t = ad_st_tensor(f, i);
        if (ad_dtype_is_float(t->dtype) && t->n_elems < (1 << 20)) {
            float *out = malloc((size_t)t->n_elems * sizeof(float) + 1);
            if (out)
                ad_tensor_to_f32(t, out);
            free(out);
        }
        (void)ad_st_find(f, t->name);
    }
    (void)ad_st_metadata(f, "format");
    ad_st_close(f);
    return 0;
}

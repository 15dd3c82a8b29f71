/* Fuzz target: adapter loading (adapter_config.json + safetensors) against a tiny Llama.
 * Input: the config text, a NUL byte, then the safetensors image. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"
#include "../tiny.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct ad_model *m;
    static char dir[64];
    if (!m)
        m = tiny_model(dir);
    const uint8_t *nul = memchr(data, 0, size);
    struct ad_adapter *a;
    struct ad_err err;

    if (!nul)
        return 0;
    char *config = malloc((size_t)(nul - data) + 1);
    if (!config)
        return 0;
    memcpy(config, data, (size_t)(nul - data));
    config[nul - data] = '\0';
    /* odd sizes hold LoRA factors as int8 (AD_ADAPTER_LORA_INT8), even ones as stored */
    unsigned flags = size % 2 ? AD_ADAPTER_LORA_INT8 : 0;
    int r = ad_adapter_load_mem(m, config, nul + 1, size - (size_t)(nul - data) - 1, "fuzz",
                                flags, &a, &err);
    if (getenv("FUZZ_VERBOSE")) /* to check that seeds load: FUZZ_VERBOSE=1 replay-adapter DIR */
        fprintf(stderr, "%s\n", r == 0 ? "loaded" : err.msg);
    if (r == 0) {
        struct ad_mix mix = {.n = 1, .a = {a}, .w = {1.0f}};
        (void)ad_mix_validate(&mix, &err);
        ad_adapter_unref(a);
    }
    free(config);
    return 0;
}

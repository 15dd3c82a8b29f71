/* Fuzz target: config.json parsing. Input: config text, optionally followed by a NUL byte and a
 * generation_config.json text. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/model.h"
#include "adapterd/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ad_model_config cfg;
    struct ad_err err;
    char *text = malloc(size + 1);

    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    size_t first = strlen(text);
    const char *gen = first < size ? text + first + 1 : NULL;
    (void)ad_model_config_parse(text, gen, &cfg, &err);
    free(text);
    return 0;
}

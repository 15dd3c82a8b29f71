/* Fuzz target: one line of a JSONL training file (ad_data_check_line, src/train/data.c). The
 * line is copied to a buffer of exactly its size, so a read past its end is caught; a refusal
 * must be -EINVAL with "line 1: " and a reason, as the contract says. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/train.h"
#include "adapterd/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ad_err err = {0};
    char *line = malloc(size ? size : 1);
    int rc;

    if (!line)
        return 0;
    memcpy(line, data, size);
    rc = ad_data_check_line(line, size, 1, &err);
    if (rc != 0 && (rc != -EINVAL || err.code != rc || strncmp(err.msg, "line 1: ", 8) ||
                    !err.msg[8])) {
        fprintf(stderr, "fuzz-data: returned %d, err %d '%s'\n", rc, err.code, err.msg);
        abort();
    }
    free(line);
    return 0;
}

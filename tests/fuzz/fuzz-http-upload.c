/* Fuzz target: adapter uploads (PUT /v1/adapters/NAME, multipart/form-data parsed by
 * libmicrohttpd's post processor and streamed to disk, then installed), sent to the real server
 * over a socket (fuzz-http.c checks every answer). Input:
 *   byte 0: bit 0 the body: 0 the rest as is, 1 built from the rest as fuzz-adapter takes it (the
 *           adapter_config.json text, a NUL byte, the safetensors image) into the two parts
 *           curl -F config=@... -F weights=@... sends; bits 1-2 the key (admin, API, none,
 *           wrong); bit 3 chunked transfer coding; bit 4 the Content-Type is a line of the
 *           input (else multipart/form-data with the boundary "BOUNDARY" below); bit 5 once
 *           installed, the adapter generates two tokens and must answer 200;
 *   then a line: NAME (as it goes in the URL);
 *   then, with bit 4, a line: the Content-Type;
 *   the rest: the body, or config NUL weights. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "fuzz-http.h"

#define BOUNDARY "------------------------adapterdfuzz7q"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint8_t *multipart(const uint8_t *data, size_t size, size_t *ret_len)
{
    static const char head1[] = "--" BOUNDARY "\r\nContent-Disposition: form-data; "
                                "name=\"config\"; filename=\"adapter_config.json\"\r\n"
                                "Content-Type: application/json\r\n\r\n";
    static const char head2[] = "\r\n--" BOUNDARY "\r\nContent-Disposition: form-data; "
                                "name=\"weights\"; filename=\"adapter_model.safetensors\"\r\n"
                                "Content-Type: application/octet-stream\r\n\r\n";
    static const char tail[] = "\r\n--" BOUNDARY "--\r\n";
    const uint8_t *nul = memchr(data, 0, size);
    size_t n_config = nul ? (size_t)(nul - data) : size;
    size_t n_weights = nul ? size - n_config - 1 : 0;
    size_t len = sizeof(head1) - 1 + n_config + sizeof(head2) - 1 + n_weights + sizeof(tail) - 1;
    uint8_t *b = malloc(len), *p = b;
    if (!b)
        abort();
    memcpy(p, head1, sizeof(head1) - 1);
    p += sizeof(head1) - 1;
    memcpy(p, data, n_config);
    p += n_config;
    memcpy(p, head2, sizeof(head2) - 1);
    p += sizeof(head2) - 1;
    if (n_weights)
        memcpy(p, nul + 1, n_weights);
    p += n_weights;
    memcpy(p, tail, sizeof(tail) - 1);
    *ret_len = len;
    return b;
}

/* The installed adapter runs: a prompt with logprobs, two tokens. */
static void generate(const char *name)
{
    json_t *j = json_pack("{s:s, s:[i,i,i], s:i, s:b, s:i, s:b}", "model", name, "prompt", 1, 5,
                          9, "max_tokens", 2, "echo", 1, "logprobs", 2, "ignore_eos", 1);
    char *body = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!body)
        abort();
    struct fz_request q = {.method = "POST", .path = "/v1/completions",
                           .content_type = "application/json", .body = (uint8_t *)body,
                           .len = strlen(body)};
    struct fz_response r;
    fz_http_send(FZ_CHATML, &q, &r);
    if (r.status != 200) {
        fprintf(stderr, "fuzz-http-upload: adapter '%s' installed, but a completion with it "
                "answers %d: %s\n", name, r.status, r.body);
        abort();
    }
    fz_response_fini(&r);
    free(body);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char name[200], path[256], ctype[256];
    const uint8_t *line;
    size_t n;
    struct fz_response r;

    if (size < 1)
        return 0;
    fz_http_init();
    uint8_t flags = data[0];
    data++;
    size--;
    fz_line(&data, &size, &line, &n);
    snprintf(path, sizeof(path), "/v1/adapters/%s", fz_clean(name, sizeof(name), line, n, true));
    struct fz_request q = {.method = "PUT", .path = path,
                           .content_type = "multipart/form-data; boundary=" BOUNDARY,
                           .auth = (enum fz_auth)((flags >> 1) & 3), .chunked = flags & 8};
    if (flags & 16) {
        fz_line(&data, &size, &line, &n);
        q.content_type = fz_clean(ctype, sizeof(ctype), line, n, false);
    }
    uint8_t *body = NULL;
    if (flags & 1) {
        body = multipart(data, size, &q.len);
        q.body = body;
    } else {
        q.body = data;
        q.len = size;
    }
    fz_http_send(FZ_CHATML, &q, &r);
    if (r.status < 300 && (flags & 32)) {
        json_t *j = json_loads(r.body, 0, NULL);
        const char *id = json_string_value(json_object_get(j, "id"));
        if (!id)
            abort();
        generate(id);
        json_decref(j);
    }
    fz_http_reset(r.status < 300);
    fz_response_fini(&r);
    free(body);
    return 0;
}

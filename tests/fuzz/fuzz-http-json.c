/* Fuzz target: the JSON requests of the HTTP API (completions, chat, tokenize, detokenize, vLLM's
 * load/unload), sent to the real server over a socket (fuzz-http.c checks every answer).
 * Input:
 *   byte 0: bits 0-2 the route (completions, chat, tokenize, detokenize, load_lora_adapter,
 *           unload_lora_adapter, completions, chat); bits 3-7 the server, modulo FZ_N_SERVERS
 *           (a real chat template of each family, an unsupported one, a tokenizer without a
 *           template, no tokenizer: fuzz-http.h);
 *   byte 1: bits 0-1 the key (admin, API, none, wrong); bit 2 an X-Adapter header, its value the
 *           first line of the rest; bit 3 chunked transfer coding; bit 4 no Content-Type;
 *   the rest: the body. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz-http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const paths[8] = {
        "/v1/completions",       "/v1/chat/completions", "/tokenize",
        "/detokenize",           "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
        "/v1/completions",       "/v1/chat/completions",
    };
    char x_adapter[256];
    struct fz_response r;

    if (size < 2)
        return 0;
    fz_http_init();
    int route = data[0] & 7, server = (data[0] >> 3) % FZ_N_SERVERS;
    struct fz_request q = {.method = "POST", .path = paths[route],
                           .content_type = data[1] & 16 ? NULL : "application/json",
                           .auth = (enum fz_auth)(data[1] & 3), .chunked = data[1] & 8};
    bool has_x_adapter = data[1] & 4;
    data += 2;
    size -= 2;
    if (has_x_adapter) {
        const uint8_t *line;
        size_t n;
        fz_line(&data, &size, &line, &n);
        q.x_adapter = fz_clean(x_adapter, sizeof(x_adapter), line, n, false);
    }
    q.body = data;
    q.len = size;
    fz_http_send(server, &q, &r);
    fz_http_reset((route == 4 || route == 5) && r.status < 300);
    fz_response_fini(&r);
    return 0;
}

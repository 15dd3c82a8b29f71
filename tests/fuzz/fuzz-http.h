/* Fuzz harness for the HTTP API (fuzz-http.c): the real server (src/http) started in-process on
 * 127.0.0.1 over a tiny model, an engine and a registry, and a client that sends one raw HTTP
 * request and checks the answer. Shared by fuzz-http-json.c and fuzz-http-upload.c. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The servers differ by tokenizer: servers 0 to 13 serve the real chat templates of
 * tests/chat/templates (fuzz-http.c lists them; 13 is one adapterd does not support), then one
 * tokenizer without a chat template, and no tokenizer at all. */
enum { FZ_CHATML = 0, FZ_NO_TEMPLATE = 14, FZ_NO_TOKENIZER = 15, FZ_N_SERVERS = 16 };

/* Authorization header of a request. */
enum fz_auth { FZ_AUTH_ADMIN, FZ_AUTH_API, FZ_AUTH_NONE, FZ_AUTH_WRONG };

struct fz_request {
    const char *method;
    const char *path;       /* sent as is: must hold no space, CR or LF */
    const char *content_type; /* NULL: no Content-Type header */
    const char *x_adapter;  /* NULL: no X-Adapter header */
    enum fz_auth auth;
    bool chunked;           /* Transfer-Encoding: chunked rather than Content-Length */
    const uint8_t *body;
    size_t len;
};

struct fz_response {
    int status;
    char *body; /* NUL-terminated, de-chunked */
    size_t len;
};

/* Starts the servers once (later calls return at once). Aborts on failure. */
void fz_http_init(void);
/* Sends req to a server and reads the whole answer into ret (fz_response_fini frees it).
 * Aborts, printing the request and the answer, if the answer is not well-formed HTTP, if it is
 * 5xx, if a 4xx does not carry {"error": {"message", "type", "code"}}, if a 2xx JSON answer does
 * not parse or an event stream does not end with [DONE], or if the server hangs. */
void fz_http_send(int server, const struct fz_request *req, struct fz_response *ret);
void fz_response_fini(struct fz_response *r);
/* Back to the fixture adapters ("lora", "lora2"): removes any other, and reinstalls the
 * fixtures if a request may have replaced or deleted them (dirty). */
void fz_http_reset(bool dirty);
/* Server FZ_CHATML has fine-tuning: the id of a training file that validates, the base's id, and
 * a reset that
 * cancels every job still queued or running and deletes every other file. */
const char *fz_http_file_id(void);
const char *fz_http_model_id(void);
void fz_http_reset_jobs(void);
/* Copies the bytes of s[0..n) that a header value can hold (no control characters) into buf,
 * as a string, truncated to fit; if no_space, only those a request line can hold (printable
 * ASCII but space). Returns buf. */
char *fz_clean(char *buf, size_t size, const uint8_t *s, size_t n, bool no_space);
/* Splits one line (up to '\n') off the front of *data. */
void fz_line(const uint8_t **data, size_t *size, const uint8_t **ret, size_t *ret_len);

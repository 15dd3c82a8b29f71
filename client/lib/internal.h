/* Private to client/lib: the client handle, one HTTP exchange (struct adcp_call), buffers and
 * errors. Everything here is hidden from the shared library's symbols. */
#pragma once

#include <curl/curl.h>
#include <jansson.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

#include "adapterd-client.h"

#define ADCP_MAX_ANSWER ((size_t)64 << 20) /* bytes of an answer kept in memory */

struct adc_client {
    CURL *curl;
    CURLM *multi;         /* drives curl, so that a cancel is seen between polls of 100 ms */
    char *base;           /* scheme://host[:port][/prefix], without a trailing '/' */
    char *auth;           /* "Authorization: Bearer KEY", or NULL */
    long connect_ms;      /* 0: libcurl's default */
    long total_ms;        /* 0: no limit */
    atomic_int cancelled; /* lock-free, so a signal handler may set it */
    char errbuf[CURL_ERROR_SIZE];
};

/* A growing byte buffer, always NUL-terminated once it holds anything. */
struct adcp_buf {
    char *data;
    size_t len, cap;
};
/* Appends n bytes; -E2BIG beyond max bytes in all, -ENOMEM. */
int adcp_buf_add(struct adcp_buf *b, const void *p, size_t n, size_t max);

/* One HTTP exchange: the request, where a 2xx answer goes, and what came back. */
struct adcp_call {
    const char *method;
    const char *path; /* appended to the base URL; starts with '/' */
    const char *body; /* a JSON body (body_len bytes), or NULL */
    size_t body_len;
    curl_mime *mime;    /* or a multipart body (owned by the caller) */
    const char *accept; /* an Accept header, or NULL */
    /* A 2xx answer goes to sink when it is set (a return < 0 stops the transfer, and
     * adcp_perform returns it; the sink fills err itself), else into answer. An error answer
     * always goes into answer. */
    int (*sink)(void *ud, const char *data, size_t n);
    void *sink_ud;
    adc_progress_fn progress; /* sent bytes with a body, else received bytes */
    void *progress_ud;

    /* filled by adcp_perform */
    struct adc_client *c;
    struct adc_error *err;
    long status;
    struct adcp_buf answer;
    int stop_rc; /* why the transfer was stopped from here, 0 if it was not */
};

/* Runs the exchange. Returns 0 for a 2xx answer, else -errno with err filled: the transport's
 * error, the server's error answer, or what a sink or progress callback returned. k->answer
 * holds the answer either way; adcp_call_fini frees it. */
int adcp_perform(struct adc_client *c, struct adcp_call *k, struct adc_error *err);
void adcp_call_fini(struct adcp_call *k);
/* adcp_perform with body (may be NULL) as k's JSON body; *ret (may be NULL) gets the JSON
 * answer, NULL when it is empty. */
int adcp_json_call(struct adc_client *c, struct adcp_call *k, const json_t *body, json_t **ret,
                   struct adc_error *err);

/* "<prefix><name escaped><suffix>" ("/v1/adapters/", name, "/files/x") into a new string
 * (free() it), or NULL. */
char *adcp_path(struct adc_client *c, const char *prefix, const char *name, const char *suffix);

/* 0 if path is a regular file we can read, else -errno with err naming it. */
int adcp_readable(const char *path, struct adc_error *err);
/* Adds a part `name` streamed from the file at path, of this content type, to mime: 0 or
 * -ENOMEM. */
int adcp_mime_file(curl_mime *mime, const char *name, const char *path, const char *type);

/* Called with each event's JSON object (borrowed); a return < 0 (err filled) stops the stream. */
typedef int (*adcp_json_fn)(void *ud, json_t *obj, struct adc_error *err);
/* Runs k (method, path and body set; accept and sink are set here) as a stream of server-sent
 * events: on_json gets each "data: {json}" event until "data: [DONE]". Returns 0 after [DONE],
 * on_json's error, -EPROTO (an event that is not a JSON object, or the end before [DONE]), or
 * adcp_perform's. The caller still calls adcp_call_fini(k). */
int adcp_sse(struct adc_client *c, struct adcp_call *k, adcp_json_fn on_json, void *ud,
             struct adc_error *err);

/* Fills err (if not NULL) and returns rc, so that `return adcp_error(err, -EINVAL, 0, ...)`
 * reads as one statement. status is the HTTP status (0: no answer). */
int adcp_error(struct adc_error *err, int rc, long status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* The -errno of an HTTP status (the header's table). */
int adcp_status_rc(long status);
/* Fills err from the server's error object {"message", "type", "code"} (or a string) of an
 * answer with this status; returns adcp_status_rc(status). */
int adcp_error_object(struct adc_error *err, long status, const json_t *error);

/* A copy of request with "stream" set to stream, or NULL (-ENOMEM, or not a JSON object:
 * -EINVAL); *ret_rc says which. */
json_t *adcp_with_stream(const json_t *request, bool stream, int *ret_rc);

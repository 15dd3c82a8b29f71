/* Server-sent events: the parser ("data: {json}" lines, a blank line ending each event,
 * "data: [DONE]" ending the stream) under any route that answers them, and the completion routes,
 * whole or streamed with one callback per choice. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define MAX_EVENT ((size_t)16 << 20) /* bytes of one event */

struct sse {
    struct adcp_buf line; /* the line read so far */
    struct adcp_buf data; /* the event's data lines, joined by '\n' */
    bool done;            /* "data: [DONE]" came */
    adcp_json_fn on_json;
    void *ud;
    struct adc_error *err;
};

/* The end of an event (a blank line). */
static int sse_dispatch(struct sse *s)
{
    int rc = 0;
    if (!s->data.len || s->done)
        goto out;
    if (!strcmp(s->data.data, "[DONE]")) {
        s->done = true;
        goto out;
    }
    json_error_t jerr;
    json_t *chunk = json_loadb(s->data.data, s->data.len, 0, &jerr);
    if (!json_is_object(chunk))
        rc = adcp_error(s->err, -EPROTO, 200, "an event is not a JSON object (%s): %.100s",
                        chunk ? "another value" : jerr.text, s->data.data);
    else
        rc = s->on_json(s->ud, chunk, s->err);
    json_decref(chunk);
out:
    s->data.len = 0;
    return rc;
}

/* Appends to one of the buffers; the error says what was too large. */
static int add(struct sse *s, struct adcp_buf *b, const char *p, size_t n)
{
    int rc = adcp_buf_add(b, p, n, MAX_EVENT);
    if (rc < 0)
        return adcp_error(s->err, rc, 200,
                          rc == -E2BIG ? "an event is larger than 16 MiB" : "out of memory");
    return 0;
}

/* One line without its '\n'. Fields other than data (event, id, retry) and comments (':') are
 * not used by the API. */
static int sse_line(struct sse *s, const char *p, size_t n)
{
    if (n > 0 && p[n - 1] == '\r')
        n--;
    if (n == 0)
        return sse_dispatch(s);
    if (n < 5 || memcmp(p, "data:", 5))
        return 0;
    p += 5;
    n -= 5;
    if (n > 0 && *p == ' ') {
        p++;
        n--;
    }
    int rc = s->data.len ? add(s, &s->data, "\n", 1) : 0;
    return rc < 0 ? rc : add(s, &s->data, p, n);
}

/* The sink of the exchange: splits what arrives into lines. */
static int sse_feed(void *ud, const char *data, size_t n)
{
    struct sse *s = ud;
    while (n > 0) {
        const char *nl = memchr(data, '\n', n);
        size_t k = nl ? (size_t)(nl - data) : n;
        int rc;
        if (!nl)
            rc = add(s, &s->line, data, k);
        else if (s->line.len) { /* the end of a line begun in an earlier piece */
            rc = add(s, &s->line, data, k);
            if (rc >= 0)
                rc = sse_line(s, s->line.data, s->line.len);
            s->line.len = 0;
        } else
            rc = sse_line(s, data, k);
        if (rc < 0)
            return rc;
        data += nl ? k + 1 : k;
        n -= nl ? k + 1 : k;
    }
    return 0;
}

int adcp_sse(struct adc_client *c, struct adcp_call *k, adcp_json_fn on_json, void *ud,
             struct adc_error *err)
{
    struct sse s = {.on_json = on_json, .ud = ud, .err = err};
    k->accept = "text/event-stream";
    k->sink = sse_feed;
    k->sink_ud = &s;
    int rc = adcp_perform(c, k, err);
    if (rc >= 0 && !s.done && s.line.len) /* a last line without its '\n' */
        rc = sse_line(&s, s.line.data, s.line.len);
    if (rc >= 0 && !s.done)
        rc = sse_dispatch(&s);
    if (rc >= 0 && !s.done)
        rc = adcp_error(err, -EPROTO, k->status, "the stream ended before \"data: [DONE]\"");
    free(s.line.data);
    free(s.data.data);
    return rc;
}

/* ==========================================================================================
 * The completion routes */

struct choices {
    adc_event_fn on_event;
    void *ud;
};

/* One event's JSON: an error event, or a chunk with one callback per choice. */
static int on_chunk(void *ud, json_t *chunk, struct adc_error *err)
{
    struct choices *cb = ud;
    json_t *error = json_object_get(chunk, "error");
    if (error) {
        json_t *code = json_is_object(error) ? json_object_get(error, "code") : NULL;
        return adcp_error_object(err, json_is_integer(code) ? json_integer_value(code) : 500,
                                 error);
    }
    json_t *choices = json_object_get(chunk, "choices"), *usage = json_object_get(chunk, "usage");
    size_t n = json_array_size(choices);
    for (size_t i = 0; i < (n ? n : 1); i++) {
        json_t *ch = json_array_get(choices, i);
        json_t *text = json_object_get(ch, "text"), *index = json_object_get(ch, "index");
        if (!text)
            text = json_object_get(json_object_get(ch, "delta"), "content");
        struct adc_event ev = {
            .index = ch ? (json_is_integer(index) ? (int)json_integer_value(index) : (int)i) : -1,
            .text = json_is_string(text) ? json_string_value(text) : "",
            .len = json_is_string(text) ? json_string_length(text) : 0,
            .finish_reason = json_string_value(json_object_get(ch, "finish_reason")),
            .usage = json_is_object(usage) ? usage : NULL,
            .chunk = chunk,
        };
        if (cb->on_event(cb->ud, &ev))
            return adcp_error(err, -ECANCELED, 200, "stopped by the event callback");
    }
    return 0;
}

int adc_stream(struct adc_client *c, const char *path, const json_t *body, adc_event_fn on_event,
               void *ud, struct adc_error *err)
{
    struct choices cb = {.on_event = on_event, .ud = ud};
    struct adcp_call k = {.method = "POST", .path = path};
    char *text = json_dumps(body, JSON_COMPACT);
    if (!text)
        return adcp_error(err, -EINVAL, 0, "the request cannot be written as JSON");
    k.body = text;
    k.body_len = strlen(text);
    int rc = adcp_sse(c, &k, on_chunk, &cb, err);
    adcp_call_fini(&k);
    free(text);
    return rc;
}

static int generate(struct adc_client *c, const char *path, const json_t *request, json_t **ret,
                    adc_event_fn on_event, void *ud, struct adc_error *err)
{
    int rc;
    json_t *body = adcp_with_stream(request, on_event != NULL, &rc);
    if (!body)
        return adcp_error(err, rc, 0,
                          rc == -EINVAL ? "the request is not a JSON object" : "out of memory");
    if (on_event)
        rc = adc_stream(c, path, body, on_event, ud, err);
    else
        rc = adc_request(c, "POST", path, body, ret, err);
    json_decref(body);
    return rc;
}

int adc_complete(struct adc_client *c, const json_t *request, json_t **ret, struct adc_error *err)
{
    return generate(c, "/v1/completions", request, ret, NULL, NULL, err);
}

int adc_chat(struct adc_client *c, const json_t *request, json_t **ret, struct adc_error *err)
{
    return generate(c, "/v1/chat/completions", request, ret, NULL, NULL, err);
}

int adc_complete_stream(struct adc_client *c, const json_t *request, adc_event_fn on_event,
                        void *ud, struct adc_error *err)
{
    return generate(c, "/v1/completions", request, NULL, on_event, ud, err);
}

int adc_chat_stream(struct adc_client *c, const json_t *request, adc_event_fn on_event, void *ud,
                    struct adc_error *err)
{
    return generate(c, "/v1/chat/completions", request, NULL, on_event, ud, err);
}

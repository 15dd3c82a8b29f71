/* POST /v1/completions and /v1/chat/completions (OpenAI's shapes, vLLM's extensions).
 *
 * A request becomes one engine request per prompt ("job"). The engine thread only queues each
 * job's events; the connection's thread turns them into text (streaming detokenizer, stop
 * strings, logprobs) and either one JSON body or a stream of server-sent events. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "adapterd/engine.h"
#include "adapterd/model.h"
#include "adapterd/registry.h"
#include "adapterd/tokenizer.h"
#include "internal.h"

#define MAX_PROMPTS 64
#define MAX_STOPS 8
#define MAX_STOP_LEN 256

struct job {
    struct completion *cp;
    int index;
    struct ad_request *req;
    int32_t *prompt;
    int n_prompt;

    /* guarded by cp->lock: filled by the engine thread */
    struct ad_event *events;
    size_t n_events, cap_events;
    bool done;

    /* the connection thread's */
    struct ad_detok detok;
    char *text; /* generated text so far (after stop-string truncation) */
    size_t len, cap, sent;
    bool stopped; /* a stop string matched */
    enum ad_finish finish;
    int n_generated;
    int n_cached; /* prompt tokens served from the prefix cache */
    bool role_sent; /* chat streams: the first delta carried "role" */
    size_t ids_sent; /* streams: token ids already sent */
    json_t *lp_tokens, *lp_values, *lp_top, *lp_offsets; /* completions' logprobs arrays */
    json_t *chat_lp;                                      /* chat's logprobs.content */
    json_t *ids;                                          /* generated ids (token_ids) */
};

struct completion {
    struct conn *c;    /* gone once MHD completes a streamed request: use h */
    struct ad_http *h;
    bool chat, stream, echo, token_ids, return_ids;
    int n_logprobs; /* -1: none */
    char model[128];
    char id[40];
    long created;
    char stops[MAX_STOPS][MAX_STOP_LEN + 1];
    int n_stops;
    struct ad_mix mix_template; /* adapters as the request named them (one ref per job taken) */
    int n_jobs;
    struct job jobs[MAX_PROMPTS];
    pthread_mutex_t lock;
    pthread_cond_t cond;
    /* streaming output */
    char *out;
    size_t out_len, out_cap, out_pos;
    bool finished_stream; /* [DONE] written */
};

/* ==========================================================================================
 * Small helpers */

static int append(char **buf, size_t *len, size_t *cap, const char *s, size_t n)
{
    if (*len + n + 1 > *cap) {
        size_t c = *cap ? *cap : 256;
        while (c < *len + n + 1)
            c *= 2;
        char *b = realloc(*buf, c);
        if (!b)
            return -ENOMEM;
        *buf = b;
        *cap = c;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = '\0';
    return 0;
}

/* The text of one token for logprobs: its decoded string, or "token_id:N". */
static json_t *token_string(struct completion *cp, int32_t id)
{
    const struct ad_tokenizer *tok = cp->c->h->deps.tok;
    char buf[32], *text = NULL;
    size_t len;
    if (cp->token_ids || !tok || ad_tokenizer_decode(tok, &id, 1, false, &text, &len) < 0) {
        snprintf(buf, sizeof(buf), "token_id:%d", id);
        return json_string(buf);
    }
    json_t *s = json_stringn_nocheck(text, len);
    free(text);
    return s;
}

static json_t *number_or_null(float v)
{
    return isnan(v) ? json_null() : json_real(isinf(v) ? -9999.0 : v);
}

/* ==========================================================================================
 * Events: engine thread -> job queue */

static void on_event(struct ad_request *req, const struct ad_event *ev, void *ud)
{
    struct job *j = ud;
    struct completion *cp = j->cp;
    (void)req;
    pthread_mutex_lock(&cp->lock);
    if (j->n_events == j->cap_events) {
        size_t cap = j->cap_events ? 2 * j->cap_events : 16;
        struct ad_event *e = realloc(j->events, cap * sizeof(*e));
        if (e) {
            j->events = e;
            j->cap_events = cap;
        }
    }
    if (j->n_events < j->cap_events)
        j->events[j->n_events++] = *ev;
    if (ev->done)
        j->done = true; /* even if the event could not be queued */
    pthread_cond_broadcast(&cp->cond);
    pthread_mutex_unlock(&cp->lock);
}

/* Appends generated text, applying stop strings. Returns true if a stop string ended it. */
static bool add_text(struct completion *cp, struct job *j, const char *s, size_t n)
{
    if (j->stopped || n == 0)
        return j->stopped;
    size_t from = j->len;
    if (append(&j->text, &j->len, &j->cap, s, n) < 0)
        return false;
    for (int k = 0; k < cp->n_stops; k++) {
        size_t sl = strlen(cp->stops[k]);
        size_t start = from >= sl ? from - sl + 1 : 0;
        char *hit = NULL;
        for (size_t p = start; p + sl <= j->len && !hit; p++)
            if (!memcmp(j->text + p, cp->stops[k], sl))
                hit = j->text + p;
        if (hit) {
            j->len = (size_t)(hit - j->text);
            j->text[j->len] = '\0';
            j->stopped = true;
            ad_engine_finish(cp->c->h->deps.engine, j->req, AD_FINISH_STOP);
            return true;
        }
    }
    return false;
}

static void add_logprob(struct completion *cp, struct job *j, const struct ad_event *ev)
{
    if (cp->n_logprobs < 0)
        return;
    if (cp->chat) {
        json_t *top = json_array();
        for (int k = 0; k < ev->n_top; k++)
            json_array_append_new(top, json_pack("{s:o, s:o}", "token",
                                                 token_string(cp, ev->top_ids[k]), "logprob",
                                                 number_or_null(ev->top_logprobs[k])));
        json_array_append_new(j->chat_lp, json_pack("{s:o, s:o, s:o}", "token",
                                                    token_string(cp, ev->token), "logprob",
                                                    number_or_null(ev->logprob), "top_logprobs",
                                                    top));
        return;
    }
    json_array_append_new(j->lp_tokens, token_string(cp, ev->token));
    json_array_append_new(j->lp_values, number_or_null(ev->logprob));
    json_array_append_new(j->lp_offsets, json_integer((json_int_t)j->len));
    if (isnan(ev->logprob)) {
        json_array_append_new(j->lp_top, json_null());
        return;
    }
    json_t *top = json_object();
    for (int k = 0; k < ev->n_top; k++) {
        json_t *ts = token_string(cp, ev->top_ids[k]);
        json_object_set_new(top, json_string_value(ts), number_or_null(ev->top_logprobs[k]));
        json_decref(ts);
    }
    json_array_append_new(j->lp_top, top);
}

/* Takes the queued events of every job and turns them into text. Returns true when every job
 * is done. Waits up to timeout seconds for something to happen. */
static bool pump(struct completion *cp, double timeout)
{
    struct ad_event *evs[MAX_PROMPTS];
    size_t n_evs[MAX_PROMPTS];
    bool all_done = true;

    pthread_mutex_lock(&cp->lock);
    bool any = false;
    for (int i = 0; i < cp->n_jobs; i++)
        any |= cp->jobs[i].n_events > 0 || !cp->jobs[i].done;
    bool pending = false;
    for (int i = 0; i < cp->n_jobs; i++)
        pending |= cp->jobs[i].n_events > 0;
    if (!pending && any) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long ns = ts.tv_nsec + (long)(timeout * 1e9);
        ts.tv_sec += ns / 1000000000L;
        ts.tv_nsec = ns % 1000000000L;
        pthread_cond_timedwait(&cp->cond, &cp->lock, &ts);
    }
    for (int i = 0; i < cp->n_jobs; i++) {
        struct job *j = &cp->jobs[i];
        evs[i] = j->events;
        n_evs[i] = j->n_events;
        j->events = NULL;
        j->n_events = j->cap_events = 0;
    }
    pthread_mutex_unlock(&cp->lock);

    for (int i = 0; i < cp->n_jobs; i++) {
        struct job *j = &cp->jobs[i];
        for (size_t k = 0; k < n_evs[i]; k++) {
            const struct ad_event *ev = &evs[i][k];
            bool have_tok = cp->c->h->deps.tok != NULL;
            if (ev->done) {
                const char *t;
                size_t n;
                if (have_tok && ad_detok_finish(&j->detok, &t, &n) >= 0)
                    add_text(cp, j, t, n);
                j->finish = j->stopped ? AD_FINISH_STOP : ev->finish;
                j->n_generated = ev->n_generated;
                j->n_cached = ev->n_cached_tokens;
                continue;
            }
            if (ev->is_prompt) { /* echo with logprobs: the prompt's tokens come first */
                add_logprob(cp, j, ev);
                continue;
            }
            if (j->stopped)
                continue;
            add_logprob(cp, j, ev);
            if (j->ids)
                json_array_append_new(j->ids, json_integer(ev->token));
            const char *t;
            size_t n;
            if (have_tok && ad_detok_push(&j->detok, ev->token, &t, &n) >= 0)
                add_text(cp, j, t, n);
        }
        free(evs[i]);
    }
    pthread_mutex_lock(&cp->lock);
    for (int i = 0; i < cp->n_jobs; i++)
        all_done &= cp->jobs[i].done && cp->jobs[i].n_events == 0;
    pthread_mutex_unlock(&cp->lock);
    return all_done && cp->jobs[0].finish != AD_FINISH_NONE;
}

static const char *finish_reason(enum ad_finish f)
{
    switch (f) {
    case AD_FINISH_LENGTH:
        return "length";
    case AD_FINISH_STOP:
        return "stop";
    case AD_FINISH_CANCELLED:
        return "abort";
    default:
        return "error";
    }
}

/* ==========================================================================================
 * Request parsing */

static int get_number(json_t *req, const char *key, double lo, double hi, double dflt, double *out,
                      char *msg, size_t msg_len)
{
    json_t *v = json_object_get(req, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_number(v) || json_number_value(v) < lo || json_number_value(v) > hi) {
        snprintf(msg, msg_len, "'%s' must be a number in [%g, %g]", key, lo, hi);
        return -EINVAL;
    }
    *out = json_number_value(v);
    return 0;
}

/* An integer field: a JSON integer, or a number with no fraction (2.0, as pydantic takes it). */
static int get_int(json_t *req, const char *key, double lo, double hi, double dflt, double *out,
                   char *msg, size_t msg_len)
{
    json_t *v = json_object_get(req, key);
    if (v && json_is_real(v) && json_real_value(v) != floor(json_real_value(v))) {
        snprintf(msg, msg_len, "'%s' must be an integer in [%g, %g]", key, lo, hi);
        return -EINVAL;
    }
    int rc = get_number(req, key, lo, hi, dflt, out, msg, msg_len);
    if (rc < 0)
        snprintf(msg, msg_len, "'%s' must be an integer in [%g, %g]", key, lo, hi);
    return rc;
}

static int get_bool(json_t *req, const char *key, bool dflt, bool *out, char *msg, size_t len)
{
    json_t *v = json_object_get(req, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_boolean(v)) {
        snprintf(msg, len, "'%s' must be true or false", key);
        return -EINVAL;
    }
    *out = json_is_true(v);
    return 0;
}

/* The adapters a request names: "adapters": [{"name", "weight"}], else the X-Adapter header,
 * else "model" (the base model's id or absent: no adapter). */
static int resolve_mix(struct completion *cp, json_t *req, char *msg, size_t msg_len)
{
    struct ad_http *h = cp->c->h;
    const char *model = json_string_value(json_object_get(req, "model"));
    const char *hdr = MHD_lookup_connection_value(cp->c->mc, MHD_HEADER_KIND, "X-Adapter");
    json_t *list = json_object_get(req, "adapters");
    struct ad_mix *mix = &cp->mix_template;
    struct ad_err err;
    int rc;

    if (json_object_get(req, "model") && !json_is_null(json_object_get(req, "model")) && !model) {
        snprintf(msg, msg_len, "'model' must be a string");
        return -EINVAL;
    }
    snprintf(cp->model, sizeof(cp->model), "%s", model ? model : h->deps.model->id);
    size_t n = strlen(cp->model); /* truncated: not inside a character (the JSON must be UTF-8) */
    if (model && strlen(model) > n)
        while (n > 0 && ((unsigned char)model[n] & 0xc0) == 0x80)
            cp->model[--n] = '\0';
    if (list && !json_is_null(list)) {
        size_t i;
        json_t *e;
        if (!json_is_array(list) || json_array_size(list) < 1 ||
            json_array_size(list) > AD_MIX_MAX) {
            snprintf(msg, msg_len, "'adapters' must be a list of 1 to %d {name, weight}",
                     AD_MIX_MAX);
            return -EINVAL;
        }
        json_array_foreach(list, i, e) {
            const char *name = json_string_value(json_object_get(e, "name"));
            json_t *w = json_object_get(e, "weight");
            if (!name || (w && !json_is_number(w))) {
                snprintf(msg, msg_len, "adapters[%zu] needs a string 'name' and a numeric "
                         "'weight'", i);
                return -EINVAL;
            }
            rc = ad_registry_get(h->deps.registry, name, &mix->a[mix->n], &err);
            if (rc < 0) {
                snprintf(msg, msg_len, "%s", err.msg);
                return rc;
            }
            mix->w[mix->n++] = w ? (float)json_number_value(w) : 1.0f;
        }
    } else {
        const char *name = hdr ? hdr : model;
        if (!name || !strcmp(name, h->deps.model->id))
            return 0; /* the base model */
        rc = ad_registry_get(h->deps.registry, name, &mix->a[0], &err);
        if (rc < 0) {
            snprintf(msg, msg_len, "%s", rc == -ENOENT ? "" : err.msg);
            if (rc == -ENOENT)
                snprintf(msg, msg_len, "the model '%.100s' does not exist: neither the base "
                         "model ('%.60s') nor a registered adapter", name, h->deps.model->id);
            return rc;
        }
        mix->w[0] = 1.0f;
        mix->n = 1;
    }
    rc = ad_mix_validate(mix, &err);
    if (rc < 0)
        snprintf(msg, msg_len, "%s", err.msg);
    snprintf(cp->c->adapter, sizeof(cp->c->adapter), "%.64s", mix->n ? mix->a[0]->name : "");
    return rc;
}

/* Token ids of one prompt: a string (tokenized) or a list of ids. */
static int prompt_ids(struct completion *cp, json_t *p, bool add_special, struct job *j,
                      char *msg, size_t msg_len)
{
    const struct ad_tokenizer *tok = cp->c->h->deps.tok;
    int n_vocab = cp->c->h->deps.model->cfg.n_vocab;

    if (json_is_string(p)) {
        if (!tok) {
            snprintf(msg, msg_len, "this model has no tokenizer.json: send token ids");
            return -EINVAL;
        }
        size_t n;
        struct ad_err err;
        int rc = ad_tokenizer_encode(tok, json_string_value(p), json_string_length(p),
                                     add_special, &j->prompt, &n, &err);
        if (rc < 0) {
            snprintf(msg, msg_len, "%s", err.msg);
            return rc;
        }
        j->n_prompt = (int)n;
        return 0;
    }
    if (!json_is_array(p) || json_array_size(p) == 0) {
        snprintf(msg, msg_len, "'prompt' must be a string, a list of token ids, or a list of "
                 "either");
        return -EINVAL;
    }
    j->n_prompt = (int)json_array_size(p);
    j->prompt = malloc((size_t)j->n_prompt * sizeof(int32_t));
    if (!j->prompt)
        return -ENOMEM;
    for (int i = 0; i < j->n_prompt; i++) {
        json_t *v = json_array_get(p, (size_t)i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) >= n_vocab) {
            snprintf(msg, msg_len, "prompt token %d is not a token id in [0, %d)", i, n_vocab);
            return -EINVAL;
        }
        j->prompt[i] = (int32_t)json_integer_value(v);
    }
    return 0;
}

/* Chat messages through the model's chat template, recognised by family. */
/* OpenAI's stream_options: null, or with "stream": true an object of booleans (include_usage;
 * vLLM's continuous_usage_stats; include_obfuscation). The usage always comes with the last
 * chunk here, so their values change nothing, but a value of another shape is the client's
 * mistake and is answered as one. */
static int check_stream_options(json_t *so, bool stream, char *msg, size_t msg_len)
{
    const char *key;
    json_t *v;
    if (!so || json_is_null(so))
        return 0;
    if (!json_is_object(so)) {
        snprintf(msg, msg_len, "'stream_options' must be an object");
        return -EINVAL;
    }
    if (!stream) {
        snprintf(msg, msg_len, "'stream_options' is only allowed with \"stream\": true");
        return -EINVAL;
    }
    json_object_foreach(so, key, v) {
        if (strcmp(key, "include_usage") && strcmp(key, "continuous_usage_stats") &&
            strcmp(key, "include_obfuscation")) {
            snprintf(msg, msg_len, "'stream_options.%.40s' is not a known option (include_usage)",
                     key);
            return -EINVAL;
        }
        if (!json_is_boolean(v) && !json_is_null(v)) {
            snprintf(msg, msg_len, "'stream_options.%.40s' must be true or false", key);
            return -EINVAL;
        }
    }
    return 0;
}

static int parse(struct completion *cp, json_t *req, struct ad_request_params *base,
                 json_t **prompts, char *msg, size_t msg_len)
{
    struct ad_http *h = cp->c->h;
    double v;
    int rc;

    json_t *n_field = json_object_get(req, "n");
    if (n_field && !json_is_null(n_field) &&
        (!json_is_number(n_field) || json_number_value(n_field) != 1)) {
        snprintf(msg, msg_len, "only n = 1 is supported");
        return -EINVAL;
    }
    /* Fields that would change the output if they were honoured: refused rather than ignored,
     * unless they hold their neutral value. */
    static const struct {
        const char *name;
        double neutral;
    } unsupported[] = {{"best_of", 1},           {"presence_penalty", 0},
                       {"frequency_penalty", 0}, {"repetition_penalty", 1},
                       {"logit_bias", 0},        {"suffix", 0},
                       {"tools", 0},             {"response_format", 0},
                       {"guided_json", 0},       {"guided_regex", 0}};
    for (size_t i = 0; i < sizeof(unsupported) / sizeof(unsupported[0]); i++) {
        json_t *f = json_object_get(req, unsupported[i].name);
        bool neutral = !f || json_is_null(f) ||
                       (json_is_number(f) && json_number_value(f) == unsupported[i].neutral) ||
                       (json_is_object(f) && json_object_size(f) == 0) ||
                       (json_is_array(f) && json_array_size(f) == 0) ||
                       (json_is_string(f) && json_string_length(f) == 0);
        if (!strcmp(unsupported[i].name, "response_format") && json_is_object(f) &&
            json_is_string(json_object_get(f, "type")) &&
            !strcmp(json_string_value(json_object_get(f, "type")), "text"))
            neutral = true;
        if (!neutral) {
            snprintf(msg, msg_len, "'%s' is not supported by this server", unsupported[i].name);
            return -EINVAL;
        }
    }
    *base = (struct ad_request_params){.temperature = 1.0f, .top_p = 1.0f, .n_logprobs = -1};
    if ((rc = get_int(req, cp->chat ? "max_completion_tokens" : "max_tokens", 0, 1 << 24,
                      h->cfg.max_tokens_default, &v, msg, msg_len)) < 0)
        return rc;
    if (cp->chat && !json_object_get(req, "max_completion_tokens") &&
        (rc = get_int(req, "max_tokens", 0, 1 << 24, h->cfg.max_tokens_default, &v, msg,
                      msg_len)) < 0)
        return rc;
    base->max_tokens = (int)v;
    /* none given: the default, or less where the context leaves less (as vLLM's) */
    json_t *mt = json_object_get(req, "max_tokens"), *mct = json_object_get(req,
                                                                       "max_completion_tokens");
    base->max_tokens_fit = (!mt || json_is_null(mt)) && (!cp->chat || !mct || json_is_null(mct));
    if ((rc = get_number(req, "temperature", 0, 100, 1.0, &v, msg, msg_len)) < 0)
        return rc;
    base->temperature = (float)v;
    if ((rc = get_number(req, "top_p", 1e-9, 1, 1, &v, msg, msg_len)) < 0)
        return rc;
    base->top_p = (float)v;
    if ((rc = get_int(req, "top_k", -1, 1 << 24, 0, &v, msg, msg_len)) < 0)
        return rc;
    base->top_k = v < 0 ? 0 : (int)v;
    if ((rc = get_int(req, "min_tokens", 0, 1 << 24, 0, &v, msg, msg_len)) < 0)
        return rc;
    base->min_tokens = (int)v;
    json_t *seed = json_object_get(req, "seed");
    if ((rc = get_int(req, "seed", -9.2e18, 9.2e18, 0, &v, msg, msg_len)) < 0)
        return rc;
    base->seed = json_is_integer(seed) ? (uint64_t)json_integer_value(seed)
                 : json_is_real(seed)  ? (uint64_t)(int64_t)v
                                       : (uint64_t)ad_now() * 1000003u +
                                            (uint64_t)atomic_load(&h->next_id);
    if ((rc = get_bool(req, "ignore_eos", false, &base->ignore_eos, msg, msg_len)) < 0 ||
        (rc = get_bool(req, "stream", false, &cp->stream, msg, msg_len)) < 0 ||
        (rc = get_bool(req, "echo", false, &cp->echo, msg, msg_len)) < 0 ||
        (rc = get_bool(req, "return_tokens_as_token_ids", false, &cp->token_ids, msg,
                       msg_len)) < 0 ||
        (rc = get_bool(req, "return_token_ids", !h->deps.tok, &cp->return_ids, msg, msg_len)) < 0)
        return rc;
    if ((rc = check_stream_options(json_object_get(req, "stream_options"), cp->stream, msg,
                                   msg_len)) < 0)
        return rc;
    if (cp->chat) {
        bool lp;
        if ((rc = get_bool(req, "logprobs", false, &lp, msg, msg_len)) < 0 ||
            (rc = get_int(req, "top_logprobs", 0, AD_MAX_LOGPROBS, 0, &v, msg, msg_len)) < 0)
            return rc;
        cp->n_logprobs = lp ? (int)v : -1;
        cp->echo = false;
    } else {
        if ((rc = get_int(req, "logprobs", 0, AD_MAX_LOGPROBS, -1, &v, msg, msg_len)) < 0)
            return rc;
        cp->n_logprobs = (int)v;
    }
    base->n_logprobs = cp->n_logprobs;
    base->prompt_logprobs = cp->echo && cp->n_logprobs >= 0;
    if (cp->echo && base->max_tokens == 0 && cp->n_logprobs < 0 && !cp->chat) {
        /* fine: the prompt echoed back, nothing generated */
    } else if (base->max_tokens == 0 && !cp->echo) {
        snprintf(msg, msg_len, "max_tokens = 0 needs echo = true");
        return -EINVAL;
    }

    json_t *stop = json_object_get(req, "stop");
    if (json_is_string(stop)) {
        stop = json_pack("[O]", stop);
    } else if (stop && !json_is_null(stop)) {
        if (!json_is_array(stop) || json_array_size(stop) > MAX_STOPS) {
            snprintf(msg, msg_len, "'stop' must be a string or a list of up to %d strings",
                     MAX_STOPS);
            return -EINVAL;
        }
        json_incref(stop);
    } else {
        stop = NULL;
    }
    for (size_t i = 0; stop && i < json_array_size(stop); i++) {
        json_t *s = json_array_get(stop, i);
        if (!json_is_string(s) || json_string_length(s) == 0 ||
            json_string_length(s) > MAX_STOP_LEN) {
            json_decref(stop);
            snprintf(msg, msg_len, "stop strings must be 1 to %d bytes", MAX_STOP_LEN);
            return -EINVAL;
        }
        memcpy(cp->stops[cp->n_stops++], json_string_value(s), json_string_length(s) + 1);
    }
    json_decref(stop);

    if (cp->chat) {
        json_t *messages = json_object_get(req, "messages");
        const struct ad_tokenizer *tok = h->deps.tok;
        const char *tmpl = tok ? ad_tokenizer_chat_template(tok) : NULL;
        char *text;
        if (!json_is_array(messages) || json_array_size(messages) == 0) {
            snprintf(msg, msg_len, "'messages' must be a non-empty list of {role, content}");
            return -EINVAL;
        }
        if (!tmpl) {
            snprintf(msg, msg_len, "this model has no chat template (tokenizer_config.json "
                     "chat_template): use /v1/completions");
            return -EINVAL;
        }
        struct ad_err err = {0};
        rc = ad_chat_render(tmpl, ad_tokenizer_id_to_token(tok, ad_tokenizer_bos_id(tok), NULL),
                            ad_tokenizer_id_to_token(tok, ad_tokenizer_eos_id(tok), NULL),
                            messages, true, &text, &err);
        if (rc < 0) { /* the renderer knows no routes: the way out is said here */
            bool no_tmpl = rc == -ENOTSUP && strstr(err.msg, "template is not supported");
            snprintf(msg, msg_len, "%s%s", err.msg, no_tmpl ? "; use /v1/completions with "
                     "a prompt formatted by the client" : "");
            return rc;
        }
        *prompts = json_pack("[s]", text);
        free(text);
        return 0;
    }
    json_t *p = json_object_get(req, "prompt");
    if (!p) {
        snprintf(msg, msg_len, "'prompt' is required");
        return -EINVAL;
    }
    /* one prompt (a string or a list of ids), or a list of prompts */
    bool batch = json_is_array(p) && json_array_size(p) > 0 &&
                 (json_is_string(json_array_get(p, 0)) || json_is_array(json_array_get(p, 0)));
    *prompts = batch ? json_incref(p) : json_pack("[O]", p);
    if (json_array_size(*prompts) > MAX_PROMPTS) {
        snprintf(msg, msg_len, "at most %d prompts per request", MAX_PROMPTS);
        return -EINVAL;
    }
    return 0;
}

/* ==========================================================================================
 * Responses */

static json_t *logprobs_json(struct completion *cp, struct job *j)
{
    if (cp->n_logprobs < 0)
        return json_null();
    if (cp->chat)
        return json_pack("{s:O}", "content", j->chat_lp);
    return json_pack("{s:O, s:O, s:O, s:O}", "tokens", j->lp_tokens, "token_logprobs",
                     j->lp_values, "top_logprobs", j->lp_top, "text_offset", j->lp_offsets);
}

static json_t *usage(struct completion *cp)
{
    int p = 0, g = 0, cached = 0;
    for (int i = 0; i < cp->n_jobs; i++) {
        p += cp->jobs[i].n_prompt;
        g += cp->jobs[i].n_generated;
        cached += cp->jobs[i].n_cached;
    }
    return json_pack("{s:i, s:i, s:i, s:{s:i}}", "prompt_tokens", p, "completion_tokens", g,
                     "total_tokens", p + g, "prompt_tokens_details", "cached_tokens", cached);
}

static json_t *full_response(struct completion *cp)
{
    json_t *choices = json_array();
    for (int i = 0; i < cp->n_jobs; i++) {
        struct job *j = &cp->jobs[i];
        const char *fr = finish_reason(j->finish);
        if (cp->chat)
            json_array_append_new(choices,
                                  json_pack("{s:i, s:{s:s, s:s%}, s:o, s:s}", "index", i,
                                            "message", "role", "assistant", "content", j->text,
                                            j->len, "logprobs", logprobs_json(cp, j),
                                            "finish_reason", fr));
        else
            json_array_append_new(choices, json_pack("{s:i, s:s%, s:o, s:s}", "index", i,
                                                     "text", j->text, j->len, "logprobs",
                                                     logprobs_json(cp, j), "finish_reason",
                                                     fr));
        if (j->ids)
            json_object_set(json_array_get(choices, (size_t)i), "token_ids", j->ids);
    }
    return json_pack("{s:s, s:s, s:I, s:s, s:o, s:o}", "id", cp->id, "object",
                     cp->chat ? "chat.completion" : "text_completion", "created",
                     (json_int_t)cp->created, "model", cp->model, "choices", choices, "usage",
                     usage(cp));
}

/* The SSE chunks for what each job produced since the last call; at the end, the finish
 * chunks, the usage and [DONE]. */
static void stream_chunks(struct completion *cp, bool all_done)
{
    for (int i = 0; i < cp->n_jobs; i++) {
        struct job *j = &cp->jobs[i];
        size_t hold = all_done || j->finish ? 0 : MAX_STOP_LEN; /* may still become a stop */
        size_t upto = j->stopped || j->finish ? j->len : (j->len > hold ? j->len - hold : 0);
        if (cp->n_stops == 0)
            upto = j->len;
        size_t n_ids = j->ids ? json_array_size(j->ids) : 0;
        if (upto <= j->sent && n_ids == j->ids_sent && !(all_done && j->finish))
            continue;
        json_t *choice;
        if (cp->chat) {
            choice = json_pack("{s:i, s:{s:s%}, s:o}", "index", i, "delta", "content",
                               j->text + j->sent, upto - j->sent, "finish_reason",
                               j->finish && all_done ? json_string(finish_reason(j->finish))
                                                     : json_null());
            if (choice && !j->role_sent) /* the first delta of a choice names the role */
                json_object_set_new(json_object_get(choice, "delta"), "role",
                                    json_string("assistant"));
            j->role_sent = true;
        } else
            choice = json_pack("{s:i, s:s%, s:o}", "index", i, "text", j->text + j->sent,
                               upto - j->sent, "finish_reason",
                               j->finish && all_done ? json_string(finish_reason(j->finish))
                                                     : json_null());
        j->sent = upto;
        if (choice && j->ids) { /* the new token ids (vLLM's return_token_ids) */
            json_t *ids = json_array();
            for (size_t k = j->ids_sent; k < n_ids; k++)
                json_array_append(ids, json_array_get(j->ids, k));
            json_object_set_new(choice, "token_ids", ids);
            j->ids_sent = n_ids;
        }
        json_t *chunk = json_pack("{s:s, s:s, s:I, s:s, s:[o]}", "id", cp->id, "object",
                                  cp->chat ? "chat.completion.chunk" : "text_completion",
                                  "created", (json_int_t)cp->created, "model", cp->model,
                                  "choices", choice);
        if (all_done && i == cp->n_jobs - 1)
            json_object_set_new(chunk, "usage", usage(cp));
        char *text = json_dumps(chunk, JSON_COMPACT);
        json_decref(chunk);
        if (text) {
            append(&cp->out, &cp->out_len, &cp->out_cap, "data: ", 6);
            append(&cp->out, &cp->out_len, &cp->out_cap, text, strlen(text));
            append(&cp->out, &cp->out_len, &cp->out_cap, "\n\n", 2);
            free(text);
        }
    }
    if (all_done && !cp->finished_stream) {
        append(&cp->out, &cp->out_len, &cp->out_cap, "data: [DONE]\n\n", 14);
        cp->finished_stream = true;
    }
}

/* ==========================================================================================
 * Lifetime of a completion */

static int generated(const struct completion *cp)
{
    int n = 0;
    for (int i = 0; i < cp->n_jobs; i++)
        n += cp->jobs[i].n_generated;
    return n;
}

static void completion_free(struct completion *cp)
{
    struct ad_engine *engine = cp->h->deps.engine;
    /* the engine may still call back into the jobs: cancel and wait for every done event */
    for (int i = 0; i < cp->n_jobs; i++)
        if (cp->jobs[i].req)
            ad_engine_finish(engine, cp->jobs[i].req, AD_FINISH_CANCELLED);
    pthread_mutex_lock(&cp->lock);
    for (;;) {
        bool all = true;
        for (int i = 0; i < cp->n_jobs; i++)
            all &= !cp->jobs[i].req || cp->jobs[i].done;
        if (all)
            break;
        pthread_cond_wait(&cp->cond, &cp->lock);
    }
    pthread_mutex_unlock(&cp->lock);
    int n_gen = 0, n_prompt = 0;
    for (int i = 0; i < cp->n_jobs; i++) {
        struct job *j = &cp->jobs[i];
        n_gen += j->n_generated;
        n_prompt += j->req ? j->n_prompt : 0;
        ad_request_unref(j->req);
        if (j->detok.tok)
            ad_detok_fini(&j->detok);
        free(j->prompt);
        free(j->events);
        free(j->text);
        json_decref(j->lp_tokens);
        json_decref(j->lp_values);
        json_decref(j->lp_top);
        json_decref(j->lp_offsets);
        json_decref(j->chat_lp);
        json_decref(j->ids);
    }
    struct ad_http *h = cp->h;
    if (n_prompt)
        metrics_completion(&h->metrics, (uint64_t)n_prompt, (uint64_t)n_gen);
    for (int i = 0; i < cp->mix_template.n; i++) {
        metrics_adapter(&h->metrics, cp->mix_template.a[i]->name, 1, (uint64_t)n_gen);
        ad_adapter_unref(cp->mix_template.a[i]);
    }
    pthread_mutex_destroy(&cp->lock);
    pthread_cond_destroy(&cp->cond);
    free(cp->out);
    free(cp);
}

/* Waits for progress, watching the client and the server's shutdown. */
static bool wait_step(struct completion *cp)
{
    struct ad_http *h = cp->c->h;
    if (atomic_load(&h->cancel_all) || http_client_gone(cp->c))
        for (int i = 0; i < cp->n_jobs; i++)
            ad_engine_finish(h->deps.engine, cp->jobs[i].req, AD_FINISH_CANCELLED);
    return pump(cp, 0.1);
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct completion *cp = cls;
    (void)pos;
    if (cp->out_pos == cp->out_len && !cp->finished_stream)
        http_wait_begin(cp->c);
    while (cp->out_pos == cp->out_len) {
        if (cp->finished_stream) {
            cp->c->n_tokens = generated(cp); /* for the access log */
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        cp->out_len = cp->out_pos = 0;
        bool done = wait_step(cp);
        stream_chunks(cp, done);
    }
    http_wait_end(cp->c);
    size_t n = cp->out_len - cp->out_pos < max ? cp->out_len - cp->out_pos : max;
    memcpy(buf, cp->out + cp->out_pos, n);
    cp->out_pos += n;
    return (ssize_t)n;
}

static void stream_free(void *cls)
{
    completion_free(cls);
}

enum MHD_Result route_completions(struct conn *c, bool chat)
{
    struct ad_http *h = c->h;
    enum MHD_Result ret;
    json_t *req = http_body_json(c, &ret), *prompts = NULL;
    struct ad_request_params base;
    char msg[400] = "";
    int rc;

    if (!req)
        return ret;
    struct completion *cp = calloc(1, sizeof(*cp));
    if (!cp) {
        json_decref(req);
        return http_error(c, 503, "out of memory");
    }
    cp->c = c;
    cp->h = h;
    cp->chat = chat;
    cp->created = (long)time(NULL);
    snprintf(cp->id, sizeof(cp->id), "%s-%s", chat ? "chatcmpl" : "cmpl", c->id);
    pthread_mutex_init(&cp->lock, NULL);
    pthread_cond_init(&cp->cond, NULL);

    rc = parse(cp, req, &base, &prompts, msg, sizeof(msg));
    if (rc >= 0)
        rc = resolve_mix(cp, req, msg, sizeof(msg));
    bool add_special = true;
    json_t *as = json_object_get(req, "add_special_tokens");
    if (json_is_boolean(as))
        add_special = json_is_true(as);
    else if (chat)
        add_special = false; /* chat templates write their own special tokens */
    for (size_t i = 0; rc >= 0 && i < json_array_size(prompts); i++) {
        struct job *j = &cp->jobs[cp->n_jobs++];
        j->cp = cp;
        j->index = (int)i;
        rc = prompt_ids(cp, json_array_get(prompts, i), add_special, j, msg, sizeof(msg));
        if (rc >= 0 && j->n_prompt == 0) {
            snprintf(msg, sizeof(msg), "prompt %zu is empty", i);
            rc = -EINVAL;
        }
    }
    json_decref(prompts);
    json_decref(req);

    /* Submit every prompt; each job takes its own references to the adapters. */
    for (int i = 0; rc >= 0 && i < cp->n_jobs; i++) {
        struct job *j = &cp->jobs[i];
        struct ad_request_params p = base;
        struct ad_err err;
        p.prompt = j->prompt;
        p.n_prompt = j->n_prompt;
        p.mix = cp->mix_template;
        for (int k = 0; k < p.mix.n; k++)
            ad_adapter_ref(p.mix.a[k]);
        if (h->deps.tok)
            ad_detok_init(&j->detok, h->deps.tok, true);
        if (cp->return_ids)
            j->ids = json_array();
        if (append(&j->text, &j->len, &j->cap, "", 0) < 0) { /* "" rather than NULL */
            rc = -ENOMEM;
            break;
        }
        if (cp->n_logprobs >= 0) {
            j->lp_tokens = json_array();
            j->lp_values = json_array();
            j->lp_top = json_array();
            j->lp_offsets = json_array();
            j->chat_lp = json_array();
        }
        if (cp->echo) { /* the prompt's text comes first */
            char *t = NULL;
            size_t n = 0;
            if (h->deps.tok && ad_tokenizer_decode(h->deps.tok, j->prompt, (size_t)j->n_prompt,
                                                   false, &t, &n) >= 0)
                append(&j->text, &j->len, &j->cap, t, n);
            free(t);
        }
        rc = ad_engine_submit(h->deps.engine, &p, on_event, j, &j->req, &err);
        if (rc < 0) {
            snprintf(msg, sizeof(msg), "%s", err.msg);
            j->req = NULL;
            j->done = true;
        }
    }
    if (rc < 0) {
        unsigned status = rc == -ENOENT ? 404 : http_status_of(rc);
        if (status == 500 && !msg[0])
            snprintf(msg, sizeof(msg), "internal error (%d)", rc);
        completion_free(cp);
        return http_error(c, status, "%s", msg);
    }
    if (cp->stream) {
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096,
                                                                   stream_reader, cp,
                                                                   stream_free);
        if (!r) {
            completion_free(cp);
            return MHD_NO;
        }
        MHD_add_response_header(r, "Content-Type", "text/event-stream");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        MHD_add_response_header(r, "X-Request-Id", c->id);
        c->status = 200;
        ret = MHD_queue_response(c->mc, 200, r);
        MHD_destroy_response(r);
        return ret;
    }
    while (!wait_step(cp))
        ;
    json_t *body = full_response(cp);
    bool error = false;
    const char *emsg = NULL;
    for (int i = 0; i < cp->n_jobs; i++)
        if (cp->jobs[i].finish == AD_FINISH_ERROR || cp->jobs[i].finish == AD_FINISH_CANCELLED) {
            error = true;
            emsg = cp->jobs[i].finish == AD_FINISH_ERROR ? "generation failed"
                                                          : "the request was cancelled";
        }
    c->n_tokens = generated(cp);
    completion_free(cp);
    if (error) {
        json_decref(body);
        return http_error(c, 503, "%s", emsg);
    }
    return http_json(c, 200, body);
}

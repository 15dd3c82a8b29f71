/* adapterd-client: a small C client for adapterd's HTTP API (OpenAI's and vLLM's shapes), on
 * libcurl and jansson. `adapterctl` is a thin command line over it.
 *
 * Names: the prefix is `adc_` ("adapterd client"); the daemon's own names are `ad_`, so one
 * program may link both. Private functions of the library are `adcp_` and hidden.
 *
 * Conventions, as in the daemon's include/:
 * - Functions return 0 (or a documented value >= 0) on success and -errno on failure. On
 *   failure they fill *err when err is not NULL: the HTTP status and the server's own
 *   {"error": {"message", "type", "code"}}, or the local reason (connection refused, bad URL).
 * - JSON results are jansson values (json_t). `*ret` is a new reference: json_decref() it.
 *   Arguments are borrowed. Output parameters are written only on success.
 * - A struct adc_client is used by one thread at a time, like the CURL easy handle inside it;
 *   take one per thread. adc_client_cancel() is the exception: any thread or a signal handler
 *   may call it. As with libcurl, a program with several threads calls curl_global_init()
 *   before it starts them (libcurl 7.84 and later do not need it).
 *
 * The status codes map to errno values: 400 -EINVAL, 401 -EACCES, 403 -EPERM, 404 -ENOENT,
 * 405 -EOPNOTSUPP, 409 -EEXIST, 413 -E2BIG, 429 -EBUSY, 503 -EAGAIN, another 4xx -EINVAL,
 * another status -EIO. Without an answer: -ECONNREFUSED (nothing listens), -EHOSTUNREACH (no
 * such host or no route), -ETIMEDOUT, -ECONNRESET (the connection broke), -ECANCELED
 * (adc_client_cancel() or a callback that returned non-zero), -EPROTO (an answer that is not what
 * the API says), -ENOMEM, or the -errno of a local file. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#define ADC_API __attribute__((visibility("default")))

struct json_t; /* jansson's json_t */
struct adc_client;

/* Why a call failed. */
struct adc_error {
    int rc;            /* the -errno the call returned */
    long status;       /* the HTTP status of the answer; 0 when no answer came */
    char type[64];     /* the server's error.type ("not_found_error"), or "" */
    char code[64];     /* the server's error.code as text ("404"; OpenAI's are words), or "" */
    char message[512]; /* the server's error.message, or why the call failed here */
};

/* ==========================================================================================
 * The client */

/* A client of the server at url ("http://127.0.0.1:8080"; a trailing "/" or "/v1", as OpenAI's
 * clients are given, is dropped), sending "Authorization: Bearer api_key" when api_key is not
 * NULL or "". Both strings are copied. Connects lazily and keeps the connection open between
 * calls. Returns 0, -EINVAL (not an http or https URL) or -ENOMEM. */
ADC_API int adc_client_new(const char *url, const char *api_key, struct adc_client **ret,
                           struct adc_error *err);
/* Frees the client and closes its connection. NULL is allowed. */
ADC_API void adc_client_free(struct adc_client *c);

/* How long to wait for a connection (default 10000 ms) and for a whole call (default 0: no
 * limit; streams may be long). */
ADC_API void adc_client_set_timeouts(struct adc_client *c, long connect_ms, long total_ms);

/* Stops the call in progress, if any, which returns -ECANCELED (at once when the caller is a
 * signal handler, whose signal wakes the transfer; within 100 ms from another thread); the
 * connection is closed, so the server cancels what it was generating. Every later call returns
 * -ECANCELED until adc_client_clear_cancel(). Async-signal-safe: made for a SIGINT handler. */
ADC_API void adc_client_cancel(struct adc_client *c);
ADC_API void adc_client_clear_cancel(struct adc_client *c);

/* ==========================================================================================
 * Any route */

/* Sends `method path` ("GET", "/v1/models") with body as JSON (NULL: no body) and parses the
 * JSON answer into *ret (ret may be NULL; an empty answer, as a 204, gives NULL). This is what
 * the functions below are built on; routes without a function of their own use it. */
ADC_API int adc_request(struct adc_client *c, const char *method, const char *path,
                        const struct json_t *body, struct json_t **ret, struct adc_error *err);

/* The same for an answer that is text (GET /metrics): *ret is a new NUL-terminated buffer
 * (free() it) of *ret_len bytes (ret_len may be NULL). */
ADC_API int adc_request_text(struct adc_client *c, const char *method, const char *path, char **ret,
                             size_t *ret_len, struct adc_error *err);

/* ==========================================================================================
 * Server */

/* GET /health: 0 when the server says "ok"; -EAGAIN while it loads or stops (the message says
 * which). *ret (may be NULL) is the answer, {"status": "ok"}. */
ADC_API int adc_health(struct adc_client *c, struct json_t **ret, struct adc_error *err);

/* GET /metrics: the Prometheus text, as adc_request_text(). */
ADC_API int adc_metrics(struct adc_client *c, char **ret, size_t *ret_len, struct adc_error *err);

/* GET /v1/models: {"object": "list", "data": [{"id", "kind", "rank", "bytes", ...}]}, the base
 * model first. */
ADC_API int adc_models(struct adc_client *c, struct json_t **ret, struct adc_error *err);

/* POST /tokenize: the ids of text in model's tokenizer (model: an adapter or the base's id, or
 * NULL for the base). add_special: 1 or 0, or -1 for the server's default (1).
 * *ret = {"tokens": [...], "count", "max_model_len"}. */
ADC_API int adc_tokenize(struct adc_client *c, const char *model, const char *text, int add_special,
                         struct json_t **ret, struct adc_error *err);

/* ==========================================================================================
 * Adapters */

/* Progress of a transfer: bytes done of total (0 when the server did not say how many). A
 * non-zero return stops the transfer: the call returns -ECANCELED. Called often: as data
 * moves, and about once a second while it does not. */
typedef int (*adc_progress_fn)(void *ud, uint64_t done, uint64_t total);

/* GET /v1/adapters: {"object": "list", "data": [...]}; GET /v1/adapters/{name}: one adapter
 * {"id", "kind", "rank", "bytes", "resident", "uses"}; DELETE /v1/adapters/{name}. */
ADC_API int adc_adapters_list(struct adc_client *c, struct json_t **ret, struct adc_error *err);
ADC_API int adc_adapter_get(struct adc_client *c, const char *name, struct json_t **ret,
                            struct adc_error *err);
ADC_API int adc_adapter_delete(struct adc_client *c, const char *name, struct adc_error *err);

/* PUT /v1/adapters/{name}, multipart: part "config" = dir/adapter_config.json and part
 * "weights" = dir/adapter_model.safetensors (Hugging Face PEFT) or, when there is none,
 * dir/adapter.safetensors (AdapterHub), streamed from disk. progress (may be NULL) sees the
 * bytes of the body sent. Returns 1 when the adapter is new (201), 0 when it replaced one
 * (200), or -errno (-ENOENT: a file is missing; 400: the server refused the files, the
 * message says why). *ret (may be NULL) is the adapter as adc_adapter_get() gives it. */
ADC_API int adc_adapter_upload(struct adc_client *c, const char *name, const char *dir,
                               adc_progress_fn progress, void *ud, struct json_t **ret,
                               struct adc_error *err);

/* Writes the adapter's files into dir (created if missing; files there of the same name are
 * replaced): adapter_config.json from GET /v1/adapters/{name}/files/adapter_config.json, then
 * the weights, adapter_model.safetensors, or adapter.safetensors for an AdapterHub adapter
 * (its config has no "peft_type"), from .../files/<that name>; when the server has no file of
 * that name (404), the other name is asked for and the file is written under the name the
 * adapter's kind reads. Each file goes to a temporary name first and is renamed when whole.
 * progress (may be NULL) sees each file in turn. Returns 0 or -errno. */
ADC_API int adc_adapter_download(struct adc_client *c, const char *name, const char *dir,
                                 adc_progress_fn progress, void *ud, struct adc_error *err);

/* ==========================================================================================
 * Completions */

/* One piece of a streamed answer: one choice of one server-sent event. */
struct adc_event {
    int index;                  /* the choice (one per prompt); -1 for a chunk without any */
    const char *text;           /* its new text: choices[].text, or .delta.content for chat */
    size_t len;                 /* bytes of text (NUL-terminated; "" when none) */
    const char *finish_reason;  /* "stop", "length", "abort", "error" at the end, else NULL */
    const struct json_t *usage; /* the chunk's "usage" (the last one has it), or NULL */
    const struct json_t *chunk; /* the whole chunk */
};
/* Called for each event; everything in ev is borrowed until it returns. A non-zero return
 * stops the stream: the call returns -ECANCELED and the server cancels the sequence. */
typedef int (*adc_event_fn)(void *ud, const struct adc_event *ev);

/* POST /v1/completions and /v1/chat/completions with request, the API's JSON ("model",
 * "prompt" or "messages", "max_tokens", sampling fields, "adapters": [{"name", "weight"}]);
 * "stream" is set to false. *ret is the answer (choices, usage). */
ADC_API int adc_complete(struct adc_client *c, const struct json_t *request, struct json_t **ret,
                         struct adc_error *err);
ADC_API int adc_chat(struct adc_client *c, const struct json_t *request, struct json_t **ret,
                     struct adc_error *err);

/* The same streamed ("stream" set to true): on_event is called as each event arrives. Returns
 * 0 after "data: [DONE]", -ECANCELED (stopped), -EPROTO (the stream ended before [DONE], or an
 * event that is not JSON), an error event's -errno, or an error answered before the stream. */
ADC_API int adc_complete_stream(struct adc_client *c, const struct json_t *request,
                                adc_event_fn on_event, void *ud, struct adc_error *err);
ADC_API int adc_chat_stream(struct adc_client *c, const struct json_t *request,
                            adc_event_fn on_event, void *ud, struct adc_error *err);

/* Any route that answers server-sent events "data: {json}" ending with "data: [DONE]": POST
 * path with body (borrowed, sent as it is). */
ADC_API int adc_stream(struct adc_client *c, const char *path, const struct json_t *body,
                       adc_event_fn on_event, void *ud, struct adc_error *err);

/* ==========================================================================================
 * Fine-tuning: OpenAI's files and fine-tuning jobs (the server's README, "Fine-tuning"). Ids are
 * the server's ("file-...", "ftjob-..."). A list is {"object": "list", "data": [...],
 * "has_more"}, newest first; after (NULL: from the newest) is the id of the last element of the
 * previous page, limit (0: the server's default, 20; at most 100) its size. */

/* POST /v1/files, multipart: purpose=fine-tune and file = the JSONL file at path, streamed from
 * disk. progress (may be NULL) sees the bytes of the body sent. The server checks every line as
 * it arrives and keeps nothing of a refused file (400 "line N: reason"; 413 over its size
 * limit). *ret (may be NULL) is the file object {"id", "bytes", "filename", ...}. Returns 0 or
 * -errno (-ENOENT, -EISDIR: path is no readable file). */
ADC_API int adc_file_upload(struct adc_client *c, const char *path, adc_progress_fn progress,
                            void *ud, struct json_t **ret, struct adc_error *err);
/* GET /v1/files (a list), GET /v1/files/{id}, DELETE /v1/files/{id} (*ret: {"id", "object",
 * "deleted": true}; refused with 409, -EEXIST, while a job that has not ended uses the file). */
ADC_API int adc_files_list(struct adc_client *c, struct json_t **ret, struct adc_error *err);
ADC_API int adc_file_get(struct adc_client *c, const char *id, struct json_t **ret,
                         struct adc_error *err);
ADC_API int adc_file_delete(struct adc_client *c, const char *id, struct json_t **ret,
                            struct adc_error *err);

/* POST /v1/fine_tuning/jobs with request, the API's JSON ({"model", "training_file",
 * "validation_file", "suffix", "seed", "method": {"type": "supervised", "supervised": {"adapter",
 * "adapter_config", "hyperparameters": {"n_epochs", "batch_size", "learning_rate_multiplier"},
 * "learning_rate", "max_seq_len", ...}}}). *ret is the job {"id", "status", ...}, queued. */
ADC_API int adc_job_create(struct adc_client *c, const struct json_t *request, struct json_t **ret,
                           struct adc_error *err);
/* GET /v1/fine_tuning/jobs: a list of jobs. */
ADC_API int adc_jobs_list(struct adc_client *c, const char *after, int limit, struct json_t **ret,
                          struct adc_error *err);
/* GET /v1/fine_tuning/jobs/{id}: the job. status is "validating_files", "queued", "running",
 * "paused", "succeeded" (fine_tuned_model: the adapter, served), "failed" (error: {"code",
 * "message"}) or "cancelled". */
ADC_API int adc_job_get(struct adc_client *c, const char *id, struct json_t **ret,
                        struct adc_error *err);
/* GET .../{id}/events: a list of events {"id", "created_at", "level", "message", "type",
 * "data"}; type "metrics" has data {"step", "total_steps", "train_loss", "valid_loss" (after an
 * evaluation), "learning_rate", "tokens_per_second"}. */
ADC_API int adc_job_events(struct adc_client *c, const char *id, const char *after, int limit,
                           struct json_t **ret, struct adc_error *err);
/* GET .../{id}/checkpoints: a list of checkpoints {"fine_tuned_model_checkpoint" (served as an
 * adapter), "step_number", "metrics"}. */
ADC_API int adc_job_checkpoints(struct adc_client *c, const char *id, const char *after, int limit,
                                struct json_t **ret, struct adc_error *err);
/* POST .../{id}/cancel, /pause (a queued or running job; a running one checkpoints first),
 * /resume (a paused job, queued again). *ret (may be NULL) is the job after it; a job whose
 * status does not allow it is a 400, -EINVAL. A running job answers after its current step. */
ADC_API int adc_job_cancel(struct adc_client *c, const char *id, struct json_t **ret,
                           struct adc_error *err);
ADC_API int adc_job_pause(struct adc_client *c, const char *id, struct json_t **ret,
                          struct adc_error *err);
ADC_API int adc_job_resume(struct adc_client *c, const char *id, struct json_t **ret,
                           struct adc_error *err);

/* Called with each event of a followed job (borrowed until it returns). A non-zero return stops
 * following: the call returns -ECANCELED. */
typedef int (*adc_job_event_fn)(void *ud, const struct json_t *event);
/* GET .../{id}/events?stream=true: every event of the job from its first, oldest first, as the
 * server sends them (a paused job's stream stays open), until the job has succeeded, failed or
 * been cancelled. Returns 0 then (adc_job_get() says how it ended), -ECANCELED (on_event, or
 * adc_client_cancel(): the job goes on), -EPROTO (the stream broke off, e.g. the server
 * stopped), or the error of the request (-ENOENT: no such job). */
ADC_API int adc_job_follow(struct adc_client *c, const char *id, adc_job_event_fn on_event,
                           void *ud, struct adc_error *err);

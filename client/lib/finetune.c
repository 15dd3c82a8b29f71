/* Fine-tuning: training files (the multipart upload, streamed from disk; list, show, delete)
 * and jobs (create, list, show, events, checkpoints, cancel/pause/resume, and the events followed
 * as server-sent events). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define FILES "/v1/files/"
#define JOBS "/v1/fine_tuning/jobs/"

/* `method <prefix><id escaped><suffix>`, one JSON exchange without a body. */
static int id_call(struct adc_client *c, const char *method, const char *prefix, const char *id,
                   const char *suffix, json_t **ret, struct adc_error *err)
{
    if (!id || !*id)
        return adcp_error(err, -EINVAL, 0, "no id");
    char *path = adcp_path(c, prefix, id, suffix);
    if (!path)
        return adcp_error(err, -ENOMEM, 0, "out of memory");
    int rc = adc_request(c, method, path, NULL, ret, err);
    free(path);
    return rc;
}

/* GET <prefix><id><suffix>?after=..&limit=.. (a list route; id NULL: none). */
static int list_call(struct adc_client *c, const char *prefix, const char *id, const char *suffix,
                     const char *after, int limit, json_t **ret, struct adc_error *err)
{
    char *esc = after && *after ? curl_easy_escape(c->curl, after, 0) : NULL;
    char query[256] = "";
    int rc;
    if (after && *after && !esc)
        return adcp_error(err, -ENOMEM, 0, "out of memory");
    if (esc && strlen(esc) > 200)
        rc = adcp_error(err, -EINVAL, 0, "'after' is too long");
    else if (limit < 0)
        rc = adcp_error(err, -EINVAL, 0, "'limit' is negative");
    else {
        int n = 0;
        if (esc)
            n = snprintf(query, sizeof(query), "?after=%s", esc);
        if (limit > 0)
            snprintf(query + n, sizeof(query) - (size_t)n, "%climit=%d", esc ? '&' : '?', limit);
        char sfx[300];
        snprintf(sfx, sizeof(sfx), "%s%s", suffix, query);
        rc = id ? id_call(c, "GET", prefix, id, sfx, ret, err)
                : adc_request(c, "GET", sfx, NULL, ret, err);
    }
    curl_free(esc);
    return rc;
}

/* ==========================================================================================
 * Files */

int adc_file_upload(struct adc_client *c, const char *path, adc_progress_fn progress, void *ud,
                    json_t **ret, struct adc_error *err)
{
    struct adcp_call k = {
        .method = "POST", .path = "/v1/files", .progress = progress, .progress_ud = ud};
    curl_mime *mime = NULL;
    curl_mimepart *purpose;
    int rc = adcp_readable(path, err);
    if (rc < 0)
        return rc;
    mime = curl_mime_init(c->curl);
    purpose = mime ? curl_mime_addpart(mime) : NULL;
    if (!purpose || curl_mime_name(purpose, "purpose") != CURLE_OK ||
        curl_mime_data(purpose, "fine-tune", CURL_ZERO_TERMINATED) != CURLE_OK ||
        adcp_mime_file(mime, "file", path, "application/jsonl") < 0) {
        rc = adcp_error(err, -ENOMEM, 0, "out of memory");
        goto out;
    }
    k.mime = mime;
    rc = adcp_json_call(c, &k, NULL, ret, err);
out:
    adcp_call_fini(&k);
    curl_mime_free(mime);
    return rc;
}

int adc_files_list(struct adc_client *c, json_t **ret, struct adc_error *err)
{
    return adc_request(c, "GET", "/v1/files", NULL, ret, err);
}

int adc_file_get(struct adc_client *c, const char *id, json_t **ret, struct adc_error *err)
{
    return id_call(c, "GET", FILES, id, "", ret, err);
}

int adc_file_delete(struct adc_client *c, const char *id, json_t **ret, struct adc_error *err)
{
    return id_call(c, "DELETE", FILES, id, "", ret, err);
}

/* ==========================================================================================
 * Jobs */

int adc_job_create(struct adc_client *c, const json_t *request, json_t **ret, struct adc_error *err)
{
    if (!json_is_object(request))
        return adcp_error(err, -EINVAL, 0, "the request is not a JSON object");
    return adc_request(c, "POST", "/v1/fine_tuning/jobs", request, ret, err);
}

int adc_jobs_list(struct adc_client *c, const char *after, int limit, json_t **ret,
                  struct adc_error *err)
{
    return list_call(c, NULL, NULL, "/v1/fine_tuning/jobs", after, limit, ret, err);
}

int adc_job_get(struct adc_client *c, const char *id, json_t **ret, struct adc_error *err)
{
    return id_call(c, "GET", JOBS, id, "", ret, err);
}

int adc_job_events(struct adc_client *c, const char *id, const char *after, int limit, json_t **ret,
                   struct adc_error *err)
{
    return list_call(c, JOBS, id, "/events", after, limit, ret, err);
}

int adc_job_checkpoints(struct adc_client *c, const char *id, const char *after, int limit,
                        json_t **ret, struct adc_error *err)
{
    return list_call(c, JOBS, id, "/checkpoints", after, limit, ret, err);
}

int adc_job_cancel(struct adc_client *c, const char *id, json_t **ret, struct adc_error *err)
{
    return id_call(c, "POST", JOBS, id, "/cancel", ret, err);
}

int adc_job_pause(struct adc_client *c, const char *id, json_t **ret, struct adc_error *err)
{
    return id_call(c, "POST", JOBS, id, "/pause", ret, err);
}

int adc_job_resume(struct adc_client *c, const char *id, json_t **ret, struct adc_error *err)
{
    return id_call(c, "POST", JOBS, id, "/resume", ret, err);
}

/* ==========================================================================================
 * Following a job */

struct follow {
    adc_job_event_fn on_event;
    void *ud;
};

static int on_job_event(void *ud, json_t *ev, struct adc_error *err)
{
    struct follow *f = ud;
    if (f->on_event(f->ud, ev))
        return adcp_error(err, -ECANCELED, 200, "stopped by the event callback");
    return 0;
}

int adc_job_follow(struct adc_client *c, const char *id, adc_job_event_fn on_event, void *ud,
                   struct adc_error *err)
{
    struct follow f = {.on_event = on_event, .ud = ud};
    struct adcp_call k = {.method = "GET"};
    if (!id || !*id)
        return adcp_error(err, -EINVAL, 0, "no id");
    char *path = adcp_path(c, JOBS, id, "/events?stream=true");
    if (!path)
        return adcp_error(err, -ENOMEM, 0, "out of memory");
    k.path = path;
    int rc = adcp_sse(c, &k, on_job_event, &f, err);
    adcp_call_fini(&k);
    free(path);
    return rc;
}

/* OpenAI's fine-tuning routes over the jobs module (train.h): files (multipart uploads streamed
 * into it, line by line checked), jobs, their events (a page, or followed as server-sent
 * events), checkpoints, cancel/pause/resume; and the download of any adapter's files, so a
 * trained adapter goes back to Python's PEFT. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adapterd/registry.h"
#include "adapterd/train.h"
#include "internal.h"

static enum MHD_Result no_jobs(struct conn *c)
{
    return http_error(c, 503, "fine-tuning is not enabled on this server (state_dir)");
}

static int query_int(struct conn *c, const char *key, int dflt)
{
    const char *v = MHD_lookup_connection_value(c->mc, MHD_GET_ARGUMENT_KIND, key);
    char *end;
    long x = v ? strtol(v, &end, 10) : dflt;
    return v && (*end || end == v) ? -1 : (int)x;
}

/* ==========================================================================================
 * Files */

/* Multipart parts of POST /v1/files: "purpose" (a field) and "file" (streamed to the jobs
 * module, which checks each line as it arrives). */
static enum MHD_Result on_file_part(void *cls, enum MHD_ValueKind kind, const char *key,
                                    const char *filename, const char *content_type,
                                    const char *transfer_encoding, const char *data, uint64_t off,
                                    size_t size)
{
    struct conn *c = cls;
    (void)kind, (void)content_type, (void)transfer_encoding;
    if (c->upload_rc < 0)
        return MHD_NO;
    if (key && !strcmp(key, "purpose")) {
        size_t have = strlen(c->purpose);
        if (have + size >= sizeof(c->purpose)) {
            c->upload_rc = ad_err_set(&c->upload_err, -EINVAL, "'purpose' is too long");
            return MHD_NO;
        }
        memcpy(c->purpose + have, data, size);
        c->purpose[have + size] = '\0';
        return MHD_YES;
    }
    if (!key || strcmp(key, "file")) {
        c->upload_rc = ad_err_set(&c->upload_err, -EINVAL, "unknown form field '%.40s' (send "
                                  "file=@train.jsonl and purpose=fine-tune)", key ? key : "");
        return MHD_NO;
    }
    if (!c->fup) {
        if (c->has_weights) {
            c->upload_rc = ad_err_set(&c->upload_err, -EINVAL, "form field 'file' given twice");
            return MHD_NO;
        }
        c->upload_rc = ad_files_begin(c->h->deps.jobs, filename, &c->fup, &c->upload_err);
        if (c->upload_rc < 0)
            return MHD_NO;
        c->has_weights = true; /* the file part began */
    }
    (void)off;
    if (size > 0 && (c->upload_rc = ad_files_write(c->fup, data, size, &c->upload_err)) < 0)
        return MHD_NO;
    return MHD_YES;
}

int files_upload_begin(struct conn *c, struct ad_err *err)
{
    if (!c->h->deps.jobs)
        return ad_err_set(err, -ESHUTDOWN, "fine-tuning is not enabled on this server");
    c->pp = MHD_create_post_processor(c->mc, 64 * 1024, on_file_part, c);
    if (!c->pp)
        return ad_err_set(err, -EINVAL, "the body is not multipart/form-data with a boundary");
    return 0;
}

void files_upload_abort(struct conn *c)
{
    ad_files_abort(c->fup);
    c->fup = NULL;
}

static enum MHD_Result files_create(struct conn *c)
{
    struct ad_err err;
    if (!c->pp) {
        if (c->upload_rc < 0)
            return http_error(c, http_status_of(c->upload_rc), "%s", c->upload_err.msg);
        return http_error(c, 415, "upload the file as multipart/form-data: curl -F "
                          "purpose=fine-tune -F file=@train.jsonl");
    }
    if (c->upload_rc < 0) { /* removed before the answer: no client sees a trace of it */
        files_upload_abort(c);
        return http_error(c, c->upload_rc == -E2BIG ? 413 : http_status_of(c->upload_rc), "%s",
                          c->upload_err.msg);
    }
    enum MHD_Result complete = MHD_destroy_post_processor(c->pp);
    c->pp = NULL;
    if (complete != MHD_YES) {
        files_upload_abort(c);
        return http_error(c, 400, "the multipart body is incomplete (no closing boundary)");
    }
    if (!c->fup)
        return http_error(c, 400, "the upload needs a part file=@train.jsonl");
    json_t *obj;
    int rc = ad_files_finish(c->fup, c->purpose[0] ? c->purpose : NULL, &obj, &err);
    c->fup = NULL;
    if (rc < 0)
        return http_error(c, http_status_of(rc), "%s", err.msg);
    json_object_del(obj, "lines"); /* adapterd's own */
    return http_json(c, 200, obj);
}

static enum MHD_Result send_file(struct conn *c, const char *path, const char *type,
                                 const char *name)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        if (fd >= 0)
            close(fd);
        return http_error(c, 404, "no file '%.64s'", name);
    }
    struct MHD_Response *r = MHD_create_response_from_fd((uint64_t)st.st_size, fd);
    if (!r) {
        close(fd);
        return MHD_NO;
    }
    char disp[160];
    snprintf(disp, sizeof(disp), "attachment; filename=\"%.64s\"", name);
    MHD_add_response_header(r, "Content-Type", type);
    MHD_add_response_header(r, "Content-Disposition", disp);
    MHD_add_response_header(r, "X-Request-Id", c->id);
    c->status = 200;
    enum MHD_Result ret = MHD_queue_response(c->mc, 200, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result files_route(struct conn *c, const char *rest, const char *method)
{
    struct ad_jobs *j = c->h->deps.jobs;
    struct ad_err err;
    json_t *obj;
    int rc;
    if (!j)
        return no_jobs(c);
    if (!*rest) {
        if (!strcmp(method, "POST"))
            return files_create(c);
        if (!strcmp(method, "GET")) {
            ad_files_list(j, &obj);
            size_t i;
            json_t *f;
            json_array_foreach(json_object_get(obj, "data"), i, f)
                json_object_del(f, "lines");
            return http_json(c, 200, obj);
        }
        return http_error(c, 405, "method %s is not allowed on /v1/files", method);
    }
    char id[64];
    const char *slash = strchr(rest, '/');
    size_t n = slash ? (size_t)(slash - rest) : strlen(rest);
    snprintf(id, sizeof(id), "%.*s", (int)(n < sizeof(id) ? n : sizeof(id) - 1), rest);
    if (slash && !strcmp(slash, "/content") && !strcmp(method, "GET")) {
        char path[4400];
        if ((rc = ad_files_path(j, id, path, sizeof(path), &err)) < 0)
            return http_error(c, 404, "%s", err.msg);
        return send_file(c, path, "application/jsonl", id);
    }
    if (slash)
        return http_error(c, 404, "no route %s /v1/files/%.80s", method, rest);
    if (!strcmp(method, "GET")) {
        if ((rc = ad_files_get(j, id, &obj, &err)) < 0)
            return http_error(c, 404, "%s", err.msg);
        json_object_del(obj, "lines");
        return http_json(c, 200, obj);
    }
    if (!strcmp(method, "DELETE")) {
        if ((rc = ad_files_delete(j, id, &err)) < 0)
            return http_error(c, rc == -EBUSY ? 409 : http_status_of(rc), "%s", err.msg);
        return http_json(c, 200, json_pack("{s:s, s:s, s:b}", "id", id, "object", "file",
                                           "deleted", 1));
    }
    return http_error(c, 405, "method %s is not allowed on /v1/files/%.40s", method, id);
}

/* ==========================================================================================
 * Jobs */

/* Server-sent events of a job: every event from the first on, oldest first, then [DONE] when
 * the job has ended (a paused job has not). When the server stops, the stream is cut without
 * [DONE]. */
struct follow {
    struct conn *c;
    char id[64];
    size_t seq;
    char *out;
    size_t len, pos;
    bool done;
};

static ssize_t follow_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct follow *f = cls;
    (void)pos;
    if (f->pos == f->len && !f->done)
        http_wait_begin(f->c);
    while (f->pos == f->len) {
        free(f->out);
        f->out = NULL;
        f->len = f->pos = 0;
        if (f->done)
            return MHD_CONTENT_READER_END_OF_STREAM;
        if (atomic_load(&f->c->h->cancel_all) || http_client_gone(f->c))
            return MHD_CONTENT_READER_END_WITH_ERROR;
        json_t *evs;
        bool done;
        struct ad_err err;
        if (ad_jobs_follow(f->c->h->deps.jobs, f->id, f->seq, 0.5, &evs, &done, &err) < 0)
            return MHD_CONTENT_READER_END_WITH_ERROR;
        FILE *m = open_memstream(&f->out, &f->len);
        size_t i;
        json_t *ev;
        json_array_foreach(evs, i, ev) {
            char *text = json_dumps(ev, JSON_COMPACT);
            if (m && text)
                fprintf(m, "data: %s\n\n", text);
            free(text);
        }
        f->seq += json_array_size(evs);
        json_decref(evs);
        if (done) {
            if (m)
                fputs("data: [DONE]\n\n", m);
            f->done = true;
        }
        if (m)
            fclose(m);
    }
    http_wait_end(f->c);
    size_t n = f->len - f->pos < max ? f->len - f->pos : max;
    memcpy(buf, f->out + f->pos, n);
    f->pos += n;
    return (ssize_t)n;
}

static void follow_free(void *cls)
{
    struct follow *f = cls;
    free(f->out);
    free(f);
}

static enum MHD_Result job_events(struct conn *c, const char *id)
{
    const char *stream = MHD_lookup_connection_value(c->mc, MHD_GET_ARGUMENT_KIND, "stream");
    struct ad_err err;
    json_t *obj;
    int rc;
    if (stream && !strcmp(stream, "true")) {
        if ((rc = ad_jobs_get(c->h->deps.jobs, id, &obj, &err)) < 0)
            return http_error(c, 404, "%s", err.msg);
        json_decref(obj);
        struct follow *f = calloc(1, sizeof(*f));
        if (!f)
            return http_error(c, 503, "out of memory");
        f->c = c;
        snprintf(f->id, sizeof(f->id), "%s", id);
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096,
                                                                   follow_reader, f, follow_free);
        if (!r) {
            free(f);
            return MHD_NO;
        }
        MHD_add_response_header(r, "Content-Type", "text/event-stream");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        MHD_add_response_header(r, "X-Request-Id", c->id);
        c->status = 200;
        enum MHD_Result ret = MHD_queue_response(c->mc, 200, r);
        MHD_destroy_response(r);
        return ret;
    }
    int limit = query_int(c, "limit", 20);
    if (limit < 0)
        return http_error(c, 400, "'limit' must be an integer");
    const char *after = MHD_lookup_connection_value(c->mc, MHD_GET_ARGUMENT_KIND, "after");
    if ((rc = ad_jobs_events(c->h->deps.jobs, id, after, limit, &obj, &err)) < 0)
        return http_error(c, http_status_of(rc), "%s", err.msg);
    return http_json(c, 200, obj);
}

static enum MHD_Result jobs_route(struct conn *c, const char *rest, const char *method)
{
    struct ad_jobs *j = c->h->deps.jobs;
    struct ad_err err;
    json_t *obj = NULL;
    int rc;
    if (!j)
        return no_jobs(c);
    bool get = !strcmp(method, "GET"), post = !strcmp(method, "POST");
    if (!*rest) {
        if (post) {
            enum MHD_Result ret;
            json_t *req = http_body_json(c, &ret);
            if (!req)
                return ret;
            rc = ad_jobs_create(j, req, &obj, &err);
            json_decref(req);
            if (rc < 0)
                return http_error(c, rc == -EEXIST ? 409 : http_status_of(rc), "%s", err.msg);
            return http_json(c, 200, obj);
        }
        if (get) {
            int limit = query_int(c, "limit", 20);
            if (limit < 0)
                return http_error(c, 400, "'limit' must be an integer");
            const char *after = MHD_lookup_connection_value(c->mc, MHD_GET_ARGUMENT_KIND,
                                                            "after");
            ad_jobs_list(j, after, limit, &obj, &err);
            return http_json(c, 200, obj);
        }
        return http_error(c, 405, "method %s is not allowed on /v1/fine_tuning/jobs", method);
    }
    char id[64];
    const char *slash = strchr(rest, '/');
    size_t n = slash ? (size_t)(slash - rest) : strlen(rest);
    snprintf(id, sizeof(id), "%.*s", (int)(n < sizeof(id) ? n : sizeof(id) - 1), rest);
    const char *what = slash ? slash + 1 : "";
    if (!*what && get)
        rc = ad_jobs_get(j, id, &obj, &err);
    else if (!strcmp(what, "events") && get)
        return job_events(c, id);
    else if (!strcmp(what, "checkpoints") && get) {
        int limit = query_int(c, "limit", 20);
        const char *after = MHD_lookup_connection_value(c->mc, MHD_GET_ARGUMENT_KIND, "after");
        if (limit < 0)
            return http_error(c, 400, "'limit' must be an integer");
        rc = ad_jobs_checkpoints(j, id, after, limit, &obj, &err);
    } else if (!strcmp(what, "cancel") && post)
        rc = ad_jobs_cancel(j, id, &obj, &err);
    else if (!strcmp(what, "pause") && post)
        rc = ad_jobs_pause(j, id, &obj, &err);
    else if (!strcmp(what, "resume") && post)
        rc = ad_jobs_resume(j, id, &obj, &err);
    else
        return http_error(c, 404, "no route %s /v1/fine_tuning/jobs/%.80s", method, rest);
    if (rc < 0)
        return http_error(c, http_status_of(rc), "%s", err.msg);
    return http_json(c, 200, obj);
}

enum MHD_Result route_finetune(struct conn *c, const char *url, const char *method)
{
    if (!strncmp(url, "/v1/files", 9) && (!url[9] || url[9] == '/'))
        return files_route(c, url[9] ? url + 10 : "", method);
    const char *jobs = "/v1/fine_tuning/jobs";
    size_t n = strlen(jobs);
    if (!strncmp(url, jobs, n) && (!url[n] || url[n] == '/'))
        return jobs_route(c, url[n] ? url + n + 1 : "", method);
    return http_error(c, 404, "no route %s %.80s", method, url);
}

/* ==========================================================================================
 * Adapter files: GET /v1/adapters/{name}/files/{file} */

enum MHD_Result route_adapter_file(struct conn *c, const char *name, const char *file)
{
    static const char *const files[] = {"adapter_config.json", "adapter_model.safetensors",
                                        "adapter.safetensors"};
    char path[4400];
    if (!ad_registry_name_ok(name))
        return http_error(c, 400, "'%.80s' is not a valid adapter name", name);
    size_t i;
    for (i = 0; i < 3 && strcmp(file, files[i]); i++)
        ;
    if (i == 3)
        return http_error(c, 404, "an adapter's files are adapter_config.json and "
                          "adapter_model.safetensors (AdapterHub: adapter.safetensors)");
    struct ad_registry_info *info;
    size_t n;
    bool known = false;
    if (ad_registry_list(c->h->deps.registry, &info, &n) == 0) {
        for (size_t k = 0; k < n && !known; k++)
            known = !strcmp(info[k].name, name);
        free(info);
    }
    if (!known)
        return http_error(c, 404, "adapter '%.64s' does not exist", name);
    snprintf(path, sizeof(path), "%s/%s/%s", ad_registry_dir(c->h->deps.registry), name, file);
    if (i > 0 && access(path, F_OK) != 0) /* the other name of the weights */
        snprintf(path, sizeof(path), "%s/%s/%s", ad_registry_dir(c->h->deps.registry), name,
                 files[i == 1 ? 2 : 1]);
    snprintf(c->adapter, sizeof(c->adapter), "%.64s", name);
    return send_file(c, path, i ? "application/octet-stream" : "application/json", file);
}

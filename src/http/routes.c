/* The routes other than completions: health, metrics, models, tokenize/detokenize, and adapter
 * management (list, get, multipart upload streamed to disk, delete, vLLM's load/unload). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adapterd/engine.h"
#include "adapterd/model.h"
#include "adapterd/registry.h"
#include "adapterd/tokenizer.h"
#include "internal.h"

/* ==========================================================================================
 * Operations */

enum MHD_Result route_health(struct conn *c)
{
    if (!atomic_load(&c->h->ready))
        return http_json(c, 503, json_pack("{s:s}", "status", "loading"));
    if (atomic_load(&c->h->stopping))
        return http_json(c, 503, json_pack("{s:s}", "status", "stopping"));
    return http_json(c, 200, json_pack("{s:s}", "status", "ok"));
}

static json_t *adapter_json(const struct ad_registry_info *in)
{
    return json_pack("{s:s, s:s, s:s, s:s, s:i, s:I, s:b, s:I}", "id", in->name, "object",
                     "model", "owned_by", "adapterd", "kind", ad_adapter_kind_name(in->kind),
                     "rank", in->rank, "bytes", (json_int_t)in->bytes, "resident", in->resident,
                     "uses", (json_int_t)in->uses);
}

enum MHD_Result route_models(struct conn *c)
{
    const struct ad_model *m = c->h->deps.model;
    struct ad_registry_info *info;
    size_t n;
    json_t *data = json_array();

    json_array_append_new(data, json_pack("{s:s, s:s, s:s, s:s, s:i, s:I}", "id", m->id,
                                          "object", "model", "owned_by", "adapterd", "kind",
                                          "base", "max_model_len", m->cfg.n_ctx_max, "bytes",
                                          (json_int_t)m->weight_bytes));
    if (ad_registry_list(c->h->deps.registry, &info, &n) == 0) {
        for (size_t i = 0; i < n; i++) {
            json_t *a = adapter_json(&info[i]);
            json_object_set_new(a, "parent", json_string(m->id));
            json_array_append_new(data, a);
        }
        free(info);
    }
    return http_json(c, 200, json_pack("{s:s, s:o}", "object", "list", "data", data));
}

enum MHD_Result route_metrics(struct conn *c)
{
    struct ad_http *h = c->h;
    struct metrics *m = &h->metrics;
    struct ad_engine_stats st;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    static const char *const bounds[N_LATENCY_BUCKETS] = {"0.005", "0.01", "0.025", "0.05",
                                                          "0.1",   "0.25", "0.5",   "1",
                                                          "2.5",   "5",    "10",    "30"};
    if (!f)
        return http_error(c, 503, "out of memory");
    ad_engine_stats(h->deps.engine, &st);
    fprintf(f, "# HELP adapterd_requests_total HTTP requests by status class.\n"
               "# TYPE adapterd_requests_total counter\n");
    pthread_mutex_lock(&m->lock);
    for (int k = 1; k < 6; k++)
        fprintf(f, "adapterd_requests_total{code=\"%dxx\"} %llu\n", k,
                (unsigned long long)m->requests[k]);
    fprintf(f, "# HELP adapterd_request_duration_seconds HTTP request latency.\n"
               "# TYPE adapterd_request_duration_seconds histogram\n");
    uint64_t cum = 0;
    for (int b = 0; b < N_LATENCY_BUCKETS; b++) {
        cum += m->latency_buckets[b];
        fprintf(f, "adapterd_request_duration_seconds_bucket{le=\"%s\"} %llu\n", bounds[b],
                (unsigned long long)cum);
    }
    cum += m->latency_buckets[N_LATENCY_BUCKETS];
    fprintf(f, "adapterd_request_duration_seconds_bucket{le=\"+Inf\"} %llu\n"
               "adapterd_request_duration_seconds_sum %.6f\n"
               "adapterd_request_duration_seconds_count %llu\n",
            (unsigned long long)cum, m->latency_sum, (unsigned long long)m->latency_count);
    fprintf(f, "# TYPE adapterd_completions_total counter\nadapterd_completions_total %llu\n"
               "# TYPE adapterd_prompt_tokens_total counter\nadapterd_prompt_tokens_total %llu\n"
               "# TYPE adapterd_generated_tokens_total counter\n"
               "adapterd_generated_tokens_total %llu\n",
            (unsigned long long)m->completions, (unsigned long long)m->prompt_tokens,
            (unsigned long long)m->generated_tokens);
    fprintf(f, "# HELP adapterd_adapter_requests_total Completions per adapter.\n"
               "# TYPE adapterd_adapter_requests_total counter\n");
    for (size_t i = 0; i < m->n_adapters; i++)
        fprintf(f, "adapterd_adapter_requests_total{adapter=\"%s\"} %llu\n",
                m->per_adapter[i].name, (unsigned long long)m->per_adapter[i].requests);
    fprintf(f, "# TYPE adapterd_adapter_tokens_total counter\n");
    for (size_t i = 0; i < m->n_adapters; i++)
        fprintf(f, "adapterd_adapter_tokens_total{adapter=\"%s\"} %llu\n",
                m->per_adapter[i].name, (unsigned long long)m->per_adapter[i].tokens);
    pthread_mutex_unlock(&m->lock);
    fprintf(f,
            "# HELP adapterd_queue_depth Requests waiting for the engine.\n"
            "# TYPE adapterd_queue_depth gauge\nadapterd_queue_depth %d\n"
            "# TYPE adapterd_running_sequences gauge\nadapterd_running_sequences %d\n"
            "# HELP adapterd_kv_blocks KV cache blocks.\n# TYPE adapterd_kv_blocks gauge\n"
            "adapterd_kv_blocks{state=\"total\"} %d\nadapterd_kv_blocks{state=\"free\"} %d\n"
            "adapterd_kv_blocks{state=\"used\"} %d\n"
            "# HELP adapterd_kv_blocks_leaked KV blocks not back in the pool when the engine "
            "was last idle (always 0).\n# TYPE adapterd_kv_blocks_leaked gauge\n"
            "adapterd_kv_blocks_leaked %d\n"
            "# TYPE adapterd_engine_steps_total counter\nadapterd_engine_steps_total %llu\n"
            "# TYPE adapterd_preemptions_total counter\nadapterd_preemptions_total %llu\n"
            "# HELP adapterd_prefix_cache_queries_total Tokens looked up in the prefix cache "
            "at admission.\n# TYPE adapterd_prefix_cache_queries_total counter\n"
            "adapterd_prefix_cache_queries_total %llu\n"
            "# HELP adapterd_prefix_cache_hits_total Tokens whose KV blocks were found in the "
            "prefix cache.\n# TYPE adapterd_prefix_cache_hits_total counter\n"
            "adapterd_prefix_cache_hits_total %llu\n"
            "# HELP adapterd_kv_blocks_cached KV blocks holding a cached prefix (held or free)."
            "\n# TYPE adapterd_kv_blocks_cached gauge\nadapterd_kv_blocks_cached %d\n"
            "# HELP adapterd_adapter_resident_bytes Bytes of adapters in memory.\n"
            "# TYPE adapterd_adapter_resident_bytes gauge\nadapterd_adapter_resident_bytes %zu\n",
            st.waiting, st.running, st.kv_blocks_total, st.kv_blocks_free,
            st.kv_blocks_total - st.kv_blocks_free, st.kv_blocks_leaked,
            (unsigned long long)st.steps,
            (unsigned long long)st.preemptions, (unsigned long long)st.prefix_queries,
            (unsigned long long)st.prefix_hits, st.kv_blocks_cached,
            ad_registry_resident_bytes(h->deps.registry));
    if (h->deps.jobs) {
        struct ad_jobs_stats js;
        ad_jobs_stats(h->deps.jobs, &js);
        fprintf(f, "# HELP adapterd_finetune_jobs Fine-tuning jobs by status.\n"
                   "# TYPE adapterd_finetune_jobs gauge\n");
        for (int k = 0; k < 7; k++)
            fprintf(f, "adapterd_finetune_jobs{status=\"%s\"} %d\n", ad_job_status_names[k],
                    js.by_status[k]);
        fprintf(f, "# HELP adapterd_finetune_tokens_per_second The running job's training "
                   "throughput (0 without one).\n# TYPE adapterd_finetune_tokens_per_second gauge\n"
                   "adapterd_finetune_tokens_per_second %.1f\n"
                   "# TYPE adapterd_finetune_trained_tokens_total counter\n"
                   "adapterd_finetune_trained_tokens_total %llu\n",
                js.tokens_per_s, (unsigned long long)js.trained_tokens);
        if (js.loss == js.loss)
            fprintf(f, "# HELP adapterd_finetune_loss The running job's last training loss.\n"
                       "# TYPE adapterd_finetune_loss gauge\nadapterd_finetune_loss %.6f\n",
                    js.loss);
    }
    fclose(f);
    struct MHD_Response *r = MHD_create_response_from_buffer(len, buf, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(buf);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", "text/plain; version=0.0.4");
    c->status = 200;
    enum MHD_Result ret = MHD_queue_response(c->mc, 200, r);
    MHD_destroy_response(r);
    return ret;
}

/* ==========================================================================================
 * Tokenizer */

enum MHD_Result route_tokenize(struct conn *c)
{
    enum MHD_Result ret;
    json_t *req = http_body_json(c, &ret);
    const struct ad_tokenizer *tok = c->h->deps.tok;
    if (!req)
        return ret;
    json_t *p = json_object_get(req, "prompt"), *as = json_object_get(req, "add_special_tokens");
    if (!json_is_string(p)) {
        json_decref(req);
        return http_error(c, 400, "'prompt' must be a string");
    }
    if (!tok) {
        json_decref(req);
        return http_error(c, 400, "this model has no tokenizer.json");
    }
    int32_t *ids;
    size_t n;
    struct ad_err err;
    int rc = ad_tokenizer_encode(tok, json_string_value(p), json_string_length(p),
                                 json_is_boolean(as) ? json_is_true(as) : true, &ids, &n, &err);
    json_decref(req);
    if (rc < 0)
        return http_error(c, http_status_of(rc), "%s", err.msg);
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(arr, json_integer(ids[i]));
    free(ids);
    return http_json(c, 200, json_pack("{s:o, s:I, s:i}", "tokens", arr, "count", (json_int_t)n,
                                       "max_model_len", c->h->deps.model->cfg.n_ctx_max));
}

enum MHD_Result route_detokenize(struct conn *c)
{
    enum MHD_Result ret;
    json_t *req = http_body_json(c, &ret);
    const struct ad_tokenizer *tok = c->h->deps.tok;
    if (!req)
        return ret;
    json_t *t = json_object_get(req, "tokens");
    if (!json_is_array(t) || !tok) {
        json_decref(req);
        return http_error(c, 400, tok ? "'tokens' must be a list of token ids"
                                      : "this model has no tokenizer.json");
    }
    size_t n = json_array_size(t);
    int32_t *ids = malloc((n ? n : 1) * sizeof(int32_t));
    for (size_t i = 0; ids && i < n; i++) {
        json_t *v = json_array_get(t, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) >= (json_int_t)ad_tokenizer_n_vocab(tok)) {
            free(ids);
            json_decref(req);
            return http_error(c, 400, "tokens[%zu] is not a token id of this model", i);
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    json_decref(req);
    char *text;
    size_t len;
    int rc = ids ? ad_tokenizer_decode(tok, ids, n, false, &text, &len) : -ENOMEM;
    free(ids);
    if (rc < 0)
        return http_error(c, http_status_of(rc), "cannot decode");
    json_t *body = json_pack("{s:s%}", "prompt", text, len);
    free(text);
    return http_json(c, 200, body);
}

/* ==========================================================================================
 * Adapters */

enum MHD_Result route_adapters_list(struct conn *c)
{
    struct ad_registry_info *info;
    size_t n;
    if (ad_registry_list(c->h->deps.registry, &info, &n) < 0)
        return http_error(c, 503, "out of memory");
    json_t *data = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(data, adapter_json(&info[i]));
    free(info);
    return http_json(c, 200, json_pack("{s:s, s:o}", "object", "list", "data", data));
}

enum MHD_Result route_adapter_get(struct conn *c, const char *name)
{
    struct ad_registry_info *info;
    size_t n;
    if (ad_registry_list(c->h->deps.registry, &info, &n) < 0)
        return http_error(c, 503, "out of memory");
    for (size_t i = 0; i < n; i++)
        if (!strcmp(info[i].name, name)) {
            json_t *a = adapter_json(&info[i]);
            free(info);
            return http_json(c, 200, a);
        }
    free(info);
    return http_error(c, 404, "adapter '%.80s' does not exist", name);
}

enum MHD_Result route_adapter_delete(struct conn *c, const char *name)
{
    struct ad_err err;
    int rc = ad_registry_delete(c->h->deps.registry, name, &err);
    if (rc < 0)
        return http_error(c, http_status_of(rc), "%s", err.msg);
    c->status = 204;
    struct MHD_Response *r = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
    enum MHD_Result ret = MHD_queue_response(c->mc, 204, r);
    MHD_destroy_response(r);
    return ret;
}

/* Multipart parts: "config" (adapter_config.json) and "weights" (the safetensors file), each
 * written straight to the staging directory as it arrives. */
static enum MHD_Result on_part(void *cls, enum MHD_ValueKind kind, const char *key,
                               const char *filename, const char *content_type,
                               const char *transfer_encoding, const char *data, uint64_t off,
                               size_t size)
{
    struct conn *c = cls;
    (void)kind;
    (void)filename;
    (void)content_type;
    (void)transfer_encoding;
    if (c->upload_rc < 0)
        return MHD_NO;
    if (!key || (strcmp(key, "config") && strcmp(key, "weights"))) {
        c->upload_rc = ad_err_set(&c->upload_err, -EINVAL, "unknown form field '%.40s' (send "
                                  "config=@adapter_config.json and weights=@<file>.safetensors)",
                                  key ? key : "");
        return MHD_NO;
    }
    /* a new part: another name, or the same name again from offset 0 (MHD may first call with
     * no data at offset 0, so a part has begun once its file holds bytes) */
    if (strcmp(c->field, key) || (off == 0 && size > 0 && lseek(c->fd, 0, SEEK_CUR) > 0)) {
        char path[4200];
        if (c->fd >= 0) {
            if (fsync(c->fd) < 0)
                c->upload_rc = -errno;
            close(c->fd);
            c->fd = -1;
        }
        bool cfg = !strcmp(key, "config");
        if ((cfg && c->has_config) || (!cfg && c->has_weights)) {
            c->upload_rc = ad_err_set(&c->upload_err, -EINVAL, "form field '%s' given twice",
                                      key);
            return MHD_NO;
        }
        snprintf(path, sizeof(path), "%s/%s", c->stage,
                 cfg ? "adapter_config.json" : "adapter_model.safetensors");
        c->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (c->fd < 0) {
            c->upload_rc = ad_err_set(&c->upload_err, -errno, "cannot stage the upload");
            return MHD_NO;
        }
        snprintf(c->field, sizeof(c->field), "%s", key);
        if (cfg)
            c->has_config = true;
        else
            c->has_weights = true;
    }
    while (size > 0) {
        ssize_t w = write(c->fd, data, size);
        if (w < 0) {
            c->upload_rc = ad_err_set(&c->upload_err, -errno, "cannot stage the upload");
            return MHD_NO;
        }
        data += w;
        size -= (size_t)w;
    }
    return MHD_YES;
}

int upload_begin(struct conn *c, struct ad_err *err)
{
    int rc = ad_registry_stage_dir(c->h->deps.registry, c->stage, sizeof(c->stage), err);
    if (rc < 0) {
        c->stage[0] = '\0';
        return rc;
    }
    c->pp = MHD_create_post_processor(c->mc, 64 * 1024, on_part, c);
    if (!c->pp)
        return ad_err_set(err, -EINVAL, "the body is not multipart/form-data with a boundary");
    return 0;
}

void upload_abort(struct conn *c)
{
    files_upload_abort(c);
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    if (c->pp)
        MHD_destroy_post_processor(c->pp);
    c->pp = NULL;
    if (c->stage[0])
        ad_registry_unstage(c->h->deps.registry, c->stage);
    c->stage[0] = '\0';
}

static enum MHD_Result installed(struct conn *c, const char *name, bool created)
{
    struct ad_registry_info *info;
    size_t n;
    json_t *body = NULL;
    if (ad_registry_list(c->h->deps.registry, &info, &n) == 0) {
        for (size_t i = 0; i < n && !body; i++)
            if (!strcmp(info[i].name, name))
                body = adapter_json(&info[i]);
        free(info);
    }
    return http_json(c, created ? 201 : 200, body ? body : json_pack("{s:s}", "id", name));
}

enum MHD_Result route_adapter_put(struct conn *c, const char *name)
{
    struct ad_err err;
    bool created;
    int rc;

    if (!ad_registry_name_ok(name)) /* nothing was staged for it (server.c) */
        return http_error(c, 400, "'%.80s' is not a valid adapter name (1-64 of A-Z a-z 0-9 . _ "
                          "-, not starting with '.')", name);
    if (!c->pp) {
        if (c->upload_rc < 0)
            return http_error(c, http_status_of(c->upload_rc), "%s", c->upload_err.msg);
        return http_error(c, 415, "upload the adapter as multipart/form-data: curl -X PUT "
                          "-F config=@adapter_config.json -F weights=@adapter_model.safetensors");
    }
    if (c->upload_rc < 0)
        return http_error(c, http_status_of(c->upload_rc), "%s", c->upload_err.msg);
    /* MHD_NO: the body ended before the closing boundary (a cut upload) */
    enum MHD_Result complete = MHD_destroy_post_processor(c->pp);
    c->pp = NULL;
    if (complete != MHD_YES)
        return http_error(c, 400, "the multipart body is incomplete (no closing boundary)");
    if (c->fd >= 0) {
        rc = fsync(c->fd) < 0 ? -errno : 0;
        close(c->fd);
        c->fd = -1;
        if (rc < 0)
            return http_error(c, 500, "cannot stage the upload");
    }
    if (!c->has_config || !c->has_weights)
        return http_error(c, 400, "the upload needs two parts: config=@adapter_config.json and "
                          "weights=@adapter_model.safetensors");
    /* AdapterHub bottleneck adapters name their weights adapter.safetensors */
    char cfgpath[4200], *cfgtext = NULL;
    snprintf(cfgpath, sizeof(cfgpath), "%s/adapter_config.json", c->stage);
    if (ad_read_file(cfgpath, 1 << 20, &cfgtext, NULL, &err) == 0 &&
        !strstr(cfgtext, "\"peft_type\"")) {
        char from[4200], to[4200];
        snprintf(from, sizeof(from), "%s/adapter_model.safetensors", c->stage);
        snprintf(to, sizeof(to), "%s/adapter.safetensors", c->stage);
        rename(from, to);
    }
    free(cfgtext);
    rc = ad_registry_install(c->h->deps.registry, name, c->stage, &created, &err);
    c->stage[0] = '\0'; /* consumed by install, either way */
    if (rc < 0)
        return http_error(c, http_status_of(rc), "%s", err.msg);
    snprintf(c->adapter, sizeof(c->adapter), "%.64s", name);
    return installed(c, name, created);
}

/* Copies the regular file `name` of directory from (the client's path: errors may quote it;
 * never through a symlink) into directory `to` (a staging directory: errors do not quote it),
 * in 1 MiB pieces (an adapter may be larger than the memory to spare). */
static int copy_file(const char *from, const char *name, const char *to, struct ad_err *err)
{
    char path[4200];
    int in = -1, out = -1, rc = 0;
    char *buf = malloc(1 << 20);
    if (!buf)
        return ad_err_set(err, -ENOMEM, "out of memory");
    snprintf(path, sizeof(path), "%s/%s", from, name);
    in = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    struct stat st;
    if (in < 0 || fstat(in, &st) < 0 || !S_ISREG(st.st_mode)) {
        rc = ad_err_set(err, in < 0 && errno != ELOOP ? -errno : -EINVAL, "%.200s: %s", path,
                        in < 0 && errno == ELOOP ? "a symbolic link (adapter files must be "
                        "regular files)" : in < 0 ? strerror(errno) : "not a regular file");
        goto out;
    }
    snprintf(path, sizeof(path), "%s/%s", to, name);
    out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) {
        rc = ad_err_set(err, -EIO, "cannot stage %s: %s", name, strerror(errno));
        goto out;
    }
    for (;;) {
        ssize_t n = read(in, buf, 1 << 20);
        if (n == 0)
            break;
        if (n < 0) {
            rc = ad_err_set(err, -errno, "%.200s/%s: %s", from, name, strerror(errno));
            goto out;
        }
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(out, buf + off, (size_t)(n - off));
            if (w < 0) {
                rc = ad_err_set(err, -EIO, "cannot stage %s: %s", name, strerror(errno));
                goto out;
            }
            off += w;
        }
    }
    if (fsync(out) < 0)
        rc = ad_err_set(err, -EIO, "cannot stage %s: %s", name, strerror(errno));
out:
    if (in >= 0)
        close(in);
    if (out >= 0)
        close(out);
    free(buf);
    return rc;
}

/* vLLM: {"lora_name", "lora_path"}: copies the directory into the registry. */
enum MHD_Result route_vllm_load(struct conn *c)
{
    enum MHD_Result ret;
    json_t *req = http_body_json(c, &ret);
    struct ad_err err;
    char stage[4096] = "", name[128], path[3000];
    bool created;
    int rc;

    if (!req)
        return ret;
    const char *n = json_string_value(json_object_get(req, "lora_name"));
    const char *p = json_string_value(json_object_get(req, "lora_path"));
    if (!n || !p || strlen(n) >= sizeof(name) || strlen(p) >= sizeof(path)) {
        json_decref(req);
        return http_error(c, 400, "'lora_name' and 'lora_path' are required strings");
    }
    memcpy(name, n, strlen(n) + 1);
    memcpy(path, p, strlen(p) + 1);
    json_decref(req);
    if (!ad_registry_name_ok(name))
        return http_error(c, 400, "'%.80s' is not a valid adapter name (1-64 of A-Z a-z 0-9 . _ "
                          "-, not starting with '.')", name);
    rc = ad_registry_stage_dir(c->h->deps.registry, stage, sizeof(stage), &err);
    static const char *const files[] = {"adapter_config.json", "adapter_model.safetensors",
                                        "adapter.safetensors"};
    int n_copied = 0;
    for (size_t i = 0; rc >= 0 && i < 3; i++) {
        char from[4200];
        snprintf(from, sizeof(from), "%s/%s", path, files[i]);
        if (faccessat(AT_FDCWD, from, F_OK, AT_SYMLINK_NOFOLLOW) != 0)
            continue;
        rc = copy_file(path, files[i], stage, &err);
        n_copied += rc >= 0;
    }
    if (rc >= 0 && n_copied < 2)
        rc = ad_err_set(&err, -EINVAL, "%.200s: needs adapter_config.json and "
                        "adapter_model.safetensors", path);
    if (rc >= 0)
        rc = ad_registry_install(c->h->deps.registry, name, stage, &created, &err);
    else if (stage[0])
        ad_registry_unstage(c->h->deps.registry, stage);
    if (rc < 0) /* a path the caller gave that cannot be read is the caller's error */
        return http_error(c, rc == -ENOENT || rc == -EACCES || rc == -EISDIR || rc == -ENOTDIR
                                 ? 400 : http_status_of(rc), "%s", err.msg);
    snprintf(c->adapter, sizeof(c->adapter), "%.64s", name); /* the access log's column */
    return installed(c, name, false); /* vLLM answers 200 either way */
}

enum MHD_Result route_vllm_unload(struct conn *c)
{
    enum MHD_Result ret;
    json_t *req = http_body_json(c, &ret);
    if (!req)
        return ret;
    const char *name = json_string_value(json_object_get(req, "lora_name"));
    char copy[128];
    snprintf(copy, sizeof(copy), "%s", name ? name : "");
    json_decref(req);
    if (!name)
        return http_error(c, 400, "'lora_name' is a required string");
    struct ad_err err;
    int rc = ad_registry_delete(c->h->deps.registry, copy, &err);
    if (rc < 0)
        return http_error(c, http_status_of(rc), "%s", err.msg);
    snprintf(c->adapter, sizeof(c->adapter), "%.64s", copy);
    return http_json(c, 200, json_pack("{s:s, s:b}", "id", copy, "deleted", 1)); /* vLLM: 200 */
}

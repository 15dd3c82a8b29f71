/* What a trainer writes: the servable result (an adapter; for full fine-tuning a Hugging Face
 * model directory; for child-tuning of the full model a sparse-delta adapter), and checkpoints
 * (that, plus the optimizer's state and the position in the data) to resume from. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/train.h"
#include "adapterd/util.h"
#include "internal.h"

/* Copies a file of the base's directory into dir, if the base has it. */
static int copy_base_file(const struct ad_trainer *t, const char *dir, const char *name,
                          struct ad_err *err)
{
    char from[4200], to[4200], *text;
    size_t len;
    snprintf(from, sizeof(from), "%s/%s", t->base_dir, name);
    if (access(from, F_OK) != 0)
        return 0;
    int r = ad_read_file(from, (size_t)1 << 30, &text, &len, err);
    if (r < 0)
        return r;
    snprintf(to, sizeof(to), "%s/%s", dir, name);
    r = ad_write_file(to, text, len);
    free(text);
    return r < 0 ? ad_err_set(err, r, "writing %s: %s", name, strerror(-r)) : 0;
}

/* Full fine-tuning: config.json (its torch_dtype the saved one), model.safetensors with every
 * weight, and the base's tokenizer and generation files. */
static int save_full(struct ad_trainer *t, const char *dir, struct ad_err *err)
{
    char path[4200], *text = NULL;
    struct ad_model_tensor *mt;
    int n = ad_model_tensors(t->own, NULL, &mt), r = 0;
    if (n < 0)
        return ad_err_set(err, -ENOMEM, "out of memory");
    struct ad_st_entry *e = calloc((size_t)n, sizeof(*e));
    uint16_t **half = calloc((size_t)n, sizeof(*half));
    if (!e || !half)
        r = ad_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; r >= 0 && i < n; i++) {
        e[i] = (struct ad_st_entry){.name = mt[i].name, .dtype = AD_DTYPE_F32,
                                    .n_dims = mt[i].n_dims, .data = mt[i].w};
        e[i].shape[0] = mt[i].shape[0];
        e[i].shape[1] = mt[i].shape[1];
        if (t->o.save_bf16) {
            half[i] = malloc(mt[i].n * sizeof(uint16_t));
            if (!half[i]) {
                r = ad_err_set(err, -ENOMEM, "out of memory");
                break;
            }
            for (size_t k = 0; k < mt[i].n; k++)
                half[i][k] = ad_f32_to_bf16(mt[i].w[k]);
            e[i].dtype = AD_DTYPE_BF16;
            e[i].data = half[i];
        }
    }
    if (r >= 0) {
        static const char *const meta[] = {"format", "pt", NULL};
        snprintf(path, sizeof(path), "%s/model.safetensors", dir);
        r = ad_st_write(path, e, (size_t)n, meta, err);
    }
    /* config.json: the base's, with the dtype written */
    json_t *cfg = NULL;
    if (r >= 0) {
        json_error_t jerr;
        snprintf(path, sizeof(path), "%s/config.json", t->base_dir);
        cfg = json_load_file(path, 0, &jerr);
        if (!json_is_object(cfg))
            r = ad_err_set(err, -EINVAL, "the base's config.json: %s", jerr.text);
    }
    if (r >= 0) {
        json_object_set_new(cfg, "torch_dtype", json_string(t->o.save_bf16 ? "bfloat16"
                                                                           : "float32"));
        text = json_dumps(cfg, JSON_INDENT(2) | JSON_SORT_KEYS);
        snprintf(path, sizeof(path), "%s/config.json", dir);
        r = text ? ad_write_file(path, text, strlen(text)) : -ENOMEM;
        if (r < 0)
            ad_err_set(err, r, "writing config.json: %s", strerror(-r));
    }
    static const char *const files[] = {"tokenizer.json", "tokenizer_config.json",
                                        "generation_config.json", "special_tokens_map.json"};
    for (size_t i = 0; r >= 0 && i < sizeof(files) / sizeof(files[0]); i++)
        r = copy_base_file(t, dir, files[i], err);
    for (int i = 0; half && i < n; i++)
        free(half[i]);
    free(half);
    free(text);
    json_decref(cfg);
    free(e);
    free(mt);
    return r;
}

/* Child-tuning of the full model: the weights that moved, as a sparse delta against the base
 * (linears), and the tensors child-tuning never masks (embeddings, norms) and the biases as
 * replacements (README: sparse deltas); dense: every tensor as a replacement (full fine-tuning
 * served as an adapter). */
static int save_sparse(struct ad_trainer *t, const char *dir, bool dense, struct ad_err *err)
{
    struct ad_model_tensor *now, *was;
    int n = ad_model_tensors(t->own, NULL, &now), nb = ad_model_tensors(t->base, NULL, &was);
    int r = n < 0 || nb != n ? ad_err_set(err, -ENOMEM, "out of memory") : 0;
    struct ad_st_entry *e = r >= 0 ? calloc(2 * (size_t)n, sizeof(*e)) : NULL;
    char (*names)[224] = r >= 0 ? calloc(2 * (size_t)n, sizeof(*names)) : NULL;
    void **owned = r >= 0 ? calloc(2 * (size_t)n, sizeof(*owned)) : NULL;
    size_t ne = 0;
    if (r >= 0 && (!e || !names || !owned))
        r = ad_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; r >= 0 && i < n; i++) {
        const struct ad_model_tensor *a = &now[i], *b = &was[i];
        if (dense || a->norm || a->bias || a->embedding) { /* replacements */
            snprintf(names[ne], sizeof(names[0]), "base_model.model.%s", a->name);
            e[ne] = (struct ad_st_entry){.name = names[ne], .dtype = AD_DTYPE_F32,
                                         .n_dims = a->n_dims, .shape = {a->shape[0], a->shape[1]},
                                         .data = a->w};
            ne++;
            continue;
        }
        size_t nnz = 0;
        for (size_t k = 0; k < a->n; k++)
            nnz += a->w[k] != b->w[k];
        int64_t *idx = malloc((nnz ? nnz : 1) * sizeof(int64_t));
        float *val = malloc((nnz ? nnz : 1) * sizeof(float));
        owned[ne] = idx;
        owned[ne + 1] = val;
        if (!idx || !val) {
            r = ad_err_set(err, -ENOMEM, "out of memory");
            break;
        }
        size_t j = 0;
        for (size_t k = 0; k < a->n; k++)
            if (a->w[k] != b->w[k]) {
                idx[j] = (int64_t)k;
                val[j++] = a->w[k] - b->w[k];
            }
        size_t stem = strlen(a->name) - strlen(".weight");
        snprintf(names[ne], sizeof(names[0]), "base_model.model.%.*s.weight.sparse_indices",
                 (int)stem, a->name);
        e[ne] = (struct ad_st_entry){.name = names[ne], .dtype = AD_DTYPE_I64, .n_dims = 1,
                                     .shape = {(int64_t)nnz}, .data = idx};
        snprintf(names[ne + 1], sizeof(names[0]), "base_model.model.%.*s.weight.sparse_values",
                 (int)stem, a->name);
        e[ne + 1] = (struct ad_st_entry){.name = names[ne + 1], .dtype = AD_DTYPE_F32,
                                         .n_dims = 1, .shape = {(int64_t)nnz}, .data = val};
        ne += 2;
    }
    char path[4200];
    if (r >= 0) {
        static const char *const meta[] = {"format", "pt", NULL};
        snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
        r = ad_st_write(path, e, ne, meta, err);
    }
    if (r >= 0) {
        char cfg[512];
        snprintf(cfg, sizeof(cfg), "{\n  \"base_model_name_or_path\": \"%s\",\n  \"child_tuning\":"
                 " %s,\n  \"inference_mode\": true,\n  \"peft_type\": \"SPARSE\",\n  "
                 "\"reserve_p\": %g,\n  \"task_type\": \"CAUSAL_LM\"\n}", t->base->id,
                 t->o.child == AD_CHILD_D ? "\"D\"" : t->o.child == AD_CHILD_F ? "\"F\"" : "null",
                 t->o.reserve_p);
        snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
        r = ad_write_file(path, cfg, strlen(cfg));
        if (r < 0)
            ad_err_set(err, r, "writing adapter_config.json: %s", strerror(-r));
    }
    for (size_t i = 0; owned && i < 2 * (size_t)n; i++)
        free(owned[i]);
    free(owned);
    free(names);
    free(e);
    free(now);
    free(was);
    return r;
}

int ad_trainer_save(struct ad_trainer *t, const char *dir, struct ad_err *err)
{
    if (t->ad)
        return ad_trainable_save(t->ad, dir, err);
    if (t->o.child != AD_CHILD_NONE || t->o.full_as_adapter)
        return save_sparse(t, dir, t->o.child == AD_CHILD_NONE, err);
    return save_full(t, dir, err);
}

/* ==========================================================================================
 * Checkpoints */

int ad_trainer_checkpoint(struct ad_trainer *t, const char *dir, struct ad_err *err)
{
    int r = ad_trainer_save(t, dir, err);
    if (r < 0)
        return r;
    size_t n = (size_t)t->n_params;
    struct ad_st_entry *e = calloc(4 * n + 1, sizeof(*e));
    char (*names)[232] = calloc(4 * n + 1, sizeof(*names));
    if (!e || !names) {
        free(e);
        free(names);
        return ad_err_set(err, -ENOMEM, "out of memory");
    }
    size_t ne = 0, off = 0;
    for (size_t i = 0; i < n; off += t->params[i].n, i++) {
        const struct ad_param *p = &t->params[i];
        const void *data[4] = {p->w, t->exp_avg + off, t->exp_avg_sq + off,
                               t->mask ? t->mask + off : NULL};
        static const char *const what[4] = {"param", "exp_avg", "exp_avg_sq", "mask"};
        for (int k = 0; k < 4; k++) {
            if (!data[k])
                continue;
            snprintf(names[ne], sizeof(names[0]), "%s/%s", what[k], p->name);
            e[ne] = (struct ad_st_entry){.name = names[ne], .dtype = k == 3 ? AD_DTYPE_U8
                                                                              : AD_DTYPE_F32,
                                         .n_dims = 1, .shape = {(int64_t)p->n}, .data = data[k]};
            ne++;
        }
    }
    char path[4200];
    snprintf(path, sizeof(path), "%s/trainer_state.safetensors", dir);
    r = ad_st_write(path, e, ne, NULL, err);
    free(e);
    free(names);
    if (r < 0)
        return r;
    char json[1024];
    snprintf(json, sizeof(json), "{\n  \"step\": %lld,\n  \"total_steps\": %lld,\n  \"epoch\": %d,"
             "\n  \"pos\": %zu,\n  \"tokens\": %lld,\n  \"seconds\": %.3f,\n  \"seed\": %llu,\n"
             "  \"n_examples\": %zu\n}\n", (long long)t->step, (long long)t->total_steps,
             t->epoch, t->pos, (long long)t->tokens, t->seconds,
             (unsigned long long)t->o.seed, t->train->n);
    snprintf(path, sizeof(path), "%s/trainer_state.json", dir);
    r = ad_write_file(path, json, strlen(json));
    return r < 0 ? ad_err_set(err, r, "writing trainer_state.json: %s", strerror(-r)) : 0;
}

int ad_trainer_resume(struct ad_trainer *t, const char *dir, struct ad_err *err)
{
    char path[4200];
    json_error_t jerr;
    snprintf(path, sizeof(path), "%s/trainer_state.json", dir);
    json_t *st = json_load_file(path, 0, &jerr);
    if (!json_is_object(st)) {
        json_decref(st);
        return ad_err_set(err, -EINVAL, "trainer_state.json: %s", jerr.text);
    }
    json_int_t seed = json_integer_value(json_object_get(st, "seed"));
    json_int_t n_ex = json_integer_value(json_object_get(st, "n_examples"));
    json_int_t total = json_integer_value(json_object_get(st, "total_steps"));
    if ((uint64_t)seed != t->o.seed || (size_t)n_ex != t->train->n || total != t->total_steps) {
        json_decref(st);
        return ad_err_set(err, -EINVAL, "the checkpoint is of another run (seed, data or steps "
                          "differ)");
    }
    t->step = json_integer_value(json_object_get(st, "step"));
    t->epoch = (int)json_integer_value(json_object_get(st, "epoch"));
    t->pos = (size_t)json_integer_value(json_object_get(st, "pos"));
    t->tokens = json_integer_value(json_object_get(st, "tokens"));
    t->seconds = json_number_value(json_object_get(st, "seconds"));
    json_decref(st);
    if (t->epoch >= 0)
        trainer_shuffle(t, t->epoch);

    struct ad_st_file *f;
    snprintf(path, sizeof(path), "%s/trainer_state.safetensors", dir);
    int r = ad_st_open(path, &f, err);
    if (r < 0)
        return r;
    size_t off = 0;
    for (int i = 0; r >= 0 && i < t->n_params; off += t->params[i].n, i++) {
        struct ad_param *p = &t->params[i];
        float *dst[3] = {p->w, t->exp_avg + off, t->exp_avg_sq + off};
        static const char *const what[3] = {"param", "exp_avg", "exp_avg_sq"};
        for (int k = 0; r >= 0 && k < 3; k++) {
            char name[232];
            snprintf(name, sizeof(name), "%s/%s", what[k], p->name);
            const struct ad_tensor *x = ad_st_find(f, name);
            if (!x || x->dtype != AD_DTYPE_F32 || x->n_elems != (int64_t)p->n)
                r = ad_err_set(err, -EINVAL, "trainer_state.safetensors: no '%s' of %zu values",
                               name, p->n);
            else
                ad_tensor_to_f32(x, dst[k]);
        }
        char name[232];
        snprintf(name, sizeof(name), "mask/%s", p->name);
        const struct ad_tensor *x = ad_st_find(f, name);
        if (r >= 0 && x) {
            if (!t->mask && !(t->mask = malloc(t->n_values)))
                r = ad_err_set(err, -ENOMEM, "out of memory");
            else if (x->dtype != AD_DTYPE_U8 || x->n_elems != (int64_t)p->n)
                r = ad_err_set(err, -EINVAL, "trainer_state.safetensors: bad '%s'", name);
            else
                memcpy(t->mask + off, x->data, p->n);
        }
    }
    ad_st_close(f);
    return r;
}

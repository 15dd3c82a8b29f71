/* Loading a Hugging Face model directory: config, safetensors (single or sharded), weights
 * resolved through the architecture table into layers and sites. */
#include <errno.h>
#include <jansson.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"
#include "internal.h"

#define MAX_JSON_BYTES (64u << 20)

/* ==========================================================================================
 * Files */

static int open_weights(struct ad_model *m, const char *dir, struct ad_err *err)
{
    char path[4096], *text = NULL;
    json_t *idx = NULL;
    int r;

    r = ad_path_join(path, sizeof(path), dir, "model.safetensors");
    if (r < 0)
        return ad_err_set(err, r, "%s: path too long", dir);
    if (access(path, F_OK) == 0) {
        m->files = calloc(1, sizeof(*m->files));
        if (!m->files)
            return ad_err_set(err, -ENOMEM, "out of memory");
        r = ad_st_open(path, &m->files[0], err);
        if (r < 0)
            return r;
        m->n_files = 1;
        return 0;
    }

    /* Sharded: model.safetensors.index.json {"weight_map": {tensor: file}}. */
    r = ad_path_join(path, sizeof(path), dir, "model.safetensors.index.json");
    if (r >= 0)
        r = ad_read_file(path, MAX_JSON_BYTES, &text, NULL, err);
    if (r < 0) {
        if (r == -ENOENT)
            return ad_err_set(err, -ENOENT, "%s: neither model.safetensors nor "
                              "model.safetensors.index.json exists", dir);
        return r;
    }
    json_error_t jerr;
    idx = json_loads(text, 0, &jerr);
    free(text);
    json_t *map = json_object_get(idx, "weight_map");
    if (!json_is_object(map)) {
        r = ad_err_set(err, -EINVAL, "%s: no 'weight_map' object%s%s", path,
                       idx ? "" : ": ", idx ? "" : jerr.text);
        goto out;
    }
    /* The distinct shard names, in order of first appearance. */
    const char *key;
    json_t *v;
    const char **names = calloc(json_object_size(map) + 1, sizeof(*names));
    int n_names = 0;
    if (!names) {
        r = ad_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    json_object_foreach(map, key, v) {
        const char *f = json_string_value(v);
        bool seen = false;
        if (!f || strchr(f, '/') || !strcmp(f, "..")) {
            r = ad_err_set(err, -EINVAL, "%s: bad shard file name for '%s'", path, key);
            free(names);
            goto out;
        }
        for (int i = 0; i < n_names && !seen; i++)
            seen = !strcmp(names[i], f);
        if (!seen)
            names[n_names++] = f;
    }
    m->files = calloc((size_t)n_names + 1, sizeof(*m->files));
    r = m->files ? 0 : ad_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; r >= 0 && i < n_names; i++) {
        char shard[4096];
        r = ad_path_join(shard, sizeof(shard), dir, names[i]);
        if (r >= 0)
            r = ad_st_open(shard, &m->files[i], err);
        if (r >= 0)
            m->n_files++;
    }
    free(names);
out:
    json_decref(idx);
    return r;
}

static const struct ad_tensor *find_tensor(const struct ad_model *m, const char *name)
{
    for (int i = 0; i < m->n_files; i++) {
        const struct ad_tensor *t = ad_st_find(m->files[i], name);
        if (t)
            return t;
    }
    return NULL;
}

/* ==========================================================================================
 * Tensors */

static int own(struct ad_model *m, void *p)
{
    void **n = realloc(m->owned, sizeof(*n) * (size_t)(m->n_owned + 1));
    if (!n)
        return -ENOMEM;
    m->owned = n;
    m->owned[m->n_owned++] = p;
    return 0;
}

/* Looks up root+name+suffix (and name+suffix where the root is optional), checks the shape
 * and returns f32 data: the mapping itself when it is aligned f32, else a converted copy. */
static int get_tensor(struct ad_model *m, const char *root, const char *name, const char *suffix,
                      int n_dims, int64_t d0, int64_t d1, bool optional, const float **ret,
                      struct ad_err *err)
{
    const struct ad_arch *a = m->arch;
    char full[256];
    const struct ad_tensor *t;

    snprintf(full, sizeof(full), "%s%s%s", root, name, suffix);
    t = find_tensor(m, full);
    if (!t && a->root_optional && root == a->root) {
        snprintf(full, sizeof(full), "%s%s", name, suffix);
        t = find_tensor(m, full);
        if (!t)
            snprintf(full, sizeof(full), "%s%s%s", root, name, suffix);
    }
    if (!t) {
        *ret = NULL;
        return optional ? 0 : ad_err_set(err, -EINVAL, "missing tensor '%s'", full);
    }
    int64_t want[2] = {d0, d1};
    bool ok = t->n_dims == n_dims;
    for (int i = 0; ok && i < n_dims; i++)
        ok = t->shape[i] == want[i];
    if (!ok) {
        char found[96] = "[";
        for (int i = 0; i < t->n_dims && i < 4; i++)
            snprintf(found + strlen(found), sizeof(found) - strlen(found), "%s%lld",
                     i ? ", " : "", (long long)t->shape[i]);
        strncat(found, "]", sizeof(found) - strlen(found) - 1);
        if (n_dims == 1)
            return ad_err_set(err, -EINVAL, "tensor '%s': expected shape [%lld], found %s", full,
                              (long long)d0, found);
        return ad_err_set(err, -EINVAL, "tensor '%s': expected shape [%lld, %lld], found %s",
                          full, (long long)d0, (long long)d1, found);
    }
    if (!ad_dtype_is_float(t->dtype))
        return ad_err_set(err, -EINVAL, "tensor '%s': dtype %s is not supported (F32, F16, BF16)",
                          full, ad_dtype_name(t->dtype));
    if (t->dtype == AD_DTYPE_F32 && ((uintptr_t)t->data % sizeof(float)) == 0) {
        *ret = t->data;
        return 0;
    }
    float *buf = malloc((size_t)t->n_elems * sizeof(float) + 1);
    if (!buf || own(m, buf) < 0) {
        free(buf);
        return ad_err_set(err, -ENOMEM, "out of memory converting '%s'", full);
    }
    ad_tensor_to_f32(t, buf);
    *ret = buf;
    return 0;
}

/* ==========================================================================================
 * Layers and sites */

static void site_shape(const struct ad_model_config *c, enum ad_role role, int *n_in, int *n_out,
                       bool *has_bias)
{
    int q = c->n_head * c->head_dim, kv = c->n_kv_head * c->head_dim;
    switch (role) {
    case AD_ROLE_Q: *n_in = c->n_embd; *n_out = q; *has_bias = c->qkv_bias; break;
    case AD_ROLE_K:
    case AD_ROLE_V: *n_in = c->n_embd; *n_out = kv; *has_bias = c->qkv_bias; break;
    case AD_ROLE_QKV: *n_in = c->n_embd; *n_out = q + 2 * kv; *has_bias = c->qkv_bias; break;
    case AD_ROLE_O: *n_in = q; *n_out = c->n_embd; *has_bias = c->o_bias; break;
    case AD_ROLE_GATE:
    case AD_ROLE_UP: *n_in = c->n_embd; *n_out = c->n_ff; *has_bias = c->mlp_bias; break;
    case AD_ROLE_DOWN: *n_in = c->n_ff; *n_out = c->n_embd; *has_bias = c->mlp_bias; break;
    default: *n_in = c->n_embd; *n_out = c->n_vocab; *has_bias = false; break;
    }
}

static int load_site(struct ad_model *m, struct ad_site *s, int layer, enum ad_role role,
                     const char *root, const char *name, struct ad_err *err)
{
    const struct ad_arch *a = m->arch;
    bool has_bias;
    int r;

    s->layer = layer;
    s->role = role;
    s->w_in_out = a->conv1d && role != AD_ROLE_LM_HEAD;
    site_shape(&m->cfg, role, &s->n_in, &s->n_out, &has_bias);
    snprintf(s->path, sizeof(s->path), "%s%s", root, name);
    if (s->w_in_out)
        r = get_tensor(m, root, name, ".weight", 2, s->n_in, s->n_out, false, &s->w, err);
    else
        r = get_tensor(m, root, name, ".weight", 2, s->n_out, s->n_in, false, &s->w, err);
    if (r >= 0 && has_bias)
        r = get_tensor(m, root, name, ".bias", 1, s->n_out, 0, false, &s->b, err);
    m->weight_bytes += (size_t)s->n_in * (size_t)s->n_out * sizeof(float);
    return r;
}

static int load_layers(struct ad_model *m, struct ad_err *err)
{
    const struct ad_arch *a = m->arch;
    const struct ad_model_config *c = &m->cfg;
    int n_embd = c->n_embd, r, si = 0;

    m->layers = calloc((size_t)c->n_layer, sizeof(*m->layers));
    m->sites = calloc((size_t)c->n_layer * (size_t)a->n_modules + 1, sizeof(*m->sites));
    if (!m->layers || !m->sites)
        return ad_err_set(err, -ENOMEM, "out of memory");

    for (int l = 0; l < c->n_layer; l++) {
        struct ad_layer *L = &m->layers[l];
        char pfx[64], name[128];
        snprintf(pfx, sizeof(pfx), a->layer_fmt, l);

#define NORM(field_w, field_b, nm)                                                             \
    do {                                                                                       \
        snprintf(name, sizeof(name), "%s%s", pfx, nm);                                         \
        r = get_tensor(m, a->root, name, ".weight", 1, n_embd, 0, false, &L->field_w, err);    \
        if (r >= 0 && a->layer_norm)                                                           \
            r = get_tensor(m, a->root, name, ".bias", 1, n_embd, 0, false, &L->field_b, err);  \
        if (r < 0)                                                                             \
            return r;                                                                          \
    } while (0)
        NORM(norm1_w, norm1_b, a->norm1);
        NORM(norm2_w, norm2_b, a->norm2);
#undef NORM
        for (int i = 0; i < a->n_modules; i++) {
            struct ad_site *s = &m->sites[si++];
            snprintf(name, sizeof(name), "%s%s", pfx, a->modules[i].name);
            r = load_site(m, s, l, a->modules[i].role, a->root, name, err);
            if (r < 0)
                return r;
            L->site[s->role] = s;
        }
    }

    /* lm_head: a site of its own, or the tied input embedding. */
    struct ad_site *head = &m->sites[si];
    const struct ad_tensor *t = find_tensor(m, "lm_head.weight");
    if (t || !c->tie_embeddings) {
        r = load_site(m, head, -1, AD_ROLE_LM_HEAD, "", a->lm_head, err);
        if (r < 0)
            return r;
    } else {
        head->layer = -1;
        head->role = AD_ROLE_LM_HEAD;
        head->n_in = n_embd;
        head->n_out = c->n_vocab;
        head->w = m->tok_embd;
        snprintf(head->path, sizeof(head->path), "%s", a->lm_head);
        m->weight_bytes += (size_t)n_embd * (size_t)c->n_vocab * sizeof(float);
    }
    m->n_sites = si + 1;
    return 0;
}

/* ==========================================================================================
 * RoPE frequencies (transformers' _compute_default / linear / llama3 rope parameters) */

static int init_rope(struct ad_model *m)
{
    const struct ad_model_config *c = &m->cfg;
    int half = c->head_dim / 2;

    m->rope_inv_freq = calloc((size_t)half, sizeof(float));
    if (!m->rope_inv_freq)
        return -ENOMEM;
    for (int j = 0; j < half; j++) {
        double f = 1.0 / pow((double)c->rope_theta, (double)(2 * j) / (double)c->head_dim);
        if (c->rope_scaling == AD_ROPE_LINEAR) {
            f /= c->rope_factor;
        } else if (c->rope_scaling == AD_ROPE_LLAMA3) {
            double lo = c->rope_low_freq_factor, hi = c->rope_high_freq_factor;
            double L = c->rope_orig_ctx, factor = c->rope_factor;
            double wavelen = 2.0 * M_PI / f;
            if (wavelen > L / lo) {
                f /= factor;
            } else if (wavelen >= L / hi) {
                double smooth = (L / wavelen - lo) / (hi - lo);
                f = (1.0 - smooth) * f / factor + smooth * f;
            }
        }
        m->rope_inv_freq[j] = (float)f;
    }
    return 0;
}

/* ==========================================================================================
 * Public */

int ad_model_load(const char *dir, struct ad_model **ret, struct ad_err *err)
{
    struct ad_model *m = calloc(1, sizeof(*m));
    char path[4096], *cfg_text = NULL, *gen_text = NULL;
    int r;

    if (!m)
        return ad_err_set(err, -ENOMEM, "out of memory");
    r = ad_path_join(path, sizeof(path), dir, "config.json");
    if (r >= 0)
        r = ad_read_file(path, MAX_JSON_BYTES, &cfg_text, NULL, err);
    if (r < 0)
        goto fail;
    if (ad_path_join(path, sizeof(path), dir, "generation_config.json") >= 0 &&
        access(path, F_OK) == 0) {
        r = ad_read_file(path, MAX_JSON_BYTES, &gen_text, NULL, err);
        if (r < 0)
            goto fail;
    }
    r = ad_model_config_parse(cfg_text, gen_text, &m->cfg, err);
    if (r < 0) {
        ad_err_prefix(err, "%s", dir);
        goto fail;
    }
    m->arch = ad_arch_for(m->cfg.family);
    {
        char tmp[4096];
        snprintf(tmp, sizeof(tmp), "%s", dir);
        size_t n = strlen(tmp);
        while (n > 1 && tmp[n - 1] == '/')
            tmp[--n] = '\0';
        snprintf(m->id, sizeof(m->id), "%s", basename(tmp));
    }

    r = open_weights(m, dir, err);
    if (r < 0)
        goto fail;
    const struct ad_arch *a = m->arch;
    const struct ad_model_config *c = &m->cfg;
    r = get_tensor(m, a->root, a->tok_embd, ".weight", 2, c->n_vocab, c->n_embd, false,
                   &m->tok_embd, err);
    if (r >= 0 && a->pos_embd)
        r = get_tensor(m, a->root, a->pos_embd, ".weight", 2, c->n_ctx_max, c->n_embd, false,
                       &m->pos_embd, err);
    if (r >= 0)
        r = get_tensor(m, a->root, a->final_norm, ".weight", 1, c->n_embd, 0, false,
                       &m->final_norm_w, err);
    if (r >= 0 && a->layer_norm)
        r = get_tensor(m, a->root, a->final_norm, ".bias", 1, c->n_embd, 0, false,
                       &m->final_norm_b, err);
    if (r >= 0)
        r = load_layers(m, err);
    if (r < 0) {
        ad_err_prefix(err, "%s", dir);
        goto fail;
    }
    if (a->rope && init_rope(m) < 0) {
        r = ad_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    free(cfg_text);
    free(gen_text);
    *ret = m;
    return 0;
fail:
    free(cfg_text);
    free(gen_text);
    ad_model_free(m);
    return r;
}

void ad_model_free(struct ad_model *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->n_owned; i++)
        free(m->owned[i]);
    free(m->owned);
    for (int i = 0; i < m->n_files; i++)
        ad_st_close(m->files[i]);
    free(m->files);
    free(m->layers);
    free(m->sites);
    free(m->rope_inv_freq);
    free(m);
}

const struct ad_site *ad_model_find_site(const struct ad_model *m, const char *path)
{
    const char *root = m->arch->root;
    size_t rl = strlen(root);

    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < m->n_sites; i++) {
            const char *p = m->sites[i].path;
            if (pass == 1) { /* the path was given without the root prefix */
                if (strncmp(p, root, rl) != 0)
                    continue;
                p += rl;
            }
            if (!strcmp(p, path))
                return &m->sites[i];
        }
    }
    return NULL;
}

const char *ad_model_root(const struct ad_model *m)
{
    return m->arch->root;
}

const char *ad_model_layer_fmt(const struct ad_model *m)
{
    return m->arch->layer_fmt;
}

int ad_model_find_norm(const struct ad_model *m, const char *path, int *ret_layer,
                       enum ad_norm_slot *ret_slot)
{
    const struct ad_arch *a = m->arch;
    size_t rl = strlen(a->root);
    char want[160];

    if (!strncmp(path, a->root, rl))
        path += rl;
    if (!strcmp(path, a->final_norm)) {
        *ret_layer = -1;
        *ret_slot = AD_NORM_FINAL;
        return 0;
    }
    for (int l = 0; l < m->cfg.n_layer; l++) {
        int n = snprintf(want, sizeof(want), a->layer_fmt, l);
        if (n < 0 || strncmp(path, want, (size_t)n) != 0)
            continue;
        if (!strcmp(path + n, a->norm1) || !strcmp(path + n, a->norm2)) {
            *ret_layer = l;
            *ret_slot = !strcmp(path + n, a->norm1) ? AD_NORM_ATTN : AD_NORM_MLP;
            return 0;
        }
    }
    return -ENOENT;
}

int ad_model_find_embedding(const struct ad_model *m, const char *path)
{
    const struct ad_arch *a = m->arch;
    size_t rl = strlen(a->root);
    if (!strncmp(path, a->root, rl))
        path += rl;
    if (!strcmp(path, a->tok_embd))
        return 0;
    if (a->pos_embd && !strcmp(path, a->pos_embd))
        return 1;
    return -ENOENT;
}

void ad_model_norm_path(const struct ad_model *m, int layer, enum ad_norm_slot slot, char *buf,
                        size_t size)
{
    const struct ad_arch *a = m->arch;
    char pfx[64] = "";
    if (slot != AD_NORM_FINAL)
        snprintf(pfx, sizeof(pfx), a->layer_fmt, layer);
    snprintf(buf, size, "%s%s%s", a->root, pfx,
             slot == AD_NORM_FINAL ? a->final_norm : slot == AD_NORM_ATTN ? a->norm1 : a->norm2);
}

bool ad_model_is_eos(const struct ad_model_config *cfg, int tok)
{
    for (int i = 0; i < cfg->n_eos; i++)
        if (cfg->eos_ids[i] == tok)
            return true;
    return false;
}

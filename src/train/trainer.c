/* The training loop: data order, batches and passes, the step (clipping, child-tuning, the
 * optimizer at its scheduled rate), evaluation, saving and checkpoints. The maths of each pass
 * is the model's (src/model/train.c) and the adapter kind's (its training hooks). */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/train.h"
#include "adapterd/util.h"
#include "internal.h"

void ad_train_opts_default(struct ad_train_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->n_epochs = 1;
    o->batch_size = 8;
    o->grad_accum = 1;
    o->lr = 2e-4;
    o->beta1 = 0.9;
    o->beta2 = 0.999;
    o->eps = 1e-8;
    o->max_grad_norm = 1.0;
    o->schedule = AD_SCHED_COSINE;
    o->optimizer = AD_OPT_ADAMW;
    o->reserve_p = 0.3;
    o->seed = 42;
}

/* ==========================================================================================
 * Setup */

static int by_name(const void *a, const void *b)
{
    return strcmp(((const struct ad_param *)a)->name, ((const struct ad_param *)b)->name);
}

/* Full fine-tuning: the clone's tensors as parameters (w and g point into the model and its
 * gradients), sorted by name. Weight decay skips biases and norms (transformers' Trainer);
 * child-tuning never masks embeddings and norms. */
static int full_params(struct ad_trainer *t, struct ad_err *err)
{
    struct ad_model_tensor *mt;
    int n = ad_model_tensors(t->own, t->grads, &mt);
    if (n < 0)
        return ad_err_set(err, -ENOMEM, "out of memory");
    t->params = calloc((size_t)n, sizeof(*t->params));
    if (!t->params) {
        free(mt);
        return ad_err_set(err, -ENOMEM, "out of memory");
    }
    int k = 0;
    for (int i = 0; i < n; i++) {
        struct ad_param *p = &t->params[k++];
        snprintf(p->name, sizeof(p->name), "%s", mt[i].name);
        p->n_dims = mt[i].n_dims;
        p->shape[0] = mt[i].shape[0];
        p->shape[1] = mt[i].shape[1];
        p->n = mt[i].n;
        p->w = mt[i].w;
        p->g = mt[i].g;
        p->decay = !mt[i].bias && !mt[i].norm;
        p->maskable = !mt[i].embedding && !mt[i].norm;
    }
    free(mt);
    qsort(t->params, (size_t)k, sizeof(*t->params), by_name);
    t->n_params = k;
    return 0;
}

static int64_t steps_per_epoch(const struct ad_trainer *t)
{
    int64_t per = (int64_t)t->o.batch_size * t->o.grad_accum;
    return ((int64_t)t->train->n + per - 1) / per;
}

int ad_trainer_new(const struct ad_model *m, const struct ad_train_opts *o,
                   const struct ad_dataset *train, const struct ad_dataset *valid,
                   struct ad_trainer **ret, struct ad_err *err)
{
    if (!train || train->n == 0)
        return ad_err_set(err, -EINVAL, "the training data has no example");
    if (o->n_epochs < 1 || o->batch_size < 1 || o->grad_accum < 1)
        return ad_err_set(err, -EINVAL, "n_epochs, batch_size and gradient_accumulation_steps "
                          "must be at least 1");
    if (!(o->lr > 0 && o->lr < 10) || !(o->weight_decay >= 0) || !(o->max_grad_norm >= 0) ||
        !(o->beta1 >= 0 && o->beta1 < 1) || !(o->beta2 >= 0 && o->beta2 < 1) || !(o->eps > 0))
        return ad_err_set(err, -EINVAL, "learning_rate must be in (0, 10), weight_decay and "
                          "max_grad_norm >= 0, betas in [0, 1), eps > 0");
    if (o->child != AD_CHILD_NONE && !(o->reserve_p > 0 && o->reserve_p <= 1))
        return ad_err_set(err, -EINVAL, "child_tuning.reserve_p must be in (0, 1]");
    if (o->warmup_steps < 0 || !(o->warmup_ratio >= 0 && o->warmup_ratio < 1))
        return ad_err_set(err, -EINVAL, "warmup_steps >= 0, warmup_ratio in [0, 1)");
    struct ad_trainer *t = calloc(1, sizeof(*t));
    int r;
    if (!t)
        return ad_err_set(err, -ENOMEM, "out of memory");
    t->o = *o;
    t->o.adapter_config = NULL; /* not kept: the trainable holds its config */
    t->o.base_dir = NULL;
    t->o.init_ids = NULL;
    if (o->base_dir)
        snprintf(t->base_dir, sizeof(t->base_dir), "%s", o->base_dir);
    t->base = m;
    t->train = train;
    t->valid = valid;
    t->ts = ad_train_scratch_new(o->threads);
    if (!t->ts) {
        r = ad_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    if (o->adapter_config) {
        r = ad_trainable_new(m, o->adapter_config, o->seed, o->init_ids, o->n_init_ids, &t->ad,
                             err);
        if (r < 0)
            goto fail;
        t->m = m;
        t->params = t->ad->params;
        t->n_params = t->ad->n_params;
    } else {
        r = ad_model_clone(m, &t->own, err);
        if (r < 0)
            goto fail;
        t->grads = ad_model_grads_new(t->own);
        if (!t->grads) {
            r = ad_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        if ((r = full_params(t, err)) < 0)
            goto fail;
        t->m = t->own;
    }
    size_t n = 0;
    for (int i = 0; i < t->n_params; i++)
        n += t->params[i].n;
    t->n_values = n;
    t->exp_avg = calloc(n ? n : 1, sizeof(float));
    t->exp_avg_sq = calloc(n ? n : 1, sizeof(float));
    t->order = malloc(train->n * sizeof(*t->order));
    if (!t->exp_avg || !t->exp_avg_sq || !t->order) {
        r = ad_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    t->total_steps = steps_per_epoch(t) * o->n_epochs;
    t->warmup = o->warmup_steps ? o->warmup_steps
                                : (int64_t)ceil(o->warmup_ratio * (double)t->total_steps);
    t->valid_loss = NAN;
    t->epoch = -1; /* the first step draws epoch 0's order */
    *ret = t;
    return 0;
fail:
    ad_trainer_free(t);
    return r;
}

void ad_trainer_free(struct ad_trainer *t)
{
    if (!t)
        return;
    if (t->ad)
        ad_trainable_free(t->ad);
    else
        free(t->params);
    ad_model_grads_free(t->grads);
    ad_model_free(t->own);
    ad_train_scratch_free(t->ts);
    free(t->exp_avg);
    free(t->exp_avg_sq);
    free(t->order);
    free(t->mask);
    free(t);
}

const struct ad_param *ad_trainer_params(const struct ad_trainer *t, int *ret_n)
{
    *ret_n = t->n_params;
    return t->params;
}

int ad_trainer_init_from(struct ad_trainer *t, const char *from, struct ad_err *err)
{
    char path[4200];
    struct ad_st_file *f;
    struct stat st;
    if (!t->ad)
        return ad_err_set(err, -EINVAL, "full fine-tuning starts from the base model");
    const char *name = t->ad->kind == AD_ADAPTER_BOTTLENECK ? "adapter.safetensors"
                                                            : "adapter_model.safetensors";
    if (stat(from, &st) == 0 && S_ISDIR(st.st_mode))
        snprintf(path, sizeof(path), "%s/%s", from, name);
    else
        snprintf(path, sizeof(path), "%s", from);
    int r = ad_st_open(path, &f, err);
    if (r < 0)
        return r;
    r = ad_trainable_set(t->ad, f, err);
    ad_st_close(f);
    return r;
}

/* ==========================================================================================
 * Data order and passes */

void trainer_shuffle(struct ad_trainer *t, int e)
{
    size_t n = t->train->n;
    for (size_t i = 0; i < n; i++)
        t->order[i] = (uint32_t)i;
    uint64_t key = ad_splitmix64(ad_splitmix64(t->o.seed ^ 0x0da7aull) + (uint64_t)e);
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(ad_splitmix64(key + i) % i);
        uint32_t tmp = t->order[i - 1];
        t->order[i - 1] = t->order[j];
        t->order[j] = tmp;
    }
}

int trainer_passes(struct ad_trainer *t, const struct ad_dataset *d, const uint32_t *idx, size_t n,
                  float loss_scale, double *loss, int64_t *n_targets, struct ad_err *err)
{
    const struct ad_hooks *h = t->ad ? t->ad->hooks : NULL;
    size_t per_row = ad_train_floats_per_row(t->m, h, t->ad) * sizeof(float);
    size_t budget = t->o.activation_bytes ? t->o.activation_bytes : (size_t)512 << 20;
    int nv = t->ad && h->n_virtual ? h->n_virtual(t->ad) : 0;
    enum { MAX_SEQ = 256 };
    int lens[MAX_SEQ];
    const int32_t *tok[MAX_SEQ], *tgt[MAX_SEQ];
    if (t->ad)
        ad_trainable_prepare(t->ad);
    for (size_t i = 0; i < n;) {
        int k = 0;
        size_t rows = 0;
        while (i < n && k < MAX_SEQ) {
            const struct ad_example *e = &d->ex[idx[i]];
            size_t r = (size_t)(e->n_tokens + nv);
            if (k > 0 && (rows + r) * per_row > budget)
                break;
            lens[k] = e->n_tokens;
            tok[k] = e->tokens;
            tgt[k] = e->targets;
            rows += r;
            k++;
            i++;
        }
        struct ad_train_batch b = {k, lens, tok, tgt};
        int r = ad_model_train(t->m, &b, h, t->ad, t->grads, loss_scale, t->ts, loss, n_targets,
                               err);
        if (r < 0)
            return r;
        if (t->ad)
            t->ad->micro++;
        t->tokens += (int64_t)rows;
    }
    return 0;
}

/* ==========================================================================================
 * The step */

static double schedule(const struct ad_trainer *t, int64_t s)
{
    double W = (double)t->warmup, T = (double)t->total_steps;
    if (s < t->warmup)
        return (double)s / fmax(1.0, W);
    double progress = ((double)s - W) / fmax(1.0, T - W);
    switch (t->o.schedule) {
    case AD_SCHED_LINEAR:
        return fmax(0.0, (T - (double)s) / fmax(1.0, T - W));
    case AD_SCHED_CONSTANT:
        return 1.0;
    default:
        return fmax(0.0, 0.5 * (1.0 + cos(M_PI * progress)));
    }
}

static void zero_grads(struct ad_trainer *t)
{
    for (int i = 0; i < t->n_params; i++)
        memset(t->params[i].g, 0, t->params[i].n * sizeof(float));
}

static double grad_norm(const struct ad_trainer *t)
{
    double ss = 0;
    for (int i = 0; i < t->n_params; i++)
        for (size_t k = 0; k < t->params[i].n; k++)
            ss += (double)t->params[i].g[k] * t->params[i].g[k];
    return sqrt(ss);
}

/* torch.optim.AdamW / SGD on every parameter, at rate lr. */
static void update(struct ad_trainer *t, double lr)
{
    const struct ad_train_opts *o = &t->o;
    double step = (double)(t->step + 1);
    double bc1 = 1 - pow(o->beta1, step), bc2 = 1 - pow(o->beta2, step);
    float b1 = (float)o->beta1, b2 = (float)o->beta2;
    float step_size = (float)(lr / bc1), sqrt_bc2 = (float)sqrt(bc2), eps = (float)o->eps;
    size_t off = 0;
    for (int i = 0; i < t->n_params; i++) {
        struct ad_param *p = &t->params[i];
        float decay = p->decay ? (float)(1 - lr * o->weight_decay) : 1.0f;
        float *m = t->exp_avg + off, *v = t->exp_avg_sq + off;
        for (size_t k = 0; k < p->n; k++) {
            float g = p->g[k];
            if (o->optimizer == AD_OPT_SGD) {
                if (p->decay && o->weight_decay > 0)
                    g += (float)o->weight_decay * p->w[k];
                p->w[k] -= (float)lr * g;
                continue;
            }
            p->w[k] *= decay;
            m[k] = b1 * m[k] + (1 - b1) * g;
            v[k] = b2 * v[k] + (1 - b2) * g * g;
            p->w[k] -= step_size * m[k] / (sqrtf(v[k]) / sqrt_bc2 + eps);
        }
        off += p->n;
    }
}

/* The examples of the next step (the rest of the epoch at its end): their indices. */
static size_t next_examples(struct ad_trainer *t, const uint32_t **ret)
{
    if (t->epoch < 0 || t->pos >= t->train->n) {
        t->epoch++;
        t->pos = 0;
        trainer_shuffle(t, t->epoch);
    }
    size_t want = (size_t)t->o.batch_size * (size_t)t->o.grad_accum;
    size_t n = t->train->n - t->pos < want ? t->train->n - t->pos : want;
    *ret = t->order + t->pos;
    t->pos += n;
    return n;
}

int ad_trainer_step(struct ad_trainer *t, struct ad_train_progress *p, struct ad_err *err)
{
    int r;
    if (t->step >= t->total_steps) {
        if (p)
            ad_trainer_progress(t, p);
        return 1;
    }
    if (t->o.child == AD_CHILD_D && !t->mask &&
        (r = child_fisher_mask(t, t->train, t->o.batch_size * t->o.grad_accum, err)) < 0)
        return r;
    double t0 = ad_now();
    const uint32_t *idx;
    size_t n = next_examples(t, &idx);
    int64_t n_targets = 0;
    for (size_t i = 0; i < n; i++)
        n_targets += t->train->ex[idx[i]].n_targets;
    double loss = 0;
    int64_t counted = 0;
    zero_grads(t);
    if (t->ad) {
        t->ad->step = (uint64_t)t->step;
        t->ad->micro = 0;
        t->ad->train = true;
    }
    r = n_targets ? trainer_passes(t, t->train, idx, n, 1.0f / (float)n_targets, &loss, &counted, err)
                  : 0;
    if (t->ad) {
        t->ad->train = false;
        ad_trainable_finish(t->ad);
    }
    if (r < 0)
        return r;
    double norm = grad_norm(t);
    if (t->o.max_grad_norm > 0 && norm > t->o.max_grad_norm) { /* clip_grad_norm_ */
        float c = (float)(t->o.max_grad_norm / (norm + 1e-6));
        for (int i = 0; i < t->n_params; i++)
            for (size_t k = 0; k < t->params[i].n; k++)
                t->params[i].g[k] *= c;
    }
    if (t->o.child != AD_CHILD_NONE)
        child_mask_grads(t);
    double lr = t->o.lr * schedule(t, t->step);
    update(t, lr);
    t->last_loss = counted ? loss / (double)counted : NAN;
    t->last_lr = lr;
    t->last_norm = norm;
    t->step++;
    t->seconds += ad_now() - t0;
    bool epoch_end = t->pos >= t->train->n;
    if (t->valid && (t->o.eval_every > 0 ? t->step % t->o.eval_every == 0 : epoch_end)) {
        if ((r = ad_trainer_eval(t, &t->valid_loss, err)) < 0)
            return r;
        t->valid_step = t->step;
    }
    if (p)
        ad_trainer_progress(t, p);
    return t->step >= t->total_steps;
}

int ad_trainer_eval(struct ad_trainer *t, double *ret_loss, struct ad_err *err)
{
    const struct ad_dataset *d = t->valid ? t->valid : t->train;
    uint32_t *idx = malloc(d->n * sizeof(*idx));
    if (!idx)
        return ad_err_set(err, -ENOMEM, "out of memory");
    for (size_t i = 0; i < d->n; i++)
        idx[i] = (uint32_t)i;
    double loss = 0;
    int64_t n = 0, tokens = t->tokens;
    int r = trainer_passes(t, d, idx, d->n, 0.0f, &loss, &n, err);
    t->tokens = tokens; /* evaluation is not training */
    free(idx);
    if (r < 0)
        return r;
    *ret_loss = n ? loss / (double)n : NAN;
    return 0;
}

int ad_trainer_fisher(struct ad_trainer *t, const struct ad_dataset *d, int batch,
                      struct ad_err *err)
{
    if (batch < 1)
        return ad_err_set(err, -EINVAL, "a batch has at least one example");
    free(t->mask);
    t->mask = NULL;
    return child_fisher_mask(t, d, batch, err);
}

const uint8_t *ad_trainer_mask(const struct ad_trainer *t)
{
    return t->mask;
}

void ad_trainer_progress(const struct ad_trainer *t, struct ad_train_progress *p)
{
    *p = (struct ad_train_progress){.step = t->step, .total_steps = t->total_steps,
                                    .epoch = t->epoch < 0 ? 0 : t->epoch, .loss = t->last_loss,
                                    .lr = t->last_lr, .grad_norm = t->last_norm,
                                    .valid_loss = t->valid_loss,
                                    .valid_step = t->valid_step, .tokens = t->tokens,
                                    .seconds = t->seconds};
}

/* Child-tuning (Xu et al. 2021, "Raise a Child in Large Language Model"): the gradients of a
 * sub-network only. F (task-free): each step a fresh Bernoulli(reserve_p) mask, the kept
 * gradients scaled by 1 / reserve_p. D (task-driven): before training, the Fisher information of
 * each weight over the training data (per batch the squared gradient, each tensor's gradient
 * clipped to max_grad_norm first, averaged over batches); the top reserve_p share of all of it
 * (numpy.percentile's threshold, linear interpolation) is the child, a fixed mask, unscaled.
 * Embeddings and norms are never masked. The random draws are counter-based (util.h's
 * ad_splitmix64), so a reference can draw the same ones: element i of parameter k (sorted by
 * name) at step t is kept iff unit(splitmix64(key_t + (k << 40) + i)) < reserve_p, with
 * key_t = splitmix64(splitmix64(seed) + t). */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/util.h"
#include "internal.h"

void child_mask_grads(struct ad_trainer *t)
{
    uint64_t key = ad_splitmix64(ad_splitmix64(t->o.seed) + (uint64_t)t->step);
    float scale = (float)(1 / t->o.reserve_p);
    size_t off = 0;
    for (int k = 0; k < t->n_params; k++) {
        struct ad_param *p = &t->params[k];
        if (p->maskable)
            for (size_t i = 0; i < p->n; i++) {
                if (t->mask) /* D */
                    p->g[i] *= (float)t->mask[off + i];
                else if (ad_unit(ad_splitmix64(key + ((uint64_t)k << 40) + i)) < t->o.reserve_p)
                    p->g[i] *= scale;
                else
                    p->g[i] = 0;
            }
        off += p->n;
    }
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* numpy.percentile(v, q) (the default "linear" method, numpy's lerp); v is sorted. */
static double percentile(float *v, size_t n, double q)
{
    qsort(v, n, sizeof(*v), cmp_float);
    double pos = q / 100 * (double)(n - 1);
    size_t lo = (size_t)floor(pos), hi = lo + 1 < n ? lo + 1 : lo;
    double a = v[lo], b = v[hi];
    double frac = pos - (double)lo, d = b - a;
    return frac >= 0.5 ? b - d * (1 - frac) : a + d * frac;
}

int child_fisher_mask(struct ad_trainer *t, const struct ad_dataset *d, int batch,
                      struct ad_err *err)
{
    float *fisher = calloc(t->n_values ? t->n_values : 1, sizeof(float));
    t->mask = malloc(t->n_values ? t->n_values : 1);
    if (!fisher || !t->mask) {
        free(fisher);
        free(t->mask);
        t->mask = NULL;
        return ad_err_set(err, -ENOMEM, "out of memory for child-tuning's Fisher information");
    }
    size_t per = (size_t)batch, n = d->n;
    size_t n_batches = (n + per - 1) / per;
    uint32_t *idx = malloc(per * sizeof(*idx));
    int r = idx ? 0 : ad_err_set(err, -ENOMEM, "out of memory");
    for (size_t b = 0; r >= 0 && b < n_batches; b++) {
        size_t k = n - b * per < per ? n - b * per : per;
        int64_t n_targets = 0, counted = 0;
        for (size_t i = 0; i < k; i++) {
            idx[i] = (uint32_t)(b * per + i);
            n_targets += d->ex[idx[i]].n_targets;
        }
        if (!n_targets)
            continue;
        for (int i = 0; i < t->n_params; i++)
            memset(t->params[i].g, 0, t->params[i].n * sizeof(float));
        double loss = 0;
        r = trainer_passes(t, d, idx, k, 1.0f / (float)n_targets, &loss, &counted, err);
        size_t off = 0;
        for (int i = 0; r >= 0 && i < t->n_params; i++) {
            struct ad_param *p = &t->params[i];
            double ss = 0;
            for (size_t e = 0; e < p->n; e++)
                ss += (double)p->g[e] * p->g[e];
            double norm = sqrt(ss);
            float c = t->o.max_grad_norm > 0 && norm > t->o.max_grad_norm
                          ? (float)(t->o.max_grad_norm / (norm + 1e-6)) : 1.0f;
            for (size_t e = 0; p->maskable && e < p->n; e++) {
                float g = p->g[e] * c;
                fisher[off + e] += g * g / (float)n_batches;
            }
            off += p->n;
        }
    }
    free(idx);
    size_t n_mask = 0, off = 0;
    for (int i = 0; r >= 0 && i < t->n_params; off += t->params[i].n, i++)
        if (t->params[i].maskable)
            n_mask += t->params[i].n;
    float *all = r >= 0 && n_mask ? malloc(n_mask * sizeof(float)) : NULL;
    if (r >= 0 && n_mask && !all)
        r = ad_err_set(err, -ENOMEM, "out of memory for child-tuning's threshold");
    if (r >= 0) {
        size_t j = 0;
        off = 0;
        for (int i = 0; i < t->n_params; off += t->params[i].n, i++)
            if (t->params[i].maskable) {
                memcpy(all + j, fisher + off, t->params[i].n * sizeof(float));
                j += t->params[i].n;
            }
        double polar = n_mask ? percentile(all, n_mask, (1 - t->o.reserve_p) * 100) : 0;
        off = 0;
        for (int i = 0; i < t->n_params; off += t->params[i].n, i++)
            for (size_t e = 0; e < t->params[i].n; e++)
                t->mask[off + e] = !t->params[i].maskable || fisher[off + e] >= polar;
    }
    for (int i = 0; i < t->n_params; i++)
        memset(t->params[i].g, 0, t->params[i].n * sizeof(float));
    free(all);
    free(fisher);
    if (r < 0) {
        free(t->mask);
        t->mask = NULL;
    }
    return r;
}

/* The training loop (src/train): on the tiny model with a dataset made here,
 *   - training lowers the loss (LoRA, full fine-tuning, child-tuning F and D);
 *   - the same seed gives the same parameters bit for bit; another seed others;
 *   - a checkpoint and resume in the middle ends bit for bit where the uninterrupted run ends;
 *   - passes split to fit a small activation budget give what one pass gives;
 *   - the schedule (warmup, cosine) as transformers has it;
 *   - what it saves is served: a LoRA adapter, a full model directory, a sparse delta, each
 *     giving through serving's forward the loss the trainer computes;
 *   - bad options are refused with the option's name. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../check.h"
#include "../tiny.h"
#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/train.h"
#include "adapterd/util.h"

#define N_EX 12

/* Examples of a simple pattern (each token predicts token + 3 mod 40), so there is something to
 * learn: lengths 5 to 16. */
static struct ad_dataset *dataset(void)
{
    struct ad_dataset *d = calloc(1, sizeof(*d));
    d->ex = calloc(N_EX, sizeof(*d->ex));
    d->n = N_EX;
    for (int i = 0; i < N_EX; i++) {
        struct ad_example *e = &d->ex[i];
        e->n_tokens = 5 + i;
        e->tokens = malloc((size_t)e->n_tokens * sizeof(int32_t));
        e->targets = malloc((size_t)e->n_tokens * sizeof(int32_t));
        for (int k = 0; k < e->n_tokens; k++)
            e->tokens[k] = (int32_t)((7 * i + 3 * k) % 40);
        for (int k = 0; k < e->n_tokens; k++) {
            e->targets[k] = k + 1 < e->n_tokens && k >= 1 ? e->tokens[k + 1] : -1;
            e->n_targets += e->targets[k] >= 0;
        }
        d->n_tokens += (size_t)e->n_tokens;
        d->n_targets += (size_t)e->n_targets;
    }
    return d;
}

static void free_dataset(struct ad_dataset *d)
{
    for (size_t i = 0; i < d->n; i++) {
        free(d->ex[i].tokens);
        free(d->ex[i].targets);
    }
    free(d->ex);
    free(d);
}

static char model_dir[64];

static struct ad_train_opts opts(const char *cfg)
{
    struct ad_train_opts o;
    ad_train_opts_default(&o);
    o.adapter_config = cfg;
    o.base_dir = model_dir;
    o.n_epochs = 8;
    o.batch_size = 4;
    o.lr = cfg ? 5e-2 : 1e-2;
    o.warmup_steps = 1;
    o.threads = 2;
    return o;
}

static struct ad_trainer *trainer(const struct ad_model *m, const struct ad_train_opts *o,
                                  const struct ad_dataset *d)
{
    struct ad_trainer *t;
    struct ad_err err;
    int rc = ad_trainer_new(m, o, d, NULL, &t, &err);
    if (rc < 0)
        fprintf(stderr, "%s\n", err.msg);
    CHECK_INT(rc, ==, 0);
    return t;
}

/* Runs to the end; returns the first and last evaluation losses. */
static void run(struct ad_trainer *t, double *first, double *last)
{
    struct ad_err err;
    struct ad_train_progress p;
    CHECK_INT(ad_trainer_eval(t, first, &err), ==, 0);
    int rc;
    while ((rc = ad_trainer_step(t, &p, &err)) == 0)
        CHECK(isfinite(p.loss) && p.lr >= 0);
    CHECK_INT(rc, ==, 1);
    CHECK_INT(p.step, ==, p.total_steps);
    CHECK_INT(ad_trainer_eval(t, last, &err), ==, 0);
}

static bool same_params(const struct ad_trainer *a, const struct ad_trainer *b)
{
    int na, nb;
    const struct ad_param *pa = ad_trainer_params(a, &na), *pb = ad_trainer_params(b, &nb);
    if (na != nb)
        return false;
    for (int i = 0; i < na; i++)
        if (pa[i].n != pb[i].n || memcmp(pa[i].w, pb[i].w, pa[i].n * sizeof(float)))
            return false;
    return true;
}

static const char *lora = "{\"peft_type\":\"LORA\",\"r\":4,\"lora_alpha\":8,"
                          "\"target_modules\":\"all-linear\",\"lora_dropout\":0.1}";

static void test_learns_and_repeats(struct ad_model *m, struct ad_dataset *d)
{
    struct ad_train_opts o = opts(lora);
    struct ad_trainer *a = trainer(m, &o, d), *b = trainer(m, &o, d);
    double a0, a1, b0, b1;
    run(a, &a0, &a1);
    run(b, &b0, &b1);
    CHECK(a1 < 0.9 * a0);
    CHECK(same_params(a, b)); /* bit for bit */
    CHECK(a1 == b1);
    o.seed = 43;
    struct ad_trainer *c = trainer(m, &o, d);
    double c0, c1;
    run(c, &c0, &c1);
    CHECK(!same_params(a, c));
    ad_trainer_free(a);
    ad_trainer_free(b);
    ad_trainer_free(c);
}

static void test_resume(struct ad_model *m, struct ad_dataset *d, const char *cfg)
{
    struct ad_train_opts o = opts(cfg);
    o.grad_accum = 2;
    o.batch_size = 2;
    struct ad_trainer *whole = trainer(m, &o, d), *part = trainer(m, &o, d);
    double x0, x1;
    run(whole, &x0, &x1);
    struct ad_err err;
    struct ad_train_progress p;
    int rc;
    for (int i = 0; i < 5; i++) /* into the second epoch */
        CHECK_INT(ad_trainer_step(part, &p, &err), ==, 0);
    char dir[] = "/tmp/adapterd-ckpt-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    rc = ad_trainer_checkpoint(part, dir, &err);
    if (rc < 0)
        fprintf(stderr, "%s\n", err.msg);
    CHECK_INT(rc, ==, 0);
    ad_trainer_free(part);
    struct ad_trainer *again = trainer(m, &o, d);
    rc = ad_trainer_resume(again, dir, &err);
    if (rc < 0)
        fprintf(stderr, "%s\n", err.msg);
    CHECK_INT(rc, ==, 0);
    while ((rc = ad_trainer_step(again, &p, &err)) == 0) {
    }
    CHECK_INT(rc, ==, 1);
    CHECK(same_params(whole, again));
    /* a checkpoint of another run is refused */
    o.seed = 7;
    struct ad_trainer *other = trainer(m, &o, d);
    CHECK_INT(ad_trainer_resume(other, dir, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "another run");
    ad_trainer_free(other);
    ad_rm_rf(dir);
    ad_trainer_free(whole);
    ad_trainer_free(again);
}

static void test_budget(struct ad_model *m, struct ad_dataset *d)
{
    struct ad_train_opts o = opts("{\"peft_type\":\"LORA\",\"r\":2,\"target_modules\":"
                                  "[\"q_proj\",\"down_proj\"]}");
    struct ad_trainer *one = trainer(m, &o, d);
    /* a budget of about 8 rows: every step in several passes */
    o.activation_bytes = 8 * ad_train_floats_per_row(m, NULL, NULL) * sizeof(float);
    struct ad_trainer *many = trainer(m, &o, d);
    double l0, l1, k0, k1;
    run(one, &l0, &l1);
    run(many, &k0, &k1);
    CHECK_NEAR(l1, k1, 1e-5 * fabs(l1));
    ad_trainer_free(one);
    ad_trainer_free(many);
}

/* The mean loss of d through serving's forward pass with adapter a (NULL: the base) on m. */
static double served(const struct ad_model *m, const struct ad_adapter *a,
                     const struct ad_dataset *d)
{
    double sum = 0;
    size_t n = 0;
    for (size_t s = 0; s < d->n; s++) {
        const struct ad_example *e = &d->ex[s];
        struct ad_kv kv;
        CHECK_INT(ad_kv_init(&kv, &m->cfg, 8, 16), ==, 0);
        struct ad_kv_seq seq = {0};
        struct ad_mix mix = {.n = 1, .a = {(struct ad_adapter *)a}, .w = {1}};
        struct ad_chunk ch = {&seq, e->tokens, e->n_tokens, true, a ? &mix : NULL};
        float *lg = malloc((size_t)e->n_tokens * (size_t)m->cfg.n_vocab * sizeof(float));
        struct ad_scratch *sc = ad_scratch_new();
        struct ad_err err;
        CHECK_INT(ad_model_forward(m, &kv, &ch, 1, &ad_mix_hooks, sc, lg, &err), ==, 0);
        for (int i = 0; i < e->n_tokens; i++)
            if (e->targets[i] >= 0) {
                float *row = lg + (size_t)i * m->cfg.n_vocab;
                ad_log_softmax(row, m->cfg.n_vocab, row);
                sum -= row[e->targets[i]];
                n++;
            }
        free(lg);
        ad_scratch_free(sc);
        ad_kv_seq_release(&kv, &seq);
        ad_kv_fini(&kv);
    }
    return sum / (double)n;
}

static void test_saved_served(struct ad_model *m, struct ad_dataset *d, const char *cfg,
                              enum ad_child child)
{
    struct ad_train_opts o = opts(cfg);
    o.child = child;
    o.n_epochs = 2;
    struct ad_trainer *t = trainer(m, &o, d);
    double l0, l1;
    run(t, &l0, &l1);
    CHECK(l1 < l0);
    char dir[] = "/tmp/adapterd-saved-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    struct ad_err err;
    int rc = ad_trainer_save(t, dir, &err);
    if (rc < 0)
        fprintf(stderr, "%s\n", err.msg);
    CHECK_INT(rc, ==, 0);
    double got;
    if (cfg || child != AD_CHILD_NONE) { /* an adapter */
        struct ad_adapter *a;
        rc = ad_adapter_load(m, dir, "saved", 0, &a, &err);
        if (rc < 0)
            fprintf(stderr, "%s\n", err.msg);
        CHECK_INT(rc, ==, 0);
        if (child != AD_CHILD_NONE)
            CHECK_INT(a->kind, ==, AD_ADAPTER_SPARSE);
        got = served(m, a, d);
        ad_adapter_unref(a);
    } else { /* a model directory */
        struct ad_model *full;
        rc = ad_model_load(dir, &full, &err);
        if (rc < 0)
            fprintf(stderr, "%s\n", err.msg);
        CHECK_INT(rc, ==, 0);
        got = served(full, NULL, d);
        ad_model_free(full);
    }
    CHECK_NEAR(got, l1, 2e-5 * fabs(l1));
    CHECK(fabs(got - served(m, NULL, d)) > 1e-3);
    ad_rm_rf(dir);
    ad_trainer_free(t);
}

static void test_child_sparsity(struct ad_model *m, struct ad_dataset *d)
{
    for (int k = 0; k < 2; k++) {
        struct ad_train_opts o = opts(NULL);
        o.child = k ? AD_CHILD_D : AD_CHILD_F;
        o.reserve_p = 0.2;
        o.n_epochs = 1;
        struct ad_trainer *t = trainer(m, &o, d);
        double l0, l1;
        run(t, &l0, &l1);
        /* D: one fixed mask, so at most about reserve_p of the maskable weights moved; F: each
         * step a new one, so more */
        int np;
        const struct ad_param *p = ad_trainer_params(t, &np);
        size_t moved = 0, total = 0;
        for (int i = 0; i < np; i++) {
            if (!p[i].maskable)
                continue;
            const float *was = NULL;
            for (int s = 0; s < m->n_sites; s++) {
                char name[128];
                snprintf(name, sizeof(name), "%s.weight", m->sites[s].path);
                if (!strcmp(name, p[i].name))
                    was = m->sites[s].w;
            }
            if (!was)
                continue;
            for (size_t e = 0; e < p[i].n; e++)
                moved += p[i].w[e] != was[e];
            total += p[i].n;
        }
        double share = (double)moved / (double)total;
        if (k)
            CHECK(share > 0.15 && share < 0.21);
        else
            CHECK(share > 0.25);
        ad_trainer_free(t);
    }
}

static void test_refused(struct ad_model *m, struct ad_dataset *d)
{
    struct ad_train_opts o = opts(lora);
    struct ad_trainer *t;
    struct ad_err err;
    o.lr = -1;
    CHECK_INT(ad_trainer_new(m, &o, d, NULL, &t, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "learning_rate");
    o = opts(lora);
    o.batch_size = 0;
    CHECK_INT(ad_trainer_new(m, &o, d, NULL, &t, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "batch_size");
    o = opts(lora);
    o.child = AD_CHILD_F;
    o.reserve_p = 0;
    CHECK_INT(ad_trainer_new(m, &o, d, NULL, &t, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "reserve_p");
    struct ad_dataset none = {0};
    o = opts(lora);
    CHECK_INT(ad_trainer_new(m, &o, &none, NULL, &t, &err), ==, -EINVAL);
}

int main(void)
{
    struct ad_model *m = tiny_model(model_dir);
    struct ad_dataset *d = dataset();

    test_learns_and_repeats(m, d);
    test_resume(m, d, lora);
    test_resume(m, d, NULL);
    test_budget(m, d);
    test_saved_served(m, d, lora, AD_CHILD_NONE);
    test_saved_served(m, d, NULL, AD_CHILD_NONE);
    test_saved_served(m, d, NULL, AD_CHILD_F);
    test_saved_served(m, d, NULL, AD_CHILD_D);
    test_child_sparsity(m, d);
    test_refused(m, d);

    free_dataset(d);
    ad_model_free(m);
    ad_rm_rf(model_dir);
    printf("trainer: ok\n");
    return 0;
}

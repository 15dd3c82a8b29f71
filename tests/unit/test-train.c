/* The training pass (src/model/train.c) and trainable adapters (src/adapter/trainable.c), checked
 * without PyTorch (tests/train has the parity with autograd):
 *   - gradients against central finite differences of the pass's own loss, for full
 *     fine-tuning and for LoRA (B non-zero, so every path counts), DoRA, bias="all";
 *   - the loss the training pass computes equals the loss of the serving forward's logits
 *     (ad_model_forward) for the base and for the adapter saved and loaded back: what is
 *     trained is what is served;
 *   - PEFT's initialisation: A kaiming-uniform within 1/sqrt(in), B zero, DoRA's magnitude the
 *     rows' norms, "gaussian" with std 1/r; the same seed gives the same values;
 *   - dropout: the same mask in the forward and the backward, the expected share dropped. */
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
#include "adapterd/safetensors.h"
#include "adapterd/util.h"

static const int32_t seq0[] = {3, 17, 5, 22, 9, 31, 2, 14};
static const int32_t seq1[] = {8, 1, 36, 12, 7};

/* targets: the next token, none at the last position and at the first of seq0 */
static int32_t tg0[8], tg1[5];

static struct ad_train_batch batch(void)
{
    static const int n[2] = {8, 5};
    static const int32_t *tok[2] = {seq0, seq1};
    static const int32_t *tgt[2] = {tg0, tg1};
    for (int i = 0; i < 8; i++)
        tg0[i] = i + 1 < 8 && i > 0 ? seq0[i + 1] : -1;
    for (int i = 0; i < 5; i++)
        tg1[i] = i + 1 < 5 ? seq1[i + 1] : -1;
    return (struct ad_train_batch){2, n, tok, tgt};
}

static double loss_of(const struct ad_model *m, const struct ad_hooks *h, void *ctx,
                      struct ad_train_scratch *ts, int64_t *n_targets)
{
    struct ad_train_batch b = batch();
    struct ad_err err;
    double loss = 0;
    int64_t n = 0;
    if (ctx)
        ad_trainable_prepare(ctx);
    CHECK_INT(ad_model_train(m, &b, h, ctx, NULL, 0.0f, ts, &loss, &n, &err), ==, 0);
    if (n_targets)
        *n_targets = n;
    return loss / (double)n;
}

/* Compares d(loss)/dw[i] with (L(w + e) - L(w - e)) / 2e for a few elements of w. */
static void check_fd(const char *what, float *w, const float *g, size_t n,
                     const struct ad_model *m, const struct ad_hooks *h, void *ctx,
                     struct ad_train_scratch *ts)
{
    double worst = 0, gmax = 0;
    for (size_t i = 0; i < n; i++)
        gmax = fabs(g[i]) > gmax ? fabs(g[i]) : gmax;
    size_t step = n / 7 + 1;
    for (size_t i = 0; i < n; i += step) {
        float keep = w[i];
        const float eps = 1e-2f;
        w[i] = keep + eps;
        double up = loss_of(m, h, ctx, ts, NULL);
        w[i] = keep - eps;
        double down = loss_of(m, h, ctx, ts, NULL);
        w[i] = keep;
        double fd = (up - down) / (2 * eps);
        double e = fabs(fd - g[i]) / (gmax + 1e-6);
        worst = e > worst ? e : worst;
    }
    if (worst > 2e-2) {
        fprintf(stderr, "%s: gradient vs finite differences off by %g of its largest\n", what,
                worst);
        abort();
    }
}

static void test_full(struct ad_model *base, struct ad_train_scratch *ts)
{
    struct ad_model *m;
    struct ad_err err;
    CHECK_INT(ad_model_clone(base, &m, &err), ==, 0);
    struct ad_model_grads *g = ad_model_grads_new(m);
    CHECK(g != NULL);
    struct ad_train_batch b = batch();
    double loss = 0;
    int64_t n = 0;
    CHECK_INT(ad_model_train(m, &b, NULL, NULL, g, 1.0f, ts, &loss, &n, &err), ==, 0);
    CHECK_INT(n, ==, 10);
    struct ad_model_tensor *t;
    int nt = ad_model_tensors(m, g, &t);
    CHECK(nt > 10);
    /* the pass's gradient is of loss_sum * scale: here scale 1, so compare n * d(mean) */
    for (int i = 0; i < nt; i++) {
        for (size_t k = 0; k < t[i].n; k++)
            t[i].g[k] /= (float)n;
        check_fd(t[i].name, t[i].w, t[i].g, t[i].n, m, NULL, NULL, ts);
    }
    free(t);
    ad_model_grads_free(g);
    ad_model_free(m);
}

/* Random, non-zero values for every parameter (B too), so that every gradient path counts. */
static void scramble(struct ad_trainable *t, unsigned seed)
{
    for (int i = 0; i < t->n_params; i++)
        for (size_t k = 0; k < t->params[i].n; k++) {
            seed = seed * 1664525u + 1013904223u;
            t->params[i].w[k] += ((float)(seed >> 8) / 16777216.0f - 0.5f) * 0.4f;
        }
}

static void train_grads(struct ad_model *m, struct ad_trainable *t, struct ad_train_scratch *ts)
{
    struct ad_train_batch b = batch();
    struct ad_err err;
    double loss = 0;
    int64_t n = 0;
    ad_trainable_zero_grad(t);
    ad_trainable_prepare(t);
    CHECK_INT(ad_model_train(m, &b, t->hooks, t, NULL, 1.0f / 10, ts, &loss, &n, &err), ==, 0);
    ad_trainable_finish(t);
}

/* DoRA's factors: their gradient holds the row norm constant (PEFT's detach), which a finite
 * difference of the loss does not: only the magnitude can be compared that way (tests/train
 * compares the factors with autograd through the detached norm). */
static bool detached(const struct ad_trainable *t, const char *name)
{
    bool dora = false;
    for (int i = 0; i < t->n_params; i++)
        dora |= strstr(t->params[i].name, "lora_magnitude_vector") != NULL;
    return dora && (strstr(name, "lora_A") || strstr(name, "lora_B"));
}

static void test_adapter_fd(struct ad_model *m, struct ad_train_scratch *ts, const char *cfg)
{
    struct ad_trainable *t;
    struct ad_err err;
    int rc = ad_trainable_new(m, cfg, 7, NULL, 0, &t, &err);
    if (rc < 0)
        fprintf(stderr, "%s\n", err.msg);
    CHECK_INT(rc, ==, 0);
    scramble(t, 99);
    train_grads(m, t, ts);
    for (int i = 0; i < t->n_params; i++)
        if (!detached(t, t->params[i].name))
            check_fd(t->params[i].name, t->params[i].w, t->params[i].g, t->params[i].n, m, t->hooks, t,
                 ts);
    ad_trainable_free(t);
}

/* The mean loss of the batch from serving's forward pass (logits of every row). */
static double served_loss(const struct ad_model *m, const struct ad_adapter *a)
{
    struct ad_train_batch b = batch();
    double sum = 0;
    int n = 0;
    for (int s = 0; s < b.n_seq; s++) {
        struct ad_kv kv;
        CHECK_INT(ad_kv_init(&kv, &m->cfg, 16, 16), ==, 0);
        struct ad_kv_seq seq = {0};
        struct ad_mix mix = {.n = 1, .a = {(struct ad_adapter *)a}, .w = {1}};
        int nv = a ? a->n_virtual : 0, rows = nv + b.n_tokens[s];
        int32_t ids[64]; /* the virtual tokens (prompt tuning) first, as the engine sends them */
        for (int i = 0; i < nv; i++)
            ids[i] = -1 - i;
        memcpy(ids + nv, b.tokens[s], (size_t)b.n_tokens[s] * sizeof(int32_t));
        struct ad_chunk ch = {&seq, ids, rows, true, a ? &mix : NULL};
        float *all = malloc((size_t)rows * (size_t)m->cfg.n_vocab * sizeof(float));
        float *logits = all + (size_t)nv * (size_t)m->cfg.n_vocab;
        struct ad_scratch *sc = ad_scratch_new();
        struct ad_err err;
        CHECK_INT(ad_model_forward(m, &kv, &ch, 1, &ad_mix_hooks, sc, all, &err), ==, 0);
        for (int i = 0; i < b.n_tokens[s]; i++) {
            int tg = b.targets[s][i];
            if (tg < 0)
                continue;
            float *lg = logits + (size_t)i * m->cfg.n_vocab;
            ad_log_softmax(lg, m->cfg.n_vocab, lg);
            sum -= lg[tg];
            n++;
        }
        free(all);
        ad_scratch_free(sc);
        ad_kv_seq_release(&kv, &seq);
        ad_kv_fini(&kv);
    }
    return sum / n;
}

static void test_served(struct ad_model *m, struct ad_train_scratch *ts, const char *cfg)
{
    struct ad_trainable *t;
    struct ad_err err;
    CHECK_INT(ad_trainable_new(m, cfg, 11, NULL, 0, &t, &err), ==, 0);
    scramble(t, 5);
    double trained = loss_of(m, t->hooks, t, ts, NULL);
    char dir[] = "/tmp/adapterd-train-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    CHECK_INT(ad_trainable_save(t, dir, &err), ==, 0);
    struct ad_adapter *a;
    int rc = ad_adapter_load(m, dir, "trained", 0, &a, &err);
    if (rc < 0)
        fprintf(stderr, "%s\n", err.msg);
    CHECK_INT(rc, ==, 0);
    double served = served_loss(m, a);
    CHECK_NEAR(trained, served, 1e-4 * fabs(served));
    CHECK(fabs(served - served_loss(m, NULL)) > 1e-3); /* the adapter does something */
    ad_adapter_unref(a);
    ad_rm_rf(dir);
    ad_trainable_free(t);
}

static void test_init(struct ad_model *m)
{
    struct ad_trainable *t, *u;
    struct ad_err err;
    const char *cfg = "{\"peft_type\":\"LORA\",\"r\":4,\"lora_alpha\":8,\"target_modules\":"
                      "[\"q_proj\",\"down_proj\"],\"use_dora\":true}";
    CHECK_INT(ad_trainable_new(m, cfg, 3, NULL, 0, &t, &err), ==, 0);
    CHECK_INT(ad_trainable_new(m, cfg, 3, NULL, 0, &u, &err), ==, 0);
    CHECK_INT(t->n_params, ==, 12); /* 2 layers x 2 modules x (A, B, magnitude) */
    for (int i = 0; i < t->n_params; i++) {
        struct ad_param *p = &t->params[i];
        CHECK(!memcmp(p->w, u->params[i].w, p->n * sizeof(float))); /* the same seed */
        if (strstr(p->name, "lora_A")) {
            double bound = 1 / sqrt((double)p->shape[1]), mx = 0, mean = 0;
            for (size_t k = 0; k < p->n; k++) {
                mx = fabs(p->w[k]) > mx ? fabs(p->w[k]) : mx;
                mean += p->w[k];
            }
            CHECK(mx <= bound && mx > 0.8 * bound);
            CHECK(fabs(mean / (double)p->n) < 0.2 * bound);
        } else if (strstr(p->name, "lora_B")) {
            for (size_t k = 0; k < p->n; k++)
                CHECK(p->w[k] == 0);
        } else { /* magnitude: |W| per output row (B = 0) */
            const char *suffix = ".lora_magnitude_vector", *path = p->name + 17;
            char module[128];
            CHECK(strstr(p->name, suffix) != NULL);
            snprintf(module, sizeof(module), "%.*s", (int)(strlen(path) - strlen(suffix)), path);
            const struct ad_site *s = ad_model_find_site(m, module);
            CHECK(s != NULL);
            for (int o = 0; o < s->n_out; o++) {
                double ss = 0;
                for (int j = 0; j < s->n_in; j++)
                    ss += (double)s->w[(size_t)o * s->n_in + j] * s->w[(size_t)o * s->n_in + j];
                CHECK_NEAR(p->w[o], sqrt(ss), 1e-5);
            }
        }
    }
    ad_trainable_free(u);
    const char *g = "{\"peft_type\":\"LORA\",\"r\":4,\"target_modules\":\"all-linear\","
                    "\"init_lora_weights\":\"gaussian\"}";
    CHECK_INT(ad_trainable_new(m, g, 9, NULL, 0, &u, &err), ==, 0);
    double ss = 0;
    size_t n = 0;
    for (int i = 0; i < u->n_params; i++)
        if (strstr(u->params[i].name, "lora_A"))
            for (size_t k = 0; k < u->params[i].n; k++, n++)
                ss += (double)u->params[i].w[k] * u->params[i].w[k];
    CHECK(n > 500);
    CHECK_NEAR(sqrt(ss / (double)n), 0.25, 0.03); /* std 1 / r */
    CHECK_INT(u->n_params, ==, 2 * 7 * 2); /* every linear of the layers, not lm_head */
    ad_trainable_free(u);
    ad_trainable_free(t);
    /* refused configurations */
    CHECK_INT(ad_trainable_new(m, "{\"peft_type\":\"LORA\",\"target_modules\":[\"nope\"]}", 1, NULL,
                               0, &t, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "trains no part");
    CHECK_INT(ad_trainable_new(m, "{\"peft_type\":\"LORA\",\"use_dora\":true,\"lora_dropout\":0.1}",
                               1, NULL, 0, &t, &err), ==, -ENOTSUP);
    CHECK_INT(ad_trainable_new(m, "{\"peft_type\":\"VERA\"}", 1, NULL, 0, &t, &err), ==, -ENOTSUP);
}

static void test_dropout(struct ad_model *m, struct ad_train_scratch *ts)
{
    struct ad_trainable *t;
    struct ad_err err;
    CHECK_INT(ad_trainable_new(m, "{\"peft_type\":\"LORA\",\"r\":2,\"lora_dropout\":0.3,"
                               "\"target_modules\":[\"q_proj\"]}", 4, NULL, 0, &t, &err), ==, 0);
    scramble(t, 17);
    t->train = true;
    /* with the mask fixed (one step, one batch), the gradient is the derivative of that loss */
    train_grads(m, t, ts);
    for (int i = 0; i < t->n_params; i++)
        check_fd(t->params[i].name, t->params[i].w, t->params[i].g, t->params[i].n, m, t->hooks, t,
                 ts);
    double a = loss_of(m, t->hooks, t, ts, NULL);
    t->step++;
    double b = loss_of(m, t->hooks, t, ts, NULL);
    CHECK(a != b); /* another step, another mask */
    t->train = false;
    double c = loss_of(m, t->hooks, t, ts, NULL);
    CHECK(c != a && c != b);
    ad_trainable_free(t);
}

int main(void)
{
    char dir[64];
    struct ad_model *m = tiny_model(dir);
    struct ad_train_scratch *ts = ad_train_scratch_new(2);
    CHECK(ts != NULL);

    test_full(m, ts);
    test_adapter_fd(m, ts, "{\"peft_type\":\"LORA\",\"r\":3,\"lora_alpha\":6,"
                           "\"target_modules\":\"all-linear\"}");
    test_adapter_fd(m, ts, "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"use_dora\":true,"
                           "\"target_modules\":[\"k_proj\",\"up_proj\"]}");
    test_adapter_fd(m, ts, "{\"peft_type\":\"LORA\",\"r\":2,\"target_modules\":[\"q_proj\"],"
                           "\"modules_to_save\":[\"lm_head\"]}");
    test_served(m, ts, "{\"peft_type\":\"LORA\",\"r\":3,\"lora_alpha\":6,"
                       "\"target_modules\":\"all-linear\"}");
    test_served(m, ts, "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"use_dora\":true,"
                       "\"use_rslora\":true,\"target_modules\":[\"q_proj\",\"v_proj\"]}");
    static const char *const kinds[] = {
        "{\"peft_type\":\"IA3\",\"target_modules\":[\"k_proj\",\"v_proj\",\"down_proj\"],"
        "\"feedforward_modules\":[\"down_proj\"]}",
        "{\"peft_type\":\"PREFIX_TUNING\",\"num_virtual_tokens\":3}",
        "{\"peft_type\":\"PREFIX_TUNING\",\"num_virtual_tokens\":2,\"prefix_projection\":true,"
        "\"encoder_hidden_size\":5}",
        "{\"peft_type\":\"PROMPT_TUNING\",\"num_virtual_tokens\":3}",
        "{\"peft_type\":\"BITFIT\"}",
        "{\"peft_type\":\"BOTTLENECK\",\"preset\":\"houlsby\",\"reduction_factor\":4}",
        "{\"peft_type\":\"BOTTLENECK\",\"preset\":\"pfeiffer\",\"reduction_factor\":2,"
        "\"non_linearity\":\"gelu\"}",
    };
    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
        test_adapter_fd(m, ts, kinds[i]);
        test_served(m, ts, kinds[i]);
    }
    test_init(m);
    test_dropout(m, ts);

    ad_train_scratch_free(ts);
    ad_model_free(m);
    ad_rm_rf(dir);
    printf("train: ok\n");
    return 0;
}

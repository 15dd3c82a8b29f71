/* Training parity with PyTorch autograd: one case directory of tests/train/reference.py (its
 * docstring has the layout). For the case's kind on its tiny base:
 *   - the trainable parameters are the reference's (names, shapes, weight decay, maskable);
 *   - the loss and every gradient at the initial parameters equal autograd's: per tensor, the
 *     worst element's error within grad_tol of the reference gradient's norm;
 *   - one SGD step, and five AdamW steps of the trainer (warmup, cosine, clipping, decay), give
 *     the reference's parameters within param_tol of each tensor's norm;
 *   - child-tuning: D's mask equals the reference's, and five steps of F or D its parameters.
 *
 *   test-train CASE_DIR */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/train.h"
#include "adapterd/util.h"

static const char *case_dir;
static int failures;

#define FAIL(...)                                                                              \
    do {                                                                                       \
        fprintf(stderr, "%s: ", case_dir);                                                     \
        fprintf(stderr, __VA_ARGS__);                                                          \
        fprintf(stderr, "\n");                                                                 \
        failures++;                                                                            \
    } while (0)

static void die(const char *what, const struct ad_err *err)
{
    fprintf(stderr, "%s: %s: %s\n", case_dir, what, err ? err->msg : "");
    exit(1);
}

static struct ad_st_file *open_st(const char *name)
{
    char path[4200];
    struct ad_st_file *f;
    struct ad_err err;
    snprintf(path, sizeof(path), "%s/%s", case_dir, name);
    if (ad_st_open(path, &f, &err) < 0)
        die(name, &err);
    return f;
}

/* A dataset of the batch: one example per sequence. */
static struct ad_dataset *dataset_of(json_t *batch)
{
    json_t *tok = json_object_get(batch, "tokens"), *tgt = json_object_get(batch, "targets");
    struct ad_dataset *d = calloc(1, sizeof(*d));
    d->n = json_array_size(tok);
    d->ex = calloc(d->n, sizeof(*d->ex));
    for (size_t s = 0; s < d->n; s++) {
        json_t *a = json_array_get(tok, s), *b = json_array_get(tgt, s);
        struct ad_example *e = &d->ex[s];
        e->n_tokens = (int)json_array_size(a);
        e->tokens = malloc((size_t)e->n_tokens * sizeof(int32_t));
        e->targets = malloc((size_t)e->n_tokens * sizeof(int32_t));
        for (int i = 0; i < e->n_tokens; i++) {
            e->tokens[i] = (int32_t)json_integer_value(json_array_get(a, (size_t)i));
            e->targets[i] = (int32_t)json_integer_value(json_array_get(b, (size_t)i));
            e->n_targets += e->targets[i] >= 0;
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

/* max |got - want| / |want|_2 over each tensor of ref, values as the trainer holds them. */
static void compare(const struct ad_param *p, int n, bool grads, const struct ad_st_file *ref,
                    double tol, const char *what)
{
    double worst = 0;
    const char *at = "";
    if ((size_t)n != ad_st_n_tensors(ref))
        FAIL("%s: %d parameters, the reference has %zu", what, n, ad_st_n_tensors(ref));
    for (int i = 0; i < n; i++) {
        const struct ad_tensor *t = ad_st_find(ref, p[i].name);
        if (!t || t->n_elems != (int64_t)p[i].n) {
            FAIL("%s: no reference tensor '%s' of %zu values", what, p[i].name, p[i].n);
            continue;
        }
        float *want = malloc(p[i].n * sizeof(float));
        ad_tensor_to_f32(t, want);
        double norm = 0, err = 0;
        for (size_t k = 0; k < p[i].n; k++) {
            norm += (double)want[k] * want[k];
            double e = fabs((double)(grads ? p[i].g[k] : p[i].w[k]) - want[k]);
            err = e > err ? e : err;
        }
        norm = sqrt(norm);
        double rel = err / (norm > 0 ? norm : 1);
        if (rel > worst) {
            worst = rel;
            at = p[i].name;
        }
        free(want);
    }
    if (worst > tol)
        FAIL("%s: '%s' off by %.3g of its norm (tolerance %g)", what, at, worst, tol);
    printf("  %-8s worst %.2e (%s)\n", what, worst, at);
}

static char *read_text(const char *name)
{
    char path[4200], *text = NULL;
    struct ad_err err;
    snprintf(path, sizeof(path), "%s/%s", case_dir, name);
    if (ad_read_file(path, 1 << 20, &text, NULL, &err) < 0)
        return NULL;
    return text;
}

/* A trainer for the case: its config (NULL: full), its initial parameters. */
static struct ad_trainer *trainer_for(const struct ad_model *m, const char *cfg,
                                      const struct ad_dataset *d, struct ad_train_opts *o)
{
    struct ad_trainer *t;
    struct ad_err err;
    char path[4200];
    o->adapter_config = cfg;
    if (ad_trainer_new(m, o, d, NULL, &t, &err) < 0)
        die("trainer", &err);
    snprintf(path, sizeof(path), "%s/init.safetensors", case_dir);
    if (cfg && ad_trainer_init_from(t, path, &err) < 0)
        die("init.safetensors", &err);
    return t;
}

static void run_steps(struct ad_trainer *t, int n)
{
    struct ad_err err;
    struct ad_train_progress p;
    for (int i = 0; i < n; i++)
        if (ad_trainer_step(t, &p, &err) < 0)
            die("step", &err);
}

/* The trainer's loss on d equals the loss serving computes with what it saved. */
static void check_served(const struct ad_model *m, struct ad_trainer *t,
                         const struct ad_dataset *d)
{
    struct ad_err err;
    double trained;
    char dir[] = "/tmp/adapterd-served-XXXXXX";
    if (ad_trainer_eval(t, &trained, &err) < 0)
        die("eval", &err);
    if (!mkdtemp(dir) || ad_trainer_save(t, dir, &err) < 0)
        die("save", &err);
    struct ad_adapter *a;
    if (ad_adapter_load(m, dir, "trained", 0, &a, &err) < 0)
        die("loading the saved adapter", &err);
    double sum = 0;
    size_t count = 0;
    for (size_t s = 0; s < d->n; s++) {
        const struct ad_example *e = &d->ex[s];
        int nv = a->n_virtual, rows = nv + e->n_tokens;
        int32_t *ids = malloc((size_t)rows * sizeof(int32_t));
        for (int i = 0; i < nv; i++)
            ids[i] = -1 - i;
        memcpy(ids + nv, e->tokens, (size_t)e->n_tokens * sizeof(int32_t));
        struct ad_kv kv;
        struct ad_kv_seq seq = {0};
        struct ad_mix mix = {.n = 1, .a = {a}, .w = {1}};
        struct ad_chunk ch = {&seq, ids, rows, true, &mix};
        float *lg = malloc((size_t)rows * (size_t)m->cfg.n_vocab * sizeof(float));
        struct ad_scratch *sc = ad_scratch_new();
        if (ad_kv_init(&kv, &m->cfg, 16, 16) < 0 ||
            ad_model_forward(m, &kv, &ch, 1, &ad_mix_hooks, sc, lg, &err) < 0)
            die("serving the saved adapter", &err);
        for (int i = 0; i < e->n_tokens; i++)
            if (e->targets[i] >= 0) {
                float *row = lg + (size_t)(nv + i) * m->cfg.n_vocab;
                ad_log_softmax(row, m->cfg.n_vocab, row);
                sum -= row[e->targets[i]];
                count++;
            }
        free(lg);
        free(ids);
        ad_scratch_free(sc);
        ad_kv_seq_release(&kv, &seq);
        ad_kv_fini(&kv);
    }
    double served = sum / (double)count;
    if (fabs(served - trained) > 1e-5 * fabs(trained))
        FAIL("served loss %.9g, trained %.9g", served, trained);
    printf("  served   %.2e of the trained loss\n", fabs(served - trained) / fabs(trained));
    ad_adapter_unref(a);
    ad_rm_rf(dir);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: test-train CASE_DIR\n");
        return 2;
    }
    case_dir = argv[1];
    char path[4200];
    struct ad_err err;
    json_error_t jerr;
    snprintf(path, sizeof(path), "%s/case.json", case_dir);
    json_t *c = json_load_file(path, 0, &jerr);
    if (!c)
        die(jerr.text, NULL);
    snprintf(path, sizeof(path), "%s/model", case_dir);
    struct ad_model *m;
    if (ad_model_load(path, &m, &err) < 0)
        die("model", &err);
    bool full = !strcmp(json_string_value(json_object_get(c, "kind")), "FULL");
    char *cfg = full ? NULL : read_text("adapter_config.json");
    if (!full && !cfg)
        die("adapter_config.json", NULL);
    struct ad_dataset *d = dataset_of(json_object_get(c, "batch"));
    double grad_tol = json_number_value(json_object_get(c, "grad_tol"));
    double param_tol = json_number_value(json_object_get(c, "param_tol"));
    printf("%s\n", case_dir);

    /* the parameters, and their gradients at the initial values */
    struct ad_train_opts o;
    ad_train_opts_default(&o);
    o.batch_size = (int)d->n;
    o.n_epochs = 1;
    o.threads = 2;
    o.max_grad_norm = 0;
    o.optimizer = AD_OPT_SGD;
    o.lr = json_number_value(json_object_get(json_object_get(c, "sgd"), "lr"));
    o.schedule = AD_SCHED_CONSTANT;
    struct ad_trainer *t = trainer_for(m, cfg, d, &o);
    int n;
    const struct ad_param *p = ad_trainer_params(t, &n);
    json_t *want = json_object_get(c, "params");
    if ((size_t)n != json_array_size(want))
        FAIL("%d parameters, the reference trains %zu", n, json_array_size(want));
    for (int i = 0; i < n && (size_t)i < json_array_size(want); i++) {
        json_t *w = json_array_get(want, (size_t)i);
        const char *name = json_string_value(json_object_get(w, "name"));
        json_t *shape = json_object_get(w, "shape");
        size_t count = 1;
        for (size_t k = 0; k < json_array_size(shape); k++)
            count *= (size_t)json_integer_value(json_array_get(shape, k));
        if (strcmp(name, p[i].name) || count != p[i].n)
            FAIL("parameter %d: '%s' of %zu values, the reference's is '%s' of %zu", i,
                 p[i].name, p[i].n, name, count);
        if (json_is_true(json_object_get(w, "no_decay")) == p[i].decay)
            FAIL("'%s': weight decay %s, the reference's %s", p[i].name, p[i].decay ? "on" : "off",
                 p[i].decay ? "off" : "on");
        if (json_is_true(json_object_get(w, "maskable")) != p[i].maskable)
            FAIL("'%s': maskable %d, the reference's not", p[i].name, p[i].maskable);
    }
    /* one SGD step with its gradients kept: the gradients, then the parameters */
    run_steps(t, 1);
    struct ad_train_progress pr;
    ad_trainer_progress(t, &pr);
    double loss = json_number_value(json_object_get(c, "loss"));
    double n_targets = (double)json_integer_value(json_object_get(c, "n_targets"));
    if (fabs(pr.loss - loss / n_targets) > 1e-5 * fabs(loss / n_targets))
        FAIL("loss %.9g, autograd's %.9g", pr.loss, loss / n_targets);
    struct ad_st_file *ref = open_st("grads.safetensors");
    compare(p, n, true, ref, grad_tol, "grads");
    ad_st_close(ref);
    ref = open_st("sgd1.safetensors");
    compare(p, n, false, ref, param_tol, "sgd1");
    ad_st_close(ref);
    ad_trainer_free(t);

    /* five AdamW steps; then what is saved is served: the trained loss through serving's
     * forward pass with the saved adapter (full fine-tuning: as an adapter that replaces every
     * weight, GPT-2's Conv1D ones too) */
    json_t *aw = json_object_get(c, "adamw");
    ad_train_opts_default(&o);
    o.batch_size = (int)d->n;
    o.threads = 2;
    o.n_epochs = (int)json_integer_value(json_object_get(aw, "total_steps"));
    o.lr = json_number_value(json_object_get(aw, "lr"));
    o.beta1 = json_number_value(json_array_get(json_object_get(aw, "betas"), 0));
    o.beta2 = json_number_value(json_array_get(json_object_get(aw, "betas"), 1));
    o.eps = json_number_value(json_object_get(aw, "eps"));
    o.weight_decay = json_number_value(json_object_get(aw, "weight_decay"));
    o.warmup_steps = (int)json_integer_value(json_object_get(aw, "warmup_steps"));
    o.max_grad_norm = json_number_value(json_object_get(aw, "max_grad_norm"));
    o.schedule = AD_SCHED_COSINE;
    int steps = (int)json_integer_value(json_object_get(aw, "steps"));
    o.full_as_adapter = true;
    t = trainer_for(m, cfg, d, &o);
    p = ad_trainer_params(t, &n);
    run_steps(t, steps);
    ref = open_st("adamw5.safetensors");
    compare(p, n, false, ref, param_tol, "adamw5");
    ad_st_close(ref);
    check_served(m, t, d);
    ad_trainer_free(t);

    /* child-tuning */
    json_t *ch = json_object_get(c, "child");
    if (ch) {
        bool D = !strcmp(json_string_value(json_object_get(ch, "mode")), "D");
        o.child = D ? AD_CHILD_D : AD_CHILD_F;
        o.reserve_p = json_number_value(json_object_get(ch, "reserve_p"));
        o.seed = (uint64_t)json_integer_value(json_object_get(ch, "seed"));
        o.max_grad_norm = json_number_value(json_object_get(ch, "max_grad_norm"));
        t = trainer_for(m, cfg, d, &o);
        p = ad_trainer_params(t, &n);
        if (D) {
            json_t *fb = json_object_get(ch, "fisher_batches");
            struct ad_dataset *all = calloc(1, sizeof(*all));
            int per = 0;
            for (size_t b = 0; b < json_array_size(fb); b++) { /* the batches, one after another */
                struct ad_dataset *one = dataset_of(json_array_get(fb, b));
                per = (int)one->n;
                all->ex = realloc(all->ex, (all->n + one->n) * sizeof(*all->ex));
                memcpy(all->ex + all->n, one->ex, one->n * sizeof(*one->ex));
                all->n += one->n;
                free(one->ex);
                free(one);
            }
            if (ad_trainer_fisher(t, all, per, &err) < 0)
                die("fisher", &err);
            ref = open_st("mask.safetensors");
            const uint8_t *mask = ad_trainer_mask(t);
            size_t off = 0, wrong = 0, total = 0;
            for (int i = 0; i < n; off += p[i].n, i++) {
                const struct ad_tensor *x = ad_st_find(ref, p[i].name);
                if (!p[i].maskable)
                    continue;
                if (!x || x->n_elems != (int64_t)p[i].n) {
                    FAIL("mask: no reference tensor '%s'", p[i].name);
                    continue;
                }
                for (size_t k = 0; k < p[i].n; k++)
                    wrong += mask[off + k] != ((const uint8_t *)x->data)[k];
                total += p[i].n;
            }
            if (wrong)
                FAIL("mask: %zu of %zu elements differ from the reference's", wrong, total);
            printf("  mask     %zu of %zu elements kept the same\n", total - wrong, total);
            ad_st_close(ref);
            free_dataset(all);
        }
        run_steps(t, steps);
        ref = open_st("child5.safetensors");
        compare(p, n, false, ref, param_tol, "child5");
        ad_st_close(ref);
        ad_trainer_free(t);
    }
    free_dataset(d);
    free(cfg);
    ad_model_free(m);
    json_decref(c);
    return failures ? 1 : 0;
}

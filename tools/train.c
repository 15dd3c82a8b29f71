/* adapterd-train: fine-tunes an adapter (or the whole model) from the command line, with the
 * daemon's trainer (include/adapterd/train.h).
 *
 *   adapterd-train --model DIR --data train.jsonl [--eval val.jsonl]
 *                  (--config adapter_config.json | --full) --out OUT [hyperparameters]
 *
 * OUT (new, or empty) receives what serving loads: a PEFT (or AdapterHub) directory, a Hugging
 * Face model directory for --full, a sparse-delta adapter for --full with --child. Checkpoints
 * go to OUT/checkpoint-STEP (--checkpoint-every, and at Ctrl-C); --resume CKPT continues one
 * exactly. On a terminal a progress bar (step, loss, tokens/s, ETA) updates in place; otherwise
 * a line per --log-every steps. Exit status 0 when trained, 1 on an error, 2 for a bad command
 * line, 130 after Ctrl-C (the checkpoint written). */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adapterd/blas.h"
#include "adapterd/model.h"
#include "adapterd/tokenizer.h"
#include "adapterd/train.h"
#include "adapterd/util.h"

#define PROG "adapterd-train"

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: " PROG " --model DIR --data TRAIN.jsonl (--config ADAPTER_CONFIG.json | --full)\n"
            "                      --out OUT [options]\n"
            "\n"
            "Data: JSONL lines {\"prompt\", \"completion\"}, {\"messages\": [...]} (the model's chat\n"
            "template; loss on assistant turns) or {\"text\"}.\n"
            "  --eval FILE             validation data (its loss is reported)\n"
            "  --max-seq-len N         cut examples to N tokens (default 1024)\n"
            "  --packing               concatenate examples into sequences of max-seq-len\n"
            "What to train:\n"
            "  --config FILE           a PEFT adapter_config.json (LORA, IA3, PREFIX_TUNING,\n"
            "                          PROMPT_TUNING, BITFIT) or an AdapterHub bottleneck config\n"
            "  --full                  every weight of the model (OUT is a model directory)\n"
            "  --as-adapter            with --full: OUT is an adapter replacing every weight\n"
            "                          (served over the base, as the daemon's full jobs are)\n"
            "  --init-from DIR         start from an existing adapter's tensors\n"
            "  --child F|D             child-tuning (with --reserve-p, default 0.3)\n"
            "Hyperparameters (defaults as Hugging Face's Trainer where it has one):\n"
            "  --epochs N (1)  --batch-size N (8)  --grad-accum N (1)\n"
            "  --lr X (2e-4; 1e-5 with --full)  --weight-decay X (0)  --max-grad-norm X (1)\n"
            "  --warmup-steps N | --warmup-ratio X (0)  --schedule cosine|linear|constant\n"
            "  --optimizer adamw|sgd  --beta1 X (0.9)  --beta2 X (0.999)  --eps X (1e-8)\n"
            "  --seed N (42)  --threads N (0: every core)  --activation-mb N (512)\n"
            "  --save-bf16             save --full models in bf16 (else f32)\n"
            "Progress and checkpoints:\n"
            "  --eval-every N          steps between evaluations (0: each epoch)\n"
            "  --checkpoint-every N    steps between checkpoints in OUT/checkpoint-STEP (0: none)\n"
            "  --resume CKPT           continue from a checkpoint of the same run\n"
            "  --log-every N           steps between progress lines when not on a terminal (1)\n"
            "  --quiet                 no progress\n");
}

struct cli {
    const char *model, *data, *eval, *config, *out, *init_from, *resume;
    bool full, packing, quiet;
    int max_seq_len, checkpoint_every, log_every;
    struct ad_train_opts o;
};

static double number(const char *name, const char *v, double lo, double hi)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || !(x >= lo && x <= hi)) {
        fprintf(stderr, PROG ": --%s: '%s' is not a number in [%g, %g]\n", name, v, lo, hi);
        exit(2);
    }
    return x;
}

static int parse(int argc, char **argv, struct cli *c)
{
    enum { O_EVAL = 256, O_FULL, O_INIT, O_CHILD, O_RESERVE, O_EPOCHS, O_BATCH, O_ACCUM, O_LR,
           O_WD, O_CLIP, O_WSTEPS, O_WRATIO, O_SCHED, O_OPTIM, O_B1, O_B2, O_EPS, O_SEED,
           O_THREADS, O_ACT, O_BF16, O_EVERY, O_CKPT, O_RESUME, O_LOG, O_QUIET, O_LEN, O_PACK, O_ASAD };
    static const struct option opts[] = {
        {"model", 1, 0, 'm'}, {"data", 1, 0, 'd'}, {"config", 1, 0, 'c'}, {"out", 1, 0, 'o'},
        {"eval", 1, 0, O_EVAL}, {"full", 0, 0, O_FULL}, {"init-from", 1, 0, O_INIT},
        {"child", 1, 0, O_CHILD}, {"reserve-p", 1, 0, O_RESERVE}, {"epochs", 1, 0, O_EPOCHS},
        {"batch-size", 1, 0, O_BATCH}, {"grad-accum", 1, 0, O_ACCUM}, {"lr", 1, 0, O_LR},
        {"weight-decay", 1, 0, O_WD}, {"max-grad-norm", 1, 0, O_CLIP},
        {"warmup-steps", 1, 0, O_WSTEPS}, {"warmup-ratio", 1, 0, O_WRATIO},
        {"schedule", 1, 0, O_SCHED}, {"optimizer", 1, 0, O_OPTIM}, {"beta1", 1, 0, O_B1},
        {"beta2", 1, 0, O_B2}, {"eps", 1, 0, O_EPS}, {"seed", 1, 0, O_SEED},
        {"threads", 1, 0, O_THREADS}, {"activation-mb", 1, 0, O_ACT},
        {"save-bf16", 0, 0, O_BF16}, {"eval-every", 1, 0, O_EVERY},
        {"checkpoint-every", 1, 0, O_CKPT}, {"resume", 1, 0, O_RESUME},
        {"log-every", 1, 0, O_LOG}, {"quiet", 0, 0, O_QUIET}, {"max-seq-len", 1, 0, O_LEN},
        {"packing", 0, 0, O_PACK}, {"as-adapter", 0, 0, O_ASAD}, {"help", 0, 0, 'h'},
        {0, 0, 0, 0},
    };
    bool lr_given = false;
    int ch;
    ad_train_opts_default(&c->o);
    c->max_seq_len = 1024;
    c->log_every = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'm': c->model = optarg; break;
        case 'd': c->data = optarg; break;
        case 'c': c->config = optarg; break;
        case 'o': c->out = optarg; break;
        case O_EVAL: c->eval = optarg; break;
        case O_FULL: c->full = true; break;
        case O_INIT: c->init_from = optarg; break;
        case O_CHILD:
            if (strcmp(optarg, "F") && strcmp(optarg, "D")) {
                fprintf(stderr, PROG ": --child is F or D\n");
                return -1;
            }
            c->o.child = optarg[0] == 'F' ? AD_CHILD_F : AD_CHILD_D;
            break;
        case O_RESERVE: c->o.reserve_p = number("reserve-p", optarg, 1e-6, 1); break;
        case O_EPOCHS: c->o.n_epochs = (int)number("epochs", optarg, 1, 1e6); break;
        case O_BATCH: c->o.batch_size = (int)number("batch-size", optarg, 1, 4096); break;
        case O_ACCUM: c->o.grad_accum = (int)number("grad-accum", optarg, 1, 4096); break;
        case O_LR: c->o.lr = number("lr", optarg, 1e-12, 10); lr_given = true; break;
        case O_WD: c->o.weight_decay = number("weight-decay", optarg, 0, 10); break;
        case O_CLIP: c->o.max_grad_norm = number("max-grad-norm", optarg, 0, 1e9); break;
        case O_WSTEPS: c->o.warmup_steps = (int)number("warmup-steps", optarg, 0, 1e9); break;
        case O_WRATIO: c->o.warmup_ratio = number("warmup-ratio", optarg, 0, 0.999); break;
        case O_SCHED:
            if (!strcmp(optarg, "cosine"))
                c->o.schedule = AD_SCHED_COSINE;
            else if (!strcmp(optarg, "linear"))
                c->o.schedule = AD_SCHED_LINEAR;
            else if (!strcmp(optarg, "constant"))
                c->o.schedule = AD_SCHED_CONSTANT;
            else {
                fprintf(stderr, PROG ": --schedule is cosine, linear or constant\n");
                return -1;
            }
            break;
        case O_OPTIM:
            if (strcmp(optarg, "adamw") && strcmp(optarg, "sgd")) {
                fprintf(stderr, PROG ": --optimizer is adamw or sgd\n");
                return -1;
            }
            c->o.optimizer = optarg[0] == 'a' ? AD_OPT_ADAMW : AD_OPT_SGD;
            break;
        case O_B1: c->o.beta1 = number("beta1", optarg, 0, 0.999999); break;
        case O_B2: c->o.beta2 = number("beta2", optarg, 0, 0.999999); break;
        case O_EPS: c->o.eps = number("eps", optarg, 1e-30, 1); break;
        case O_SEED: c->o.seed = (uint64_t)number("seed", optarg, 0, 9e15); break;
        case O_THREADS: c->o.threads = (int)number("threads", optarg, 0, 256); break;
        case O_ACT:
            c->o.activation_bytes = (size_t)number("activation-mb", optarg, 1, 1 << 20) << 20;
            break;
        case O_BF16: c->o.save_bf16 = true; break;
        case O_EVERY: c->o.eval_every = (int)number("eval-every", optarg, 0, 1e9); break;
        case O_CKPT: c->checkpoint_every = (int)number("checkpoint-every", optarg, 0, 1e9); break;
        case O_RESUME: c->resume = optarg; break;
        case O_LOG: c->log_every = (int)number("log-every", optarg, 1, 1e9); break;
        case O_QUIET: c->quiet = true; break;
        case O_LEN: c->max_seq_len = (int)number("max-seq-len", optarg, 2, 1 << 20); break;
        case O_PACK: c->packing = true; break;
        case O_ASAD: c->o.full_as_adapter = true; break;
        case 'h': usage(stdout); exit(0);
        default: return -1;
        }
    }
    if (optind != argc || !c->model || !c->data || !c->out || c->full == (c->config != NULL)) {
        fprintf(stderr, PROG ": --model, --data, --out and one of --config or --full are "
                "needed\n");
        return -1;
    }
    if (c->o.full_as_adapter && !c->full) {
        fprintf(stderr, PROG ": --as-adapter goes with --full\n");
        return -1;
    }
    if (c->full && !lr_given)
        c->o.lr = 1e-5;
    return 0;
}

/* OUT: created, or an existing empty directory. */
static int make_out(const char *dir)
{
    if (mkdir(dir, 0755) == 0)
        return 0;
    if (errno != EEXIST)
        return -errno;
    struct stat st;
    if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
        return -ENOTDIR;
    return 0;
}

static void fmt_time(double s, char *buf, size_t n)
{
    if (!(s >= 0) || s > 1e7)
        snprintf(buf, n, "--:--");
    else if (s >= 3600)
        snprintf(buf, n, "%d:%02d:%02d", (int)s / 3600, (int)s / 60 % 60, (int)s % 60);
    else
        snprintf(buf, n, "%d:%02d", (int)s / 60, (int)s % 60);
}

static void show(const struct cli *c, const struct ad_train_progress *p, bool tty, bool last)
{
    if (c->quiet)
        return;
    double tps = p->seconds > 0 ? (double)p->tokens / p->seconds : 0;
    double eta = p->step ? p->seconds / (double)p->step * (double)(p->total_steps - p->step) : -1;
    char e[32], vl[32] = "";
    fmt_time(eta, e, sizeof(e));
    if (!isnan(p->valid_loss))
        snprintf(vl, sizeof(vl), " eval %.4f", p->valid_loss);
    if (tty) {
        int width = 24, done = p->total_steps ? (int)(width * p->step / p->total_steps) : width;
        char bar[32];
        for (int i = 0; i < width; i++)
            bar[i] = i < done ? '#' : '.';
        bar[width] = '\0';
        fprintf(stderr, "\r[%s] step %lld/%lld loss %.4f%s lr %.2e %.0f tok/s ETA %s   ", bar,
                (long long)p->step, (long long)p->total_steps, p->loss, vl, p->lr, tps, e);
        if (last)
            fputc('\n', stderr);
    } else if (last || p->step % c->log_every == 0) {
        fprintf(stderr, "step %lld/%lld epoch %d loss %.4f%s lr %.3e grad_norm %.3f tokens/s %.0f "
                "eta %s\n", (long long)p->step, (long long)p->total_steps, p->epoch + 1, p->loss,
                vl, p->lr, p->grad_norm, tps, e);
    }
    fflush(stderr);
}

static int checkpoint(struct ad_trainer *t, const char *out, int64_t step, struct ad_err *err)
{
    char dir[4200];
    snprintf(dir, sizeof(dir), "%s/checkpoint-%lld", out, (long long)step);
    ad_rm_rf(dir); /* a checkpoint of this step from an earlier run */
    if (mkdir(dir, 0755) < 0)
        return ad_err_set(err, -errno, "%s: %s", dir, strerror(errno));
    return ad_trainer_checkpoint(t, dir, err);
}

int main(int argc, char **argv)
{
    struct ad_blas_choice blas;
    ad_blas_startup(argv, &blas);
    struct cli c = {0};
    if (parse(argc, argv, &c) < 0) {
        usage(stderr);
        return 2;
    }
    if (blas.warn)
        fprintf(stderr, PROG ": BLAS: %s\n", blas.msg);

    struct ad_err err;
    struct ad_model *m = NULL;
    struct ad_tokenizer *tok = NULL;
    struct ad_dataset *train = NULL, *valid = NULL;
    struct ad_trainer *t = NULL;
    char *config = NULL;
    int32_t *init_ids = NULL;
    size_t n_init = 0;
    int rc = 1, r;

    if ((r = ad_model_load(c.model, &m, &err)) < 0 ||
        (r = ad_tokenizer_load(c.model, &tok, &err)) < 0)
        goto fail;
    struct ad_data_opts dopt = {.max_seq_len = c.max_seq_len, .packing = c.packing};
    if ((r = ad_dataset_load(c.data, tok, &dopt, &train, &err)) < 0) {
        ad_err_prefix(&err, "%s", c.data);
        goto fail;
    }
    if (c.eval && (r = ad_dataset_load(c.eval, tok, &dopt, &valid, &err)) < 0) {
        ad_err_prefix(&err, "%s", c.eval);
        goto fail;
    }
    if (c.config) {
        if ((r = ad_read_file(c.config, 1 << 20, &config, NULL, &err)) < 0)
            goto fail;
        /* prompt tuning's TEXT init: the text's tokens (PEFT: the tokenizer's defaults) */
        json_t *cj = json_loads(config, 0, NULL);
        const char *init = json_string_value(json_object_get(cj, "prompt_tuning_init"));
        json_t *text = json_object_get(cj, "prompt_tuning_init_text");
        if (init && !strcmp(init, "TEXT") && json_is_string(text))
            r = ad_tokenizer_encode(tok, json_string_value(text), json_string_length(text), true,
                                    &init_ids, &n_init, &err);
        json_decref(cj);
        if (r < 0)
            goto fail;
    }
    c.o.adapter_config = config;
    c.o.base_dir = c.model;
    c.o.init_ids = init_ids;
    c.o.n_init_ids = (int)n_init;
    if ((r = ad_trainer_new(m, &c.o, train, valid, &t, &err)) < 0)
        goto fail;
    if (c.init_from && (r = ad_trainer_init_from(t, c.init_from, &err)) < 0)
        goto fail;
    if (c.resume && (r = ad_trainer_resume(t, c.resume, &err)) < 0) {
        ad_err_prefix(&err, "%s", c.resume);
        goto fail;
    }
    if ((r = make_out(c.out)) < 0) {
        ad_err_set(&err, r, "%s: %s", c.out, strerror(-r));
        goto fail;
    }
    if (!c.quiet)
        fprintf(stderr, PROG ": %zu examples (%zu tokens, %zu cut at %d), %s\n", train->n,
                train->n_tokens, train->n_truncated, c.max_seq_len,
                c.full ? "full fine-tuning" : "adapter");

    struct sigaction sa = {.sa_handler = on_sigint};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    bool tty = isatty(2);
    struct ad_train_progress p;
    ad_trainer_progress(t, &p);
    while ((r = ad_trainer_step(t, &p, &err)) == 0) {
        show(&c, &p, tty, false);
        if (c.checkpoint_every && p.step % c.checkpoint_every == 0 &&
            (r = checkpoint(t, c.out, p.step, &err)) < 0)
            goto fail;
        if (interrupted)
            break;
    }
    if (r < 0)
        goto fail;
    show(&c, &p, tty, true);
    if (interrupted) {
        if ((r = checkpoint(t, c.out, p.step, &err)) < 0)
            goto fail;
        fprintf(stderr, PROG ": interrupted at step %lld; checkpoint in %s/checkpoint-%lld "
                "(--resume it)\n", (long long)p.step, c.out, (long long)p.step);
        rc = 130;
        goto out;
    }
    if ((r = ad_trainer_save(t, c.out, &err)) < 0)
        goto fail;
    if (!c.quiet)
        fprintf(stderr, PROG ": trained %lld steps, loss %.4f%s; saved in %s\n",
                (long long)p.step, p.loss, isnan(p.valid_loss) ? "" : " (eval below)", c.out);
    if (valid && !c.quiet)
        fprintf(stderr, PROG ": eval loss %.4f\n", p.valid_loss);
    rc = 0;
    goto out;
fail:
    fprintf(stderr, PROG ": %s\n", err.msg);
    rc = 1;
out:
    ad_trainer_free(t);
    ad_dataset_free(train);
    ad_dataset_free(valid);
    ad_tokenizer_free(tok);
    ad_model_free(m);
    free(config);
    free(init_ids);
    return rc;
}

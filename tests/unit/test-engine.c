/* The engine: a request's tokens equal a plain greedy decode through ad_model_forward; requests
 * of different adapters running together get exactly what each gets alone (batch invariance);
 * preemption under a small KV pool changes nothing and leaks no block; a prefix-tuning adapter's
 * K/V takes no block; the prefix cache finds what an earlier request of the same adapters
 * computed and changes no token; cancel, queue and context limits. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "../check.h"
#include "../tiny.h"
#include "adapterd/adapter.h"
#include "adapterd/engine.h"
#include "adapterd/util.h"

#define MAXT 64

static atomic_int done_order;     /* completion order across requests */
static struct ad_engine *observed; /* engine whose running count the callback records */
static atomic_int max_running;

struct result {
    int order; /* when it finished: 1 for the first */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool done;
    enum ad_finish finish;
    int n;
    int32_t tok[MAXT];
    float lp[MAXT];
    int n_prompt_events;
    int n_cached; /* prompt tokens from the prefix cache (done event) */
};

static void on_event(struct ad_request *req, const struct ad_event *ev, void *ud)
{
    struct result *res = ud;
    (void)req;
    if (observed) { /* callbacks run on the engine thread, outside its lock */
        struct ad_engine_stats st;
        ad_engine_stats(observed, &st);
        int m = atomic_load(&max_running);
        while (st.running > m && !atomic_compare_exchange_weak(&max_running, &m, st.running))
            ;
    }
    pthread_mutex_lock(&res->lock);
    if (ev->done) {
        res->order = atomic_fetch_add(&done_order, 1) + 1;
        res->done = true;
        res->finish = ev->finish;
        res->n_cached = ev->n_cached_tokens;
        pthread_cond_signal(&res->cond);
    } else if (ev->is_prompt) {
        res->n_prompt_events++;
    } else if (res->n < MAXT) {
        res->tok[res->n] = ev->token;
        res->lp[res->n++] = ev->logprob;
    }
    pthread_mutex_unlock(&res->lock);
}

static void wait_done(struct result *res)
{
    pthread_mutex_lock(&res->lock);
    while (!res->done)
        pthread_cond_wait(&res->cond, &res->lock);
    pthread_mutex_unlock(&res->lock);
}

static void init_result(struct result *res)
{
    memset(res, 0, sizeof(*res));
    pthread_mutex_init(&res->lock, NULL);
    pthread_cond_init(&res->cond, NULL);
}

static const int32_t prompts[6][7] = {
    {1, 2, 3}, {5, 9, 11, 13, 2, 7, 1}, {39}, {4, 4, 4, 4}, {17, 3, 8, 30, 22}, {6, 0},
};
static const int prompt_len[6] = {3, 7, 1, 4, 5, 2};

static struct ad_request_params params(int i, struct ad_adapter *a, int max_tokens)
{
    struct ad_request_params p = {
        .prompt = prompts[i], .n_prompt = prompt_len[i], .max_tokens = max_tokens,
        .ignore_eos = true, .temperature = 0, .top_p = 1, .n_logprobs = 0,
    };
    if (a) {
        p.mix.n = 1;
        p.mix.a[0] = ad_adapter_ref(a);
        p.mix.w[0] = 1.0f;
    }
    return p;
}

/* Greedy decode of a prompt by hand: one sequence, no engine. */
static void plain_greedy(const struct ad_model *m, const int32_t *prompt, int n_prompt,
                         struct ad_adapter *a, int n, int32_t *out)
{
    struct ad_kv kv;
    struct ad_kv_seq seq = {0};
    struct ad_scratch *s = ad_scratch_new();
    struct ad_mix mix = {.n = 1, .a = {a}, .w = {1.0f}};
    float logits[40];
    float work[80];
    struct ad_err err;
    struct ad_sampler greedy;

    ad_sampler_init(&greedy, 0, 0, 1, 0);
    CHECK_INT(ad_kv_init(&kv, &m->cfg, 64, 4), ==, 0);
    struct ad_chunk ch = {.seq = &seq, .tokens = prompt, .n_tokens = n_prompt,
                          .ctx = a ? &mix : NULL};
    for (int t = 0; t < n; t++) {
        CHECK_INT(ad_model_forward(m, &kv, &ch, 1, &ad_mix_hooks, s, logits, &err), ==, 0);
        out[t] = ad_sampler_sample(&greedy, logits, 40, work);
        ch.tokens = &out[t];
        ch.n_tokens = 1;
    }
    ad_kv_seq_release(&kv, &seq);
    ad_kv_fini(&kv);
    ad_scratch_free(s);
}

static void run_all(const struct ad_model *m, const struct ad_engine_config *cfg,
                    struct ad_adapter **adapters, int n_tok, struct result *res,
                    struct ad_engine_stats *stats)
{
    struct ad_engine *e;
    struct ad_request *req[6];
    struct ad_err err;

    CHECK_INT(ad_engine_new(m, cfg, &e, &err), ==, 0);
    for (int i = 0; i < 6; i++) {
        init_result(&res[i]);
        struct ad_request_params p = params(i, adapters[i % 3], n_tok);
        CHECK_INT(ad_engine_submit(e, &p, on_event, &res[i], &req[i], &err), ==, 0);
    }
    for (int i = 0; i < 6; i++) {
        wait_done(&res[i]);
        ad_request_unref(req[i]);
    }
    ad_engine_stats(e, stats);
    ad_engine_free(e);
}

/* The six requests of run_all gave the tokens they gave before, logprobs within 1e-4. */
static void check_same(const struct result *got, const struct result *want, int n_tok)
{
    for (int i = 0; i < 6; i++) {
        CHECK_INT(got[i].n, ==, n_tok);
        for (int t = 0; t < n_tok; t++) {
            CHECK_INT(got[i].tok[t], ==, want[i].tok[t]);
            CHECK_NEAR(got[i].lp[t], want[i].lp[t], 1e-4);
        }
    }
}

/* One request on its own: submitted, waited for. */
static void run_one(struct ad_engine *e, const int32_t *prompt, int n_prompt,
                    struct ad_adapter *a, int n_tok, struct result *res)
{
    struct ad_request *r;
    struct ad_err err;
    struct ad_request_params p = params(0, a, n_tok);
    p.prompt = prompt;
    p.n_prompt = n_prompt;
    init_result(res);
    CHECK_INT(ad_engine_submit(e, &p, on_event, res, &r, &err), ==, 0);
    wait_done(res);
    ad_request_unref(r);
}

/* Prefix caching: requests that start with the same 10 tokens, each after another of the same
 * adapters, compute only what was not cached (2 whole blocks of 4 are found) and decode exactly
 * what they decode alone; another adapter, or a new version of the same one, finds nothing. */
static void test_prefix_cache(const struct ad_model *m, const struct ad_engine_config *base_cfg,
                              struct ad_adapter *lora, const char *lora_dir,
                              struct ad_adapter *prefix)
{
    static const int32_t sys[10] = {3, 14, 15, 9, 26, 5, 35, 8, 9, 7};
    static const int32_t tail[3][3] = {{1, 2, 0}, {33, 0, 0}, {7, 7, 7}};
    static const int tail_len[3] = {2, 1, 3};
    struct ad_engine_config cfg = *base_cfg;
    struct ad_engine *e;
    struct ad_engine_stats st;
    struct ad_adapter *lora_v2, *who[3] = {NULL, lora, prefix};
    struct result res;
    struct ad_err err;
    int32_t prompt[13];
    long hits = 0;
    const int n_tok = 6;

    cfg.prefix_cache = true;
    CHECK_INT(ad_engine_new(m, &cfg, &e, &err), ==, 0);
    memcpy(prompt, sys, sizeof(sys));
    for (int k = 0; k < 3; k++)
        for (int t = 0; t < 3; t++) {
            int32_t want[MAXT], ref_prompt[16 + 13];
            int n = 10 + tail_len[t];
            memcpy(prompt + 10, tail[t], (size_t)tail_len[t] * sizeof(int32_t));
            run_one(e, prompt, n, who[k], n_tok, &res);
            if (k == 2) { /* the prefix adapter decodes as the base after its real tokens */
                for (int i = 0; i < 16; i++)
                    ref_prompt[i] = (i * 7 + 3) % 40;
                memcpy(ref_prompt + 16, prompt, (size_t)n * sizeof(int32_t));
                plain_greedy(m, ref_prompt, 16 + n, NULL, n_tok, want);
            } else {
                plain_greedy(m, prompt, n, who[k], n_tok, want);
            }
            CHECK_INT(res.n, ==, n_tok);
            for (int i = 0; i < n_tok; i++)
                CHECK_INT(res.tok[i], ==, want[i]);
            /* the first of each adapter finds nothing (the others' K/V differ), the next two
             * find the 2 whole blocks of the shared start */
            CHECK_INT(res.n_cached, ==, t == 0 ? 0 : 8);
            hits += res.n_cached;
        }

    /* the same files loaded again: a new version, nothing of the old one's is found */
    CHECK_INT(ad_adapter_load(m, lora_dir, "lora1", 0, &lora_v2, &err), ==, 0);
    run_one(e, prompt, 13, lora_v2, n_tok, &res);
    CHECK_INT(res.n_cached, ==, 0);
    /* the old version still finds its own: all 3 whole blocks of this prompt (its tokens up to
     * the last one) were published by the request of lora with this prompt */
    run_one(e, prompt, 13, lora, n_tok, &res);
    CHECK_INT(res.n_cached, ==, 12);
    hits += 12;

    ad_engine_stats(e, &st);
    CHECK_INT(st.prefix_hits, ==, hits);
    CHECK(st.kv_blocks_cached > 0);
    CHECK_INT(st.kv_blocks_free, ==, cfg.kv_blocks);
    ad_engine_free(e);
    ad_adapter_unref(lora_v2);
}

int main(void)
{
    char mdir[64], p[256];
    struct ad_model *m = tiny_model(mdir);
    struct ad_adapter *adapters[3] = {NULL};
    struct ad_engine_config cfg = {.kv_blocks = 256, .kv_block_size = 4, .max_batch_tokens = 64,
                                   .max_seqs = 8, .max_queue = 16};
    struct ad_err err;
    struct result res[6], res2[6];
    struct ad_engine_stats st;
    const int n_tok = 12;

    snprintf(p, sizeof(p), "%s/lora1", mdir);
    tiny_lora(p, 2, 0.3f);
    CHECK_INT(ad_adapter_load(m, p, "lora1", 0, &adapters[1], &err), ==, 0);
    snprintf(p, sizeof(p), "%s/lora2", mdir);
    tiny_lora(p, 4, -0.2f);
    CHECK_INT(ad_adapter_load(m, p, "lora2", 0, &adapters[2], &err), ==, 0);

    /* all six together (base, lora1, lora2 interleaved) vs each decoded alone by hand */
    run_all(m, &cfg, adapters, n_tok, res, &st);
    int differs = 0;
    for (int i = 0; i < 6; i++) {
        int32_t want[MAXT];
        plain_greedy(m, prompts[i], prompt_len[i], adapters[i % 3], n_tok, want);
        CHECK_INT(res[i].finish, ==, AD_FINISH_LENGTH);
        CHECK_INT(res[i].n, ==, n_tok);
        for (int t = 0; t < n_tok; t++)
            CHECK_INT(res[i].tok[t], ==, want[t]);
        if (i >= 3) { /* same prompt family, different adapter: outputs really differ */
            for (int t = 0; t < n_tok; t++)
                differs += res[i].tok[t] != res[i - 3].tok[t];
        }
    }
    CHECK(differs > 0);
    CHECK_INT(st.kv_blocks_free, ==, cfg.kv_blocks);

    /* a pool too small for all at once: preemption and recompute, same tokens, no leak */
    struct ad_engine_config small = cfg;
    small.kv_blocks = 14;
    small.max_batch_tokens = 5; /* chunked prefill too */
    run_all(m, &small, adapters, n_tok, res2, &st);
    check_same(res2, res, n_tok);
    CHECK(st.preemptions > 0);
    CHECK_INT(st.kv_blocks_free, ==, small.kv_blocks);
    printf("engine: %llu preemptions with a %d-block pool\n", (unsigned long long)st.preemptions,
           small.kv_blocks);

    /* the same two runs with the prefix cache: a recomputed request finds what it had
     * published, and nothing changes either */
    for (int pass = 0; pass < 2; pass++) {
        struct ad_engine_config pcfg = pass ? small : cfg;
        pcfg.prefix_cache = true;
        run_all(m, &pcfg, adapters, n_tok, res2, &st);
        check_same(res2, res, n_tok);
        CHECK_INT(st.kv_blocks_free, ==, pcfg.kv_blocks);
        if (pass)
            printf("engine: with the prefix cache, %llu preemptions, %llu of %llu tokens found "
                   "at admission\n", (unsigned long long)st.preemptions,
                   (unsigned long long)st.prefix_hits, (unsigned long long)st.prefix_queries);
    }

    /* prefix tuning: the 16 virtual K/V take no KV block, so requests of 11 and 12 tokens fit a
     * 5-block pool (with the prefix cached they needed 7 blocks each and were refused); run
     * together they need 6 blocks, so one is preempted and recomputed. Both decode what the base
     * does after the prefix's real tokens (tiny_prefix), and every block comes back. */
    {
        struct ad_adapter *pa;
        struct ad_engine *pe;
        struct ad_request *pr[2];
        struct result pres[2];
        struct ad_engine_config pc = cfg;
        int32_t pre[16 + 7];
        pc.kv_blocks = 5;
        for (int i = 0; i < 16; i++)
            pre[i] = (i * 7 + 3) % 40;
        snprintf(p, sizeof(p), "%s/prefix", mdir);
        tiny_prefix(m, p, pre, 16);
        CHECK_INT(ad_adapter_load(m, p, "prefix", 0, &pa, &err), ==, 0);
        CHECK_INT(ad_engine_new(m, &pc, &pe, &err), ==, 0);
        for (int i = 0; i < 2; i++) {
            init_result(&pres[i]);
            struct ad_request_params pp = params(3 * i, pa, 8);
            CHECK_INT(ad_engine_submit(pe, &pp, on_event, &pres[i], &pr[i], &err), ==, 0);
        }
        for (int i = 0; i < 2; i++) {
            int32_t want[8];
            wait_done(&pres[i]);
            ad_request_unref(pr[i]);
            memcpy(pre + 16, prompts[3 * i], (size_t)prompt_len[3 * i] * sizeof(int32_t));
            plain_greedy(m, pre, 16 + prompt_len[3 * i], NULL, 8, want);
            CHECK_INT(pres[i].finish, ==, AD_FINISH_LENGTH);
            CHECK_INT(pres[i].n, ==, 8);
            for (int t = 0; t < 8; t++)
                CHECK_INT(pres[i].tok[t], ==, want[t]);
        }
        ad_engine_stats(pe, &st);
        CHECK(st.preemptions > 0);
        CHECK_INT(st.kv_blocks_free, ==, pc.kv_blocks);
        ad_engine_free(pe);
        snprintf(p, sizeof(p), "%s/lora1", mdir);
        test_prefix_cache(m, &cfg, adapters[1], p, pa);
        ad_adapter_unref(pa);
    }

    /* fairness: one slot, four requests of adapter 1 queued before one of adapter 2: round
     * robin gives adapter 2 the second slot (FIFO would make it wait for all four) */
    {
        struct ad_engine *fe;
        struct ad_request *fr[5];
        struct result fres[5];
        struct ad_engine_config fc = cfg;
        fc.max_seqs = 1;
        atomic_store(&done_order, 0);
        CHECK_INT(ad_engine_new(m, &fc, &fe, &err), ==, 0);
        for (int i = 0; i < 5; i++) {
            init_result(&fres[i]);
            struct ad_request_params fp = params(i, adapters[i < 4 ? 1 : 2], 8);
            CHECK_INT(ad_engine_submit(fe, &fp, on_event, &fres[i], &fr[i], &err), ==, 0);
        }
        for (int i = 0; i < 5; i++) {
            wait_done(&fres[i]);
            ad_request_unref(fr[i]);
        }
        CHECK_INT(fres[4].order, <=, 2); /* the first may already have been admitted */
        CHECK_INT(fres[3].order, ==, 5);
        ad_engine_free(fe);

        /* max_per_adapter: six requests of one adapter never run more than two at once */
        fc.max_seqs = 6;
        fc.max_per_adapter = 2;
        atomic_store(&max_running, 0);
        CHECK_INT(ad_engine_new(m, &fc, &fe, &err), ==, 0);
        observed = fe;
        for (int i = 0; i < 5; i++) {
            init_result(&fres[i]);
            struct ad_request_params fp = params(i, adapters[1], 8);
            CHECK_INT(ad_engine_submit(fe, &fp, on_event, &fres[i], &fr[i], &err), ==, 0);
        }
        for (int i = 0; i < 5; i++) {
            wait_done(&fres[i]);
            CHECK_INT(fres[i].n, ==, 8);
            ad_request_unref(fr[i]);
        }
        observed = NULL;
        CHECK_INT(atomic_load(&max_running), ==, 2);
        struct ad_engine_stats fst;
        ad_engine_stats(fe, &fst);
        CHECK_INT(fst.kv_blocks_leaked, ==, 0);
        ad_engine_free(fe);
    }

    /* cancel, queue limit, context limit, prompt logprobs */
    struct ad_engine *e;
    struct ad_request *r1, *r2;
    struct result a, b;
    struct ad_engine_config one = cfg;
    one.max_queue = 1;
    one.kv_blocks = 512; /* room for the 2000-token request below */
    CHECK_INT(ad_engine_new(m, &one, &e, &err), ==, 0);
    init_result(&a);
    init_result(&b);
    /* long enough that it cannot end before the cancel, however loaded the machine is */
    struct ad_request_params pa = params(1, NULL, 2000);
    pa.prompt_logprobs = true;
    CHECK_INT(ad_engine_submit(e, &pa, on_event, &a, &r1, &err), ==, 0);
    while (1) { /* let it start */
        pthread_mutex_lock(&a.lock);
        int n = a.n;
        pthread_mutex_unlock(&a.lock);
        if (n > 0)
            break;
        usleep(1000);
    }
    ad_engine_finish(e, r1, AD_FINISH_CANCELLED);
    wait_done(&a);
    CHECK_INT(a.finish, ==, AD_FINISH_CANCELLED);
    CHECK_INT(a.n_prompt_events, ==, prompt_len[1]);
    ad_request_unref(r1);

    struct ad_request_params big = params(0, NULL, 2046); /* 3 + 2046 > the 2048 context */
    CHECK_INT(ad_engine_submit(e, &big, on_event, &b, &r2, &err), ==, -E2BIG);
    CHECK_CONTAINS(err.msg, "maximum context length is 2048");
    struct ad_request_params bad = params(0, NULL, 5);
    bad.temperature = -1;
    CHECK_INT(ad_engine_submit(e, &bad, on_event, &b, &r2, &err), ==, -EINVAL);
    ad_engine_free(e);

    for (int i = 1; i < 3; i++)
        ad_adapter_unref(adapters[i]);
    ad_model_free(m);
    ad_rm_rf(mdir);
    printf("engine: ok\n");
    return 0;
}

/* The paged KV cache: reservation, exhaustion leaves state unchanged, release returns all; a
 * prefix-tuning adapter's K/V is shared by its sequences, not cached: it takes no block and gives
 * what the same K/V in the cache gives. Prefix caching: a sequence that starts like an earlier
 * one attaches its published blocks and computes only the rest, with the logits of a sequence
 * computed alone; under random churn every lookup finds exactly the longest published prefix
 * (checked against a model of the pool kept by the test) and never a block whose K/V belong
 * to other tokens. */
#include <errno.h>

#include "../check.h"
#include "../reference.h"
#include "../tiny.h"
#include "adapterd/adapter.h"
#include "adapterd/model.h"

#define N_PREFIX 16 /* virtual tokens of the prefix adapter */
#define N_OWN 9     /* a sequence's own tokens */

/* Two sequences of one prefix adapter in shared batches, one prefilled whole and the other in
 * two chunks, then decoding: their logits equal the base's for the prefix's real tokens followed
 * by theirs (the adapter is made of the base's own K/V of those tokens), and they hold blocks for
 * their own tokens only. */
static void test_shared_prefix(void)
{
    static const int32_t own[2][N_OWN] = {{1, 2, 3, 4, 5, 6, 7, 8, 9},
                                          {9, 8, 7, 6, 5, 33, 21, 0, 12}};
    static const int sched[2][8] = {{5, 1, 1, 1, 1}, {2, 3, 1, 1, 1, 1}}; /* chunk lengths */
    char dir[64], path[128];
    struct ad_model *m = tiny_model(dir);
    int V = m->cfg.n_vocab;
    int32_t pre[N_PREFIX], full[N_PREFIX + N_OWN];
    struct ad_adapter *a;
    struct ad_err err;
    struct ad_kv kv;
    struct ad_kv_seq seq[2] = {{0}};
    struct ad_scratch *s = ad_scratch_new();
    float want[2][N_OWN][40], got[2 * 5 * 40];

    CHECK(s);
    CHECK_INT(V, ==, 40);
    for (int i = 0; i < N_PREFIX; i++)
        pre[i] = (i * 7 + 3) % V;
    snprintf(path, sizeof(path), "%s/prefix", dir);
    tiny_prefix(m, path, pre, N_PREFIX);
    CHECK_INT(ad_adapter_load(m, path, "prefix", 0, &a, &err), ==, 0);
    struct ad_mix mix = {.n = 1, .a = {a}, .w = {1.0f}};
    CHECK_INT(ad_mix_n_prefix(&mix), ==, N_PREFIX);

    /* the reference: the base model over the prefix's tokens, then the sequence's own */
    CHECK_INT(ad_kv_init(&kv, &m->cfg, 64, 4), ==, 0);
    for (int q = 0; q < 2; q++) {
        float *lg = malloc((size_t)(N_PREFIX + N_OWN) * (size_t)V * sizeof(float));
        CHECK(lg);
        memcpy(full, pre, sizeof(pre));
        memcpy(full + N_PREFIX, own[q], sizeof(own[q]));
        struct ad_chunk ch = {.seq = &seq[q], .tokens = full, .n_tokens = N_PREFIX + N_OWN,
                              .all_logits = true};
        CHECK_INT(ad_model_forward(m, &kv, &ch, 1, &ad_mix_hooks, s, lg, &err), ==, 0);
        memcpy(want[q], lg + (size_t)N_PREFIX * V, sizeof(want[q]));
        ad_kv_seq_release(&kv, &seq[q]);
        free(lg);
    }

    /* both sequences together, chunk by chunk */
    int done[2] = {0, 0};
    for (int step = 0; step < 6; step++) {
        struct ad_chunk ch[2];
        int n = 0;
        for (int q = 0; q < 2; q++)
            if (sched[q][step])
                ch[n++] = (struct ad_chunk){.seq = &seq[q], .tokens = own[q] + done[q],
                                            .n_tokens = sched[q][step], .all_logits = true,
                                            .ctx = &mix};
        CHECK_INT(ad_model_forward(m, &kv, ch, n, &ad_mix_hooks, s, got, &err), ==, 0);
        const float *row = got;
        for (int i = 0; i < n; i++) {
            int q = ch[i].seq == &seq[1];
            CHECK_INT(seq[q].n_shared, ==, N_PREFIX);
            CHECK_INT(seq[q].n_tokens, ==, N_PREFIX + done[q] + ch[i].n_tokens);
            for (int t = 0; t < ch[i].n_tokens; t++, row += V)
                CHECK_NEAR(max_diff(row, want[q][done[q] + t], (size_t)V), 0, 1e-4);
            done[q] += ch[i].n_tokens;
        }
        if (step == 0) { /* 5 and 2 own tokens: 2 + 1 blocks (the old copy took 6 + 5) */
            CHECK_INT(seq[0].n_blocks, ==, 2);
            CHECK_INT(seq[1].n_blocks, ==, 1);
            CHECK_INT(kv.n_free, ==, 64 - 3);
        }
    }
    CHECK_INT(done[0], ==, N_OWN);
    CHECK_INT(done[1], ==, N_OWN);
    CHECK_INT(seq[0].n_blocks, ==, 3); /* ceil(9 / 4) each; with the prefix it was ceil(25 / 4) */
    CHECK_INT(seq[1].n_blocks, ==, 3);
    CHECK_INT(kv.n_free, ==, 64 - 6);

    /* released (as a preempted sequence is) and recomputed from scratch: the same logits */
    ad_kv_seq_release(&kv, &seq[1]);
    CHECK_INT(seq[1].n_shared, ==, 0);
    CHECK_INT(seq[1].n_tokens, ==, 0);
    struct ad_chunk again = {.seq = &seq[1], .tokens = own[1], .n_tokens = N_OWN,
                             .all_logits = false, .ctx = &mix};
    CHECK_INT(ad_model_forward(m, &kv, &again, 1, &ad_mix_hooks, s, got, &err), ==, 0);
    CHECK_NEAR(max_diff(got, want[1][N_OWN - 1], (size_t)V), 0, 1e-4);
    CHECK_INT(seq[1].n_blocks, ==, 3);

    for (int q = 0; q < 2; q++)
        ad_kv_seq_release(&kv, &seq[q]);
    CHECK_INT(kv.n_free, ==, 64);
    ad_kv_fini(&kv);
    ad_scratch_free(s);
    ad_adapter_unref(a);
    ad_model_free(m);
    CHECK_INT(ad_rm_rf(dir), ==, 0);
}

/* Prefix caching through the forward pass: B shares A's first two blocks and its logits equal
 * B computed alone; another mix key, or a changed token, finds less. */
static void test_prefix_forward(void)
{
    char dir[64];
    struct ad_model *m = tiny_model(dir);
    int V = m->cfg.n_vocab;
    struct ad_kv kv, solo;
    struct ad_kv_seq a = {0}, b = {0}, c = {0}, d = {0};
    struct ad_scratch *s = ad_scratch_new();
    struct ad_err err;
    int32_t ta[14], tb[13];
    float *la = malloc(14 * (size_t)V * sizeof(float)), *lb = malloc(13 * (size_t)V * sizeof(float));
    float *want = malloc(13 * (size_t)V * sizeof(float));

    CHECK(s && la && lb && want);
    for (int i = 0; i < 14; i++)
        ta[i] = (i * 11 + 5) % V;
    memcpy(tb, ta, 9 * sizeof(int32_t)); /* the first 9 tokens alike: 2 whole blocks of 4 */
    for (int i = 9; i < 13; i++)
        tb[i] = (i * 3 + 1) % V;
    CHECK_INT(ad_kv_init(&kv, &m->cfg, 32, 4), ==, 0);
    CHECK_INT(ad_kv_init(&solo, &m->cfg, 32, 4), ==, 0);

    struct ad_chunk ch = {.seq = &a, .tokens = ta, .n_tokens = 14, .all_logits = true};
    CHECK_INT(ad_model_forward(m, &kv, &ch, 1, &ad_mix_hooks, s, la, &err), ==, 0);
    ad_kv_seq_publish(&kv, &a, 0, ta);
    CHECK_INT(kv.n_cached, ==, 3); /* 14 tokens: 3 whole blocks */
    CHECK_INT(a.n_published, ==, 3);

    /* B: the first 2 blocks found (not the third: it differs at token 9) */
    CHECK_INT(ad_kv_seq_match(&kv, &b, 0, 0, tb, 12), ==, 8);
    CHECK_INT(b.n_tokens, ==, 8);
    CHECK_INT(b.n_blocks, ==, 2);
    CHECK_INT(b.blocks[0], ==, a.blocks[0]);
    CHECK_INT(b.blocks[1], ==, a.blocks[1]);
    CHECK_INT(kv.n_free, ==, 32 - 4); /* shared blocks are held, not taken twice */
    ch = (struct ad_chunk){.seq = &b, .tokens = tb + 8, .n_tokens = 5, .all_logits = true};
    CHECK_INT(ad_model_forward(m, &kv, &ch, 1, &ad_mix_hooks, s, lb, &err), ==, 0);
    ch = (struct ad_chunk){.seq = &d, .tokens = tb, .n_tokens = 13, .all_logits = true};
    CHECK_INT(ad_model_forward(m, &solo, &ch, 1, &ad_mix_hooks, s, want, &err), ==, 0);
    ad_kv_seq_release(&solo, &d);
    CHECK_NEAR(max_diff(lb, want + 8 * (size_t)V, 5 * (size_t)V), 0, 1e-5);
    ad_kv_seq_publish(&kv, &b, 0, tb);
    CHECK_INT(kv.n_cached, ==, 4); /* B's third block is its own */

    /* other adapters (mix key), or the first token changed: nothing found */
    CHECK_INT(ad_kv_seq_match(&kv, &c, 12345, 0, ta, 13), ==, 0);
    CHECK_INT(c.n_blocks, ==, 0);
    tb[0] = (tb[0] + 1) % V;
    CHECK_INT(ad_kv_seq_match(&kv, &c, 0, 0, tb, 12), ==, 0);

    /* released, A's blocks stay findable; a sequence reusing the pool's free blocks takes the
     * unpublished ones first (A's and B's last blocks, then never-used ones) */
    ad_kv_seq_release(&kv, &a);
    ad_kv_seq_release(&kv, &b);
    CHECK_INT(kv.n_free, ==, 32);
    CHECK_INT(ad_kv_seq_reserve(&kv, &c, 4 * (32 - 4)), ==, 0);
    CHECK_INT(kv.n_cached, ==, 4);
    CHECK_INT(ad_kv_seq_match(&kv, &d, 0, 0, ta, 13), ==, 12);
    /* the last block of the pool is reused: a published one goes (the least recently
     * released: B's third), and what was found keeps its K/V */
    ad_kv_seq_release(&kv, &c);
    CHECK_INT(ad_kv_seq_reserve(&kv, &c, 4 * (32 - 3)), ==, 0);
    CHECK_INT(kv.n_cached, ==, 3);
    ad_kv_seq_release(&kv, &c);
    ch = (struct ad_chunk){.seq = &d, .tokens = ta + 12, .n_tokens = 2, .all_logits = true};
    CHECK_INT(ad_model_forward(m, &kv, &ch, 1, &ad_mix_hooks, s, lb, &err), ==, 0);
    CHECK_NEAR(max_diff(lb, la + 12 * (size_t)V, 2 * (size_t)V), 0, 1e-5);
    ad_kv_seq_release(&kv, &d);
    CHECK_INT(kv.n_free, ==, 32);

    ad_kv_fini(&kv);
    ad_kv_fini(&solo);
    free(la);
    free(lb);
    free(want);
    ad_scratch_free(s);
    ad_model_free(m);
    CHECK_INT(ad_rm_rf(dir), ==, 0);
}

/* Random churn of sequences over a small pool, against a model of it: which block holds which
 * published content, and who holds each block. Each position's K slot holds a fingerprint of
 * the tokens up to it, so a block found for the wrong tokens shows. */
#define CH_BLOCKS 48
#define CH_B 2
#define CH_SEQS 8
#define CH_LEN 24

static uint64_t ch_rng = 0x9E3779B97F4A7C15u;
static uint32_t ch_rand(uint32_t n)
{
    ch_rng ^= ch_rng >> 12;
    ch_rng ^= ch_rng << 25;
    ch_rng ^= ch_rng >> 27;
    return (uint32_t)((ch_rng * 0x2545F4914F6CDD1Du) >> 33) % n;
}

/* FNV-1a of the mix and tokens[0..n), never 0 */
static uint64_t content(uint64_t mix, const int32_t *t, int n)
{
    uint64_t h = 1469598103934665603u ^ mix;
    for (int i = 0; i < n; i++)
        h = (h ^ (uint64_t)(uint32_t)t[i]) * 1099511628211u;
    return h ? h : 1;
}

struct ch_seq {
    bool live;
    uint64_t mix;
    int32_t tok[CH_LEN];
    int n;
    struct ad_kv_seq s;
};

static uint64_t pub[CH_BLOCKS]; /* content published in each block (0: none) */
static int ref[CH_BLOCKS];

static void ch_check_pool(const struct ad_kv *kv)
{
    int n_free = 0, n_pub = 0;
    for (int b = 0; b < CH_BLOCKS; b++) {
        n_free += ref[b] == 0;
        n_pub += pub[b] != 0;
    }
    CHECK_INT(kv->n_free, ==, n_free);
    CHECK_INT(kv->n_cached, ==, n_pub);
}

static bool ch_published(uint64_t key)
{
    for (int b = 0; b < CH_BLOCKS; b++)
        if (pub[b] == key)
            return true;
    return false;
}

/* Grows q to n tokens: blocks from the pool (the model forgets what they held), fingerprints,
 * publication. Returns false if the pool is short. */
static bool ch_compute(struct ad_kv *kv, struct ch_seq *q, int n)
{
    int had = q->s.n_blocks, unpub_free = 0;
    for (int b = 0; b < CH_BLOCKS; b++)
        unpub_free += ref[b] == 0 && !pub[b];
    if (ad_kv_seq_reserve(kv, &q->s, n) < 0)
        return false;
    for (int i = had; i < q->s.n_blocks; i++) {
        int32_t b = q->s.blocks[i];
        CHECK_INT(ref[b], ==, 0);
        if (i - had < unpub_free) /* unpublished free blocks go first */
            CHECK_INT(pub[b], ==, 0);
        pub[b] = 0;
        ref[b] = 1;
    }
    for (int p = q->s.n_tokens; p < n; p++)
        kv->k[(size_t)q->s.blocks[p / CH_B] * CH_B + (size_t)(p % CH_B)] =
            (float)(content(q->mix, q->tok, p + 1) & 0xffffff);
    q->s.n_tokens = n;
    for (int i = q->s.n_published; i < n / CH_B; i++) {
        uint64_t key = content(q->mix, q->tok, (i + 1) * CH_B);
        if (!ch_published(key))
            pub[q->s.blocks[i]] = key;
    }
    ad_kv_seq_publish(kv, &q->s, q->mix, q->tok);
    return true;
}

static void test_prefix_churn(void)
{
    struct ad_model_config cfg = {.n_layer = 1, .n_kv_head = 1, .head_dim = 1};
    struct ad_kv kv;
    struct ch_seq seqs[CH_SEQS] = {0};
    int32_t stems[3][CH_LEN];
    long hits = 0, misses = 0;

    CHECK_INT(ad_kv_init(&kv, &cfg, CH_BLOCKS, CH_B), ==, 0);
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < CH_LEN; j++)
            stems[i][j] = (int32_t)ch_rand(1000);
    for (int op = 0; op < 20000; op++) {
        struct ch_seq *q = &seqs[ch_rand(CH_SEQS)];
        if (!q->live) { /* a new sequence: a stem, changed from a random point on */
            q->mix = ch_rand(4) == 0 ? 7 : 0;
            q->n = 2 + (int)ch_rand(CH_LEN - 8);
            memcpy(q->tok, stems[ch_rand(3)], sizeof(q->tok));
            for (int j = (int)ch_rand(CH_LEN * 2); j < CH_LEN; j++)
                q->tok[j] = (int32_t)ch_rand(3);
            int want = 0;
            while (want + CH_B <= q->n - 1 && ch_published(content(q->mix, q->tok, want + CH_B)))
                want += CH_B;
            int got = ad_kv_seq_match(&kv, &q->s, q->mix, 0, q->tok, q->n - 1);
            CHECK_INT(got, ==, want);
            for (int i = 0; i < q->s.n_blocks; i++)
                ref[q->s.blocks[i]]++;
            for (int p = 0; p < got; p++) /* the K/V found are those of these tokens */
                CHECK_INT(kv.k[(size_t)q->s.blocks[p / CH_B] * CH_B + (size_t)(p % CH_B)], ==,
                          (float)(content(q->mix, q->tok, p + 1) & 0xffffff));
            hits += got > 0;
            misses += got == 0;
            q->live = ch_compute(&kv, q, q->n);
            if (!q->live) { /* the pool is short: give back what was found */
                for (int i = 0; i < q->s.n_blocks; i++)
                    ref[q->s.blocks[i]]--;
                ad_kv_seq_release(&kv, &q->s);
            }
        } else if (ch_rand(3) == 0 || q->n >= CH_LEN - 4) { /* the sequence ends */
            for (int i = 0; i < q->s.n_blocks; i++)
                ref[q->s.blocks[i]]--;
            ad_kv_seq_release(&kv, &q->s);
            q->live = false;
        } else { /* decodes a few more tokens */
            int n = q->n + 1 + (int)ch_rand(3);
            if (ch_compute(&kv, q, n))
                q->n = n;
        }
        ch_check_pool(&kv);
    }
    for (int i = 0; i < CH_SEQS; i++)
        if (seqs[i].live)
            ad_kv_seq_release(&kv, &seqs[i].s);
    CHECK_INT(kv.n_free, ==, CH_BLOCKS);
    CHECK(hits > 1000 && misses > 1000); /* both paths were exercised */
    printf("kv: churn: %ld lookups found a prefix, %ld did not\n", hits, misses);
    ad_kv_fini(&kv);
}

int main(void)
{
    struct ad_model_config cfg = {.n_layer = 2, .n_kv_head = 2, .head_dim = 4};
    struct ad_kv kv;
    struct ad_kv_seq a = {0}, b = {0};

    CHECK_INT(ad_kv_init(&kv, &cfg, 10, 4), ==, 0);
    CHECK_INT(kv.kv_dim, ==, 8);
    CHECK_INT(ad_kv_blocks_for(&kv, 0), ==, 0);
    CHECK_INT(ad_kv_blocks_for(&kv, 4), ==, 1);
    CHECK_INT(ad_kv_blocks_for(&kv, 5), ==, 2);
    CHECK_INT(ad_kv_seq_reserve(&kv, &a, 17), ==, 0); /* 5 blocks */
    CHECK_INT(a.n_blocks, ==, 5);
    CHECK_INT(kv.n_free, ==, 5);
    CHECK_INT(ad_kv_seq_reserve(&kv, &a, 20), ==, 0); /* still 5 */
    CHECK_INT(kv.n_free, ==, 5);
    CHECK_INT(ad_kv_seq_reserve(&kv, &b, 24), ==, -ENOSPC); /* 6 > 5 free: nothing changes */
    CHECK_INT(b.n_blocks, ==, 0);
    CHECK_INT(kv.n_free, ==, 5);
    CHECK_INT(ad_kv_seq_reserve(&kv, &b, 20), ==, 0);
    CHECK_INT(kv.n_free, ==, 0);
    for (int i = 0; i < a.n_blocks; i++) /* no block is handed out twice */
        for (int j = 0; j < b.n_blocks; j++)
            CHECK_INT(a.blocks[i], !=, b.blocks[j]);
    ad_kv_seq_release(&kv, &a);
    CHECK_INT(kv.n_free, ==, 5);
    CHECK_INT(a.n_blocks, ==, 0);
    ad_kv_seq_release(&kv, &b);
    CHECK_INT(kv.n_free, ==, 10);

    /* a shared prefix takes no block: 20 positions, 16 of them shared, fit in one */
    a.n_tokens = a.n_shared = 16;
    CHECK_INT(ad_kv_seq_reserve(&kv, &a, 20), ==, 0);
    CHECK_INT(a.n_blocks, ==, 1);
    CHECK_INT(kv.n_free, ==, 9);
    ad_kv_seq_release(&kv, &a);
    CHECK_INT(a.n_shared, ==, 0);
    CHECK_INT(kv.n_free, ==, 10);
    ad_kv_fini(&kv);

    test_shared_prefix();
    test_prefix_forward();
    test_prefix_churn();
    printf("kv: ok\n");
    return 0;
}

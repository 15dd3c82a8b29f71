/* The paged KV cache: reservation, exhaustion leaves state unchanged, release returns all; a
 * prefix-tuning adapter's K/V is shared by its sequences, not cached: it takes no block and gives
 * what the same K/V in the cache gives. */
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
    CHECK_INT(ad_adapter_load(m, path, "prefix", &a, &err), ==, 0);
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
        CHECK_INT(ad_model_forward(m, &kv, &ch, 1, s, lg, &err), ==, 0);
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
                                            .mix = &mix};
        CHECK_INT(ad_model_forward(m, &kv, ch, n, s, got, &err), ==, 0);
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
                             .all_logits = false, .mix = &mix};
    CHECK_INT(ad_model_forward(m, &kv, &again, 1, s, got, &err), ==, 0);
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
    printf("kv: ok\n");
    return 0;
}

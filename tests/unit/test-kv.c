/* The paged KV cache: reservation, exhaustion leaves state unchanged, release returns all. */
#include <errno.h>

#include "../check.h"
#include "adapterd/model.h"

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
    ad_kv_fini(&kv);
    printf("kv: ok\n");
    return 0;
}

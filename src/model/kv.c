/* The paged KV cache: a pool of fixed-size blocks and a block table per sequence. A sequence's
 * shared prefix (n_shared positions) takes no block. */
#include <errno.h>
#include <stdlib.h>

#include "adapterd/model.h"

int ad_kv_init(struct ad_kv *kv, const struct ad_model_config *cfg, int n_blocks, int block_size)
{
    size_t per_layer;

    *kv = (struct ad_kv){0};
    if (n_blocks <= 0 || block_size <= 0)
        return -EINVAL;
    kv->n_layer = cfg->n_layer;
    kv->kv_dim = cfg->n_kv_head * cfg->head_dim;
    kv->block_size = block_size;
    kv->n_blocks = n_blocks;
    per_layer = (size_t)n_blocks * (size_t)block_size * (size_t)kv->kv_dim;
    kv->k = malloc(per_layer * (size_t)kv->n_layer * sizeof(float));
    kv->v = malloc(per_layer * (size_t)kv->n_layer * sizeof(float));
    kv->free_blocks = malloc((size_t)n_blocks * sizeof(int32_t));
    if (!kv->k || !kv->v || !kv->free_blocks) {
        ad_kv_fini(kv);
        return -ENOMEM;
    }
    for (int i = 0; i < n_blocks; i++) /* pop order: block 0 first */
        kv->free_blocks[i] = n_blocks - 1 - i;
    kv->n_free = n_blocks;
    return 0;
}

void ad_kv_fini(struct ad_kv *kv)
{
    free(kv->k);
    free(kv->v);
    free(kv->free_blocks);
    *kv = (struct ad_kv){0};
}

int ad_kv_blocks_for(const struct ad_kv *kv, int n_tokens)
{
    return (n_tokens + kv->block_size - 1) / kv->block_size;
}

int ad_kv_seq_reserve(struct ad_kv *kv, struct ad_kv_seq *s, int n_tokens)
{
    int need = ad_kv_blocks_for(kv, n_tokens - s->n_shared);

    if (need <= s->n_blocks)
        return 0;
    if (need - s->n_blocks > kv->n_free)
        return -ENOSPC;
    if (need > s->cap) {
        int cap = s->cap ? s->cap : 4;
        while (cap < need)
            cap *= 2;
        int32_t *b = realloc(s->blocks, (size_t)cap * sizeof(*b));
        if (!b)
            return -ENOMEM;
        s->blocks = b;
        s->cap = cap;
    }
    while (s->n_blocks < need)
        s->blocks[s->n_blocks++] = kv->free_blocks[--kv->n_free];
    return 0;
}

void ad_kv_seq_release(struct ad_kv *kv, struct ad_kv_seq *s)
{
    for (int i = s->n_blocks - 1; i >= 0; i--)
        kv->free_blocks[kv->n_free++] = s->blocks[i];
    free(s->blocks);
    *s = (struct ad_kv_seq){0};
}

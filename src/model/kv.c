/* The paged KV cache: a pool of fixed-size blocks and a block table per sequence. A sequence's
 * shared prefix (n_shared positions) takes no block. Full blocks can be published and found
 * again by content (prefix caching, model.h). */
#include <assert.h>
#include <errno.h>
#include <sodium.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/model.h"
#include "adapterd/util.h"

struct ad_kv_block {
    int32_t ref;        /* sequences holding it */
    int32_t prev, next; /* free list links, while ref == 0 */
    bool published;
    uint64_t hash;      /* of (parent, mix, tokens), when published */
    uint64_t parent;    /* hash of the block before it in its sequence (0: the first) */
    uint64_t mix;
};

/* ==========================================================================================
 * The free list: blocks no sequence holds. Unpublished ones at the head (reused first), published
 * ones appended at the tail as they are released, so the head end is the least recently used. */

static void list_unlink(struct ad_kv *kv, int32_t b)
{
    struct ad_kv_block *k = &kv->blk[b];
    if (k->prev >= 0)
        kv->blk[k->prev].next = k->next;
    else
        kv->free_head = k->next;
    if (k->next >= 0)
        kv->blk[k->next].prev = k->prev;
    else
        kv->free_tail = k->prev;
    kv->n_free--;
}

static void list_push(struct ad_kv *kv, int32_t b, bool at_head)
{
    struct ad_kv_block *k = &kv->blk[b];
    if (at_head) {
        k->prev = -1;
        k->next = kv->free_head;
        if (kv->free_head >= 0)
            kv->blk[kv->free_head].prev = b;
        else
            kv->free_tail = b;
        kv->free_head = b;
    } else {
        k->next = -1;
        k->prev = kv->free_tail;
        if (kv->free_tail >= 0)
            kv->blk[kv->free_tail].next = b;
        else
            kv->free_head = b;
        kv->free_tail = b;
    }
    kv->n_free++;
}

/* ==========================================================================================
 * Published blocks by hash: linear probing, deletion by backward shift (no tombstones). */

uint64_t ad_kv_hash(const struct ad_kv *kv, const void *data, size_t len)
{
    unsigned char out[crypto_shorthash_BYTES];
    crypto_shorthash(out, data, len, kv->key);
    uint64_t h;
    memcpy(&h, out, 8);
    return h;
}

static uint64_t chain_hash(struct ad_kv *kv, uint64_t parent, uint64_t mix, const int32_t *tokens)
{
    size_t n = (size_t)kv->block_size * sizeof(int32_t);
    memcpy(kv->hbuf, &parent, 8);
    memcpy(kv->hbuf + 8, &mix, 8);
    memcpy(kv->hbuf + 16, tokens, n);
    return ad_kv_hash(kv, kv->hbuf, 16 + n);
}

static const int32_t *tokens_of(const struct ad_kv *kv, int32_t b)
{
    return kv->tokens + (size_t)b * (size_t)kv->block_size;
}

/* The published block with this content, or -1. */
static int32_t find(const struct ad_kv *kv, uint64_t h, uint64_t parent, uint64_t mix,
                    const int32_t *tokens)
{
    for (uint32_t i = (uint32_t)h & kv->table_mask; kv->table[i] >= 0;
         i = (i + 1) & kv->table_mask) {
        int32_t b = kv->table[i];
        const struct ad_kv_block *k = &kv->blk[b];
        if (k->published && k->hash == h && k->parent == parent && k->mix == mix &&
            !memcmp(tokens_of(kv, b), tokens, (size_t)kv->block_size * sizeof(int32_t)))
            return b;
    }
    return -1;
}

static void publish(struct ad_kv *kv, int32_t b, uint64_t h, uint64_t parent, uint64_t mix,
                    const int32_t *tokens)
{
    uint32_t i = (uint32_t)h & kv->table_mask;
    while (kv->table[i] >= 0)
        i = (i + 1) & kv->table_mask;
    kv->table[i] = b;
    kv->blk[b].published = true;
    kv->blk[b].hash = h;
    kv->blk[b].parent = parent;
    kv->blk[b].mix = mix;
    memcpy(kv->tokens + (size_t)b * (size_t)kv->block_size, tokens,
           (size_t)kv->block_size * sizeof(int32_t));
    kv->n_cached++;
}

static void unpublish(struct ad_kv *kv, int32_t b)
{
    uint32_t m = kv->table_mask, i = (uint32_t)kv->blk[b].hash & m;
    while (kv->table[i] != b)
        i = (i + 1) & m;
    /* shift back every later entry of the run that may not sit before the hole */
    for (uint32_t j = (i + 1) & m; kv->table[j] >= 0; j = (j + 1) & m) {
        uint32_t home = (uint32_t)kv->blk[kv->table[j]].hash & m;
        bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (stays)
            continue;
        kv->table[i] = kv->table[j];
        i = j;
    }
    kv->table[i] = -1;
    kv->blk[b].published = false;
    kv->n_cached--;
}

/* ==========================================================================================
 * The pool */

int ad_kv_init(struct ad_kv *kv, const struct ad_model_config *cfg, int n_blocks, int block_size)
{
    size_t per_layer;
    uint32_t slots = 16;

    *kv = (struct ad_kv){0};
    if (n_blocks <= 0 || block_size <= 0 || n_blocks > (1 << 28))
        return -EINVAL;
    if (sodium_init() < 0)
        return -ENOMEM;
    while (slots < 2u * (uint32_t)n_blocks)
        slots *= 2;
    kv->n_layer = cfg->n_layer;
    kv->kv_dim = cfg->n_kv_head * cfg->head_dim;
    kv->block_size = block_size;
    kv->n_blocks = n_blocks;
    per_layer = (size_t)n_blocks * (size_t)block_size * (size_t)kv->kv_dim;
    /* decode attention walks every sequence's blocks each step: huge pages spare the TLB */
    kv->k = ad_alloc_large(per_layer * (size_t)kv->n_layer * sizeof(float));
    kv->v = ad_alloc_large(per_layer * (size_t)kv->n_layer * sizeof(float));
    kv->blk = calloc((size_t)n_blocks, sizeof(*kv->blk));
    kv->table = malloc(slots * sizeof(int32_t));
    kv->tokens = malloc((size_t)n_blocks * (size_t)block_size * sizeof(int32_t));
    kv->hbuf = malloc(16 + (size_t)block_size * sizeof(int32_t));
    if (!kv->k || !kv->v || !kv->blk || !kv->table || !kv->tokens || !kv->hbuf) {
        ad_kv_fini(kv);
        return -ENOMEM;
    }
    memset(kv->table, 0xff, slots * sizeof(int32_t));
    kv->table_mask = slots - 1;
    randombytes_buf(kv->key, sizeof(kv->key));
    kv->free_head = kv->free_tail = -1;
    for (int i = 0; i < n_blocks; i++) /* reuse order: block 0 first */
        list_push(kv, i, false);
    return 0;
}

void ad_kv_fini(struct ad_kv *kv)
{
    free(kv->k);
    free(kv->v);
    free(kv->blk);
    free(kv->table);
    free(kv->tokens);
    free(kv->hbuf);
    *kv = (struct ad_kv){0};
}

int ad_kv_blocks_for(const struct ad_kv *kv, int n_tokens)
{
    return (n_tokens + kv->block_size - 1) / kv->block_size;
}

static int grow_table(struct ad_kv_seq *s, int need)
{
    if (need <= s->cap)
        return 0;
    int cap = s->cap ? s->cap : 4;
    while (cap < need)
        cap *= 2;
    int32_t *b = realloc(s->blocks, (size_t)cap * sizeof(*b));
    if (!b)
        return -ENOMEM;
    s->blocks = b;
    s->cap = cap;
    return 0;
}

int ad_kv_seq_reserve(struct ad_kv *kv, struct ad_kv_seq *s, int n_tokens)
{
    int need = ad_kv_blocks_for(kv, n_tokens - s->n_shared);

    if (need <= s->n_blocks)
        return 0;
    if (need - s->n_blocks > kv->n_free)
        return -ENOSPC;
    if (grow_table(s, need) < 0)
        return -ENOMEM;
    while (s->n_blocks < need) {
        int32_t b = kv->free_head;
        list_unlink(kv, b);
        if (kv->blk[b].published)
            unpublish(kv, b);
        kv->blk[b].ref = 1;
        s->blocks[s->n_blocks++] = b;
    }
    return 0;
}

void ad_kv_seq_release(struct ad_kv *kv, struct ad_kv_seq *s)
{
    /* last block first: a sequence's later blocks are the less likely to be asked for again,
     * so they are nearer the reuse end of the list */
    for (int i = s->n_blocks - 1; i >= 0; i--) {
        int32_t b = s->blocks[i];
        assert(kv->blk[b].ref > 0);
        if (--kv->blk[b].ref == 0)
            list_push(kv, b, !kv->blk[b].published);
    }
    free(s->blocks);
    *s = (struct ad_kv_seq){0};
}

int ad_kv_seq_match(struct ad_kv *kv, struct ad_kv_seq *s, uint64_t mix, int n_shared,
                    const int32_t *tokens, int n_tokens)
{
    int B = kv->block_size, n = 0;
    uint64_t parent = 0;

    assert(s->n_tokens == 0 && s->n_blocks == 0);
    if (n_tokens < B || grow_table(s, n_tokens / B) < 0)
        return 0;
    for (; n < n_tokens / B; n++) {
        uint64_t h = chain_hash(kv, parent, mix, tokens + (size_t)n * B);
        int32_t b = find(kv, h, parent, mix, tokens + (size_t)n * B);
        if (b < 0)
            break;
        if (kv->blk[b].ref++ == 0)
            list_unlink(kv, b);
        s->blocks[s->n_blocks++] = b;
        parent = h;
    }
    if (n == 0)
        return 0;
    s->n_shared = n_shared;
    s->n_tokens = n_shared + n * B;
    s->n_published = n;
    s->chain = parent;
    return n * B;
}

void ad_kv_seq_publish(struct ad_kv *kv, struct ad_kv_seq *s, uint64_t mix, const int32_t *tokens)
{
    int B = kv->block_size, full = (s->n_tokens - s->n_shared) / B;

    for (int i = s->n_published; i < full; i++) {
        const int32_t *t = tokens + (size_t)i * B;
        uint64_t h = chain_hash(kv, s->chain, mix, t);
        int32_t b = s->blocks[i];
        assert(kv->blk[b].ref > 0 && !kv->blk[b].published);
        if (find(kv, h, s->chain, mix, t) < 0)
            publish(kv, b, h, s->chain, mix, t);
        s->chain = h;
    }
    if (full > s->n_published)
        s->n_published = full;
}

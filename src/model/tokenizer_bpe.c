/* The BPE model: the merges table, the merge loop over one pre-tokenized word (a binary heap of
 * adjacent pairs over a linked list of symbols, as Hugging Face's Word::merge_all, so that ties
 * and stale entries resolve exactly as there), and a word cache. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

/* ==========================================================================================
 * Merges table */

static uint64_t pair_key(int32_t a, int32_t b)
{
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

static uint32_t pair_hash(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (uint32_t)k;
}

int tk_merges_init(struct tk_merges *m, size_t n)
{
    size_t size = 1024;

    while (size < n * 2 + 16)
        size *= 2;
    if (size > (1u << 30))
        return -ENOMEM;
    m->keys = malloc(size * sizeof(*m->keys));
    m->rank = malloc(size * sizeof(*m->rank));
    m->new_id = malloc(size * sizeof(*m->new_id));
    if (!m->keys || !m->rank || !m->new_id)
        return -ENOMEM;
    memset(m->keys, 0xff, size * sizeof(*m->keys));
    m->mask = (uint32_t)(size - 1);
    m->n = 0;
    return 0;
}

int tk_merges_put(struct tk_merges *m, int32_t a, int32_t b, uint32_t rank, int32_t new_id)
{
    uint64_t k = pair_key(a, b);
    uint32_t j;

    if ((size_t)(m->n + 1) * 2 > (size_t)m->mask + 1)
        return -ENOMEM; /* sized by tk_merges_init */
    for (j = pair_hash(k) & m->mask; m->keys[j] != UINT64_MAX; j = (j + 1) & m->mask)
        if (m->keys[j] == k)
            break;
    if (m->keys[j] == UINT64_MAX)
        m->n++;
    m->keys[j] = k;
    m->rank[j] = rank;
    m->new_id[j] = new_id;
    return 0;
}

bool tk_merges_get(const struct tk_merges *m, int32_t a, int32_t b, uint32_t *rank,
                   int32_t *new_id)
{
    uint64_t k = pair_key(a, b);

    if (!m->keys)
        return false;
    for (uint32_t j = pair_hash(k) & m->mask; m->keys[j] != UINT64_MAX; j = (j + 1) & m->mask) {
        if (m->keys[j] == k) {
            *rank = m->rank[j];
            *new_id = m->new_id[j];
            return true;
        }
    }
    return false;
}

void tk_merges_fini(struct tk_merges *m)
{
    free(m->keys);
    free(m->rank);
    free(m->new_id);
    memset(m, 0, sizeof(*m));
}

/* ==========================================================================================
 * Word cache: sharded, direct-mapped, bounded. A shard busy in another thread is skipped
 * rather than waited for (Hugging Face's cache does the same with try_read/try_write). */

#define CACHE_SHARDS 64
#define CACHE_SLOTS 512 /* per shard */
#define CACHE_KEY 22
#define CACHE_IDS 8

struct tk_cache_slot {
    uint32_t hash;
    uint8_t klen, n_ids; /* klen 0 = empty */
    char key[CACHE_KEY];
    int32_t ids[CACHE_IDS];
};

struct tk_cache_shard {
    pthread_mutex_t mu;
    struct tk_cache_slot slots[CACHE_SLOTS];
};

struct tk_cache {
    struct tk_cache_shard shards[CACHE_SHARDS];
};

int tk_cache_new(struct tk_cache **ret)
{
    struct tk_cache *c = calloc(1, sizeof(*c));

    if (!c)
        return -ENOMEM;
    for (size_t i = 0; i < CACHE_SHARDS; i++)
        pthread_mutex_init(&c->shards[i].mu, NULL);
    *ret = c;
    return 0;
}

void tk_cache_free(struct tk_cache *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < CACHE_SHARDS; i++)
        pthread_mutex_destroy(&c->shards[i].mu);
    free(c);
}

static bool cache_get(struct tk_cache *c, uint32_t h, const char *w, size_t len,
                      struct tk_ids *out)
{
    struct tk_cache_shard *sh = &c->shards[h % CACHE_SHARDS];
    struct tk_cache_slot *s = &sh->slots[(h / CACHE_SHARDS) % CACHE_SLOTS];
    int32_t ids[CACHE_IDS];
    size_t n = 0;

    if (pthread_mutex_trylock(&sh->mu) != 0)
        return false;
    if (s->klen == len && s->hash == h && memcmp(s->key, w, len) == 0) {
        n = s->n_ids;
        memcpy(ids, s->ids, n * sizeof(ids[0]));
    }
    pthread_mutex_unlock(&sh->mu);
    if (!n)
        return false;
    if (out->cap - out->n < n) {
        for (size_t i = 0; i < n; i++)
            if (tk_ids_push(out, ids[i]) < 0)
                return false; /* the caller recomputes; out may hold a partial word: undo */
        return true;
    }
    memcpy(out->v + out->n, ids, n * sizeof(ids[0]));
    out->n += n;
    return true;
}

static void cache_put(struct tk_cache *c, uint32_t h, const char *w, size_t len,
                      const int32_t *ids, size_t n)
{
    struct tk_cache_shard *sh = &c->shards[h % CACHE_SHARDS];
    struct tk_cache_slot *s = &sh->slots[(h / CACHE_SHARDS) % CACHE_SLOTS];

    if (len == 0 || len > CACHE_KEY || n == 0 || n > CACHE_IDS)
        return;
    if (pthread_mutex_trylock(&sh->mu) != 0)
        return;
    s->hash = h;
    s->klen = (uint8_t)len;
    s->n_ids = (uint8_t)n;
    memcpy(s->key, w, len);
    memcpy(s->ids, ids, n * sizeof(ids[0]));
    pthread_mutex_unlock(&sh->mu);
}

/* ==========================================================================================
 * The merge loop */

struct tk_sym {
    int32_t id;
    int32_t prev, next;
    uint32_t len; /* bytes covered; 0 = merged into its left neighbour */
};

struct tk_heap_ent {
    uint32_t rank, pos;
    int32_t new_id;
};

static bool heap_less(const struct tk_heap_ent *a, const struct tk_heap_ent *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(struct tk_heap_ent *h, size_t *n, struct tk_heap_ent e)
{
    size_t i = (*n)++;

    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&e, &h[p]))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}

static struct tk_heap_ent heap_pop(struct tk_heap_ent *h, size_t *n)
{
    struct tk_heap_ent top = h[0], last = h[--(*n)];
    size_t i = 0;

    for (;;) {
        size_t l = 2 * i + 1, m;
        if (l >= *n)
            break;
        m = l;
        if (l + 1 < *n && heap_less(&h[l + 1], &h[l]))
            m = l + 1;
        if (!heap_less(&h[m], &last))
            break;
        h[i] = h[m];
        i = m;
    }
    if (*n)
        h[i] = last;
    return top;
}

static int sym_add(struct tk_bpe_scratch *sc, size_t *n, int32_t id, uint32_t len)
{
    if (*n == sc->cap_syms) {
        size_t ncap = sc->cap_syms ? sc->cap_syms * 2 : 256;
        struct tk_sym *ns = realloc(sc->syms, ncap * sizeof(*ns));
        if (!ns)
            return -ENOMEM;
        sc->syms = ns;
        sc->cap_syms = ncap;
    }
    sc->syms[*n] = (struct tk_sym){.id = id, .prev = (int32_t)*n - 1, .next = (int32_t)*n + 1,
                                   .len = len};
    (*n)++;
    return 0;
}

static int merge_all(const struct ad_tokenizer *tok, struct tk_bpe_scratch *sc, size_t n)
{
    struct tk_sym *sy = sc->syms;
    size_t nh = 0;
    uint32_t rank;
    int32_t nid;

    if (n < 2)
        return 0;
    /* Each merge pushes at most two entries: n - 1 initial pairs + 2 per merge. */
    if (sc->cap_heap < 3 * n) {
        free(sc->heap);
        sc->heap = malloc(3 * n * sizeof(*sc->heap));
        sc->cap_heap = sc->heap ? 3 * n : 0;
        if (!sc->heap)
            return -ENOMEM;
    }
    for (size_t i = 0; i + 1 < n; i++)
        if (tk_merges_get(&tok->merges, sy[i].id, sy[i + 1].id, &rank, &nid))
            heap_push(sc->heap, &nh, (struct tk_heap_ent){rank, (uint32_t)i, nid});
    while (nh) {
        struct tk_heap_ent top = heap_pop(sc->heap, &nh);
        struct tk_sym *cur = &sy[top.pos], *right;

        if (cur->len == 0 || cur->next < 0 || (size_t)cur->next >= n)
            continue;
        right = &sy[cur->next];
        if (!tk_merges_get(&tok->merges, cur->id, right->id, &rank, &nid) || nid != top.new_id)
            continue; /* stale */
        cur->id = top.new_id;
        cur->len += right->len;
        cur->next = right->next;
        right->len = 0;
        if (cur->next >= 0 && (size_t)cur->next < n)
            sy[cur->next].prev = (int32_t)top.pos;
        if (cur->prev >= 0 &&
            tk_merges_get(&tok->merges, sy[cur->prev].id, cur->id, &rank, &nid))
            heap_push(sc->heap, &nh, (struct tk_heap_ent){rank, (uint32_t)cur->prev, nid});
        if (cur->next >= 0 && (size_t)cur->next < n &&
            tk_merges_get(&tok->merges, cur->id, sy[cur->next].id, &rank, &nid))
            heap_push(sc->heap, &nh, (struct tk_heap_ent){rank, top.pos, nid});
    }
    return 0;
}

/* Writes the byte-level characters of w into sc->tmp. */
static int bl_materialize(struct tk_bpe_scratch *sc, const char *w, size_t len)
{
    int r;

    sc->tmp.len = 0;
    r = tk_buf_reserve(&sc->tmp, len * 2);
    if (r < 0)
        return r;
    for (size_t i = 0; i < len; i++)
        sc->tmp.len += tk_utf8_put(sc->tmp.p + sc->tmp.len, tk_byte_to_cp[(unsigned char)w[i]]);
    sc->tmp.p[sc->tmp.len] = '\0';
    return 0;
}

/* Hugging Face's BPE::merge_word: one symbol per character (with the continuing-subword
 * prefix and end-of-word suffix), byte fallback, unknown-token fusion. */
static int init_symbols(const struct ad_tokenizer *tok, struct tk_bpe_scratch *sc,
                        const char *w, size_t len, size_t *ret_n)
{
    char kbuf[128];
    size_t n = 0, i = 0;
    int32_t unk_pending = -1;
    uint32_t unk_len = 0;
    int r;

    while (i < len) {
        uint32_t cp;
        size_t cl = tk_utf8_next(w + i, len - i, &cp), kl = 0;
        bool first = i == 0, last = i + cl >= len;
        const char *key;
        int32_t id;

        if ((!first && tok->prefix) || (last && tok->suffix)) {
            size_t need = cl + (first ? 0 : tok->prefix_len) + (last ? tok->suffix_len : 0);
            char *k = need <= sizeof(kbuf) ? kbuf : NULL;
            if (!k) {
                /* absurdly long prefix/suffix: use the heap */
                k = malloc(need);
                if (!k)
                    return -ENOMEM;
            }
            if (!first && tok->prefix) {
                memcpy(k, tok->prefix, tok->prefix_len);
                kl = tok->prefix_len;
            }
            memcpy(k + kl, w + i, cl);
            kl += cl;
            if (last && tok->suffix) {
                memcpy(k + kl, tok->suffix, tok->suffix_len);
                kl += tok->suffix_len;
            }
            id = tk_map_get(&tok->vocab, tok->pool.p, k, kl);
            if (id < 0 && tok->byte_fallback) {
                bool all = true;
                for (size_t j = 0; j < kl && all; j++)
                    all = tok->byte_ids[(unsigned char)k[j]] >= 0;
                if (all) {
                    for (size_t j = 0; j < kl; j++) {
                        r = sym_add(sc, &n, tok->byte_ids[(unsigned char)k[j]], 1);
                        if (r < 0) {
                            if (k != kbuf)
                                free(k);
                            return r;
                        }
                    }
                    if (k != kbuf)
                        free(k);
                    i += cl;
                    continue;
                }
            }
            if (k != kbuf)
                free(k);
        } else {
            key = w + i;
            kl = cl;
            id = tk_map_get(&tok->vocab, tok->pool.p, key, kl);
            if (id < 0 && tok->byte_fallback) {
                bool all = true;
                for (size_t j = 0; j < kl && all; j++)
                    all = tok->byte_ids[(unsigned char)key[j]] >= 0;
                if (all) {
                    /* Hugging Face leaves a pending unknown token pending here */
                    for (size_t j = 0; j < kl; j++) {
                        r = sym_add(sc, &n, tok->byte_ids[(unsigned char)key[j]], 1);
                        if (r < 0)
                            return r;
                    }
                    i += cl;
                    continue;
                }
            }
        }
        if (id >= 0) {
            if (unk_pending >= 0) {
                r = sym_add(sc, &n, unk_pending, unk_len);
                if (r < 0)
                    return r;
                unk_pending = -1;
            }
            r = sym_add(sc, &n, id, (uint32_t)cl);
            if (r < 0)
                return r;
        } else if (tok->has_unk) {
            if (tok->unk_id < 0)
                return -EINVAL; /* Hugging Face fails the same way */
            if (unk_pending >= 0 && tok->fuse_unk) {
                unk_len += (uint32_t)cl;
            } else {
                if (unk_pending >= 0) {
                    r = sym_add(sc, &n, unk_pending, unk_len);
                    if (r < 0)
                        return r;
                }
                unk_pending = tok->unk_id;
                unk_len = (uint32_t)cl;
            }
        }
        /* else: the character is dropped, as Hugging Face does without an unk_token */
        i += cl;
    }
    if (unk_pending >= 0) {
        r = sym_add(sc, &n, unk_pending, unk_len);
        if (r < 0)
            return r;
    }
    if (n)
        sc->syms[n - 1].next = -1;
    *ret_n = n;
    return 0;
}

static int bpe_word(const struct ad_tokenizer *tok, struct tk_bpe_scratch *sc, const char *w,
                    size_t len, bool bl, struct tk_ids *out)
{
    size_t n = 0, start = out->n;
    uint32_t h = 0;
    int r;

    if (len == 0)
        return 0;
    if (tok->ignore_merges) {
        int32_t id;
        if (bl) {
            r = bl_materialize(sc, w, len);
            if (r < 0)
                return r;
            id = tk_map_get(&tok->vocab, tok->pool.p, sc->tmp.p, sc->tmp.len);
        } else {
            id = tk_map_get(&tok->vocab, tok->pool.p, w, len);
        }
        if (id >= 0)
            return tk_ids_push(out, id);
    }
    if (tok->cache && len <= CACHE_KEY) {
        h = tk_hash(w, len);
        if (cache_get(tok->cache, h, w, len, out))
            return 0;
        out->n = start;
    }
    if (bl && tok->bl_fast) {
        for (size_t i = 0; i < len; i++) {
            r = sym_add(sc, &n, tok->bl_ids[(unsigned char)w[i]], 1);
            if (r < 0)
                return r;
        }
        sc->syms[n - 1].next = -1;
    } else if (bl) {
        r = bl_materialize(sc, w, len);
        if (r < 0)
            return r;
        r = init_symbols(tok, sc, sc->tmp.p, sc->tmp.len, &n);
        if (r < 0)
            return r;
    } else {
        r = init_symbols(tok, sc, w, len, &n);
        if (r < 0)
            return r;
    }
    r = merge_all(tok, sc, n);
    if (r < 0)
        return r;
    for (size_t i = 0; i < n; i++) {
        if (sc->syms[i].len == 0)
            continue;
        r = tk_ids_push(out, sc->syms[i].id);
        if (r < 0)
            return r;
    }
    if (tok->cache && len <= CACHE_KEY)
        cache_put(tok->cache, h, w, len, out->v + start, out->n - start);
    return 0;
}

/* SentencePiece-style words (no pre-tokenizer: a whole sentence is one word) are cut before
 * each U+2581 that follows another character when no merge can join across such a cut, so that
 * the pieces are short and cached. */
int tk_bpe_word(const struct ad_tokenizer *tok, struct tk_bpe_scratch *sc, const char *w,
                size_t len, bool bl, struct tk_ids *out)
{
    size_t start = 0;
    int r;

    if (bl || !tok->meta_split || len < 8)
        return bpe_word(tok, sc, w, len, bl, out);
    for (size_t i = 3; i + 3 <= len; i++) {
        if (memcmp(w + i, "\xe2\x96\x81", 3) != 0)
            continue;
        if (i >= start + 3 && memcmp(w + i - 3, "\xe2\x96\x81", 3) == 0)
            continue;
        if (i > start) {
            r = bpe_word(tok, sc, w + start, i - start, false, out);
            if (r < 0)
                return r;
            start = i;
        }
        i += 2;
    }
    return bpe_word(tok, sc, w + start, len - start, false, out);
}

void tk_bpe_scratch_fini(struct tk_bpe_scratch *sc)
{
    free(sc->syms);
    free(sc->heap);
    tk_buf_fini(&sc->tmp);
    memset(sc, 0, sizeof(*sc));
}

/* adapterd-bpe-train: learns a byte-level BPE vocabulary (GPT-2 style: the ByteLevel
 * pre-tokenizer with GPT-2's regex) from text files and writes a Hugging Face tokenizer.json
 * that adapterd and the Hugging Face library load and encode identically.
 *
 *   adapterd-bpe-train [--vocab-size N] [--min-frequency N] [--special TOKEN]...
 *                      [--bos TOKEN] [--eos TOKEN] [--chat-template FILE] -o OUT FILE...
 *
 * OUT ending in ".json" is the tokenizer.json to write; otherwise OUT is a directory that gets
 * tokenizer.json and tokenizer_config.json (bos/eos tokens, and the Jinja chat template read from
 * FILE). Special tokens take the first ids,
 * then the 256 byte-level characters, then the merges in the order they were learnt.
 *
 * The algorithm: count the pre-tokenized words, then repeatedly merge the most frequent
 * adjacent pair (ties: the pair seen first), updating only the words that contain it (an
 * index from pair to words) and a lazy max-heap of pair counts. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <jansson.h>
#include <pcre2.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "adapterd/util.h"

#define MAX_SPECIAL 64
#define MAX_VOCAB (1 << 20)

static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "adapterd-bpe-train: out of memory\n");
        exit(1);
    }
    return q;
}

/* ==========================================================================================
 * Words: distinct pre-tokenized byte strings with their counts */

struct word {
    uint32_t off, len; /* symbols in syms[] (len shrinks as pairs merge) */
    int64_t count;
};

static struct word *words;
static size_t n_words, cap_words;
static int32_t *syms;
static size_t n_syms, cap_syms;
static uint32_t *wslots; /* word hash table: word index + 1 */
static size_t wmask;
static char *wbytes;     /* the words' bytes, to compare on insert */
static size_t n_wbytes, cap_wbytes;
static uint32_t *wboff;

static uint32_t hash_bytes(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h ^ (h >> 15);
}

static void word_grow(void)
{
    size_t size = wmask ? (wmask + 1) * 2 : 1 << 16;
    uint32_t *ns = calloc(size, sizeof(*ns));

    if (!ns) {
        fprintf(stderr, "adapterd-bpe-train: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n_words; i++) {
        const struct word *w = &words[i];
        size_t j = hash_bytes(wbytes + wboff[i], w->len) & (size_t)(size - 1);
        while (ns[j])
            j = (j + 1) & (size - 1);
        ns[j] = (uint32_t)i + 1;
    }
    free(wslots);
    wslots = ns;
    wmask = size - 1;
}

/* byte -> symbol id of its byte-level character */
static int32_t byte_sym[256];

static void word_add(const char *s, size_t len)
{
    size_t j;

    if (len == 0)
        return;
    if (!wslots || (n_words + 1) * 2 > wmask + 1)
        word_grow();
    for (j = hash_bytes(s, len) & wmask; wslots[j]; j = (j + 1) & wmask) {
        struct word *w = &words[wslots[j] - 1];
        if (w->len == len && memcmp(wbytes + wboff[wslots[j] - 1], s, len) == 0) {
            w->count++;
            return;
        }
    }
    if (n_words == cap_words) {
        cap_words = cap_words ? cap_words * 2 : 4096;
        words = xrealloc(words, cap_words * sizeof(*words));
        wboff = xrealloc(wboff, cap_words * sizeof(*wboff));
    }
    while (n_wbytes + len > cap_wbytes) {
        cap_wbytes = cap_wbytes ? cap_wbytes * 2 : 1 << 20;
        wbytes = xrealloc(wbytes, cap_wbytes);
    }
    while (n_syms + len > cap_syms) {
        cap_syms = cap_syms ? cap_syms * 2 : 1 << 20;
        syms = xrealloc(syms, cap_syms * sizeof(*syms));
    }
    memcpy(wbytes + n_wbytes, s, len);
    wboff[n_words] = (uint32_t)n_wbytes;
    n_wbytes += len;
    for (size_t i = 0; i < len; i++)
        syms[n_syms + i] = byte_sym[(unsigned char)s[i]];
    words[n_words] = (struct word){.off = (uint32_t)n_syms, .len = (uint32_t)len, .count = 1};
    n_syms += len;
    wslots[j] = (uint32_t)++n_words;
}

/* ==========================================================================================
 * Pairs: counts, the words they occur in, a lazy max-heap */

struct pair {
    int32_t a, b;
    int64_t count;
    uint32_t *where; /* word indices (may repeat, may be stale) */
    size_t n_where, cap_where;
};

static struct pair *pairs;
static size_t n_pairs, cap_pairs;
static uint32_t *pslots;
static size_t pmask;

static uint32_t hash_pair(int32_t a, int32_t b)
{
    uint64_t k = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (uint32_t)k;
}

static void pair_grow(void)
{
    size_t size = pmask ? (pmask + 1) * 2 : 1 << 16;
    uint32_t *ns = calloc(size, sizeof(*ns));

    if (!ns) {
        fprintf(stderr, "adapterd-bpe-train: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n_pairs; i++) {
        size_t j = hash_pair(pairs[i].a, pairs[i].b) & (size - 1);
        while (ns[j])
            j = (j + 1) & (size - 1);
        ns[j] = (uint32_t)i + 1;
    }
    free(pslots);
    pslots = ns;
    pmask = size - 1;
}

static size_t pair_get(int32_t a, int32_t b)
{
    size_t j;

    if (!pslots || (n_pairs + 1) * 2 > pmask + 1)
        pair_grow();
    for (j = hash_pair(a, b) & pmask; pslots[j]; j = (j + 1) & pmask) {
        struct pair *p = &pairs[pslots[j] - 1];
        if (p->a == a && p->b == b)
            return pslots[j] - 1;
    }
    if (n_pairs == cap_pairs) {
        cap_pairs = cap_pairs ? cap_pairs * 2 : 1 << 16;
        pairs = xrealloc(pairs, cap_pairs * sizeof(*pairs));
    }
    pairs[n_pairs] = (struct pair){.a = a, .b = b};
    pslots[j] = (uint32_t)++n_pairs;
    return n_pairs - 1;
}

static void pair_where(size_t pi, uint32_t wi)
{
    struct pair *p = &pairs[pi];

    if (p->n_where && p->where[p->n_where - 1] == wi)
        return;
    if (p->n_where == p->cap_where) {
        p->cap_where = p->cap_where ? p->cap_where * 2 : 4;
        p->where = xrealloc(p->where, p->cap_where * sizeof(*p->where));
    }
    p->where[p->n_where++] = wi;
}

struct hent {
    int64_t count;
    uint32_t pair;
};

static struct hent *heap;
static size_t n_heap, cap_heap;

static bool hent_before(const struct hent *x, const struct hent *y)
{
    return x->count > y->count || (x->count == y->count && x->pair < y->pair);
}

static void heap_push(int64_t count, size_t pi)
{
    size_t i;

    if (n_heap == cap_heap) {
        cap_heap = cap_heap ? cap_heap * 2 : 1 << 16;
        heap = xrealloc(heap, cap_heap * sizeof(*heap));
    }
    struct hent e = {count, (uint32_t)pi};
    for (i = n_heap++; i > 0; i = (i - 1) / 2) {
        size_t p = (i - 1) / 2;
        if (!hent_before(&e, &heap[p]))
            break;
        heap[i] = heap[p];
    }
    heap[i] = e;
}

static struct hent heap_pop(void)
{
    struct hent top = heap[0], last = heap[--n_heap];
    size_t i = 0;

    for (;;) {
        size_t l = 2 * i + 1, m;
        if (l >= n_heap)
            break;
        m = l + 1 < n_heap && hent_before(&heap[l + 1], &heap[l]) ? l + 1 : l;
        if (!hent_before(&heap[m], &last))
            break;
        heap[i] = heap[m];
        i = m;
    }
    if (n_heap)
        heap[i] = last;
    return top;
}

/* ==========================================================================================
 * Vocabulary */

static char **tok_str;
static size_t *tok_len;
static size_t n_tok, cap_tok;
static json_t *vocab_obj; /* string -> id, to detect merges that produce an existing token */

static int32_t tok_add(const char *s, size_t len)
{
    json_t *ex;
    char *k = xrealloc(NULL, len + 1);

    memcpy(k, s, len);
    k[len] = '\0';
    ex = json_object_get(vocab_obj, k);
    if (ex) {
        free(k);
        return (int32_t)json_integer_value(ex);
    }
    if (n_tok == cap_tok) {
        cap_tok = cap_tok ? cap_tok * 2 : 1024;
        tok_str = xrealloc(tok_str, cap_tok * sizeof(*tok_str));
        tok_len = xrealloc(tok_len, cap_tok * sizeof(*tok_len));
    }
    tok_str[n_tok] = k;
    tok_len[n_tok] = len;
    json_object_set_new(vocab_obj, k, json_integer((json_int_t)n_tok));
    return (int32_t)n_tok++;
}

static size_t utf8_put(char *o, uint32_t cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    o[0] = (char)(0xc0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
}

static uint32_t byte_to_cp(int b)
{
    /* GPT-2: printable bytes stand for themselves, the others for U+0100 + n */
    if ((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff))
        return (uint32_t)b;
    int n = 0;
    for (int x = 0; x < b; x++)
        if (!((x >= 0x21 && x <= 0x7e) || (x >= 0xa1 && x <= 0xac) || (x >= 0xae && x <= 0xff)))
            n++;
    return 0x100u + (uint32_t)n;
}

/* ==========================================================================================
 * Training */

/* Length of the well-formed UTF-8 sequence at s, 0 if ill-formed. */
static size_t utf8_len(const unsigned char *s, size_t len)
{
    unsigned char c = s[0], lo = 0x80, hi = 0xbf;
    size_t n;

    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        lo = c == 0xe0 ? 0xa0 : 0x80;
        hi = c == 0xed ? 0x9f : 0xbf;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        lo = c == 0xf0 ? 0x90 : 0x80;
        hi = c == 0xf4 ? 0x8f : 0xbf;
    } else
        return 0;
    if (len < n)
        return 0;
    for (size_t i = 1; i < n; i++, lo = 0x80, hi = 0xbf)
        if (s[i] < lo || s[i] > hi)
            return 0;
    return n;
}

/* Replaces ill-formed bytes by U+FFFD, as adapterd and the reference do when encoding. */
static char *sanitize(char *buf, size_t *len)
{
    size_t i = 0, o = 0, n = *len;
    char *out = NULL;

    while (i < n) {
        size_t l = utf8_len((const unsigned char *)buf + i, n - i);
        if (l && !out) {
            i += l;
            continue;
        }
        if (!out) {
            out = xrealloc(NULL, n * 3 + 1);
            memcpy(out, buf, i);
            o = i;
        }
        if (l) {
            memcpy(out + o, buf + i, l);
            o += l;
            i += l;
        } else {
            memcpy(out + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        }
    }
    if (!out)
        return buf;
    free(buf);
    *len = o;
    return out;
}

static void count_file(const char *path, pcre2_code *re, pcre2_match_data *md)
{
    char *buf;
    size_t len, pos = 0;
    struct ad_err err;

    if (ad_read_file(path, (size_t)1 << 31, &buf, &len, &err) < 0) {
        fprintf(stderr, "adapterd-bpe-train: %s\n", err.msg);
        exit(1);
    }
    buf = sanitize(buf, &len);
    while (pos < len) {
        int rc = pcre2_match(re, (PCRE2_SPTR)buf, len, pos, PCRE2_NO_UTF_CHECK, md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0) {
            fprintf(stderr, "adapterd-bpe-train: %s: regex error %d\n", path, rc);
            exit(1);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        if (ov[1] <= pos) {
            pos++;
            continue;
        }
        word_add(buf + ov[0], ov[1] - ov[0]);
        pos = ov[1];
    }
    free(buf);
}

/* Merges pair pi everywhere. */
static void apply_merge(size_t pi, int32_t new_id)
{
    struct pair p = pairs[pi];

    pairs[pi].count = 0;
    for (size_t k = 0; k < p.n_where; k++) {
        uint32_t wi = p.where[k];
        struct word *w = &words[wi];
        int32_t *s = syms + w->off;
        size_t o = 0;
        for (size_t i = 0; i < w->len; i++) {
            if (i + 1 < w->len && s[i] == p.a && s[i + 1] == p.b) {
                /* neighbours lose their old pairs, gain new ones */
                if (o > 0) {
                    size_t q = pair_get(s[o - 1], p.a);
                    if (q != pi)
                        pairs[q].count -= w->count;
                    q = pair_get(s[o - 1], new_id);
                    if (q != pi) {
                        pairs[q].count += w->count;
                        pair_where(q, wi);
                        heap_push(pairs[q].count, q);
                    }
                }
                if (i + 2 < w->len) {
                    size_t q = pair_get(p.b, s[i + 2]);
                    if (q != pi)
                        pairs[q].count -= w->count;
                    q = pair_get(new_id, s[i + 2]);
                    if (q != pi) {
                        pairs[q].count += w->count;
                        pair_where(q, wi);
                        heap_push(pairs[q].count, q);
                    }
                }
                s[o++] = new_id;
                i++;
            } else {
                s[o++] = s[i];
            }
        }
        w->len = (uint32_t)o;
    }
    /* the pair's own count was reset above; nothing of it remains */
    free(p.where);
    pairs[pi].where = NULL;
    pairs[pi].n_where = pairs[pi].cap_where = 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: adapterd-bpe-train [--vocab-size N] [--min-frequency N] "
                    "[--special TOKEN]... [--bos TOKEN] [--eos TOKEN] [--chat-template FILE] "
                    "-o OUT FILE...\n");
    exit(2);
}

static long parse_long(const char *s)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || v < 0)
        usage();
    return v;
}

static int write_json(const char *path, json_t *j)
{
    if (json_dump_file(j, path, JSON_INDENT(1) | JSON_PRESERVE_ORDER) != 0) {
        fprintf(stderr, "adapterd-bpe-train: cannot write %s\n", path);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *specials[MAX_SPECIAL], *out = NULL, *bos = NULL, *eos = NULL,
               *chat_template = NULL;
    size_t n_special = 0, vocab_size = 8000;
    int64_t min_freq = 2;
    const char *files[256];
    size_t n_files = 0;
    json_t *merges, *added, *root, *model;
    int ec;
    PCRE2_SIZE eo;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--vocab-size") == 0 && i + 1 < argc)
            vocab_size = (size_t)parse_long(argv[++i]);
        else if (strcmp(argv[i], "--min-frequency") == 0 && i + 1 < argc)
            min_freq = parse_long(argv[++i]);
        else if (strcmp(argv[i], "--special") == 0 && i + 1 < argc && n_special < MAX_SPECIAL)
            specials[n_special++] = argv[++i];
        else if (strcmp(argv[i], "--bos") == 0 && i + 1 < argc)
            bos = argv[++i];
        else if (strcmp(argv[i], "--eos") == 0 && i + 1 < argc)
            eos = argv[++i];
        else if (strcmp(argv[i], "--chat-template") == 0 && i + 1 < argc)
            chat_template = argv[++i];
        else if (strcmp(argv[i], "-o") == 0 && i + 1 < argc)
            out = argv[++i];
        else if (argv[i][0] == '-')
            usage();
        else if (n_files < sizeof(files) / sizeof(files[0]))
            files[n_files++] = argv[i];
    }
    if (!out || !n_files || vocab_size > MAX_VOCAB)
        usage();
    if (min_freq < 1)
        min_freq = 1;

    vocab_obj = json_object();
    for (size_t i = 0; i < n_special; i++)
        tok_add(specials[i], strlen(specials[i]));
    for (int b = 0; b < 256; b++) {
        char enc[4];
        byte_sym[b] = tok_add(enc, utf8_put(enc, byte_to_cp(b)));
    }

    pcre2_code *re = pcre2_compile((PCRE2_SPTR)GPT2_PATTERN, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP, &ec, &eo, NULL);
    if (!re) {
        fprintf(stderr, "adapterd-bpe-train: regex error %d\n", ec);
        return 1;
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    for (size_t i = 0; i < n_files; i++)
        count_file(files[i], re, md);
    pcre2_match_data_free(md);
    pcre2_code_free(re);

    /* initial pair counts */
    for (size_t wi = 0; wi < n_words; wi++) {
        const struct word *w = &words[wi];
        for (size_t i = 0; i + 1 < w->len; i++) {
            size_t q = pair_get(syms[w->off + i], syms[w->off + i + 1]);
            pairs[q].count += w->count;
            pair_where(q, (uint32_t)wi);
        }
    }
    for (size_t q = 0; q < n_pairs; q++)
        heap_push(pairs[q].count, q);

    merges = json_array();
    while (n_tok < vocab_size && n_heap) {
        struct hent top = heap_pop();
        struct pair *p = &pairs[top.pair];
        if (top.count != p->count) {
            /* stale: requeue with the current count (increments pushed their own entry) */
            if (p->count > 0 && top.count > p->count)
                heap_push(p->count, top.pair);
            continue;
        }
        if (p->count < min_freq)
            break;
        size_t la = tok_len[p->a], lb = tok_len[p->b];
        char *s = xrealloc(NULL, la + lb);
        memcpy(s, tok_str[p->a], la);
        memcpy(s + la, tok_str[p->b], lb);
        int32_t a = p->a, b = p->b;
        int32_t nid = tok_add(s, la + lb);
        free(s);
        json_t *m = json_array();
        json_array_append_new(m, json_stringn(tok_str[a], tok_len[a]));
        json_array_append_new(m, json_stringn(tok_str[b], tok_len[b]));
        json_array_append_new(merges, m);
        apply_merge(top.pair, nid);
    }

    added = json_array();
    for (size_t i = 0; i < n_special; i++)
        json_array_append_new(added, json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id",
                                               (int)i, "content", specials[i], "single_word", 0,
                                               "lstrip", 0, "rstrip", 0, "normalized", 0,
                                               "special", 1));
    model = json_pack("{s:s, s:n, s:n, s:n, s:n, s:b, s:b, s:b}", "type", "BPE", "dropout",
                      "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk",
                      0, "byte_fallback", 0, "ignore_merges", 0);
    json_object_set_new(model, "vocab", vocab_obj);
    json_object_set_new(model, "merges", merges);
    root = json_pack("{s:s, s:n, s:n, s:o, s:n, s:{s:s, s:b, s:b, s:b}, s:{s:s, s:b, s:b, s:b}, "
                     "s:{s:s, s:b, s:b, s:b}, s:o}",
                     "version", "1.0", "truncation", "padding", "added_tokens", added,
                     "normalizer", "pre_tokenizer", "type", "ByteLevel", "add_prefix_space", 0,
                     "trim_offsets", 1, "use_regex", 1, "post_processor", "type", "ByteLevel",
                     "add_prefix_space", 1, "trim_offsets", 0, "use_regex", 1, "decoder",
                     "type", "ByteLevel", "add_prefix_space", 1, "trim_offsets", 1, "use_regex",
                     1, "model", model);
    if (!root) {
        fprintf(stderr, "adapterd-bpe-train: out of memory\n");
        return 1;
    }
    size_t ol = strlen(out);
    if (ol >= 5 && strcmp(out + ol - 5, ".json") == 0) {
        if (write_json(out, root) < 0)
            return 1;
    } else {
        char path[4096];
        json_t *cfg;
        mkdir(out, 0755);
        if (ad_path_join(path, sizeof(path), out, "tokenizer.json") < 0 ||
            write_json(path, root) < 0)
            return 1;
        cfg = json_pack("{s:s, s:b, s:b, s:i}", "tokenizer_class", "PreTrainedTokenizerFast",
                        "add_bos_token", bos != NULL, "add_eos_token", 0, "model_max_length",
                        1 << 20);
        if (bos)
            json_object_set_new(cfg, "bos_token", json_string(bos));
        if (eos)
            json_object_set_new(cfg, "eos_token", json_string(eos));
        if (chat_template) {
            struct ad_err err;
            char *text;
            if (ad_read_file(chat_template, 1 << 20, &text, NULL, &err) < 0) {
                fprintf(stderr, "adapterd-bpe-train: %s\n", err.msg);
                return 1;
            }
            json_object_set_new(cfg, "chat_template", json_string(text));
            free(text);
        }
        if (ad_path_join(path, sizeof(path), out, "tokenizer_config.json") < 0 ||
            write_json(path, cfg) < 0)
            return 1;
        json_decref(cfg);
    }
    fprintf(stderr, "adapterd-bpe-train: %zu words, %zu tokens, %zu merges\n", n_words, n_tok,
            json_array_size(merges));
    json_decref(root);
    return 0;
}

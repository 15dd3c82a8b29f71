/* Private to src/model/tokenizer*.c: the tokenizer's data structures. */
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "adapterd/tokenizer.h"
#include "adapterd/util.h"

/* ==========================================================================================
 * Small containers */

/* A growable byte buffer. */
struct tk_buf {
    char *p;
    size_t len, cap;
};

int tk_buf_reserve(struct tk_buf *b, size_t extra);
int tk_buf_put(struct tk_buf *b, const void *s, size_t n);
void tk_buf_fini(struct tk_buf *b);

/* A growable int32 vector. */
struct tk_ids {
    int32_t *v;
    size_t n, cap;
};

int tk_ids_push(struct tk_ids *a, int32_t id);

/* String -> int32 hash map; keys are (offset, length) in a pool owned by the caller, so that the
 * pool may grow while the map is built. */
struct tk_map_ent {
    uint32_t off, len, hash;
    int32_t val;
};

struct tk_map {
    uint32_t *slots; /* entry index + 1, 0 = empty */
    uint32_t mask;
    struct tk_map_ent *ents;
    uint32_t n, cap;
};

uint32_t tk_hash(const void *s, size_t n);
/* Inserts or overwrites (later wins, as a Rust HashMap collect does). Returns 0 or -ENOMEM. */
int tk_map_put(struct tk_map *m, const char *pool, uint32_t off, uint32_t len, int32_t val);
/* Returns the value or -1. */
int32_t tk_map_get(const struct tk_map *m, const char *pool, const char *s, size_t len);
void tk_map_fini(struct tk_map *m);

/* (left id, right id) -> (rank, merged id). */
struct tk_merges {
    uint64_t *keys; /* UINT64_MAX = empty */
    uint32_t *rank;
    int32_t *new_id;
    uint32_t mask, n;
};

/* ==========================================================================================
 * Unicode helpers (tokenizer_text.c) */

/* Length of the valid UTF-8 prefix of s. */
size_t tk_utf8_valid_prefix(const char *s, size_t len);
/* Decodes one character of valid UTF-8 at s (len > 0); returns its length, *cp the code point. */
size_t tk_utf8_next(const char *s, size_t len, uint32_t *cp);
/* Encodes cp; returns the length (1..4). */
size_t tk_utf8_put(char *out, uint32_t cp);
/* Appends s with every ill-formed subpart replaced by U+FFFD (maximal subparts, as the WHATWG
 * decoder). If final is false, an incomplete sequence at the end is not converted: *ret_used
 * tells how many input bytes were consumed. */
int tk_utf8_lossy(struct tk_buf *out, const char *s, size_t len, bool final, size_t *ret_used);
/* Rust's char::is_whitespace (Unicode White_Space). */
bool tk_is_whitespace(uint32_t cp);
/* Rust regex \w: alphabetic, marks, decimal digits, connector punctuation, joiners. */
bool tk_is_word(uint32_t cp);
/* ASCII punctuation or Unicode category P*. */
bool tk_is_punct(uint32_t cp);

/* ==========================================================================================
 * Components read from tokenizer.json */

enum tk_pattern_kind { TK_PAT_STRING, TK_PAT_REGEX };

struct tk_pattern {
    enum tk_pattern_kind kind;
    char *str; /* the literal (TK_PAT_STRING) */
    size_t len;
    pcre2_code *re; /* TK_PAT_REGEX */
};

enum tk_norm_type {
    TK_NORM_NFC,
    TK_NORM_NFD,
    TK_NORM_NFKC,
    TK_NORM_NFKD,
    TK_NORM_LOWERCASE,
    TK_NORM_STRIP,
    TK_NORM_PREPEND,
    TK_NORM_APPEND,
    TK_NORM_REPLACE,
    TK_NORM_BYTELEVEL,
    TK_NORM_SEQUENCE,
};

struct tk_norm {
    enum tk_norm_type type;
    bool strip_left, strip_right;
    struct tk_pattern pat; /* REPLACE */
    char *content;         /* PREPEND, APPEND, REPLACE */
    size_t content_len;
    struct tk_norm *subs; /* SEQUENCE */
    size_t n_subs;
};

enum tk_behavior {
    TK_SPLIT_REMOVED,
    TK_SPLIT_ISOLATED,
    TK_SPLIT_MERGED_PREV,
    TK_SPLIT_MERGED_NEXT,
    TK_SPLIT_CONTIGUOUS,
};

enum tk_pre_type {
    TK_PRE_BYTELEVEL,
    TK_PRE_SPLIT,
    TK_PRE_METASPACE,
    TK_PRE_DIGITS,
    TK_PRE_WHITESPACE,
    TK_PRE_WHITESPACE_SPLIT,
    TK_PRE_PUNCTUATION,
    TK_PRE_BERT,
    TK_PRE_CHAR_DELIMITER,
    TK_PRE_SEQUENCE,
};

enum tk_prepend_scheme { TK_PREPEND_ALWAYS, TK_PREPEND_FIRST, TK_PREPEND_NEVER };

struct tk_pre {
    enum tk_pre_type type;
    bool add_prefix_space, use_regex; /* BYTELEVEL */
    struct tk_pattern pat;            /* SPLIT; BYTELEVEL's GPT-2 regex */
    enum tk_behavior behavior;        /* SPLIT, PUNCTUATION */
    bool invert;                      /* SPLIT */
    uint32_t ch;                      /* METASPACE replacement, CHAR_DELIMITER */
    enum tk_prepend_scheme prepend;   /* METASPACE */
    bool split;                       /* METASPACE */
    bool individual_digits;           /* DIGITS */
    struct tk_pre *subs;              /* SEQUENCE */
    size_t n_subs;
};

enum tk_dec_type {
    TK_DEC_BYTELEVEL,
    TK_DEC_METASPACE,
    TK_DEC_REPLACE,
    TK_DEC_BYTE_FALLBACK,
    TK_DEC_FUSE,
    TK_DEC_STRIP,
    TK_DEC_BPE,
    TK_DEC_SEQUENCE,
};

struct tk_dec {
    enum tk_dec_type type;
    uint32_t ch;                    /* METASPACE replacement, STRIP content */
    enum tk_prepend_scheme prepend; /* METASPACE */
    size_t start, stop;             /* STRIP */
    char *pat, *content;            /* REPLACE (literal pattern only), BPE suffix in pat */
    size_t pat_len, content_len;
    struct tk_dec *subs;
    size_t n_subs;
};

/* A post-processor, flattened: ids to emit, TK_POST_SEQ marking where the sequence goes. */
#define TK_POST_SEQ (-1)

struct tk_added {
    int32_t id;
    uint32_t off, len;   /* content in the pool */
    uint32_t noff, nlen; /* normalized content (normalized tokens) */
    bool special, lstrip, rstrip, normalized, single_word;
};

/* A byte trie over added-token contents, for leftmost-longest matching. */
struct tk_trie_node {
    int32_t child, sibling, term; /* term: index into added[], or -1 */
    uint8_t byte;
};

struct tk_trie {
    struct tk_trie_node *nodes;
    size_t n, cap;
    uint8_t first[32]; /* bitmap of first bytes */
};

/* ==========================================================================================
 * The tokenizer */

#define TK_PRESENT 1u
#define TK_SPECIAL 2u
#define TK_ADDED 4u

struct tk_tok {
    uint32_t off, len; /* the token string in the pool */
    uint32_t doff, dlen; /* ByteLevel-decoded bytes in dpool (when the decoder is ByteLevel) */
    uint8_t flags;
};

struct tk_cache;

struct ad_tokenizer {
    struct tk_buf pool;  /* token strings, NUL-separated */
    struct tk_buf dpool; /* decoded token bytes */
    struct tk_tok *toks;
    size_t n_vocab;
    struct tk_map vocab; /* model vocabulary */
    struct tk_map added_map;
    struct tk_merges merges;

    /* BPE model */
    int32_t unk_id; /* -1 if none */
    bool has_unk;   /* unk_token named (even if missing from the vocab) */
    bool fuse_unk, byte_fallback, ignore_merges;
    char *prefix, *suffix; /* continuing_subword_prefix, end_of_word_suffix (NULL if none) */
    size_t prefix_len, suffix_len;
    int32_t byte_ids[256]; /* <0xXX> tokens for byte_fallback, -1 if absent */
    int32_t bl_ids[256];   /* the ids of the 256 byte-level characters, -1 if absent */
    bool bl_fast;          /* BPE may run on raw bytes for byte-level pieces */
    bool meta_split;       /* words may be cut before a U+2581 that follows another character:
                            * no merge joins such a pair (see parse_merges) */

    struct tk_added *added;
    size_t n_added;
    struct tk_trie trie_raw, trie_norm;

    struct tk_norm *norm;
    struct tk_pre *pre;
    struct tk_dec *dec;
    bool dec_bytelevel_only; /* the decoder is exactly ByteLevel: use dpool */
    int32_t *post;           /* flattened single-sequence template, NULL = none */
    size_t n_post;

    pcre2_match_context *mctx; /* match limits for regexes from the file (read-only) */
    size_t max_re_ovector;

    struct tk_cache *cache;

    /* tokenizer_config.json */
    int32_t bos_id, eos_id;
    bool add_bos, add_eos;
    char *chat_template;
};

/* tokenizer_bpe.c */
int tk_merges_put(struct tk_merges *m, int32_t a, int32_t b, uint32_t rank, int32_t new_id);
bool tk_merges_get(const struct tk_merges *m, int32_t a, int32_t b, uint32_t *rank,
                   int32_t *new_id);
void tk_merges_fini(struct tk_merges *m);
int tk_merges_init(struct tk_merges *m, size_t n);

struct tk_bpe_scratch {
    struct tk_sym *syms;
    size_t cap_syms;
    struct tk_heap_ent *heap;
    size_t cap_heap;
    struct tk_buf tmp;
};

/* Appends the ids of one pre-tokenized word. bl: the word is raw bytes that stand for their
 * byte-level characters. Returns 0 or -ENOMEM. */
int tk_bpe_word(const struct ad_tokenizer *tok, struct tk_bpe_scratch *sc, const char *w,
                size_t len, bool bl, struct tk_ids *out);
void tk_bpe_scratch_fini(struct tk_bpe_scratch *sc);
int tk_cache_new(struct tk_cache **ret);
void tk_cache_free(struct tk_cache *c);

/* tokenizer_text.c: the byte-level alphabet */
extern const uint16_t tk_byte_to_cp[256];
/* The byte a byte-level code point stands for, or -1. */
int tk_cp_to_byte(uint32_t cp);

/* tokenizer_encode.c */
void tk_norm_free(struct tk_norm *n);
void tk_pre_free(struct tk_pre *p);
void tk_dec_free(struct tk_dec *d);
void tk_pattern_fini(struct tk_pattern *p);
int tk_trie_add(struct tk_trie *t, const char *s, size_t len, int32_t term);
void tk_trie_fini(struct tk_trie *t);
/* Applies the normalizer to s, writing the result to out (appended). */
int tk_normalize(const struct ad_tokenizer *tok, const struct tk_norm *n, const char *s,
                 size_t len, bool at_start, struct tk_buf *out, struct ad_err *err);

/* tokenizer_decode.c: decodes ids to raw bytes (before the final lossy UTF-8 conversion) */
int tk_decode_raw(const struct ad_tokenizer *tok, const int32_t *ids, size_t n,
                  bool skip_special, struct tk_buf *out);

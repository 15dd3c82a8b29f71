/* adapterd: the frozen base model: Hugging Face config and weights, architecture tables,
 * sites, the paged KV cache, the batched forward pass and the sampler. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ad_err;
struct ad_st_file;

/* ==========================================================================================
 * Configuration (config.json + generation_config.json) */

enum ad_family {
    AD_FAMILY_LLAMA, /* LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (SmolLM = Llama) */
    AD_FAMILY_GPT2,  /* GPT2LMHeadModel */
};

enum ad_rope_scaling {
    AD_ROPE_NONE,
    AD_ROPE_LINEAR, /* positions / factor */
    AD_ROPE_LLAMA3, /* Llama 3.1 frequency-band scaling */
};

enum ad_act {
    AD_ACT_SILU,
    AD_ACT_GELU_TANH, /* GPT-2's gelu_new, gelu_pytorch_tanh */
    AD_ACT_GELU,      /* exact erf gelu */
};

#define AD_MAX_EOS 8

struct ad_model_config {
    enum ad_family family;
    char architecture[64]; /* as in config.json "architectures"[0] */
    char model_type[32];
    int n_vocab;
    int n_embd;      /* hidden size */
    int n_layer;
    int n_head;
    int n_kv_head;   /* == n_head without grouped-query attention */
    int head_dim;    /* n_embd / n_head unless config.json says otherwise */
    int n_ff;        /* intermediate size */
    int n_ctx_max;   /* max_position_embeddings / n_positions */
    float norm_eps;
    float rope_theta;
    enum ad_rope_scaling rope_scaling;
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_orig_ctx;
    int sliding_window; /* 0 = none */
    enum ad_act act;
    bool qkv_bias;  /* bias on q, k, v projections (Qwen2, attention_bias) */
    bool o_bias;    /* bias on the attention output projection */
    bool mlp_bias;  /* bias on MLP projections */
    bool tie_embeddings;
    int bos_id;     /* -1 if none */
    int eos_ids[AD_MAX_EOS];
    int n_eos;
};

/* Parses a config.json text (and, if gen_json is non-NULL, generation_config.json text whose
 * eos ids take precedence). Returns 0 or -EINVAL / -ENOTSUP with err naming the key. */
int ad_model_config_parse(const char *json, const char *gen_json, struct ad_model_config *cfg,
                          struct ad_err *err);

/* ==========================================================================================
 * Architectures and sites
 *
 * A site is one linear map of the model, computed once per batch for every row (DESIGN.md).
 * Adapters find their sites by PEFT module path (e.g. "model.layers.3.self_attn.q_proj"). */

enum ad_role {
    AD_ROLE_Q,
    AD_ROLE_K,
    AD_ROLE_V,
    AD_ROLE_QKV, /* fused q, k, v (GPT-2 c_attn): out = [q | k | v] */
    AD_ROLE_O,
    AD_ROLE_GATE,
    AD_ROLE_UP,   /* GPT-2 mlp.c_fc */
    AD_ROLE_DOWN, /* GPT-2 mlp.c_proj */
    AD_ROLE_LM_HEAD,
    AD_ROLE_COUNT,
};

struct ad_site {
    int layer;      /* -1 for lm_head */
    enum ad_role role;
    int n_in, n_out;
    const float *w; /* [n_out, n_in], or [n_in, n_out] when w_in_out (Conv1D) */
    const float *b; /* [n_out] or NULL */
    bool w_in_out;
    char path[96];  /* PEFT module path, e.g. "model.layers.3.self_attn.q_proj" */
};

struct ad_layer {
    const float *norm1_w, *norm1_b; /* before attention (b: LayerNorm only) */
    const float *norm2_w, *norm2_b; /* before the MLP */
    struct ad_site *site[AD_ROLE_COUNT]; /* NULL where the family has no such module */
};

struct ad_model {
    struct ad_model_config cfg;
    const struct ad_arch *arch;
    char id[128]; /* the model's name in the API: the directory's base name */

    const float *tok_embd; /* [n_vocab, n_embd] */
    const float *pos_embd; /* [n_ctx_max, n_embd] (GPT-2) or NULL */
    const float *final_norm_w, *final_norm_b;
    struct ad_layer *layers;
    struct ad_site *sites; /* every linear, layer by layer, lm_head last */
    int n_sites;
    float *rope_inv_freq; /* [head_dim / 2] */
    size_t weight_bytes;  /* bytes of weights a decode step reads */

    /* private: loaded files and converted buffers */
    struct ad_st_file **files;
    int n_files;
    void **owned;
    int n_owned;
};

/* Loads a Hugging Face model directory (config.json, model.safetensors or
 * model.safetensors.index.json + shards, optional generation_config.json). f32 tensors are used
 * in place from the read-only mapping; f16/bf16 are converted to f32 copies. Returns 0 and a new
 * model, or -errno with err naming the file, tensor and expected vs found shape. */
int ad_model_load(const char *dir, struct ad_model **ret, struct ad_err *err);
void ad_model_free(struct ad_model *m);

/* Module-path pieces of the model's family: the root ("model.", "transformer.") and the layer
 * format relative to it ("layers.%d.", "h.%d."). Static strings. */
const char *ad_model_root(const struct ad_model *m);
const char *ad_model_layer_fmt(const struct ad_model *m);

enum ad_norm_slot {
    AD_NORM_ATTN,  /* before attention */
    AD_NORM_MLP,   /* before the MLP */
    AD_NORM_FINAL, /* after the last layer */
};

/* The norm with this module path (e.g. "model.layers.2.input_layernorm", "transformer.ln_f"),
 * with or without the root prefix. Returns 0 with ret_layer (-1 for the final norm) and ret_slot,
 * or -ENOENT. */
int ad_model_find_norm(const struct ad_model *m, const char *path, int *ret_layer,
                       enum ad_norm_slot *ret_slot);

/* Which embedding the module path names (with or without the root, e.g. "model.embed_tokens",
 * "transformer.wpe"): 0 the tokens', 1 the positions', or -ENOENT. */
int ad_model_find_embedding(const struct ad_model *m, const char *path);

/* The module path of a norm (e.g. "model.layers.2.input_layernorm", "transformer.ln_f"; layer
 * -1 for the final one) into buf. */
void ad_model_norm_path(const struct ad_model *m, int layer, enum ad_norm_slot slot, char *buf,
                        size_t size);

/* The site with this PEFT module path (with or without a leading "model."/"transformer."
 * as the family has it), or NULL. */
const struct ad_site *ad_model_find_site(const struct ad_model *m, const char *path);

/* ==========================================================================================
 * Paged KV cache
 *
 * A pool of fixed-size blocks; each sequence has a block table. Owned by one thread (the engine);
 * not thread-safe. Layout: for each layer, K and V as [block][slot][n_kv_head * head_dim].
 * A sequence's first n_shared positions (a prefix-tuning adapter's virtual K/V) are not cached:
 * they are read from the adapter, which all its sequences share. Position p >= n_shared is at
 * slot p - n_shared of the block table.
 *
 * Prefix caching: a full block whose K/V are known can be published under its content (the
 * tokens of the sequence up to its end, and a key for the adapters they were computed with).
 * Blocks are reference-counted; a new sequence whose tokens start the same way attaches the
 * published blocks instead of computing them again. Only full blocks are shared, and a
 * sequence writes only past its last full block, so a shared block is never written. A block
 * no sequence holds stays published until the pool needs it: blocks that hold nothing
 * published are reused first, then published ones, least recently released first. Lookups
 * compare the block's tokens exactly; the tokens before it are identified by a keyed 64-bit
 * hash of the chain (SipHash-2-4 with a random key per pool). */

struct ad_kv_block;

struct ad_kv {
    int n_layer, kv_dim, block_size, n_blocks;
    float *k, *v;
    int n_free;   /* blocks no sequence holds (published ones included) */
    int n_cached; /* published blocks, held or free */
    /* private */
    struct ad_kv_block *blk;
    int32_t free_head, free_tail; /* free list, next to reuse first */
    int32_t *table;               /* published blocks by hash, open addressing; -1: empty */
    uint32_t table_mask;
    int32_t *tokens;              /* [n_blocks][block_size]: a published block's tokens */
    unsigned char *hbuf;          /* hash input */
    unsigned char key[16];
};

struct ad_kv_seq {
    int n_tokens; /* positions whose K/V are known: n_shared, then the cached ones */
    int n_shared; /* leading positions read from the hooks' prefix (ad_hooks), not cached */
    int n_blocks, cap;
    int32_t *blocks;
    int n_published; /* leading blocks already published (or found published) */
    uint64_t chain;  /* hash of the last of them */
};

/* Allocates a pool of n_blocks blocks of block_size tokens for m. Returns 0 or -ENOMEM. */
int ad_kv_init(struct ad_kv *kv, const struct ad_model_config *cfg, int n_blocks, int block_size);
void ad_kv_fini(struct ad_kv *kv);
/* Makes room for n_tokens positions in total, the first s->n_shared of them not cached (blocks
 * for n_tokens - n_shared); returns 0 or -ENOSPC (nothing changed) / -ENOMEM. May reuse
 * published blocks no sequence holds (they are unpublished). */
int ad_kv_seq_reserve(struct ad_kv *kv, struct ad_kv_seq *s, int n_tokens);
/* Drops the sequence's hold on its blocks and empties it (n_tokens = n_shared = 0). Blocks no
 * other sequence holds go back to the pool; published ones stay findable until reused. */
void ad_kv_seq_release(struct ad_kv *kv, struct ad_kv_seq *s);
/* Blocks needed for n cached tokens. */
int ad_kv_blocks_for(const struct ad_kv *kv, int n_tokens);

/* A keyed hash (the pool's key) of len bytes, e.g. to make the mix key of a set of adapters. */
uint64_t ad_kv_hash(const struct ad_kv *kv, const void *data, size_t len);
/* Attaches to the empty sequence s the longest run of published full blocks holding
 * tokens[0..n_tokens) computed under mix (n_tokens is rounded down to whole blocks). On a hit
 * s starts with n_shared uncached positions (the mix's prefix, as the forward pass would set),
 * and s->n_tokens = n_shared + the tokens attached. Returns the tokens attached (0: s holds no
 * block and is still empty). */
int ad_kv_seq_match(struct ad_kv *kv, struct ad_kv_seq *s, uint64_t mix, int n_shared,
                    const int32_t *tokens, int n_tokens);
/* Publishes the sequence's full blocks not published yet; tokens[i] is the token of cached
 * position i (position n_shared + i). A block whose content is published already (by another
 * sequence) stays private. */
void ad_kv_seq_publish(struct ad_kv *kv, struct ad_kv_seq *s, uint64_t mix, const int32_t *tokens);

/* ==========================================================================================
 * Hook points
 *
 * The forward pass computes the base model and offers these points to whatever adapts it
 * (DESIGN.md); it never knows what an adapter is. Each row group of a batch (adjacent chunks
 * with the same ctx) calls the pass's table with that ctx; for a NULL ctx (the base model) no
 * hook is called. The adapter layer fills one table for serving (adapter.h: ad_mix_hooks, ctx a
 * struct ad_mix); the trainer fills its own. A NULL function is a point nobody adapts. The
 * functions only read ctx, so groups may call them from several threads at once where a field
 * says so. */
struct ad_hooks {
    /* Prompt tuning: virtual tokens a sequence starts with (its token ids -1, -2, ...), and the
     * embedding [n_embd] of virtual token v (0-based), valid while ctx is. */
    int (*n_virtual)(const void *ctx);
    const float *(*virtual_embedding)(const void *ctx, int v);
    /* Replaced embeddings (modules_to_save, full fine-tuning's sparse deltas): the row [n_embd]
     * of token tok, or of position pos (GPT-2's learned positions), in place of the base's; NULL
     * keeps the base's. Valid while ctx is. */
    const float *(*embedding)(const void *ctx, int tok);
    const float *(*position)(const void *ctx, int pos);
    /* Prefix tuning: positions of virtual keys and values before a sequence's own, and those of
     * a layer, keys (kv = 0) or values (kv = 1) as [n_prefix, n_kv_head * head_dim], never
     * rotated, valid while ctx is. */
    int (*n_prefix)(const void *ctx);
    const float *(*prefix)(const void *ctx, int layer, int kv);
    /* A norm's parameters: *w and *b hold the base's and may be replaced. */
    void (*norm)(const void *ctx, int layer, enum ad_norm_slot slot, const float **w,
                 const float **b);
    /* A site's input side, before the linear, on the group's n rows of x in place; only for
     * sites whose input no other site reads. Returns true if it changed x. */
    bool (*site_pre)(const void *ctx, const struct ad_site *s, float *x, int ldx, int n);
    /* A site's output side: y holds the base's result for the group's n rows of x (x_scaled:
     * site_pre changed x) and is updated in place; tmp holds tmp_len floats of work space. */
    void (*site_post)(const void *ctx, const struct ad_site *s, const float *x, int ldx,
                      bool x_scaled, float *y, int ldy, int n, float *tmp, size_t tmp_len);
    /* Whether site_post(ctx, s, ..., x_scaled) makes no BLAS call and needs no more than
     * AD_HOOK_LOCAL_TMP floats of tmp for any n: such calls may run on several threads at once
     * (one tmp each) for different rows or sites, also while another thread calls BLAS. */
    bool (*site_post_local)(const void *ctx, const struct ad_site *s, bool x_scaled);
    /* A sub-layer's output y [n, n_embd] (after attention: slot AD_NORM_ATTN, after the MLP:
     * AD_NORM_MLP), with x the residual stream entering the sub-layer, updated in place. */
    void (*sublayer)(const void *ctx, int layer, enum ad_norm_slot slot, const float *x,
                     float *y, int n, float *tmp, size_t tmp_len);

    /* ---- Training (ad_model_train): the backward of each point; NULL for serving. Each is
     * called once per batch and point, from the training thread, for all n rows, and may use
     * ad_train_sgemm. It gets what its forward point got, and the gradient of the loss with
     * respect to that point's output; it accumulates the gradients of ctx's parameters (ctx is
     * the one the forward got, written through here) and hands back the gradient with respect
     * to the point's input. */
    /* d: the gradient with respect to the embedding of virtual token v [n_embd], per row that
     * is one (rows of several sequences call it for the same v). */
    void (*virtual_grad)(void *ctx, int v, const float *d);
    /* d: the gradient with respect to a layer's prefix keys (kv 0) or values (kv 1),
     * [n_prefix, n_kv_head * head_dim], summed over the batch's sequences. */
    void (*prefix_grad)(void *ctx, int layer, int kv, const float *d);
    /* dw, db: the gradients with respect to the norm's parameters in effect [n_embd] (db NULL
     * for RMSNorm), summed over the rows. */
    void (*norm_grad)(void *ctx, int layer, enum ad_norm_slot slot, const float *dw,
                      const float *db);
    /* Whether site_post_grad needs yb, the base linear's output (before site_post). */
    bool (*site_wants_yb)(const void *ctx, const struct ad_site *s);
    /* A site's output side: x as site_post got it (before site_pre), yb the base's output if
     * site_wants_yb said so (else NULL), dy the gradient with respect to the site's output.
     * Adds to dx the gradient that reaches x through ctx's own path (LoRA: B A), and overwrites
     * dy with the gradient with respect to yb (what flows on through W). Returns false when W
     * is not on the path at all (a replaced module): the model then skips it. */
    bool (*site_post_grad)(void *ctx, const struct ad_site *s, const float *x, int ldx,
                           const float *yb, float *dy, int ldy, float *dx, int lddx, int n);
    /* A site's input side: g is the gradient with respect to the linear's input (x after
     * site_pre): turn it into the gradient with respect to x, in place. */
    void (*site_pre_grad)(void *ctx, const struct ad_site *s, const float *x, int ldx, float *g,
                          int ldg, int n);
    /* A sub-layer's output: x and y_in as sublayer got them (y before it changed it), dy the
     * gradient with respect to its output: overwrite dy with the gradient with respect to
     * y_in, and add the one with respect to x to dx. */
    void (*sublayer_grad)(void *ctx, int layer, enum ad_norm_slot slot, const float *x,
                          const float *y_in, float *dy, float *dx, int n);
};

/* The work space each thread's local site_post calls get, in floats. */
#define AD_HOOK_LOCAL_TMP 4096

/* ==========================================================================================
 * Forward pass over a batch */

/* One sequence's part of a batch: n_tokens new tokens appended after the seq->n_tokens already
 * known. Token ids below zero are the hooks' virtual tokens (prompt tuning): -1 is the first.
 * A sequence whose ctx has prefix K/V has them as its first positions from its first chunk on
 * (seq->n_tokens and seq->n_shared count them): they are read in place (hooks->prefix), not
 * copied into the cache, so every chunk of the sequence must carry the same ctx (or one with
 * the same prefix). Chunks with the same ctx pointer should be adjacent: each run of them is
 * one row group for the hooks. */
struct ad_chunk {
    struct ad_kv_seq *seq;
    const int32_t *tokens;
    int n_tokens;
    bool all_logits; /* logits for every token of the chunk, else only for its last */
    const void *ctx; /* the hooks' context of this sequence (its adapters); NULL = the base */
};

/* Threads of each forward pass (its scratch's pool: the calling thread plus n - 1 helpers, started
 * by the scratch's first pass); n <= 0: one per online CPU, the default. The forward pass does
 * all its threading itself and runs OpenBLAS single-threaded inside it: this call, and else the
 * first pass, calls openblas_set_num_threads(1) for the whole process. Set before the first
 * pass, and before starting threads that call BLAS. */
void ad_model_set_threads(int n);
int ad_model_threads(void);

/* Reusable per-thread buffers of the forward pass (grown on demand). */
struct ad_scratch;
struct ad_scratch *ad_scratch_new(void);
void ad_scratch_free(struct ad_scratch *s);

/* Number of logits rows the batch produces: sum of (all_logits ? n_tokens : 1). */
int ad_batch_n_logits(const struct ad_chunk *chunks, int n_chunks);

/* Runs the model over every chunk in one pass (each linear is one matrix product for all rows)
 * and writes logits rows, chunk by chunk, to logits [ad_batch_n_logits, n_vocab]; each chunk
 * with a ctx is adapted through hooks (NULL when no chunk has one). Reserves KV blocks for all
 * chunks first; on -ENOSPC nothing is changed. On success each seq->n_tokens grows by its
 * chunk's n_tokens. Returns 0, -EINVAL (token id or position out of range), -ENOSPC or -ENOMEM.
 * Not thread-safe for the same kv or scratch. */
int ad_model_forward(const struct ad_model *m, struct ad_kv *kv, struct ad_chunk *chunks,
                     int n_chunks, const struct ad_hooks *hooks, struct ad_scratch *s,
                     float *logits, struct ad_err *err);

/* ==========================================================================================
 * Training (train.c): a forward pass that keeps what the backward needs, and the backward
 *
 * A batch is dense: n_seq sequences, each one the hooks' virtual tokens (prompt tuning) then
 * its tokens, as rows one after another; no KV cache: a sequence attends to its own rows and
 * the hooks' prefix, as in serving (real tokens start at position n_prefix + n_virtual). Every
 * activation of the pass is kept for its backward (4 * ad_train_floats_per_row bytes a row):
 * the caller splits a step's batch to fit its memory and accumulates. One ctx adapts the whole
 * batch (the adapter being trained); full fine-tuning passes ctx NULL and base gradients. */

struct ad_train_batch {
    int n_seq;
    const int *n_tokens;           /* [n_seq] */
    const int32_t *const *tokens;  /* [n_seq][n_tokens[s]] */
    const int32_t *const *targets; /* [n_seq][n_tokens[s]]: the token row i predicts, or -1 */
};

/* The gradients of a model's weights (full fine-tuning), zeroed at creation. */
struct ad_model_grads;
struct ad_model_grads *ad_model_grads_new(const struct ad_model *m); /* NULL: out of memory */
void ad_model_grads_free(struct ad_model_grads *g);

/* One weight tensor of the model: its name in the checkpoint (a Hugging Face directory), its
 * values, and its gradient in g. */
struct ad_model_tensor {
    char name[128];
    float *w; /* writable only in a model from ad_model_clone */
    float *g; /* NULL without grads */
    size_t n;
    int n_dims;
    int64_t shape[2];
    bool embedding, norm, bias; /* kinds that child-tuning never masks / weight decay skips */
};

/* Every distinct weight tensor (a tied lm_head is the embedding), in checkpoint order, with its
 * gradient in g (may be NULL). Returns the count and a new array (free it), or -ENOMEM. */
int ad_model_tensors(const struct ad_model *m, struct ad_model_grads *g,
                     struct ad_model_tensor **ret);
/* A copy of m whose every weight is a writable f32 array of its own (full fine-tuning trains
 * it; ad_model_free frees it). Returns 0 or -ENOMEM. */
int ad_model_clone(const struct ad_model *m, struct ad_model **ret, struct ad_err *err);

/* Floats of activations ad_model_train keeps per row of a batch (for ctx's hooks: their saved
 * outputs count), to size batches. */
size_t ad_train_floats_per_row(const struct ad_model *m, const struct ad_hooks *hooks,
                               const void *ctx);

/* Work space and threads of training passes (grown on demand). NULL: out of memory. */
struct ad_train_scratch;
struct ad_train_scratch *ad_train_scratch_new(int n_threads);
void ad_train_scratch_free(struct ad_train_scratch *ts);

/* The forward and backward pass of one batch: adds loss_scale times the gradient of the sum
 * over the rows with a target of -log p(target) to ctx's gradients (through hooks) and to g
 * (NULL: the base is frozen), and that sum (unscaled) to *ret_loss, the number of targets to
 * *ret_n_targets. With loss_scale 0 it is a forward pass only (evaluation: no gradient is
 * touched). Returns 0, -EINVAL (a token or sequence out of range, err says which) or -ENOMEM.
 * One batch at a time per scratch. */
int ad_model_train(const struct ad_model *m, const struct ad_train_batch *b,
                   const struct ad_hooks *hooks, void *ctx, struct ad_model_grads *g,
                   float loss_scale, struct ad_train_scratch *ts, double *ret_loss,
                   int64_t *ret_n_targets, struct ad_err *err);

/* C = alpha op(A) op(B) + beta C (row-major; op: transposed if t_a / t_b), on the threads of the
 * training pass that calls the hooks on this thread, else on this thread alone. For hooks. */
void ad_train_sgemm(bool t_a, bool t_b, int m, int n, int k, float alpha, const float *a,
                    int lda, const float *b, int ldb, float beta, float *c, int ldc);

/* ==========================================================================================
 * Sampling */

struct ad_sampler {
    float temperature; /* 0: greedy */
    int top_k;         /* 0: off */
    float top_p;       /* 1: off */
    uint64_t rng[2];   /* xoroshiro128+ state */
};

void ad_sampler_init(struct ad_sampler *s, float temperature, int top_k, float top_p,
                     uint64_t seed);
/* Picks a token from logits [n_vocab]. work must hold 2 * n_vocab floats (ints alias). */
int ad_sampler_sample(struct ad_sampler *s, const float *logits, int n_vocab, float *work);
/* Natural-log softmax of logits into out (may alias). */
void ad_log_softmax(const float *logits, int n, float *out);
/* True if tok is an end-of-sequence token of the model. */
bool ad_model_is_eos(const struct ad_model_config *cfg, int tok);

/* Private to src/adapter: the loading context each kind's loader works through. */
#pragma once

#include <jansson.h>
#include <stdbool.h>

#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"

struct load_ctx {
    struct ad_adapter *a;
    const struct ad_model *m;
    json_t *cfg;                /* adapter_config.json (for AdapterHub: its "config" object) */
    const struct ad_st_file *st;
    bool *used;                 /* [n_tensors]: consumed by a loader */
    unsigned flags;             /* AD_ADAPTER_* of adapter.h */
    struct ad_err *err;
};

/* The tensor named key, marked as used, or NULL. */
const struct ad_tensor *ctx_take(struct load_ctx *c, const char *key);
/* Checks that t is a float tensor (F32, F16, BF16) of shape [d0, d1] (d1 = 0: one dimension;
 * d1 = -1: [d0, 1] or [1, d0] or [d0] accepted) whose values are all finite: every loader takes
 * its tensors through here. Returns 0 or -EINVAL naming the tensor. */
int ctx_check(struct load_ctx *c, const struct ad_tensor *t, int64_t d0, int64_t d1);
/* Converts t to a new f32 array owned by the adapter after ctx_check. Returns 0 or
 * -EINVAL/-ENOMEM. */
int ctx_f32(struct load_ctx *c, const struct ad_tensor *t, int64_t d0, int64_t d1, float **ret);
/* An adapter-owned allocation of n floats (zeroed), or NULL. */
float *ctx_alloc(struct load_ctx *c, size_t n);
/* An adapter-owned allocation of n bytes, not zeroed, or NULL. */
void *ctx_alloc_bytes(struct load_ctx *c, size_t n);
/* The delta record of a site (created on first use). */
struct ad_site_delta *ctx_delta(struct load_ctx *c, const struct ad_site *s);
/* A PEFT key without "base_model.model." (or the key itself). */
const char *ctx_strip(const char *key);
/* Handles a tensor that is not an adapter parameter but a replaced base tensor: "<module>.bias",
 * "<module>.base_layer.bias" (bias sets, bias="all"), "<module>.weight" (modules_to_save) for a
 * linear or norm module. Returns 1 if handled, 0 if the key is not such a tensor, or -errno. */
int ctx_replacement(struct load_ctx *c, const struct ad_tensor *t);
/* Fails with the first tensor no loader used. */
int ctx_check_all_used(struct load_ctx *c);

/* PEFT target_modules matching (list: exact or "." suffix; string: full regex match). Returns
 * 1 (targeted), 0, or -EINVAL for a bad pattern. */
int ctx_targeted(json_t *targets, const char *module, bool dot_suffix, struct ad_err *err);
/* re.match(pattern, subject) (anchored at the start only) with PCRE2. 1, 0 or -EINVAL. */
int ctx_regex_match(const char *pattern, const char *subject, bool full, struct ad_err *err);

/* ==========================================================================================
 * Kinds: each adapter kind's file defines its table (DESIGN.md's ops table). Serving's maths is
 * per delta (a LoRA file may also carry replaced biases and modules): the functions below, each
 * in its kind's file, which adapter.c's hooks call in PEFT's order. An adapter's bytes are
 * counted as its tensors are allocated (ctx_alloc). */

struct train_kind;

struct kind_ops {
    enum ad_adapter_kind kind;
    const char *name;             /* as the API shows it: "lora" */
    const char *peft_types[3];    /* the peft_type values it reads (none: AdapterHub's config) */
    int (*load)(struct load_ctx *c); /* loads and validates against the model */
    const struct train_kind *train;  /* its training (trainable.c), or NULL */
};

extern const struct kind_ops ad_lora_ops, ad_ia3_ops, ad_prefix_ops, ad_prompt_ops, ad_bias_ops,
    ad_bottleneck_ops, ad_sparse_ops;

/* The kind an adapter_config.json object describes (its peft_type; AdapterHub's "config"
 * object without one: a bottleneck; adapterd's training shorthand "BOTTLENECK"), or NULL. */
const struct kind_ops *ad_kind_of_config(json_t *cfg);
const struct kind_ops *ad_kind_ops(enum ad_adapter_kind k);

/* Serving maths of each kind, at a site of n rows (adapter.c's hooks call them in PEFT's order).
 * tmp holds tmp_len floats of work space. */
/* bias.c: the bias in effect (the replacement, else the base's, or NULL); a replaced module
 * y = x w_new^T + b; a swapped bias y += b_new - b_base */
const float *ad_bias_of(const struct ad_site_delta *d);
void ad_replaced_apply(const struct ad_site_delta *d, const float *x, int ldx, float *y, int ldy,
                       int n);
void ad_bias_swap(const struct ad_site_delta *d, float *y, int ldy, int n);
/* ia3.c: x *= l in place (an input no other site reads); y += ((l - 1) x) W^T (a shared input);
 * y *= l */
bool ad_ia3_in_apply(const struct ad_site_delta *d, float *x, int ldx, int n);
void ad_ia3_in_delta(const struct ad_site_delta *d, const float *x, int ldx, float *y, int ldy,
                     int n, float *tmp, size_t tmp_len);
void ad_ia3_out_apply(const struct ad_site_delta *d, float *y, int ldy, int n);
/* lora.c: DoRA y = k (y - b_base + s B A x) + b */
void ad_dora_apply(const struct ad_site_delta *d, float weight, const float *x, int ldx, float *y,
                   int ldy, int n, float *tmp, size_t tmp_len);
void ad_lora_apply(const struct ad_site_delta *d, float weight, const float *x, int ldx, float *y,
                   int ldy, int n, float *tmp, size_t tmp_len);
void ad_sparse_apply(const struct ad_site_delta *d, const float *x, int ldx, float *y, int ldy,
                     int n);
void ad_bottleneck_apply(const struct ad_adapter *a, const struct ad_bottleneck *bn,
                         const float *x, float *y, int n, int n_embd, float *tmp);

/* ==========================================================================================
 * Training (trainable.c, and each kind's file) */

/* What a kind does for training (adapter.h, ad_trainable). */
struct train_kind {
    enum ad_adapter_kind kind;
    /* Adds the parameters (tr_add) as PEFT initialises them, sets t->priv. */
    int (*init)(struct ad_trainable *t, json_t *cfg, const int32_t *ids, int n_ids,
                struct ad_err *err);
    const struct ad_hooks *hooks;
    void (*prepare)(struct ad_trainable *t); /* NULL: nothing derived from the parameters */
    void (*finish)(struct ad_trainable *t);  /* NULL: nothing to finish */
    /* The tensors serving loads, if they are not the parameters themselves (NULL): fills
     * entries (up to n_max), their data owned by *owned (freed by the caller). */
    int (*saved)(struct ad_trainable *t, struct ad_st_entry *entries, size_t n_max,
                 float **owned, struct ad_err *err);
    void (*free)(void *priv);
};


/* The activation of a bottleneck adapter (bottleneck.c's, AD_BN_ACT_RELU or enum ad_act) and its
 * derivative. */
float ad_bn_act(int act, float x);
float ad_bn_act_grad(int act, float x);

/* Adds a parameter with zeroed values and gradient. Returns it (valid until the next tr_add;
 * keep its w and g, which stay), or NULL with err set. */
struct ad_param *tr_add(struct ad_trainable *t, const char *name, int n_dims, int64_t d0,
                        int64_t d1, bool decay, bool maskable, struct ad_err *err);
/* Fills p with U(-bound, bound), or N(0, std), drawn from the trainable's seed and p's name
 * (so the values do not depend on the order parameters are made in). */
void tr_uniform(const struct ad_trainable *t, struct ad_param *p, double bound);
void tr_normal(const struct ad_trainable *t, struct ad_param *p, double std);
/* The key of the random stream `what` (a site's dropout...) at the trainer's current step and
 * batch: element i draws ad_splitmix64(key + i). */
uint64_t tr_stream(const struct ad_trainable *t, uint64_t what);
/* The training config's target_modules (PEFT: a list, a regex, or "all-linear") against a
 * site's module path. 1, 0 or -EINVAL. */
int tr_targeted(const struct ad_trainable *t, json_t *targets, const struct ad_site *s,
                struct ad_err *err);
/* Fills a prompt-learning config's model fields (token_dim, num_layers, num_attention_heads,
 * num_transformer_submodules) as PEFT does; returns num_virtual_tokens or -EINVAL. */
int tr_prompt_learning_fields(const struct ad_model *m, json_t *cfg, int token_dim, int heads,
                              struct ad_err *err);

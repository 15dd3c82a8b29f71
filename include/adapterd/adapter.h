/* adapterd: PEFT adapters on top of the frozen base: loading Hugging Face PEFT (and AdapterHub
 * bottleneck) directories, and the deltas each adapter applies at the model's hook points.
 *
 * An adapter is immutable after load and reference-counted; every hook only reads it, so any
 * number of threads may use one adapter at once. */
#pragma once

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "adapterd/kernels.h"
#include "adapterd/model.h"

struct ad_err;
struct ad_model;
struct ad_site;

enum ad_adapter_kind {
    AD_ADAPTER_LORA, /* incl. rsLoRA and DoRA */
    AD_ADAPTER_IA3,
    AD_ADAPTER_PREFIX,
    AD_ADAPTER_PROMPT, /* prompt tuning and P-tuning (saved encoder output) */
    AD_ADAPTER_BIAS,   /* BitFit bias sets */
    AD_ADAPTER_BOTTLENECK,
    AD_ADAPTER_SPARSE, /* child-tuning's sparse deltas of the weights (README) */
    AD_ADAPTER_KIND_COUNT,
};

/* What one adapter does to one site (linear map) of the model. Any combination of fields may
 * be set, except that a replaced module (w_new) carries nothing else but its bias: PEFT never
 * adapts a module listed in modules_to_save. A LoRA file with bias="all" carries LoRA factors
 * and replacement biases. */
struct ad_site_delta {
    const struct ad_site *site;
    /* LoRA: y += scale * B (A x) (+ scale * b_B); DoRA: y = k (W x + scale B A x) + b, b the
     * bias in effect (b_new, else the base's). The factors stay BF16 when the file has them in
     * BF16 (kernels.h); lora.a is NULL without LoRA. */
    struct ad_lora_factors lora;
    float scale;
    float *lora_bias; /* [n_out] or NULL */
    float *dora_k;    /* [n_out] = m / |W + scale B A|_row, or NULL */
    /* IA3: y *= l_out (bias included), or y = W (l_in x) + b */
    float *ia3_out; /* [n_out] or NULL */
    float *ia3_in;  /* [n_in] or NULL */
    /* modules_to_save: the whole linear replaced: y = x w_new^T + b, b = b_new or the base's */
    float *w_new; /* [n_out, n_in] or NULL */
    /* Bias sets, bias="all", modules_to_save: the module's bias replaced by b_new, as the file
     * stores it (a module without a base bias gets one) */
    float *b_new; /* [n_out] or NULL */
    /* Sparse deltas: y += x dW^T over dW's non-zeros, by output row (CSR) */
    struct ad_sparse_delta {
        int nnz;              /* 0: none */
        const int32_t *row_ptr; /* [n_out + 1] */
        const int32_t *col;   /* [nnz] input index */
        const float *val;     /* [nnz] */
    } sparse;
};

/* A replaced norm (LN tuning, modules_to_save, bias="all" on LayerNorm biases). */
struct ad_norm_delta {
    const float *w, *b; /* full replacements; NULL keeps the base's */
};

/* A bottleneck adapter at one sub-layer output: y += up(act(down(z))) with z = y (Houlsby) or
 * z = x + y (Pfeiffer, "original_ln_before"), x the residual entering the sub-layer. */
struct ad_bottleneck {
    int dim;            /* bottleneck width */
    float *down_w, *down_b; /* [dim, n_embd], [dim] */
    float *up_w, *up_b;     /* [n_embd, dim], [n_embd] */
};

struct ad_adapter {
    atomic_int refs;
    char name[128];
    enum ad_adapter_kind kind;
    uint64_t serial; /* unique among the adapters loaded by this process (a replaced adapter's
                      * new version gets a new one): keys cached K/V (model.h) */
    size_t bytes; /* resident bytes of the adapter's own tensors */

    const struct ad_model *model;   /* the base it was validated against (borrowed) */
    struct ad_site_delta **by_site; /* [model->n_sites], NULL where the site is untouched */
    struct ad_norm_delta *norms;    /* [n_layer * 2 + 1] (attn, mlp per layer; final), or NULL */

    /* replaced embeddings (modules_to_save, sparse deltas), or NULL: the base's */
    float *embed;     /* [n_vocab, n_embd]; a tied lm_head is replaced with it */
    float *pos_embed; /* [n_ctx_max, n_embd] (GPT-2) */

    /* prompt tuning: virtual token embeddings, prepended to the input */
    int n_virtual;
    float *prompt; /* [n_virtual, n_embd] */

    /* prefix tuning: virtual keys and values before the sequence's own, never rotated; read in
     * place by every sequence of the adapter (they take no KV cache block) */
    int n_prefix;
    float *prefix_kv; /* [n_layer][2][n_prefix][n_kv_head * head_dim] */

    /* bottleneck adapters, per layer: after attention, after the MLP (dim 0 = none) */
    struct ad_bottleneck *bn_attn, *bn_mlp; /* [n_layer] or NULL */
    bool bn_on_sum;                         /* Pfeiffer: the adapter sees x + y */
    int bn_act;                             /* enum ad_act of model.h, or AD_BN_ACT_RELU */

    /* private */
    struct ad_site_delta *deltas;
    int n_deltas;
    void **owned;
    int n_owned;
};

#define AD_BN_ACT_RELU 100

/* Flags of the loaders: how an adapter is held in memory. */
enum {
    /* LoRA factors as 8-bit integers with a scale per rank component, A's row and B's column
     * (symmetric, round to nearest: each element within half a step, max |row or column| / 254,
     * of the file's value), instead of as the file stores them. A quarter of F32's bytes and
     * half of BF16's, so a batch of many adapters reads half the bytes per step and the budget
     * holds twice as many; the deltas differ from the file's by that rounding
     * (docs/adapters.md). */
    AD_ADAPTER_LORA_INT8 = 1u << 0,
};

/* Loads an adapter directory (adapter_config.json + adapter_model.safetensors, as Hugging Face
 * PEFT writes it, or an AdapterHub bottleneck adapter with adapter.safetensors) and validates it
 * against model; flags: AD_ADAPTER_* above, or 0. The files must be regular files, not symbolic
 * links. Returns 0 and a new adapter (one reference), or -EINVAL / -ENOTSUP / -ENOENT with err
 * naming the file (relative to dir: messages never show where dir is), key and reason. */
int ad_adapter_load(const struct ad_model *m, const char *dir, const char *name, unsigned flags,
                    struct ad_adapter **ret, struct ad_err *err);

/* The same from a config text and an in-memory safetensors image (uploads, fuzzing). The image
 * is borrowed for the call only. */
int ad_adapter_load_mem(const struct ad_model *m, const char *config_json, const void *weights,
                        size_t weights_len, const char *name, unsigned flags,
                        struct ad_adapter **ret, struct ad_err *err);

/* References: _ref returns a; _unref frees on the last reference and returns NULL. Thread-safe. */
struct ad_adapter *ad_adapter_ref(struct ad_adapter *a);
struct ad_adapter *ad_adapter_unref(struct ad_adapter *a);

const char *ad_adapter_kind_name(enum ad_adapter_kind k);
/* The kind an adapter_config.json's "peft_type" names (NULL: an AdapterHub bottleneck config),
 * AD_ADAPTER_KIND_COUNT if it names none adapterd supports. */
enum ad_adapter_kind ad_adapter_config_kind(const char *peft_type);

/* ==========================================================================================
 * Mixes: what one request runs with. Several LoRA adapters compose (weighted deltas add);
 * every other kind runs alone with weight 1. */

#define AD_MIX_MAX 8

struct ad_mix {
    int n;
    struct ad_adapter *a[AD_MIX_MAX]; /* borrowed: the request holds the references */
    float w[AD_MIX_MAX];
};

/* Checks the composition rules. Returns 0 or -EINVAL with err saying why. */
int ad_mix_validate(const struct ad_mix *mix, struct ad_err *err);
/* Virtual tokens a sequence using mix starts with (prompt tuning), and prefix K/V length. */
int ad_mix_n_virtual(const struct ad_mix *mix);
int ad_mix_n_prefix(const struct ad_mix *mix);


/* The hook points of the forward pass (model.h) for serving: ctx is a const struct ad_mix
 * whose adapters the caller holds. The deltas of each kind are in its own file. */
extern const struct ad_hooks ad_mix_hooks;

/* ==========================================================================================
 * Training: an adapter as trainable parameters (src/train runs them)
 *
 * Each kind's file holds its training init (as Hugging Face PEFT initialises it), its forward
 * and backward hooks for ad_model_train (model.h) over f32 parameters, and what it saves. The
 * parameters are named as the adapter's files name them, sorted by name. */

struct ad_param {
    char name[192]; /* as the saved file (or, for parameters only training has, trainable.c) */
    int n_dims;
    int64_t shape[2];
    size_t n;
    float *w;      /* values */
    float *g;      /* gradient, accumulated by the backward */
    bool decay;    /* weight decay applies: not to biases, norms and embeddings (HF Trainer) */
    bool maskable; /* child-tuning may mask it: not embeddings or norms */
};

struct ad_trainable {
    enum ad_adapter_kind kind;
    const struct ad_model *m;
    struct ad_param *params; /* sorted by name */
    int n_params;
    const struct ad_hooks *hooks; /* ctx: this trainable */
    uint64_t seed;     /* dropout masks */
    uint64_t step;     /* the optimizer steps taken (dropout masks differ each step) */
    int micro;         /* the batch within the step */
    bool train;        /* dropout on: set by the trainer around backward passes */
    /* private to trainable.c and the kind */
    void *cfg;         /* json_t: the training config */
    void *priv;
    struct ad_param *cap_params;
    int cap;
};

/* A new trainable adapter for m from a PEFT adapter_config.json text (LORA, IA3, PREFIX_TUNING,
 * PROMPT_TUNING, BITFIT, or an AdapterHub bottleneck config), initialised as PEFT does from
 * seed; init_ids (NULL unless prompt_tuning_init TEXT) are the init text's token ids. Returns 0
 * or -EINVAL / -ENOTSUP with err naming the field. */
int ad_trainable_new(const struct ad_model *m, const char *config_json, uint64_t seed,
                     const int32_t *init_ids, int n_init_ids, struct ad_trainable **ret,
                     struct ad_err *err);
/* Sets parameters from the tensors of a safetensors file by name (continuing from an adapter,
 * or a checkpoint); every parameter must be there, with its shape. Returns 0 or -EINVAL. */
int ad_trainable_set(struct ad_trainable *t, const struct ad_st_file *f, struct ad_err *err);
/* Sets every gradient to 0. */
void ad_trainable_zero_grad(struct ad_trainable *t);
/* Brings what the hooks derive from the parameters up to date (prefix tuning's keys and values,
 * from its projection): after the parameters change, before the next training pass. */
void ad_trainable_prepare(struct ad_trainable *t);
/* Finishes the gradients after the batches of a step (parameters that only feed others, e.g.
 * prefix tuning's projection MLP). */
void ad_trainable_finish(struct ad_trainable *t);
/* Writes the adapter as serving loads it into dir (existing, empty): adapter_config.json
 * (inference_mode true) and adapter_model.safetensors (AdapterHub: adapter.safetensors), each
 * fsync'd. Returns 0 or -errno. */
int ad_trainable_save(struct ad_trainable *t, const char *dir, struct ad_err *err);
void ad_trainable_free(struct ad_trainable *t);
/* The parameter of that name, or NULL. */
struct ad_param *ad_trainable_param(struct ad_trainable *t, const char *name);

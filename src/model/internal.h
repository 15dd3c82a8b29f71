/* Private to src/model: architecture descriptions. */
#pragma once

#include <stdbool.h>

#include "adapterd/model.h"

/* A family's module names, as data: the checkpoint and PEFT paths are built from these. */
struct ad_arch {
    enum ad_family family;
    const char *root;      /* module path prefix inside the *ForCausalLM class: "model." */
    bool root_optional;    /* checkpoints may omit the root (original GPT-2 files) */
    const char *layer_fmt; /* "layers.%d." relative to root */
    const char *tok_embd, *pos_embd, *final_norm; /* relative to root; pos_embd may be NULL */
    const char *lm_head;   /* outside root */
    const char *norm1, *norm2;
    bool layer_norm;       /* LayerNorm with bias, else RMSNorm */
    bool conv1d;           /* linear weights stored [in, out] */
    bool rope;
    int n_modules;
    struct {
        enum ad_role role;
        const char *name; /* relative to the layer, e.g. "self_attn.q_proj" */
    } modules[8];
};

const struct ad_arch *ad_arch_for(enum ad_family family);
const char *ad_role_name(enum ad_role role);

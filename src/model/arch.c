/* Architecture families as data: the module names of each, from which checkpoint tensor names
 * and PEFT module paths are built. Adding a family is adding a table. */
#include "internal.h"

static const struct ad_arch llama = {
    .family = AD_FAMILY_LLAMA,
    .root = "model.",
    .layer_fmt = "layers.%d.",
    .tok_embd = "embed_tokens",
    .final_norm = "norm",
    .lm_head = "lm_head",
    .norm1 = "input_layernorm",
    .norm2 = "post_attention_layernorm",
    .rope = true,
    .n_modules = 7,
    .modules = {
        {AD_ROLE_Q, "self_attn.q_proj"},
        {AD_ROLE_K, "self_attn.k_proj"},
        {AD_ROLE_V, "self_attn.v_proj"},
        {AD_ROLE_O, "self_attn.o_proj"},
        {AD_ROLE_GATE, "mlp.gate_proj"},
        {AD_ROLE_UP, "mlp.up_proj"},
        {AD_ROLE_DOWN, "mlp.down_proj"},
    },
};

static const struct ad_arch gpt2 = {
    .family = AD_FAMILY_GPT2,
    .root = "transformer.",
    .root_optional = true,
    .layer_fmt = "h.%d.",
    .tok_embd = "wte",
    .pos_embd = "wpe",
    .final_norm = "ln_f",
    .lm_head = "lm_head",
    .norm1 = "ln_1",
    .norm2 = "ln_2",
    .layer_norm = true,
    .conv1d = true,
    .n_modules = 4,
    .modules = {
        {AD_ROLE_QKV, "attn.c_attn"},
        {AD_ROLE_O, "attn.c_proj"},
        {AD_ROLE_UP, "mlp.c_fc"},
        {AD_ROLE_DOWN, "mlp.c_proj"},
    },
};

const struct ad_arch *ad_arch_for(enum ad_family family)
{
    return family == AD_FAMILY_GPT2 ? &gpt2 : &llama;
}

const char *ad_role_name(enum ad_role role)
{
    static const char *const names[AD_ROLE_COUNT] = {
        [AD_ROLE_Q] = "q", [AD_ROLE_K] = "k", [AD_ROLE_V] = "v", [AD_ROLE_QKV] = "qkv",
        [AD_ROLE_O] = "o", [AD_ROLE_GATE] = "gate", [AD_ROLE_UP] = "up",
        [AD_ROLE_DOWN] = "down", [AD_ROLE_LM_HEAD] = "lm_head",
    };
    return (unsigned)role < AD_ROLE_COUNT ? names[role] : "?";
}

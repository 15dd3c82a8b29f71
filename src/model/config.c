/* config.json and generation_config.json -> struct ad_model_config. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <string.h>

#include "adapterd/model.h"
#include "adapterd/util.h"

static int get_int(json_t *o, const char *key, int dflt, int lo, int hi, int *out,
                   struct ad_err *err)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (dflt < lo)
            return ad_err_set(err, -EINVAL, "config.json: missing '%s'", key);
        *out = dflt;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return ad_err_set(err, -EINVAL, "config.json: '%s' must be an integer in [%d, %d]", key,
                          lo, hi);
    *out = (int)json_integer_value(v);
    return 0;
}

static int get_float(json_t *o, const char *key, double dflt, float *out, struct ad_err *err)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (isnan(dflt))
            return ad_err_set(err, -EINVAL, "config.json: missing '%s'", key);
        *out = (float)dflt;
        return 0;
    }
    if (!json_is_number(v) || !(json_number_value(v) > 0))
        return ad_err_set(err, -EINVAL, "config.json: '%s' must be a positive number", key);
    *out = (float)json_number_value(v);
    return 0;
}

static bool get_bool(json_t *o, const char *key, bool dflt)
{
    json_t *v = json_object_get(o, key);
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}

/* eos_token_id may be an integer or a list of integers. */
static int get_eos(json_t *o, struct ad_model_config *cfg, struct ad_err *err)
{
    json_t *v = json_object_get(o, "eos_token_id");
    size_t i;
    json_t *e;

    if (!v || json_is_null(v))
        return 0;
    cfg->n_eos = 0;
    if (json_is_integer(v)) {
        cfg->eos_ids[cfg->n_eos++] = (int)json_integer_value(v);
        return 0;
    }
    if (!json_is_array(v))
        return ad_err_set(err, -EINVAL, "'eos_token_id' must be an integer or a list");
    json_array_foreach(v, i, e) {
        if (!json_is_integer(e))
            return ad_err_set(err, -EINVAL, "'eos_token_id' must list integers");
        if (cfg->n_eos < AD_MAX_EOS)
            cfg->eos_ids[cfg->n_eos++] = (int)json_integer_value(e);
    }
    return 0;
}

static int parse_rope_scaling(json_t *root, struct ad_model_config *cfg, struct ad_err *err)
{
    json_t *rs = json_object_get(root, "rope_scaling");
    const char *type;
    int r;

    cfg->rope_scaling = AD_ROPE_NONE;
    if (!rs || json_is_null(rs))
        return 0;
    if (!json_is_object(rs))
        return ad_err_set(err, -EINVAL, "config.json: 'rope_scaling' must be an object");
    type = json_string_value(json_object_get(rs, "rope_type"));
    if (!type)
        type = json_string_value(json_object_get(rs, "type"));
    if (!type || !strcmp(type, "default"))
        return 0;
    r = get_float(rs, "factor", NAN, &cfg->rope_factor, err);
    if (r < 0)
        {
        ad_err_prefix(err, "rope_scaling");
        return r;
    }
    if (!strcmp(type, "linear")) {
        cfg->rope_scaling = AD_ROPE_LINEAR;
        return 0;
    }
    if (!strcmp(type, "llama3")) {
        cfg->rope_scaling = AD_ROPE_LLAMA3;
        if ((r = get_float(rs, "low_freq_factor", NAN, &cfg->rope_low_freq_factor, err)) < 0 ||
            (r = get_float(rs, "high_freq_factor", NAN, &cfg->rope_high_freq_factor, err)) < 0 ||
            (r = get_int(rs, "original_max_position_embeddings", -1, 1, 1 << 30,
                         &cfg->rope_orig_ctx, err)) < 0)
            {
        ad_err_prefix(err, "rope_scaling");
        return r;
    }
        if (cfg->rope_high_freq_factor <= cfg->rope_low_freq_factor)
            return ad_err_set(err, -EINVAL,
                              "rope_scaling: high_freq_factor must exceed low_freq_factor");
        return 0;
    }
    return ad_err_set(err, -ENOTSUP, "config.json: rope_scaling type '%.40s' is not supported "
                      "(supported: default, linear, llama3)", type);
}

static int parse_llama(json_t *root, struct ad_model_config *cfg, struct ad_err *err)
{
    const char *act;
    int r;

    if ((r = get_int(root, "vocab_size", -1, 1, 1 << 24, &cfg->n_vocab, err)) < 0 ||
        (r = get_int(root, "hidden_size", -1, 1, 1 << 16, &cfg->n_embd, err)) < 0 ||
        (r = get_int(root, "num_hidden_layers", -1, 1, 1024, &cfg->n_layer, err)) < 0 ||
        (r = get_int(root, "num_attention_heads", -1, 1, 1024, &cfg->n_head, err)) < 0 ||
        (r = get_int(root, "num_key_value_heads", cfg->n_head, 1, 1024, &cfg->n_kv_head,
                     err)) < 0 ||
        (r = get_int(root, "intermediate_size", -1, 1, 1 << 20, &cfg->n_ff, err)) < 0 ||
        (r = get_int(root, "max_position_embeddings", 2048, 1, 1 << 24, &cfg->n_ctx_max,
                     err)) < 0 ||
        (r = get_float(root, "rms_norm_eps", 1e-6, &cfg->norm_eps, err)) < 0 ||
        (r = get_float(root, "rope_theta", 10000.0, &cfg->rope_theta, err)) < 0)
        return r;
    if (cfg->n_embd % cfg->n_head != 0 && !json_is_integer(json_object_get(root, "head_dim")))
        return ad_err_set(err, -EINVAL, "config.json: hidden_size %d is not a multiple of "
                          "num_attention_heads %d and no head_dim is given", cfg->n_embd,
                          cfg->n_head);
    r = get_int(root, "head_dim", cfg->n_embd / cfg->n_head, 2, 1 << 12, &cfg->head_dim, err);
    if (r < 0)
        return r;
    if (cfg->head_dim % 2)
        return ad_err_set(err, -EINVAL, "config.json: head_dim %d must be even", cfg->head_dim);
    if (cfg->n_head % cfg->n_kv_head)
        return ad_err_set(err, -EINVAL, "config.json: num_attention_heads %d is not a multiple "
                          "of num_key_value_heads %d", cfg->n_head, cfg->n_kv_head);
    json_t *prf = json_object_get(root, "partial_rotary_factor");
    if (prf && json_number_value(prf) != 1.0)
        return ad_err_set(err, -ENOTSUP, "config.json: partial_rotary_factor is not supported");
    act = json_string_value(json_object_get(root, "hidden_act"));
    if (!act || !strcmp(act, "silu") || !strcmp(act, "swish"))
        cfg->act = AD_ACT_SILU;
    else if (!strcmp(act, "gelu_pytorch_tanh") || !strcmp(act, "gelu_new"))
        cfg->act = AD_ACT_GELU_TANH;
    else if (!strcmp(act, "gelu"))
        cfg->act = AD_ACT_GELU;
    else
        return ad_err_set(err, -ENOTSUP, "config.json: hidden_act '%.40s' is not supported", act);

    /* Biases as each transformers class builds its modules: Llama reads attention_bias (q, k,
     * v, o) and mlp_bias (gate, up, down); Qwen2 always has q, k, v biases and never o or MLP
     * ones; Mistral has none; the flags are ignored by the classes that do not read them. */
    bool qwen2 = !strcmp(cfg->model_type, "qwen2");
    bool mistral = !strcmp(cfg->architecture, "MistralForCausalLM");
    if (qwen2) {
        cfg->qkv_bias = true;
        cfg->o_bias = cfg->mlp_bias = false;
    } else if (mistral) {
        cfg->qkv_bias = cfg->o_bias = cfg->mlp_bias = false;
    } else {
        cfg->qkv_bias = cfg->o_bias = get_bool(root, "attention_bias", false);
        cfg->mlp_bias = get_bool(root, "mlp_bias", false);
    }
    cfg->tie_embeddings = get_bool(root, "tie_word_embeddings", false);

    /* Mistral always slides when sliding_window is set; Qwen2 only with use_sliding_window. */
    json_t *sw = json_object_get(root, "sliding_window");
    cfg->sliding_window = 0;
    if (json_is_integer(sw) && json_integer_value(sw) > 0 &&
        (!qwen2 || get_bool(root, "use_sliding_window", false))) {
        if (qwen2)
            return ad_err_set(err, -ENOTSUP, "config.json: Qwen2 use_sliding_window is not "
                              "supported");
        cfg->sliding_window = (int)json_integer_value(sw);
    }
    return parse_rope_scaling(root, cfg, err);
}

static int parse_gpt2(json_t *root, struct ad_model_config *cfg, struct ad_err *err)
{
    const char *act;
    int r;

    if ((r = get_int(root, "vocab_size", -1, 1, 1 << 24, &cfg->n_vocab, err)) < 0 ||
        (r = get_int(root, "n_embd", -1, 1, 1 << 16, &cfg->n_embd, err)) < 0 ||
        (r = get_int(root, "n_layer", -1, 1, 1024, &cfg->n_layer, err)) < 0 ||
        (r = get_int(root, "n_head", -1, 1, 1024, &cfg->n_head, err)) < 0 ||
        (r = get_int(root, "n_positions", 1024, 1, 1 << 24, &cfg->n_ctx_max, err)) < 0 ||
        (r = get_int(root, "n_inner", 4 * cfg->n_embd, 1, 1 << 20, &cfg->n_ff, err)) < 0 ||
        (r = get_float(root, "layer_norm_epsilon", 1e-5, &cfg->norm_eps, err)) < 0)
        return r;
    if (cfg->n_embd % cfg->n_head)
        return ad_err_set(err, -EINVAL, "config.json: n_embd %d is not a multiple of n_head %d",
                          cfg->n_embd, cfg->n_head);
    cfg->n_kv_head = cfg->n_head;
    cfg->head_dim = cfg->n_embd / cfg->n_head;
    act = json_string_value(json_object_get(root, "activation_function"));
    if (!act || !strcmp(act, "gelu_new") || !strcmp(act, "gelu_pytorch_tanh"))
        cfg->act = AD_ACT_GELU_TANH;
    else if (!strcmp(act, "gelu"))
        cfg->act = AD_ACT_GELU;
    else if (!strcmp(act, "silu") || !strcmp(act, "swish"))
        cfg->act = AD_ACT_SILU;
    else
        return ad_err_set(err, -ENOTSUP, "config.json: activation_function '%.40s' is not "
                          "supported", act);
    if (!get_bool(root, "scale_attn_weights", true) ||
        get_bool(root, "scale_attn_by_inverse_layer_idx", false) ||
        get_bool(root, "reorder_and_upcast_attn", false))
        return ad_err_set(err, -ENOTSUP, "config.json: non-default GPT-2 attention scaling "
                          "options are not supported");
    cfg->qkv_bias = cfg->o_bias = cfg->mlp_bias = true;
    cfg->tie_embeddings = get_bool(root, "tie_word_embeddings", true);
    return 0;
}

int ad_model_config_parse(const char *text, const char *gen_text, struct ad_model_config *cfg,
                          struct ad_err *err)
{
    json_error_t jerr;
    json_t *root, *gen = NULL;
    const char *arch, *mt;
    int r;

    memset(cfg, 0, sizeof(*cfg));
    root = json_loads(text, 0, &jerr);
    if (!root)
        return ad_err_set(err, -EINVAL, "config.json: line %d: %s", jerr.line, jerr.text);
    if (!json_is_object(root)) {
        r = ad_err_set(err, -EINVAL, "config.json: not a JSON object");
        goto out;
    }
    arch = json_string_value(json_array_get(json_object_get(root, "architectures"), 0));
    mt = json_string_value(json_object_get(root, "model_type"));
    snprintf(cfg->architecture, sizeof(cfg->architecture), "%s", arch ? arch : "");
    snprintf(cfg->model_type, sizeof(cfg->model_type), "%s", mt ? mt : "");
    if (!arch && mt) { /* infer from model_type when architectures is absent */
        static const char *const names[][2] = {{"llama", "LlamaForCausalLM"},
                                               {"mistral", "MistralForCausalLM"},
                                               {"qwen2", "Qwen2ForCausalLM"},
                                               {"gpt2", "GPT2LMHeadModel"}};
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
            if (!strcmp(mt, names[i][0]))
                snprintf(cfg->architecture, sizeof(cfg->architecture), "%s", names[i][1]);
    }
    if (!strcmp(cfg->architecture, "LlamaForCausalLM") ||
        !strcmp(cfg->architecture, "MistralForCausalLM") ||
        !strcmp(cfg->architecture, "Qwen2ForCausalLM")) {
        cfg->family = AD_FAMILY_LLAMA;
        if (!strcmp(cfg->architecture, "Qwen2ForCausalLM"))
            snprintf(cfg->model_type, sizeof(cfg->model_type), "qwen2");
        r = parse_llama(root, cfg, err);
    } else if (!strcmp(cfg->architecture, "GPT2LMHeadModel")) {
        cfg->family = AD_FAMILY_GPT2;
        r = parse_gpt2(root, cfg, err);
    } else {
        r = ad_err_set(err, -ENOTSUP,
                       "config.json: architecture '%.60s' is not supported (supported: "
                       "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel)",
                       cfg->architecture[0] ? cfg->architecture : "(none)");
    }
    if (r < 0)
        goto out;

    json_t *bos = json_object_get(root, "bos_token_id");
    cfg->bos_id = json_is_integer(bos) ? (int)json_integer_value(bos) : -1;
    if ((r = get_eos(root, cfg, err)) < 0)
        goto out;
    if (gen_text) {
        gen = json_loads(gen_text, 0, &jerr);
        if (!gen) {
            r = ad_err_set(err, -EINVAL, "generation_config.json: line %d: %s", jerr.line,
                           jerr.text);
            goto out;
        }
        if ((r = get_eos(gen, cfg, err)) < 0) {
            ad_err_prefix(err, "generation_config.json");
            goto out;
        }
    }
    for (int i = 0; i < cfg->n_eos; i++)
        if (cfg->eos_ids[i] < 0 || cfg->eos_ids[i] >= cfg->n_vocab) {
            r = ad_err_set(err, -EINVAL, "eos_token_id %d is outside the vocabulary (%d)",
                           cfg->eos_ids[i], cfg->n_vocab);
            goto out;
        }
    r = 0;
out:
    json_decref(gen);
    json_decref(root);
    return r;
}

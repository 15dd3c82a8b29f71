/* Model loading errors: each names the file or tensor and says what was expected. */
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../check.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"

static char dir[] = "/tmp/adapterd-test-model-XXXXXX";

static const char *llama_cfg =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"vocab_size\":11,"
    "\"hidden_size\":8,\"num_hidden_layers\":1,\"num_attention_heads\":2,"
    "\"num_key_value_heads\":1,\"intermediate_size\":6,\"tie_word_embeddings\":true}";

static void write_text(const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    CHECK(f);
    fputs(text, f);
    fclose(f);
}

/* Writes the tiny model; the tensor named `bad` gets its first dimension + 1, `skip` is left
 * out. */
static void write_model(const char *bad, const char *skip)
{
    static float zeros[1024];
    struct {
        const char *name;
        int64_t d0, d1;
    } t[] = {
        {"model.embed_tokens.weight", 11, 8},
        {"model.norm.weight", 8, 0},
        {"model.layers.0.input_layernorm.weight", 8, 0},
        {"model.layers.0.post_attention_layernorm.weight", 8, 0},
        {"model.layers.0.self_attn.q_proj.weight", 8, 8},
        {"model.layers.0.self_attn.k_proj.weight", 4, 8},
        {"model.layers.0.self_attn.v_proj.weight", 4, 8},
        {"model.layers.0.self_attn.o_proj.weight", 8, 8},
        {"model.layers.0.mlp.gate_proj.weight", 6, 8},
        {"model.layers.0.mlp.up_proj.weight", 6, 8},
        {"model.layers.0.mlp.down_proj.weight", 8, 6},
    };
    struct ad_st_entry e[16];
    size_t n = 0;
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        if (skip && !strcmp(t[i].name, skip))
            continue;
        int64_t d0 = t[i].d0 + (bad && !strcmp(t[i].name, bad));
        e[n++] = (struct ad_st_entry){t[i].name, AD_DTYPE_F32, t[i].d1 ? 2 : 1, {d0, t[i].d1},
                                      zeros};
    }
    char path[512];
    struct ad_err err;
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    CHECK_INT(ad_st_write(path, e, n, NULL, &err), ==, 0);
}

static int load(struct ad_err *err)
{
    struct ad_model *m = NULL;
    int r = ad_model_load(dir, &m, err);
    ad_model_free(m);
    return r;
}

/* Which projections have a bias, per family and flags, as transformers builds them (Llama:
 * attention_bias on q, k, v, o and mlp_bias; Qwen2: q, k, v always, never o or MLP; Mistral:
 * none, whatever the flags say). */
static void test_config_biases(void)
{
    static const struct {
        const char *arch, *flags;
        bool qkv, o, mlp;
    } cases[] = {
        {"LlamaForCausalLM", "", false, false, false},
        {"LlamaForCausalLM", ",\"attention_bias\":true", true, true, false},
        {"LlamaForCausalLM", ",\"mlp_bias\":true", false, false, true},
        {"Qwen2ForCausalLM", "", true, false, false},
        {"Qwen2ForCausalLM", ",\"attention_bias\":false", true, false, false},
        {"Qwen2ForCausalLM", ",\"attention_bias\":true,\"mlp_bias\":true", true, false, false},
        {"MistralForCausalLM", ",\"attention_bias\":true,\"mlp_bias\":true", false, false,
         false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char text[512];
        struct ad_model_config cfg;
        struct ad_err err;
        snprintf(text, sizeof(text),
                 "{\"architectures\":[\"%s\"],\"vocab_size\":11,\"hidden_size\":8,"
                 "\"num_hidden_layers\":1,\"num_attention_heads\":2,"
                 "\"intermediate_size\":6%s}", cases[i].arch, cases[i].flags);
        CHECK_INT(ad_model_config_parse(text, NULL, &cfg, &err), ==, 0);
        if (cfg.qkv_bias != cases[i].qkv || cfg.o_bias != cases[i].o ||
            cfg.mlp_bias != cases[i].mlp) {
            fprintf(stderr, "%s%s: biases q/k/v %d o %d mlp %d, expected %d %d %d\n",
                    cases[i].arch, cases[i].flags, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias,
                    cases[i].qkv, cases[i].o, cases[i].mlp);
            abort();
        }
    }
}

int main(void)
{
    struct ad_err err;
    struct ad_model *m;

    test_config_biases();
    CHECK(mkdtemp(dir));
    CHECK_INT(load(&err), ==, -ENOENT);
    CHECK_CONTAINS(err.msg, "config.json");

    write_text("config.json", llama_cfg);
    CHECK_INT(load(&err), ==, -ENOENT);
    CHECK_CONTAINS(err.msg, "model.safetensors");

    write_model(NULL, NULL);
    CHECK_INT(ad_model_load(dir, &m, &err), ==, 0);
    CHECK_INT(m->cfg.head_dim, ==, 4);
    CHECK_INT(m->n_sites, ==, 8); /* 7 projections + the tied lm_head */
    CHECK(m->sites[m->n_sites - 1].w == m->tok_embd);
    CHECK(ad_model_find_site(m, "model.layers.0.self_attn.q_proj") != NULL);
    CHECK(ad_model_find_site(m, "layers.0.mlp.down_proj") != NULL);
    CHECK(ad_model_find_site(m, "model.layers.1.self_attn.q_proj") == NULL);
    CHECK_STR(ad_model_find_site(m, "lm_head")->path, "lm_head");
    ad_model_free(m);

    write_model("model.layers.0.self_attn.k_proj.weight", NULL);
    CHECK_INT(load(&err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "model.layers.0.self_attn.k_proj.weight");
    CHECK_CONTAINS(err.msg, "expected shape [4, 8], found [5, 8]");

    write_model(NULL, "model.layers.0.mlp.up_proj.weight");
    CHECK_INT(load(&err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "missing tensor 'model.layers.0.mlp.up_proj.weight'");

    write_text("config.json", "{\"architectures\":[\"BertModel\"]}");
    CHECK_INT(load(&err), ==, -ENOTSUP);
    CHECK_CONTAINS(err.msg, "'BertModel' is not supported");

    write_text("config.json", "{\"architectures\":[\"LlamaForCausalLM\"], \"vocab_size\": 3}");
    CHECK_INT(load(&err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "missing 'hidden_size'");

    write_text("config.json", "{\"architectures\": [");
    CHECK_INT(load(&err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "config.json");

    char path[512];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    unlink(path);
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    unlink(path);
    rmdir(dir);
    printf("model: ok\n");
    return 0;
}

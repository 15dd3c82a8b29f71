/* adapterd: wiring only. Placeholder until the HTTP daemon (#5) lands: loads the model and
 * reports what it found. */
#include <stdio.h>
#include <stdlib.h>

#include "adapterd/model.h"
#include "adapterd/util.h"

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "models/demo";
    struct ad_model *m;
    struct ad_err err;

    if (ad_model_load(dir, &m, &err) < 0) {
        log_error("%s", err.msg);
        return 1;
    }
    log_info("model '%s': %s, %d layers, %d hidden, %d vocab, %.1f MB of weights", m->id,
             m->cfg.architecture, m->cfg.n_layer, m->cfg.n_embd, m->cfg.n_vocab,
             (double)m->weight_bytes / 1e6);
    ad_model_free(m);
    return 0;
}

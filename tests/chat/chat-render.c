/* chat-render: adapterd's ad_chat_render() and ad_chat_segments() (src/model/chat.c) for
 * tests/chat/chat.js. Reads from stdin a JSON list of {template, bos_token, eos_token, messages,
 * add_generation_prompt (default true), segments (default false)} and writes to stdout a JSON
 * list, one entry each: {"text": rendering}, with "turns": [[message, start, end], ...] (byte
 * offsets) when segments was asked for, or {"error": message, "code": -errno}. */
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/tokenizer.h"
#include "adapterd/util.h"

int main(void)
{
    json_error_t je;
    json_t *in = json_loadf(stdin, 0, &je), *out = json_array(), *c;
    size_t i;

    if (!json_is_array(in)) {
        fprintf(stderr, "chat-render: stdin: line %d: %s\n", je.line, je.text);
        return 2;
    }
    json_array_foreach(in, i, c) {
        const char *tmpl = json_string_value(json_object_get(c, "template"));
        const char *bos = json_string_value(json_object_get(c, "bos_token"));
        const char *eos = json_string_value(json_object_get(c, "eos_token"));
        json_t *agp = json_object_get(c, "add_generation_prompt");
        bool segments = json_is_true(json_object_get(c, "segments"));
        struct ad_err err = {0};
        struct ad_chat_turn *turns = NULL;
        size_t n_turns = 0;
        char *text = NULL;
        int rc;

        if (!tmpl) {
            fprintf(stderr, "chat-render: case %zu has no template\n", i);
            return 2;
        }
        if (segments)
            rc = ad_chat_segments(tmpl, bos, eos, json_object_get(c, "messages"), &text, &turns,
                                  &n_turns, &err);
        else
            rc = ad_chat_render(tmpl, bos, eos, json_object_get(c, "messages"),
                                !agp || json_is_true(agp), &text, &err);
        if (rc == 0) {
            json_t *o = json_pack("{s:s}", "text", text);
            if (segments) {
                json_t *t = json_array();
                for (size_t k = 0; k < n_turns; k++)
                    json_array_append_new(t, json_pack("[I, I, I]", (json_int_t)turns[k].message,
                                                       (json_int_t)turns[k].start,
                                                       (json_int_t)turns[k].end));
                json_object_set_new(o, "turns", t);
            }
            json_array_append_new(out, o);
        } else {
            if (rc != err.code) {
                fprintf(stderr, "chat-render: case %zu returned %d but err.code is %d\n", i, rc,
                        err.code);
                return 1;
            }
            json_array_append_new(out, json_pack("{s:s, s:i}", "error", err.msg, "code", rc));
        }
        free(text);
        free(turns);
    }
    if (json_dumpf(out, stdout, JSON_COMPACT) < 0)
        return 1;
    json_decref(in);
    json_decref(out);
    return 0;
}

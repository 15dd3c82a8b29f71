#!/usr/bin/env python3
"""Turns the dashboard's sources into one page compiled into adapterd (src/http/dashboard.c).

usage: embed.py OUT.c index.html dashboard.css dashboard.js

index.html names its style sheet and script as <link rel="stylesheet" href="dashboard.css"> and
<script src="dashboard.js"></script>; both are inlined, so the page is one response with no
other resource. OUT.c defines the page's bytes, its Content-Security-Policy (the inlined style
and script allowed by their SHA-256, nothing else: no other origin, no inline handler, no
style attribute) and an ETag (a hash of the page).
"""
import base64
import hashlib
import sys


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__.strip().splitlines()[2])
    out, html_path, css_path, js_path = sys.argv[1:]
    html = open(html_path, encoding='utf-8').read()
    css = open(css_path, encoding='utf-8').read()
    js = open(js_path, encoding='utf-8').read()

    link = '<link rel="stylesheet" href="dashboard.css">'
    script = '<script src="dashboard.js"></script>'
    for tag in (link, script):
        if html.count(tag) != 1:
            sys.exit(f'embed.py: {html_path} must contain {tag} once')
    if '</script' in js.lower() or '</style' in css.lower():
        sys.exit('embed.py: a closing </script> or </style> inside the sources would end the '
                 'inlined element early')
    html = html.replace(link, f'<style>{css}</style>').replace(script, f'<script>{js}</script>')

    def sha(text):
        return base64.b64encode(hashlib.sha256(text.encode('utf-8')).digest()).decode()

    csp = (f"default-src 'none'; script-src 'sha256-{sha(js)}'; style-src 'sha256-{sha(css)}'; "
           "connect-src 'self'; img-src 'self' data: blob:; form-action 'none'; "
           "frame-ancestors 'none'; base-uri 'none'")
    page = html.encode('utf-8')
    etag = '"' + hashlib.sha256(page).hexdigest()[:20] + '"'

    lines = []
    for i in range(0, len(page), 20):
        lines.append('    ' + ', '.join(str(b) for b in page[i:i + 20]) + ',')
    with open(out, 'w', encoding='ascii') as f:
        f.write('/* Written by src/http/ui/embed.py from src/http/ui/: do not edit. */\n'
                '#include <stddef.h>\n\n'
                f'const unsigned char ad_ui_page[] = {{\n' + '\n'.join(lines) + '\n};\n'
                f'const size_t ad_ui_page_len = {len(page)};\n'
                f'const char ad_ui_page_csp[] = "{csp}";\n'
                f'const char ad_ui_page_etag[] = "{etag.replace(chr(34), chr(92) + chr(34))}";\n')


if __name__ == '__main__':
    main()

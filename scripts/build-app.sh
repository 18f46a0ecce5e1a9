#!/usr/bin/env bash
# Builds the playground into dist/ with trunk (release, offline). Serve dist/ with public/
# beside it (kindling-server does both), or copy public/{models,sae,atlas} next to dist/.
#
# After trunk, three steps make dist/ one deployment (the Python below):
# * trunk's inline loader script moves into a file: the page's CSP runs no inline script;
# * the engine workers' script and wasm get content-hashed names (trunk names workers by
#   binary only), so a worker's loader never pairs with another build's files;
# * a build id (a hash of dist/, or $KINDLING_BUILD_ID) is written into index.html, sw.js,
#   the workers' loaders and build.json (the service worker's list of the build's files).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/install-web-tools.sh
export PATH="${KINDLING_CACHE:-$HOME/.cache/kindling}/tools/bin:$PATH"
trunk build --release

python3 - dist <<'EOF'
import hashlib, json, os, re, sys

dist = sys.argv[1]
PLACEHOLDER = '__KINDLING_BUILD__'
path = lambda name: os.path.join(dist, name)
read = lambda name: open(path(name), encoding='utf-8').read()
def write(name, text):
    with open(path(name), 'w', encoding='utf-8') as f:
        f.write(text)
def digest(*names):
    h = hashlib.sha256()
    for name in names:
        with open(path(name), 'rb') as f:
            h.update(f.read())
    return h.hexdigest()

# 1. Trunk's inline module script (it imports the page's hashed wasm) becomes a file.
html = read('index.html')
inline = re.compile(r'<script type="module"[^>]*>(.*?)</script>', re.S)
scripts = inline.findall(html)
if len(scripts) != 1:
    sys.exit(f'expected one inline loader script in dist/index.html, found {len(scripts)}')
start = f'start-{hashlib.sha256(scripts[0].encode()).hexdigest()[:16]}.js'
write(start, scripts[0].strip() + '\n')
html = inline.sub(f'<script type="module" src="./{start}"></script>', html)
leftover = [s for s in re.findall(r'<script\b[^>]*>', html) if 'src=' not in s]
if leftover:
    sys.exit(f'dist/index.html still has inline scripts, which its CSP blocks: {leftover}')

# 2. Content-hashed names for each engine worker's script and wasm.
for worker in ('kindling-worker', 'kindling-worker-webgpu'):
    if not os.path.exists(path(f'{worker}_loader.js')):
        continue
    h = digest(f'{worker}.js', f'{worker}_bg.wasm')[:16]
    os.replace(path(f'{worker}.js'), path(f'{worker}-{h}.js'))
    os.replace(path(f'{worker}_bg.wasm'), path(f'{worker}-{h}_bg.wasm'))
    # The loader (fixed name: the page starts it) says its build first, then starts the engine.
    write(f'{worker}_loader.js',
          f"self.postMessage(JSON.stringify({{ type: 'build', build: '{PLACEHOLDER}' }}));\n"
          f"importScripts('./{worker}-{h}.js');\nwasm_bindgen('./{worker}-{h}_bg.wasm');\n")
write('index.html', html)

# 3. The build id, and the files the service worker keeps (the WebGPU worker only once used).
files = sorted(os.path.relpath(os.path.join(d, f), dist) for d, _, names in os.walk(dist) for f in names)
files = [f for f in files if f != 'build.json']
build = os.environ.get('KINDLING_BUILD_ID') or digest(*files)[:12]
if not re.fullmatch(r'[A-Za-z0-9._-]{1,64}', build):
    sys.exit(f'KINDLING_BUILD_ID {build!r}: letters, digits, ".", "_" and "-" only')
for name in files:
    if name.endswith(('.html', '.js')) and PLACEHOLDER in read(name):
        write(name, read(name).replace(PLACEHOLDER, build))
precache = ['./'] + [f'./{f}' for f in files
                     if f not in ('sw.js', 'index.html') and not f.startswith('kindling-worker-webgpu')
                     and not f.endswith('.d.ts')]
write('build.json', json.dumps({'build': build, 'precache': precache}, indent=1) + '\n')
print(f'dist/: build {build}, {len(precache)} files for the service worker')
EOF

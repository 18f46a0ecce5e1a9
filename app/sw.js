// The playground's service worker: keeps the page itself (HTML, scripts, wasm, styles) so that
// a reload works offline. The model, SAE and atlas are not its business: the engine worker keeps
// them in Cache Storage under their sha256 already. Network first, so a new build is picked up
// whenever the server is reachable; the cache answers only when the network cannot.
//
// One cache per build (scripts/build-app.sh writes the build id below and lists the build's
// files in build.json): a new build's worker fills its own cache on install and deletes every
// older one on activate, so the page, its wasm and the engine worker's files never mix builds,
// online (every request revalidates: the workers' loaders have fixed names) or offline.
const BUILD = '__KINDLING_BUILD__';
const PREFIX = 'kindling-shell-';
const SHELL = PREFIX + BUILD;
const NOT_SHELL = /\/(models|sae|atlas|api|v1)\//;

self.addEventListener('install', (event) => {
  event.waitUntil((async () => {
    // A server that already has another build than this worker's fails the install: its own
    // sw.js comes next and installs that build whole.
    const manifest = await (await fetch('./build.json', { cache: 'no-cache' })).json();
    if (manifest.build !== BUILD) {
      throw new Error(`the server has build ${manifest.build}, this service worker is build ${BUILD}`);
    }
    const cache = await caches.open(SHELL);
    await cache.addAll(manifest.precache.map((file) => new Request(file, { cache: 'no-cache' })));
    await self.skipWaiting();
  })());
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) {
      if (name.startsWith(PREFIX) && name !== SHELL) {
        await caches.delete(name);
      }
    }
    await self.clients.claim();
  })());
});

/** The network's answer, revalidated (never a stale HTTP-cache copy of another build). */
function fromNetwork(request) {
  let revalidating = request;
  try {
    revalidating = new Request(request, { cache: 'no-cache' });
  } catch {
    // Requests this browser cannot copy go as they are.
  }
  return fetch(revalidating);
}

async function fromCache(request) {
  try {
    const cache = await caches.open(SHELL);
    // ignoreVary: the server varies on CORS request headers, which a precached request lacks.
    const options = { ignoreSearch: true, ignoreVary: true };
    return (await cache.match(request, options))
      ?? (request.mode === 'navigate' ? await cache.match('./', options) : undefined);
  } catch {
    return undefined;
  }
}

self.addEventListener('fetch', (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (request.method !== 'GET' || url.origin !== self.location.origin || NOT_SHELL.test(url.pathname)
    || url.pathname.endsWith('/sw.js')) {
    return;
  }
  event.respondWith((async () => {
    let response;
    try {
      response = await fromNetwork(request);
    } catch (offline) {
      const cached = await fromCache(request);
      if (cached) {
        return cached;
      }
      throw offline;
    }
    // Keeping a copy is a bonus: a failed put (quota, a partial or odd answer) never turns
    // the network's good answer into the offline fallback.
    if (response.status === 200 && response.type === 'basic' && !request.headers.has('range')) {
      const copy = response.clone();
      event.waitUntil(caches.open(SHELL).then((cache) => cache.put(request, copy)).catch(() => {}));
    }
    return response;
  })());
});

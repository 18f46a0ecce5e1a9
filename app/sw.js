// The playground's service worker: keeps the page itself (HTML, scripts, wasm, styles) so that
// a reload works offline. The model, SAE and atlas are not its business: the engine worker keeps
// them in Cache Storage under their sha256 already. Network first, so a new build is picked up
// whenever the server is reachable; the cache answers only when the network cannot.
const SHELL = 'kindling-shell-v1';
// The CPU engine's worker (trunk's loader shim and its files); the page's own hashed files are
// read from index.html. The WebGPU worker is kept when first used.
const WORKER_FILES = ['./kindling-worker_loader.js', './kindling-worker.js', './kindling-worker_bg.wasm'];
const NOT_SHELL = /\/(models|sae|atlas|api|v1)\//;

self.addEventListener('install', (event) => {
  event.waitUntil((async () => {
    const cache = await caches.open(SHELL);
    const index = await fetch('./', { cache: 'no-cache' });
    const html = await index.clone().text();
    const files = [...html.matchAll(/(?:href|from|module_or_path:)\s*=?\s*["'](\.\/[^"']+)["']/g)].map((m) => m[1]);
    await cache.put('./', index);
    await cache.addAll([...new Set([...files, ...WORKER_FILES])]);
    await self.skipWaiting();
  })());
});

self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('fetch', (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (request.method !== 'GET' || url.origin !== self.location.origin || NOT_SHELL.test(url.pathname)) {
    return;
  }
  event.respondWith((async () => {
    const cache = await caches.open(SHELL);
    try {
      const response = await fetch(request);
      if (response.ok) {
        await cache.put(request, response.clone());
      }
      return response;
    } catch (offline) {
      // ignoreVary: the server varies on CORS request headers, which a precached request lacks.
      const cached = await cache.match(request, { ignoreSearch: true, ignoreVary: true });
      if (cached) {
        return cached;
      }
      throw offline;
    }
  })());
});

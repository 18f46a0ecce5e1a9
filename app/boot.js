// Starts the engine's worker while the page's own wasm is still downloading and compiling
// (about 0.15 s on a 2-core machine): the worker's wasm compiles meanwhile, and the page
// adopts the worker when it starts (app/src/boot.rs). It starts only what the page would
// start: the remembered mode's local engine, and for "auto" the backend the page picks (WebGPU
// on a hardware adapter, else the CPU). It sends the worker nothing; the page sends the load
// request, or stops the worker if it chooses otherwise (a shared Neuronpedia variant, say).
// A file of its own: the page's CSP runs no inline script.
// Keep in step with: MODE_KEY and Mode::parse (components/connection.rs), CPU_WORKER_URL and
// WEBGPU_WORKER_URL (client.rs), webgpu_adapter (connection.rs).
'use strict';
(() => {
  let mode = null;
  try {
    mode = localStorage.getItem('kindling.mode');
  } catch {
    // Storage blocked: the page then uses its default, auto.
  }
  if (mode === 'hosted' || mode === 'neuronpedia') return;
  if (mode !== 'cpu' && mode !== 'webgpu') mode = 'auto';
  const adapter = async () => {
    try {
      const found = await navigator.gpu?.requestAdapter();
      if (!found) return 'none';
      return (found.info?.isFallbackAdapter ?? found.isFallbackAdapter) ? 'fallback' : 'hardware';
    } catch {
      return 'none';
    }
  };
  self.kindlingBoot = (mode === 'auto' ? adapter() : Promise.resolve(null)).then((found) => {
    const backend = mode === 'auto' ? (found === 'hardware' ? 'webgpu' : 'cpu') : mode;
    const build = document.querySelector('meta[name=kindling-build]')?.content ?? '';
    const loader = backend === 'webgpu' ? './kindling-worker-webgpu_loader.js' : './kindling-worker_loader.js';
    const stamped = build !== '' && !build.startsWith('__');
    const worker = new Worker(stamped ? `${loader}?build=${build}` : loader);
    // What the worker says before the page listens, replayed to the page in order.
    const early = [];
    const boot = { backend, adapter: found, worker, early, error: null };
    worker.onmessage = (event) => early.push(event.data);
    worker.onerror = (event) => {
      boot.error = event.message || 'the engine worker failed to start';
    };
    return boot;
  });
})();

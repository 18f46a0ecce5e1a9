// Kindling in the browser against wllama on the same GGUF, in headless Debian Chromium.
//
//   node tools/bench-browser/bench.mjs [--runs 3] [--tokens 64]
//
// Needs dist/ (scripts/build-app.sh) and public/ (the model, SAE and atlas). Serves them and
// this directory from one local HTTP server, then per run, in a fresh browser:
//   * playground: the real page, cold (empty Cache Storage) and cached (a second page of the same
//     profile): page load → model ready → prompt sent → first token shown;
//   * kindling engine: the page's worker alone: prefill and decode tokens/s for one reply;
//   * wllama: the same prompt, same greedy decoding, same thread count (1: the worker's wasm
//     engine is single-threaded, and the page is not cross-origin isolated).
// Prints medians and Kindling/wllama ratios, and writes target/bench/browser.json.

import { createServer } from 'node:http';
import { readFile, mkdir, writeFile, stat } from 'node:fs/promises';
import { extname, join, normalize, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = fileURLToPath(new URL('.', import.meta.url));
const ROOT = resolve(HERE, '../..');
const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : fallback;
};
const RUNS = arg('runs', 3);
const TOKENS = arg('tokens', 64);
// WebGPU in headless Chromium is SwiftShader, a software adapter: seconds per token.
const WEBGPU_RUNS = arg('webgpu-runs', 1);
const WEBGPU_TOKENS = arg('webgpu-tokens', 8);
const MESSAGES = [{ role: 'user', content: process.env.BENCH_PROMPT ?? 'Write a story about a lighthouse keeper who finds a message in a bottle.' }];
// The prompt as SmolLM2's chat template renders MESSAGES (its default system message included):
// the exact text Kindling's engine tokenizes, handed to wllama as a raw completion so that both
// start from the same 45 tokens.
const RENDERED = '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n'
  + MESSAGES.map((m) => `<|im_start|>${m.role}\n${m.content}<|im_end|>\n`).join('') + '<|im_start|>assistant\n';
const MODEL_URL = '/models/SmolLM2-135M-Instruct.Q4_1.gguf';
const FLAGS = ['--no-sandbox', '--enable-unsafe-webgpu', '--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--disable-quic'];
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm',
  '.json': 'application/json', '.css': 'text/css' };

// `/bench/...` from this directory; everything else from dist/, then public/.
async function serve(request, response) {
  const path = decodeURIComponent(new URL(request.url, 'http://x').pathname);
  const roots = path.startsWith('/bench/') ? [[HERE, path.slice('/bench'.length)]]
    : [[join(ROOT, 'dist'), path], [join(ROOT, 'public'), path]];
  for (const [root, rel] of roots) {
    const file = normalize(join(root, rel.endsWith('/') ? rel + 'index.html' : rel));
    if (!file.startsWith(root)) break;
    try {
      if (!(await stat(file)).isFile()) continue;
      response.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream' });
      response.end(await readFile(file));
      return;
    } catch { /* next root */ }
  }
  response.writeHead(404).end();
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

/** The playground page: ms from navigation start to the first reply token on screen. */
async function playground(context, url, { waitForStore = false } = {}) {
  const page = await context.newPage();
  const phases = loadPhases(page);
  await page.addInitScript(() => {
    new MutationObserver(() => {
      const text = document.querySelector('[data-testid=assistant-message] .text');
      if (text && text.textContent && window.firstTokenMs === undefined) window.firstTokenMs = performance.now();
    }).observe(document, { subtree: true, childList: true, characterData: true });
  });
  await page.goto(url);
  await page.waitForFunction(() => /CPU|failed/.test(document.querySelector('[data-testid=backend]')?.textContent ?? ''),
    null, { timeout: 300_000, polling: 20 });
  const readyMs = await page.evaluate(() => performance.now());
  await page.setChecked('[data-testid=compare]', false);
  await page.fill('[data-testid=temperature]', '0');
  await page.fill('[data-testid=max-tokens]', '4');
  await page.fill('[data-testid=prompt]', MESSAGES[0].content);
  await page.click('[data-testid=send]');
  await page.waitForFunction(() => window.firstTokenMs !== undefined, null, { timeout: 300_000, polling: 20 });
  const firstTokenMs = await page.evaluate(() => window.firstTokenMs);
  // The SAE and the atlas come after the model (chat first): when every route works.
  await page.waitForFunction(() => document.querySelector('[data-testid=backend]')?.dataset.features === 'ready',
    null, { timeout: 300_000, polling: 20 });
  const featuresReadyMs = await page.evaluate(() => performance.now());
  // A first visit stores the model in OPFS after it is ready: the next (cached) visit is one
  // that came after it had finished.
  if (waitForStore) await Promise.race([phases.stored, new Promise((ok) => setTimeout(ok, 60_000))]);
  await page.close();
  return { ready_ms: readyMs, features_ready_ms: featuresReadyMs, first_token_ms: firstTokenMs, load_phases: phases.line };
}

/** The worker's "kindling load: …" console line (each loading step's milliseconds). */
function loadPhases(page) {
  const seen = { line: null };
  seen.stored = new Promise((ok) => { seen.onStored = ok; });
  page.on('console', (m) => {
    if (!m.text().startsWith('kindling load:')) return;
    if (/model (stored in|refused by) OPFS/.test(m.text())) seen.onStored();
    const line = m.text().slice('kindling load: '.length);
    seen.line = seen.line ? `${seen.line}; ${line}` : line;
  });
  return seen;
}

async function inPage(context, url, params) {
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error('page error:', e.message));
  const phases = loadPhases(page);
  await page.goto(url);
  await page.waitForFunction(() => window.benchReady === true);
  const result = await page.evaluate((p) => window.run(p), params);
  await page.close();
  return { ...result, load_phases: phases.line };
}

const server = createServer((q, r) => serve(q, r).catch((e) => r.writeHead(500).end(String(e))));
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const base = `http://127.0.0.1:${server.address().port}`;
const runs = [];
for (let run = 1; run <= RUNS; run++) {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', headless: true, args: FLAGS });
  const record = {};
  const fresh = await browser.newContext();
  record.playground_cold = await playground(fresh, base + '/', { waitForStore: true });
  record.playground_cached = await playground(fresh, base + '/');
  await fresh.close();
  const engine = await browser.newContext();
  record.kindling = await inPage(engine, base + '/bench/kindling.html', { messages: MESSAGES, maxTokens: TOKENS });
  await engine.close();
  const peer = await browser.newContext();
  record.wllama = await inPage(peer, base + '/bench/wllama.html', { prompt: RENDERED, maxTokens: TOKENS, threads: 1, modelUrl: MODEL_URL });
  await peer.close();
  if (run <= WEBGPU_RUNS) {
    const gpu = await browser.newContext();
    record.kindling_webgpu = await inPage(gpu, base + '/bench/kindling.html', { messages: MESSAGES, maxTokens: WEBGPU_TOKENS, backend: 'webgpu' });
    // The same profile again: model, SAE and atlas from Cache Storage.
    record.kindling_webgpu_cached = await inPage(gpu, base + '/bench/kindling.html', { messages: MESSAGES, maxTokens: WEBGPU_TOKENS, backend: 'webgpu' });
    await gpu.close();
    console.log(`run ${run}: kindling on WebGPU: page load to first token ${record.kindling_webgpu.first_token_ms.toFixed(0)} ms, `
      + `prefill ${record.kindling_webgpu.prefill_ms.toFixed(0)} ms, decode ${record.kindling_webgpu.decode_tok_s.toFixed(2)} tok/s `
      + `(${record.kindling_webgpu.tokens} tokens); same text as the CPU path: ${record.kindling.text.startsWith(record.kindling_webgpu.text)}`);
  }
  await browser.close();
  runs.push(record);
  const r = (x) => x.toFixed(0);
  console.log(`run ${run}: load steps: playground cold: ${record.playground_cold.load_phases}; cached: ${record.playground_cached.load_phases}; `
    + `engine page: ${record.kindling.load_phases}`);
  console.log(`run ${run}: playground first token cold ${r(record.playground_cold.first_token_ms)} ms, cached ${r(record.playground_cached.first_token_ms)} ms; `
    + `kindling prefill ${r(record.kindling.prefill_ms)} ms, decode ${record.kindling.decode_tok_s.toFixed(1)} tok/s (${record.kindling.tokens} tokens); `
    + `wllama prefill ${r(record.wllama.prefill_ms)} ms, decode ${record.wllama.decode_tok_s.toFixed(1)} tok/s (${record.wllama.tokens} tokens)`);
}
server.close();

const m = (f) => median(runs.map(f));
const gpuRuns = runs.filter((r) => r.kindling_webgpu);
const summary = {
  runs: RUNS, tokens: TOKENS, threads: 1, prompt: MESSAGES[0].content,
  playground_first_token_cold_ms: m((r) => r.playground_cold.first_token_ms),
  playground_first_token_cached_ms: m((r) => r.playground_cached.first_token_ms),
  playground_ready_cold_ms: m((r) => r.playground_cold.ready_ms),
  playground_ready_cached_ms: m((r) => r.playground_cached.ready_ms),
  playground_features_ready_cached_ms: m((r) => r.playground_cached.features_ready_ms),
  kindling: { load_ms: m((r) => r.kindling.ready_ms), prefill_ms: m((r) => r.kindling.prefill_ms),
    decode_tok_s: m((r) => r.kindling.decode_tok_s), page_to_first_token_ms: m((r) => r.kindling.first_token_ms) },
  wllama: { load_ms: m((r) => r.wllama.ready_ms), prefill_ms: m((r) => r.wllama.prefill_ms),
    decode_tok_s: m((r) => r.wllama.decode_tok_s), page_to_first_token_ms: m((r) => r.wllama.first_token_ms) },
  kindling_webgpu: gpuRuns.length === 0 ? null : {
    runs: gpuRuns.length, tokens: WEBGPU_TOKENS,
    load_ms: median(gpuRuns.map((r) => r.kindling_webgpu.ready_ms)),
    prefill_ms: median(gpuRuns.map((r) => r.kindling_webgpu.prefill_ms)),
    decode_tok_s: median(gpuRuns.map((r) => r.kindling_webgpu.decode_tok_s)),
    page_to_first_token_ms: median(gpuRuns.map((r) => r.kindling_webgpu.first_token_ms)),
    page_to_first_token_cached_ms: median(gpuRuns.map((r) => r.kindling_webgpu_cached.first_token_ms)),
    load_cached_ms: median(gpuRuns.map((r) => r.kindling_webgpu_cached.ready_ms)),
    same_text_as_cpu: gpuRuns.every((r) => r.kindling.text.startsWith(r.kindling_webgpu.text)),
  },
  same_greedy_text: runs.every((r) => r.kindling.text === r.wllama.text),
  texts: { kindling: runs[0].kindling.text, wllama: runs[0].wllama.text },
  runs_raw: runs,
};
const ratio = (a, b) => (a / b).toFixed(2);
console.log(`\nmedians of ${RUNS} fresh browsers, ${TOKENS} tokens greedy, 1 thread`);
console.log(`| | Kindling (CPU, wasm) | wllama | Kindling / wllama |`);
console.log(`|---|---|---|---|`);
console.log(`| load: fetch + build (ms) | ${summary.kindling.load_ms.toFixed(0)} | ${summary.wllama.load_ms.toFixed(0)} | ${ratio(summary.kindling.load_ms, summary.wllama.load_ms)} |`);
console.log(`| prefill to first token (ms) | ${summary.kindling.prefill_ms.toFixed(0)} | ${summary.wllama.prefill_ms.toFixed(0)} | ${ratio(summary.kindling.prefill_ms, summary.wllama.prefill_ms)} |`);
console.log(`| decode (tok/s) | ${summary.kindling.decode_tok_s.toFixed(1)} | ${summary.wllama.decode_tok_s.toFixed(1)} | ${ratio(summary.kindling.decode_tok_s, summary.wllama.decode_tok_s)} |`);
console.log(`| page load to first token (ms) | ${summary.kindling.page_to_first_token_ms.toFixed(0)} | ${summary.wllama.page_to_first_token_ms.toFixed(0)} | ${ratio(summary.kindling.page_to_first_token_ms, summary.wllama.page_to_first_token_ms)} |`);
console.log(`playground (the real UI) page load to first token: cold ${summary.playground_first_token_cold_ms.toFixed(0)} ms, cached ${summary.playground_first_token_cached_ms.toFixed(0)} ms`);
console.log(`playground, cached: navigation to model ready ${summary.playground_ready_cached_ms.toFixed(0)} ms, to model, SAE and atlas ready ${summary.playground_features_ready_cached_ms.toFixed(0)} ms`);
console.log(`same greedy text: ${summary.same_greedy_text}`);
// Issue 19's page rows: this run beside the figures when the issue was filed (2026-11-30).
const cachedReady = summary.playground_features_ready_cached_ms;
console.log(`\nIssue 19's page rows (this run beside the figures when the issue was filed):`);
console.log(`| figure | when filed | this run | bar |`);
console.log(`|---|---|---|---|`);
console.log(`| page decode vs wllama | 0.95–1.12× | ${ratio(summary.kindling.decode_tok_s, summary.wllama.decode_tok_s)}× | ≥ 2× |`);
console.log(`| page prefill vs wllama (times faster) | 4.4–5.1× | ${ratio(summary.wllama.prefill_ms, summary.kindling.prefill_ms)}× | ≥ 3× |`);
console.log(`| page load vs wllama's model load, cold | 2.4–2.8× | ${ratio(summary.kindling.load_ms, summary.wllama.load_ms)}× | ≤ 1× |`);
console.log(`| the same, cached (navigation to model, SAE and atlas ready, page start and a 4-token reply included) | — | ${ratio(cachedReady, summary.wllama.load_ms)}× | ≤ 1× |`);
console.log(`| navigation to first token on screen, cached | 2.8–3.2 s | ${(summary.playground_first_token_cached_ms / 1000).toFixed(2)} s | ≤ 2 s |`);
if (summary.kindling_webgpu) {
  const g = summary.kindling_webgpu;
  console.log(`Kindling on WebGPU (${g.runs} run(s), ${g.tokens} tokens): load ${g.load_ms.toFixed(0)} ms, prefill ${g.prefill_ms.toFixed(0)} ms, `
    + `decode ${g.decode_tok_s.toFixed(2)} tok/s, page load to first token ${g.page_to_first_token_ms.toFixed(0)} ms `
    + `(cached: load ${g.load_cached_ms.toFixed(0)} ms, first token ${g.page_to_first_token_cached_ms.toFixed(0)} ms); same text as the CPU path: ${g.same_text_as_cpu}`);
}
await mkdir(join(ROOT, 'target/bench'), { recursive: true });
await writeFile(join(ROOT, 'target/bench/browser.json'), JSON.stringify(summary, null, 2));

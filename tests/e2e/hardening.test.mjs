// End-to-end tests of the page's defences, in headless Debian Chromium: deployments that
// replace each other (service worker, build ids), the hosted API key (where it is kept, where
// it may go, the page's CSP) and share links that lie about their features.
//
// Run by scripts/test-e2e.sh like playground.test.mjs: kindling-server serves dist/ and
// public/ on KINDLING_URL. The deployment test serves copies of dist/ itself (a small static
// server below), so it needs no second build: the copies differ only in their build id.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { createHash } from 'node:crypto';
import { deflateRawSync } from 'node:zlib';
import { cpSync, createReadStream, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, extname, join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { waitForAsync } from './wait.mjs';

const URL = process.env.KINDLING_URL ?? 'http://127.0.0.1:8090';
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const FLAGS = ['--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--disable-quic'];
const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const MODEL = 'HuggingFaceTB/SmolLM2-135M-Instruct';
const LOAD_TIMEOUT = 180_000;

let browser;

before(async () => {
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: FLAGS });
});

after(async () => {
  await browser?.close();
});

/** Every message on the notice bar. */
async function notices(p) {
  return (await p.$$eval('[data-testid=notice]', (els) => els.map((e) => e.textContent))).join(' | ');
}

async function waitForText(p, selector, pattern, timeout = 60_000) {
  await p.waitForFunction(([s, source]) => new RegExp(source).test(document.querySelector(s)?.textContent ?? ''),
    [selector, pattern.source], { timeout, polling: 100 }).catch(async (e) => {
    throw new Error(`${selector} never matched ${pattern}: it reads ${JSON.stringify(await p.textContent(selector).catch(() => null))}; notices: ${await notices(p)} (${e.message})`);
  });
}

// --- A static host for whole deployments --------------------------------------------------

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript',
  '.wasm': 'application/wasm', '.css': 'text/css', '.json': 'application/json' };

/** Serves `site()` (a copy of dist/) with public/ beside it, as a plain static host does:
 *  Last-Modified, byte ranges, no Cache-Control. */
async function staticHost(site) {
  const server = http.createServer((req, res) => {
    const path = normalize(decodeURIComponent(new globalThis.URL(req.url, 'http://x').pathname));
    const base = /^\/(models|sae|atlas)\//.test(path) ? join(ROOT, 'public') : site();
    let file = join(base, path.endsWith('/') ? path + 'index.html' : path);
    let stat;
    try {
      stat = statSync(file);
    } catch {
      res.writeHead(404).end();
      return;
    }
    const headers = { 'Content-Type': TYPES[extname(file)] ?? 'application/octet-stream',
      'Last-Modified': stat.mtime.toUTCString(), 'Accept-Ranges': 'bytes' };
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    if (range) {
      const start = Number(range[1]);
      const end = range[2] ? Math.min(Number(range[2]), stat.size - 1) : stat.size - 1;
      res.writeHead(206, { ...headers, 'Content-Range': `bytes ${start}-${end}/${stat.size}`, 'Content-Length': end - start + 1 });
      createReadStream(file, { start, end }).pipe(res);
    } else {
      res.writeHead(200, { ...headers, 'Content-Length': stat.size });
      createReadStream(file).pipe(res);
    }
  });
  await new Promise((done) => server.listen(0, '127.0.0.1', done));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => server.close() };
}

/** A copy of dist/ whose build id is `id` (written wherever build-app.sh wrote the real one);
 *  file dates are kept, as a deployment by rsync or a CDN keeps them. */
function deployment(id) {
  const dist = join(ROOT, 'dist');
  const real = JSON.parse(readFileSync(join(dist, 'build.json'), 'utf8')).build;
  const dir = mkdtempSync(join(tmpdir(), `kindling-${id}-`));
  cpSync(dist, dir, { recursive: true, preserveTimestamps: true });
  const rewrite = (d) => {
    for (const entry of readdirSync(d, { withFileTypes: true })) {
      const file = join(d, entry.name);
      if (entry.isDirectory()) {
        rewrite(file);
      } else if (/\.(html|js|json)$/.test(entry.name) && statSync(file).size < 1_000_000) {
        const text = readFileSync(file, 'utf8');
        if (text.includes(real)) writeFileSync(file, text.replaceAll(real, id));
      }
    }
  };
  rewrite(dir);
  return dir;
}

test('a new deployment replaces the old one whole: page, engine worker and cache', async () => {
  const sites = { a: deployment('e2e-build-a'), b: deployment('e2e-build-b') };
  let live = sites.a;
  const host = await staticHost(() => live);
  const ctx = await browser.newContext();
  await ctx.addInitScript(() => localStorage.setItem('kindling.mode', 'cpu'));
  try {
    const p = await ctx.newPage();
    await p.goto(host.url + '/');
    await p.waitForFunction(() => navigator.serviceWorker.controller !== null, null, { timeout: 60_000 });

    // A partial answer (206) cannot be put in a cache: the page still gets the network's
    // answer, not an offline fallback or an error.
    const partial = await p.evaluate(async () => {
      try {
        const r = await fetch('./build.json', { headers: { Range: 'bytes=0-9' } });
        return { status: r.status, text: await r.text() };
      } catch (e) {
        return { error: String(e) };
      }
    });
    assert.deepEqual(partial, { status: 206, text: readFileSync(join(sites.a, 'build.json'), 'utf8').slice(0, 10) });

    await waitForText(p, '[data-testid=build]', /page build e2e-build-a · engine build e2e-build-a$/);
    await waitForAsync(p, async () => (await caches.keys()).includes('kindling-shell-e2e-build-a'),
      'the service worker to keep build A', { timeout: 30_000 });

    // Build B replaces A on the server; a reload runs B's page and B's engine worker, and B's
    // service worker keeps B's files only.
    live = sites.b;
    await p.reload();
    await waitForText(p, '[data-testid=build]', /page build e2e-build-b · engine build e2e-build-b$/);
    await waitForAsync(p, async () => {
      const keys = await caches.keys();
      return keys.includes('kindling-shell-e2e-build-b') && !keys.some((k) => k.startsWith('kindling-shell-') && k !== 'kindling-shell-e2e-build-b');
    }, 'the service worker to keep build B only', { timeout: 30_000 });

    // Offline, the reload is build B whole, from B's cache.
    await ctx.setOffline(true);
    try {
      await p.reload();
      await waitForText(p, '[data-testid=build]', /page build e2e-build-b · engine build e2e-build-b$/);
    } finally {
      await ctx.setOffline(false);
    }
  } finally {
    await ctx.close();
    host.close();
    for (const dir of Object.values(sites)) rmSync(dir, { recursive: true, force: true });
  }
});

test('a page refuses an engine worker of another build', async () => {
  // The page of build A is served, then the server has build B when the worker starts.
  const sites = { a: deployment('e2e-build-a'), b: deployment('e2e-build-b') };
  const host = await staticHost(() => sites.b);
  // Without a service worker: this is about the page and its engine worker only.
  const ctx = await browser.newContext({ serviceWorkers: 'block' });
  await ctx.addInitScript(() => localStorage.setItem('kindling.mode', 'cpu'));
  // Build A's page, however it came (a stale cache, a deploy between two requests).
  await ctx.route('**/', (route) => route.fulfill({ contentType: 'text/html', body: readFileSync(join(sites.a, 'index.html'), 'utf8') }));
  try {
    const p = await ctx.newPage();
    await p.goto(host.url + '/');
    await waitForText(p, '[data-testid=backend]', /failed/);
    assert.match(await notices(p), /build e2e-build-a but its engine worker is build e2e-build-b/);
    assert.match(await p.textContent('[data-testid=build]'), /engine build e2e-build-b \(refused\)/);
  } finally {
    await ctx.close();
    host.close();
    for (const dir of Object.values(sites)) rmSync(dir, { recursive: true, force: true });
  }
});

// --- The hosted API key ---------------------------------------------------------------------

/** A hosted endpoint that knows one key, and a path that redirects elsewhere on its origin. */
async function endpoint() {
  const seen = [];
  const server = http.createServer((req, res) => {
    seen.push({ method: req.method, path: req.url, auth: req.headers.authorization ?? null });
    const cors = { 'Access-Control-Allow-Origin': '*', 'Access-Control-Allow-Headers': 'authorization, content-type',
      'Access-Control-Allow-Methods': 'GET, POST' };
    const json = (status, body) => res.writeHead(status, { ...cors, 'Content-Type': 'application/json' }).end(JSON.stringify(body));
    if (req.method === 'OPTIONS') {
      res.writeHead(204, cors).end();
    } else if (req.url.startsWith('/redirect/')) {
      res.writeHead(307, { ...cors, Location: '/elsewhere/' + req.url.slice('/redirect/'.length) }).end();
    } else if (req.url.startsWith('/elsewhere/')) {
      json(200, { features: [] });
    } else if (req.headers.authorization === 'Bearer sk-good-key') {
      json(200, { features: [] });
    } else {
      json(401, { error: { message: 'wrong API key' } });
    }
  });
  await new Promise((done) => server.listen(0, '127.0.0.1', done));
  return { url: `http://127.0.0.1:${server.address().port}`, seen, close: () => server.close() };
}

test('an API key is kept only once it works, in this tab unless remembered, and never follows a redirect', async () => {
  const api = await endpoint();
  const ctx = await browser.newContext();
  await ctx.addInitScript(() => {
    localStorage.setItem('kindling.mode', 'hosted');
    window.__violations = [];
    document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));
  });
  const requested = [];
  try {
    const p = await ctx.newPage();
    p.on('request', (r) => requested.push(r.url()));
    p.on('pageerror', (e) => console.error('page error:', e.message));
    await p.goto(URL + '/');
    // Hosted mode connects at once to the remembered endpoint (here: this server, no key).
    await waitForText(p, '[data-testid=backend]', /^hosted: /);
    const kept = () => p.evaluate(() => ({ device: localStorage.getItem('kindling.hosted.key'), tab: sessionStorage.getItem('kindling.hosted.key') }));
    const anywhere = (secret) => p.evaluate((s) => JSON.stringify({ ...localStorage }).includes(s) || JSON.stringify({ ...sessionStorage }).includes(s), secret);
    const connect = async (url, key) => {
      await p.fill('[data-testid=hosted-url]', url);
      await p.fill('[data-testid=hosted-model]', MODEL);
      await p.fill('[data-testid=hosted-key]', key);
      await p.click('[data-testid=hosted-connect]');
    };

    // A key the endpoint refuses is not kept anywhere.
    await connect(`${api.url}/ok`, 'sk-wrong-key');
    await waitForText(p, '[data-testid=backend]', /not connected/);
    assert.match(await notices(p), /wrong API key/);
    assert.equal(await anywhere('sk-wrong-key'), false, 'a refused key is not stored');

    // A key that works is kept in this tab only, by default.
    await connect(`${api.url}/ok`, 'sk-good-key');
    await waitForText(p, '[data-testid=backend]', /^hosted: /);
    assert.deepEqual(await kept(), { device: null, tab: 'sk-good-key' });
    // "Remember on this device" moves it to localStorage.
    await p.check('[data-testid=hosted-remember]');
    assert.deepEqual(await kept(), { device: 'sk-good-key', tab: null });

    // A request with a key follows no redirect: the redirect's target never sees the key.
    await connect(`${api.url}/redirect`, 'sk-redirected-key');
    await waitForText(p, '[data-testid=backend]', /not connected/);
    assert.match(await notices(p), /follows no redirect/);
    assert.deepEqual(api.seen.filter((r) => r.path.startsWith('/elsewhere/')), [], 'nothing reaches the redirect target');
    assert.ok(api.seen.some((r) => r.path.startsWith('/redirect/') && r.auth === 'Bearer sk-redirected-key'));
    assert.equal(await anywhere('sk-redirected-key'), false);
    assert.deepEqual(await kept(), { device: 'sk-good-key', tab: null }, 'the key that worked is still the one kept');

    // Plain http:// to another machine: a warning, and nothing is sent until the user says so.
    await connect('http://192.0.2.7:8080', 'sk-good-key');
    await waitForText(p, '[data-testid=insecure-warning]', /unencrypted.*192\.0\.2\.7/);
    await p.waitForTimeout(500);
    assert.deepEqual(requested.filter((u) => u.includes('192.0.2.7')), []);

    // The page's CSP: its own scripts ran without a violation; an injected inline script does not run.
    assert.deepEqual(await p.evaluate(() => window.__violations), []);
    const csp = await p.getAttribute('meta[http-equiv=Content-Security-Policy]', 'content');
    assert.match(csp, /script-src 'self' 'wasm-unsafe-eval'/);
    const ran = await p.evaluate(() => new Promise((done) => {
      window.__injected = false;
      const s = document.createElement('script');
      s.textContent = 'window.__injected = true';
      document.head.append(s);
      setTimeout(() => done(window.__injected), 200);
    }));
    assert.equal(ran, false, 'an inline script is blocked');
  } finally {
    await ctx.close();
    api.close();
  }
});

// --- Share links that lie -------------------------------------------------------------------

/** A share link's payload for any variant JSON, made as kindling_ember::variant makes one. */
function shareLink(variant) {
  const json = Buffer.from(JSON.stringify(variant));
  const packed = Buffer.concat([createHash('sha256').update(json).digest().subarray(0, 4), deflateRawSync(json, { level: 9 })]);
  return 'k1.' + packed.toString('base64url');
}

test('a share link\'s labels are shown as text, checked against the atlas, and its counts bounded', async () => {
  const answer = await (await fetch(`${URL}/api/inference/v1/features/lookup`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ indices: [5], model: MODEL }),
  })).json();
  const real = answer.features[0];
  const evil = '<img src=x onerror=alert(1)>';
  const edit = { feature_id: real.uuid, feature_label: evil, index_in_sae: real.index_in_sae, value: 0.5, mode: 'nudge' };
  const ctx = await browser.newContext();
  const dialogs = [];
  try {
    const p = await ctx.newPage();
    p.on('dialog', (d) => {
      dialogs.push(d.message());
      d.dismiss().catch(() => {});
    });
    await p.goto(`${URL}/#v=${shareLink({ base_model: MODEL, edits: [edit], scopes: [], rules: [] })}`);
    // Shown as the link says, as text, until the model is ready...
    await p.click('[data-testid=tab-edits]');
    await p.waitForSelector('[data-testid=edit] .label');
    // ...then checked: the atlas's label replaces the forged one, and the forgery is flagged.
    await waitForText(p, '[data-testid=backend]', /in this page|failed/, LOAD_TIMEOUT);
    await p.waitForFunction(() => /do not match/.test(document.body.textContent), null, { timeout: 30_000 });
    const flagged = await notices(p);
    assert.ok(flagged.includes(`#${real.index_in_sae} is “${real.label}” here, the link says “${evil}”`), flagged);
    assert.equal(await p.textContent('[data-testid=edit] .label'), real.label);
    assert.equal(await p.$$eval('img', (els) => els.length), 0, 'the label made no element');
    assert.deepEqual(dialogs, []);
    // The link names no strength unit (it predates unit 2): its value opens converted, and says so.
    await p.waitForFunction(() => /saved with steering unit 1; its values were converted to unit 2/.test(document.body.textContent), null, { timeout: 30_000 });
    const converted = 0.5 * real.strength_per_unit_1;
    assert.ok(converted > 0.01 && converted < 0.5, `${converted}`);
    assert.equal(await p.textContent('[data-testid=edit-value]'), `+${converted.toFixed(2)}`);
    await p.click('[data-testid=tab-variant]');
    const saved = JSON.parse(await p.textContent('[data-testid=variant-json]'));
    assert.equal(saved.strength_unit, 2);
    assert.ok(Math.abs(saved.edits[0].value - converted) < 1e-4, JSON.stringify(saved.edits[0]));

    // More edits than a variant may have: refused whole, before anything is built.
    const many = Array.from({ length: 1000 }, (_, i) => ({ ...edit, feature_id: `${i}`, feature_label: 'x' }));
    const q = await ctx.newPage();
    await q.goto(`${URL}/#v=${shareLink({ base_model: MODEL, edits: many, scopes: [], rules: [] })}`);
    await q.waitForFunction(() => /cannot be opened/.test(document.body.textContent), null, { timeout: 30_000 });
    assert.match(await notices(q), /cannot be opened.*more than 256 edits/);
    await q.click('[data-testid=tab-variant]');
    assert.equal(JSON.parse(await q.textContent('[data-testid=variant-json]')).edits.length, 0);
  } finally {
    await ctx.close();
  }
});

// End-to-end tests of the playground in headless Debian Chromium: the real app, the real model
// in the page's Web Worker, and the real Kindling server for hosted mode.
//
// Run by scripts/test-e2e.sh, which builds the app, starts kindling-server on KINDLING_URL
// (serving dist/ and public/) and saves screenshots under KINDLING_ARTIFACTS.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { waitForAsync } from './wait.mjs';

const URL = process.env.KINDLING_URL ?? 'http://127.0.0.1:8090';
const ARTIFACTS = process.env.KINDLING_ARTIFACTS ?? 'target/e2e-artifacts';
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
// Flags from machine-facts §D (root needs --no-sandbox; WebGPU needs --enable-unsafe-webgpu).
const FLAGS = ['--no-sandbox', '--enable-unsafe-webgpu', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-quic'];
const LOAD_TIMEOUT = 180_000;
const REPLY_TIMEOUT = 180_000;

let browser;
let context;
let page;

before(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: FLAGS });
  context = await browser.newContext({ viewport: { width: 1366, height: 820 } });
  page = await open(context);
});

after(async () => {
  await browser?.close();
});

/** What the pages' engine workers said about loading and storing ("kindling …" lines), for
 * diagnosing a failed load. */
const workerLog = [];
let pagesOpened = 0;

/** Opens the playground (with an optional URL fragment) and waits for the model. */
async function open(ctx, fragment = '', backend = 'CPU') {
  const p = await ctx.newPage();
  p.on('pageerror', (e) => console.error('page error:', e.message));
  const n = ++pagesOpened;
  p.on('worker', (w) => w.on('console', (m) => {
    if (m.text().startsWith('kindling')) workerLog.push(`page ${n}: ${m.text()}`);
  }));
  await p.goto(URL + '/' + fragment);
  await p.waitForFunction(() => {
    const b = document.querySelector('[data-testid=backend]');
    return b && /in this page|hosted|failed/.test(b.textContent);
  }, null, { timeout: LOAD_TIMEOUT, polling: 250 });
  const state = await p.textContent('[data-testid=backend]');
  assert.match(state, new RegExp(backend),
    `the model should load on the ${backend} path (${state}; notices: ${await notices(p)}; workers so far: ${workerLog.join(' | ')})`);
  return p;
}

/** Every message on the notice bar. */
async function notices(p) {
  return (await p.$$eval('[data-testid=notice]', (els) => els.map((e) => e.textContent))).join(' | ');
}

async function shot(p, name) {
  await p.screenshot({ path: join(ARTIFACTS, `${name}.png`) });
}

async function tab(p, name) {
  await p.click(`[data-testid=tab-${name}]`);
}

/** Sends a prompt (greedy, a few tokens) and waits until every reply has finished. */
async function chat(p, prompt, { maxTokens = 12, compare = true, timeout = REPLY_TIMEOUT } = {}) {
  await p.fill('[data-testid=temperature]', '0');
  await p.fill('[data-testid=max-tokens]', String(maxTokens));
  await p.setChecked('[data-testid=compare]', compare);
  await p.fill('[data-testid=prompt]', prompt);
  await p.click('[data-testid=send]');
  await p.waitForFunction(() => document.querySelector('[data-testid=stop]').disabled
    && !document.querySelector('.typing'), null, { timeout, polling: 100 });
}

async function lastReply(p, column) {
  const texts = await p.$$eval(`[data-testid=${column}-column] [data-testid=assistant-message] .text`,
    (els) => els.map((e) => e.textContent));
  return texts.at(-1);
}

async function variantJson(p) {
  return JSON.parse(await p.textContent('[data-testid=variant-json]'));
}

async function search(p, query) {
  await tab(p, 'features');
  await p.fill('[data-testid=feature-search]', query);
  await p.click('[data-testid=feature-search-go]');
  await p.waitForSelector('[data-testid=feature-hit]');
  return p.$$eval('[data-testid=feature-hit] .label', (els) => els.map((e) => e.textContent));
}

/** Picks, in a feature select, the first option whose text contains `text`. */
async function pickFeature(p, selector, text) {
  const value = await p.$eval(selector, (select, t) =>
    [...select.options].find((o) => o.textContent.includes(t))?.value, text);
  assert.ok(value, `no feature option containing ${text}`);
  await p.selectOption(selector, value);
}

test('the model loads on the CPU path and streams a reply, shown as text', async () => {
  await p_fill_and_watch_stream();
  await shot(page, 'chat');
});

async function p_fill_and_watch_stream() {
  await page.fill('[data-testid=temperature]', '0');
  await page.fill('[data-testid=max-tokens]', '24');
  await page.fill('[data-testid=prompt]', 'Say <b>hello</b> to me.');
  await page.click('[data-testid=send]');
  // Watch the reply grow: a streamed reply is seen at several lengths before it ends.
  const lengths = new Set();
  for (let i = 0; i < 1200; i++) {
    const text = (await lastReply(page, 'variant')) ?? '';
    if (text.length > 0) lengths.add(text.length);
    if (await page.$eval('[data-testid=stop]', (b) => b.disabled) && !(await page.$('.typing'))) break;
    await page.waitForTimeout(50);
  }
  assert.ok(lengths.size >= 2, `the reply should arrive in pieces (saw lengths ${[...lengths]})`);
  assert.ok((await lastReply(page, 'variant')).trim().length > 0);
  assert.ok((await lastReply(page, 'base')).trim().length > 0, 'the base model answers beside the variant');
  // The prompt's markup is shown as text, not turned into an element.
  assert.equal(await page.$$eval('.messages b', (els) => els.length), 0);
  assert.ok((await page.textContent('[data-testid=variant-column]')).includes('<b>hello</b>'));
}

test('boot.js starts the engine worker before the page\'s wasm and the page adopts it; a remembered hosted mode starts none', async () => {
  const ctx = await browser.newContext();
  try {
    const p = await ctx.newPage();
    const workers = [];
    p.on('worker', (w) => workers.push(w.url()));
    await p.goto(URL + '/');
    await p.waitForFunction(() => /in this page|failed/.test(document.querySelector('[data-testid=backend]')?.textContent ?? ''),
      null, { timeout: LOAD_TIMEOUT, polling: 250 });
    assert.match(await p.textContent('[data-testid=backend]'), /CPU/);
    // boot.js ran, its worker was taken over (the page removes the record it takes), and no
    // second worker was started beside it.
    assert.ok(await p.evaluate(() => performance.getEntriesByType('resource').some((e) => e.name.endsWith('/boot.js'))));
    assert.equal(await p.evaluate(() => 'kindlingBoot' in window), false);
    assert.equal(workers.length, 1, `one engine worker (${workers})`);
    assert.match(workers[0], /kindling-worker_loader\.js\?build=/);
    await p.evaluate(() => localStorage.setItem('kindling.mode', 'hosted'));
    const q = await ctx.newPage();
    const more = [];
    q.on('worker', (w) => more.push(w.url()));
    await q.goto(URL + '/');
    await q.waitForSelector('[data-testid=backend]');
    await q.waitForTimeout(1500);
    assert.deepEqual(more, [], 'hosted mode starts no engine worker');
  } finally {
    await ctx.close();
  }
});

test('searching "pirate" lists features, and a card shows a feature\'s contexts', async () => {
  const labels = await search(page, 'pirate');
  assert.ok(labels.length >= 5, `expected several hits, got ${labels.length}`);
  assert.ok(labels.some((l) => /pirate/i.test(l)), `no pirate feature among ${labels}`);
  await page.click('[data-testid=feature-hit] .label');
  await page.waitForSelector('[data-testid=dashboard] .context .tok');
  const shaded = await page.$$eval('[data-testid=dashboard] .context .tok',
    (els) => els.filter((e) => !/rgba\(255, 128, 0, 0(\.0+)?\)/.test(e.getAttribute('style'))).length);
  assert.ok(shaded > 0, 'top contexts shade the tokens the feature fires on');
  await shot(page, 'features');
});

test('the feature map draws every feature, lights up search hits, and a click opens the hovered feature\'s card', async () => {
  await tab(page, 'features');
  const map = '[data-testid=feature-map]';
  await page.waitForSelector(`${map}[data-points]`, { timeout: LOAD_TIMEOUT });
  const points = Number(await page.getAttribute(map, 'data-points'));
  assert.ok(points > 8000, `${points} points on the map`);
  await search(page, 'numbers');
  await page.waitForFunction((sel) => Number(document.querySelector(sel)?.dataset.highlighted) > 0, map);
  const lit = Number(await page.getAttribute(map, 'data-highlighted'));
  assert.ok(lit >= 10, `${lit} search hits lit on the map`);
  await page.click('[data-testid=dashboard] .close').catch(() => {});

  // Zoom in about the middle, then sweep the pointer until it is over a point.
  await page.$eval(map, (c) => c.scrollIntoView({ block: 'center' }));
  const box = await page.$eval(map, (c) => { const r = c.getBoundingClientRect(); return { x: r.x, y: r.y, w: r.width, h: r.height }; });
  await page.mouse.move(box.x + box.w / 2, box.y + box.h / 2);
  await page.mouse.wheel(0, -300);
  await page.waitForFunction((sel) => Number(document.querySelector(sel).dataset.zoom) > 1.5, map);
  let hovered = null;
  let at = null;
  for (let i = 0; i < 400 && !hovered; i++) {
    at = { x: box.x + box.w * (0.2 + 0.6 * ((i * 37) % 100) / 100), y: box.y + box.h * (0.2 + 0.6 * Math.floor(i / 20) / 20) };
    await page.mouse.move(at.x, at.y);
    hovered = await page.$eval('[data-testid=map-hover]', (e) => e.textContent).catch(() => null);
  }
  assert.ok(hovered, 'hovering over the map names a feature');
  const index = hovered.match(/^#(\d+) /)?.[1];
  assert.ok(index, `the hover label starts with the feature's number: ${hovered}`);
  await page.mouse.down();
  await page.mouse.up();
  await page.waitForFunction((i) => document.querySelector('[data-testid=dashboard] .meta')?.textContent.startsWith(`#${i} `), index);
  const title = await page.textContent('[data-testid=dashboard] h3');
  assert.ok(hovered.endsWith(title) || hovered.includes(title.slice(0, 20)), `the card (${title}) is the hovered feature (${hovered})`);

  // Dragging pans without opening a card.
  await page.mouse.move(at.x, at.y);
  await page.mouse.down();
  await page.mouse.move(at.x + 80, at.y + 40, { steps: 8 });
  await page.mouse.up();
  console.log(`feature map: ${points} points, ${lit} hits lit, median draw ${await page.getAttribute(map, 'data-draw-ms')} ms`);
  await shot(page, 'feature-map');
});

test('search by example lists the features that fire on a pasted text, its tokens shaded', async () => {
  await tab(page, 'features');
  const litBefore = Number(await page.getAttribute('[data-testid=feature-map]', 'data-highlighted'));
  await page.fill('[data-testid=example-text]', 'I love cooking pasta with fresh tomatoes and basil for dinner.');
  await page.click('[data-testid=example-go]');
  await page.waitForSelector('[data-testid=example-hit]', { timeout: REPLY_TIMEOUT });
  const hits = await page.$$eval('[data-testid=example-hit] .label', (els) => els.map((e) => e.textContent));
  assert.ok(hits.length >= 5, `several features: ${hits}`);
  assert.ok(hits.some((l) => /dinner|recipe|salt|sugar|spicy|fresh|Italian|chef/i.test(l)), `a food feature among ${hits}`);
  const tokens = await page.$$eval('[data-testid=example-tokens] .tok', (els) => els.map((e) => e.textContent));
  assert.ok(tokens.join('').includes('pasta'), `the example's own tokens: ${tokens.join('|')}`);
  assert.ok(!tokens.join('').includes('im_start'), 'the chat template is left out');
  const shaded = await page.$$eval('[data-testid=example-tokens] .tok',
    (els) => els.filter((e) => !/rgba\(255, 128, 0, 0(\.0+)?\)/.test(e.getAttribute('style'))).length);
  assert.ok(shaded > 0, 'the first hit shades the tokens it fires on');
  // The listed features light up on the map beside the search's hits.
  await page.waitForFunction((n) => Number(document.querySelector('[data-testid=feature-map]').dataset.highlighted) > n, litBefore);
  await shot(page, 'by-example');
});

test('moving a slider changes the next reply versus the base model', async () => {
  await search(page, 'pirate');
  // The first pirate feature the search lists.
  const hits = await page.$$('[data-testid=feature-hit]');
  for (const hit of hits) {
    if (/pirate/i.test(await hit.$eval('.label', (e) => e.textContent))) {
      await (await hit.$('[data-testid=add-edit]')).click();
      break;
    }
  }
  await tab(page, 'edits');
  await page.waitForSelector('[data-testid=edit-slider]');
  // The slider names the zone a value falls in (steer::StrengthZone).
  await page.fill('[data-testid=edit-slider]', '0.3');
  assert.equal(await page.textContent('[data-testid=edit-zone]'), 'clear steering');
  await page.fill('[data-testid=edit-slider]', '1');
  assert.equal(await page.textContent('[data-testid=edit-value]'), '+1.00');
  assert.equal(await page.textContent('[data-testid=edit-zone]'), 'strong: text may break');
  await tab(page, 'variant');
  const variant = await variantJson(page);
  assert.equal(variant.edits.length, 1);
  assert.equal(variant.edits[0].value, 1);
  await page.click('[data-testid=clear]');
  await chat(page, 'Hi, how are you?', { maxTokens: 16 });
  const steered = await lastReply(page, 'variant');
  const base = await lastReply(page, 'base');
  assert.ok(steered.length > 0 && base.length > 0);
  assert.notEqual(steered, base, 'the edited variant should answer differently from the base model');
  await tab(page, 'edits');
  await shot(page, 'edits');
});

test('a rule built in the UI appears in the variant JSON and fires', async () => {
  await search(page, 'greetings');
  await tab(page, 'rules');
  await pickFeature(page, '[data-testid=rule-feature]', 'greetings and goodbye');
  await page.selectOption('[data-testid=rule-operator]', '>');
  await page.fill('[data-testid=rule-threshold]', '0.5');
  await page.selectOption('[data-testid=rule-action]', 'abort');
  await page.fill('[data-testid=rule-event-name]', 'greeting-seen');
  await page.click('[data-testid=add-rule]');
  assert.match(await page.textContent('[data-testid=rules]'), /IF greetings and goodbye[^>]*> 0.5 THEN ABORT/);
  await shot(page, 'rules');

  await tab(page, 'variant');
  const rule = (await variantJson(page)).rules[0];
  assert.equal(rule.then.abort, 'greeting-seen');
  assert.equal(rule.clauses[0].operator, '>');
  assert.equal(rule.clauses[0].value, 0.5);

  // A greeting trips it; a sum does not.
  await page.click('[data-testid=clear]');
  await chat(page, 'Hello! Hi there!', { compare: false });
  const fired = await page.$$eval('[data-testid=variant-column] [data-testid=rule-event]', (els) => els.map((e) => e.textContent));
  assert.ok(fired.some((t) => t.includes('Aborted: “greeting-seen”')), `the abort rule should fire on a greeting (events: ${fired})`);
  // Which rule fired, and where: "Hello" is in the prompt.
  assert.ok(fired.some((t) => /^Rule 1 fired on the prompt: IF greetings and goodbye[^>]*> 0.5 THEN ABORT/.test(t)), `events: ${fired}`);
  await page.click('[data-testid=clear]');
  await chat(page, 'What is 2 + 2?', { compare: false });
  assert.equal(await page.$$eval('[data-testid=variant-column] [data-testid=rule-event]', (els) => els.length), 0);
  assert.ok((await lastReply(page, 'variant')).length > 0);
});

test('the token overlay shades tokens and explains a clicked token', async () => {
  await page.click('[data-testid=clear]');
  await chat(page, 'Hello there, pirate!', { compare: false, maxTokens: 6 });
  await tab(page, 'inspect');
  await page.click('[data-testid=inspect]');
  await page.waitForSelector('[data-testid=overlay-token]');
  await page.waitForSelector('[data-testid=logits] li');
  await pickFeature(page, '[data-testid=overlay-feature]', 'greetings and goodbye');
  const tokens = await page.$$eval('[data-testid=overlay-token]',
    (els) => els.map((e) => [e.textContent, Number(e.dataset.activation)]));
  const hello = tokens.find(([t]) => t === 'Hello');
  assert.ok(hello && hello[1] > 0.3, `"Hello" should light up the greetings feature (${JSON.stringify(hello)})`);
  assert.ok(tokens.filter(([, a]) => a === 0).length > 5, 'most tokens stay unshaded');
  const index = tokens.findIndex(([t]) => t === 'Hello');
  await (await page.$$('[data-testid=overlay-token]'))[index].click();
  await page.waitForSelector('[data-testid=token-features] li');
  const explained = await page.textContent('[data-testid=token-features]');
  assert.ok(explained.includes('greetings and goodbye'), `the clicked token lists the feature by its label: ${explained}`);
  assert.equal(await page.$$eval('[data-testid=logits] li', (els) => els.length), 10);
  await shot(page, 'inspect');
});

test('AutoSteer shows its steps as it works and can be stopped; the engine comes back', async () => {
  await tab(page, 'edits');
  const before = await page.$$eval('[data-testid=edit]', (els) => els.length);
  await page.fill('[data-testid=autosteer]', 'talk about food');
  await page.press('[data-testid=autosteer]', 'Enter');
  await page.waitForFunction(() => /Step 1 of 4: writing plain replies/.test(document.querySelector('[data-testid=autosteer-progress]')?.textContent ?? ''),
    null, { timeout: 10_000, polling: 50 });
  await page.click('[data-testid=autosteer-stop]');
  assert.match(await notices(page), /AutoSteer stopped/);
  // The worker was busy: it is restarted, and the model reloads from the browser's cache.
  await page.waitForFunction(() => /in this page/.test(document.querySelector('[data-testid=backend]').textContent),
    null, { timeout: LOAD_TIMEOUT, polling: 100 });
  assert.equal(await page.$$eval('[data-testid=edit]', (els) => els.length), before, 'a stopped AutoSteer adds no edit');
  assert.equal(await page.isVisible('[data-testid=autosteer-progress]'), false);
  // The base model's reply (the variant's rules from earlier tests may end its own at once).
  await chat(page, 'Hi', { compare: true, maxTokens: 4 });
  assert.ok((await lastReply(page, 'base')).length > 0, 'the restarted engine replies');
});

test('a share link restores the same variant in a fresh page; a tampered one changes nothing', async () => {
  await tab(page, 'variant');
  const original = await variantJson(page);
  assert.ok(original.edits.length > 0 && original.rules.length > 0);
  await page.click('[data-testid=share]');
  const link = await page.inputValue('[data-testid=share-link]');
  const fragment = link.slice(link.indexOf('#'));
  assert.match(fragment, /^#v=k1\./);

  const fresh = await browser.newContext();
  const restored = await open(fresh, fragment);
  await tab(restored, 'variant');
  assert.deepEqual(await variantJson(restored), original);
  await shot(restored, 'variant');

  // One character changed in the middle of the payload.
  const i = Math.floor(fragment.length / 2);
  const tampered = fragment.slice(0, i) + (fragment[i] === 'A' ? 'B' : 'A') + fragment.slice(i + 1);
  const broken = await open(fresh, tampered);
  assert.match(await notices(broken), /cannot be opened/);
  await tab(broken, 'variant');
  const untouched = await variantJson(broken);
  assert.equal(untouched.edits.length, 0);
  assert.equal(untouched.rules.length, 0);

  // An oversized link is refused before it is decoded.
  const huge = await open(fresh, '#v=k1.' + 'A'.repeat(40_000));
  assert.match(await notices(huge), /cannot be opened.*too long/i);
  await tab(huge, 'variant');
  assert.equal((await variantJson(huge)).edits.length, 0);
  await fresh.close();
});

test('a reload starts from the browser cache', async () => {
  const again = await open(context);
  assert.match(await notices(again), /from this browser's cache/);
  // The model is kept once, in the origin-private file system under the manifest's sha256
  // (read from there in one call), not in Cache Storage as well.
  const stored = await again.evaluate(async () => {
    const dir = await navigator.storage.getDirectory();
    const file = async (name) => (await dir.getFileHandle(name)).getFile();
    const manifest = await (await fetch('sae/manifest.json')).json();
    const cached = await (await caches.open('kindling-assets-v1')).keys();
    return {
      sha: await (await file('model.gguf.sha256')).text(),
      size: (await file('model.gguf')).size,
      expected: manifest.config.metadata.model_sha256,
      alsoInCacheStorage: cached.some((r) => r.url.endsWith('.gguf') || r.url.includes('.gguf?')),
    };
  });
  assert.equal(stored.sha, stored.expected);
  assert.ok(stored.size > 50_000_000, `the stored model is ${stored.size} bytes`);
  assert.equal(stored.alsoInCacheStorage, false);
  // Chat is ready first; the SAE and the atlas follow.
  await again.waitForFunction(() => document.querySelector('[data-testid=backend]')?.dataset.features === 'ready',
    null, { timeout: LOAD_TIMEOUT, polling: 100 });
  assert.match(await notices(again), /Model and features ready/);
  await again.close();
});

test('a stored model damaged on disk is downloaded again, then stored whole', async () => {
  const first = await open(context);
  // Zeroes the stored copy's first 4 KB (its GGUF header); its sha256 stays beside it.
  await first.evaluate(async () => {
    const dir = await navigator.storage.getDirectory();
    const writable = await (await dir.getFileHandle('model.gguf')).createWritable({ keepExistingData: true });
    await writable.write({ type: 'write', position: 0, data: new Uint8Array(4096) });
    await writable.close();
  });
  await first.close();
  const again = await open(context);
  assert.doesNotMatch(await notices(again), /Loading failed/);
  assert.doesNotMatch(await notices(again), /from this browser's cache/, 'the model was downloaded');
  // Stored whole again (the offline test below reads it).
  await waitForAsync(again, async () => {
    const dir = await navigator.storage.getDirectory();
    try {
      const sha = await (await (await dir.getFileHandle('model.gguf.sha256')).getFile()).text();
      const head = new Uint8Array(await (await (await dir.getFileHandle('model.gguf')).getFile()).slice(0, 4).arrayBuffer());
      return sha.length === 64 && new TextDecoder().decode(head) === 'GGUF';
    } catch {
      return false;
    }
  }, 'the model to be stored whole in OPFS again', { timeout: LOAD_TIMEOUT });
  await chat(again, 'Hi', { compare: false, maxTokens: 3 });
  assert.ok((await lastReply(again, 'variant')).length > 0, 'a reply from the downloaded model');
  await again.close();
});

test('offline, a reload still opens the playground, loads the model and replies', async () => {
  // What this context has stored, printed for diagnosis (the test has failed here; see the
  // stop-9 note): the storage estimate and the OPFS model copy.
  const probe = await context.newPage();
  await probe.goto(URL + '/atlas/manifest.json');
  console.log('before offline:', JSON.stringify(await probe.evaluate(async () => {
    const { usage, quota } = await navigator.storage.estimate();
    const dir = await navigator.storage.getDirectory();
    const size = async (name) => { try { return (await (await dir.getFileHandle(name)).getFile()).size; } catch { return null; } };
    return { usage, quota, model: await size('model.gguf'), sha: await size('model.gguf.sha256') };
  })));
  await probe.close();
  await context.setOffline(true);
  try {
    const offline = await open(context);
    assert.match(await notices(offline), /from this browser's cache/);
    await chat(offline, 'Hi', { compare: false, maxTokens: 3 });
    assert.ok((await lastReply(offline, 'variant')).length > 0, 'a reply while offline');
    await offline.close();
  } finally {
    await context.setOffline(false);
  }
});

test('hosted mode against the Kindling server streams a reply, and the key stays out of links', async () => {
  const hostedContext = await browser.newContext();
  const p = await open(hostedContext);
  await p.selectOption('[data-testid=mode]', 'hosted');
  await p.fill('[data-testid=hosted-url]', URL);
  await p.fill('[data-testid=hosted-model]', 'HuggingFaceTB/SmolLM2-135M-Instruct');
  await p.fill('[data-testid=hosted-key]', 'sk-test-secret-key');
  await p.click('[data-testid=hosted-connect]');
  await p.waitForFunction(() => /hosted/.test(document.querySelector('[data-testid=backend]').textContent),
    null, { timeout: 60_000 });
  await chat(p, 'Hi, how are you?', { compare: false });
  assert.ok((await lastReply(p, 'variant')).trim().length > 0);
  // AutoSteer (answered by the server): its trials table says what it tried and which it
  // chose, and the chosen edits land on the sliders.
  await tab(p, 'edits');
  await p.fill('[data-testid=autosteer]', 'talk about food');
  await p.click('.autosteer button[type=submit]');
  await p.waitForSelector('[data-testid=autosteer-trial]', { timeout: REPLY_TIMEOUT });
  const trials = await p.$$eval('[data-testid=autosteer-trial]', (rows) =>
    rows.map((r) => ({ cells: [...r.querySelectorAll('td')].map((c) => c.textContent), chosen: r.classList.contains('chosen') })));
  assert.ok(trials.length >= 3, `${trials.length} trials`);
  assert.ok(trials.every((t) => t.cells.length === 6 && /^#\d+ /.test(t.cells[0])), JSON.stringify(trials[0]));
  const chosen = trials.filter((t) => t.chosen);
  assert.equal(chosen.length, 1, JSON.stringify(trials));
  assert.equal(chosen[0].cells[5], 'chosen');
  assert.equal(await p.$$eval('[data-testid=edit-slider]', (s) => s.length), chosen[0].cells[1].split(' & ').length);
  await shot(p, 'autosteer');
  await tab(p, 'variant');
  await p.click('[data-testid=share]');
  const link = await p.inputValue('[data-testid=share-link]');
  assert.ok(!link.includes('sk-test-secret-key') && !p.url().includes('sk-test-secret-key'));
  assert.ok(!(await p.textContent('[data-testid=variant-json]')).includes('sk-test-secret-key'));
  await shot(p, 'hosted');
  await hostedContext.close();
});

test('the WebGPU path gives the same greedy tokens as the CPU path', async () => {
  // Headless Chromium's only adapter is SwiftShader, a software fallback: Auto stays on the
  // CPU there (checked by every test above), so WebGPU is chosen by hand, as a user would.
  // SwiftShader is slow (minutes for a short prompt), hence two new tokens.
  const reply = async (mode) => {
    const ctx = await browser.newContext();
    await ctx.addInitScript((m) => localStorage.setItem('kindling.mode', m), mode);
    const p = await open(ctx, '', mode === 'webgpu' ? 'WebGPU' : 'CPU');
    await chat(p, 'Hi', { compare: false, maxTokens: 2, timeout: 540_000 });
    const text = await lastReply(p, 'variant');
    if (mode === 'webgpu') {
      assert.match(await p.inputValue('[data-testid=mode]'), /webgpu/);
      await shot(p, 'webgpu');
    }
    await ctx.close();
    return text;
  };
  const cpu = await reply('cpu');
  const gpu = await reply('webgpu');
  assert.ok(cpu.length > 0, 'the CPU path replies');
  assert.equal(gpu, cpu, 'WebGPU and CPU give the same greedy reply');
});

// The page's Neuronpedia mode in headless Chromium, against Neuronpedia's contract double
// (tests/neuronpedia/contract_double.py, started by scripts/test-e2e.sh on another port, so
// every call is cross-origin and its CORS rules apply as they would at neuronpedia.org).
// Nothing here is the real service: NEURONPEDIA_LIVE=1 tests/neuronpedia/live_smoke.py is.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const URL = process.env.KINDLING_URL ?? 'http://127.0.0.1:8090';
const DOUBLE = process.env.NEURONPEDIA_DOUBLE_URL;
const ARTIFACTS = process.env.KINDLING_ARTIFACTS ?? 'target/e2e-artifacts';
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const FLAGS = ['--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--disable-quic'];
const TIMEOUT = 30_000;
// Kindling steering units per multiple of maxActApprox (kindling_ember::neuronpedia::MAX_ACTS_PER_UNIT).
const MAX_ACTS_PER_UNIT = 5;

let browser;
let page;

async function control(path, body) {
  const r = await fetch(DOUBLE + path, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body ?? {}) });
  assert.ok(r.ok, `${path}: ${r.status}`);
}

async function doubleLog() {
  return (await fetch(DOUBLE + '/__contract/log')).json();
}

/** A context whose pages start on Neuronpedia at the double's address. */
async function neuronpediaContext({ mode = true } = {}) {
  const ctx = await browser.newContext({ viewport: { width: 1366, height: 820 } });
  await ctx.addInitScript(([url, setMode]) => {
    localStorage.setItem('kindling.neuronpedia.url', url);
    if (setMode) localStorage.setItem('kindling.mode', 'neuronpedia');
  }, [DOUBLE, mode]);
  return ctx;
}

async function open(ctx, fragment = '') {
  const p = await ctx.newPage();
  p.on('pageerror', (e) => console.error('page error:', e.message));
  await p.goto(URL + '/' + fragment);
  await p.waitForFunction(() => /Neuronpedia:|not connected|failed/.test(document.querySelector('[data-testid=backend]')?.textContent ?? ''),
    null, { timeout: TIMEOUT, polling: 100 });
  assert.match(await p.textContent('[data-testid=backend]'), /Neuronpedia: meta-llama\/Llama-3.3-70B-Instruct/);
  return p;
}

async function tab(p, name) {
  await p.click(`[data-testid=tab-${name}]`);
}

async function notices(p) {
  return (await p.$$eval('[data-testid=notice]', (els) => els.map((e) => e.textContent))).join(' | ');
}

async function send(p, prompt) {
  await p.fill('[data-testid=temperature]', '0');
  await p.fill('[data-testid=max-tokens]', '48');
  await p.setChecked('[data-testid=compare]', true);
  await p.fill('[data-testid=prompt]', prompt);
  await p.click('[data-testid=send]');
  await p.waitForFunction(() => document.querySelector('[data-testid=stop]').disabled && !document.querySelector('.typing'),
    null, { timeout: TIMEOUT, polling: 50 });
}

async function lastReply(p, column) {
  const texts = await p.$$eval(`[data-testid=${column}-column] [data-testid=assistant-message] .text`, (els) => els.map((e) => e.textContent));
  return texts.at(-1);
}

before(async () => {
  assert.ok(DOUBLE, 'NEURONPEDIA_DOUBLE_URL names the contract double');
  mkdirSync(ARTIFACTS, { recursive: true });
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: FLAGS });
  await control('/__contract/reset');
  page = await open(await neuronpediaContext());
});

after(async () => {
  await browser?.close();
});

test('search lists Neuronpedia features; a card shows shaded top activations and logit tokens', async () => {
  await tab(page, 'features');
  await page.fill('[data-testid=feature-search]', 'pirate speech');
  await page.click('[data-testid=feature-search-go]');
  await page.waitForSelector('[data-testid=feature-hit]', { timeout: TIMEOUT });
  const hits = await page.$$eval('[data-testid=feature-hit]', (els) => els.map((e) => e.textContent));
  assert.match(hits[0], /pirate/i);
  assert.match(hits[0], /fires on \d/, 'the density is shown');
  await page.click('[data-testid=feature-hit] .label');
  await page.waitForSelector('[data-testid=dashboard] .context', { timeout: TIMEOUT });
  const card = await page.textContent('[data-testid=dashboard]');
  assert.match(card, /Promotes: .*\S/);
  const shades = await page.$$eval('[data-testid=dashboard] .context .tok', (els) => els.map((e) => e.getAttribute('style') ?? ''));
  assert.ok(shades.some((s) => /background/.test(s)), 'activations are shaded');
  await page.screenshot({ path: join(ARTIFACTS, 'neuronpedia-card.png') });
});

test('search by example reads the text on Neuronpedia and lists what fires', async () => {
  await page.fill('[data-testid=example-text]', 'Arr matey, the pirate ship sails at dawn!');
  await page.click('[data-testid=example-go]');
  await page.waitForSelector('[data-testid=example-hit]', { timeout: TIMEOUT });
  const hits = await page.$$eval('[data-testid=example-hit] .label', (els) => els.map((e) => e.textContent));
  assert.match(hits[0], /pirate/i, hits.join(' | '));
});

test('a slider steers the 70B: its strength shows as Neuronpedia\'s coefficient, base and variant come from one call', async () => {
  await page.click('[data-testid=feature-hit] [data-testid=add-edit]');
  await tab(page, 'edits');
  await page.waitForSelector('[data-testid=edit-conversion]', { timeout: TIMEOUT });
  await page.fill('[data-testid=edit-slider]', '0.4');
  const conversion = await page.textContent('[data-testid=edit-conversion]');
  const [, strength, maxAct] = conversion.match(/strength (-?[\d.]+) = \+0\.40 × 5 × maxActApprox ([\d.]+)/) ?? [];
  assert.ok(strength, conversion);
  assert.ok(Math.abs(Number(strength) - 0.4 * MAX_ACTS_PER_UNIT * Number(maxAct)) < 0.11, conversion);
  assert.equal(await page.$eval('select[aria-label=Mode] option[value=pin]', (o) => o.disabled), true, 'pin is greyed out');

  await control('/__contract/reset');
  // Neuronpedia on two inference hosts: the default reply's snapshots may come first, alone.
  await control('/__contract/stream', { split: true });
  await send(page, 'What do you think of mornings?');
  const steered = await lastReply(page, 'variant');
  const base = await lastReply(page, 'base');
  assert.ok(steered && base, `both columns filled: ${steered} / ${base}`);
  assert.notEqual(steered, base);
  const calls = (await doubleLog()).filter((c) => c.method === 'POST' && c.path === '/api/steer-chat');
  assert.equal(calls.length, 1, 'one steer-chat answers both columns');
  assert.equal(calls[0].body.stream, true, 'streamed');
  assert.ok(Math.abs(calls[0].body.features[0].strength - Number(strength)) < 0.11, JSON.stringify(calls[0].body.features));
  assert.equal(calls[0].x_api_key, null, 'the browser sends no key');
  // The same request, whole (Neuronpedia's cache answers it): the streamed columns match it.
  const whole = await (await fetch(DOUBLE + '/api/steer-chat', { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ ...calls[0].body, stream: false }) })).json();
  assert.equal(steered, whole.STEERED.chatTemplate.at(-1).content);
  assert.equal(base, whole.DEFAULT.chatTemplate.at(-1).content);
  const events = await page.$$eval('[data-testid=variant-column] [data-testid=rule-event]', (els) => els.map((e) => e.textContent));
  assert.ok(events.some((e) => /Sent to Neuronpedia: #\d+ .* \+0\.40 → strength/.test(e)), events.join(' | '));
  await page.screenshot({ path: join(ARTIFACTS, 'neuronpedia-chat.png') });
});

test('the token overlay reads Neuronpedia activations; logits, rules and contrast are greyed out with the reason', async () => {
  await tab(page, 'inspect');
  await page.click('[data-testid=inspect]');
  await page.waitForSelector('[data-testid=overlay-token]', { timeout: TIMEOUT });
  assert.ok((await page.$$('[data-testid=overlay-token]')).length >= 5);
  assert.ok(await page.isVisible('[data-testid=overlay-unsteered]'));
  assert.match(await page.textContent('.inspect [data-testid=unavailable]'), /logits/i);
  await tab(page, 'rules');
  assert.match(await page.textContent('.rules [data-testid=unavailable]'), /set_when/);
  assert.equal(await page.isDisabled('[data-testid=add-rule]'), true);
  await tab(page, 'edits');
  assert.match(await page.textContent('.contrast [data-testid=unavailable]'), /Contrast: Neuronpedia cannot/);
  assert.ok(await page.isVisible('[data-testid=autosteer-note]'), 'AutoSteer says it is search-based');
  await page.screenshot({ path: join(ARTIFACTS, 'neuronpedia-greyed.png') });
});

test('a share link carries the provider, model and source and opens the same variant', async () => {
  await tab(page, 'variant');
  await page.click('[data-testid=share]');
  const link = await page.inputValue('[data-testid=share-link]');
  const original = JSON.parse(await page.textContent('[data-testid=variant-json]'));
  assert.deepEqual(original.provider, { name: 'neuronpedia', model_id: 'llama3.3-70b-it', source: '50-resid-post-gf' });
  // A fresh browser profile that last ran the model in the page: the link alone picks Neuronpedia.
  const ctx = await neuronpediaContext({ mode: false });
  const restored = await open(ctx, link.slice(link.indexOf('#')));
  await tab(restored, 'variant');
  await restored.waitForFunction(() => JSON.parse(document.querySelector('[data-testid=variant-json]').textContent).edits.length > 0);
  assert.deepEqual(JSON.parse(await restored.textContent('[data-testid=variant-json]')), original);
  assert.equal(await restored.inputValue('[data-testid=mode]'), 'neuronpedia');
  await ctx.close();
});

test('a rate-limited call is told apart from being offline', async () => {
  // Neuronpedia's limiter answers 429 without CORS headers: the browser sees a network error.
  await control('/__contract/reset');
  await control('/__contract/limits', { steer: 0 });
  await send(page, 'Hello again');
  const error = await page.textContent('[data-testid=variant-column] [data-testid=assistant-message]:last-child .error');
  assert.match(error, /rate limit/, error);
  await control('/__contract/limits', { steer: 240 });
  // An address where nothing listens is "cannot reach".
  const ctx = await browser.newContext();
  await ctx.addInitScript(() => {
    localStorage.setItem('kindling.mode', 'neuronpedia');
    localStorage.setItem('kindling.neuronpedia.url', 'http://127.0.0.1:9');
  });
  const offline = await ctx.newPage();
  await offline.goto(URL + '/');
  await offline.waitForFunction(() => /not connected/.test(document.querySelector('[data-testid=backend]')?.textContent ?? ''),
    null, { timeout: TIMEOUT, polling: 100 });
  assert.match(await notices(offline), /cannot reach Neuronpedia/);
  await ctx.close();
});

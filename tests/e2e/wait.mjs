// Waiting on an async condition in a page. Playwright's waitForFunction does not await its
// predicate: an async one returns a Promise, which is truthy, so it "passes" at once. This
// awaits each evaluation and fails with `what` when `timeout` runs out.

/** Polls `fn` (run in the page, may be async) until it returns a truthy value. */
export async function waitForAsync(page, fn, what, { timeout = 60_000, polling = 250 } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await page.evaluate(fn);
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((done) => setTimeout(done, polling));
  }
}

// Registers the service worker (sw.js), which keeps the page for offline reloads; the page
// works without it. A file of its own: the page's CSP runs no inline script.
if ('serviceWorker' in navigator) {
  navigator.serviceWorker.register('./sw.js', { updateViaCache: 'none' }).catch(() => {});
}

// The challenge page's solver: one worker searches the nonces start, start + step, ... below
// limit and reports how many it tried about every 100 ms, then the nonce that opens the
// commitment. Loaded from its own same-origin URL (never blob:), so a CSP that refuses blob:
// workers does not stop it. mode "webcrypto" hashes with crypto.subtle.digest (a secure
// context), "js" with the pure-JS SHA-256 of crypto.js (everywhere).
"use strict";
importScripts("crypto.js");

async function subtleSearch(job, report) {
  const { nonce, target, step, limit } = job;
  const batch = 256;
  const m = new Uint8Array(24 * batch);
  for (let i = 0; i < batch; i++) m.set(nonce, i * 24);
  const view = new DataView(m.buffer);
  let n = job.start;
  while (n < limit) {
    const jobs = [];
    for (let i = 0; i < batch && n < limit; i++, n += step) {
      view.setUint32(i * 24 + 16, Math.floor(n / 4294967296));
      view.setUint32(i * 24 + 20, n >>> 0);
      const candidate = n;
      jobs.push(crypto.subtle.digest("SHA-256", m.subarray(i * 24, i * 24 + 24))
        .then((key) => crypto.subtle.digest("SHA-256", key))
        .then((h) => {
          const b = new Uint8Array(h);
          for (let j = 0; j < 32; j++) if (b[j] !== target[j]) return -1;
          return candidate;
        }));
    }
    const found = (await Promise.all(jobs)).find((x) => x >= 0);
    report(jobs.length);
    if (found !== undefined) return found;
  }
  return -1;
}

function jsSearch(job, report) {
  const search = self.SentryCrypto.searcher(job.nonce, job.target);
  const chunk = 4096;
  for (let n = job.start; n < job.limit; n += chunk * job.step) {
    const found = search(n, job.step, chunk, job.limit);
    if (found >= 0) {
      report((found - n) / job.step + 1);
      return found;
    }
    report(chunk);
  }
  return -1;
}

self.onmessage = async (ev) => {
  const job = ev.data;
  // The first chunk is reported at once: the page shows a rate within milliseconds.
  let tried = 0, last = 0;
  const report = (count) => {
    tried += count;
    const now = Date.now();
    if (now - last >= 100) {
      self.postMessage({ tried });
      tried = 0;
      last = now;
    }
  };
  try {
    const found = job.mode === "webcrypto" ? await subtleSearch(job, report) : jsSearch(job, report);
    self.postMessage({ tried, found });
  } catch (e) {
    self.postMessage({ error: String(e) });
  }
};

// The DOOMSDAY loader (docs/sentry.md "DOOMSDAY: the loader"), inline in loader.html after
// crypto.js: verify the package against the key set in the page, solve it, open the
// content (the snapshot's key and the URL), post the proof for the ticket cookie, then open
// the page's sealed snapshot with that key and render it in place; without a snapshot, go on
// to the URL, which now passes on the ticket. The whole inline script (crypto.js and this)
// is also the source of the solver workers, as a blob: URL (the loader's CSP allows
// worker-src blob: and this script's hash only); where a worker cannot start, the search runs
// here in slices. Every text comes from the server's table in #sentry-text.
"use strict";
(function () {
  if (typeof document === "undefined") {
    // A worker: search the nonces start, start + step, … below limit with the pure-JS
    // SHA-256, reporting about every 100 ms.
    self.onmessage = (ev) => {
      const j = ev.data;
      const search = self.SentryCrypto.searcher(j.nonce, j.target);
      const chunk = 4096;
      let tried = 0, last = Date.now();
      for (let n = j.start; n < j.limit; n += chunk * j.step) {
        const found = search(n, j.step, chunk, j.limit);
        if (found >= 0) {
          self.postMessage({ tried: tried + (found - n) / j.step + 1, found });
          return;
        }
        tried += chunk;
        if (Date.now() - last >= 100) {
          self.postMessage({ tried });
          tried = 0;
          last = Date.now();
        }
      }
      self.postMessage({ tried, found: -1 });
    };
    return;
  }
  const source = document.currentScript ? document.currentScript.textContent : "";
  const $ = (id) => document.getElementById(id);
  const main = $("sentry");
  const T = JSON.parse($("sentry-text").textContent);
  const lang = document.documentElement.lang || "en";
  const numbers = new Intl.NumberFormat(lang, { maximumFractionDigits: 0 });
  const say = (key, vars) => (T[key] || key).replace(/\{(\w+)\}/g, (_, k) => (vars && k in vars ? vars[k] : ""));
  const C = self.SentryCrypto;
  const subtle = self.crypto && self.crypto.subtle;

  class Failure extends Error {
    constructor(code, detail) {
      super(code);
      this.code = code;
      this.detail = detail || "";
    }
  }

  function b64url(s) {
    if (typeof s !== "string" || !/^[A-Za-z0-9_-]*$/.test(s)) throw new Failure("bad_package", "not base64url");
    const bin = atob(s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4));
    return Uint8Array.from(bin, (c) => c.charCodeAt(0));
  }

  function state(name, text) {
    main.dataset.state = name;
    if (text) $("sentry-status").textContent = text;
  }

  function duration(seconds) {
    if (seconds < 1) return say("under_a_second");
    const s = Math.ceil(seconds);
    if (s < 90) return say("seconds", { n: numbers.format(s) });
    return say("minutes", { m: numbers.format(Math.floor(s / 60)), s: numbers.format(s % 60) });
  }

  function progress(tried, limit, rate, workers) {
    const share = Math.min(100, (tried / limit) * 100);
    $("sentry-bar").setAttribute("aria-valuenow", String(Math.floor(share)));
    $("sentry-fill").style.width = share.toFixed(2) + "%";
    if (rate > 0) {
      $("sentry-detail").textContent = say("expected", {
        eta: duration((limit - tried) / 2 / rate), rate: numbers.format(rate), workers: numbers.format(workers),
        done: numbers.format(tried), total: numbers.format(limit),
      });
      main.dataset.rate = String(Math.round(rate));
    }
  }

  async function verify(jwk, msg, sig) {
    if (subtle) {
      main.dataset.verify = "webcrypto";
      const key = await subtle.importKey("jwk", { kty: "EC", crv: "P-256", x: jwk.x, y: jwk.y, ext: true },
        { name: "ECDSA", namedCurve: "P-256" }, false, ["verify"]);
      return subtle.verify({ name: "ECDSA", hash: "SHA-256" }, key, sig, msg);
    }
    main.dataset.verify = "js";
    return C.ecdsaVerify(b64url(jwk.x), b64url(jwk.y), msg, sig);
  }

  async function decrypt(key, iv, data, aad) {
    if (subtle) {
      try {
        const k = await subtle.importKey("raw", key, "AES-GCM", false, ["decrypt"]);
        return new Uint8Array(await subtle.decrypt({ name: "AES-GCM", iv, additionalData: aad, tagLength: 128 }, k, data));
      } catch (e) {
        return null;
      }
    }
    return C.aesGcmDecrypt(key, iv, data, aad);
  }

  // Workers from this very script; if none can start, slices of the search on this thread.
  function solve(payload) {
    const d = payload.difficulty;
    if (!Number.isInteger(d) || d < 1 || d > 40) throw new Failure("bad_package", "difficulty");
    const nonce = b64url(payload.session_nonce), target = b64url(payload.key_commitment);
    if (nonce.length !== 16 || target.length !== 32) throw new Failure("bad_package", "nonce");
    const limit = 2 ** d;
    const count = Math.max(1, Math.min(navigator.hardwareConcurrency || 2, 16));
    state("solving", say("solving"));
    return new Promise((resolve, reject) => {
      const workers = [], t0 = performance.now();
      let tried = 0, finished = 0, over = false;
      const end = (f) => { if (!over) { over = true; workers.forEach((w) => w.terminate()); f(); } };
      const seen = (m, n) => {
        tried += m.tried || 0;
        const ms = performance.now() - t0;
        progress(tried, limit, tried / (ms / 1000), n);
        if (m.found === undefined) return;
        if (m.found >= 0) end(() => resolve({ n: m.found, tried, ms, workers: n }));
        else if (++finished === n) end(() => reject(new Failure("not_found")));
      };
      try {
        const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
        for (let i = 0; i < count; i++) {
          const w = new Worker(url);
          workers.push(w);
          w.onmessage = (ev) => seen(ev.data, count);
          w.onerror = (e) => end(() => reject(new Failure("unsupported", e.message || "worker")));
          w.postMessage({ nonce, target, start: i, step: count, limit });
        }
        main.dataset.workers = String(count);
      } catch (e) {
        workers.forEach((w) => w.terminate());
        workers.length = 0;
        main.dataset.workers = "0";
        const search = C.searcher(nonce, target);
        let n = 0;
        const slice = () => {
          if (over) return;
          const stop = performance.now() + 50;
          while (n < limit && performance.now() < stop) {
            const found = search(n, 1, 4096, limit);
            if (found >= 0) return seen({ tried: found - n + 1, found }, 1);
            n += 4096;
            tried += 4096;
          }
          progress(tried, limit, tried / ((performance.now() - t0) / 1000), 1);
          if (n >= limit) return seen({ found: -1 }, 1);
          setTimeout(slice, 0);
        };
        slice();
      }
    });
  }

  // Shows the page: HTML as the document itself, text as preformatted text.
  function render(text, html) {
    const escaped = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");
    document.open();
    document.write(html ? text : "<!doctype html><pre>" + escaped(text) + "</pre>");
    document.close();
  }

  async function run() {
    state("verifying", say("verifying"));
    let pkg, msg, sig, payload, jwks;
    try {
      pkg = JSON.parse($("sentry-challenge").textContent);
      jwks = JSON.parse($("sentry-keys").textContent);
      if (pkg.v !== 1 || pkg.alg !== "ES256") throw new Failure("bad_package", "version " + pkg.v);
      msg = b64url(pkg.payload);
      sig = b64url(pkg.signature);
    } catch (e) {
      throw e instanceof Failure ? e : new Failure("bad_package", String(e.message || e));
    }
    const jwk = (jwks.keys || []).find((k) => k.kid === pkg.kid && k.kty === "EC" && k.crv === "P-256");
    if (!jwk) throw new Failure("no_key", pkg.kid);
    if (!(await verify(jwk, msg, sig))) throw new Failure("bad_signature");
    try {
      payload = JSON.parse(new TextDecoder().decode(msg));
    } catch (e) {
      throw new Failure("bad_package", "payload");
    }
    const proofUrl = new URL(payload.proof_url || "", location.origin);
    if (proofUrl.origin !== location.origin) throw new Failure("bad_package", "proof_url");

    const found = await solve(payload);
    state("decrypting", say("decrypting"));
    const nonce = b64url(payload.session_nonce);
    const candidate = new Uint8Array(24);
    candidate.set(nonce);
    const view = new DataView(candidate.buffer);
    view.setUint32(16, Math.floor(found.n / 4294967296));
    view.setUint32(20, found.n >>> 0);
    const key = subtle ? new Uint8Array(await subtle.digest("SHA-256", candidate)) : C.sha256(candidate);
    const content = await decrypt(key, b64url(payload.iv), b64url(payload.ciphertext), nonce);
    if (!content) throw new Failure("decrypt_failed");
    let info = null;
    try {
      info = JSON.parse(new TextDecoder().decode(content));
    } catch (e) {
      // Not the loader's content (the mode changed meanwhile): go on to this URL.
    }

    state("posting", say("posting"));
    let answer, status;
    try {
      const r = await fetch(proofUrl.pathname, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ payload: pkg.payload, signature: pkg.signature, pow_nonce: found.n, kid: pkg.kid }),
      });
      status = r.status;
      answer = await r.json().catch(() => ({}));
    } catch (e) {
      throw new Failure("network", String(e.message || e));
    }
    if (!answer.success) {
      if (answer.reason === "EXPIRED") throw new Failure("expired");
      throw new Failure("refused", (answer.reason || "HTTP " + status) + (answer.error ? ": " + answer.error : ""));
    }
    state("done", say("done"));
    const here = location.pathname + location.search;
    const url = info && typeof info.url === "string" && info.url.startsWith("/") && !info.url.startsWith("//") ? info.url : here;
    let shown = "navigation";
    const snap = JSON.parse($("sentry-snapshot").textContent || "null");
    if (info && info.loader === 1 && info.key && snap && url === here) {
      const page = await decrypt(b64url(info.key), b64url(snap.iv), b64url(snap.data),
        new TextEncoder().encode("phantom-snapshot:" + url));
      if (page) shown = { text: new TextDecoder().decode(page), html: snap.html === true };
    }
    try {
      sessionStorage.setItem("sentry-loader", JSON.stringify({
        difficulty: payload.difficulty, workers: found.workers, tried: found.tried,
        solve_ms: Math.round(found.ms), verify: main.dataset.verify,
        shown: shown === "navigation" ? shown : "snapshot",
      }));
    } catch (e) {
      // Storage may be off; the record is only informative.
    }
    if (shown === "navigation") location.replace(url + location.hash);
    else render(shown.text, shown.html);
  }

  function fail(e) {
    const f = e instanceof Failure ? e : new Failure("unsupported", String((e && e.message) || e));
    main.dataset.error = f.code;
    state("error", say("failed"));
    const box = $("sentry-error");
    box.textContent = say(f.code, { detail: f.detail });
    box.hidden = false;
    const retry = $("sentry-retry");
    retry.hidden = false;
    retry.focus();
  }

  $("sentry-retry").addEventListener("click", () => location.reload());
  if (!C) fail(new Failure("unsupported", "crypto.js"));
  else run().catch(fail);
})();

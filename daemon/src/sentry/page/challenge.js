// The sentry's challenge page (docs/sentry.md, wire format v1): verify the package's ECDSA
// signature against the site's JWK set, search the nonce in Web Workers, open the
// continuation with AES-256-GCM, post the proof, and go on to the original URL on this origin.
// WebCrypto where crypto.subtle exists; the pure-JS code of crypto.js where it does not (plain
// http on an address other than localhost is not a secure context). No eval, no inline code,
// no request to another origin: the page runs under its CSP (script-src 'self', worker-src
// 'self', no blob:). Every text comes from the server's table in #sentry-text.
"use strict";
(function () {
  const base = document.currentScript ? document.currentScript.src : location.href;
  const $ = (id) => document.getElementById(id);
  const main = $("sentry");
  const T = JSON.parse($("sentry-text").textContent);
  const lang = document.documentElement.lang || "en";
  const numbers = new Intl.NumberFormat(lang, { maximumFractionDigits: 0 });
  const say = (key, vars) => (T[key] || key).replace(/\{(\w+)\}/g, (_, k) => (vars && k in vars ? vars[k] : ""));
  const C = self.SentryCrypto;
  const subtle = self.crypto && self.crypto.subtle; // undefined outside a secure context
  // Knobs in the fragment (never sent to the server), for tests and measurements:
  // #sentry-sha=webcrypto|js chooses the workers' SHA-256, #sentry-workers=N their number.
  const knobs = new URLSearchParams(location.hash.slice(1));
  const knobbed = [...knobs.keys()].some((k) => k.startsWith("sentry-"));

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
      // The nonce is uniform in [0, limit): with `tried` ruled out, half the rest is expected.
      const left = (limit - tried) / 2 / rate;
      $("sentry-detail").textContent = say("expected", {
        eta: duration(left), rate: numbers.format(rate), workers: numbers.format(workers),
        done: numbers.format(tried), total: numbers.format(limit),
      });
      main.dataset.rate = String(Math.round(rate));
    }
  }

  async function verify(jwk, msg, sig) {
    if (subtle) {
      main.dataset.verify = "webcrypto";
      let key;
      try {
        key = await subtle.importKey("jwk", { kty: "EC", crv: "P-256", x: jwk.x, y: jwk.y, ext: true },
          { name: "ECDSA", namedCurve: "P-256" }, false, ["verify"]);
      } catch (e) {
        throw new Failure("no_key", String(e.message || e));
      }
      return subtle.verify({ name: "ECDSA", hash: "SHA-256" }, key, sig, msg);
    }
    main.dataset.verify = "js";
    return C.ecdsaVerify(b64url(jwk.x), b64url(jwk.y), msg, sig);
  }

  async function sha256(bytes) {
    return subtle ? new Uint8Array(await subtle.digest("SHA-256", bytes)) : C.sha256(bytes);
  }

  async function decrypt(key, iv, data, aad) {
    if (subtle) {
      main.dataset.aes = "webcrypto";
      try {
        const k = await subtle.importKey("raw", key, "AES-GCM", false, ["decrypt"]);
        return new Uint8Array(await subtle.decrypt({ name: "AES-GCM", iv, additionalData: aad, tagLength: 128 }, k, data));
      } catch (e) {
        return null;
      }
    }
    main.dataset.aes = "js";
    return C.aesGcmDecrypt(key, iv, data, aad);
  }

  // The workers' hashing: the pure-JS SHA-256 unless asked otherwise. In Chromium it tries
  // several times more candidates per second than crypto.subtle.digest, whose every call is
  // a promise and a trip to the browser's crypto thread (docs/benchmarks.md).
  function hashMode() {
    const asked = knobs.get("sentry-sha");
    return asked === "webcrypto" && subtle ? "webcrypto" : "js";
  }

  function solve(payload) {
    const d = payload.difficulty;
    if (!Number.isInteger(d) || d < 1 || d > 40) throw new Failure("bad_package", "difficulty");
    const nonce = b64url(payload.session_nonce), target = b64url(payload.key_commitment);
    if (nonce.length !== 16 || target.length !== 32) throw new Failure("bad_package", "nonce");
    const limit = 2 ** d, mode = hashMode();
    const asked = parseInt(knobs.get("sentry-workers") || "", 10);
    const count = asked > 0 ? Math.min(asked, 64) : Math.max(1, Math.min(navigator.hardwareConcurrency || 2, 16));
    main.dataset.sha = mode;
    main.dataset.workers = String(count);
    state("solving", say("solving"));
    return new Promise((resolve, reject) => {
      const workers = [], t0 = performance.now();
      let tried = 0, finished = 0, over = false;
      const end = (f) => { if (!over) { over = true; workers.forEach((w) => w.terminate()); f(); } };
      for (let i = 0; i < count && !over; i++) {
        let w;
        try {
          w = new Worker(new URL("worker.js", base));
        } catch (e) {
          end(() => reject(new Failure("unsupported", String(e.message || e))));
          return;
        }
        workers.push(w);
        w.onmessage = (ev) => {
          const m = ev.data;
          if (m.error) return end(() => reject(new Failure("unsupported", m.error)));
          tried += m.tried || 0;
          const ms = performance.now() - t0;
          progress(tried, limit, tried / (ms / 1000), count);
          if (m.found === undefined) return;
          if (m.found >= 0) end(() => resolve({ n: m.found, tried, ms, workers: count, mode }));
          else if (++finished === count) end(() => reject(new Failure("not_found")));
        };
        w.onerror = (e) => end(() => reject(new Failure("unsupported", e.message || "worker")));
        w.postMessage({ nonce, target, start: i, step: count, limit, mode });
      }
    });
  }

  // Where to go once the ticket is set: the link of the decrypted continuation when it is on
  // this origin, else this page's own URL (the page is served at the URL that was challenged).
  function destination(content) {
    let url = new URL(location.href);
    try {
      const doc = new DOMParser().parseFromString(new TextDecoder().decode(content), "text/html");
      const a = doc.querySelector("a[href]");
      const u = a && new URL(a.getAttribute("href"), location.origin);
      if (u && u.origin === location.origin) url = u;
    } catch (e) {
      // Unreadable continuation: this page's URL it is.
    }
    url.hash = knobbed ? "" : location.hash;
    return url.pathname + url.search + url.hash;
  }

  async function run() {
    state("verifying", say("verifying"));
    let pkg, msg, sig, payload;
    try {
      pkg = JSON.parse($("sentry-challenge").textContent);
      if (pkg.v !== 1 || pkg.alg !== "ES256") throw new Failure("bad_package", "version " + pkg.v);
      msg = b64url(pkg.payload);
      sig = b64url(pkg.signature);
    } catch (e) {
      throw e instanceof Failure ? e : new Failure("bad_package", String(e.message || e));
    }
    let jwks;
    try {
      const r = await fetch("/.sentry/jwks.json", { credentials: "same-origin", cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      jwks = await r.json();
    } catch (e) {
      throw new Failure("no_key", String(e.message || e));
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
    const key = await sha256(candidate);
    const content = await decrypt(key, b64url(payload.iv), b64url(payload.ciphertext), nonce);
    if (!content) throw new Failure("decrypt_failed");

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
    progress(found.tried, 2 ** payload.difficulty, found.tried / (found.ms / 1000), found.workers);
    const nav = performance.getEntriesByType("navigation")[0];
    try {
      sessionStorage.setItem("sentry-challenge", JSON.stringify({
        difficulty: payload.difficulty, workers: found.workers, tried: found.tried,
        solve_ms: Math.round(found.ms), rate: Math.round(found.tried / (found.ms / 1000)),
        verify: main.dataset.verify, sha: found.mode, aes: main.dataset.aes,
        first_byte_at: nav ? performance.timeOrigin + nav.responseStart : null,
      }));
    } catch (e) {
      // Storage may be off; the record is only informative.
    }
    state("done", say("done"));
    location.replace(destination(content));
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

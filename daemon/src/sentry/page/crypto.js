// Pure-JavaScript SHA-256, ECDSA P-256 verification and AES-256-GCM decryption for the
// challenge page where WebCrypto is missing (crypto.subtle exists only in secure contexts:
// https, or http on localhost). Loaded by the page and by the solver worker (importScripts).
// Only what the challenge needs: verification uses public data, so no constant-time care.
"use strict";
(function (root) {
  // ---------------------------------------------------------------- SHA-256
  // The constants: the first 32 bits of the fractional parts of the cube roots (K) and square
  // roots (IV) of the first primes (FIPS 180-4), computed; doubles hold them exactly enough.
  const primes = [];
  for (let n = 2; primes.length < 64; n++) if (primes.every((p) => n % p)) primes.push(n);
  const K = Int32Array.from(primes, (p) => (Math.cbrt(p) % 1) * 4294967296);
  const IV = Int32Array.from(primes.slice(0, 8), (p) => (Math.sqrt(p) % 1) * 4294967296);
  const W = new Int32Array(64);

  // One compression of the 16 big-endian words in `w` (w[0..16] is read, W is scratch) into
  // the 8-word state `h`, in place.
  function compress(h, w) {
    for (let i = 0; i < 16; i++) W[i] = w[i];
    for (let i = 16; i < 64; i++) {
      const a = W[i - 15], b = W[i - 2];
      const s0 = ((a >>> 7) | (a << 25)) ^ ((a >>> 18) | (a << 14)) ^ (a >>> 3);
      const s1 = ((b >>> 17) | (b << 15)) ^ ((b >>> 19) | (b << 13)) ^ (b >>> 10);
      W[i] = (W[i - 16] + s0 + W[i - 7] + s1) | 0;
    }
    let a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (let i = 0; i < 64; i++) {
      const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
      const t1 = (k + S1 + ((e & f) ^ (~e & g)) + K[i] + W[i]) | 0;
      const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
      const t2 = (S0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      k = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    h[0] = (h[0] + a) | 0; h[1] = (h[1] + b) | 0; h[2] = (h[2] + c) | 0; h[3] = (h[3] + d) | 0;
    h[4] = (h[4] + e) | 0; h[5] = (h[5] + f) | 0; h[6] = (h[6] + g) | 0; h[7] = (h[7] + k) | 0;
  }

  // SHA-256 of a Uint8Array.
  function sha256(bytes) {
    const n = bytes.length, blocks = ((n + 9 + 63) >> 6);
    const buf = new Uint8Array(blocks * 64);
    buf.set(bytes);
    buf[n] = 0x80;
    const bits = n * 8;
    buf[buf.length - 4] = bits >>> 24; buf[buf.length - 3] = bits >>> 16;
    buf[buf.length - 2] = bits >>> 8; buf[buf.length - 1] = bits;
    buf[buf.length - 5] = Math.floor(n / 0x20000000);
    const h = new Int32Array(IV), w = new Int32Array(16);
    for (let b = 0; b < blocks; b++) {
      for (let i = 0; i < 16; i++) {
        const o = b * 64 + i * 4;
        w[i] = (buf[o] << 24) | (buf[o + 1] << 16) | (buf[o + 2] << 8) | buf[o + 3];
      }
      compress(h, w);
    }
    const out = new Uint8Array(32);
    for (let i = 0; i < 8; i++) {
      out[i * 4] = h[i] >>> 24; out[i * 4 + 1] = h[i] >>> 16;
      out[i * 4 + 2] = h[i] >>> 8; out[i * 4 + 3] = h[i];
    }
    return out;
  }

  // The proof-of-work search with pure-JS hashing: for n = start, start + step, ... below
  // limit (at most `count` candidates), whether SHA-256(SHA-256(nonce16 ‖ n as 8 bytes BE))
  // equals `target` (32 bytes). Both hashes are one block each, so the message words are set
  // up once and only the counter words change. Returns the nonce found or -1.
  function searcher(nonce, target) {
    const m1 = new Int32Array(16), m2 = new Int32Array(16), h = new Int32Array(8), t = new Int32Array(8);
    for (let i = 0; i < 4; i++) {
      m1[i] = (nonce[i * 4] << 24) | (nonce[i * 4 + 1] << 16) | (nonce[i * 4 + 2] << 8) | nonce[i * 4 + 3];
    }
    m1[6] = 0x80000000 | 0; m1[15] = 24 * 8;
    m2[8] = 0x80000000 | 0; m2[15] = 32 * 8;
    for (let i = 0; i < 8; i++) {
      t[i] = (target[i * 4] << 24) | (target[i * 4 + 1] << 16) | (target[i * 4 + 2] << 8) | target[i * 4 + 3];
    }
    return function (start, step, count, limit) {
      let n = start;
      for (let c = 0; c < count && n < limit; c++, n += step) {
        m1[4] = Math.floor(n / 4294967296); m1[5] = n >>> 0;
        h.set(IV); compress(h, m1);
        m2.set(h); h.set(IV); compress(h, m2);
        if (h[0] === t[0] && h[1] === t[1] && h[2] === t[2] && h[3] === t[3] &&
            h[4] === t[4] && h[5] === t[5] && h[6] === t[6] && h[7] === t[7]) return n;
      }
      return -1;
    };
  }

  // ---------------------------------------------------------------- ECDSA P-256
  const P = 0xffffffff00000001000000000000000000000000ffffffffffffffffffffffffn;
  const N = 0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551n;
  const B = 0x5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604bn;
  const G = [0x6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296n,
             0x4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5n, 1n];
  const mod = (a, m) => { const r = a % m; return r < 0n ? r + m : r; };
  function pow(b, e, m) {
    let r = 1n; b = mod(b, m);
    for (; e > 0n; e >>= 1n, b = b * b % m) if (e & 1n) r = r * b % m;
    return r;
  }
  const inv = (a, m) => pow(a, m - 2n, m); // m is prime
  const big = (bytes) => bytes.reduce((v, b) => (v << 8n) | BigInt(b), 0n);

  // Jacobian coordinates [X, Y, Z]; Z = 0 is the point at infinity. a = -3.
  function dbl([X, Y, Z]) {
    if (Z === 0n || Y === 0n) return [0n, 1n, 0n];
    const delta = Z * Z % P, gamma = Y * Y % P, beta = X * gamma % P;
    const alpha = 3n * mod(X - delta, P) * (X + delta) % P;
    const X3 = mod(alpha * alpha - 8n * beta, P);
    const Z3 = mod((Y + Z) * (Y + Z) - gamma - delta, P);
    const Y3 = mod(alpha * mod(4n * beta - X3, P) - 8n * gamma * gamma, P);
    return [X3, Y3, Z3];
  }
  function add(p1, p2) {
    if (p1[2] === 0n) return p2;
    if (p2[2] === 0n) return p1;
    const [X1, Y1, Z1] = p1, [X2, Y2, Z2] = p2;
    const Z1Z1 = Z1 * Z1 % P, Z2Z2 = Z2 * Z2 % P;
    const U1 = X1 * Z2Z2 % P, U2 = X2 * Z1Z1 % P;
    const S1 = Y1 * Z2 % P * Z2Z2 % P, S2 = Y2 * Z1 % P * Z1Z1 % P;
    if (U1 === U2) return S1 === S2 ? dbl(p1) : [0n, 1n, 0n];
    const H = mod(U2 - U1, P), I = 4n * H * H % P, J = H * I % P;
    const r = 2n * mod(S2 - S1, P), V = U1 * I % P;
    const X3 = mod(r * r - J - 2n * V, P);
    const Y3 = mod(r * mod(V - X3, P) - 2n * S1 * J, P);
    const Z3 = mod(((Z1 + Z2) * (Z1 + Z2) - Z1Z1 - Z2Z2) % P * H, P);
    return [X3, Y3, Z3];
  }
  function mul(k, p) {
    let r = [0n, 1n, 0n];
    for (let i = BigInt(k.toString(2).length) - 1n; i >= 0n; i--) {
      r = dbl(r);
      if ((k >> i) & 1n) r = add(r, p);
    }
    return r;
  }

  // Whether `sig` (64 bytes r‖s) is an ECDSA P-256/SHA-256 signature over `msg` by the public
  // point (x, y) (32 bytes each).
  function ecdsaVerify(x, y, msg, sig) {
    if (x.length !== 32 || y.length !== 32 || sig.length !== 64) return false;
    const qx = big(x), qy = big(y);
    if (qx >= P || qy >= P || mod(qy * qy - (qx * qx * qx - 3n * qx + B), P) !== 0n) return false;
    const r = big(sig.subarray(0, 32)), s = big(sig.subarray(32));
    if (r < 1n || r >= N || s < 1n || s >= N) return false;
    const e = big(sha256(msg)), w = inv(s, N);
    const R = add(mul(e * w % N, G), mul(r * w % N, [qx, qy, 1n]));
    if (R[2] === 0n) return false;
    const zi = inv(R[2], P);
    return R[0] * zi % P * zi % P % N === r;
  }

  // ---------------------------------------------------------------- AES-256-GCM
  const SBOX = new Uint8Array(256);
  {
    // The S-box from the multiplicative inverse in GF(2^8) (p runs over the powers of 3, q
    // over those of its inverse) and the affine map.
    let p = 1, q = 1;
    const rotl = (v, s) => ((v << s) | (v >>> (8 - s))) & 0xff;
    do {
      p = (p ^ (p << 1) ^ (p & 0x80 ? 0x1b : 0)) & 0xff;
      q ^= q << 1; q ^= q << 2; q ^= q << 4; q &= 0xff;
      if (q & 0x80) q ^= 0x09;
      SBOX[p] = q ^ rotl(q, 1) ^ rotl(q, 2) ^ rotl(q, 3) ^ rotl(q, 4) ^ 0x63;
    } while (p !== 1);
    SBOX[0] = 0x63;
  }
  const xtime = (b) => ((b << 1) ^ (b & 0x80 ? 0x1b : 0)) & 0xff;

  // The 15 round keys of a 32-byte key, as one 240-byte array.
  function expandKey(key) {
    const w = new Uint8Array(240);
    w.set(key);
    let rcon = 1;
    for (let i = 32; i < 240; i += 4) {
      let t = w.slice(i - 4, i);
      if (i % 32 === 0) {
        t = Uint8Array.of(SBOX[t[1]] ^ rcon, SBOX[t[2]], SBOX[t[3]], SBOX[t[0]]);
        rcon = xtime(rcon);
      } else if (i % 32 === 16) {
        t = t.map((b) => SBOX[b]);
      }
      for (let j = 0; j < 4; j++) w[i + j] = w[i - 32 + j] ^ t[j];
    }
    return w;
  }

  function encryptBlock(rk, input) {
    const s = input.slice();
    for (let j = 0; j < 16; j++) s[j] ^= rk[j];
    for (let round = 1; round <= 14; round++) {
      const t = new Uint8Array(16);
      // SubBytes and ShiftRows: byte (row r, column c) comes from column c + r.
      for (let c = 0; c < 4; c++) for (let r = 0; r < 4; r++) t[c * 4 + r] = SBOX[s[((c + r) % 4) * 4 + r]];
      if (round < 14) {
        for (let c = 0; c < 4; c++) {
          const a0 = t[c * 4], a1 = t[c * 4 + 1], a2 = t[c * 4 + 2], a3 = t[c * 4 + 3], x = a0 ^ a1 ^ a2 ^ a3;
          t[c * 4] ^= x ^ xtime(a0 ^ a1); t[c * 4 + 1] ^= x ^ xtime(a1 ^ a2);
          t[c * 4 + 2] ^= x ^ xtime(a2 ^ a3); t[c * 4 + 3] ^= x ^ xtime(a3 ^ a0);
        }
      }
      for (let j = 0; j < 16; j++) s[j] = t[j] ^ rk[round * 16 + j];
    }
    return s;
  }

  // GF(2^128) product of GCM (bit 0 is the most significant bit of the 128-bit value).
  function gmul(x, y) {
    let z = 0n, v = y;
    for (let i = 127n; i >= 0n; i--) {
      if ((x >> i) & 1n) z ^= v;
      v = v & 1n ? (v >> 1n) ^ (0xe1n << 120n) : v >> 1n;
    }
    return z;
  }
  function ghash(h, data, acc) {
    for (let o = 0; o < data.length; o += 16) {
      const block = new Uint8Array(16);
      block.set(data.subarray(o, o + 16));
      acc = gmul(acc ^ big(block), h);
    }
    return acc;
  }

  // AES-256-GCM decryption of `data` (ciphertext ‖ 16-byte tag) with a 12-byte IV; null when
  // the tag does not match.
  function aesGcmDecrypt(key, iv, data, aad) {
    if (key.length !== 32 || iv.length !== 12 || data.length < 16) return null;
    const rk = expandKey(key);
    const ct = data.subarray(0, data.length - 16), tag = data.subarray(data.length - 16);
    const h = big(encryptBlock(rk, new Uint8Array(16)));
    let s = ghash(h, ct, ghash(h, aad, 0n));
    const lens = BigInt(aad.length * 8) << 64n | BigInt(ct.length * 8);
    s = gmul(s ^ lens, h);
    const counter = new Uint8Array(16);
    counter.set(iv);
    counter[15] = 1;
    const ek0 = encryptBlock(rk, counter);
    let diff = 0;
    for (let i = 0; i < 16; i++) diff |= (ek0[i] ^ Number((s >> BigInt(8 * (15 - i))) & 0xffn)) ^ tag[i];
    if (diff !== 0) return null;
    const out = new Uint8Array(ct.length);
    for (let o = 0, ctr = 2; o < ct.length; o += 16, ctr++) {
      counter[12] = ctr >>> 24; counter[13] = ctr >>> 16; counter[14] = ctr >>> 8; counter[15] = ctr;
      const ks = encryptBlock(rk, counter);
      for (let i = 0; i < 16 && o + i < ct.length; i++) out[o + i] = ct[o + i] ^ ks[i];
    }
    return out;
  }

  root.SentryCrypto = { sha256, searcher, ecdsaVerify, aesGcmDecrypt };
})(self);

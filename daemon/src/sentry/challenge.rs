//! The proof-of-work challenge, wire format version 1 (docs/sentry.md):
//! a secret `pow_nonce` in `[0, 2^difficulty)`, key = SHA-256(session_nonce ‖ pow_nonce as
//! 8-byte big-endian), the content under AES-256-GCM with that key (AAD = session_nonce), and
//! the payload signed with the server's ECDSA P-256 key. The client's work is the search for
//! the key whose hash equals the commitment; the server's is one hash to check it.

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    sync::{Mutex, RwLock},
};

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{Aead, Payload as AeadPayload},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use p256::ecdsa::{SigningKey, VerifyingKey};
use ring::{
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
    },
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::SentryError;
use crate::source::Source;

pub const PROOF_PATH: &str = "/.sentry/proof";
pub const JWKS_PATH: &str = "/.sentry/jwks.json";
/// Where a browser without JavaScript redeems a delay token or a pasted answer.
pub const PASS_PATH: &str = "/.sentry/pass";
/// Where the command-line solver fetches a package for its address (always JSON).
pub const SOLVER_PATH: &str = "/.sentry/challenge";
/// Longest answer (`Proof::to_answer`) the pass endpoint reads; a real one is about 1,100
/// characters.
pub const MAX_ANSWER_BYTES: usize = 4096;
/// Longest delay token the pass endpoint reads.
pub const MAX_DELAY_TOKEN_BYTES: usize = 4096;
/// The first field of a delay token's body: its kind and format version.
const DELAY_TOKEN_TAG: &str = "d1";
pub const WIRE_VERSION: u32 = 1;
/// Highest difficulty the wire format allows (the nonce space must fit the 8-byte counter
/// and stay searchable); defined with the tunables it bounds.
pub use crate::config::sentry::MAX_DIFFICULTY;
const NONCE_BYTES: usize = 16;
/// Packages this host issued, remembered by hash so their proofs skip the ECDSA verification
/// (a byte-identical package we signed is authentic). Past this many the oldest are dropped
/// and their proofs take the full verification.
const ISSUED_MEMORY: usize = 262_144;

/// What the client receives with the 429.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Package {
    pub v: u32,
    pub alg: String,
    pub kid: String,
    pub payload: String,
    pub signature: String,
}

/// The signed payload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChallengePayload {
    pub session_nonce: String,
    pub difficulty: u32,
    pub issued_at: u64,
    pub expires_at: u64,
    pub subject: String,
    pub key_commitment: String,
    pub iv: String,
    pub ciphertext: String,
    pub proof_url: String,
}

/// What the client posts back.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proof {
    pub payload: String,
    pub signature: String,
    pub pow_nonce: u64,
    /// The package's key id: the signature is checked against that key only, so a forged
    /// proof costs at most one verification.
    pub kid: String,
}

impl Proof {
    /// The proof as one line to copy and paste (the command-line solver prints it; the
    /// page's form takes it back): `<payload>.<signature>.<pow_nonce>.<kid>`. The first two
    /// are b64url and the third decimal, none holds a `.`; the key id is the rest.
    pub fn to_answer(&self) -> String {
        format!(
            "{}.{}.{}.{}",
            self.payload, self.signature, self.pow_nonce, self.kid
        )
    }

    /// Reads an answer back; whitespace anywhere (a pasted line broken by a terminal) is
    /// ignored. `None`: not of that shape.
    pub fn from_answer(answer: &str) -> Option<Proof> {
        let compact: String = answer
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let mut parts = compact.splitn(4, '.');
        let (payload, signature, nonce, kid) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if payload.is_empty() || signature.is_empty() || kid.is_empty() {
            return None;
        }
        Some(Proof {
            payload: payload.to_string(),
            signature: signature.to_string(),
            pow_nonce: nonce.parse().ok()?,
            kid: kid.to_string(),
        })
    }
}

/// A delay token that passed every check but the used-nonce one: what the page without
/// JavaScript redeems after `not_before` (docs/sentry.md "Without JavaScript").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelayToken {
    pub nonce: String,
    pub not_before: u64,
    pub expires_at: u64,
    /// Where the browser goes once it holds the ticket: a path of this origin.
    pub target: String,
}

/// The fields of a delay token, unverified: (subject, not_before, expires_at, nonce, kid,
/// target) and the signed bytes and signature.
struct DelayFields<'a> {
    subject: &'a str,
    not_before: u64,
    expires_at: u64,
    nonce: &'a str,
    kid: &'a str,
    target: &'a str,
}

fn delay_fields(body: &str) -> Option<DelayFields<'_>> {
    let mut f = body.splitn(7, '|');
    if f.next()? != DELAY_TOKEN_TAG {
        return None;
    }
    Some(DelayFields {
        subject: f.next()?,
        not_before: f.next()?.parse().ok()?,
        expires_at: f.next()?.parse().ok()?,
        nonce: f.next()?,
        kid: f.next()?,
        target: f.next()?,
    })
}

/// Splits a token into its body (text) and signature bytes.
fn delay_parts(token: &str) -> Option<(String, Vec<u8>)> {
    if token.len() > MAX_DELAY_TOKEN_BYTES {
        return None;
    }
    let (body, sig) = token.split_once('.')?;
    let body = String::from_utf8(B64.decode(body).ok()?).ok()?;
    Some((body, B64.decode(sig).ok()?))
}

/// Seconds until a delay token may be redeemed (0: now), read without verifying it: for
/// the "too early" page only.
pub fn delay_wait(token: &str, now: u64) -> u64 {
    delay_parts(token)
        .and_then(|(body, _)| delay_fields(&body).map(|f| f.not_before.saturating_sub(now)))
        .unwrap_or(0)
}

/// Why a proof was refused; `code()` is the wire reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    Malformed,
    BadSignature,
    Expired,
    WrongSubject,
    WrongProof,
    Replayed,
    /// The source failed too many proofs in the last 5 s: refused without a look.
    RateLimited,
    /// The source is past `hard_block_after`: refused without a look.
    Blocked,
    /// A delay token redeemed before its time (the page without JavaScript).
    TooEarly,
}

/// Failed proofs a source may post in 5 s before its proofs are refused unverified.
pub const FAILED_PROOFS_PER_WINDOW: u64 = 8;

/// Failures (failed or refused proofs, forged cookies) from one source in 5 s past which it is
/// dropped in the kernel at once, not after the once-a-second escalation reaches
/// `hard_block_after`: eight times what the gate lets through unverified, which no honest
/// client comes near (a browser posts a proof once, and again only after a new challenge). A
/// fast forger used to spend its thousands of proofs inside the two or three seconds the
/// escalation takes, and stop before it arrived.
pub const FLOOD_FAILURES_PER_WINDOW: u64 = 8 * FAILED_PROOFS_PER_WINDOW;

impl Rejection {
    pub const ALL: [Rejection; 9] = [
        Rejection::Malformed,
        Rejection::BadSignature,
        Rejection::Expired,
        Rejection::WrongSubject,
        Rejection::WrongProof,
        Rejection::Replayed,
        Rejection::RateLimited,
        Rejection::Blocked,
        Rejection::TooEarly,
    ];

    /// Whether this failure counts against the source (and raises its penalty): forged,
    /// altered, unsolved or replayed proofs. An expired package or one posted from another
    /// address (a client whose address changed) is an honest client's mishap, and so is a
    /// delay token sent before its time (a person who pressed the button early).
    pub fn penalised(self) -> bool {
        !matches!(
            self,
            Rejection::Expired | Rejection::WrongSubject | Rejection::TooEarly
        )
    }

    pub fn code(self) -> &'static str {
        match self {
            Rejection::Malformed => "MALFORMED",
            Rejection::BadSignature => "BAD_SIGNATURE",
            Rejection::Expired => "EXPIRED",
            Rejection::WrongSubject => "WRONG_SUBJECT",
            Rejection::WrongProof => "WRONG_PROOF",
            Rejection::Replayed => "REPLAYED",
            Rejection::RateLimited => "RATE_LIMITED",
            Rejection::Blocked => "BLOCKED",
            Rejection::TooEarly => "TOO_EARLY",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Rejection::Malformed => 400,
            Rejection::BadSignature | Rejection::WrongSubject => 403,
            Rejection::Expired => 410,
            Rejection::WrongProof => 422,
            Rejection::Replayed => 409,
            Rejection::RateLimited => 429,
            Rejection::Blocked => 403,
            Rejection::TooEarly => 429,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Rejection::Malformed => {
                "the proof is not a well-formed {payload, signature, pow_nonce} object"
            }
            Rejection::BadSignature => {
                "the package's signature does not verify with the key kid names: it was altered or forged"
            }
            Rejection::Expired => "the challenge has expired; request the page again for a new one",
            Rejection::WrongSubject => "the challenge was issued to another client address",
            Rejection::WrongProof => "pow_nonce does not open the key commitment",
            Rejection::Replayed => "this challenge has already been redeemed",
            Rejection::RateLimited => {
                "too many failed proofs from this address; wait a few seconds"
            }
            Rejection::Blocked => "this address is blocked: too many unanswered challenges",
            Rejection::TooEarly => "the delay has not passed yet; wait and send it again",
        }
    }
}

/// What a ticket cookie turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieCheck {
    /// A ticket for this source until the given Unix second.
    Valid(u64),
    /// Signed by us once but expired, or issued to another source (a client whose address
    /// changed): ignored, not held against anyone.
    Stale,
    /// Unreadable, or its signature does not verify: forged.
    Forged,
}

/// A proof that passed every check but the used-nonce one (which needs the store).
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    pub session_nonce: String,
    pub expires_at: u64,
    pub difficulty: u32,
}

pub fn random_bytes<const N: usize>() -> Result<[u8; N], SentryError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| SentryError::Crypto(format!("no randomness: {e}")))?;
    Ok(buf)
}

/// The key a candidate nonce yields.
pub fn candidate_key(session_nonce: &[u8], pow_nonce: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(session_nonce);
    h.update(pow_nonce.to_be_bytes());
    h.finalize().into()
}

pub fn commitment(key: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// Key id: the first 8 bytes of SHA-256 of the uncompressed public point, b64url.
fn key_id(key: &VerifyingKey) -> String {
    let point = key.to_sec1_point(false);
    B64.encode(&Sha256::digest(point.as_bytes())[..8])
}

/// A public key as a JWK (RFC 7517/7518).
pub fn jwk(kid: &str, key: &VerifyingKey) -> Value {
    let point = key.to_sec1_point(false);
    let bytes = point.as_bytes();
    // Uncompressed SEC1: 0x04 ‖ x (32) ‖ y (32).
    let (x, y) = bytes
        .get(1..33)
        .zip(bytes.get(33..65))
        .unwrap_or((&[][..], &[][..]));
    json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
           "x": B64.encode(x), "y": B64.encode(y)})
}

/// Parses a JWK of ours back into a key (fleet key exchange through the store).
pub fn key_from_jwk(jwk: &Value) -> Option<(String, VerifyingKey)> {
    if jwk["kty"] != "EC" || jwk["crv"] != "P-256" {
        return None;
    }
    let x = B64.decode(jwk["x"].as_str()?).ok()?;
    let y = B64.decode(jwk["y"].as_str()?).ok()?;
    if x.len() != 32 || y.len() != 32 {
        return None;
    }
    let mut sec1 = vec![4u8];
    sec1.extend_from_slice(&x);
    sec1.extend_from_slice(&y);
    let key = VerifyingKey::from_sec1_bytes(&sec1).ok()?;
    Some((jwk["kid"].as_str()?.to_string(), key))
}

/// The host's signing key and the verification keys of the fleet.
pub struct Signer {
    key: SigningKey,
    /// The same key for signing through ring's constant-time assembly (several times faster
    /// than the portable implementation; p256 keeps the key file and JWK handling).
    fast: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    /// kid -> key: ours plus those other hosts published in the store.
    ring: RwLock<HashMap<String, VerifyingKey>>,
    /// kid -> uncompressed SEC1 point, for verification with ring.
    points: RwLock<HashMap<String, Vec<u8>>>,
    issued: Mutex<IssuedMemory>,
}

/// ECDSA P-256/SHA-256 over `msg` with the r||s signature `sig`.
fn verify_sec1(point: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(msg, sig)
        .is_ok()
}

#[derive(Default)]
struct IssuedMemory {
    set: std::collections::HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
}

/// How a proof's package was found authentic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Authenticated {
    /// This host issued it: byte for byte in the memory of recent packages.
    IssuedHere,
    /// Another host of the fleet issued it and recorded it in the shared store.
    FleetRecord,
    /// Neither memory knew it; the ECDSA signature verified.
    Signature,
}

impl Authenticated {
    pub const ALL: [Authenticated; 3] = [
        Authenticated::IssuedHere,
        Authenticated::FleetRecord,
        Authenticated::Signature,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Authenticated::IssuedHere => "issued_here",
            Authenticated::FleetRecord => "fleet_record",
            Authenticated::Signature => "signature",
        }
    }
}

/// The identity of a package as issued: SHA-256 over its payload and signature strings. Only
/// a byte-identical package has it, so knowing that the fleet issued a digest authenticates
/// the package without its signature check.
pub fn package_digest(payload: &str, signature: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(payload.as_bytes());
    h.update(b".");
    h.update(signature.as_bytes());
    h.finalize().into()
}

impl Signer {
    /// A fresh in-memory key (benches, tests).
    pub fn generate() -> Result<Self, SentryError> {
        loop {
            let bytes: [u8; 32] = random_bytes()?;
            // A random 32-byte string is a valid scalar except with negligible probability.
            if let Ok(key) = SigningKey::from_slice(&bytes) {
                return Self::from_key(key);
            }
        }
    }

    fn from_key(key: SigningKey) -> Result<Self, SentryError> {
        let verifying = *key.verifying_key();
        let kid = key_id(&verifying);
        let point = verifying.to_sec1_point(false).as_bytes().to_vec();
        let rng = SystemRandom::new();
        let fast = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.to_bytes(),
            &point,
            &rng,
        )
        .map_err(|e| SentryError::Crypto(format!("P-256 key rejected: {e}")))?;
        Ok(Self {
            key,
            fast,
            rng,
            ring: RwLock::new(HashMap::from([(kid.clone(), verifying)])),
            points: RwLock::new(HashMap::from([(kid.clone(), point)])),
            kid,
            issued: Mutex::new(IssuedMemory::default()),
        })
    }

    /// r||s (64 bytes) over `msg`.
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, SentryError> {
        self.fast
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|e| SentryError::Crypto(format!("signing failed: {e}")))
    }

    /// Whether the key named `kid` (and only that one) verifies `sig` over `msg`; an unknown
    /// kid verifies nothing.
    fn verify_with(&self, kid: &str, msg: &[u8], sig: &[u8]) -> bool {
        let points = match self.points.read() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        points
            .get(kid)
            .is_some_and(|point| verify_sec1(point, msg, sig))
    }

    /// Whether a key of this id is known (ours or the fleet's).
    pub fn knows(&self, kid: &str) -> bool {
        match self.points.read() {
            Ok(p) => p.contains_key(kid),
            Err(p) => p.into_inner().contains_key(kid),
        }
    }

    /// Loads the key from `path` (32 raw scalar bytes, 0600) or creates it there, atomically
    /// (temporary file, fsync, rename): a crash never leaves a short key file behind. A file
    /// that is not a key is set aside (the error names it) and a new key made; what the old
    /// key signed verifies only while its public half is still in the store's key set.
    pub fn load_or_create(path: &Path) -> Result<Self, SentryError> {
        match std::fs::read(path) {
            Ok(bytes) => match SigningKey::from_slice(&bytes) {
                Ok(key) => return Self::from_key(key),
                Err(_) => {
                    let moved = crate::store::set_aside(path)
                        .map_err(|e| SentryError::Io(e.to_string()))?;
                    tracing::error!(
                        module = "sentry",
                        file = %path.display(),
                        moved_to = %moved.display(),
                        "the sentry key is not a P-256 private key: moved aside, a new key is made"
                    );
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SentryError::Io(format!("{}: {e}", path.display()))),
        }
        let signer = Self::generate()?;
        let bytes = signer.key.to_bytes();
        crate::store::write_atomic(path, &bytes).map_err(|e| SentryError::Io(e.to_string()))?;
        Ok(signer)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn own_jwk(&self) -> Value {
        jwk(&self.kid, self.key.verifying_key())
    }

    /// The JWK set: every key whose packages this host accepts.
    pub fn jwks(&self) -> Value {
        let ring = match self.ring.read() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let mut keys: Vec<Value> = ring.iter().map(|(kid, k)| jwk(kid, k)).collect();
        keys.sort_by(|a, b| a["kid"].as_str().cmp(&b["kid"].as_str()));
        json!({ "keys": keys })
    }

    /// Adds keys other hosts published.
    pub fn learn_keys(&self, jwks: impl IntoIterator<Item = Value>) {
        let learned: Vec<(String, VerifyingKey)> =
            jwks.into_iter().filter_map(|j| key_from_jwk(&j)).collect();
        let mut ring = match self.ring.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let mut points = match self.points.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        for (kid, key) in learned {
            points.insert(kid.clone(), key.to_sec1_point(false).as_bytes().to_vec());
            ring.insert(kid, key);
        }
    }

    /// Builds a signed challenge for `subject` (the client's source: an address or an IPv6
    /// prefix) carrying `content`.
    pub fn issue(
        &self,
        subject: Source,
        difficulty: u32,
        ttl_seconds: u64,
        content: &[u8],
        now: u64,
    ) -> Result<Package, SentryError> {
        let difficulty = difficulty.clamp(1, MAX_DIFFICULTY);
        let session_nonce: [u8; NONCE_BYTES] = random_bytes()?;
        let mask = (1u64 << difficulty) - 1;
        let pow_nonce = u64::from_be_bytes(random_bytes()?) & mask;
        let key = candidate_key(&session_nonce, pow_nonce);
        let iv: [u8; 12] = random_bytes()?;
        let cipher = Aes256Gcm::new_from_slice(&key)
            .map_err(|_| SentryError::Crypto("AES key length".into()))?;
        let ciphertext = cipher
            .encrypt(
                &iv.into(),
                AeadPayload {
                    msg: content,
                    aad: &session_nonce,
                },
            )
            .map_err(|_| SentryError::Crypto("AES-GCM encryption failed".into()))?;
        let payload = ChallengePayload {
            session_nonce: B64.encode(session_nonce),
            difficulty,
            issued_at: now,
            expires_at: now + ttl_seconds,
            subject: subject.to_string(),
            key_commitment: B64.encode(commitment(&key)),
            iv: B64.encode(iv),
            ciphertext: B64.encode(&ciphertext),
            proof_url: PROOF_PATH.into(),
        };
        let bytes = serde_json::to_vec(&payload)
            .map_err(|e| SentryError::Crypto(format!("payload: {e}")))?;
        let signature = self.sign(&bytes)?;
        let package = Package {
            v: WIRE_VERSION,
            alg: "ES256".into(),
            kid: self.kid.clone(),
            payload: B64.encode(&bytes),
            signature: B64.encode(signature),
        };
        self.remember(package_digest(&package.payload, &package.signature));
        Ok(package)
    }

    fn remember(&self, digest: [u8; 32]) {
        let mut m = match self.issued.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if m.set.insert(digest) {
            m.order.push_back(digest);
            if m.order.len() > ISSUED_MEMORY
                && let Some(old) = m.order.pop_front()
            {
                m.set.remove(&old);
            }
        }
    }

    /// Whether this host issued the package with this digest (and still remembers it).
    pub fn issued_here(&self, digest: &[u8; 32]) -> bool {
        let m = match self.issued.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.set.contains(digest)
    }

    /// Every check of a proof except the used-nonce one: signature, expiry, subject,
    /// commitment. Cheap rejections come first only where they cannot mask a forgery.
    pub fn verify(&self, proof: &Proof, client: Source, now: u64) -> Result<Verified, Rejection> {
        let digest = package_digest(&proof.payload, &proof.signature);
        let vouched = self
            .issued_here(&digest)
            .then_some(Authenticated::IssuedHere);
        self.verify_vouched(proof, client, now, vouched)
            .map(|(v, _)| v)
    }

    /// `verify` where the caller has already found the package authentic by its digest
    /// (`package_digest`): issued here (`issued_here`), or recorded in the shared store as
    /// issued by a host of the fleet (a fleet's hosts trust the store with tickets already).
    /// That stands in for the ECDSA signature; with `None` the signature must verify with the
    /// key `kid` names (no other key is tried). Also says how the package was authenticated.
    pub fn verify_vouched(
        &self,
        proof: &Proof,
        client: Source,
        now: u64,
        vouched: Option<Authenticated>,
    ) -> Result<(Verified, Authenticated), Rejection> {
        if proof.payload.len() > 16 * 1024 || proof.signature.len() > 128 || proof.kid.len() > 64 {
            return Err(Rejection::Malformed);
        }
        if !self.knows(&proof.kid) {
            return Err(Rejection::BadSignature);
        }
        let bytes = B64
            .decode(&proof.payload)
            .map_err(|_| Rejection::Malformed)?;
        let sig_bytes = B64
            .decode(&proof.signature)
            .map_err(|_| Rejection::Malformed)?;
        let authenticated = match vouched {
            Some(by) => by,
            None if sig_bytes.len() == 64 && self.verify_with(&proof.kid, &bytes, &sig_bytes) => {
                Authenticated::Signature
            }
            None => return Err(Rejection::BadSignature),
        };
        let payload: ChallengePayload =
            serde_json::from_slice(&bytes).map_err(|_| Rejection::Malformed)?;
        if payload.expires_at <= now {
            return Err(Rejection::Expired);
        }
        let subject: Source = payload.subject.parse().map_err(|_| Rejection::Malformed)?;
        if !same_source(subject, client) {
            return Err(Rejection::WrongSubject);
        }
        let session_nonce = B64
            .decode(&payload.session_nonce)
            .map_err(|_| Rejection::Malformed)?;
        let expected = B64
            .decode(&payload.key_commitment)
            .map_err(|_| Rejection::Malformed)?;
        if payload.difficulty < 64 && proof.pow_nonce >> payload.difficulty != 0 {
            return Err(Rejection::WrongProof);
        }
        let key = candidate_key(&session_nonce, proof.pow_nonce);
        if commitment(&key)[..] != expected[..] {
            return Err(Rejection::WrongProof);
        }
        Ok((
            Verified {
                session_nonce: payload.session_nonce,
                expires_at: payload.expires_at,
                difficulty: payload.difficulty,
            },
            authenticated,
        ))
    }

    /// A signed ticket cookie value: b64url(`<source>|<expires_at>|<kid>`) "."
    /// b64url(signature).
    pub fn ticket_cookie(&self, source: Source, expires_at: u64) -> Result<String, SentryError> {
        let body = format!("{source}|{expires_at}|{}", self.kid);
        let signature = self.sign(body.as_bytes())?;
        Ok(format!(
            "{}.{}",
            B64.encode(body.as_bytes()),
            B64.encode(signature)
        ))
    }

    /// What a ticket cookie is worth to `source`. Expiry, subject and key id are read first (a
    /// stale cookie costs no verification and is held against nobody); then the signature,
    /// with the key the cookie names only.
    pub fn check_cookie(&self, value: &str, source: Source, now: u64) -> CookieCheck {
        let parsed = (|| {
            if value.len() > 256 {
                return None;
            }
            let (body, sig) = value.split_once('.')?;
            let body = B64.decode(body).ok()?;
            let signature = B64.decode(sig).ok()?;
            let text = std::str::from_utf8(&body).ok()?.to_string();
            Some((body, signature, text))
        })();
        let Some((body, signature, text)) = parsed else {
            return CookieCheck::Forged;
        };
        let mut fields = text.split('|');
        let (Some(subject), Some(exp)) = (fields.next(), fields.next()) else {
            return CookieCheck::Forged;
        };
        let kid = fields.next();
        let (Ok(subject), Ok(exp)) = (subject.parse::<Source>(), exp.parse::<u64>()) else {
            return CookieCheck::Forged;
        };
        if fields.next().is_some() {
            return CookieCheck::Forged;
        }
        if exp <= now || !same_source(subject, source) {
            return CookieCheck::Stale;
        }
        // The key id is required and only that key is tried. A cookie without one (issued
        // before key ids) or naming a key not learned yet (a new host of the fleet, before the
        // next key refresh) is worth nothing but held against nobody: the client solves again.
        let Some(kid) = kid.filter(|k| self.knows(k)) else {
            return CookieCheck::Stale;
        };
        if self.verify_with(kid, &body, &signature) {
            CookieCheck::Valid(exp)
        } else {
            CookieCheck::Forged
        }
    }
}

impl Signer {
    /// A delay token for `subject`: redeemable from `not_before` until `expires_at`, once
    /// (its random nonce goes into the used-nonce set), sending the browser to `target`
    /// (a path of this origin). b64url(`d1|<subject>|<not_before>|<expires_at>|<nonce>|<kid>|<target>`)
    /// "." b64url(ECDSA P-256 signature, r‖s): any host of the fleet that knows the key
    /// verifies it.
    pub fn delay_token(
        &self,
        subject: Source,
        not_before: u64,
        expires_at: u64,
        target: &str,
    ) -> Result<String, SentryError> {
        let nonce: [u8; NONCE_BYTES] = random_bytes()?;
        let body = format!(
            "{DELAY_TOKEN_TAG}|{subject}|{not_before}|{expires_at}|{}|{}|{target}",
            B64.encode(nonce),
            self.kid
        );
        let signature = self.sign(body.as_bytes())?;
        Ok(format!(
            "{}.{}",
            B64.encode(body.as_bytes()),
            B64.encode(signature)
        ))
    }

    /// Every check of a delay token but the used-nonce one. Too early is answered first,
    /// without the signature (redeeming early gains nothing, so nothing is masked); then the
    /// signature with the key the token names, expiry and subject.
    pub fn check_delay_token(
        &self,
        token: &str,
        client: Source,
        now: u64,
    ) -> Result<DelayToken, Rejection> {
        let (body, signature) = delay_parts(token).ok_or(Rejection::Malformed)?;
        let f = delay_fields(&body).ok_or(Rejection::Malformed)?;
        if now < f.not_before {
            return Err(Rejection::TooEarly);
        }
        if !self.knows(f.kid) || !self.verify_with(f.kid, body.as_bytes(), &signature) {
            return Err(Rejection::BadSignature);
        }
        if f.expires_at <= now {
            return Err(Rejection::Expired);
        }
        let subject: Source = f.subject.parse().map_err(|_| Rejection::Malformed)?;
        if !same_source(subject, client) {
            return Err(Rejection::WrongSubject);
        }
        Ok(DelayToken {
            nonce: f.nonce.to_string(),
            not_before: f.not_before,
            expires_at: f.expires_at,
            target: f.target.to_string(),
        })
    }
}

/// Whether a package or cookie issued to `subject` belongs to `client`: the same source, or
/// (issued before addresses were grouped into prefixes) one address of the client's prefix.
fn same_source(subject: Source, client: Source) -> bool {
    subject == client || (!subject.is_prefix() && client.contains(subject.ip()))
}

/// Decodes a package's payload (for solvers and tests; no verification).
pub fn decode_payload(package: &Package) -> Result<ChallengePayload, SentryError> {
    let bytes = B64
        .decode(&package.payload)
        .map_err(|e| SentryError::Crypto(format!("payload is not b64url: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| SentryError::Crypto(format!("payload: {e}")))
}

/// Verifies a package's signature against a JWK, as a browser would with WebCrypto.
pub fn verify_package(package: &Package, jwk: &Value) -> Result<ChallengePayload, SentryError> {
    let (_, key) =
        key_from_jwk(jwk).ok_or_else(|| SentryError::Crypto("not a P-256 JWK".into()))?;
    let bytes = B64
        .decode(&package.payload)
        .map_err(|e| SentryError::Crypto(format!("payload is not b64url: {e}")))?;
    let sig = B64
        .decode(&package.signature)
        .map_err(|e| SentryError::Crypto(format!("signature is not b64url: {e}")))?;
    let sig = p256::ecdsa::Signature::from_slice(&sig)
        .map_err(|_| SentryError::Crypto("signature is not 64 bytes r||s".into()))?;
    use p256::ecdsa::signature::Verifier as _;
    key.verify(&bytes, &sig)
        .map_err(|_| SentryError::Crypto("signature does not verify".into()))?;
    serde_json::from_slice(&bytes).map_err(|e| SentryError::Crypto(format!("payload: {e}")))
}

/// Opens a package's content with a found key.
pub fn decrypt(payload: &ChallengePayload, key: &[u8; 32]) -> Result<Vec<u8>, SentryError> {
    let nonce = B64
        .decode(&payload.session_nonce)
        .map_err(|_| SentryError::Crypto("session_nonce".into()))?;
    let iv: [u8; 12] = B64
        .decode(&payload.iv)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| SentryError::Crypto("iv must be 12 bytes".into()))?;
    let ct = B64
        .decode(&payload.ciphertext)
        .map_err(|_| SentryError::Crypto("ciphertext".into()))?;
    let cipher =
        Aes256Gcm::new_from_slice(key).map_err(|_| SentryError::Crypto("AES key length".into()))?;
    cipher
        .decrypt(
            &iv.into(),
            AeadPayload {
                msg: &ct,
                aad: &nonce,
            },
        )
        .map_err(|_| SentryError::Crypto("AES-GCM: the key does not open the content".into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn issue_solve_verify_and_every_rejection() {
        let signer = Signer::generate().unwrap();
        let ip: Source = "198.51.100.7".parse().unwrap();
        let pkg = signer.issue(ip, 8, 60, b"hello", 1_000).unwrap();
        let payload = verify_package(&pkg, &signer.own_jwk()).unwrap();
        let solved = crate::sentry::solver::solve(&payload).unwrap();
        assert_eq!(solved.content, b"hello");
        let proof = Proof {
            payload: pkg.payload.clone(),
            signature: pkg.signature.clone(),
            pow_nonce: solved.pow_nonce,
            kid: pkg.kid.clone(),
        };
        assert!(signer.verify(&proof, ip, 1_001).is_ok());
        assert_eq!(
            signer.verify(&proof, ip, 1_060).unwrap_err(),
            Rejection::Expired
        );
        let other: Source = "198.51.100.8".parse().unwrap();
        assert_eq!(
            signer.verify(&proof, other, 1_001).unwrap_err(),
            Rejection::WrongSubject
        );
        let wrong = Proof {
            pow_nonce: solved.pow_nonce ^ 1,
            ..proof.clone()
        };
        assert_eq!(
            signer.verify(&wrong, ip, 1_001).unwrap_err(),
            Rejection::WrongProof
        );
        // A fresh signer (another host without our key) must verify in full and refuse.
        let stranger = Signer::generate().unwrap();
        assert_eq!(
            stranger.verify(&proof, ip, 1_001).unwrap_err(),
            Rejection::BadSignature
        );
        // One byte of the payload changed.
        let mut raw = B64.decode(&pkg.payload).unwrap();
        let pos = raw.iter().position(|b| *b == b'8').unwrap();
        raw[pos] = b'9';
        let altered = Proof {
            payload: B64.encode(&raw),
            ..proof.clone()
        };
        assert_eq!(
            signer.verify(&altered, ip, 1_001).unwrap_err(),
            Rejection::BadSignature
        );
        let cookie = signer.ticket_cookie(ip, 2_000).unwrap();
        assert_eq!(
            signer.check_cookie(&cookie, ip, 1_500),
            CookieCheck::Valid(2_000)
        );
        assert_eq!(
            signer.check_cookie(&cookie, other, 1_500),
            CookieCheck::Stale
        );
        assert_eq!(signer.check_cookie(&cookie, ip, 2_000), CookieCheck::Stale);
        // A forged cookie: this host's key id, another key's signature; and garbage.
        let foreign = stranger.ticket_cookie(ip, 2_000).unwrap();
        let (body, _) = cookie.split_once('.').unwrap();
        let (_, foreign_signature) = foreign.split_once('.').unwrap();
        let forged = format!("{body}.{foreign_signature}");
        assert_eq!(signer.check_cookie(&forged, ip, 1_500), CookieCheck::Forged);
        // A key this host does not know (yet), or no key id at all: ignored, not forged.
        assert_eq!(signer.check_cookie(&foreign, ip, 1_500), CookieCheck::Stale);
        let unnamed = format!(
            "{}.{}",
            B64.encode(format!("{ip}|2000").as_bytes()),
            foreign_signature
        );
        assert_eq!(signer.check_cookie(&unnamed, ip, 1_500), CookieCheck::Stale);
        assert_eq!(
            signer.check_cookie("bm90.aGluZw", ip, 1_500),
            CookieCheck::Forged
        );
    }

    #[test]
    fn delay_tokens_wait_verify_and_name_their_subject() {
        let signer = Signer::generate().unwrap();
        let ip: Source = "198.51.100.7".parse().unwrap();
        let token = signer.delay_token(ip, 1_005, 1_300, "/a?b=c|d").unwrap();
        assert_eq!(delay_wait(&token, 1_001), 4);
        assert_eq!(
            signer.check_delay_token(&token, ip, 1_004).unwrap_err(),
            Rejection::TooEarly
        );
        let ok = signer.check_delay_token(&token, ip, 1_005).unwrap();
        assert_eq!(ok.target, "/a?b=c|d");
        assert_eq!(ok.not_before, 1_005);
        assert_eq!(
            signer.check_delay_token(&token, ip, 1_300).unwrap_err(),
            Rejection::Expired
        );
        let other: Source = "198.51.100.8".parse().unwrap();
        assert_eq!(
            signer.check_delay_token(&token, other, 1_100).unwrap_err(),
            Rejection::WrongSubject
        );
        // The body changed (an earlier time, another subject): the signature no longer fits.
        let (body, sig) = token.split_once('.').unwrap();
        let text = String::from_utf8(B64.decode(body).unwrap()).unwrap();
        let forged = format!(
            "{}.{sig}",
            B64.encode(text.replace("|1005|", "|1000|").as_bytes())
        );
        assert_eq!(
            signer.check_delay_token(&forged, ip, 1_002).unwrap_err(),
            Rejection::BadSignature
        );
        // Another key (not known here), garbage, an oversized token.
        let stranger = Signer::generate().unwrap();
        let foreign = stranger.delay_token(ip, 1_000, 1_300, "/").unwrap();
        assert_eq!(
            signer.check_delay_token(&foreign, ip, 1_100).unwrap_err(),
            Rejection::BadSignature
        );
        for bad in [
            "",
            "x",
            "bm90.aGluZw",
            &"A".repeat(MAX_DELAY_TOKEN_BYTES + 1),
        ] {
            assert_eq!(
                signer.check_delay_token(bad, ip, 1_100).unwrap_err(),
                Rejection::Malformed,
                "{bad}"
            );
        }
    }

    #[test]
    fn an_answer_is_the_proof_on_one_line() {
        let proof = Proof {
            payload: "eyJhIjoxfQ".into(),
            signature: "c2ln".into(),
            pow_nonce: 12_345,
            kid: "abc-_x".into(),
        };
        let answer = proof.to_answer();
        assert_eq!(answer, "eyJhIjoxfQ.c2ln.12345.abc-_x");
        let back = Proof::from_answer("  eyJhIjox\nfQ.c2ln.12345.abc-_x \r\n").unwrap();
        assert_eq!(back.to_answer(), answer);
        for bad in ["", "a.b.c", "a.b.x.k", ".b.1.k", "a.b.1."] {
            assert!(Proof::from_answer(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_key_id_is_required_and_only_that_key_verifies() {
        let signer = Signer::generate().unwrap();
        let other = Signer::generate().unwrap();
        // The fleet knows both keys.
        signer.learn_keys([other.own_jwk()]);
        let ip: Source = "198.51.100.7".parse().unwrap();
        let pkg = other.issue(ip, 4, 60, b"x", 1_000).unwrap();
        let payload = verify_package(&pkg, &other.own_jwk()).unwrap();
        let solved = crate::sentry::solver::solve(&payload).unwrap();
        let proof = |kid: &str| Proof {
            payload: pkg.payload.clone(),
            signature: pkg.signature.clone(),
            pow_nonce: solved.pow_nonce,
            kid: kid.into(),
        };
        assert!(signer.verify(&proof(other.kid()), ip, 1_001).is_ok());
        // Another known key, or an unknown one: refused, no other key tried.
        assert_eq!(
            signer.verify(&proof(signer.kid()), ip, 1_001).unwrap_err(),
            Rejection::BadSignature
        );
        assert_eq!(
            signer.verify(&proof("nope"), ip, 1_001).unwrap_err(),
            Rejection::BadSignature
        );
        // Without kid the proof does not parse.
        let missing = serde_json::json!({"payload": pkg.payload, "signature": pkg.signature,
                                         "pow_nonce": solved.pow_nonce});
        assert!(serde_json::from_value::<Proof>(missing).is_err());
    }

    #[test]
    fn a_prefix_subject_accepts_any_address_of_its_prefix() {
        let signer = Signer::generate().unwrap();
        let p = crate::source::SourcePrefix::DEFAULT;
        let client = p.source("2001:db8:1:2::10".parse().unwrap());
        let pkg = signer.issue(client, 4, 60, b"x", 1_000).unwrap();
        let payload = decode_payload(&pkg).unwrap();
        assert_eq!(payload.subject, "2001:db8:1:2::/64");
        let solved = crate::sentry::solver::solve(&payload).unwrap();
        let proof = Proof {
            payload: pkg.payload.clone(),
            signature: pkg.signature.clone(),
            pow_nonce: solved.pow_nonce,
            kid: pkg.kid.clone(),
        };
        let same = p.source("2001:db8:1:2::ffff".parse().unwrap());
        assert!(signer.verify(&proof, same, 1_001).is_ok());
        let other = p.source("2001:db8:1:3::10".parse().unwrap());
        assert_eq!(
            signer.verify(&proof, other, 1_001).unwrap_err(),
            Rejection::WrongSubject
        );
    }
}

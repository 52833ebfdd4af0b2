//! `sentry_proof`: what a client sends back to the sentry: the proof body (JSON), the
//! command-line solver's answer line, the page's form without JavaScript, delay tokens and the
//! ticket cookie.

use std::sync::OnceLock;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};

use phantom_daemon::{
    sentry::{
        challenge::{CookieCheck, Proof, Rejection, Signer, delay_wait},
        nojs,
    },
    source::Source,
};

/// When the checks run (Unix seconds) and who asks.
pub const NOW: u64 = 1_800_000_000;
const CLIENT: &str = "192.0.2.1";

/// A fixed signing key, so that corpus files may hold cookies and tokens that verify.
const KEY: [u8; 32] = [
    0x51, 0x7e, 0x2a, 0x90, 0x11, 0x3c, 0x6d, 0x04, 0xa8, 0x5b, 0xe2, 0x47, 0x19, 0x8f, 0x30, 0xc6,
    0x72, 0x0d, 0x9e, 0x64, 0x3b, 0xf1, 0x28, 0x55, 0x86, 0xcd, 0x17, 0x4a, 0xe9, 0x02, 0x6b, 0x3f,
];

/// The sentry's signer with [`KEY`].
pub fn signer() -> &'static Signer {
    static SIGNER: OnceLock<Signer> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("sentry.key");
        std::fs::write(&path, KEY).expect("the key file");
        Signer::load_or_create(&path).expect("the fixed key loads")
    })
}

fn client() -> Source {
    CLIENT.parse().expect("an address")
}

/// A ticket cookie the signer issues for the client, valid until `expires_at`: what the
/// corpus's valid cookies were made with.
pub fn ticket_cookie(expires_at: u64) -> String {
    signer()
        .ticket_cookie(client(), expires_at)
        .expect("a cookie")
}

/// A delay token for the client, as the page without JavaScript gets it: what the corpus's
/// valid tokens were made with.
pub fn delay_token(not_before: u64, expires_at: u64, target: &str) -> String {
    signer()
        .delay_token(client(), not_before, expires_at, target)
        .expect("a token")
}

fn check_answer(answer: &str) {
    if let Some(proof) = Proof::from_answer(answer) {
        let again = Proof::from_answer(&proof.to_answer()).expect("an answer line reads back");
        assert_eq!(
            (
                &again.payload,
                &again.signature,
                again.pow_nonce,
                &again.kid
            ),
            (
                &proof.payload,
                &proof.signature,
                proof.pow_nonce,
                &proof.kid
            ),
            "an answer line reads back unchanged"
        );
        check_proof(&proof);
    }
}

/// A proof no package of ours signed is refused before its work is looked at.
fn check_proof(proof: &Proof) {
    match signer().verify(proof, client(), NOW) {
        Ok(v) => assert!(v.expires_at > NOW, "a verified proof has not expired"),
        Err(r) => assert!(!r.code().is_empty(), "{r:?} has a code"),
    }
}

fn check_cookie(value: &str) {
    if let CookieCheck::Valid(exp) = signer().check_cookie(value, client(), NOW) {
        assert!(exp > NOW, "a valid cookie has not expired");
        // Only the signer's own cookies verify, and it signs only `<source>|<expiry>|<kid>`.
        let body = value
            .split_once('.')
            .and_then(|(body, _)| B64.decode(body).ok())
            .expect("a valid cookie has a body");
        assert_eq!(
            String::from_utf8_lossy(&body),
            format!("{CLIENT}|{exp}|{}", signer().kid()),
            "only a cookie the signer made is valid"
        );
    }
}

fn check_token(token: &str) {
    let _ = delay_wait(token, NOW);
    match signer().check_delay_token(token, client(), NOW) {
        Ok(t) => assert!(t.not_before <= NOW && NOW < t.expires_at),
        Err(Rejection::TooEarly) => assert!(delay_wait(token, NOW) > 0),
        Err(_) => {}
    }
}

/// Input: a proof body, an answer line, a pass form, a cookie value or a delay token; each
/// reading of it is tried. Nothing panics, a proof or cookie verifies only as the signer made
/// it, and answer lines read back as they were.
pub fn sentry_proof(data: &[u8]) {
    if let Ok(proof) = serde_json::from_slice::<Proof>(data) {
        check_proof(&proof);
    }
    let text = String::from_utf8_lossy(data);
    check_answer(&text);
    check_cookie(&text);
    check_token(&text);
    for (name, value) in nojs::form(data) {
        match name.as_str() {
            "answer" => check_answer(&value),
            "token" => check_token(&value),
            _ => {}
        }
    }
    // What the signer makes, it takes back.
    let exp = NOW + 1 + u64::from(data.first().copied().unwrap_or(0));
    assert_eq!(
        signer().check_cookie(&ticket_cookie(exp), client(), NOW),
        CookieCheck::Valid(exp)
    );
}

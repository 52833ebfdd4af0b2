//! The reference solver: exactly what the browser page does with a challenge package —
//! verify the signature against the published JWK, count `pow_nonce` up from 0 until
//! SHA-256(SHA-256(session_nonce ‖ n)) equals the commitment, decrypt the content, and build
//! the proof to post back.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde_json::Value;

use super::{
    SentryError,
    challenge::{self, ChallengePayload, Package, Proof},
};

/// A solved challenge.
#[derive(Clone, Debug, PartialEq)]
pub struct Solution {
    pub pow_nonce: u64,
    /// Candidates tried (pow_nonce + 1).
    pub hashes: u64,
    pub content: Vec<u8>,
}

/// Searches the nonce space of an already verified payload.
pub fn solve(payload: &ChallengePayload) -> Result<Solution, SentryError> {
    let nonce = B64
        .decode(&payload.session_nonce)
        .map_err(|_| SentryError::Crypto("session_nonce is not b64url".into()))?;
    let target: [u8; 32] = B64
        .decode(&payload.key_commitment)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| SentryError::Crypto("key_commitment must be 32 bytes".into()))?;
    if payload.difficulty > challenge::MAX_DIFFICULTY {
        return Err(SentryError::Crypto(format!(
            "difficulty {} is beyond the wire format's {}",
            payload.difficulty,
            challenge::MAX_DIFFICULTY
        )));
    }
    let limit = 1u64 << payload.difficulty;
    for n in 0..limit {
        let key = challenge::candidate_key(&nonce, n);
        if challenge::commitment(&key) == target {
            let content = challenge::decrypt(payload, &key)?;
            return Ok(Solution {
                pow_nonce: n,
                hashes: n + 1,
                content,
            });
        }
    }
    Err(SentryError::Crypto(
        "no nonce in [0, 2^difficulty) opens the commitment".into(),
    ))
}

/// The browser's whole path: verify with the JWK set, solve, and the proof to post.
pub fn solve_package(package: &Package, jwks: &Value) -> Result<(Solution, Proof), SentryError> {
    let keys = jwks["keys"].as_array().cloned().unwrap_or_default();
    let jwk = keys
        .iter()
        .find(|k| k["kid"] == package.kid.as_str())
        .ok_or_else(|| SentryError::Crypto(format!("no published key {:?}", package.kid)))?;
    let payload = challenge::verify_package(package, jwk)?;
    let solution = solve(&payload)?;
    let proof = Proof {
        payload: package.payload.clone(),
        signature: package.signature.clone(),
        pow_nonce: solution.pow_nonce,
        kid: package.kid.clone(),
    };
    Ok((solution, proof))
}

//! Bearer tokens of the HTTPS admin API: JWTs signed ES256 with the daemon's admin key
//! (`<state_dir>/admin/jwt-key.p8`, PKCS#8, 0600, made at first start), one record per token
//! name in `<state_dir>/admin/tokens.json` (written atomically and synced, so a revocation
//! that was acknowledged survives kill -9). A token is valid while its signature checks, it
//! has not expired, and the store holds its name with the same id, not revoked.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair},
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{error::Error, store};

/// The issuer and audience written into every token.
const ISSUER: &str = "phantomd";
const AUDIENCE: &str = "phantom-admin-api";
/// Longest and shortest lifetime of a token.
pub const MAX_TTL_SECONDS: i64 = 366 * 24 * 3600;
pub const MIN_TTL_SECONDS: i64 = 1;
/// Tokens kept in the store at once (revoked and expired ones included until replaced).
pub const MAX_TOKENS: usize = 1024;

/// What a token may call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Actions that change no state.
    Read,
    /// Every action.
    Write,
    /// Every action of these modules.
    Modules(Vec<String>),
}

impl Scope {
    /// `read`, `write`, or module names separated by commas (`core,dns`), each one of `known`.
    pub fn parse(s: &str, known: &[&str]) -> Result<Self, String> {
        match s.trim() {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            list => {
                let mut modules: Vec<String> = Vec::new();
                for m in list.split(',').map(str::trim) {
                    if !known.contains(&m) {
                        return Err(format!(
                            "scope {m:?} is neither read, write nor a module ({})",
                            known.join(", ")
                        ));
                    }
                    if !modules.iter().any(|x| x == m) {
                        modules.push(m.to_string());
                    }
                }
                Ok(Scope::Modules(modules))
            }
        }
    }

    pub fn as_string(&self) -> String {
        match self {
            Scope::Read => "read".into(),
            Scope::Write => "write".into(),
            Scope::Modules(m) => m.join(","),
        }
    }

    /// Whether this scope allows `module action`, a read or a write.
    pub fn allows(&self, module: &str, read_only: bool) -> bool {
        match self {
            Scope::Read => read_only,
            Scope::Write => true,
            Scope::Modules(m) => m.iter().any(|x| x == module),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    jti: String,
    scope: String,
    iat: i64,
    exp: i64,
}

/// One minted token, as kept and listed (never the token itself).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    pub name: String,
    pub id: String,
    pub scope: String,
    pub created: i64,
    pub expires: i64,
    pub revoked: Option<i64>,
}

#[derive(Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: BTreeMap<String, TokenRecord>,
}

/// Why a bearer token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Malformed,
    BadSignature,
    Expired,
    Revoked,
    Unknown,
}

impl Refusal {
    pub fn sentence(self) -> &'static str {
        match self {
            Refusal::Malformed => "the bearer token is not a well-formed token of this daemon",
            Refusal::BadSignature => "the bearer token's signature does not verify",
            Refusal::Expired => "the bearer token has expired",
            Refusal::Revoked => "the bearer token has been revoked",
            Refusal::Unknown => "the bearer token is not known to this daemon",
        }
    }
}

/// A verified token: who and what it may do.
#[derive(Clone, Debug)]
pub struct Grant {
    pub name: String,
    pub scope: Scope,
    /// Unix seconds.
    pub expires: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("a token named {0:?} exists and is valid; revoke it first")]
    Exists(String),
    #[error("no token named {0:?}")]
    NotFound(String),
    #[error("the token store is full ({MAX_TOKENS} tokens); revoke or let some expire")]
    Full,
    #[error("cannot sign the token: {0}")]
    Sign(String),
    #[error(transparent)]
    Store(#[from] Error),
}

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    path: PathBuf,
    known_modules: Vec<String>,
    file: Mutex<TokenFile>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The admin key: read, or made at first start (a damaged file is set aside and replaced,
/// which invalidates every token signed with it).
fn load_or_make_key(path: &Path) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let rng = SystemRandom::new();
    if path.exists() {
        let der = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        match EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng) {
            Ok(pair) => {
                let public = pair.public_key().as_ref().to_vec();
                return Ok((der, public));
            }
            Err(_) => {
                let aside = store::set_aside(path)?;
                warn!(aside = %aside.display(), "the admin key was damaged: set aside, a new one made (existing tokens no longer verify)");
            }
        }
    }
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| Error::config("cannot generate the admin key"))?;
    let der = doc.as_ref().to_vec();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
        .map_err(|_| Error::config("cannot read the admin key just made"))?;
    store::write_atomic(path, &der)?;
    Ok((der, pair.public_key().as_ref().to_vec()))
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Tokens {
    /// Opens (or creates) the key and the token store in `dir` (`<state_dir>/admin`).
    pub fn open(dir: &Path, known_modules: Vec<String>) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let (private, public) = load_or_make_key(&dir.join("jwt-key.p8"))?;
        let path = dir.join("tokens.json");
        let file: TokenFile = store::read_json_or_set_aside(&path, "admin")?;
        Ok(Self {
            encoding: EncodingKey::from_ec_der(&private),
            decoding: DecodingKey::from_ec_der(&public),
            path,
            known_modules,
            file: Mutex::new(file),
        })
    }

    pub fn known_modules(&self) -> Vec<&str> {
        self.known_modules.iter().map(String::as_str).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokenFile> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mints a token; the store is synced before the token is returned.
    pub fn create(
        &self,
        name: &str,
        scope: &Scope,
        ttl_seconds: i64,
    ) -> Result<(String, TokenRecord), TokenError> {
        let mut file = self.lock();
        let t = now();
        if let Some(old) = file.tokens.get(name)
            && old.revoked.is_none()
            && old.expires > t
        {
            return Err(TokenError::Exists(name.to_string()));
        }
        if !file.tokens.contains_key(name) && file.tokens.len() >= MAX_TOKENS {
            // Make room from the dead first.
            file.tokens
                .retain(|_, r| r.revoked.is_none() && r.expires > t);
            if file.tokens.len() >= MAX_TOKENS {
                return Err(TokenError::Full);
            }
        }
        let record = TokenRecord {
            name: name.to_string(),
            id: random_id(),
            scope: scope.as_string(),
            created: t,
            expires: t + ttl_seconds,
            revoked: None,
        };
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: record.name.clone(),
            jti: record.id.clone(),
            scope: record.scope.clone(),
            iat: t,
            exp: record.expires,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.encoding)
            .map_err(|e| TokenError::Sign(e.to_string()))?;
        let previous = file.tokens.insert(name.to_string(), record.clone());
        if let Err(e) = store::write_json(&self.path, &*file) {
            match previous {
                Some(p) => file.tokens.insert(name.to_string(), p),
                None => file.tokens.remove(name),
            };
            return Err(e.into());
        }
        Ok((token, record))
    }

    /// Every token record, by name.
    pub fn list(&self) -> Vec<TokenRecord> {
        self.lock().tokens.values().cloned().collect()
    }

    /// Revokes `name`; synced before it returns. Revoking a revoked token is not an error.
    pub fn revoke(&self, name: &str) -> Result<TokenRecord, TokenError> {
        let mut file = self.lock();
        let Some(record) = file.tokens.get_mut(name) else {
            return Err(TokenError::NotFound(name.to_string()));
        };
        let before = record.revoked;
        if record.revoked.is_none() {
            record.revoked = Some(now());
        }
        let out = record.clone();
        if let Err(e) = store::write_json(&self.path, &*file) {
            if let Some(r) = file.tokens.get_mut(name) {
                r.revoked = before;
            }
            return Err(e.into());
        }
        Ok(out)
    }

    /// Checks a bearer token.
    pub fn verify(&self, token: &str) -> Result<Grant, Refusal> {
        use jsonwebtoken::errors::ErrorKind;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = 0;
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(
            |e| match e.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey => Refusal::BadSignature,
                ErrorKind::ExpiredSignature => Refusal::Expired,
                _ => Refusal::Malformed,
            },
        )?;
        let c = data.claims;
        let file = self.lock();
        let Some(record) = file.tokens.get(&c.sub) else {
            return Err(Refusal::Unknown);
        };
        if record.id != c.jti {
            // Revoked and replaced by a token of the same name.
            return Err(Refusal::Revoked);
        }
        if record.revoked.is_some() {
            return Err(Refusal::Revoked);
        }
        if record.expires <= now() {
            return Err(Refusal::Expired);
        }
        let known = self.known_modules();
        let scope = Scope::parse(&record.scope, &known).map_err(|_| Refusal::Malformed)?;
        Ok(Grant {
            name: record.name.clone(),
            scope,
            expires: record.expires,
        })
    }
}

/// `30`, `90s`, `15m`, `12h`, `30d`: seconds.
pub fn parse_ttl(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("ttl {s:?} is not a number with an optional unit s, m, h or d"))?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("ttl {s:?}: the unit is one of s, m, h, d")),
    };
    let secs = n.checked_mul(mult).unwrap_or(i64::MAX);
    if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&secs) {
        return Err(format!(
            "ttl {s:?} is out of range ({MIN_TTL_SECONDS} s to {} days)",
            MAX_TTL_SECONDS / 86_400
        ));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(dir: &Path) -> Tokens {
        Tokens::open(dir, vec!["core".into(), "dns".into()]).unwrap()
    }

    #[test]
    fn mint_verify_revoke_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let (token, rec) = t.create("ci", &Scope::Read, 3600).unwrap();
        let g = t.verify(&token).unwrap();
        assert_eq!(g.name, "ci");
        assert_eq!(g.scope, Scope::Read);
        assert!(matches!(
            t.create("ci", &Scope::Write, 60),
            Err(TokenError::Exists(_))
        ));
        t.revoke("ci").unwrap();
        assert_eq!(t.verify(&token).unwrap_err(), Refusal::Revoked);
        // A new token of the same name does not bring the old one back.
        let (token2, rec2) = t.create("ci", &Scope::Write, 60).unwrap();
        assert_ne!(rec.id, rec2.id);
        assert_eq!(t.verify(&token).unwrap_err(), Refusal::Revoked);
        drop(t);
        let t = tokens(dir.path());
        assert_eq!(t.verify(&token2).unwrap().scope, Scope::Write);
        // Another key: bad signature.
        let other = tempfile::tempdir().unwrap();
        let (foreign, _) = tokens(other.path()).create("ci", &Scope::Read, 60).unwrap();
        assert_eq!(t.verify(&foreign).unwrap_err(), Refusal::BadSignature);
        assert_eq!(t.verify("nonsense").unwrap_err(), Refusal::Malformed);
        // A tampered payload.
        let mut parts: Vec<&str> = token2.split('.').collect();
        let (forged, _) = t.create("other", &Scope::Write, 60).unwrap();
        let forged_payload = forged.split('.').nth(1).unwrap().to_string();
        parts[1] = &forged_payload;
        assert_eq!(
            t.verify(&parts.join(".")).unwrap_err(),
            Refusal::BadSignature
        );
    }

    #[test]
    fn scopes_and_ttls() {
        let known = ["core", "dns"];
        assert_eq!(Scope::parse("read", &known), Ok(Scope::Read));
        assert_eq!(
            Scope::parse("core, dns", &known),
            Ok(Scope::Modules(vec!["core".into(), "dns".into()]))
        );
        assert!(Scope::parse("sentry", &known).is_err());
        assert!(Scope::Read.allows("core", true));
        assert!(!Scope::Read.allows("core", false));
        assert!(Scope::Modules(vec!["dns".into()]).allows("dns", false));
        assert!(!Scope::Modules(vec!["dns".into()]).allows("core", true));
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("30d"), Ok(30 * 86_400));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("400d").is_err());
        assert!(parse_ttl("5y").is_err());
        assert!(parse_ttl("x").is_err());
    }
}

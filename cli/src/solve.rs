//! `phantom-api sentry solve <url>`: the command-line solver of the sentry's challenge, for a
//! browser without JavaScript (docs/sentry.md "Without JavaScript"). It fetches the JSON
//! package at `<url>` (the page names `<origin>/.sentry/challenge`; any challenged URL asked
//! with `Accept: application/json` answers one too), the site's key set from
//! `<origin>/.sentry/jwks.json`, verifies the package's signature, solves it with the
//! daemon's own Rust solver and prints the proof as one line, which the page's form takes.
//! It posts nothing itself: the answer earns the ticket for the browser it is pasted into.

use std::{io::Read, time::Duration, time::Instant};

use phantom_daemon::sentry::{
    challenge::{JWKS_PATH, Package},
    solver,
};
use ureq::http::Uri;

/// Largest answer read from the site (a package is about 1 KB, a key set a few hundred bytes).
const MAX_BODY: u64 = 64 * 1024;

/// What a solve printed to the user (stderr) and the line to paste (stdout).
pub struct Solved {
    pub answer: String,
    pub summary: String,
}

fn get(agent: &ureq::Agent, url: &str) -> Result<(u16, String), String> {
    let response = agent
        .get(url)
        .header("Accept", "application/json")
        .call()
        .map_err(|e| format!("cannot fetch {url}: {e}"))?;
    let status = response.status().as_u16();
    let mut body = String::new();
    response
        .into_body()
        .into_reader()
        .take(MAX_BODY)
        .read_to_string(&mut body)
        .map_err(|e| format!("cannot read the answer of {url}: {e}"))?;
    Ok((status, body))
}

/// Fetches, verifies and solves the challenge at `url`.
pub fn solve(url: &str, timeout: Duration) -> Result<Solved, String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| format!("{url:?} is not a URL (http://host[:port]/path)"))?;
    let scheme = uri.scheme_str().unwrap_or("");
    if !matches!(scheme, "http" | "https") {
        return Err(format!("{url:?}: only http:// and https:// URLs"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url:?} names no host"))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let (status, body) = get(&agent, url)?;
    let package: Package = serde_json::from_str(&body).map_err(|_| {
        format!("{url} answered HTTP {status} without a challenge package: nothing to solve")
    })?;
    let jwks_url = format!("{scheme}://{authority}{JWKS_PATH}");
    let (status, body) = get(&agent, &jwks_url)?;
    let jwks: serde_json::Value = serde_json::from_str(&body)
        .map_err(|_| format!("{jwks_url} answered HTTP {status} without a key set"))?;
    let started = Instant::now();
    let (solution, proof) = solver::solve_package(&package, &jwks).map_err(|e| e.to_string())?;
    let payload =
        phantom_daemon::sentry::challenge::decode_payload(&package).map_err(|e| e.to_string())?;
    Ok(Solved {
        answer: proof.to_answer(),
        summary: format!(
            "signature verified (key {}); solved difficulty {} with {} hashes in {:.2} s. \
             Paste this line into the page's form:",
            package.kid,
            payload.difficulty,
            solution.hashes,
            started.elapsed().as_secs_f64()
        ),
    })
}

//! The challenge page's path for browsers without JavaScript (docs/sentry.md "Without
//! JavaScript"). The page's `<noscript>` parts offer, by the source's penalty level
//! ([`super::NoJsOffer`]):
//!
//! - a **delay**: a signed token the browser sends back after a few seconds, by itself (a
//!   `<meta http-equiv="refresh">`) or with a plain form;
//! - the **command-line solver**: `phantom-api sentry solve '<origin>/.sentry/challenge'`
//!   fetches a package for its address, verifies and solves it, and prints the proof as one
//!   line ([`Proof::to_answer`]), which the page's form takes back.
//!
//! Both end at `/.sentry/pass` ([`pass`]): a ticket cookie, the same as a solved proof earns,
//! and a `303` to the challenged URL; anything refused gets a small page that says why.
//! Everything here is server-side HTML under the challenge page's CSP (`form-action 'self'`);
//! a browser with JavaScript parses none of it.

use std::net::IpAddr;

use super::{
    NoJsOffer, ProofError, Sentry,
    challenge::{self, MAX_ANSWER_BYTES, PASS_PATH, Proof, Rejection, SOLVER_PATH},
    page::{self, Language, NoScript, escape_html},
    same_origin_target,
    store::unix_now,
};

/// Most fields a pass form may carry (it has two).
const MAX_FIELDS: usize = 8;

/// The command the page shows for `origin` (`scheme://host[:port]`).
pub fn command(origin: &str) -> String {
    format!("phantom-api sentry solve '{origin}{SOLVER_PATH}'")
}

/// The origin the browser asked for: `scheme://` and its `Host` header, when that is a plain
/// host name or address with an optional port (it goes into a shell command); else
/// `fallback`.
pub fn origin(scheme: &str, host: Option<&str>, fallback: &str) -> String {
    let plain = |h: &str| {
        !h.is_empty()
            && h.len() <= 255
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    };
    let host = host.filter(|h| plain(h)).unwrap_or(fallback);
    format!("{scheme}://{host}")
}

/// The `<noscript>` parts of the challenge page for `offer`. `target` is the challenged
/// request target; the answer form sends the browser back there.
pub fn noscript(offer: &NoJsOffer, lang: Language, origin: &str, target: &str) -> NoScript {
    let text = |key: &str, n: u64| escape_html(&page::nojs_text(lang, key, n));
    match offer {
        NoJsOffer::Delay { token, seconds } => {
            // A token is b64url and `.`: nothing to escape, but it is escaped all the same.
            let token = escape_html(token);
            NoScript {
                head: format!(
                    "<meta http-equiv=\"refresh\" content=\"{seconds};url={PASS_PATH}?token={token}\">"
                ),
                body: format!(
                    "<div id=\"sentry-nojs\" data-nojs=\"delay\"><p>{}</p>\
                     <form method=\"post\" action=\"{PASS_PATH}\">\
                     <input type=\"hidden\" name=\"token\" value=\"{token}\">\
                     <button type=\"submit\">{}</button></form></div>",
                    text("delay", *seconds),
                    text("continue", 0),
                ),
            }
        }
        NoJsOffer::Command => NoScript {
            head: String::new(),
            body: format!(
                "<div id=\"sentry-nojs\" data-nojs=\"command\"><p>{}</p>\
                 <pre><code id=\"sentry-command\">{}</code></pre>\
                 <form method=\"post\" action=\"{PASS_PATH}\">\
                 <input type=\"hidden\" name=\"to\" value=\"{}\">\
                 <label for=\"sentry-answer\">{}</label>\
                 <textarea id=\"sentry-answer\" name=\"answer\" rows=\"5\" maxlength=\"{MAX_ANSWER_BYTES}\" \
                 required autocomplete=\"off\" spellcheck=\"false\"></textarea>\
                 <button type=\"submit\">{}</button></form></div>",
                text("command", 0),
                escape_html(&command(origin)),
                escape_html(same_origin_target(target)),
                text("answer", 0),
                text("send", 0),
            ),
        },
    }
}

/// The fields of a pass request: its query (GET, the delay page's refresh) or its
/// `application/x-www-form-urlencoded` body (POST); at most [`MAX_FIELDS`].
pub fn form(bytes: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(bytes)
        .take(MAX_FIELDS)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// What the pass endpoint answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// A `303 See Other` to this path (with the ticket).
    pub location: Option<String>,
    pub set_cookie: Option<String>,
    /// Seconds, for `Retry-After`.
    pub retry_after: Option<u64>,
    /// An HTML page (empty with a redirect).
    pub body: String,
}

/// Which of the two a pass request redeems.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Delay,
    Answer,
}

/// `/.sentry/pass`: redeems the `token` field (a delay token) or the `answer` field (the
/// command-line solver's line, back to the `to` field's path). The caller has read at most
/// 16 KiB of body. `secure`: the listener speaks TLS (the cookie says `Secure`).
pub async fn pass(
    sentry: &Sentry,
    client: IpAddr,
    fields: &[(String, String)],
    lang: Language,
    secure: bool,
) -> Reply {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(token) = field("token") {
        return match sentry.redeem_delay(client, token).await {
            Ok((grant, target)) => Reply {
                status: 303,
                location: Some(target),
                set_cookie: Some(grant.set_cookie(secure)),
                retry_after: None,
                body: String::new(),
            },
            Err(ProofError::Rejected(Rejection::TooEarly)) => {
                let wait = challenge::delay_wait(token, unix_now()).max(1);
                // Tries again by itself once the time has come (the token is b64url and `.`).
                let refresh = format!(
                    "<meta http-equiv=\"refresh\" content=\"{wait};url={PASS_PATH}?token={}\">",
                    escape_html(token)
                );
                let mut r = refused(
                    lang,
                    Rejection::TooEarly.into(),
                    "too_early",
                    wait,
                    "/",
                    &refresh,
                );
                r.retry_after = Some(wait);
                r
            }
            Err(e) => refusal(lang, e, Kind::Delay, "/"),
        };
    }
    let back = same_origin_target(field("to").unwrap_or("/")).to_string();
    let Some(answer) = field("answer") else {
        let e = sentry.proof_failed(client, Rejection::Malformed).await;
        return refusal(lang, e, Kind::Answer, &back);
    };
    if answer.len() > MAX_ANSWER_BYTES {
        sentry.proof_failed(client, Rejection::Malformed).await;
        return refused(
            lang,
            Rejection::Malformed.into(),
            "too_long",
            MAX_ANSWER_BYTES as u64,
            &back,
            "",
        )
        .with_status(413);
    }
    let Some(proof) = Proof::from_answer(answer) else {
        let e = sentry.proof_failed(client, Rejection::Malformed).await;
        return refusal(lang, e, Kind::Answer, &back);
    };
    match sentry.redeem(client, &proof).await {
        Ok(grant) => Reply {
            status: 303,
            location: Some(back),
            set_cookie: Some(grant.set_cookie(secure)),
            retry_after: None,
            body: String::new(),
        },
        Err(e) => refusal(lang, e, Kind::Answer, &back),
    }
}

/// A request body over 16 KiB, cut short or too slow: refused with the page.
pub fn body_refused(lang: Language, status: u16) -> Reply {
    refused(
        lang,
        Rejection::Malformed.into(),
        "too_long",
        MAX_ANSWER_BYTES as u64,
        "/",
        "",
    )
    .with_status(status)
}

/// A refusal from the proof checks, as the page of its reason.
pub fn refusal_page(lang: Language, e: ProofError) -> Reply {
    refusal(lang, e, Kind::Delay, "/")
}

fn refusal(lang: Language, e: ProofError, kind: Kind, back: &str) -> Reply {
    let r = match e {
        ProofError::Rejected(r) => r,
        ProofError::Store(_) => {
            let why = Why {
                code: "UNAVAILABLE",
                status: 503,
            };
            return refused(lang, why, "unavailable", 0, back, "");
        }
    };
    let key = match r {
        Rejection::Malformed if kind == Kind::Answer => "malformed",
        Rejection::Malformed | Rejection::BadSignature => "invalid",
        Rejection::Expired => "expired",
        Rejection::WrongSubject => "other_address",
        Rejection::WrongProof => "wrong_answer",
        Rejection::Replayed => "replayed",
        Rejection::RateLimited => "rate_limited",
        Rejection::Blocked => "blocked",
        Rejection::TooEarly => "too_early",
    };
    refused(lang, r.into(), key, 0, back, "")
}

/// The reason a refusal page names (`data-error`) and its status.
#[derive(Clone, Copy)]
struct Why {
    code: &'static str,
    status: u16,
}

impl From<Rejection> for Why {
    fn from(r: Rejection) -> Self {
        Why {
            code: r.code(),
            status: r.status(),
        }
    }
}

impl Reply {
    fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
}

/// A small page that says why, with a link back; `head` goes into its `<head>`.
fn refused(lang: Language, why: Why, key: &str, n: u64, back: &str, head: &str) -> Reply {
    let text = |key: &str| escape_html(&page::nojs_text(lang, key, n));
    let body = format!(
        "<!doctype html>\n<html lang=\"{lang}\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex\">\n{head}<title>{title}</title>\n\
         <link rel=\"stylesheet\" href=\"{prefix}{version}/challenge.css\">\n</head>\n<body>\n\
         <main id=\"sentry\" data-state=\"error\" data-error=\"{code}\">\n<h1>{title}</h1>\n\
         <p id=\"sentry-error\" role=\"alert\">{message}</p>\n<p><a href=\"{back}\">{back_text}</a></p>\n\
         </main>\n</body>\n</html>\n",
        lang = lang.tag(),
        title = text("title"),
        prefix = page::STATIC_PREFIX,
        version = page::version(),
        code = why.code,
        message = text(key),
        back = escape_html(same_origin_target(back)),
        back_text = text("back"),
    );
    Reply {
        status: why.status,
        location: None,
        set_cookie: None,
        retry_after: None,
        body,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_command_names_this_origin_and_nothing_else() {
        assert_eq!(
            origin("http", Some("[::1]:18080"), "x"),
            "http://[::1]:18080"
        );
        assert_eq!(
            origin("https", Some("www.example.com"), "x"),
            "https://www.example.com"
        );
        for hostile in ["a'b", "a b", "a;rm -rf", "", "a/b", "a\"b"] {
            assert_eq!(
                origin("http", Some(hostile), "0.0.0.0:8080"),
                "http://0.0.0.0:8080"
            );
        }
        assert_eq!(
            command("http://[::1]:18080"),
            "phantom-api sentry solve 'http://[::1]:18080/.sentry/challenge'"
        );
    }

    #[test]
    fn the_noscript_parts_carry_the_offer() {
        let delay = noscript(
            &NoJsOffer::Delay {
                token: "abc.def".into(),
                seconds: 5,
            },
            Language::English,
            "http://h",
            "/x",
        );
        assert_eq!(
            delay.head,
            "<meta http-equiv=\"refresh\" content=\"5;url=/.sentry/pass?token=abc.def\">"
        );
        assert!(delay.body.contains("name=\"token\" value=\"abc.def\""));
        assert!(delay.body.contains("in 5 s"), "{}", delay.body);
        let cmd = noscript(
            &NoJsOffer::Command,
            Language::Turkish,
            "http://h:1",
            "/a?b=\"<c>\"",
        );
        assert!(cmd.head.is_empty());
        assert!(cmd.body.contains(
            "<code id=\"sentry-command\">phantom-api sentry solve &#39;http://h:1/.sentry/challenge&#39;</code>"
        ));
        assert!(cmd.body.contains("value=\"/a?b=&quot;&lt;c&gt;&quot;\""));
        assert!(cmd.body.contains("Gönder"));
        // Another origin's target is never a place to go back to.
        let evil = noscript(&NoJsOffer::Command, Language::English, "http://h", "//evil");
        assert!(evil.body.contains("name=\"to\" value=\"/\""));
    }

    #[test]
    fn forms_are_bounded() {
        let f = form(b"token=a.b&to=%2Fx%3Fy%3D1&answer=p+q");
        assert_eq!(f[0], ("token".into(), "a.b".into()));
        assert_eq!(f[1], ("to".into(), "/x?y=1".into()));
        assert_eq!(f[2], ("answer".into(), "p q".into()));
        assert_eq!(form("a=1&".repeat(100).as_bytes()).len(), MAX_FIELDS);
    }

    #[test]
    fn a_refusal_says_why_in_the_language() {
        let r = refusal(
            Language::English,
            ProofError::Rejected(Rejection::Replayed),
            Kind::Delay,
            "/",
        );
        assert_eq!(r.status, 409);
        assert!(r.body.contains("already been used"), "{}", r.body);
        assert!(r.body.contains("data-error=\"REPLAYED\""));
        let r = body_refused(Language::Turkish, 413);
        assert_eq!(r.status, 413);
        assert!(r.body.contains("Yanıt çok uzun"), "{}", r.body);
    }
}

//! `admin_frame`: what arrives on the admin socket, cut into frames, parsed into requests and
//! dispatched through the registry, whose parameter coercion every declared kind goes
//! through.

use std::sync::OnceLock;

use phantom_daemon::{
    admin::{
        registry::{ParamKind, ParamSpec, Registry},
        server::{Frame, parse_request, read_frame},
    },
    protocol::{MAX_FRAME_BYTES, Response},
    source::Source,
};
use serde_json::{Map, Value};

const NAME_MAX: usize = 32;
const COUNT: (i64, i64) = (-5, 1000);

fn specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::required("name", ParamKind::String { max_len: NAME_MAX }, "a name"),
        ParamSpec::optional(
            "count",
            ParamKind::Integer {
                min: COUNT.0,
                max: COUNT.1,
            },
            Some("5"),
            "a count",
        ),
        ParamSpec::optional("confirm", ParamKind::Boolean, None, "a flag"),
        ParamSpec::optional("address", ParamKind::IpAddr, None, "an address"),
        ParamSpec::optional("source", ParamKind::Source, None, "a source"),
    ]
}

/// A registry with one action taking a parameter of every kind (echoing what reached it) and
/// one taking none.
fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut r = Registry::new();
        r.module("fuzz", "fuzzing")
            .action(
                "fuzz",
                "echo",
                "echo",
                specs(),
                |p: Map<String, Value>| async move { Ok(Value::Object(p)) },
            )
            .action(
                "fuzz",
                "none",
                "no parameters",
                vec![],
                |p: Map<String, Value>| async move { Ok(Value::Object(p)) },
            );
        r
    })
}

/// What an action receives: exactly the declared parameters, each of its kind, in range.
fn check_params(data: &Value) {
    let obj = data.as_object().expect("parameters are an object");
    let specs = specs();
    for (name, value) in obj {
        let spec = specs
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("undeclared parameter {name} reached the action"));
        match spec.kind {
            ParamKind::String { max_len } => {
                let s = value.as_str().expect("a string");
                assert!(s.len() <= max_len && !s.chars().any(char::is_control));
            }
            ParamKind::Integer { min, max } => {
                let n = value.as_i64().expect("an integer");
                assert!((min..=max).contains(&n));
            }
            ParamKind::Boolean => assert!(value.is_boolean()),
            ParamKind::IpAddr => {
                let s = value.as_str().expect("an address");
                let ip: std::net::IpAddr = s.parse().expect("an address");
                assert_eq!(ip.to_string(), s, "addresses in their canonical spelling");
            }
            ParamKind::Source => {
                let s = value.as_str().expect("a source");
                let src: Source = s.parse().expect("a source");
                assert_eq!(src.to_string(), s, "sources in their canonical spelling");
            }
        }
    }
    assert!(obj.contains_key("name"), "a required parameter is there");
    assert!(obj.contains_key("count"), "a default is applied");
}

/// Input: bytes as a client writes them to the socket. Every frame gets an envelope that
/// serialises and reads back; a failure carries a code; a success passed only declared,
/// coerced parameters; an oversized frame ends the connection.
pub fn admin_frame(data: &[u8]) {
    crate::runtime().block_on(async {
        let mut reader = data;
        loop {
            let line = match read_frame(&mut reader).await.expect("reading a slice") {
                Frame::Eof => return,
                Frame::TooLarge => {
                    assert!(data.len() > MAX_FRAME_BYTES);
                    return;
                }
                Frame::Line(line) => line,
            };
            assert!(line.len() <= MAX_FRAME_BYTES);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let reply = match parse_request(&line) {
                Ok(request) => {
                    let echo = request.module == "fuzz" && request.action == "echo";
                    let (reply, outcome) = registry().dispatch(request).await;
                    assert_eq!(reply.success, outcome.success);
                    if reply.success && echo {
                        check_params(reply.data.as_ref().expect("data with a success"));
                    }
                    reply
                }
                Err(reply) => *reply,
            };
            assert_eq!(reply.success, reply.code.is_none(), "a failure has a code");
            let text = serde_json::to_string(&reply).expect("a reply serialises");
            assert!(!text.contains('\n'), "one reply, one line");
            let back: Response = serde_json::from_str(&text).expect("a reply reads back");
            assert_eq!(back, reply);
        }
    });
}

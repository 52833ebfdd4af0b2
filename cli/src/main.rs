//! `phantom-api <module> <action> [key=value ...]`: the admin CLI. Prints the daemon's JSON
//! reply; exits 0 on success and non-zero on failure, printing JSON either way.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use phantom_protocol::{self as protocol, Request, Response};
use serde_json::{Map, Value};

mod qr;
mod solve;

const DEFAULT_SOCKET: &str = "/run/phantom/phantom.sock";

/// Exit codes: 1 the daemon answered with a failure, 2 bad usage, 3 the daemon is unreachable.
const EXIT_FAILURE_REPLY: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

struct Args {
    socket: PathBuf,
    pretty: bool,
    /// Print the reply's `config` as a terminal QR code (export_client).
    qr: bool,
    timeout: Duration,
    help: bool,
    positional: Vec<String>,
}

fn usage() -> String {
    format!(
        "phantom-api {version}: drive phantomd over its admin socket\n\n\
         usage: phantom-api [options] <module> <action> [key=value ...]\n\
         \x20      phantom-api --help                 list modules and actions\n\
         \x20      phantom-api <module> --help        list a module's actions and parameters\n\
         \x20      phantom-api sentry solve <url>     solve a sentry challenge for a browser without\n\
         \x20                                         JavaScript; prints the line to paste into its page\n\n\
         parameters: key=value, or --key value / --key=value after the action;\n\
         \x20 `admin token create --name N --scope read --ttl 30d` is `admin token_create name=N ...`\n\n\
         options:\n\
         \x20 --socket PATH    admin socket (default: ${env} or {DEFAULT_SOCKET})\n\
         \x20 --pretty         indent the JSON reply\n\
         \x20 --qr             with export_client: draw the configuration as a QR code instead of JSON\n\
         \x20 --timeout SECS   how long to wait for the reply (default 60)\n\
         \x20 --version        print the CLI version\n\n\
         exit status: 0 success, {EXIT_FAILURE_REPLY} failure reply, {EXIT_USAGE} usage error, {EXIT_UNREACHABLE} daemon unreachable\n",
        version = protocol::VERSION,
        env = protocol::SOCKET_ENV,
    )
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        socket: std::env::var_os(protocol::SOCKET_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        pretty: false,
        qr: false,
        timeout: Duration::from_secs(60),
        help: false,
        positional: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--socket" => args.socket = it.next().ok_or("--socket needs a path")?.into(),
            "--pretty" => args.pretty = true,
            "--qr" => args.qr = true,
            "--timeout" => {
                let secs: u64 = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|s| *s > 0)
                    .ok_or("--timeout needs a positive number of seconds")?;
                args.timeout = Duration::from_secs(secs);
            }
            "-h" | "--help" => args.help = true,
            "-V" | "--version" => {
                println!("phantom-api {}", protocol::VERSION);
                std::process::exit(0);
            }
            s if s.starts_with("--socket=") => args.socket = s["--socket=".len()..].into(),
            // After `<module> <action>`, `--key value` and `--key=value` are parameters
            // (`admin token create --name ci --scope read --ttl 30d`).
            s if s.starts_with("--") && s.len() > 2 && args.positional.len() >= 2 => {
                let (key, value) = match s[2..].split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => {
                        let key = s[2..].to_string();
                        let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
                        (key, value)
                    }
                };
                args.positional
                    .push(format!("{}={value}", key.replace('-', "_")));
            }
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ => args.positional.push(arg),
        }
    }
    Ok(args)
}

fn call(args: &Args, request: &Request) -> Result<Response, String> {
    let stream = UnixStream::connect(&args.socket)
        .map_err(|e| format!("cannot connect to {}: {e}", args.socket.display()))?;
    stream
        .set_read_timeout(Some(args.timeout))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    // A daemon that refuses the connection (credentials, frame size) answers and closes
    // without reading the request, so a failed write may still leave its reply to read.
    let sent = (&stream).write_all(&line);
    let mut reply = String::new();
    let read = BufReader::new(&stream).read_line(&mut reply);
    if reply.is_empty() {
        return Err(match (sent, read) {
            (Err(e), _) => format!("cannot send the request: {e}"),
            (_, Err(e)) => format!("no reply from the daemon: {e}"),
            _ => "the daemon closed the connection without a reply".into(),
        });
    }
    serde_json::from_str(&reply).map_err(|e| format!("unreadable reply from the daemon: {e}"))
}

fn print_json(value: &impl serde::Serialize, pretty: bool) {
    let text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    };
    match text {
        Ok(t) => println!("{t}"),
        Err(e) => eprintln!("phantom-api: cannot print the reply: {e}"),
    }
}

fn print_help(args: &Args) -> ExitCode {
    let describe = Request {
        module: protocol::DESCRIBE_MODULE.into(),
        action: protocol::DESCRIBE_ACTION.into(),
        params: Map::new(),
    };
    let api = match call(args, &describe) {
        Ok(Response {
            success: true,
            data: Some(d),
            ..
        }) => d,
        Ok(r) => {
            print!("{}", usage());
            eprintln!(
                "\nphantom-api: the daemon did not describe its API: {:?}",
                r.error
            );
            return ExitCode::from(EXIT_UNREACHABLE);
        }
        Err(e) => {
            print!("{}", usage());
            eprintln!("\nphantom-api: {e}; cannot list modules and actions");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let empty = Map::new();
    let modules = api["modules"].as_object().unwrap_or(&empty);
    match args.positional.first() {
        None => {
            print!("{}", usage());
            println!(
                "\nmodules and actions (daemon {}):",
                api["version"].as_str().unwrap_or("?")
            );
            for (name, m) in modules {
                println!("\n  {name:<10} {}", m["summary"].as_str().unwrap_or(""));
                for (action, a) in m["actions"].as_object().unwrap_or(&empty) {
                    println!("    {action:<22} {}", a["summary"].as_str().unwrap_or(""));
                }
            }
            ExitCode::SUCCESS
        }
        Some(module) => {
            let Some(m) = modules.get(module) else {
                eprintln!("phantom-api: unknown module {module:?}; run phantom-api --help");
                return ExitCode::from(EXIT_USAGE);
            };
            println!("{module}: {}\n", m["summary"].as_str().unwrap_or(""));
            let wanted = args.positional.get(1);
            for (action, a) in m["actions"].as_object().unwrap_or(&empty) {
                if wanted.is_some_and(|w| w != action) {
                    continue;
                }
                println!("  phantom-api {module} {action}");
                println!("      {}", a["summary"].as_str().unwrap_or(""));
                for p in a["params"].as_array().into_iter().flatten() {
                    let required = if p["required"].as_bool() == Some(true) {
                        "required".to_string()
                    } else {
                        match p["default"].as_str() {
                            Some(d) => format!("default {d}"),
                            None => "optional".to_string(),
                        }
                    };
                    println!(
                        "      {}=<{}>  {} ({required})",
                        p["name"].as_str().unwrap_or("?"),
                        p["type"].as_str().unwrap_or("?"),
                        p["help"].as_str().unwrap_or(""),
                    );
                }
                println!();
            }
            ExitCode::SUCCESS
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("phantom-api: {e}\n\n{}", usage());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // A local command: the challenge comes from the site, not from the admin socket.
    if !args.help
        && args.positional.first().map(String::as_str) == Some("sentry")
        && args.positional.get(1).map(String::as_str) == Some("solve")
    {
        let [_, _, url] = args.positional.as_slice() else {
            eprintln!("phantom-api: usage: phantom-api sentry solve <url>");
            return ExitCode::from(EXIT_USAGE);
        };
        return match solve::solve(url, args.timeout) {
            Ok(solved) => {
                eprintln!("{}", solved.summary);
                println!("{}", solved.answer);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("phantom-api: sentry solve: {e}");
                ExitCode::from(EXIT_FAILURE_REPLY)
            }
        };
    }
    if args.help || args.positional.len() < 2 {
        if !args.help {
            eprint!("{}", usage());
            return ExitCode::from(EXIT_USAGE);
        }
        return print_help(&args);
    }
    let module = args.positional[0].clone();
    let mut action = args.positional[1].clone();
    let mut first_param = 2;
    // `admin token create|list|revoke` is `admin token_create|token_list|token_revoke`.
    if module == "admin"
        && action == "token"
        && let Some(sub) = args.positional.get(2).filter(|s| !s.contains('='))
    {
        action = format!("token_{sub}");
        first_param = 3;
    }
    let mut params = Map::new();
    for kv in &args.positional[first_param..] {
        let Some((key, value)) = kv.split_once('=') else {
            eprintln!("phantom-api: parameter {kv:?} is not key=value");
            return ExitCode::from(EXIT_USAGE);
        };
        if key.is_empty() {
            eprintln!("phantom-api: parameter {kv:?} has an empty key");
            return ExitCode::from(EXIT_USAGE);
        }
        params.insert(key.to_string(), Value::String(value.to_string()));
    }
    let request = Request {
        module: module.clone(),
        action: action.clone(),
        params,
    };
    match call(&args, &request) {
        Ok(reply) if args.qr && reply.success => {
            let Some(config) = reply.data.as_ref().and_then(|d| d["config"].as_str()) else {
                eprintln!("phantom-api: --qr needs a reply with a config (core export_client)");
                return ExitCode::from(EXIT_USAGE);
            };
            match qr::terminal(config) {
                Ok(code) => {
                    println!("{code}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("phantom-api: {e}");
                    ExitCode::from(EXIT_FAILURE_REPLY)
                }
            }
        }
        Ok(reply) => {
            print_json(&reply, args.pretty);
            if reply.success {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE_REPLY)
            }
        }
        Err(e) => {
            // Scripts parse stdout with jq, so even this failure is an envelope.
            print_json(
                &Response::fail(&module, &action, "DAEMON_UNREACHABLE", e.clone()),
                args.pretty,
            );
            eprintln!("phantom-api: {e}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}

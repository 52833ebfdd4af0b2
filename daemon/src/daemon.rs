//! The daemon's life: the domains built in a fixed order and wired through the handles each
//! one asks for, signal handling, reload, clean shutdown. Nothing here does a domain's work.

use std::{
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminMetrics, Registry, server::AdminServer},
    blocklist::{self, Blocklist},
    config::{Config, parse_listen},
    core::{self, Server},
    datapath::{self, Datapath},
    dns::{self, Resolver, upstreams::Upstreams},
    error::Error,
    ghost::{self, Ghost},
    http,
    logging::{self, LogControl},
    metrics::{self, Metrics},
    multihop::{self, EgressMark, Multihop},
    notify,
    open_files::{self, OpenFiles},
    policy, protocol,
    sentry::{self, Sentry},
};

pub struct Options {
    pub config_path: PathBuf,
    pub state_dir: Option<PathBuf>,
}

/// Why the daemon could not start (or stopped with an error): the domain's own error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds the state directory's lock.
    #[error("another phantomd is running with state directory {}", state_dir.display())]
    AlreadyRunning { state_dir: PathBuf },
    /// A start-up step run on a blocking thread did not finish.
    #[error("{step}: {source}")]
    Task {
        step: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error(transparent)]
    Core(#[from] core::CoreError),
    #[error(transparent)]
    Blocklist(#[from] blocklist::BlocklistError),
    #[error(transparent)]
    Dns(#[from] dns::DnsError),
    #[error(transparent)]
    Logging(#[from] logging::LogError),
    #[error(transparent)]
    Sentry(#[from] sentry::SentryError),
    #[error(transparent)]
    Daemon(#[from] Error),
}

fn load_config(opts: &Options) -> Result<(Config, bool), Error> {
    let (config, created) = Config::load_or_create(&opts.config_path)?;
    Ok((with_state_dir(opts, config)?, created))
}

/// The `--state-dir` override over a loaded file.
fn with_state_dir(opts: &Options, mut config: Config) -> Result<Config, Error> {
    if let Some(dir) = &opts.state_dir {
        config.state_dir = dir.clone();
        config.validate()?;
    }
    Ok(config)
}

/// The file again for SIGHUP: a missing file is refused like an invalid one (never replaced
/// by the defaults, which would drop the sources and, at the next start, the state directory).
fn reload_config(opts: &Options) -> Result<Config, Error> {
    let text =
        std::fs::read_to_string(&opts.config_path).map_err(|e| Error::io(&opts.config_path, e))?;
    with_state_dir(opts, Config::from_toml(&text)?)
}

/// Creates the state directory (0700) and takes an exclusive lock on it, so two daemons can
/// never share one state directory.
fn lock_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(dir, e))?;
    let lock_path = dir.join("phantomd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(&lock_path, e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        DaemonError::AlreadyRunning {
            state_dir: dir.to_path_buf(),
        }
    })
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(opts: Options) -> Result<(), DaemonError> {
    let (config, created) = load_config(&opts)?;
    let logs = logging::init(
        &config.log.level,
        config.log.keep_lines,
        config.log.format == crate::config::LogFormat::Json,
    )?;
    if created {
        info!(path = %opts.config_path.display(), "wrote the default configuration");
    }
    info!(version = protocol::VERSION, config = %opts.config_path.display(), "phantomd starting");
    let _lock = lock_state_dir(&config.state_dir)?;
    let open_files = raise_open_files();

    let datapath = if config.datapath.enabled {
        let vpn = config.datapath.vpn_interface(&config.wireguard);
        Some(Arc::new(Datapath::start(
            &config.datapath,
            vpn,
            &config.state_dir,
            config.sources.ipv6_prefix,
        )?))
    } else {
        warn!("datapath disabled by configuration: no XDP guard");
        None
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("phantomd")
        .build()
        .map_err(Error::Socket)?;
    let result = runtime.block_on(serve(opts, config, logs, datapath.clone(), open_files));

    // The runtime's tasks hold clones of the datapath handle; drop them before detaching.
    drop(runtime);
    if let Some(dp) = datapath {
        match Arc::try_unwrap(dp) {
            Ok(dp) => dp.shutdown(),
            Err(_) => error!("datapath still referenced at shutdown; leaving the XDP link pinned"),
        }
    }
    info!("phantomd stopped");
    result
}

/// Raises `RLIMIT_NOFILE` as far as the hard limit allows and says so.
fn raise_open_files() -> OpenFiles {
    match open_files::raise() {
        Ok(raised) => {
            if raised.limit > raised.started_with {
                info!(
                    from = raised.started_with,
                    to = raised.limit,
                    "RLIMIT_NOFILE raised to the hard limit"
                );
            }
            raised
        }
        Err(e) => {
            warn!(error = %e, "cannot raise RLIMIT_NOFILE; keeping the limit the daemon was started with");
            open_files::current().unwrap_or(OpenFiles {
                limit: 0,
                hard: 0,
                started_with: 0,
            })
        }
    }
}

/// Descriptors each enabled listener's connection caps may hold (docs/architecture.md, "The
/// HTTP layer"), and the rest of the daemon's.
fn descriptor_needs(
    config: &Config,
    resolver_on: bool,
    ghost_on: bool,
    sentry_on: bool,
) -> Result<Vec<open_files::Need>, Error> {
    use open_files::Need;
    let mut needs = vec![Need {
        what: "admin socket",
        descriptors: config.admin.max_connections as u64,
    }];
    if config.metrics.listen_addr()?.is_some() {
        needs.push(Need {
            what: "metrics",
            descriptors: http::Limits::metrics().max_connections as u64,
        });
    }
    if config.admin.http_listen_addr()?.is_some() {
        needs.push(Need {
            what: "admin API",
            descriptors: http::Limits::admin_api().max_connections as u64,
        });
    }
    if config.blocklist.enabled
        && parse_listen("blocklist.api_listen", &config.blocklist.api_listen)?.is_some()
    {
        needs.push(Need {
            what: "blocklist API",
            descriptors: http::Limits::blocklist_api().max_connections as u64,
        });
    }
    if sentry_on {
        // Each client connection may hold one to the upstream as well.
        needs.push(Need {
            what: "sentry proxy",
            descriptors: 2 * http::Limits::sentry_proxy(config.sentry.max_body_bytes)
                .max_connections as u64,
        });
    }
    if ghost_on {
        // Each open tunnel is a TCP connection and a UDP socket to WireGuard; connections
        // still in TLS or the upgrade hold one each, up to the handshake cap.
        needs.push(Need {
            what: "ghost relay",
            descriptors: 2 * config
                .ghost
                .tunnels_per_secret
                .min(ghost::relay::MAX_TUNNELS) as u64
                + http::Limits::ghost_relay().max_connections as u64,
        });
    }
    if resolver_on {
        let addresses = config.dns.listen_addrs()?.map_or(1, |a| a.len().max(1));
        needs.push(Need {
            what: "resolver TCP",
            descriptors: (addresses * dns::server::MAX_TCP_CONNECTIONS) as u64,
        });
    }
    needs.push(Need {
        what: "other",
        descriptors: open_files::RESERVE,
    });
    Ok(needs)
}

async fn serve(
    opts: Options,
    config: Config,
    logs: LogControl,
    datapath: Option<Arc<Datapath>>,
    open_files: OpenFiles,
) -> Result<(), DaemonError> {
    let started_at = time::OffsetDateTime::now_utc();
    let started = std::time::Instant::now();
    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let top_sources = Arc::new(AtomicUsize::new(config.metrics.top_sources));

    // The domains, each built from the ones below it.
    let server = if config.wireguard.enabled {
        Some(Arc::new(
            Server::start(&config.wireguard, &config.state_dir).await?,
        ))
    } else {
        info!("WireGuard server disabled by configuration");
        None
    };
    if let (Some(dp), Some(_)) = (datapath.clone(), server.as_ref()) {
        // The VPN interface exists now: put the TC programs on it without waiting.
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || dp.reconcile_vpn()).await {
            warn!(error = %e, "cannot attach the VPN-interface programs yet");
        }
    }
    let clients = server
        .as_ref()
        .map_or_else(core::no_clients, |s| s.clients());
    let blocklist = if config.blocklist.enabled {
        let (state_dir, threshold, brands, dp) = (
            config.state_dir.clone(),
            config.blocklist.threshold,
            config.blocklist.lookalike_brands(),
            datapath.clone(),
        );
        let list = tokio::task::spawn_blocking(move || {
            Blocklist::open(&state_dir, threshold, &brands, dp)
        })
        .await
        .map_err(|source| DaemonError::Task {
            step: "blocklist start",
            source,
        })??;
        list.apply_live(&config.blocklist);
        Some(Arc::new(list))
    } else {
        None
    };
    if let Some(dp) = datapath.clone() {
        // Every owner of the kernel's domain set has synced: what none claimed goes.
        match tokio::task::spawn_blocking(move || dp.domains.release_unclaimed()).await {
            Ok(Ok(report)) if report.deleted > 0 => info!(
                deleted = report.deleted,
                "kernel domain set: rules no owner claimed since the start removed"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "cannot remove the kernel domain set's unclaimed rules")
            }
            Err(e) => warn!(error = %e, "removing the kernel domain set's unclaimed rules failed"),
        }
    }
    let upstreams = Arc::new(Upstreams::open(&config.dns, &config.state_dir)?);
    let egress_mark = EgressMark::default();
    let resolver = if config.dns.listen_addrs()?.is_some_and(|l| l.is_empty())
        || (config.dns.listen.trim() == "auto" && server.is_none())
    {
        info!("DNS resolver off ([dns] listen, or no WireGuard server for \"auto\")");
        None
    } else {
        if config.dns.listen.trim() == "auto" {
            // The resolver serves the tunnel: client configurations name it.
            upstreams.serve_tunnel();
        }
        Some(Arc::new(Resolver::open(
            &config.dns,
            &config.state_dir,
            blocklist.clone(),
            Arc::clone(&upstreams),
            clients.clone(),
            datapath.clone(),
            egress_mark.clone(),
        )?))
    };
    let client_policy = match server {
        Some(_) => Some(policy::ClientPolicy::open(
            &config.state_dir,
            &config.limits,
            clients.clone(),
            datapath.clone(),
        )?),
        None => None,
    };
    let ghost = match server.clone() {
        Some(server) => Some(Arc::new(Ghost::open(
            &config.ghost,
            config.sources.ipv6_prefix,
            &config.state_dir,
            server,
        )?)),
        None => None,
    };
    let multihop = match Multihop::start(
        &config,
        server.clone(),
        datapath.clone(),
        egress_mark.clone(),
    )
    .await
    {
        Ok(m) => Some(m),
        Err(e) => {
            error!(error = %e, "multihop cannot start; its actions answer UNAVAILABLE");
            None
        }
    };
    let sentry = if config.sentry.enabled {
        Some(
            Sentry::open(
                &config.sentry,
                config.sources.ipv6_prefix,
                &config.state_dir,
                datapath.clone(),
            )
            .await?,
        )
    } else {
        None
    };

    // Descriptors: the caps of what is on must fit under the limit.
    let needs = descriptor_needs(
        &config,
        resolver.is_some(),
        ghost.is_some(),
        sentry.is_some(),
    )?;
    if let Some(line) = open_files::shortfall(open_files.limit, &needs) {
        warn!("{line}");
    }

    // The socket: every domain's actions, given the handles they need.
    let mut registry = Registry::new();
    core::actions::register(
        &mut registry,
        Arc::new(core::actions::Handles {
            server: server.clone(),
            wireguard: config.wireguard.clone(),
            datapath: datapath.clone(),
            logs: logs.recent.clone(),
            daemon: core::actions::DaemonInfo {
                config_path: opts.config_path.clone(),
                state_dir: config.state_dir.clone(),
                started_at,
                started,
                open_files_limit: open_files.limit,
                open_files_needed: open_files::needed(&needs),
            },
            client_dns: upstreams.client_dns(),
            subnet_holds: subnet_holds(ghost.clone(), multihop.clone()),
            export_route: ghost
                .clone()
                .map(|g| -> core::actions::ExportRoute { Box::new(move || g.client_route()) }),
        }),
    );
    policy::actions::register(
        &mut registry,
        Arc::new(policy::actions::Handles {
            policy: client_policy.clone(),
        }),
    );
    datapath::actions::register(
        &mut registry,
        Arc::new(datapath::actions::Handles {
            datapath: datapath.clone(),
            config: config.datapath.clone(),
            client_subnet: config.wireguard.subnet.clone(),
        }),
    );
    blocklist::actions::register(
        &mut registry,
        Arc::new(blocklist::actions::Handles {
            list: blocklist.clone(),
            datapath: datapath.clone(),
        }),
    );
    dns::actions::register(
        &mut registry,
        Arc::new(dns::actions::Handles {
            upstreams: Arc::clone(&upstreams),
            resolver: resolver.clone(),
            blocklist_on: blocklist.is_some(),
            datapath: datapath.clone(),
            clients: clients.clone(),
        }),
    );
    ghost::actions::register(
        &mut registry,
        Arc::new(ghost::actions::Handles {
            ghost: ghost.clone(),
            client_dns: upstreams.client_dns(),
        }),
    );
    multihop::actions::register(
        &mut registry,
        Arc::new(multihop::actions::Handles {
            multihop: multihop.clone(),
        }),
    );
    sentry::actions::register(
        &mut registry,
        Arc::new(sentry::actions::Handles {
            sentry: sentry.clone(),
        }),
    );
    // The HTTPS API's tokens and the audit log (both transports' writes); the admin module.
    let admin_dir = config.state_dir.join("admin");
    let tokens = Arc::new(admin::tokens::Tokens::open(
        &admin_dir,
        registry
            .module_names()
            .into_iter()
            .map(String::from)
            .collect(),
    )?);
    let audit = Arc::new(admin::audit::AuditLog::open(
        &admin_dir,
        config.admin.audit_max_bytes,
    )?);
    admin::actions::register(
        &mut registry,
        Arc::new(admin::actions::Handles {
            tokens: Arc::clone(&tokens),
            audit: Arc::clone(&audit),
        }),
    );
    for (module, action) in registry.unknown_reads() {
        warn!(
            module,
            action, "an action listed as read-only is not registered"
        );
    }
    let registry = Arc::new(registry);

    // Metrics: every domain's collector.
    let mut metrics = Metrics::new();
    let admin_metrics = AdminMetrics::register(&mut metrics);
    metrics.add_collector(Box::new(metrics::HttpCollector));
    if let Some(dp) = datapath.clone() {
        metrics.add_collector(Box::new(datapath::metrics::DatapathCollector {
            datapath: dp,
            top_sources: Arc::clone(&top_sources),
        }));
    }
    if let Some(s) = server.clone() {
        metrics.add_collector(Box::new(core::metrics::WireguardCollector {
            server: s,
            max_clients: config.metrics.client_series,
        }));
    }
    if let Some(p) = client_policy.clone() {
        metrics.add_collector(Box::new(policy::metrics::LimitsCollector {
            policy: p,
            max_clients: config.metrics.client_series,
        }));
    }
    if let Some(r) = resolver.clone() {
        metrics.add_collector(Box::new(dns::metrics::ResolverCollector { resolver: r }));
    }
    if let Some(list) = blocklist.clone() {
        metrics.add_collector(Box::new(blocklist::metrics::BlocklistCollector { list }));
    }
    if let Some(g) = ghost.clone() {
        metrics.add_collector(Box::new(ghost::metrics::GhostCollector { ghost: g }));
    }
    if let Some(m) = multihop.clone() {
        metrics.add_collector(Box::new(multihop::metrics::MultihopCollector::new(m)));
    }
    if let Some(s) = sentry.clone() {
        metrics.add_collector(Box::new(sentry::metrics::SentryCollector { sentry: s }));
    }
    admin_metrics.register_actions(&registry.actions());
    let metrics = Arc::new(metrics);

    // The listeners.
    let admin = AdminServer::bind(
        &config.admin.socket,
        &config.admin.group,
        config.admin.max_connections,
        Duration::from_secs(config.admin.idle_timeout_seconds),
        Arc::clone(&registry),
        admin_metrics,
    )
    .await?
    .with_audit(Arc::clone(&audit));
    let admin_task = tokio::spawn(admin.serve(shutdown.clone()));
    let mut listeners: Vec<JoinHandle<()>> = Vec::new();
    if let (Some(list), Some(addr)) = (
        blocklist.clone(),
        parse_listen("blocklist.api_listen", &config.blocklist.api_listen)?,
    ) {
        listeners.push(
            blocklist::api::serve(
                addr,
                list,
                http::Limits::blocklist_api().with_source_prefix(config.sources.ipv6_prefix),
                shutdown.clone(),
            )
            .await?,
        );
    }
    if let Some(addr) = config.admin.http_listen_addr()? {
        let tls = admin::web::tls::load(
            &config.admin.tls_cert,
            &config.admin.tls_key,
            &admin_dir.join("tls"),
            addr,
        )?;
        listeners.push(
            admin::web::serve(
                addr,
                tls,
                Arc::clone(&registry),
                admin::web::Settings {
                    tokens: Arc::clone(&tokens),
                    audit: Arc::clone(&audit),
                    allow: config.admin.http_allow_nets()?,
                    rate_per_token: config.admin.http_rate_per_token,
                    rate_per_source: config.admin.http_rate_per_source,
                    source_prefix: config.sources.ipv6_prefix,
                },
                http::Limits::admin_api().with_source_prefix(config.sources.ipv6_prefix),
                shutdown.clone(),
            )
            .await?,
        );
    }
    if let Some(addr) = config.metrics.listen_addr()? {
        listeners.push(
            metrics::serve(
                addr,
                Arc::clone(&metrics),
                http::Limits::metrics().with_source_prefix(config.sources.ipv6_prefix),
                shutdown.clone(),
            )
            .await?,
        );
    }

    // Each domain's background work.
    if let Some(s) = &sentry {
        tasks.extend(s.start_tasks(&shutdown).await?);
    }
    if let Some(dp) = &datapath {
        tasks.extend(dp.start_tasks(&shutdown));
    }
    if let Some(s) = &server {
        tasks.extend(s.start_tasks(&shutdown));
    }
    if let Some(r) = &resolver {
        tasks.extend(r.start_tasks(&shutdown));
    }
    if let Some(p) = &client_policy {
        tasks.extend(p.start_tasks(&shutdown));
    }
    if let Some(list) = &blocklist {
        tasks.extend(list.start_tasks(&shutdown));
    }
    if let Some(g) = &ghost {
        // A relay for the sentry's TLS port joins it rather than binding its own.
        if let Some(port) = sentry.as_ref().and_then(|s| s.shared_port.get()) {
            g.share_port(Arc::clone(port));
        }
        // An acknowledged enable survives restarts and kill -9.
        g.restore().await;
    }
    if let Some(m) = &multihop {
        tasks.extend(m.start_tasks(&shutdown));
    }
    info!("phantomd ready");
    notify::ready();
    tasks.extend(notify::start_watchdog(&shutdown));

    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Socket)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Socket)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(Error::Socket)?;
    let mut running = config;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sighup.recv() => {
                reload(
                    &opts,
                    &mut running,
                    &logs,
                    &top_sources,
                    blocklist.as_deref(),
                    client_policy.as_deref(),
                );
            }
        }
    }
    notify::stopping();
    let _ = shutdown_tx.send(true);
    if let Err(e) = admin_task.await {
        warn!(error = %e, "admin server task failed");
    }
    // The resolver's worker threads hold the datapath too: wait until every task has stopped.
    for task in tasks {
        if let Err(e) = task.await {
            warn!(error = %e, "a background task failed");
        }
    }
    if let Some(g) = &ghost {
        g.shutdown().await;
    }
    if let Some(m) = multihop {
        // The exit interface goes; the rule and the fail-closed route stay until next start.
        let _ = tokio::task::spawn_blocking(move || m.shutdown()).await;
    }
    if let Some(server) = server {
        // Traffic persisted, NAT removed, interface gone (the embedded device takes ~2 s).
        let _ = tokio::task::spawn_blocking(move || server.shutdown()).await;
    }
    if let Some(sentry) = sentry.clone() {
        // Flushing the embedded store waits on its journal writer: off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || sentry.shutdown()).await;
    }
    for task in listeners {
        if let Err(e) = task.await {
            warn!(error = %e, "a listener task failed");
        }
    }
    Ok(())
}

/// Who holds the client subnet, for core's `change_subnet`: ghost mode (the exported configs
/// route around the server's address) and multihop (the exit's NAT and the kernel mark follow
/// the subnet). Both always appear in `get_subnet_info`, held or not.
fn subnet_holds(
    ghost: Option<Arc<Ghost>>,
    multihop: Option<Arc<Multihop>>,
) -> Vec<core::actions::SubnetHold> {
    vec![
        core::actions::SubnetHold {
            name: "ghost_mode",
            refusal: "ghost mode is on: disable it (phantom-api ghost disable) before changing the subnet",
            held: Box::new(move || ghost.as_ref().is_some_and(|g| g.is_active())),
        },
        core::actions::SubnetHold {
            name: "multihop",
            refusal: "multihop is on: the exit's NAT and the kernel mark follow the client subnet; disable multihop first",
            held: Box::new(move || multihop.as_ref().is_some_and(|m| m.is_enabled())),
        },
    ]
}

/// SIGHUP: re-reads the file and applies what can change live; an invalid file changes nothing.
fn reload(
    opts: &Options,
    running: &mut Config,
    logs: &LogControl,
    top_sources: &AtomicUsize,
    blocklist: Option<&Blocklist>,
    client_policy: Option<&policy::ClientPolicy>,
) {
    let new = match reload_config(opts) {
        Ok(config) => config,
        Err(e) => {
            error!(error = %e, "SIGHUP: configuration rejected, keeping the running one");
            return;
        }
    };
    let old = running.clone();
    if let Err(e) = logs.set_level(&new.log.level) {
        error!(error = %e, "SIGHUP: configuration rejected, keeping the running one");
        return;
    }
    logs.recent.set_capacity(new.log.keep_lines);
    top_sources.store(new.metrics.top_sources, Ordering::Relaxed);
    // Blocklist sources, their schedule and the lookalike brands apply at once.
    if let Some(list) = blocklist {
        list.apply_live(&new.blocklist);
    }
    running.log.level = new.log.level.clone();
    running.log.keep_lines = new.log.keep_lines;
    running.metrics.top_sources = new.metrics.top_sources;
    running.blocklist.sources = new.blocklist.sources.clone();
    running.blocklist.sync_interval_seconds = new.blocklist.sync_interval_seconds;
    running.blocklist.lookalike = new.blocklist.lookalike;
    running.blocklist.brands = new.blocklist.brands.clone();
    // The clients' limit defaults apply at once.
    if let Some(p) = client_policy {
        p.set_defaults(&new.limits);
    }
    running.limits = new.limits.clone();
    // Everything else needs a restart; say which sections differ.
    let mut rest = new;
    rest.log.level = old.log.level.clone();
    rest.log.keep_lines = old.log.keep_lines;
    rest.metrics.top_sources = old.metrics.top_sources;
    rest.blocklist.sources = old.blocklist.sources.clone();
    rest.blocklist.sync_interval_seconds = old.blocklist.sync_interval_seconds;
    rest.blocklist.lookalike = old.blocklist.lookalike;
    rest.blocklist.brands = old.blocklist.brands.clone();
    rest.limits = old.limits.clone();
    let pending: Vec<&str> = [
        ("state_dir", rest.state_dir != old.state_dir),
        ("log", rest.log != old.log),
        ("admin", rest.admin != old.admin),
        ("metrics", rest.metrics != old.metrics),
        ("datapath", rest.datapath != old.datapath),
        ("wireguard", rest.wireguard != old.wireguard),
        ("dns", rest.dns != old.dns),
        ("blocklist", rest.blocklist != old.blocklist),
        ("sentry", rest.sentry != old.sentry),
        ("ghost", rest.ghost != old.ghost),
        ("multihop", rest.multihop != old.multihop),
        ("sources", rest.sources != old.sources),
    ]
    .into_iter()
    .filter_map(|(name, differs)| differs.then_some(name))
    .collect();
    if pending.is_empty() {
        info!("SIGHUP: configuration reloaded");
    } else {
        warn!(sections = ?pending, "SIGHUP: configuration reloaded; these sections take effect at the next restart");
    }
}

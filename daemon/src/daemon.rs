//! The daemon's life: start-up in a fixed order, signal handling, reload, clean shutdown.

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
};
use tracing::{error, info, warn};

use crate::{
    admin::{Registry, server::AdminServer},
    config::Config,
    context::Context,
    datapath::{self, Datapath},
    error::Error,
    logging::{self, LogControl},
    metrics::{self, Metrics},
    protocol,
};

pub struct Options {
    pub config_path: PathBuf,
    pub state_dir: Option<PathBuf>,
}

fn load_config(opts: &Options) -> Result<(Config, bool), Error> {
    let (mut config, created) = Config::load_or_create(&opts.config_path)?;
    if let Some(dir) = &opts.state_dir {
        config.state_dir = dir.clone();
        config.validate()?;
    }
    Ok((config, created))
}

/// Creates the state directory (0700) and takes an exclusive lock on it, so two daemons can
/// never share one state directory.
fn lock_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
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
        Error::Other(format!(
            "another phantomd is running with state directory {}",
            dir.display()
        ))
    })
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(opts: Options) -> Result<(), Error> {
    let (config, created) = load_config(&opts)?;
    let logs = logging::init(&config.log.level, config.log.keep_lines)?;
    if created {
        info!(path = %opts.config_path.display(), "wrote the default configuration");
    }
    info!(version = protocol::VERSION, config = %opts.config_path.display(), "phantomd starting");
    let _lock = lock_state_dir(&config.state_dir)?;

    let datapath = if config.datapath.enabled {
        let vpn = config.datapath.vpn_interface(&config.wireguard);
        Some(Arc::new(Datapath::start(
            &config.datapath,
            vpn,
            &config.state_dir,
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
    let result = runtime.block_on(serve(opts, config, logs, datapath.clone()));

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

async fn serve(
    opts: Options,
    config: Config,
    logs: LogControl,
    datapath: Option<Arc<Datapath>>,
) -> Result<(), Error> {
    let top_sources = Arc::new(AtomicUsize::new(config.metrics.top_sources));
    let wireguard = if config.wireguard.enabled {
        let server = crate::core::Server::start(&config.wireguard, &config.state_dir).await?;
        Some(Arc::new(server))
    } else {
        info!("WireGuard server disabled by configuration");
        None
    };
    if let (Some(dp), Some(_)) = (datapath.clone(), wireguard.as_ref()) {
        // The VPN interface exists now: put the TC programs on it without waiting.
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || dp.reconcile_vpn()).await {
            warn!(error = %e, "cannot attach the VPN-interface programs yet");
        }
    }
    let blocklist = if config.blocklist.enabled {
        let (state_dir, threshold, brands, dp) = (
            config.state_dir.clone(),
            config.blocklist.threshold,
            config.blocklist.lookalike_brands(),
            datapath.clone(),
        );
        let list = tokio::task::spawn_blocking(move || {
            crate::blocklist::Blocklist::open(&state_dir, threshold, &brands, dp)
        })
        .await
        .map_err(|e| Error::Other(format!("blocklist start: {e}")))??;
        Some(Arc::new(list))
    } else {
        None
    };
    let ghost = match wireguard.clone() {
        Some(server) => Some(Arc::new(crate::ghost::Ghost::open(
            &config.ghost,
            &config.state_dir,
            server,
        )?)),
        None => None,
    };
    let dns = Arc::new(crate::dns::Dns::open(&config.dns, &config.state_dir)?);
    let resolver = if config.dns.listen_addrs()?.is_some_and(|l| l.is_empty())
        || (config.dns.listen.trim() == "auto" && wireguard.is_none())
    {
        info!("DNS resolver off ([dns] listen, or no WireGuard server for \"auto\")");
        None
    } else {
        Some(Arc::new(crate::resolver::Resolver::open(
            &config.dns,
            &config.state_dir,
            blocklist.clone(),
            Arc::clone(&dns),
            wireguard.clone(),
            datapath.clone(),
        )?))
    };
    let sentry = if config.sentry.enabled {
        Some(
            crate::sentry::Sentry::open(&config.sentry, &config.state_dir, datapath.clone())
                .await
                .map_err(|e| Error::Other(e.to_string()))?,
        )
    } else {
        None
    };
    let ctx = Arc::new(
        Context::new(
            config.clone(),
            opts.config_path.clone(),
            logs.recent.clone(),
            datapath.clone(),
            wireguard.clone(),
            blocklist,
            Some(dns),
        )
        .with_resolver(resolver.clone())
        .with_ghost(ghost.clone())
        .with_sentry(sentry.clone()),
    );

    let multihop = match crate::multihop::Multihop::start(
        &config,
        wireguard.clone(),
        datapath.clone(),
    )
    .await
    {
        Ok(m) => {
            let _ = ctx.multihop.set(Arc::clone(&m));
            Some(m)
        }
        Err(e) => {
            error!(error = %e, "multihop cannot start; its actions answer UNAVAILABLE");
            None
        }
    };

    let mut registry = Registry::new();
    crate::core::register(&mut registry, Arc::clone(&ctx));
    datapath::actions::register(&mut registry, Arc::clone(&ctx));
    crate::blocklist::actions::register(&mut registry, Arc::clone(&ctx));
    crate::dns::register(&mut registry, Arc::clone(&ctx));
    crate::ghost::register(&mut registry, Arc::clone(&ctx));
    crate::multihop::actions::register(&mut registry, multihop.clone());
    crate::sentry::actions::register(&mut registry, Arc::clone(&ctx));
    let registry = Arc::new(registry);

    let mut metrics = Metrics::new(
        datapath.clone(),
        wireguard.clone(),
        Arc::clone(&top_sources),
    );
    if let Some(r) = resolver.clone() {
        metrics.add_collector(Box::new(metrics::ResolverCollector { resolver: r }));
    }
    if let Some(list) = ctx.blocklist.clone() {
        metrics.add_collector(Box::new(metrics::BlocklistCollector { list }));
    }
    if let Some(g) = &ghost {
        metrics.add_collector(Box::new(g.collector()));
    }
    if let Some(m) = &multihop {
        metrics.add_collector(Box::new(crate::multihop::MultihopCollector::new(
            Arc::clone(m),
        )));
    }
    if let Some(s) = sentry.clone() {
        metrics.add_collector(Box::new(crate::sentry::metrics::SentryCollector {
            sentry: s,
        }));
    }
    let metrics = Arc::new(metrics);
    metrics.register_actions(&registry.actions());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let admin = AdminServer::bind(
        &config.admin.socket,
        &config.admin.group,
        config.admin.max_connections,
        Duration::from_secs(config.admin.idle_timeout_seconds),
        Arc::clone(&registry),
        Arc::clone(&metrics),
    )
    .await?;
    let admin_task = tokio::spawn(admin.serve(shutdown_rx.clone()));
    let blocklist_api = match (
        ctx.blocklist.clone(),
        crate::config::parse_listen("blocklist.api_listen", &config.blocklist.api_listen)?,
    ) {
        (Some(list), Some(addr)) => {
            Some(crate::blocklist::api::serve(addr, list, shutdown_rx.clone()).await?)
        }
        _ => None,
    };
    let metrics_task = match config.metrics.listen_addr()? {
        Some(addr) => Some(metrics::serve(addr, Arc::clone(&metrics), shutdown_rx.clone()).await?),
        None => None,
    };
    let sentry_proxy = match (
        sentry.clone(),
        crate::config::parse_listen("sentry.listen", &config.sentry.listen)?,
    ) {
        (Some(s), Some(addr)) => {
            tokio::spawn(Arc::clone(&s).run(shutdown_rx.clone()));
            Some(
                crate::sentry::proxy::serve(addr, s, shutdown_rx.clone())
                    .await
                    .map_err(|e| Error::Other(e.to_string()))?,
            )
        }
        (Some(s), None) => {
            tokio::spawn(s.run(shutdown_rx.clone()));
            None
        }
        _ => None,
    };
    if let Some(dp) = datapath.clone() {
        tokio::spawn(datapath_housekeeping(dp, shutdown_rx.clone()));
    }
    if let Some(server) = wireguard.clone() {
        tokio::spawn(persist_traffic(server, shutdown_rx.clone()));
    }
    let mut resolver_task = None;
    if let Some(r) = resolver.clone() {
        resolver_task = Some(tokio::spawn(crate::resolver::server::run(
            Arc::clone(&r),
            shutdown_rx.clone(),
        )));
        tokio::spawn(resolver_housekeeping(r, shutdown_rx.clone()));
    }
    if let Some(list) = ctx.blocklist.clone() {
        tokio::spawn(blocklist_sync_schedule(
            list,
            Arc::clone(&ctx),
            shutdown_rx.clone(),
        ));
    }
    if let Some(g) = &ghost {
        // An acknowledged enable survives restarts and kill -9.
        g.restore().await;
    }
    if let Some(m) = &multihop {
        crate::multihop::spawn_monitor(m, shutdown_rx.clone());
    }
    info!("phantomd ready");

    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Socket)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Socket)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(Error::Socket)?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sighup.recv() => reload(&opts, &ctx, &logs, &top_sources),
        }
    }
    let _ = shutdown_tx.send(true);
    if let Err(e) = admin_task.await {
        warn!(error = %e, "admin server task failed");
    }
    // The resolver's worker threads hold the datapath too: wait until they have stopped.
    if let Some(task) = resolver_task
        && let Err(e) = task.await
    {
        warn!(error = %e, "resolver task failed");
    }
    if let Some(g) = &ghost {
        g.shutdown().await;
    }
    if let Some(m) = multihop {
        // The exit interface goes; the rule and the fail-closed route stay until next start.
        let _ = tokio::task::spawn_blocking(move || m.shutdown()).await;
    }
    if let Some(server) = wireguard {
        // Traffic persisted, NAT removed, interface gone (the embedded device takes ~2 s).
        let _ = tokio::task::spawn_blocking(move || server.shutdown()).await;
    }
    if let Some(task) = blocklist_api
        && let Err(e) = task.await
    {
        warn!(error = %e, "blocklist API task failed");
    }
    if let Some(task) = sentry_proxy
        && let Err(e) = task.await
    {
        warn!(error = %e, "sentry proxy task failed");
    }
    if let Some(sentry) = &sentry
        && let Err(e) = sentry.store.flush()
    {
        warn!(error = %e, "cannot persist the sentry store");
    }
    if let Some(task) = metrics_task
        && let Err(e) = task.await
    {
        warn!(error = %e, "metrics task failed");
    }
    Ok(())
}

/// Client names of the DNS policy re-resolved to addresses: clients come, go and move.
async fn resolver_housekeeping(
    r: Arc<crate::resolver::Resolver>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        let r = Arc::clone(&r);
        let _ = tokio::task::spawn_blocking(move || r.refresh_clients()).await;
    }
}

/// The configured blocklist sources, synced at start and every `sync_interval_seconds`.
async fn blocklist_sync_schedule(
    list: Arc<crate::blocklist::Blocklist>,
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let config = ctx.config().blocklist;
        if config.sync_interval_seconds != 0 && !config.sources.is_empty() {
            let list = Arc::clone(&list);
            let sources = config.sources.clone();
            let _ =
                tokio::task::spawn_blocking(move || list.syncer.sync_all(&list, &sources)).await;
        }
        // Re-read each round: SIGHUP may change the interval or the sources; with 0 (on
        // demand only) check again in a minute.
        let wait = match config.sync_interval_seconds {
            0 => Duration::from_secs(60),
            s => Duration::from_secs(s),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Lapsed policies out of the kernel map, VPN-interface programs attached when the interface
/// (re)appears.
async fn datapath_housekeeping(dp: Arc<Datapath>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(2));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = every.tick() => {
                let dp = Arc::clone(&dp);
                if let Err(e) = tokio::task::spawn_blocking(move || dp.tick()).await {
                    warn!(error = %e, "datapath housekeeping failed");
                }
            }
        }
    }
}

/// Adds each client's traffic to the stored totals every 30 s, so totals survive restarts.
async fn persist_traffic(server: Arc<crate::core::Server>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(30));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = every.tick() => {
                let s = Arc::clone(&server);
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.persist_traffic()).await {
                    warn!(error = %e, "cannot persist client traffic");
                }
            }
        }
    }
}

/// SIGHUP: re-reads the file and applies what can change live; an invalid file changes nothing.
fn reload(opts: &Options, ctx: &Context, logs: &LogControl, top_sources: &AtomicUsize) {
    let new = match load_config(opts) {
        Ok((config, _)) => config,
        Err(e) => {
            error!(error = %e, "SIGHUP: configuration rejected, keeping the running one");
            return;
        }
    };
    let old = ctx.config();
    if let Err(e) = logs.set_level(&new.log.level) {
        error!(error = %e, "SIGHUP: configuration rejected, keeping the running one");
        return;
    }
    logs.recent.set_capacity(new.log.keep_lines);
    top_sources.store(new.metrics.top_sources, Ordering::Relaxed);

    let mut running = old.clone();
    running.log = new.log.clone();
    running.metrics.top_sources = new.metrics.top_sources;
    // Blocklist sources, their schedule and the lookalike brands apply at once.
    running.blocklist.sources = new.blocklist.sources.clone();
    running.blocklist.sync_interval_seconds = new.blocklist.sync_interval_seconds;
    running.blocklist.lookalike = new.blocklist.lookalike;
    running.blocklist.brands = new.blocklist.brands.clone();
    if let Some(list) = &ctx.blocklist
        && new.blocklist.lookalike_brands() != old.blocklist.lookalike_brands()
    {
        list.set_lookalike_brands(&new.blocklist.lookalike_brands());
    }
    // Everything else needs a restart; say which sections differ.
    let mut pending = Vec::new();
    let mut rest = new.clone();
    rest.log = old.log.clone();
    rest.metrics.top_sources = old.metrics.top_sources;
    rest.blocklist.sources = old.blocklist.sources.clone();
    rest.blocklist.sync_interval_seconds = old.blocklist.sync_interval_seconds;
    rest.blocklist.lookalike = old.blocklist.lookalike;
    rest.blocklist.brands = old.blocklist.brands.clone();
    for (name, differs) in [
        ("state_dir", rest.state_dir != old.state_dir),
        ("admin", rest.admin != old.admin),
        ("metrics", rest.metrics != old.metrics),
        ("datapath", rest.datapath != old.datapath),
        ("wireguard", rest.wireguard != old.wireguard),
        ("dns", rest.dns != old.dns),
        ("blocklist", rest.blocklist != old.blocklist),
        ("sentry", rest.sentry != old.sentry),
        ("ghost", rest.ghost != old.ghost),
        ("multihop", rest.multihop != old.multihop),
    ] {
        if differs {
            pending.push(name);
        }
    }
    ctx.replace_config(running);
    if pending.is_empty() {
        info!("SIGHUP: configuration reloaded");
    } else {
        warn!(sections = ?pending, "SIGHUP: configuration reloaded; these sections take effect at the next restart");
    }
}

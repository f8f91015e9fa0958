//! The daemon: wires the lease store, the TUN and the data path together.
//! Decisions come from the pure modules; this file does the I/O and the
//! sequencing (acquire → TUN → subnet.env → data path → watch + renew).

use crate::backend::{self, Encap};
use crate::config::{Backend, NetworkConfig};
use crate::datapath::{self, Datapath, OffloadMode, Shared};
use crate::forward::Counters;
use crate::lease::config_wait::{ConfigWait, Next};
use crate::lease::driver::{next_item, Driver};
use crate::lease::keeper::{Effect, Keeper, KeeperStats, Settings};
use crate::lease::store::LeaseStore;
use crate::masq;
use crate::netlink::{self, Netlink};
use crate::ops::{self, Stats};
use crate::peer_cache::{self, PeerCache};
use crate::routes::RouteTable;
use crate::subnet_env::{self, SubnetEnv};
use crate::wire::ether::Mac;
use anyhow::{bail, Context};
use ipnetwork::Ipv4Network;
use rand::SeedableRng;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// UDP (8) + IPv4 (20) header bytes the tunnel adds.
pub const ENCAP_OVERHEAD: u32 = crate::wire::ENCAP_OVERHEAD as u32;

/// The daemon's settings, grouped by the part that uses them: each part
/// is handed its group only.
#[derive(Debug, Clone)]
pub struct Options {
    /// Which interface and address face the other hosts.
    pub iface: crate::iface::Selection,
    /// Our lease's TTL and renewal.
    pub lease: LeaseOptions,
    /// Files the daemon keeps: subnet.env (the peer cache beside it) and
    /// the wireguard backend's private key.
    pub files: Files,
    /// The iptables/nftables rules.
    pub rules: RulesOptions,
    /// The TUN, the workers and the sockets.
    pub datapath: DatapathOptions,
    /// Where to serve /healthz and /metrics (port 0: off).
    pub healthz: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct LeaseOptions {
    pub renew_margin: Duration,
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct Files {
    pub subnet_file: PathBuf,
    /// The wireguard backend's private key file.
    pub wireguard_key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct RulesOptions {
    pub ip_masq: bool,
    /// Masquerade without randomised source ports.
    pub ip_masq_fully_random_disable: bool,
    pub iptables_forward_rules: bool,
    pub iptables_resync: Duration,
}

#[derive(Debug, Clone)]
pub struct DatapathOptions {
    pub tun_name: String,
    pub workers: usize,
    pub offload: OffloadMode,
    pub pin_workers: bool,
    pub source_ports: datapath::SourcePorts,
    pub worker_threads: datapath::WorkerThreads,
    pub busy_poll: std::time::Duration,
    pub accept_unknown_peers: bool,
    /// Use the TUN as it was configured by someone else (address, MTU, routes).
    pub no_netlink_config: bool,
}

/// When the keeper next wants a tick, for `sleep_until`.
fn wakeup(keeper: &Keeper) -> Option<Instant> {
    keeper.next_wakeup().map(Instant::from_std)
}

/// Copies the keeper's counters to the exported stats.
fn export(k: &KeeperStats, stats: &Stats) {
    let set = |a: &std::sync::atomic::AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
    set(&stats.lease_renewals, k.renewals);
    set(&stats.watch_resyncs, k.relists);
    set(&stats.watch_compactions, k.compactions);
    set(&stats.etcd_reconnects, k.reconnects);
    set(&stats.leases_ignored, k.ignored);
}

/// Configures the TUN as flannel's udp backend does: the subnet's /32,
/// the MTU, up, and a route for the whole Network through it.
fn configure_tun(
    name: &str,
    subnet: Ipv4Network,
    network: Ipv4Network,
    mtu: u32,
) -> anyhow::Result<()> {
    let index = netlink::if_index(name).with_context(|| format!("looking up {name}"))?;
    let mut nl = Netlink::open().context("opening rtnetlink")?;
    nl.add_address(index, subnet.network(), 32)
        .with_context(|| format!("adding {}/32 to {name}", subnet.network()))?;
    nl.set_mtu_up(index, mtu)
        .with_context(|| format!("setting {name} mtu {mtu} up"))?;
    nl.add_route(network.network(), network.prefix(), index)
        .with_context(|| format!("adding route {network} dev {name}"))?;
    Ok(())
}

/// The control plane's state after start-up: what the keeper's effects act on.
struct Control<'a> {
    /// The iptables/nftables rules we keep in place.
    rules: Option<masq::RuleSet>,
    rules_failing: bool,
    /// The rules check running on a blocking thread, if one is.
    rules_inflight: Option<RulesCheck>,
    opts: &'a Options,
    cfg: NetworkConfig,
    cfg_text: String,
    tun_index: u32,
    tun_name: String,
    mtu: u32,
    routes: Arc<RouteTable>,
    stats: Arc<Stats>,
    public_ip: Ipv4Addr,
    /// Where what the node knows is kept for a restart without etcd.
    cache: PathBuf,
    /// The peers changed since the cache was last written.
    cache_dirty: bool,
    cache_written: Option<Instant>,
    vtep_mac: Option<Mac>,
    direct: DirectRoutes,
    /// The wireguard backend's peer table.
    wg: Option<Arc<crate::wireguard::Wg>>,
}

/// A rules check (iptables-save/-restore or nft) on a blocking thread. The
/// control loop never waits for one (it renews the lease and follows the
/// watch meanwhile); one that runs longer than this is reported once, and
/// no second check is started until it returns.
const RULES_TIMEOUT: Duration = Duration::from_secs(10);

struct RulesCheck {
    handle: tokio::task::JoinHandle<std::io::Result<bool>>,
    started: Instant,
    reported: bool,
}

/// The running check's result; pending without one.
async fn rules_result(
    c: &mut Option<RulesCheck>,
) -> Result<std::io::Result<bool>, tokio::task::JoinError> {
    match c {
        Some(c) => (&mut c.handle).await,
        None => std::future::pending().await,
    }
}

/// The peer cache is rewritten at most this often (a busy cluster changes
/// leases many times a second; the cache only has to be roughly current,
/// etcd is reconciled with at start).
const CACHE_EVERY: Duration = Duration::from_secs(2);

/// The iptables/nftables rules the options and config ask for.
fn wanted_rules(
    rules: &RulesOptions,
    cfg: &NetworkConfig,
    subnet: Ipv4Network,
) -> Option<masq::RuleSet> {
    masq::RuleSet::new(
        cfg.network,
        subnet,
        rules.ip_masq,
        rules.iptables_forward_rules,
        cfg.enable_nftables,
        cfg.port,
    )
    .map(|r| {
        if rules.ip_masq_fully_random_disable {
            r.without_random_fully()
        } else {
            r
        }
    })
}

/// Swaps in a new route snapshot for the data path, and the peers gauge.
/// Peers reached by a DirectRouting kernel route are left out: their
/// traffic never enters the TUN.
fn publish(
    keeper: &Keeper,
    routes: &RouteTable,
    stats: &Stats,
    port: u16,
    direct: &DirectRoutes,
    wg: Option<&crate::wireguard::Wg>,
) {
    // WireGuard peers first: a route is only useful once its peer is there.
    if let Some(wg) = wg {
        wg.sync(keeper.peers().iter().filter_map(|(sn, p)| {
            Some((sn, SocketAddrV4::new(p.ip, p.port.unwrap_or(port)), p.key?))
        }));
    }
    routes.store(
        keeper
            .peers()
            .snapshot_except(port, |_, p| direct.covers(p.ip)),
    );
    stats
        .peers
        .store(keeper.peers().len() as u64, Ordering::Relaxed);
}

/// The vxlan backend's `DirectRouting`: a peer whose PublicIP is on one
/// of the external interface's attached networks (one L2 hop away) gets a
/// plain kernel route `<subnet> via <PublicIP>` instead of the tunnel, as
/// flannel does. Off: covers nothing.
#[derive(Debug, Default)]
struct DirectRoutes {
    attached: Vec<Ipv4Network>,
    /// The routes we installed: subnet → gateway.
    installed: std::collections::BTreeMap<Ipv4Network, Ipv4Addr>,
}

impl DirectRoutes {
    fn covers(&self, ip: Ipv4Addr) -> bool {
        self.attached.iter().any(|n| n.contains(ip))
    }

    /// Makes the kernel's direct routes match the peers; a failure is
    /// logged and retried at the next change.
    fn sync(&mut self, keeper: &Keeper) {
        if self.attached.is_empty() {
            return;
        }
        let want: std::collections::BTreeMap<Ipv4Network, Ipv4Addr> = keeper
            .peers()
            .iter()
            .filter(|(_, p)| self.covers(p.ip))
            .map(|(sn, p)| (sn, p.ip))
            .collect();
        if want == self.installed {
            return;
        }
        let mut nl = match Netlink::open() {
            Ok(nl) => nl,
            Err(e) => {
                tracing::error!("DirectRouting: opening rtnetlink: {e}");
                return;
            }
        };
        let old = std::mem::take(&mut self.installed);
        for (sn, gw) in &old {
            if want.get(sn) != Some(gw) {
                match nl.del_route_via(sn.network(), sn.prefix(), *gw) {
                    Ok(()) => tracing::info!(subnet = %sn, via = %gw, "direct route removed"),
                    Err(e) => {
                        tracing::warn!(subnet = %sn, via = %gw, "removing a direct route: {e}")
                    }
                }
            }
        }
        for (sn, gw) in want {
            if old.get(&sn) == Some(&gw) {
                self.installed.insert(sn, gw);
                continue;
            }
            match nl.replace_route_via(sn.network(), sn.prefix(), gw) {
                Ok(()) => {
                    tracing::info!(subnet = %sn, via = %gw, "direct route (DirectRouting)");
                    self.installed.insert(sn, gw);
                }
                Err(e) => tracing::error!(subnet = %sn, via = %gw, "adding a direct route: {e}"),
            }
        }
    }

    /// Removes every route we installed (at exit).
    fn remove_all(&mut self) {
        if self.installed.is_empty() {
            return;
        }
        if let Ok(mut nl) = Netlink::open() {
            for (sn, gw) in std::mem::take(&mut self.installed) {
                let _ = nl.del_route_via(sn.network(), sn.prefix(), gw);
            }
        }
    }
}

impl Control<'_> {
    /// Checks our iptables rules and restores them if someone removed them.
    /// Starts a rules check unless one runs; reports one that runs too long.
    fn start_rules_check(&mut self) {
        let Some(rules) = self.rules.clone() else {
            return;
        };
        if let Some(c) = &mut self.rules_inflight {
            if !c.reported && c.started.elapsed() >= RULES_TIMEOUT {
                c.reported = true;
                tracing::error!(
                    "applying iptables rules did not finish within {} s (a hung iptables or a held xtables lock); the control loop goes on, and the rules are checked again once that call returns",
                    RULES_TIMEOUT.as_secs()
                );
            }
            return;
        }
        self.rules_inflight = Some(RulesCheck {
            handle: tokio::task::spawn_blocking(move || rules.ensure()),
            started: Instant::now(),
            reported: false,
        });
    }

    /// The check started by [`Control::start_rules_check`] returned.
    fn rules_done(&mut self, r: Result<std::io::Result<bool>, tokio::task::JoinError>) {
        if let Some(c) = self.rules_inflight.take() {
            if c.reported {
                tracing::warn!(took = ?c.started.elapsed(), "the slow iptables call returned");
            }
        }
        match r {
            Ok(Ok(false)) => {}
            Ok(Ok(true)) => {
                tracing::warn!("iptables/nftables rules were missing or changed; restored")
            }
            Ok(Err(e)) if !self.rules_failing => {
                self.rules_failing = true;
                tracing::error!("applying iptables rules failed (retrying every resync): {e}");
                return;
            }
            _ => return,
        }
        self.rules_failing = false;
    }

    /// The first check, before READY: waited for, up to [`RULES_TIMEOUT`].
    async fn first_rules(&mut self) {
        self.start_rules_check();
        let Some(c) = &mut self.rules_inflight else {
            return;
        };
        match tokio::time::timeout(RULES_TIMEOUT, &mut c.handle).await {
            Ok(r) => self.rules_done(r),
            Err(_) => self.start_rules_check(),
        }
    }

    /// Carries out the keeper's effects.
    fn apply(&mut self, keeper: &Keeper, effects: Vec<Effect>) -> anyhow::Result<()> {
        for e in effects {
            match e {
                Effect::Publish => {
                    self.direct.sync(keeper);
                    publish(
                        keeper,
                        &self.routes,
                        &self.stats,
                        self.cfg.port,
                        &self.direct,
                        self.wg.as_deref(),
                    );
                    self.cache_dirty = true;
                }
                Effect::Moved { from, to } => {
                    self.move_to(from, to)?;
                    self.direct.sync(keeper);
                    publish(
                        keeper,
                        &self.routes,
                        &self.stats,
                        self.cfg.port,
                        &self.direct,
                        self.wg.as_deref(),
                    );
                    self.save(keeper);
                }
                Effect::ConfigChanged(text) => self.config_changed(text.as_deref()),
                Effect::Fatal(why) => bail!("{why}"),
                Effect::Acquired(_) => {}
            }
        }
        export(&keeper.stats, &self.stats);
        self.export_status(keeper);
        self.save_if_due(keeper);
        Ok(())
    }

    /// Refreshes what `/status` shows and the lease-expiry gauge.
    fn export_status(&self, keeper: &Keeper) {
        let unix = |t: Option<Instant>| {
            t.map(|t| {
                let ago = Instant::now().saturating_duration_since(t);
                let ahead = t.saturating_duration_since(Instant::now());
                (std::time::SystemTime::now() + ahead - ago)
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            })
        };
        let expires = unix(keeper.expires_at().map(Instant::from_std));
        self.stats
            .lease_expiry_unix
            .store(expires.unwrap_or(0), Ordering::Relaxed);
        let view = ops::StatusView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            backend: self.cfg.backend.type_name().to_string(),
            network: self.cfg.network.to_string(),
            subnet: keeper.own().map(|s| s.to_string()),
            tun: Some(self.tun_name.clone()),
            mtu: Some(self.mtu),
            public_ip: self.public_ip.to_string(),
            lease_expires: expires,
            last_etcd_contact: unix(keeper.last_contact().map(Instant::from_std)),
            peers: keeper
                .peers()
                .iter()
                .map(|(sn, p)| ops::PeerView {
                    subnet: sn.to_string(),
                    public_ip: p.ip.to_string(),
                })
                .collect(),
            ready: false,
        };
        *self.stats.status.lock().unwrap_or_else(|e| e.into_inner()) = view;
    }

    /// Writes the peer cache if it changed and was not written lately.
    fn save_if_due(&mut self, keeper: &Keeper) {
        let due = self
            .cache_written
            .is_none_or(|t| t.elapsed() >= CACHE_EVERY);
        if self.cache_dirty && due {
            self.save(keeper);
        }
    }

    /// Rewrites the peer cache (atomically); a failure is logged, not fatal.
    fn save(&mut self, keeper: &Keeper) {
        let Some(subnet) = keeper.own() else { return };
        self.cache_dirty = false;
        self.cache_written = Some(Instant::now());
        let cache = PeerCache {
            config: self.cfg_text.clone(),
            subnet,
            public_ip: self.public_ip,
            peers: keeper.peers().iter().collect(),
            vtep_mac: self.vtep_mac,
        };
        if let Err(e) = cache.write(&self.cache) {
            tracing::warn!("writing the peer cache {}: {e}", self.cache.display());
        }
    }

    /// flannel applies a new config only on restart; we do the same but say
    /// so loudly, and never silently keep routing into a Network that changed.
    /// The peer cache keeps the config we run on: the text changes there
    /// only when the meaning is the same.
    fn config_changed(&mut self, text: Option<&str>) {
        let Some(text) = text else {
            tracing::error!("the network config is not in etcd (deleted); keeping the running config {} until restart", self.cfg.network);
            return;
        };
        if text == self.cfg_text {
            return;
        }
        match NetworkConfig::parse(text) {
            Ok(new) if new == self.cfg => {
                tracing::info!("network config rewritten with the same meaning");
                self.cfg_text = text.to_string();
                self.cache_dirty = true;
            }
            Ok(new) => tracing::error!(
                running = %self.cfg.network, new = %new.network,
                "the network config changed in etcd; flanneld keeps the running config and must be restarted to apply it"
            ),
            Err(e) => tracing::error!(
                "the network config in etcd is now invalid ({e}); keeping the running config"
            ),
        }
    }

    /// Re-addresses the TUN and rewrites subnet.env and the rules for a new subnet.
    fn move_to(&mut self, old: Ipv4Network, new: Ipv4Network) -> anyhow::Result<()> {
        tracing::error!(
            %old, %new,
            "our subnet was taken by another host; moved to a new subnet: workloads addressed from the old one must be restarted"
        );
        if self.opts.datapath.no_netlink_config {
            tracing::error!(
                "--no-netlink-config: give the TUN {}/32 in place of {}/32",
                new.network(),
                old.network()
            );
        } else {
            let mut nl = Netlink::open().context("opening rtnetlink")?;
            nl.add_address(self.tun_index, new.network(), 32)
                .context("adding the new TUN address")?;
            nl.del_address(self.tun_index, old.network(), 32)
                .context("removing the old TUN address")?;
        }
        SubnetEnv {
            network: self.cfg.network,
            subnet: new,
            mtu: self.mtu,
            ipmasq: self.opts.rules.ip_masq,
        }
        .write(&self.opts.files.subnet_file)
        .with_context(|| format!("writing {}", self.opts.files.subnet_file.display()))?;
        // Re-declaring our chains (or table) replaces the old subnet's rules.
        self.rules = wanted_rules(&self.opts.rules, &self.cfg, new);
        Ok(())
    }
}

/// How long a start with a peer cache waits for etcd before forwarding
/// from the cache.
const CACHED_START_WAIT: Duration = Duration::from_millis(500);

/// Waits for `<prefix>/config` (see [`ConfigWait`]). `None`: shut down
/// while waiting.
async fn wait_for_config<S: LeaseStore>(
    store: &S,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<Option<(NetworkConfig, String)>> {
    let mut wait = ConfigWait::default();
    loop {
        let answer = tokio::select! {
            _ = shutdown.as_mut() => {
                tracing::info!("shutting down while waiting for the network config");
                return Ok(None);
            }
            a = store.get_config() => a,
        };
        match wait.on_answer(answer) {
            Next::Ready(cfg, text) => return Ok(Some((cfg, text))),
            Next::Fatal(why) => bail!("{why}"),
            Next::AskAfter(d) => tokio::select! {
                _ = shutdown.as_mut() => return Ok(None),
                _ = tokio::time::sleep(d) => {}
            },
        }
    }
}

/// How the daemon starts: the network config, and the peer cache when
/// etcd did not answer and the cache can stand in for it.
struct Start {
    cfg: NetworkConfig,
    text: String,
    cached: Option<PeerCache>,
}

/// With a peer cache that matches subnet.env, etcd gets one short try; if
/// it does not answer, we start from what the node knew. Otherwise the
/// config is waited for. `None`: shut down while waiting.
async fn start_from<S: LeaseStore>(
    store: &S,
    subnet_file: &std::path::Path,
    public_ip: Ipv4Addr,
    cache_path: &std::path::Path,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<Option<Start>> {
    if let Some(c) = PeerCache::load(
        cache_path,
        subnet_env::read_previous_subnet(subnet_file),
        public_ip,
    ) {
        let why = match tokio::time::timeout(CACHED_START_WAIT, store.get_config()).await {
            Ok(Err(e)) if e.is_permanent() => {
                bail!("reading the network config: etcd refused us: {e}")
            }
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {CACHED_START_WAIT:?}")),
        };
        if let Some(why) = why {
            tracing::warn!(
                "etcd does not answer ({why}); starting from the peer cache {}",
                cache_path.display()
            );
            let cfg = NetworkConfig::parse(&c.config)
                .context("invalid network config in the peer cache")?;
            return Ok(Some(Start {
                cfg,
                text: c.config.clone(),
                cached: Some(c),
            }));
        }
    }
    Ok(wait_for_config(store, shutdown)
        .await?
        .map(|(cfg, text)| Start {
            cfg,
            text,
            cached: None,
        }))
}

/// Runs the keeper until it holds its first lease (it lists, chooses and
/// writes it, and starts the watch). `None`: shut down meanwhile.
async fn acquire<S: LeaseStore>(
    keeper: &mut Keeper,
    driver: &mut Driver<'_, S>,
    stats: &Stats,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<Option<Ipv4Network>> {
    loop {
        let effects = tokio::select! {
            _ = shutdown.as_mut() => return Ok(None),
            e = driver.pump(keeper) => e,
        };
        let mut got = None;
        for e in effects {
            match e {
                Effect::Acquired(sn) => got = Some(sn),
                Effect::Fatal(why) => bail!("{why}"),
                _ => {}
            }
        }
        export(&keeper.stats, stats);
        if got.is_some() {
            return Ok(got);
        }
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(None),
            _ = sleep_until(wakeup(keeper)) => driver.tick(keeper),
        }
    }
}

/// Opens the TUN and sockets, configures the TUN (unless an administrator
/// does) and reports the offloads; returns the devices and the TUN's MTU.
fn open_tun(
    dp: &DatapathOptions,
    ext: &crate::iface::ExternalIface,
    cfg: &NetworkConfig,
    own: Ipv4Network,
    stats: &Stats,
) -> anyhow::Result<(datapath::Devices, u32)> {
    let base = match cfg.backend {
        Backend::Vxlan(v) => v.mtu.unwrap_or(ext.mtu),
        Backend::Wireguard(w) => w.mtu.unwrap_or(ext.mtu),
        Backend::Udp { .. } => ext.mtu,
    };
    let overhead = backend::overhead(&cfg.backend);
    let mtu = base
        .checked_sub(overhead)
        .filter(|&m| m >= 68)
        .with_context(|| {
            format!(
                "MTU {base} is too small for the {} backend's {overhead}-byte overhead",
                cfg.backend.type_name()
            )
        })?;
    let bind = SocketAddrV4::new(ext.addr, cfg.port);
    let devices = datapath::open(
        &tun_pattern(&dp.tun_name, &cfg.backend),
        dp.workers,
        dp.offload,
        bind,
        // WireGuard peers answer (and roam) to the address a message came
        // from: every datagram leaves from ListenPort.
        if matches!(cfg.backend, Backend::Wireguard(_)) {
            datapath::SourcePorts::Fixed
        } else {
            dp.source_ports
        },
        Encap::for_backend(&cfg.backend, Mac::default()).clear_inner_offset(),
    )?;
    let tun_name = &devices.tun_name;
    let mtu = if dp.no_netlink_config {
        let have = crate::iface::mtu(tun_name)
            .with_context(|| format!("reading the MTU of {tun_name}"))?;
        tracing::info!(
            tun = %tun_name, mtu = have,
            "--no-netlink-config: leaving the TUN's address, MTU and routes to the administrator (it needs {}/32 and a route for {})",
            own.network(), cfg.network
        );
        if have > mtu {
            tracing::warn!("{tun_name} MTU {have} is above the external MTU minus {overhead} ({mtu}): large packets will not fit one datagram");
        }
        have
    } else {
        configure_tun(tun_name, own, cfg.network, mtu)?;
        mtu
    };
    let c = devices.caps;
    for (flag, on) in stats
        .offloads
        .iter()
        .zip([c.tun_offload, c.tun_uso, c.udp_gso, c.udp_gro])
    {
        flag.store(on, Ordering::Relaxed);
    }
    tracing::info!(
        tun = %devices.tun_name, address = %own.network(), mtu, workers = dp.workers.max(1),
        source_ports = ?devices.source_ports,
        tun_tso = c.tun_offload, tun_uso = c.tun_uso, udp_gso = c.udp_gso, udp_gro = c.udp_gro,
        "TUN ready"
    );
    Ok((devices, mtu))
}

/// The TUN's name: on the vxlan backend, the default pattern becomes
/// flannel's device name `flannel.<VNI>`, which scripts and docs expect.
fn tun_pattern(asked: &str, backend: &Backend) -> String {
    match backend {
        Backend::Vxlan(v) if asked == DEFAULT_TUN_NAME => format!("flannel.{}", v.vni),
        Backend::Wireguard(_) if asked == DEFAULT_TUN_NAME => "flannel-wg".into(),
        _ => asked.to_string(),
    }
}

/// `--tun-name`'s default.
pub const DEFAULT_TUN_NAME: &str = "flannel%d";

/// Our VtepMAC: the one our lease in etcd carries, else the one the peer
/// cache remembers, else a new random one. flannel picks a new one at
/// every start, so peers send to a dead MAC until they read the new
/// lease; keeping it makes a restart cost no more than on the udp backend.
async fn choose_vtep_mac<S: LeaseStore>(
    store: &S,
    from_cache: bool,
    public_ip: Ipv4Addr,
    cache_path: &std::path::Path,
) -> Mac {
    if !from_cache {
        if let Ok(Ok((leases, _))) = tokio::time::timeout(CACHED_START_WAIT, store.list()).await {
            let ours = leases
                .iter()
                .filter_map(|r| crate::lease::decode(r).ok())
                .filter(|l| l.attrs.public_ip == public_ip)
                .find_map(|l| backend::vtep_mac(&l.attrs));
            if let Some(m) = ours {
                tracing::info!(vtep_mac = %m, "VtepMAC kept from our lease in etcd");
                return m;
            }
        }
    }
    if let Some(m) = PeerCache::vtep_mac(cache_path) {
        tracing::info!(vtep_mac = %m, "VtepMAC kept from the peer cache");
        return m;
    }
    let m = Mac::random(&mut rand::thread_rng());
    tracing::info!(vtep_mac = %m, "new VtepMAC");
    m
}

/// Logs the data-path counters at exit.
fn log_counters(counters: &Counters) {
    let c = counters.snapshot();
    let drops: Vec<String> = crate::forward::DropReason::ALL
        .iter()
        .map(|&(r, label)| format!("{label}={}", c.dropped(r)))
        .collect();
    tracing::info!(
        tun_read = c.tun_rx_packets,
        sent = c.udp_tx_packets,
        received = c.udp_rx_packets,
        tun_written = c.tun_tx_packets,
        icmp = c.icmp_sent,
        dropped = %drops.join(" "),
        "data path counters"
    );
}

/// Runs flanneld until `shutdown` resolves.
pub async fn run<S: LeaseStore>(
    store: S,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Metrics and health first: /healthz says 503 while we wait for etcd.
    let counters = Arc::new(Counters::default());
    let stats = Arc::new(Stats::default());
    if let Some(addr) = opts.healthz {
        let registry = Arc::new(ops::registry(counters.clone(), stats.clone()));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --healthz-ip/--healthz-port {addr}"))?;
        tokio::spawn(ops::serve(listener, registry, stats.clone()));
    }
    let ext = crate::iface::find_external(&opts.iface)?;
    let public_ip = opts.iface.public_ip.unwrap_or(ext.addr);
    tracing::info!(iface = %ext.name, addr = %ext.addr, mtu = ext.mtu, %public_ip, "using external interface");

    tokio::pin!(shutdown);
    let cache_path = peer_cache::path_for(&opts.files.subnet_file);
    let Some(start) = start_from(
        &store,
        &opts.files.subnet_file,
        public_ip,
        &cache_path,
        &mut shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    let Start { cfg, text, cached } = start;
    let config_source = if cached.is_some() {
        "the peer cache"
    } else {
        "etcd"
    };
    tracing::info!(network = %cfg.network, subnet_len = cfg.subnet_len, port = cfg.port, "network config");
    let vtep_mac = match cfg.backend {
        Backend::Vxlan(_) => {
            Some(choose_vtep_mac(&store, cached.is_some(), public_ip, &cache_path).await)
        }
        Backend::Udp { .. } | Backend::Wireguard(_) => None,
    };
    let wg = match cfg.backend {
        Backend::Wireguard(w) => {
            let key = crate::wireguard::load_or_create_key(&opts.files.wireguard_key_file)?;
            let wg = crate::wireguard::Wg::new(key, w.psk, w.keepalive);
            tracing::info!(
                public_key = %crate::wireguard::key_to_base64(&wg.public_key()),
                key_file = %opts.files.wireguard_key_file.display(),
                listen_port = w.listen_port, psk = w.psk.is_some(), keepalive = w.keepalive,
                "wireguard key ready"
            );
            Some(Arc::new(wg))
        }
        _ => None,
    };
    let identity = backend::Identity {
        mac: vtep_mac,
        key: wg.as_ref().map(|w| w.public_key()),
    };
    let mut direct = DirectRoutes::default();
    if let Backend::Vxlan(v) = cfg.backend {
        if v.direct_routing {
            direct.attached = crate::iface::attached_networks(&ext.name)
                .with_context(|| format!("reading the networks on {}", ext.name))?;
            tracing::info!(attached = ?direct.attached, "DirectRouting: peers on these networks get a kernel route");
        }
    }
    let settings = Settings {
        cfg: cfg.clone(),
        public_ip,
        identity,
        ttl: opts.lease.lease_ttl,
        renew_margin: opts.lease.renew_margin,
        // flannel: a minute; sooner for short test TTLs.
        renew_retry: Duration::from_secs(60).min(opts.lease.lease_ttl / 4),
    };
    let routes = Arc::new(RouteTable::default());
    let built = std::time::Instant::now();
    let mut driver = Driver::new(&store);
    let rng = rand::rngs::StdRng::from_entropy();
    let (mut keeper, own) = match cached {
        Some(c) => {
            let (keeper, first) = Keeper::from_cache(settings, c.subnet, c.peers, rng);
            tracing::info!(subnet = %c.subnet, peers = keeper.peers().len(), "forwarding from the peer cache until etcd answers");
            driver.todo.extend(first);
            (keeper, c.subnet)
        }
        None => {
            let previous = subnet_env::read_previous_subnet(&opts.files.subnet_file);
            let (mut keeper, first) = Keeper::new(settings, previous, rng);
            driver.todo.extend(first);
            match acquire(&mut keeper, &mut driver, &stats, &mut shutdown).await? {
                Some(own) => (keeper, own),
                None => return Ok(()),
            }
        }
    };
    direct.sync(&keeper);
    publish(&keeper, &routes, &stats, cfg.port, &direct, wg.as_deref());
    tracing::info!(
        peers = keeper.peers().len(), build = ?built.elapsed(),
        "route table built from the lease list"
    );

    let (devices, mtu) = open_tun(&opts.datapath, &ext, &cfg, own, &stats)?;
    let tun_name = devices.tun_name.clone();

    SubnetEnv {
        network: cfg.network,
        subnet: own,
        mtu,
        ipmasq: opts.rules.ip_masq,
    }
    .write(&opts.files.subnet_file)
    .with_context(|| format!("writing {}", opts.files.subnet_file.display()))?;

    let dp = Datapath::start(
        devices,
        Shared {
            routes: routes.clone(),
            counters: counters.clone(),
            icmp_src: cfg.network.network(),
            pin: opts.datapath.pin_workers,
            accept_unknown_peers: opts.datapath.accept_unknown_peers,
            threads: opts.datapath.worker_threads,
            busy_poll: opts.datapath.busy_poll,
            encap: Encap::for_backend(&cfg.backend, vtep_mac.unwrap_or_default()),
            icmp_limit: Default::default(),
            wg: wg.clone(),
        },
    )?;

    let mut rules_tick = tokio::time::interval(opts.rules.iptables_resync);
    rules_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ctl = Control {
        rules: wanted_rules(&opts.rules, &cfg, own),
        rules_failing: false,
        rules_inflight: None,
        opts: &opts,
        cfg,
        cfg_text: text,
        tun_index: netlink::if_index(&tun_name)?,
        tun_name: tun_name.clone(),
        mtu,
        routes,
        stats: stats.clone(),
        public_ip,
        cache: cache_path,
        cache_dirty: false,
        cache_written: None,
        vtep_mac,
        direct,
        wg: wg.clone(),
    };
    ctl.save(&keeper);
    ctl.export_status(&keeper);
    // Rules before READY: a workload started on READY gets them.
    ctl.first_rules().await;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        backend = ctl.cfg.backend.type_name(),
        subnet = %own,
        mtu,
        iface = %ext.name,
        %public_ip,
        config = config_source,
        "flanneld started"
    );
    stats.ready.store(true, Ordering::Relaxed);
    ops::sd_notify(&format!("READY=1\nSTATUS=subnet {own} on {tun_name}"));
    let result = loop {
        // Store requests run here, cancelled by shutdown (never blocked by an outage).
        let effects = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            e = driver.pump(&mut keeper) => e,
        };
        if let Err(e) = ctl.apply(&keeper, effects) {
            break Err(e);
        }
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            why = dp.failed() => {
                stats.failed.store(true, Ordering::Relaxed);
                // A dead queue would black-hole part of the traffic while
                // the rest flows: exit non-zero so the supervisor restarts us.
                break Err(anyhow::anyhow!("the data path failed ({why}); exiting so that the service manager restarts flanneld"));
            }
            _ = sleep_until(wakeup(&keeper)) => driver.tick(&mut keeper),
            _ = rules_tick.tick() => {
                ctl.start_rules_check();
                ctl.save_if_due(&keeper);
            }
            r = rules_result(&mut ctl.rules_inflight) => ctl.rules_done(r),
            item = next_item(&mut driver.watch), if driver.watch.is_some() => {
                driver.watched(&mut keeper, item);
            }
        }
    };
    stats
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    ops::sd_notify("STOPPING=1");
    tracing::info!("shutting down; the lease stays in etcd");
    if let Some(rules) = ctl.rules.clone() {
        // Bounded like a check: a hung iptables must not hang the exit.
        let removal = tokio::task::spawn_blocking(move || rules.remove());
        match tokio::time::timeout(RULES_TIMEOUT, removal).await {
            Ok(Ok(Ok(()))) => tracing::info!("removed our iptables rules"),
            Ok(Ok(Err(e))) => tracing::warn!("removing our iptables rules: {e}"),
            Ok(Err(e)) => tracing::warn!("removing our iptables rules: {e}"),
            Err(_) => tracing::error!(
                "removing our iptables rules did not finish within {} s; leaving them",
                RULES_TIMEOUT.as_secs()
            ),
        }
    }
    if ctl.cache_dirty {
        ctl.save(&keeper);
    }
    dp.stop();
    ctl.direct.remove_all();
    log_counters(&counters);
    result
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::memory::{settings, SharedMemory, ME, PREFIX};
    use crate::subnet::{lease_key, LeaseAttrs};

    fn shutdown_never() -> std::pin::Pin<Box<std::future::Pending<()>>> {
        Box::pin(std::future::pending())
    }

    /// The daemon's driver itself, over the store seam: it acquires a
    /// lease, follows another host's lease through the watch, and gets the
    /// watch back after an outage.
    #[tokio::test]
    async fn the_driver_acquires_follows_the_watch_and_recovers_from_an_outage() {
        let store = SharedMemory::default();
        let t0 = std::time::Instant::now();
        store.lock().put_lease("10.44.7.0/24", [192, 168, 0, 7], t0);
        let mut driver = Driver::new(&store);
        let (mut keeper, first) = Keeper::new(
            settings("10.44.0.0/16"),
            None,
            rand::rngs::StdRng::seed_from_u64(3),
        );
        driver.todo.extend(first);
        let stats = Stats::default();
        let mut shutdown = shutdown_never();
        let own = acquire(&mut keeper, &mut driver, &stats, &mut shutdown.as_mut())
            .await
            .unwrap()
            .expect("a lease");
        let (v, _) = store.lock().get(&lease_key(PREFIX, own)).expect("written");
        assert_eq!(LeaseAttrs::from_json(&v).unwrap().public_ip, ME);
        assert_ne!(own, "10.44.7.0/24".parse().unwrap());
        assert_eq!(keeper.peers().len(), 1);
        driver.pump(&mut keeper).await;
        assert!(driver.watch.is_some(), "the watch runs after acquiring");

        // Another host joins: the watch brings it, the driver publishes it.
        store
            .lock()
            .put_lease("10.44.9.0/24", [192, 168, 0, 9], std::time::Instant::now());
        let item = tokio::time::timeout(Duration::from_secs(5), next_item(&mut driver.watch))
            .await
            .expect("the watch delivers");
        driver.watched(&mut keeper, item);
        let effects = driver.pump(&mut keeper).await;
        assert!(effects.contains(&Effect::Publish), "{effects:?}");
        assert_eq!(keeper.peers().len(), 2);

        // etcd goes away: the watch breaks; when it is back, the driver's
        // ticks get a watch again and the lease is still ours.
        store.lock().down = true;
        let item = tokio::time::timeout(Duration::from_secs(5), next_item(&mut driver.watch))
            .await
            .expect("the watch ends");
        assert!(item.is_err());
        driver.watched(&mut keeper, item);
        assert!(driver.watch.is_none());
        store.lock().down = false;
        let back = tokio::time::timeout(Duration::from_secs(20), async {
            while driver.watch.is_none() {
                sleep_until(wakeup(&keeper)).await;
                driver.tick(&mut keeper);
                driver.pump(&mut keeper).await;
            }
        })
        .await;
        assert!(back.is_ok(), "no watch after the outage");
        assert_eq!(keeper.own(), Some(own));
        assert_eq!(keeper.peers().len(), 2);
    }
}

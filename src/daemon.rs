//! The daemon: wires the lease store, the TUN and the data path together.
//! Decisions come from the pure modules; this file does the I/O and the
//! sequencing (acquire → TUN → subnet.env → data path → watch + renew).

use crate::config::NetworkConfig;
use crate::datapath::{self, Datapath, OffloadMode, Shared};
use crate::forward::Counters;
use crate::lease::{self, Acquire, PeerChange, PeerSet};
use crate::masq;
use crate::netlink::{self, Netlink};
use crate::ops::{self, Stats};
use crate::registry::{
    is_permanent, LeaseStore, LeaseWatch, RawLease, StoreError, WatchEvent, WatchItem,
};
use crate::routes::RouteTable;
use crate::subnet::LeaseAttrs;
use crate::subnet_env::{self, SubnetEnv};
use anyhow::{bail, Context};
use ipnetwork::Ipv4Network;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// UDP (8) + IPv4 (20) header bytes the tunnel adds.
pub const ENCAP_OVERHEAD: u32 = crate::wire::ENCAP_OVERHEAD as u32;
/// Tries at creating a lease before giving up (flannel: 10).
const ACQUIRE_TRIES: usize = 10;

#[derive(Debug, Clone)]
pub struct Options {
    pub ifaces: Vec<String>,
    /// `--iface-regex`: patterns matched against addresses, then names.
    pub iface_regex: Vec<String>,
    /// `--iface-can-reach`: the interface the route to this address uses.
    pub iface_can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
    pub subnet_file: PathBuf,
    pub renew_margin: Duration,
    pub lease_ttl: Duration,
    pub ip_masq: bool,
    /// Masquerade without randomised source ports.
    pub ip_masq_fully_random_disable: bool,
    pub iptables_forward_rules: bool,
    pub iptables_resync: Duration,
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
    /// Where to serve /healthz and /metrics (port 0: off).
    pub healthz: Option<std::net::SocketAddr>,
}

/// Exponential backoff, 100 ms doubling to a cap (flannel's watch backoff).
struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(cap: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(100),
            cap,
        }
    }
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d
    }
}

/// Retries a store call while etcd is unreachable, logging once per
/// outage. Errors retrying cannot fix (TLS trust, certificates,
/// authentication) are returned at once, so a misconfiguration is an error
/// and not a hang.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Backoff::new(Duration::from_secs(5));
    let mut logged = false;
    loop {
        match f().await {
            Ok(v) => {
                if logged {
                    tracing::info!("etcd is reachable again ({what})");
                }
                return Ok(v);
            }
            Err(e) if is_permanent(&e) => return Err(e.context(format!("{what}: etcd refused us"))),
            Err(e) => {
                if !logged {
                    tracing::warn!("{what} failed, retrying: {e:#}");
                    logged = true;
                }
                tokio::time::sleep(backoff.step()).await;
            }
        }
    }
}

fn decode_all(raw: &[RawLease]) -> Vec<lease::Lease> {
    raw.iter()
        .filter_map(|r| match lease::decode(r) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("skipping lease: {e}");
                None
            }
        })
        .collect()
}

/// Gets a subnet: flannel's choice, created with a transaction, retried on conflict.
async fn acquire<S: LeaseStore>(
    store: &S,
    cfg: &NetworkConfig,
    public_ip: Ipv4Addr,
    previous: Option<Ipv4Network>,
    ttl: Duration,
) -> anyhow::Result<(Ipv4Network, Option<Duration>)> {
    let value = LeaseAttrs::udp(public_ip).to_json();
    for _ in 0..ACQUIRE_TRIES {
        let (raw, _) = retry("listing leases", || store.list()).await?;
        let leases = decode_all(&raw);
        let plan = lease::plan_acquire(cfg, &leases, public_ip, previous, &mut rand::thread_rng())?;
        for sn in plan.delete {
            tracing::info!(subnet = %sn, "deleting our stale lease that no longer fits the config");
            retry("deleting a stale lease", || store.delete(sn)).await?;
        }
        match plan.action {
            Acquire::Reuse {
                subnet,
                reservation,
            } => {
                let exp = retry("writing our lease", || {
                    store.put(subnet, value.clone(), (!reservation).then_some(ttl))
                })
                .await?;
                tracing::info!(subnet = %subnet, reservation, "reusing our lease");
                return Ok((subnet, exp));
            }
            Acquire::Create(subnet) => match retry("creating our lease", || {
                store.create(subnet, value.clone(), ttl)
            })
            .await?
            {
                Some(exp) => {
                    tracing::info!(subnet = %subnet, "acquired a new lease");
                    return Ok((subnet, Some(exp)));
                }
                None => tracing::debug!(subnet = %subnet, "lost the race for a subnet, retrying"),
            },
        }
    }
    bail!("could not acquire a subnet lease: lost the race {ACQUIRE_TRIES} times")
}

/// The route table and the peer set behind it.
struct Peers {
    set: PeerSet,
    stats: Arc<Stats>,
    public_ip: Ipv4Addr,
    routes: Arc<RouteTable>,
    port: u16,
}

impl Peers {
    /// One line per change; a big batch (a start-up list, a re-list) gets a
    /// summary line at info and the details at debug.
    fn log(changes: &[PeerChange]) {
        let summary = changes.len() > 16;
        if summary {
            let added = changes
                .iter()
                .filter(|c| matches!(c, PeerChange::Added(..)))
                .count();
            let removed = changes
                .iter()
                .filter(|c| matches!(c, PeerChange::Removed(..)))
                .count();
            tracing::info!(
                added,
                removed,
                moved = changes.len() - added - removed,
                "peers changed"
            );
        }
        for c in changes {
            macro_rules! ev {
                ($($t:tt)*) => {
                    if summary { tracing::debug!($($t)*) } else { tracing::info!($($t)*) }
                };
            }
            match c {
                PeerChange::Added(sn, ip) => ev!(subnet = %sn, public_ip = %ip, "peer added"),
                PeerChange::Changed(sn, ip) => ev!(subnet = %sn, public_ip = %ip, "peer moved"),
                PeerChange::Removed(sn) => ev!(subnet = %sn, "peer removed"),
            }
        }
    }

    /// Swaps in a new route snapshot for the data path.
    fn publish(&self) {
        self.routes.store(self.set.snapshot(self.port));
        self.stats
            .peers
            .store(self.set.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn resync(&mut self, raw: &[RawLease]) {
        let changes = self.set.resync(
            decode_all(raw)
                .into_iter()
                .map(|l| (l.subnet, l.attrs.public_ip)),
        );
        Self::log(&changes);
        self.publish();
    }

    /// Applies lease events; returns true when our own lease was deleted or
    /// rewritten for another host.
    /// Config events are the caller's.
    fn apply(&mut self, events: &[WatchEvent], own: Ipv4Network) -> bool {
        let mut changes = Vec::new();
        let mut own_lost = false;
        for ev in events {
            match ev {
                WatchEvent::Config(_) => {}
                WatchEvent::Put(raw) => match lease::decode(raw) {
                    Ok(l) if l.subnet == own => {
                        // Someone rewrote our key for another host: we lost it.
                        if l.attrs.public_ip != self.public_ip {
                            own_lost = true;
                        }
                    }
                    Ok(l) => changes.extend(self.set.upsert(l.subnet, l.attrs.public_ip)),
                    Err(e) => tracing::warn!("skipping lease: {e}"),
                },
                WatchEvent::Delete(key) => match crate::subnet::parse_key(key) {
                    Ok(sn) if sn == own => own_lost = true,
                    Ok(sn) => changes.extend(self.set.remove(sn)),
                    Err(e) => tracing::warn!("skipping deleted key: {e}"),
                },
            }
        }
        if !changes.is_empty() {
            Self::log(&changes);
            self.publish();
        }
        own_lost
    }
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

/// The control plane's state after start-up, and what it does on events.
struct Control<'a, S> {
    /// The iptables/nftables rules we keep in place.
    rules: Option<masq::RuleSet>,
    rules_failing: bool,
    store: &'a S,
    opts: &'a Options,
    cfg: NetworkConfig,
    cfg_text: String,
    value: String,
    public_ip: Ipv4Addr,
    own: Ipv4Network,
    renew_at: Option<Instant>,
    peers: Peers,
    tun_index: u32,
    mtu: u32,
    /// Taking our lease back failed (etcd went away): re-list when it returns.
    lease_missing: bool,
}

/// The iptables/nftables rules the options and config ask for.
fn wanted_rules(opts: &Options, cfg: &NetworkConfig, subnet: Ipv4Network) -> Option<masq::RuleSet> {
    masq::RuleSet::new(
        cfg.network,
        subnet,
        opts.ip_masq,
        opts.iptables_forward_rules,
        cfg.enable_nftables,
    )
    .map(|r| {
        if opts.ip_masq_fully_random_disable {
            r.without_random_fully()
        } else {
            r
        }
    })
}

impl<S: LeaseStore> Control<'_, S> {
    /// Checks our iptables rules and restores them if someone removed them.
    async fn resync_rules(&mut self) {
        let Some(rules) = self.rules.clone() else {
            return;
        };
        match tokio::task::spawn_blocking(move || rules.ensure()).await {
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

    fn renew_time(&self, exp: Option<Duration>) -> Option<Instant> {
        exp.map(|d| Instant::now() + lease::renew_delay(d, self.opts.renew_margin))
    }

    /// Re-puts our lease with a fresh TTL (flannel: a new 24 h etcd lease).
    async fn renew(&mut self) {
        match self
            .store
            .put(self.own, self.value.clone(), Some(self.opts.lease_ttl))
            .await
        {
            Ok(exp) => {
                self.renew_at = self.renew_time(exp);
                Stats::inc(&self.peers.stats.lease_renewals);
                tracing::info!(subnet = %self.own, ttl = ?exp, "lease renewed");
            }
            Err(e) => {
                tracing::warn!(
                    "renewing lease {} failed, retrying in a minute: {e:#}",
                    self.own
                );
                self.renew_at =
                    Some(Instant::now() + Duration::from_secs(60).min(self.opts.lease_ttl / 4));
            }
        }
    }

    async fn on_events(&mut self, evs: &[WatchEvent]) -> anyhow::Result<()> {
        for ev in evs {
            if let WatchEvent::Config(text) = ev {
                self.config_changed(text.as_deref());
            }
        }
        if self.peers.apply(evs, self.own) {
            tracing::warn!(subnet = %self.own, "our lease was deleted or taken over in etcd (Go flanneld would exit here); taking it back");
            self.reacquire().await?;
        }
        Ok(())
    }

    /// flannel applies a new config only on restart; we do the same but say
    /// so loudly, and never silently keep routing into a Network that changed.
    fn config_changed(&mut self, text: Option<&str>) {
        let Some(text) = text else {
            tracing::error!("the network config was deleted from etcd; keeping the running config {} until restart", self.cfg.network);
            return;
        };
        if text == self.cfg_text {
            return;
        }
        match NetworkConfig::parse(text) {
            Ok(new) if new == self.cfg => {
                tracing::info!("network config rewritten with the same meaning")
            }
            Ok(new) => tracing::error!(
                running = %self.cfg.network, new = %new.network,
                "the network config changed in etcd; flanneld keeps the running config and must be restarted to apply it"
            ),
            Err(e) => tracing::error!(
                "the network config in etcd is now invalid ({e}); keeping the running config"
            ),
        }
        self.cfg_text = text.to_string();
    }

    /// Our lease vanished (deleted, or expired while etcd was away): take
    /// the same subnet back if it is free, else a new one, moving the TUN
    /// address and subnet.env with it.
    async fn reacquire(&mut self) -> anyhow::Result<()> {
        match self
            .store
            .create(self.own, self.value.clone(), self.opts.lease_ttl)
            .await
        {
            Ok(Some(exp)) => {
                self.renew_at = self.renew_time(Some(exp));
                tracing::info!(subnet = %self.own, "lease re-created");
                return Ok(());
            }
            Ok(None) => {}
            Err(e) => {
                // etcd went away meanwhile: the re-list after reconnecting retries.
                self.lease_missing = true;
                tracing::warn!("re-creating lease {} failed: {e:#}", self.own);
                return Ok(());
            }
        }
        let (new, exp) = acquire(
            self.store,
            &self.cfg,
            self.public_ip,
            Some(self.own),
            self.opts.lease_ttl,
        )
        .await?;
        self.renew_at = self.renew_time(exp);
        if new != self.own {
            self.move_to(new)?;
        }
        Ok(())
    }

    /// Re-addresses the TUN and rewrites subnet.env for a new subnet.
    fn move_to(&mut self, new: Ipv4Network) -> anyhow::Result<()> {
        let old = self.own;
        tracing::error!(
            %old, %new,
            "our subnet was taken by another host; moved to a new subnet: workloads addressed from the old one must be restarted"
        );
        if self.opts.no_netlink_config {
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
            ipmasq: self.opts.ip_masq,
        }
        .write(&self.opts.subnet_file)
        .with_context(|| format!("writing {}", self.opts.subnet_file.display()))?;
        self.own = new;
        // Re-declaring our chains (or table) replaces the old subnet's rules.
        self.rules = wanted_rules(self.opts, &self.cfg, new);
        if let Some(change) = self.peers.set.set_own(new) {
            Peers::log(&[change]);
        }
        self.peers
            .routes
            .store(self.peers.set.snapshot(self.peers.port));
        Ok(())
    }

    /// Re-lists after a broken or compacted watch: diff the peers (removals
    /// included) and take our lease back if it is gone. Returns the revision.
    async fn resync(&mut self) -> anyhow::Result<Result<i64, StoreError>> {
        let (raw, rev) = match self.store.list().await {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        Stats::inc(&self.peers.stats.watch_resyncs);
        self.lease_missing = false;
        self.peers.resync(&raw);
        if !raw
            .iter()
            .any(|r| crate::subnet::parse_key(&r.key) == Ok(self.own))
        {
            tracing::warn!(subnet = %self.own, "our lease is missing after the re-list; taking it back");
            self.reacquire().await?;
        }
        Ok(Ok(rev))
    }
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
    let ext = crate::iface::find_external(&crate::iface::Selection {
        ifaces: opts.ifaces.clone(),
        regexes: opts.iface_regex.clone(),
        can_reach: opts.iface_can_reach,
        public_ip: opts.public_ip,
    })?;
    let public_ip = opts.public_ip.unwrap_or(ext.addr);
    tracing::info!(iface = %ext.name, addr = %ext.addr, mtu = ext.mtu, %public_ip, "using external interface");

    tokio::pin!(shutdown);
    // flannel retries every second until <prefix>/config exists (operators
    // start flanneld before writing it): wait, say so once, stay not ready.
    let mut said = false;
    let text = loop {
        let got = tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down while waiting for the network config");
                return Ok(());
            }
            got = retry("reading the network config", || store.get_config()) => got?,
        };
        if let Some(text) = got {
            if said {
                tracing::info!("the network config appeared");
            }
            break text;
        }
        if !said {
            tracing::warn!("no network config in etcd yet (<prefix>/config); retrying every second until it is written");
            said = true;
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    let cfg = NetworkConfig::parse(&text).context("invalid network config in etcd")?;
    tracing::info!(network = %cfg.network, subnet_len = cfg.subnet_len, port = cfg.port, "network config");

    let previous = subnet_env::read_previous_subnet(&opts.subnet_file);
    let (own, expires_in) = acquire(&store, &cfg, public_ip, previous, opts.lease_ttl).await?;
    // When to renew: `margin` before expiry; never for a reservation.
    let renew_time = |exp: Option<Duration>| {
        exp.map(|d| Instant::now() + lease::renew_delay(d, opts.renew_margin))
    };
    let renew_at = renew_time(expires_in);

    let mtu = ext
        .mtu
        .checked_sub(ENCAP_OVERHEAD)
        .context("external MTU too small")?;
    let bind = SocketAddrV4::new(ext.addr, cfg.port);
    let devices = datapath::open(
        &opts.tun_name,
        opts.workers,
        opts.offload,
        bind,
        opts.source_ports,
    )?;
    let tun_name = devices.tun_name.clone();
    let mtu = if opts.no_netlink_config {
        let have = crate::iface::mtu(&tun_name)
            .with_context(|| format!("reading the MTU of {tun_name}"))?;
        tracing::info!(
            tun = %tun_name, mtu = have,
            "--no-netlink-config: leaving the TUN's address, MTU and routes to the administrator (it needs {}/32 and a route for {})",
            own.network(), cfg.network
        );
        if have > mtu {
            tracing::warn!("{tun_name} MTU {have} is above the external MTU minus 28 ({mtu}): large packets will not fit one datagram");
        }
        have
    } else {
        configure_tun(&tun_name, own, cfg.network, mtu)?;
        mtu
    };
    let c = devices.caps;
    for (flag, on) in stats
        .offloads
        .iter()
        .zip([c.tun_offload, c.tun_uso, c.udp_gso, c.udp_gro])
    {
        flag.store(on, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::info!(
        tun = %devices.tun_name, address = %own.network(), mtu, workers = opts.workers.max(1),
        source_ports = ?devices.source_ports,
        tun_tso = c.tun_offload, tun_uso = c.tun_uso, udp_gso = c.udp_gso, udp_gro = c.udp_gro,
        "TUN ready"
    );

    SubnetEnv {
        network: cfg.network,
        subnet: own,
        mtu,
        ipmasq: opts.ip_masq,
    }
    .write(&opts.subnet_file)
    .with_context(|| format!("writing {}", opts.subnet_file.display()))?;

    let routes = Arc::new(RouteTable::default());
    let mut peers = Peers {
        set: PeerSet::new(Some(own)),
        stats: stats.clone(),
        public_ip,
        routes: routes.clone(),
        port: cfg.port,
    };
    let (raw, rev) = retry("listing leases", || store.list()).await?;
    let built = std::time::Instant::now();
    peers.resync(&raw);
    tracing::info!(
        leases = raw.len(), peers = peers.set.len(), build = ?built.elapsed(),
        "route table built from the initial lease list"
    );

    let dp = Datapath::start(
        devices,
        Shared {
            routes,
            counters: counters.clone(),
            icmp_src: cfg.network.network(),
            pin: opts.pin_workers,
            accept_unknown_peers: opts.accept_unknown_peers,
            threads: opts.worker_threads,
            busy_poll: opts.busy_poll,
        },
    )?;

    let mut rules_tick = tokio::time::interval(opts.iptables_resync);
    rules_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ctl = Control {
        rules: wanted_rules(&opts, &cfg, own),
        rules_failing: false,
        store: &store,
        opts: &opts,
        cfg,
        cfg_text: text,
        value: LeaseAttrs::udp(public_ip).to_json(),
        public_ip,
        own,
        renew_at,
        peers,
        tun_index: netlink::if_index(&tun_name)?,
        mtu,
        lease_missing: false,
    };
    // Rules before READY: a workload started on READY gets them.
    ctl.resync_rules().await;
    stats
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    ops::sd_notify(&format!("READY=1\nSTATUS=subnet {own} on {tun_name}"));
    let mut watch = Some(retry("starting the watch", || store.watch(rev + 1)).await?);
    // Every lease event up to `cursor` has been applied. After a broken watch
    // the new one resumes from `cursor + 1` (as Go's clientv3 watch does), so
    // an outage costs no re-list; only a compacted history, or a lease we
    // failed to take back, forces a re-list.
    let mut cursor = rev;
    let mut must_relist = false;
    let mut backoff = Backoff::new(Duration::from_secs(5));
    let mut resync_at: Option<Instant> = None;
    let mut outage_since: Option<Instant> = None;
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            why = dp.failed() => {
                stats.failed.store(true, std::sync::atomic::Ordering::Relaxed);
                // A dead queue would black-hole part of the traffic while
                // the rest flows: exit non-zero so the supervisor restarts us.
                break Err(anyhow::anyhow!("the data path failed ({why}); exiting so that the service manager restarts flanneld"));
            }
            _ = sleep_until(ctl.renew_at) => ctl.renew().await,
            _ = rules_tick.tick() => ctl.resync_rules().await,
            _ = sleep_until(resync_at) => {
                // One attempt per tick, so shutdown is never blocked by an outage.
                let relist = must_relist || ctl.lease_missing;
                let rev = if !relist { Ok(Ok(cursor)) } else { ctl.resync().await };
                let rev = match rev {
                    Ok(Ok(rev)) => rev,
                    Ok(Err(e)) => {
                        if is_permanent(&e) {
                            tracing::error!("etcd refuses us ({e:#}); fix the credentials, retrying");
                        } else {
                            tracing::debug!("re-listing failed: {e:#}");
                        }
                        resync_at = Some(Instant::now() + backoff.step());
                        continue;
                    }
                    Err(e) => break Err(e),
                };
                match store.watch(rev + 1).await {
                    Ok(w) => {
                        if let Some(since) = outage_since.take() {
                            Stats::inc(&ctl.peers.stats.etcd_reconnects);
                            tracing::info!(
                                peers = ctl.peers.set.len(), down_for = ?since.elapsed(),
                                from_revision = rev + 1, relisted = relist,
                                "etcd is back: watching leases again"
                            );
                        }
                        cursor = rev;
                        must_relist = false;
                        watch = Some(w);
                        resync_at = None;
                        backoff = Backoff::new(Duration::from_secs(5));
                    }
                    Err(e) => {
                        tracing::debug!("restarting the watch failed: {e:#}");
                        resync_at = Some(Instant::now() + backoff.step());
                    }
                }
            }
            item = next_item(&mut watch), if watch.is_some() => {
                match item {
                    Ok(WatchItem::Events { events, revision }) => {
                        backoff = Backoff::new(Duration::from_secs(5));
                        if let Err(e) = ctl.on_events(&events).await {
                            break Err(e);
                        }
                        cursor = cursor.max(revision);
                    }
                    Ok(WatchItem::Compacted) => {
                        Stats::inc(&ctl.peers.stats.watch_compactions);
                        tracing::warn!(from_revision = cursor + 1, "the watch's revision was compacted away; re-listing leases");
                        must_relist = true;
                        watch = None;
                        resync_at = Some(Instant::now());
                    }
                    Err(e) => {
                        // Logged once per outage; retries are quiet until etcd is back.
                        tracing::warn!("lease watch broke ({e:#}); the data path keeps forwarding to known peers; retrying with backoff");
                        outage_since = Some(Instant::now());
                        watch = None;
                        resync_at = Some(Instant::now() + backoff.step());
                    }
                }
            }
        }
    };
    stats
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    ops::sd_notify("STOPPING=1");
    tracing::info!("shutting down; the lease stays in etcd");
    if let Some(rules) = ctl.rules.clone() {
        match tokio::task::spawn_blocking(move || rules.remove()).await {
            Ok(Ok(())) => tracing::info!("removed our iptables rules"),
            Ok(Err(e)) => tracing::warn!("removing our iptables rules: {e}"),
            Err(e) => tracing::warn!("removing our iptables rules: {e}"),
        }
    }
    dp.stop();
    let c = counters.snapshot();
    tracing::info!(
        tun_read = c.tun_rx_packets,
        sent = c.udp_tx_packets,
        received = c.udp_rx_packets,
        tun_written = c.tun_tx_packets,
        icmp = c.icmp_sent,
        no_route = c.drop_no_route,
        spoofed = c.drop_spoofed,
        not_local = c.drop_not_local,
        malformed = c.drop_malformed,
        not_ipv4 = c.drop_not_ipv4,
        ttl = c.drop_ttl,
        send_errors = c.drop_send_error,
        tun_write_errors = c.drop_tun_write_error,
        "data path counters"
    );
    result
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The next watch item; a missing watch is an error that triggers a re-list.
async fn next_item<W: LeaseWatch>(w: &mut Option<W>) -> anyhow::Result<WatchItem> {
    match w {
        Some(w) => w.next().await,
        None => Err(anyhow::anyhow!("no watch")),
    }
}

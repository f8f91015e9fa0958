//! The keeper: the lease state machine, without I/O (as quinn-proto is to
//! quinn). It takes what the store answered, what the watch saw and the
//! time, and returns [`Action`]s: store requests for the daemon to carry
//! out (answering with the next [`Input`]) and effects (publish routes,
//! move to a new subnet). One store request is outstanding at a time.
//!
//! ```text
//!   Acquiring ──list──▶ plan ──write──▶ Holding ◀─┐
//!      ▲                                  │      │ renew (compare revision)
//!      │ our key names another host       │ our key deleted / renewal refused
//!      └──────────────────────────────────┴─▶ re-create, or re-list
//! ```

use super::store::{Expect, RawLease, StoreError, WatchEvent, WatchItem, Written};
use super::{decode, plan_acquire, renew_delay, validate, validate_addr, Acquire, Lease};
use super::{LeaseError, Peer, PeerChange, PeerSet};
use crate::config::NetworkConfig;

use ipnetwork::Ipv4Network;
use rand::rngs::StdRng;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Tries at creating a lease before giving up (flannel: 10).
pub const ACQUIRE_TRIES: usize = 10;
/// Longest wait between retries of a failed store call.
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// What the keeper asks of the store. Each but `Delete` is answered with
/// an [`Input`]; one is outstanding at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// List every lease; answer [`Input::Listed`] or [`Input::Failed`].
    List,
    /// Read the network config; answer [`Input::Config`] or [`Input::Failed`].
    GetConfig,
    /// Write a lease under a condition; answer [`Input::Wrote`] or [`Input::Failed`].
    Write {
        subnet: Ipv4Network,
        value: String,
        ttl: Option<Duration>,
        expect: Expect,
    },
    /// Delete a lease of ours that no longer fits; no answer needed.
    Delete { subnet: Ipv4Network, expect: Expect },
    /// (Re)start the watch from this revision; answer
    /// [`Input::WatchStarted`] or [`Input::Failed`].
    Watch { from: i64 },
}

impl Request {
    /// Whether the daemon must answer this request with an [`Input`].
    pub fn needs_answer(&self) -> bool {
        !matches!(self, Request::Delete { .. })
    }
}

/// What the keeper asks of the host (the daemon carries it out; nothing
/// is answered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The peer set changed: publish a new route snapshot.
    Publish,
    /// We hold our first lease: the daemon can build the TUN.
    Acquired(Ipv4Network),
    /// Our subnet was taken: re-address the TUN, rewrite subnet.env and
    /// the rules for `to`.
    Moved { from: Ipv4Network, to: Ipv4Network },
    /// The network config key changed (its new text, or deleted).
    ConfigChanged(Option<String>),
    /// Give up: the daemon exits with this error.
    Fatal(String),
}

/// One step of the keeper's output, in order: a request to the store or
/// an effect on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Request(Request),
    Effect(Effect),
}

impl From<Request> for Action {
    fn from(r: Request) -> Self {
        Action::Request(r)
    }
}

impl From<Effect> for Action {
    fn from(e: Effect) -> Self {
        Action::Effect(e)
    }
}

impl Action {
    /// Whether the daemon must answer this action with an [`Input`].
    pub fn is_request(&self) -> bool {
        matches!(self, Action::Request(r) if r.needs_answer())
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Listed {
        leases: Vec<RawLease>,
        revision: i64,
    },
    /// `None`: the write's condition failed.
    Wrote(Option<Written>),
    WatchStarted,
    /// The network config key's text (`None`: no such key).
    Config(Option<String>),
    Watch(WatchItem),
    /// The watch stream broke.
    WatchBroken(StoreError),
    /// The outstanding request failed.
    Failed(StoreError),
    /// Time passed (a timer from [`Keeper::next_wakeup`] is due).
    Tick,
}

/// Why a write was made, to read its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Acquiring: create a new subnet, or re-put one of ours.
    Acquire {
        subnet: Ipv4Network,
        reservation: bool,
    },
    /// Our key vanished: create it again.
    Retake(Ipv4Network),
    Renew,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No subnet yet (start, or ours was taken): list, choose, write.
    Acquiring {
        previous: Option<Ipv4Network>,
        lost_races: usize,
        /// The subnet we held before, when moving.
        from: Option<Ipv4Network>,
    },
    /// We hold `own`, last written by us at `revision`.
    Holding {
        own: Ipv4Network,
        revision: i64,
        reservation: bool,
    },
}

/// Counters the keeper keeps; the daemon exports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeeperStats {
    pub renewals: u64,
    pub relists: u64,
    pub compactions: u64,
    pub reconnects: u64,
    /// Keys ignored now (malformed, or failing [`validate`]).
    pub ignored: u64,
}

/// Exponential backoff, 100 ms doubling to a cap (flannel's watch backoff).
#[derive(Debug, Clone, Copy)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }
    fn step(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_CAP);
        d
    }
}

/// The settings of a keeper.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cfg: NetworkConfig,
    pub public_ip: Ipv4Addr,
    /// What our lease says of us besides PublicIP (vxlan: our VtepMAC;
    /// wireguard: our public key).
    pub identity: crate::backend::Identity,
    pub ttl: Duration,
    pub renew_margin: Duration,
    /// How soon a failed renewal is tried again (flannel: a minute).
    pub renew_retry: Duration,
}

pub struct Keeper {
    s: Settings,
    value: String,
    rng: StdRng,
    phase: Phase,
    peers: PeerSet,
    /// Keys ignored now, with why: each is warned about once.
    ignored: BTreeMap<String, String>,
    /// Every watch event up to here has been applied.
    cursor: i64,
    watching: bool,
    /// The watch must not resume from `cursor`: re-list first.
    must_relist: bool,
    /// The outstanding request, to re-issue after a failure.
    pending: Option<Request>,
    purpose: Option<Purpose>,
    /// A failed request, to issue again at this time.
    retry: Option<(Instant, Request)>,
    /// When to try to get the watch going again after it broke.
    watch_at: Option<Instant>,
    backoff: Backoff,
    renew_at: Option<Instant>,
    outage_since: Option<Instant>,
    /// Started from the peer cache: our lease is not yet confirmed in the store.
    unconfirmed: bool,
    /// When our lease expires, as of its last successful write (None: a
    /// reservation without TTL, or not written yet).
    expires_at: Option<Instant>,
    /// The last answer from the store.
    last_contact: Option<Instant>,
    /// Started from the peer cache: the network config has not been read
    /// from the store yet (it is, before the first list).
    config_unread: bool,
    pub stats: KeeperStats,
}

impl Keeper {
    /// A keeper that starts by acquiring a lease (`previous`: the subnet of
    /// the last run, from subnet.env). Returns it and its first actions.
    pub fn new(s: Settings, previous: Option<Ipv4Network>, rng: StdRng) -> (Self, Vec<Action>) {
        let mut k = Keeper::idle(s, previous, rng);
        let a = k.request(Request::List, None);
        (k, a)
    }

    /// A keeper acquiring, with nothing asked yet.
    fn idle(s: Settings, previous: Option<Ipv4Network>, rng: StdRng) -> Self {
        Keeper {
            value: crate::backend::lease_attrs(&s.cfg.backend, s.public_ip, s.identity).to_json(),
            s,
            rng,
            phase: Phase::Acquiring {
                previous,
                lost_races: 0,
                from: None,
            },
            peers: PeerSet::new(None),
            ignored: BTreeMap::new(),
            cursor: 0,
            watching: false,
            must_relist: false,
            pending: None,
            purpose: None,
            retry: None,
            watch_at: None,
            backoff: Backoff::new(),
            renew_at: None,
            outage_since: None,
            unconfirmed: false,
            config_unread: false,
            expires_at: None,
            last_contact: None,
            stats: KeeperStats::default(),
        }
    }

    /// A keeper that starts from what the node knew (its subnet and the
    /// last peer table, from the peer cache) because the store does not
    /// answer: it routes at once, and reconciles when the store answers —
    /// our lease confirmed (and renewed), re-created if it is gone, or a
    /// move if another host holds it now.
    pub fn from_cache(
        s: Settings,
        own: Ipv4Network,
        peers: impl IntoIterator<Item = (Ipv4Network, Peer)>,
        rng: StdRng,
    ) -> (Self, Vec<Action>) {
        let mut k = Keeper::idle(s, Some(own), rng);
        k.phase = Phase::Holding {
            own,
            revision: 0,
            reservation: false,
        };
        k.unconfirmed = true;
        k.config_unread = true;
        k.peers = PeerSet::new(Some(own));
        let valid: Vec<_> = peers
            .into_iter()
            .filter(|&(sn, p)| {
                use crate::config::Backend;
                let complete = match k.s.cfg.backend {
                    Backend::Udp { .. } => true,
                    Backend::Vxlan(_) => p.mac.is_some(),
                    Backend::Wireguard(_) => p.key.is_some(),
                };
                validate_addr(&k.s.cfg, sn, p.ip).is_ok() && complete
            })
            .collect();
        k.peers.resync(valid);
        let mut out = vec![Action::Effect(Effect::Publish)];
        k.next(Instant::now(), &mut out);
        (k, out)
    }

    /// The subnet we hold, if any.
    pub fn own(&self) -> Option<Ipv4Network> {
        match self.phase {
            Phase::Holding { own, .. } => Some(own),
            Phase::Acquiring { .. } => None,
        }
    }

    pub fn peers(&self) -> &PeerSet {
        &self.peers
    }

    /// When our lease expires, as of its last write.
    pub fn expires_at(&self) -> Option<Instant> {
        self.expires_at
    }

    /// When the store last answered.
    pub fn last_contact(&self) -> Option<Instant> {
        self.last_contact
    }

    /// Whether the watch is running.
    pub fn watching(&self) -> bool {
        self.watching
    }

    /// When [`Input::Tick`] is next due.
    pub fn next_wakeup(&self) -> Option<Instant> {
        if self.pending.is_some() {
            return None;
        }
        let retry = self.retry.as_ref().map(|(t, _)| *t);
        // The watch is restarted only once no retry waits (see `next`):
        // its time alone must not wake us, or we would spin until the retry.
        let watch = self
            .watch_at
            .filter(|_| !self.watching && self.retry.is_none());
        [retry, self.renew_at, watch].into_iter().flatten().min()
    }

    /// Handles one input at time `now`.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if !matches!(
            input,
            Input::Failed(_) | Input::WatchBroken(_) | Input::Tick
        ) {
            self.last_contact = Some(now);
        }
        match input {
            Input::Listed { leases, revision } => {
                self.pending = None;
                self.backoff = Backoff::new();
                self.on_list(&leases, revision, now, &mut out);
            }
            Input::Wrote(w) => {
                self.pending = None;
                self.backoff = Backoff::new();
                let purpose = self.purpose.take();
                self.on_wrote(purpose, w, now, &mut out);
            }
            Input::Config(text) => {
                self.pending = None;
                self.backoff = Backoff::new();
                self.config_unread = false;
                self.on_config(text, &mut out);
            }
            Input::WatchStarted => {
                self.pending = None;
                self.backoff = Backoff::new();
                self.watching = true;
                self.must_relist = false;
                if let Some(since) = self.outage_since.take() {
                    self.stats.reconnects += 1;
                    tracing::info!(
                        peers = self.peers.len(), down_for = ?now.saturating_duration_since(since),
                        from_revision = self.cursor + 1,
                        "etcd is back: watching leases again"
                    );
                }
            }
            Input::Watch(WatchItem::Events { events, revision }) => {
                self.on_events(&events, &mut out);
                self.cursor = self.cursor.max(revision);
            }
            Input::Watch(WatchItem::Compacted) => {
                self.stats.compactions += 1;
                tracing::warn!(
                    from_revision = self.cursor + 1,
                    "the watch's revision was compacted away; re-listing leases"
                );
                self.watching = false;
                self.must_relist = true;
                self.watch_at = Some(now);
            }
            Input::WatchBroken(e) => {
                tracing::warn!("lease watch broke ({e}); the data path keeps forwarding to known peers; retrying with backoff");
                self.watching = false;
                self.outage_since.get_or_insert(now);
                self.watch_at = Some(now + self.backoff.step());
            }
            Input::Failed(e) => self.on_failed(e, now, &mut out),
            Input::Tick => {}
        }
        self.next(now, &mut out);
        out
    }

    /// Issues what is due when nothing is outstanding: a failed request
    /// again, a renewal (even while the watch is down), the watch.
    fn next(&mut self, now: Instant, out: &mut Vec<Action>) {
        let fatal = out
            .iter()
            .any(|a| matches!(a, Action::Effect(Effect::Fatal(_))));
        if fatal || self.pending.is_some() || out.iter().any(Action::is_request) {
            return;
        }
        if self.retry.as_ref().is_some_and(|(at, _)| *at <= now) {
            let (_, a) = self.retry.take().expect("checked");
            let purpose = self.purpose;
            // A watch resumes from the cursor, or re-lists. A renewal is
            // rebuilt on the revision known now: the failed one may have
            // committed with its reply lost, and the watch (or a list) has
            // since shown the key's new revision.
            let a = match a {
                Request::Watch { .. } => self.resume(),
                Request::Write { .. } if purpose == Some(Purpose::Renew) => match self.renewal() {
                    Some(a) => a,
                    None => return,
                },
                a => a,
            };
            out.extend(self.request(a, purpose));
            return;
        }
        if self.config_unread && self.retry.is_none() {
            out.extend(self.request(Request::GetConfig, None));
            return;
        }
        let Phase::Holding { reservation, .. } = self.phase else {
            return;
        };
        if !reservation && self.renew_at.is_some_and(|t| t <= now) {
            self.renew_at = None;
            if let Some(a) = self.renewal() {
                out.extend(self.request(a, Some(Purpose::Renew)));
            }
            return;
        }
        if !self.watching && self.retry.is_none() && self.watch_at.is_none_or(|t| t <= now) {
            self.watch_at = None;
            let a = self.resume();
            out.extend(self.request(a, None));
        }
    }

    /// The config read when the store answers after a start from the peer
    /// cache. flannel reads the config once, at start; a start from the
    /// cache ran on the config the node last saw, so it now does what that
    /// read would have: the same meaning goes on (the text is the cache's
    /// from now on), another meaning ends the daemon so that the service
    /// manager restarts it on etcd's config. A deleted or invalid config
    /// keeps the running one, as it would while running.
    fn on_config(&mut self, text: Option<String>, out: &mut Vec<Action>) {
        if let Some(t) = &text {
            match NetworkConfig::parse(t) {
                Ok(c) if c != self.s.cfg => {
                    let etcd: Vec<&str> = t.split_whitespace().collect();
                    out.push(Action::Effect(Effect::Fatal(format!(
                        "the network config in etcd is not the one in the peer cache flanneld started from; exiting so that flanneld restarts on etcd's config: {}",
                        etcd.join(" ")
                    ))));
                    return;
                }
                Ok(_) => {
                    tracing::info!("etcd answers: its network config is the one we started from")
                }
                Err(_) => {}
            }
        }
        out.push(Action::Effect(Effect::ConfigChanged(text)));
    }

    /// The write that renews our lease, on the revision we last saw.
    fn renewal(&self) -> Option<Request> {
        let Phase::Holding { own, revision, .. } = self.phase else {
            return None;
        };
        Some(Request::Write {
            subnet: own,
            value: self.value.clone(),
            ttl: Some(self.s.ttl),
            expect: Expect::Revision(revision),
        })
    }

    /// How to get the watch going again: from the cursor, or by a re-list.
    fn resume(&mut self) -> Request {
        if self.must_relist || self.cursor == 0 {
            Request::List
        } else {
            Request::Watch {
                from: self.cursor + 1,
            }
        }
    }

    fn request(&mut self, a: Request, purpose: Option<Purpose>) -> Vec<Action> {
        self.pending = Some(a.clone());
        self.purpose = purpose;
        vec![a.into()]
    }

    fn on_failed(&mut self, e: StoreError, now: Instant, out: &mut Vec<Action>) {
        let Some(a) = self.pending.take() else {
            return;
        };
        let first_acquire = matches!(self.phase, Phase::Acquiring { from: None, .. });
        if e.is_permanent() && first_acquire {
            out.push(Action::Effect(Effect::Fatal(format!(
                "etcd refused us: {e}"
            ))));
            return;
        }
        if e.is_permanent() {
            tracing::error!("etcd refuses us ({e}); fix the credentials, retrying");
        }
        let wait = match self.purpose {
            Some(Purpose::Renew) => {
                let own = self.own().map(|o| o.to_string()).unwrap_or_default();
                tracing::warn!(
                    "renewing lease {own} failed, retrying in {:?}: {e}",
                    self.s.renew_retry
                );
                self.s.renew_retry
            }
            _ => {
                if self.outage_since.is_none() {
                    tracing::warn!("{} failed, retrying: {e}", describe(&a));
                    self.outage_since = Some(now);
                }
                self.backoff.step()
            }
        };
        self.retry = Some((now + wait, a));
    }

    /// Validates a decoded (or undecodable) lease stored at `key`; warns
    /// once per key about one that is not admitted.
    fn admit(&mut self, key: &str, decoded: Result<Lease, String>) -> Option<(Lease, Peer)> {
        let verdict = decoded.and_then(|l| {
            validate(&self.s.cfg, &l)
                .map(|p| (l, p))
                .map_err(|r| format!("ignoring lease {key}: {r}"))
        });
        let admitted = match verdict {
            Ok(l) => {
                self.ignored.remove(key);
                Some(l)
            }
            Err(why) => {
                if self.ignored.get(key) != Some(&why) {
                    tracing::warn!("{why}");
                    self.ignored.insert(key.to_string(), why);
                }
                None
            }
        };
        self.stats.ignored = self.ignored.len() as u64;
        admitted
    }

    fn on_list(&mut self, raw: &[RawLease], revision: i64, now: Instant, out: &mut Vec<Action>) {
        let keys: std::collections::BTreeSet<&str> = raw.iter().map(|r| r.key.as_str()).collect();
        self.ignored.retain(|k, _| keys.contains(k.as_str()));
        // Every decodable lease, for the subnet choice (its own shape
        // rules); the valid ones, for routes.
        let mut all = Vec::with_capacity(raw.len());
        let mut valid = Vec::with_capacity(raw.len());
        for r in raw {
            let decoded = decode(r);
            if let Ok(l) = &decoded {
                all.push(l.clone());
            }
            if let Some((l, p)) = self.admit(&r.key, decoded) {
                valid.push((l.subnet, p));
            }
        }
        self.stats.ignored = self.ignored.len() as u64;
        if !matches!(self.phase, Phase::Acquiring { from: None, .. }) || self.watching {
            self.stats.relists += 1;
        }
        let watch_was_down = !self.watching;
        match self.phase {
            Phase::Holding { own, .. } => {
                let mine = all.iter().find(|l| l.subnet == own);
                match mine {
                    Some(l) if l.attrs.public_ip == self.s.public_ip => {
                        let confirm = std::mem::take(&mut self.unconfirmed);
                        if let Phase::Holding {
                            revision: r,
                            reservation,
                            ..
                        } = &mut self.phase
                        {
                            *r = l.mod_revision;
                            if confirm {
                                // Renew at once: how long it has left is unknown.
                                *reservation = l.is_reservation();
                                self.renew_at = (!*reservation).then_some(now);
                                tracing::info!(subnet = %own, "our lease is confirmed in etcd");
                            } else if !*reservation
                                && self.renew_at.is_none()
                                && self.retry.is_none()
                            {
                                // No renewal scheduled: a renewal whose
                                // reply was lost (it may have committed, and
                                // its compare is stale) ended in this list.
                                // Renew at once on the listed revision.
                                self.renew_at = Some(now);
                                tracing::info!(subnet = %own, "renewing our lease at once on the listed revision");
                            }
                        }
                        self.resync_peers(&valid, out);
                    }
                    Some(l) => {
                        self.unconfirmed = false;
                        tracing::error!(subnet = %own, holder = %l.attrs.public_ip, "our subnet is held by another host");
                        self.taken_over(own, &valid, &all, out);
                    }
                    None => {
                        self.unconfirmed = false;
                        self.resync_peers(&valid, out);
                        tracing::warn!(subnet = %own, "our lease is missing after the re-list; taking it back");
                        self.retake(own, out);
                    }
                }
            }
            Phase::Acquiring { .. } => {
                self.resync_peers(&valid, out);
                self.plan(&all, out);
            }
        }
        if watch_was_down {
            self.cursor = revision;
            self.must_relist = false;
        }
    }

    fn resync_peers(&mut self, valid: &[(Ipv4Network, Peer)], out: &mut Vec<Action>) {
        let changes = self.peers.resync(valid.iter().copied());
        if !changes.is_empty() {
            log_changes(&changes);
            out.push(Action::Effect(Effect::Publish));
        }
    }

    /// Another host holds our subnet: route to it, and acquire a new one
    /// from the same list.
    fn taken_over(
        &mut self,
        own: Ipv4Network,
        valid: &[(Ipv4Network, Peer)],
        all: &[Lease],
        out: &mut Vec<Action>,
    ) {
        self.lose(own);
        self.resync_peers(valid, out);
        self.plan(all, out);
    }

    /// Another host holds `own` now: we hold nothing until we acquire anew.
    fn lose(&mut self, own: Ipv4Network) {
        self.phase = Phase::Acquiring {
            previous: None,
            lost_races: 0,
            from: Some(own),
        };
        self.renew_at = None;
        self.peers.clear_own();
    }

    fn retake(&mut self, own: Ipv4Network, out: &mut Vec<Action>) {
        let a = Request::Write {
            subnet: own,
            value: self.value.clone(),
            ttl: Some(self.s.ttl),
            expect: Expect::Absent,
        };
        out.extend(self.request(a, Some(Purpose::Retake(own))));
    }

    /// Chooses a subnet from a list (flannel's choice) and writes it.
    fn plan(&mut self, all: &[Lease], out: &mut Vec<Action>) {
        let Phase::Acquiring { previous, from, .. } = self.phase else {
            return;
        };
        let plan = match plan_acquire(&self.s.cfg, all, self.s.public_ip, previous, &mut self.rng) {
            Ok(p) => p,
            Err(e @ LeaseError::OutOfSubnets { .. }) => {
                out.push(Action::Effect(Effect::Fatal(e.to_string())));
                return;
            }
        };
        for sn in plan.delete {
            if from == Some(sn) {
                continue;
            }
            let rev = all
                .iter()
                .find(|l| l.subnet == sn)
                .map_or(0, |l| l.mod_revision);
            tracing::info!(subnet = %sn, "deleting our stale lease that no longer fits the config");
            out.push(Action::Request(Request::Delete {
                subnet: sn,
                expect: Expect::Revision(rev),
            }));
        }
        let (subnet, reservation, expect) = match plan.action {
            Acquire::Reuse {
                subnet,
                reservation,
            } => {
                let rev = all
                    .iter()
                    .find(|l| l.subnet == subnet)
                    .map_or(0, |l| l.mod_revision);
                (subnet, reservation, Expect::Revision(rev))
            }
            Acquire::Create(subnet) => (subnet, false, Expect::Absent),
        };
        let a = Request::Write {
            subnet,
            value: self.value.clone(),
            ttl: (!reservation).then_some(self.s.ttl),
            expect,
        };
        out.extend(self.request(
            a,
            Some(Purpose::Acquire {
                subnet,
                reservation,
            }),
        ));
    }

    fn on_wrote(
        &mut self,
        purpose: Option<Purpose>,
        w: Option<Written>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(purpose) = purpose else { return };
        match (purpose, w) {
            (
                Purpose::Acquire {
                    subnet,
                    reservation,
                },
                Some(w),
            ) => {
                let from = match self.phase {
                    Phase::Acquiring { from, .. } => from,
                    Phase::Holding { .. } => None,
                };
                tracing::info!(%subnet, reservation, "lease acquired");
                self.hold(subnet, reservation, w, now, out);
                match from {
                    None => out.push(Action::Effect(Effect::Acquired(subnet))),
                    Some(old) if old != subnet => {
                        out.push(Action::Effect(Effect::Moved {
                            from: old,
                            to: subnet,
                        }));
                    }
                    Some(_) => {}
                }
            }
            (Purpose::Acquire { subnet, .. }, None) => {
                // Lost the race for it (or our lease changed since the list).
                if let Phase::Acquiring { lost_races, .. } = &mut self.phase {
                    *lost_races += 1;
                    if *lost_races >= ACQUIRE_TRIES {
                        out.push(Action::Effect(Effect::Fatal(format!(
                            "could not acquire a subnet lease: lost the race {ACQUIRE_TRIES} times"
                        ))));
                        return;
                    }
                }
                tracing::debug!(%subnet, "lost the race for a subnet, re-listing");
                out.extend(self.request(Request::List, None));
            }
            (Purpose::Retake(own), Some(w)) => {
                tracing::info!(subnet = %own, "lease re-created");
                self.hold(own, false, w, now, out);
            }
            (Purpose::Retake(own), None) => {
                // Someone created it first: the list shows who, and we move.
                tracing::warn!(subnet = %own, "our subnet was created by another writer first");
                out.extend(self.request(Request::List, None));
            }
            (Purpose::Renew, Some(w)) => {
                self.stats.renewals += 1;
                if let Phase::Holding { own, revision, .. } = &mut self.phase {
                    *revision = w.revision;
                    tracing::info!(subnet = %own, ttl = ?w.expires_in, "lease renewed");
                }
                self.renew_at = w
                    .expires_in
                    .map(|d| now + renew_delay(d, self.s.renew_margin));
                self.expires_at = w.expires_in.map(|d| now + d);
            }
            (Purpose::Renew, None) => {
                // Our key changed since we wrote it: never overwrite
                // another host's lease. The list says what happened.
                tracing::warn!(
                    "our lease changed in etcd since we wrote it; re-listing before renewing"
                );
                out.extend(self.request(Request::List, None));
            }
        }
    }

    fn hold(
        &mut self,
        own: Ipv4Network,
        reservation: bool,
        w: Written,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.phase = Phase::Holding {
            own,
            revision: w.revision,
            reservation,
        };
        self.renew_at = w
            .expires_in
            .map(|d| now + renew_delay(d, self.s.renew_margin));
        self.expires_at = w.expires_in.map(|d| now + d);
        if let Some(c) = self.peers.set_own(own) {
            log_changes(&[c]);
        }
        out.push(Action::Effect(Effect::Publish));
    }

    fn on_events(&mut self, events: &[WatchEvent], out: &mut Vec<Action>) {
        let mut changes = Vec::new();
        let own = self.own();
        let mut lost: Option<Option<Ipv4Addr>> = None;
        let mut holder_peer = None;
        for ev in events {
            match ev {
                WatchEvent::Config(text) => {
                    out.push(Action::Effect(Effect::ConfigChanged(text.clone())))
                }
                WatchEvent::Put(raw) => {
                    let decoded = decode(raw);
                    let subnet = decoded.as_ref().ok().map(|l| l.subnet);
                    if let Some(l) = decoded.as_ref().ok().filter(|l| Some(l.subnet) == own) {
                        if l.attrs.public_ip == self.s.public_ip {
                            if let Phase::Holding { revision, .. } = &mut self.phase {
                                *revision = (*revision).max(l.mod_revision);
                            }
                        } else {
                            // Taken over: the new owner is a peer once we move.
                            lost = Some(Some(l.attrs.public_ip));
                            holder_peer = validate(&self.s.cfg, l).ok();
                        }
                        continue;
                    }
                    match self.admit(&raw.key, decoded) {
                        Some((l, p)) => changes.extend(self.peers.upsert(l.subnet, p)),
                        None => {
                            // A key that became invalid is no longer a route.
                            if let Some(sn) = subnet {
                                changes.extend(self.peers.remove(sn));
                            }
                        }
                    }
                }
                WatchEvent::Delete(key) => {
                    self.ignored.remove(key);
                    self.stats.ignored = self.ignored.len() as u64;
                    match crate::subnet::parse_key(key) {
                        Ok(sn) if Some(sn) == own => lost = Some(None),
                        Ok(sn) => changes.extend(self.peers.remove(sn)),
                        Err(_) => {}
                    }
                }
            }
        }
        if !changes.is_empty() {
            log_changes(&changes);
            out.push(Action::Effect(Effect::Publish));
        }
        let (Some(how), Some(own)) = (lost, own) else {
            return;
        };
        match how {
            None => {
                tracing::warn!(subnet = %own, "our lease was deleted in etcd (Go flanneld would exit here); taking it back");
                self.retake(own, out);
            }
            Some(holder) => {
                tracing::error!(subnet = %own, %holder, "our subnet was taken over by another host");
                // Its holder is reachable at once, as any peer.
                self.lose(own);
                if let Some(c) = holder_peer.and_then(|p| self.peers.upsert(own, p)) {
                    log_changes(&[c]);
                }
                out.push(Action::Effect(Effect::Publish));
                out.extend(self.request(Request::List, None));
            }
        }
    }
}

fn describe(a: &Request) -> &'static str {
    match a {
        Request::List => "listing leases",
        Request::GetConfig => "reading the network config",
        Request::Write { .. } => "writing our lease",
        Request::Watch { .. } => "starting the watch",
        _ => "a store call",
    }
}

/// One line per change; a big batch (a start-up list, a re-list) gets a
/// summary line at info and the details at debug.
pub fn log_changes(changes: &[PeerChange]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::memory::{Bed, Memory, ME, PREFIX};
    use crate::subnet::lease_key;
    use crate::subnet::LeaseAttrs;

    const NET: &str = "10.44.0.0/16";

    fn sn(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn key(s: &str) -> String {
        lease_key(PREFIX, sn(s))
    }

    fn own(bed: &Bed) -> Ipv4Network {
        bed.keeper.own().expect("holds a lease")
    }

    /// A bed whose keeper holds 10.44.1.0/24, with a peer on 10.44.2.0/24.
    fn holding() -> Bed {
        let mut bed = Bed::start_with(NET, Some(sn("10.44.1.0/24")), |m, now| {
            m.put_lease("10.44.2.0/24", [192, 168, 0, 2], now);
        });
        assert_eq!(own(&bed), sn("10.44.1.0/24"));
        assert!(bed.keeper.watching());
        bed.advance(Duration::from_millis(1));
        bed
    }

    #[test]
    fn a_fresh_host_acquires_publishes_and_watches() {
        let bed = holding();
        assert!(bed.effects.contains(&Effect::Acquired(sn("10.44.1.0/24"))));
        assert!(bed.effects.contains(&Effect::Publish));
        assert_eq!(bed.holder(sn("10.44.1.0/24")), Some(ME));
        assert_eq!(
            bed.keeper.peers().get(&sn("10.44.2.0/24")),
            Some([192, 168, 0, 2].into())
        );
    }

    #[test]
    fn rogue_leases_are_ignored_counted_and_never_block_joining() {
        let mut bed = Bed::start(NET, |m, now| {
            for k in ["0.0.0.0-0", "10.44.0.0-16", "10.44.85.0-25"] {
                let v = LeaseAttrs::udp([192, 168, 9, 9].into()).to_json();
                m.put(&format!("{PREFIX}/subnets/{k}"), v.as_bytes(), None, now);
            }
            m.put_lease("10.44.85.0/24", [192, 168, 0, 2], now);
            m.put_lease("10.44.86.0/24", [127, 0, 0, 1], now);
            m.put(&format!("{PREFIX}/subnets/junk"), b"x", None, now);
            m.put(&key("10.44.87.0/24"), &vec![b'{'; 100_000], None, now);
        });
        // A subnet was acquired despite 0.0.0.0-0 and the /16.
        assert_eq!(own(&bed).prefix(), 24);
        // Only the valid peer routes; the /25 does not hijack its /24.
        let peers = bed.keeper.peers();
        assert_eq!(peers.len(), 1);
        let snap = peers.snapshot(8285);
        assert_eq!(
            snap.lookup([10, 44, 85, 7].into()).map(|a| *a.addr.ip()),
            Some([192, 168, 0, 2].into())
        );
        assert_eq!(
            snap.lookup([10, 44, 86, 7].into()),
            None,
            "loopback PublicIP"
        );
        assert_eq!(bed.keeper.stats.ignored, 6);
        // A re-list (a compaction) warns no more and counts the same.
        bed.store.lock().compact();
        bed.store
            .lock()
            .put_lease("10.44.90.0/24", [192, 168, 0, 3], bed.now);
        bed.store.lock().compact();
        bed.advance(Duration::from_millis(10));
        assert_eq!(bed.keeper.stats.ignored, 6);
        assert_eq!(bed.keeper.peers().len(), 2);
        // The rogue /25 deleted: no longer counted.
        bed.store
            .lock()
            .remove(&format!("{PREFIX}/subnets/10.44.85.0-25"));
        bed.advance(Duration::from_millis(10));
        assert_eq!(bed.keeper.stats.ignored, 5);
        // A valid peer rewritten with a bad PublicIP stops being a route.
        bed.store
            .lock()
            .put_lease("10.44.90.0/24", [0, 0, 0, 0], bed.now);
        bed.advance(Duration::from_millis(10));
        assert_eq!(bed.keeper.peers().get(&sn("10.44.90.0/24")), None);
        assert_eq!(bed.keeper.stats.ignored, 6);
    }

    #[test]
    fn a_deleted_lease_is_taken_back_and_a_failed_re_create_is_retried() {
        let mut bed = holding();
        bed.store.lock().failing_writes = 2;
        bed.store.lock().remove(&key("10.44.1.0/24"));
        bed.advance(Duration::from_millis(10));
        assert_eq!(
            bed.holder(sn("10.44.1.0/24")),
            None,
            "both tries failed so far"
        );
        assert!(bed.keeper.watching(), "the watch stayed healthy");
        // Retried with backoff while the watch is healthy: back within seconds.
        bed.advance(Duration::from_secs(2));
        assert_eq!(bed.holder(sn("10.44.1.0/24")), Some(ME));
        assert_eq!(own(&bed), sn("10.44.1.0/24"));
        assert!(bed.moved().is_empty());
    }

    #[test]
    fn a_takeover_seen_by_the_watch_routes_to_the_new_owner_and_moves_us() {
        let mut bed = holding();
        bed.store
            .lock()
            .put_lease("10.44.1.0/24", [192, 168, 0, 7], bed.now);
        bed.advance(Duration::from_millis(10));
        let new = own(&bed);
        assert_ne!(new, sn("10.44.1.0/24"));
        assert_eq!(bed.moved(), vec![(sn("10.44.1.0/24"), new)]);
        // The new owner of our old subnet is a peer at once.
        assert_eq!(
            bed.keeper.peers().get(&sn("10.44.1.0/24")),
            Some([192, 168, 0, 7].into())
        );
        // Its lease was not overwritten.
        assert_eq!(
            bed.holder(sn("10.44.1.0/24")),
            Some([192, 168, 0, 7].into())
        );
        assert_eq!(bed.holder(new), Some(ME));
    }

    #[test]
    fn a_takeover_during_a_watch_gap_is_found_on_resume_or_re_list() {
        for compacted in [false, true] {
            let mut bed = holding();
            let relists = bed.keeper.stats.relists;
            bed.store.lock().down = true;
            bed.advance(Duration::from_millis(10));
            assert!(!bed.keeper.watching());
            bed.store.lock().down = false;
            bed.store
                .lock()
                .put_lease("10.44.1.0/24", [192, 168, 0, 7], bed.now);
            bed.store.lock().remove(&key("10.44.2.0/24"));
            bed.store
                .lock()
                .put_lease("10.44.3.0/24", [192, 168, 0, 3], bed.now);
            if compacted {
                bed.store.lock().compact();
            }
            bed.advance(Duration::from_secs(6));
            let new = own(&bed);
            assert_ne!(new, sn("10.44.1.0/24"), "compacted {compacted}");
            let p = bed.keeper.peers();
            assert_eq!(p.get(&sn("10.44.1.0/24")), Some([192, 168, 0, 7].into()));
            assert_eq!(p.get(&sn("10.44.2.0/24")), None);
            assert_eq!(p.get(&sn("10.44.3.0/24")), Some([192, 168, 0, 3].into()));
            // Resuming from the cursor needs no re-list; a compaction does
            // one, and the takeover's own list another.
            assert_eq!(bed.keeper.stats.compactions, compacted as u64);
            assert!(bed.keeper.stats.relists > relists, "compacted {compacted}");
            assert_eq!(bed.keeper.stats.reconnects, 1);
        }
    }

    #[test]
    fn a_renewal_never_overwrites_another_hosts_lease() {
        let mut bed = holding();
        // Another host writes our key just before the renewal, and the
        // watch has not told us yet (the bed delivers on advance only).
        let k = key("10.44.1.0/24");
        let v = LeaseAttrs::udp([192, 168, 0, 7].into()).to_json();
        bed.store
            .lock()
            .put(&k, v.as_bytes(), Some(Duration::from_secs(600)), bed.now);
        let now = bed.now + Duration::from_secs(541);
        bed.now = now;
        let a = bed.keeper.handle(Input::Tick, now);
        assert!(matches!(
            a.as_slice(),
            [Action::Request(Request::Write {
                expect: Expect::Revision(_),
                ..
            })]
        ));
        bed.run(a);
        assert_eq!(
            bed.holder(sn("10.44.1.0/24")),
            Some([192, 168, 0, 7].into())
        );
        assert_ne!(own(&bed), sn("10.44.1.0/24"));
        assert_eq!(bed.keeper.stats.renewals, 0);
    }

    #[test]
    fn renewals_happen_before_expiry_and_survive_an_outage() {
        let mut bed = holding();
        bed.advance(Duration::from_secs(545));
        assert_eq!(
            bed.keeper.stats.renewals, 1,
            "renewed 60 s before the 600 s TTL"
        );
        // etcd away when the next renewal is due: retried until it answers.
        bed.advance(Duration::from_secs(530));
        bed.store.lock().down = true;
        bed.advance(Duration::from_secs(40));
        assert_eq!(bed.keeper.stats.renewals, 1);
        bed.store.lock().down = false;
        bed.advance(Duration::from_secs(16));
        assert_eq!(bed.keeper.stats.renewals, 2);
        assert_eq!(bed.holder(own(&bed)), Some(ME));
        assert!(bed.keeper.watching());
    }

    #[test]
    fn a_renewal_whose_reply_is_lost_is_renewed_again_before_expiry() {
        let mut bed = holding();
        let k = key(&own(&bed).to_string());
        // The renewal due at 540 s commits, but its answer is lost.
        bed.store.lock().lost_replies = 1;
        let mut t = 0;
        while t < 2000 {
            bed.advance(Duration::from_secs(10));
            t += 10;
            assert!(
                bed.store.lock().get(&k).is_some(),
                "our lease is gone at {t} s"
            );
        }
        assert!(!bed.store.lock().expired.contains(&k), "our lease expired");
        // 540 (lost), then at once after the re-list, then every 540 s.
        assert!(
            bed.keeper.stats.renewals >= 3,
            "{}",
            bed.keeper.stats.renewals
        );
        assert_eq!(bed.holder(own(&bed)), Some(ME));
    }

    #[test]
    fn a_renewal_retried_after_a_lost_reply_with_the_watch_down_still_renews() {
        let mut bed = holding();
        let k = key(&own(&bed).to_string());
        bed.store.lock().lost_replies = 1;
        bed.advance(Duration::from_secs(541));
        // The watch breaks too: the retry cannot learn the new revision
        // from it, and must not be lost.
        bed.store.lock().down = true;
        bed.advance(Duration::from_secs(5));
        bed.store.lock().down = false;
        let mut t = 546;
        while t < 2500 {
            bed.advance(Duration::from_secs(10));
            t += 10;
            assert!(
                bed.store.lock().get(&k).is_some(),
                "our lease is gone at {t} s"
            );
        }
        assert!(!bed.store.lock().expired.contains(&k), "our lease expired");
        assert!(
            bed.keeper.stats.renewals >= 3,
            "{}",
            bed.keeper.stats.renewals
        );
    }

    #[test]
    fn an_expired_lease_is_re_created_after_an_outage() {
        let mut bed = holding();
        bed.store.lock().down = true;
        bed.advance(Duration::from_secs(10));
        // The lease expires in the store while we cannot reach it.
        bed.store.lock().down = false;
        bed.store.lock().remove(&key("10.44.1.0/24"));
        bed.advance(Duration::from_secs(6));
        assert_eq!(bed.holder(sn("10.44.1.0/24")), Some(ME));
        assert_eq!(own(&bed), sn("10.44.1.0/24"));
    }

    #[test]
    fn config_changes_are_reported_and_a_full_network_is_fatal() {
        let mut bed = holding();
        bed.store.lock().put(
            &format!("{PREFIX}/config"),
            br#"{"Network":"10.9.0.0/16"}"#,
            None,
            bed.now,
        );
        bed.advance(Duration::from_millis(10));
        assert!(bed.effects.contains(&Effect::ConfigChanged(Some(
            r#"{"Network":"10.9.0.0/16"}"#.into()
        ))));

        let full = r#"{"Network":"10.44.0.0/16","SubnetMin":"10.44.1.0","SubnetMax":"10.44.2.0"}"#;
        let bed = Bed::start(full, |m: &mut Memory, now| {
            m.put_lease("10.44.1.0/24", [192, 168, 0, 5], now);
            m.put_lease("10.44.2.0/24", [192, 168, 0, 6], now);
        });
        assert!(bed.keeper.own().is_none());
        assert!(bed
            .effects
            .iter()
            .any(|a| matches!(a, Effect::Fatal(w) if w.contains("out of subnets"))));
    }

    #[test]
    fn a_permanent_error_at_start_is_fatal_and_later_is_retried() {
        let bed = Bed::start(NET, |m, _| m.refuse = true);
        assert!(bed.keeper.own().is_none());
        assert!(bed
            .effects
            .iter()
            .any(|a| matches!(a, Effect::Fatal(w) if w.contains("permission denied"))));
        // An outage at start is waited out.
        let mut bed = Bed::start(NET, |m, _| m.down = true);
        assert!(bed.effects.is_empty());
        bed.advance(Duration::from_secs(3));
        bed.store.lock().down = false;
        bed.advance(Duration::from_secs(6));
        assert!(bed.keeper.own().is_some());
        // Refused later (credentials revoked): retried, not fatal.
        let mut bed = holding();
        bed.store.lock().refuse = true;
        bed.advance(Duration::from_secs(560));
        assert!(!bed.effects.iter().any(|a| matches!(a, Effect::Fatal(_))));
        assert_eq!(bed.keeper.stats.renewals, 0);
        bed.store.lock().refuse = false;
        bed.advance(Duration::from_secs(16));
        assert_eq!(bed.keeper.stats.renewals, 1);
    }

    #[test]
    fn a_keeper_resumed_from_the_cache_routes_at_once_and_confirms_later() {
        let cache = [
            ("10.44.2.0/24", [192, 168, 0, 2]),
            ("0.0.0.0/0", [192, 168, 0, 9]),
        ];
        let mut bed = Bed::from_cache(NET, "10.44.1.0/24", &cache, |m, now| {
            m.put_lease("10.44.1.0/24", [192, 168, 0, 1], now);
            m.put_lease("10.44.3.0/24", [192, 168, 0, 3], now);
            m.down = true;
        });
        // Routes from the cache at once (a rogue entry in it is dropped),
        // without a word from the store.
        assert_eq!(bed.effects.first(), Some(&Effect::Publish));
        assert_eq!(own(&bed), sn("10.44.1.0/24"));
        let p = bed.keeper.peers();
        assert_eq!(p.len(), 1);
        assert_eq!(p.get(&sn("10.44.2.0/24")), Some([192, 168, 0, 2].into()));
        bed.advance(Duration::from_secs(3));
        assert_eq!(bed.keeper.stats.renewals, 0);
        // The store answers: the list replaces the cached peers, our lease
        // is confirmed and renewed at once (its time left is unknown).
        bed.store.lock().down = false;
        bed.advance(Duration::from_secs(6));
        let p = bed.keeper.peers();
        assert_eq!(p.get(&sn("10.44.2.0/24")), None);
        assert_eq!(p.get(&sn("10.44.3.0/24")), Some([192, 168, 0, 3].into()));
        assert_eq!(bed.keeper.stats.renewals, 1);
        assert!(bed.keeper.watching());
        assert!(bed.moved().is_empty());
    }

    /// The config a cache-started keeper reads when the store answers:
    /// the same meaning goes on, another ends the daemon before anything is
    /// written under the cached config, a missing one keeps the running one.
    #[test]
    fn the_lease_expiry_and_the_last_answer_are_known() {
        let mut bed = holding();
        let t0 = bed.now - Duration::from_millis(1); // written then
        let exp = bed.keeper.expires_at().expect("a TTL lease");
        assert_eq!(exp, t0 + Duration::from_secs(600));
        assert!(bed.keeper.last_contact().is_some_and(|t| t >= t0));
        // Renewed 60 s before expiry: the expiry moves on.
        bed.advance(Duration::from_secs(560));
        assert_eq!(bed.keeper.stats.renewals, 1);
        let renewed = bed.keeper.expires_at().unwrap();
        assert_eq!(renewed, t0 + Duration::from_secs(540 + 600));
        // Down: the last answer stays where it was.
        bed.store.lock().down = true;
        let before = bed.keeper.last_contact();
        bed.advance(Duration::from_secs(600));
        assert_eq!(bed.keeper.last_contact(), before);
    }

    #[test]
    fn a_keeper_resumed_from_the_cache_reads_the_config_before_anything_else() {
        let key = format!("{PREFIX}/config");
        let resumed = |config: Option<&str>| {
            let config = config.map(str::to_string);
            let key = key.clone();
            let mut bed = Bed::from_cache(NET, "10.44.1.0/24", &[], move |m, now| {
                if let Some(c) = &config {
                    m.put(&key, c.as_bytes(), None, now);
                }
                m.put_lease("10.44.1.0/24", [192, 168, 0, 1], now);
                m.down = true;
            });
            bed.advance(Duration::from_secs(2));
            assert!(!bed
                .effects
                .iter()
                .any(|a| matches!(a, Effect::ConfigChanged(_) | Effect::Fatal(_))));
            let written = bed.store.lock().revision;
            bed.store.lock().down = false;
            bed.advance(Duration::from_secs(6));
            (bed, written)
        };
        let fatal = |bed: &Bed| {
            bed.effects.iter().find_map(|a| match a {
                Effect::Fatal(why) => Some(why.clone()),
                _ => None,
            })
        };

        let same = format!("{{ \"Network\": \"{NET}\" }}");
        let (bed, _) = resumed(Some(&same));
        assert_eq!(fatal(&bed), None);
        assert!(bed.effects.contains(&Effect::ConfigChanged(Some(same))));
        assert_eq!(bed.keeper.stats.renewals, 1);
        assert!(bed.keeper.watching());

        let other = r#"{"Network":"10.44.0.0/16","SubnetMax":"10.44.9.0"}"#;
        let (bed, written) = resumed(Some(other));
        let why = fatal(&bed).expect("another config ends the daemon");
        assert!(why.contains("SubnetMax"), "{why}");
        assert_eq!(bed.keeper.stats.renewals, 0);
        assert_eq!(bed.store.lock().revision, written, "nothing written");
        assert!(!bed.keeper.watching());

        let (bed, _) = resumed(None);
        assert_eq!(fatal(&bed), None);
        assert!(bed.effects.contains(&Effect::ConfigChanged(None)));
        assert_eq!(bed.keeper.stats.renewals, 1);
    }

    #[test]
    fn a_cached_lease_that_is_gone_is_re_created_and_one_taken_is_left() {
        let mut bed = Bed::from_cache(NET, "10.44.1.0/24", &[], |_, _| {});
        bed.advance(Duration::from_millis(10));
        assert_eq!(bed.holder(sn("10.44.1.0/24")), Some(ME));
        assert_eq!(own(&bed), sn("10.44.1.0/24"));

        let mut bed = Bed::from_cache(NET, "10.44.1.0/24", &[], |m, now| {
            m.put_lease("10.44.1.0/24", [192, 168, 0, 7], now);
        });
        bed.advance(Duration::from_millis(10));
        let new = own(&bed);
        assert_ne!(new, sn("10.44.1.0/24"));
        assert_eq!(bed.moved(), vec![(sn("10.44.1.0/24"), new)]);
        assert_eq!(
            bed.holder(sn("10.44.1.0/24")),
            Some([192, 168, 0, 7].into())
        );
        assert_eq!(
            bed.keeper.peers().get(&sn("10.44.1.0/24")),
            Some([192, 168, 0, 7].into())
        );
    }
}

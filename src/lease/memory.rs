//! An in-memory lease store with etcd's semantics (revisions, conditional
//! writes, TTLs, a watch log that can be compacted, outages), and a bed
//! that runs a [`Keeper`] against it: every recovery path of the lease core
//! is a unit test that needs no root and no etcd. The integration tests
//! run the same paths against the real etcd.

use super::driver::Driver;
use super::keeper::{Action, Effect, Input, Keeper, Settings};
use super::store::{
    Expect, LeaseStore, LeaseWatch, RawLease, StoreError, WatchEvent, WatchItem, Written,
};
use crate::config::NetworkConfig;
use crate::subnet::{lease_key, LeaseAttrs};
use ipnetwork::Ipv4Network;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

pub const PREFIX: &str = "/coreos.com/network";

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    lease_id: i64,
    mod_revision: i64,
    expires: Option<Instant>,
}

/// The store.
#[derive(Debug, Default)]
pub struct Memory {
    pub revision: i64,
    keys: BTreeMap<String, Entry>,
    log: Vec<(i64, WatchEvent)>,
    /// Revisions up to here are gone from the log.
    compacted: i64,
    next_lease: i64,
    /// Every call fails (etcd unreachable).
    pub down: bool,
    /// Every call is refused (bad credentials).
    pub refuse: bool,
    /// The next this many writes fail.
    pub failing_writes: usize,
    /// The next this many writes commit, but answer with a time-out (the
    /// reply was lost).
    pub lost_replies: usize,
    /// Keys whose TTL ran out, in order.
    pub expired: Vec<String>,
    /// The time writes through [`SharedMemory`] are stamped with (a test
    /// clock); `None`: the real clock.
    pub clock: Option<Instant>,
}

impl Memory {
    pub fn revision(&self) -> i64 {
        self.revision
    }

    fn subnets() -> String {
        format!("{PREFIX}/subnets/")
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.refuse {
            return Err(StoreError::Permanent("permission denied".into()));
        }
        if self.down {
            Err(StoreError::Transient("connection refused".into()))
        } else {
            Ok(())
        }
    }

    fn bump(&mut self, ev: WatchEvent) -> i64 {
        self.revision += 1;
        self.log.push((self.revision, ev));
        self.revision
    }

    /// Any writer's put (another host, an operator, junk).
    pub fn put(&mut self, key: &str, value: &[u8], ttl: Option<Duration>, now: Instant) -> i64 {
        let lease_id = match ttl {
            Some(_) => {
                self.next_lease += 1;
                self.next_lease
            }
            None => 0,
        };
        let rev = self.revision + 1;
        self.keys.insert(
            key.to_string(),
            Entry {
                value: value.to_vec(),
                lease_id,
                mod_revision: rev,
                expires: ttl.map(|t| now + t),
            },
        );
        let ev = if key == format!("{PREFIX}/config") {
            WatchEvent::Config(Some(String::from_utf8_lossy(value).into_owned()))
        } else {
            WatchEvent::Put(RawLease {
                key: key.to_string(),
                value: value.to_vec(),
                lease_id,
                mod_revision: rev,
            })
        };
        self.bump(ev)
    }

    /// Another host's lease, as flannel writes it.
    pub fn put_lease(&mut self, subnet: &str, ip: [u8; 4], now: Instant) -> i64 {
        let sn: Ipv4Network = subnet.parse().expect("subnet");
        let v = LeaseAttrs::udp(ip.into()).to_json();
        self.put(
            &lease_key(PREFIX, sn),
            v.as_bytes(),
            Some(Duration::from_secs(86400)),
            now,
        )
    }

    pub fn remove(&mut self, key: &str) {
        if self.keys.remove(key).is_some() {
            self.bump(WatchEvent::Delete(key.to_string()));
        }
    }

    pub fn get(&self, key: &str) -> Option<(Vec<u8>, i64)> {
        self.keys
            .get(key)
            .map(|e| (e.value.clone(), e.mod_revision))
    }

    /// Expires leases whose TTL ran out by `now`.
    pub fn expire(&mut self, now: Instant) {
        let gone: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, e)| e.expires.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.expired.push(k.clone());
            self.remove(&k);
        }
    }

    /// Drops the watch history up to now.
    pub fn compact(&mut self) {
        self.compacted = self.revision;
        self.log.clear();
    }

    pub fn get_config(&self) -> Result<Option<String>, StoreError> {
        self.check()?;
        Ok(self
            .keys
            .get(&format!("{PREFIX}/config"))
            .map(|e| String::from_utf8_lossy(&e.value).into_owned()))
    }

    pub fn list(&self) -> Result<(Vec<RawLease>, i64), StoreError> {
        self.check()?;
        let p = Self::subnets();
        let leases = self
            .keys
            .range(p.clone()..)
            .take_while(|(k, _)| k.starts_with(&p))
            .map(|(k, e)| RawLease {
                key: k.clone(),
                value: e.value.clone(),
                lease_id: e.lease_id,
                mod_revision: e.mod_revision,
            })
            .collect();
        Ok((leases, self.revision))
    }

    fn holds(&self, key: &str, expect: Expect) -> bool {
        match (expect, self.keys.get(key)) {
            (Expect::Absent, e) => e.is_none(),
            (Expect::Revision(r), Some(e)) => e.mod_revision == r,
            (Expect::Revision(_), None) => false,
        }
    }

    pub fn write(
        &mut self,
        subnet: Ipv4Network,
        value: &str,
        ttl: Option<Duration>,
        expect: Expect,
        now: Instant,
    ) -> Result<Option<Written>, StoreError> {
        self.check()?;
        if self.failing_writes > 0 {
            self.failing_writes -= 1;
            return Err(StoreError::Transient(
                "etcdserver: request timed out".into(),
            ));
        }
        let key = lease_key(PREFIX, subnet);
        if !self.holds(&key, expect) {
            return Ok(None);
        }
        let revision = self.put(&key, value.as_bytes(), ttl, now);
        if self.lost_replies > 0 {
            self.lost_replies -= 1;
            return Err(StoreError::Transient(
                "context deadline exceeded (the write committed)".into(),
            ));
        }
        Ok(Some(Written {
            expires_in: ttl,
            revision,
        }))
    }

    pub fn delete(&mut self, subnet: Ipv4Network, expect: Expect) -> Result<bool, StoreError> {
        self.check()?;
        let key = lease_key(PREFIX, subnet);
        if !self.holds(&key, expect) {
            return Ok(false);
        }
        self.remove(&key);
        Ok(true)
    }

    /// Watch events from revision `from` on.
    pub fn events(&self, from: i64) -> WatchItem {
        if from <= self.compacted {
            return WatchItem::Compacted;
        }
        let events: Vec<WatchEvent> = self
            .log
            .iter()
            .filter(|(r, _)| *r >= from)
            .map(|(_, e)| e.clone())
            .collect();
        WatchItem::Events {
            events,
            revision: self.revision,
        }
    }
}

/// Polls a future of the in-memory store, which never waits, to its end.
fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the in-memory store waited"),
    }
}

/// A [`Memory`] behind the same [`LeaseStore`] seam as etcd, so the
/// daemon's own driver (not only the keeper) runs in unit tests; the clock
/// is the real one.
#[derive(Clone, Default)]
pub struct SharedMemory(pub std::sync::Arc<std::sync::Mutex<Memory>>);

impl SharedMemory {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LeaseStore for SharedMemory {
    type Watch = MemoryWatch;

    async fn get_config(&self) -> Result<Option<String>, StoreError> {
        self.lock().get_config()
    }

    async fn list(&self) -> Result<(Vec<RawLease>, i64), StoreError> {
        self.lock().list()
    }

    async fn write(
        &self,
        subnet: Ipv4Network,
        value: String,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> Result<Option<Written>, StoreError> {
        let mut m = self.lock();
        let now = m.clock.unwrap_or_else(Instant::now);
        m.write(subnet, &value, ttl, expect, now)
    }

    async fn delete(&self, subnet: Ipv4Network, expect: Expect) -> Result<bool, StoreError> {
        self.lock().delete(subnet, expect)
    }

    async fn watch(&self, revision: i64) -> Result<MemoryWatch, StoreError> {
        self.lock().check()?;
        Ok(MemoryWatch {
            store: self.clone(),
            from: revision,
        })
    }
}

/// A watch on a [`SharedMemory`]: polls its log every 5 ms.
pub struct MemoryWatch {
    store: SharedMemory,
    /// The revision it delivers from next.
    pub from: i64,
}

impl LeaseWatch for MemoryWatch {
    async fn next(&mut self) -> Result<WatchItem, StoreError> {
        loop {
            {
                let m = self.store.lock();
                if m.down {
                    return Err(StoreError::Transient("stream closed".into()));
                }
                match m.events(self.from) {
                    WatchItem::Compacted => return Ok(WatchItem::Compacted),
                    WatchItem::Events { events, revision } if !events.is_empty() => {
                        self.from = revision + 1;
                        return Ok(WatchItem::Events { events, revision });
                    }
                    WatchItem::Events { .. } => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A keeper running against a [`Memory`] store, with a clock the test moves.
pub struct Bed {
    pub store: SharedMemory,
    pub keeper: Keeper,
    pub now: Instant,
    /// The revision the running watch delivers from next (`None`: no watch).
    watch: Option<i64>,
    /// Every effect the keeper asked for, in order.
    pub effects: Vec<Effect>,
}

pub const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);

/// The keeper settings of a bed: `ME`, a 600 s TTL renewed 60 s early;
/// `network` is a Network or a whole config.
pub fn settings(network: &str) -> Settings {
    let json = if network.starts_with('{') {
        network.to_string()
    } else {
        format!(r#"{{"Network":"{network}"}}"#)
    };
    Settings {
        cfg: NetworkConfig::parse(&json).expect("cfg"),
        public_ip: ME,
        identity: Default::default(),
        ttl: Duration::from_secs(600),
        renew_margin: Duration::from_secs(60),
        renew_retry: Duration::from_secs(15),
    }
}

impl Bed {
    /// A keeper for `ME` on a store already holding `setup`'s writes.
    pub fn start(network: &str, setup: impl FnOnce(&mut Memory, Instant)) -> Bed {
        Self::start_with(network, None, setup)
    }

    pub fn start_with(
        network: &str,
        previous: Option<Ipv4Network>,
        setup: impl FnOnce(&mut Memory, Instant),
    ) -> Bed {
        let now = Instant::now();
        let store = SharedMemory::default();
        setup(&mut store.lock(), now);
        let (keeper, first) = Keeper::new(
            settings(network),
            previous,
            rand::rngs::StdRng::seed_from_u64(7),
        );
        let mut bed = Bed {
            store,
            keeper,
            now,
            watch: None,
            effects: Vec::new(),
        };
        bed.run(first);
        bed
    }

    /// A keeper for `ME` resumed from a peer cache (`own`, `peers`), on a
    /// store that holds `setup`'s writes.
    pub fn from_cache(
        network: &str,
        own: &str,
        peers: &[(&str, [u8; 4])],
        setup: impl FnOnce(&mut Memory, Instant),
    ) -> Bed {
        let mut bed = Bed::start(network, |_, _| {});
        bed.effects.clear();
        bed.store = SharedMemory::default();
        setup(&mut bed.store.lock(), bed.now);
        let (keeper, first) = Keeper::from_cache(
            settings(network),
            own.parse().expect("own"),
            peers
                .iter()
                .map(|(sn, ip)| (sn.parse().expect("peer"), Ipv4Addr::from(*ip).into())),
            rand::rngs::StdRng::seed_from_u64(9),
        );
        bed.keeper = keeper;
        bed.watch = None;
        bed.run(first);
        bed
    }

    /// Carries out actions (and the keeper's answers to them) until none
    /// is left, with the daemon's own [`Driver`] on the bed's clock.
    pub fn run(&mut self, actions: Vec<Action>) {
        let now = self.now;
        self.store.lock().clock = Some(now);
        let mut driver = Driver {
            store: &self.store,
            watch: None,
            todo: actions.into(),
            clock: move || now,
        };
        let effects = ready(driver.pump(&mut self.keeper));
        if let Some(w) = driver.watch {
            // The bed delivers the watch itself, step by step.
            self.watch = Some(w.from);
        }
        self.effects.extend(effects);
    }

    /// Delivers what the watch has seen since it last delivered.
    pub fn deliver(&mut self) {
        let Some(from) = self.watch else { return };
        if self.store.lock().down {
            self.watch = None;
            let a = self.keeper.handle(
                Input::WatchBroken(StoreError::Transient("stream closed".into())),
                self.now,
            );
            self.run(a);
            return;
        }
        let item = self.store.lock().events(from);
        match &item {
            WatchItem::Compacted => self.watch = None,
            WatchItem::Events { .. } => self.watch = Some(self.store.lock().revision() + 1),
        }
        let a = self.keeper.handle(Input::Watch(item), self.now);
        self.run(a);
    }

    /// Moves the clock on by `d`, firing the keeper's timers (and the
    /// store's TTLs) on the way, delivering watch events at each step.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            self.deliver();
            let next = self.keeper.next_wakeup().filter(|t| *t <= end);
            let Some(t) = next else { break };
            self.now = self.now.max(t);
            self.store.lock().expire(self.now);
            let a = self.keeper.handle(Input::Tick, self.now);
            self.run(a);
        }
        self.now = end;
        self.store.lock().expire(self.now);
        self.deliver();
    }

    /// The subnet key of ours in the store names `ip`.
    pub fn holder(&self, subnet: Ipv4Network) -> Option<Ipv4Addr> {
        let (v, _) = self.store.lock().get(&lease_key(PREFIX, subnet))?;
        LeaseAttrs::from_json(&v).ok().map(|a| a.public_ip)
    }

    pub fn moved(&self) -> Vec<(Ipv4Network, Ipv4Network)> {
        self.effects
            .iter()
            .filter_map(|a| match a {
                Effect::Moved { from, to } => Some((*from, *to)),
                _ => None,
            })
            .collect()
    }
}

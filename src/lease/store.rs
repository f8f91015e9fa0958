//! The seam between the lease core and a store: what the keeper asks of
//! etcd (or of the in-memory store its unit tests use), in plain types.
//! Nothing here knows about etcd.

use ipnetwork::Ipv4Network;
use std::future::Future;
use std::time::Duration;

/// A lease key/value as stored, not yet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLease {
    pub key: String,
    pub value: Vec<u8>,
    /// The store's lease id; 0 for a reservation (a key without a TTL).
    pub lease_id: i64,
    /// The store revision that last wrote this key: renewals compare it.
    pub mod_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(RawLease),
    Delete(String),
    /// `<prefix>/config` was written (its new text) or deleted (`None`).
    Config(Option<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// Events (possibly none of ours) up to and including store `revision`:
    /// a watch resumed from `revision + 1` misses nothing.
    Events {
        events: Vec<WatchEvent>,
        revision: i64,
    },
    /// The revision the watch started from is gone (compacted, or the
    /// store's history went backwards, e.g. restored from a backup): re-list.
    Compacted,
}

/// Why a store call failed: retrying helps, or only the operator can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Unreachable, timed out, restarting, a leader election: retry.
    #[error("{0}")]
    Transient(String),
    /// TLS trust, certificates, authentication, permissions: retrying
    /// cannot fix it.
    #[error("{0}")]
    Permanent(String),
}

impl StoreError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, StoreError::Permanent(_))
    }
}

/// The condition a write or delete is made under (a transaction's compare).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Only if the key does not exist (creating a lease).
    Absent,
    /// Only if the key was last written at this revision (renewing or
    /// deleting what we read, never what another host wrote since).
    Revision(i64),
}

/// A successful write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The granted TTL; `None` for a reservation (no TTL).
    pub expires_in: Option<Duration>,
    /// The revision of the write: the key's new mod revision.
    pub revision: i64,
}

/// What the daemon needs from a lease store (flannel's `Registry`).
pub trait LeaseStore: Send + Sync + 'static {
    type Watch: LeaseWatch;
    /// `<prefix>/config`, or `None` when the key is absent.
    fn get_config(&self) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    /// All keys under the subnets prefix and the store revision they were
    /// read at (paged by the implementation: any number of keys).
    fn list(&self) -> impl Future<Output = Result<(Vec<RawLease>, i64), StoreError>> + Send;
    /// Writes the lease under `expect`, with a fresh TTL (or none: a
    /// reservation). `None`: the condition failed, nothing was written.
    fn write(
        &self,
        subnet: Ipv4Network,
        value: String,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> impl Future<Output = Result<Option<Written>, StoreError>> + Send;
    /// Deletes the lease under `expect`; false when the condition failed.
    fn delete(
        &self,
        subnet: Ipv4Network,
        expect: Expect,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Watches all leases and the network config from `revision` on (inclusive).
    fn watch(&self, revision: i64) -> impl Future<Output = Result<Self::Watch, StoreError>> + Send;
}

pub trait LeaseWatch: Send + 'static {
    fn next(&mut self) -> impl Future<Output = Result<WatchItem, StoreError>> + Send;
}

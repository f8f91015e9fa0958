//! flannel-rs: flanneld's udp backend as a userspace TUN router.
//!
//! Data flows one way: etcd → [`lease::etcd`] → [`lease::keeper`] (pure
//! decisions) → [`routes`] (lock-free snapshot) → [`datapath`] (TUN ⇄ UDP loops).
//! The pure modules ([`config`], [`subnet`], [`lease`] but its etcd adapter,
//! [`routes`], [`wire`], [`forward`], [`subnet_env`], [`datapath::offload`]) do no
//! I/O and are unit tested and fuzzed.

pub mod atomic_file;
pub mod backend;
pub mod cni;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod docker;
pub mod forward;
pub mod goflags;
pub mod iface;
pub mod lease;
pub mod masq;
pub mod netlink;
pub mod ops;
pub mod peer_cache;
pub mod routes;
pub mod startup;
pub mod subnet;
pub mod subnet_env;
pub mod wire;
pub mod wireguard;

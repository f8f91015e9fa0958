//! Opening the data path's devices: the TUN (multi-queue, offloads as
//! the kernel allows) and the UDP sockets of each worker.

use super::tun::Tun;
use super::udp::{self, bind_udp, send_socket};
use std::io;
use std::net::{SocketAddrV4, UdpSocket};

/// `--offload`: use kernel offloads when available, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadMode {
    Auto,
    Off,
}

/// `--udp-source-ports`: where our datagrams come from. The destination is
/// always the peer's Backend.Port, the payload the raw IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePorts {
    /// Worker k sends from Backend.Port + 1 + k. A flow stays on one worker
    /// (the TUN's queue choice hashes the flow), so the outer source port
    /// carries flow entropy, as VXLAN's does (RFC 7348 §5): a receiver's
    /// SO_REUSEPORT group spreads our flows over its workers. With one
    /// worker this is the same as `fixed`.
    PerWorker,
    /// Every datagram from Backend.Port, as Go flanneld sends.
    Fixed,
}

/// `--worker-threads`: how a worker's two directions are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerThreads {
    /// A thread per direction, each asleep in poll() on its descriptor.
    Split,
    /// One thread polls both descriptors: an answer the kernel queues while
    /// we write to the TUN is sent without waking another thread.
    Combined,
}

/// What the kernel let us turn on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    /// TUN with `IFF_VNET_HDR` and TSO: super-packets from the kernel, GRO to it.
    pub tun_offload: bool,
    /// UDP/USO super-packets from the TUN too.
    pub tun_uso: bool,
    /// `UDP_SEGMENT` sends.
    pub udp_gso: bool,
    /// `UDP_GRO` receives.
    pub udp_gro: bool,
}

/// The devices of a data path, opened but not yet running.
pub struct Devices {
    pub tun_name: String,
    pub caps: Caps,
    /// Per worker: its TUN queue, its receive socket (in the SO_REUSEPORT
    /// group on Backend.Port) and the socket it sends from.
    pub(super) queues: Vec<(Tun, UdpSocket, UdpSocket)>,
    /// The source port of each worker's datagrams.
    pub source_ports: Vec<u16>,
}

/// Opens the TUN (with `workers` queues) and one UDP socket per queue bound
/// to `bind` (with `SO_REUSEPORT` when there are several), turning on the
/// offloads `mode` allows and the kernel supports. With several workers and
/// `steer` (where the inner IPv4 packet starts in a datagram's payload;
/// `None` when it is encrypted), each datagram goes to the worker its inner
/// flow hashes to (see [`udp::flow_socket`]).
pub fn open(
    pattern: &str,
    workers: usize,
    mode: OffloadMode,
    bind: SocketAddrV4,
    sources: SourcePorts,
    steer: Option<usize>,
) -> io::Result<Devices> {
    let workers = workers.max(1);
    let multi_queue = workers > 1 && Tun::takes_multi_queue(pattern);
    let workers = if multi_queue { workers } else { 1 };
    let (first, offloads) = Tun::open_offloaded(pattern, multi_queue, mode == OffloadMode::Auto)?;
    let mut caps = Caps {
        tun_offload: offloads.tso,
        tun_uso: offloads.uso,
        ..Caps::default()
    };
    let mut tuns = vec![first];
    for _ in 1..workers {
        let q = tuns[0].attach()?;
        q.set_offloads(offloads)?;
        tuns.push(q);
    }
    let mut queues = Vec::with_capacity(workers);
    for (k, t) in tuns.into_iter().enumerate() {
        let s = bind_udp(bind, multi_queue)?;
        if mode == OffloadMode::Auto {
            let (gro, gso) = udp::enable_offloads(&s);
            if k == 0 {
                caps.udp_gro = gro;
                caps.udp_gso = gso;
            }
        }
        let tx = if sources == SourcePorts::PerWorker && workers > 1 {
            send_socket(bind, bind.port().wrapping_add(1 + k as u16))?
        } else {
            s.try_clone()?
        };
        queues.push((t, s, tx));
    }
    if let (true, Some(inner)) = (multi_queue, steer) {
        // The group is complete: the program's indices are the workers'.
        if let Err(e) = udp::steer_by_inner_flow(&queues[0].1, inner, workers) {
            tracing::warn!(error = %e, "steering received datagrams by their inner flow failed; the kernel's hash of the outer ports picks the worker instead");
        }
    }
    let tun_name = queues[0].0.name().to_string();
    let source_ports = queues
        .iter()
        .map(|(_, _, tx)| tx.local_addr().map(|a| a.port()).unwrap_or(0))
        .collect();
    Ok(Devices {
        tun_name,
        caps,
        queues,
        source_ports,
    })
}

//! The forwarding loops: TUN → UDP and UDP → TUN, one OS thread each, fed
//! by batches. A [`Worker`] owns its buffers; the route table is read
//! through a lock-free snapshot once per batch. More workers (one per TUN
//! queue) can be added without touching the per-packet code.

pub mod batch;
pub mod tun;

use crate::forward::{egress, ingress, Counters, DropReason, Egress, Ingress, Tally};
use crate::routes::RouteTable;
use crate::wire::{self, Ipv4Packet};
use batch::{Mmsg, Slots, BATCH};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use tun::Tun;

/// Everything a worker shares with the control plane.
#[derive(Clone)]
pub struct Shared {
    pub tun: Arc<Tun>,
    pub socket: Arc<UdpSocket>,
    pub routes: Arc<RouteTable>,
    pub counters: Arc<Counters>,
    /// Source address of the ICMP errors we generate: an address inside the
    /// Network that no host owns, so the kernel does not drop the reply as
    /// a martian (flannel uses the TUN's own address and its replies are lost).
    pub icmp_src: Ipv4Addr,
}

/// Binds the backend's UDP socket to `addr:port`, non-blocking.
pub fn bind_udp(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    // Bigger buffers absorb bursts between batches; failure only costs speed.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("binding UDP {addr}: {e}")))?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// An eventfd that tells the loops to stop.
struct StopFd(OwnedFd);

impl StopFd {
    fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2); owned right away.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh valid fd.
        Ok(StopFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// Waits until `fd` is readable; false when stop was signalled.
fn wait_readable(fd: RawFd, stop: &StopFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return fds[1].revents == 0;
    }
}

/// The running data path; dropping it stops and joins the threads.
pub struct Datapath {
    stop: Arc<StopFd>,
    threads: Vec<JoinHandle<()>>,
}

impl Datapath {
    pub fn start(shared: Shared) -> io::Result<Self> {
        let stop = Arc::new(StopFd::new()?);
        let mut threads = Vec::new();
        let (s, st) = (shared.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("tun-to-udp".into())
                .spawn(move || tun_to_udp(&s, &st))?,
        );
        let (s, st) = (shared, stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("udp-to-tun".into())
                .spawn(move || udp_to_tun(&s, &st))?,
        );
        Ok(Datapath { stop, threads })
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.signal();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn tun_to_udp(s: &Shared, stop: &StopFd) {
    let mut slots = Slots::new();
    let mut mmsg = Mmsg::new();
    let mut icmp = [0u8; wire::ICMP_ERROR_MAX];
    let sock = s.socket.as_raw_fd();
    while wait_readable(s.tun.as_raw_fd(), stop) {
        loop {
            let mut n = 0;
            while n < BATCH {
                match s.tun.read(slots.slot_mut(n)) {
                    Ok(len) => {
                        slots.len[n] = len;
                        n += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the TUN failed");
                        break;
                    }
                }
            }
            if n == 0 {
                break;
            }
            let mut t = Tally {
                tun_rx_packets: n as u64,
                ..Tally::default()
            };
            let routes = s.routes.load();
            mmsg.clear();
            for i in 0..n {
                let answer = match egress(slots.packet_mut(i), &routes) {
                    Egress::Send(peer) => {
                        slots.addr[i] = peer;
                        t.udp_tx_bytes += slots.len[i] as u64;
                        mmsg.queue(i);
                        continue;
                    }
                    Egress::Drop(r) => {
                        t.drop(r);
                        continue;
                    }
                    Egress::Unreachable => {
                        t.drop(DropReason::NoRoute);
                        (wire::ICMP_DEST_UNREACH, wire::ICMP_NET_UNREACH)
                    }
                    Egress::TimeExceeded => {
                        t.drop(DropReason::Ttl);
                        (wire::ICMP_TIME_EXCEEDED, wire::ICMP_EXC_TTL)
                    }
                };
                let offender = Ipv4Packet::new_unchecked(slots.packet(i));
                if let Some(len) =
                    wire::build_icmp_error(&offender, answer.0, answer.1, s.icmp_src, &mut icmp)
                {
                    if s.tun.write(&icmp[..len]).is_ok() {
                        t.icmp_sent += 1;
                    }
                }
            }
            if mmsg.queued() > 0 {
                let (sent, failed) = mmsg.send(sock, &mut slots);
                t.udp_tx_packets += sent as u64;
                t.drop_send_error += failed as u64;
            }
            s.counters.add(&t);
            if n < BATCH {
                break;
            }
        }
    }
}

fn udp_to_tun(s: &Shared, stop: &StopFd) {
    let mut slots = Slots::new();
    let mut mmsg = Mmsg::new();
    let sock = s.socket.as_raw_fd();
    while wait_readable(sock, stop) {
        loop {
            let n = match mmsg.recv(sock, &mut slots) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    // e.g. ECONNREFUSED from an ICMP error about an earlier send.
                    tracing::debug!(error = %e, "UDP receive error");
                    continue;
                }
            };
            if n == 0 {
                break;
            }
            let mut t = Tally {
                udp_rx_packets: n as u64,
                ..Tally::default()
            };
            for i in 0..n {
                t.udp_rx_bytes += slots.len[i] as u64;
                match ingress(slots.packet_mut(i)) {
                    Ingress::Deliver => match s.tun.write(slots.packet(i)) {
                        Ok(_) => t.tun_tx_packets += 1,
                        Err(_) => t.drop_tun_write_error += 1,
                    },
                    Ingress::Drop(r) => t.drop(r),
                }
            }
            s.counters.add(&t);
            if n < BATCH {
                break;
            }
        }
    }
}

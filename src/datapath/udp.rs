//! The backend's UDP sockets: binding (with SO_REUSEPORT for a worker
//! group), the per-worker send sockets, and probing the UDP offloads. The
//! batched send/receive over them is [`super::batch`].

use super::batch::{set_int_opt, SOL_UDP, UDP_GRO, UDP_SEGMENT};
use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

/// Turns on `UDP_GRO` and probes `UDP_SEGMENT` (by setting a socket default
/// and clearing it again); returns (GRO on, GSO available).
pub fn enable_offloads(s: &UdpSocket) -> (bool, bool) {
    let fd = s.as_raw_fd();
    let gro = set_int_opt(fd, SOL_UDP, UDP_GRO, 1).is_ok();
    let gso = set_int_opt(fd, SOL_UDP, UDP_SEGMENT, 1400).is_ok()
        && set_int_opt(fd, SOL_UDP, UDP_SEGMENT, 0).is_ok();
    (gro, gso)
}

/// A worker's send socket on `port` (the next free one above it if taken:
/// any port keeps the flow entropy; the peers ignore it).
pub fn send_socket(bind: SocketAddrV4, port: u16) -> io::Result<UdpSocket> {
    match bind_udp(SocketAddrV4::new(*bind.ip(), port), false) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let s = bind_udp(SocketAddrV4::new(*bind.ip(), 0), false)?;
            tracing::warn!(
                port,
                used = s.local_addr().map(|a| a.port()).unwrap_or(0),
                "a worker's source port is taken; sending from another"
            );
            Ok(s)
        }
        Err(e) => Err(e),
    }
}

/// Binds a backend UDP socket to `addr:port`, non-blocking.
pub fn bind_udp(addr: SocketAddrV4, reuse_port: bool) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    // Bigger buffers absorb bursts between batches; failure only costs speed.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("binding UDP {addr}: {e}")))?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

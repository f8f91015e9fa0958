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

/// A worker's send socket on `port` (Backend.Port + 1 + k). A port that is
/// taken is an error, never a silent move to an ephemeral port: firewalls
/// are told which source ports our datagrams come from.
pub fn send_socket(bind: SocketAddrV4, port: u16) -> io::Result<UdpSocket> {
    bind_udp(SocketAddrV4::new(*bind.ip(), port), false).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                e.kind(),
                format!("{e}: --udp-source-ports=per-worker sends worker k's datagrams from Backend.Port+1+k and UDP {port} is taken; free it, or use --udp-source-ports=fixed (every datagram from Backend.Port)"),
            )
        } else {
            e
        }
    })
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

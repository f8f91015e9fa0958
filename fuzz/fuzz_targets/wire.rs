//! Any bytes through both forwarding directions and the ICMP builder:
//! never a panic, and whatever is forwarded is still a valid IPv4 packet.
#![no_main]
use flannel::forward::{egress, ingress, Egress, Ingress};
use flannel::routes::RouteSnapshot;
use flannel::wire::{build_icmp_error, Ipv4Packet, ICMP_ERROR_MAX};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddrV4};

fuzz_target!(|data: &[u8]| {
    let routes = RouteSnapshot::new([(
        "10.5.0.0/16".parse().unwrap(),
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 0, 2), 8285),
    )]);
    let mut a = data.to_vec();
    if let Egress::Send(_) = egress(&mut a, &routes) {
        assert!(Ipv4Packet::new_checked(&a[..]).is_ok());
    }
    let mut b = data.to_vec();
    let local = routes.clone().with_local("10.5.1.0/24".parse().unwrap());
    if ingress(&mut b, Ipv4Addr::new(192, 168, 0, 2), &local, false) == Ingress::Deliver {
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert!(p.header_checksum_ok());
    }
    if let Ok(p) = Ipv4Packet::new_checked(data) {
        let mut out = [0u8; ICMP_ERROR_MAX];
        if let Some(n) = build_icmp_error(&p, 3, 0, Ipv4Addr::new(10, 5, 0, 0), &mut out) {
            let r = Ipv4Packet::new_checked(&out[..n]).unwrap();
            assert!(r.header_checksum_ok());
            assert_eq!(flannel::wire::checksum(r.payload()), 0);
        }
    }
});

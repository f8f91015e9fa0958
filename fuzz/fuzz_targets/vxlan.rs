//! Any datagram through the vxlan backend's receive path: unwrap (VNI,
//! Ethernet, ARP), the ARP answer, then the ingress checks on the inner
//! packet. Never a panic; what is delivered is a valid IPv4 packet behind
//! our prefix, and an answer is a whole ARP reply from our MAC.
#![no_main]
use flannel::backend::{Decap, Encap};
use flannel::forward::{ingress, Ingress};
use flannel::routes::{Hop, RouteSnapshot};
use flannel::wire::ether::{ArpRepr, EthernetFrame, Mac, VxlanPacket, ARP_REPLY};
use flannel::wire::Ipv4Packet;
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddrV4};

const ME: Mac = Mac([0x02, 0, 0, 0, 0, 1]);

fuzz_target!(|data: &[u8]| {
    let from = Ipv4Addr::new(192, 168, 0, 2);
    let routes = RouteSnapshot::new([(
        "10.5.2.0/24".parse().unwrap(),
        Hop {
            addr: SocketAddrV4::new(from, 8472),
            mac: Mac([0x02, 0, 0, 0, 0, 2]),
        },
    )])
    .with_local("10.5.1.0/24".parse().unwrap());
    let encap = Encap::Vxlan { vni: 1, mac: ME };
    let mut d = data.to_vec();
    match encap.decap(&d) {
        Decap::Packet(off) => {
            assert_eq!(off, 22);
            if ingress(&mut d[off..], from, &routes, false) == Ingress::Deliver {
                assert!(Ipv4Packet::new_checked(&d[off..]).unwrap().header_checksum_ok());
            }
        }
        Decap::Arp(req) => {
            let sender = routes.lookup(req.sender_ip);
            if let Some(a) = encap.arp_answer(&req, Ipv4Addr::new(10, 5, 1, 0), from, sender) {
                let v = VxlanPacket::new_checked(&a[..]).unwrap();
                let e = EthernetFrame::new_checked(v.payload()).unwrap();
                assert_eq!(e.src(), ME);
                assert_eq!(ArpRepr::parse(e.payload()).unwrap().op, ARP_REPLY);
            }
        }
        Decap::Drop(_) => {}
    }
});

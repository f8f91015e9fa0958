//! `flanneld mk-docker-opts` end to end: the file it writes, and its refusal
//! when the routing table already holds the subnet via a gateway.

mod support;

use std::process::Command;
use support::*;

#[test]
fn mk_docker_opts_writes_options_and_refuses_a_gatewayed_subnet() {
    let mut bed = Bed::empty();
    bed.add_host();
    let env = bed.dir.join("subnet.env");
    std::fs::write(&env, "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n").unwrap();
    let out_file = bed.dir.join("docker_opts.env");
    let run = |bed: &Bed, extra: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &bed.ns(0)])
            .arg(flanneld_bin())
            .arg("mk-docker-opts")
            .arg("-f")
            .arg(&env)
            .arg("-d")
            .arg(&out_file)
            .args(extra)
            .env_remove("DOCKER_OPTS")
            .output()
            .unwrap()
    };
    let out = run(&bed, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&out_file).unwrap(),
        "DOCKER_OPT_BIP=\"--bip=10.5.34.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=10.5.34.1/24 --ip-masq=true --mtu=1472\"\n"
    );
    let out = run(&bed, &["-c", "-k", "DOCKER_NETWORK_OPTIONS"]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(&out_file).unwrap(),
        "DOCKER_NETWORK_OPTIONS=\" --bip=10.5.34.1/24 --ip-masq=true --mtu=1472\"\n"
    );
    // The subnet already routed via a gateway: refused, file untouched.
    sh(&[
        "ip",
        "-n",
        &bed.ns(0),
        "route",
        "add",
        "10.5.34.0/24",
        "via",
        &HUB_IP.to_string(),
    ]);
    let before = std::fs::read_to_string(&out_file).unwrap();
    let out = run(&bed, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already contains the subnet"), "{err}");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), before);
}

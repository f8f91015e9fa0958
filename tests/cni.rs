//! The `flannel` CNI plugin with Debian's real containernetworking-plugins
//! (bridge, host-local, portmap): pods on two hosts reach each other through
//! our tunnel; DEL cleans up; ADD/DEL cycles leak nothing; a conflist chain
//! with portmap works as a runtime would drive it.

mod support;

use serde_json::{json, Value};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

fn ipam_files(bed: &Bed, i: usize) -> Vec<String> {
    std::fs::read_dir(bed.dir.join(format!("h{i}/ipam/cbr0")))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn pods_on_two_hosts_reach_each_other_through_the_plugin() {
    assert!(
        PathBuf::from(CNI_BIN).join("bridge").exists(),
        "install containernetworking-plugins (scripts/deps.sh)"
    );
    let mut bed = Bed::new(2);
    for i in 0..2 {
        bed.start_ready(i);
    }
    let mut pods = Vec::new(); // (host, pod ns, id, ip)
    let mut results = Vec::new();
    for i in 0..2 {
        for j in 0..2 {
            let pod = bed.add_ns_named(&format!("h{i}p{j}"));
            let id = format!("pod{i}{j}");
            let (ok, res) = cni(&bed.ns(i), "flannel", "ADD", &id, &pod, &net_conf(&bed, i));
            assert!(ok, "ADD failed: {res}");
            assert_eq!(res["cniVersion"], json!("1.0.0"));
            let ip = pod_ip(&res);
            let sn = flannel::subnet_env::read_previous_subnet(&bed.hosts[i].subnet_file).unwrap();
            assert!(sn.contains(ip), "{ip} not in host subnet {sn}");
            // The saved delegate config is flannel's.
            let saved: Value = serde_json::from_slice(
                &std::fs::read(bed.dir.join(format!("h{i}/cni/{id}"))).unwrap(),
            )
            .unwrap();
            assert_eq!(saved["type"], json!("bridge"));
            assert_eq!(saved["mtu"], json!(1472));
            results.push(res.clone());
            pods.push((i, pod, id, ip));
        }
    }
    // CHECK on a healthy pod succeeds (as flannel's plugin answers); we also
    // look: the pod's interface and its addresses must be there (below, a
    // pod whose eth0 is gone fails).
    let mut c = net_conf(&bed, 0);
    c["prevResult"] = results[0].clone(); // as a runtime caches it
    let (ok, v) = cni(&bed.ns(0), "flannel", "CHECK", &pods[0].2, &pods[0].1, &c);
    assert!(ok, "CHECK on a healthy pod: {v}");
    let (ok, v) = cni(
        &bed.ns(0),
        "flannel",
        "CHECK",
        "never-added",
        &pods[0].1,
        &c,
    );
    assert!(!ok && v["code"] == json!(3), "{v}");
    let (ok, v) = cni(
        &bed.ns(0),
        "flannel",
        "VERSION",
        "x",
        &pods[0].1,
        &net_conf(&bed, 0),
    );
    assert!(
        ok && v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0"))
    );
    // Every pod reaches every other, across hosts through the tunnel.
    for (a, pa, _, _) in &pods {
        for (b, pb, _, ipb) in &pods {
            if pa == pb {
                continue;
            }
            wait_for(
                &format!("{pa} -> {pb} ({ipb})"),
                Duration::from_secs(10),
                || {
                    Command::new("ip")
                        .args([
                            "netns",
                            "exec",
                            pa,
                            "ping",
                            "-c",
                            "1",
                            "-W",
                            "1",
                            &ipb.to_string(),
                        ])
                        .stdout(Stdio::null())
                        .status()
                        .unwrap()
                        .success()
                        .then_some(())
                },
            );
            if a != b {
                let data = pattern(4 << 20, 3);
                assert!(
                    tcp_between(pa, pb, *ipb, data.clone()) == data,
                    "{pa} -> {pb} transfer corrupted"
                );
            }
        }
    }
    // Break pod 1's network: its eth0 goes away. CHECK must now fail, with
    // an error that names the missing interface.
    let mut c1 = net_conf(&bed, 0);
    c1["prevResult"] = results[1].clone();
    sh(&["ip", "-n", &pods[1].1, "link", "del", "eth0"]);
    let (ok, v) = cni(&bed.ns(0), "flannel", "CHECK", &pods[1].2, &pods[1].1, &c1);
    assert!(!ok, "CHECK passed on a pod without its interface: {v}");
    assert!(
        v["code"].is_u64() && v["msg"].is_string(),
        "not a CNI error: {v}"
    );
    assert!(
        v.to_string().contains("eth0"),
        "the error should name the missing interface: {v}"
    );
    // DEL removes the address and the IPAM allocation; a second DEL succeeds.
    let (i, pod, id, ip) = &pods[0];
    let before = ipam_files(&bed, *i);
    assert!(before.contains(&ip.to_string()));
    let (ok, _) = cni(&bed.ns(*i), "flannel", "DEL", id, pod, &net_conf(&bed, *i));
    assert!(ok);
    assert!(
        !ipam_files(&bed, *i).contains(&ip.to_string()),
        "IPAM allocation left"
    );
    assert!(
        !sh(&["ip", "-n", pod, "addr"]).contains(&ip.to_string()),
        "address left"
    );
    let (ok, _) = cni(&bed.ns(*i), "flannel", "DEL", id, pod, &net_conf(&bed, *i));
    assert!(ok, "DEL of a gone container must succeed");
}

#[test]
fn fifty_add_del_cycles_leak_nothing() {
    let mut bed = Bed::new(1);
    bed.start_ready(0);
    let pod = bed.add_ns_named("cyc");
    let ns = bed.ns(0);
    let veths = |ns: &str| {
        sh(&["ip", "-n", ns, "-o", "link", "show", "type", "veth"])
            .lines()
            .count()
    };
    let (ok, _) = cni(&ns, "flannel", "ADD", "warm", &pod, &net_conf(&bed, 0));
    assert!(ok);
    assert!(cni(&ns, "flannel", "DEL", "warm", &pod, &net_conf(&bed, 0)).0);
    let host_veths = veths(&ns);
    for k in 0..50 {
        let id = format!("c{k}");
        let (ok, res) = cni(&ns, "flannel", "ADD", &id, &pod, &net_conf(&bed, 0));
        assert!(ok, "ADD {k}: {res}");
        assert_eq!(veths(&ns), host_veths + 1);
        assert!(
            cni(&ns, "flannel", "DEL", &id, &pod, &net_conf(&bed, 0)).0,
            "DEL {k}"
        );
    }
    assert_eq!(veths(&ns), host_veths, "veths leaked");
    assert_eq!(veths(&pod), 0, "pod veth leaked");
    assert!(
        ipam_files(&bed, 0).is_empty(),
        "IPAM files leaked: {:?}",
        ipam_files(&bed, 0)
    );
    assert_eq!(
        std::fs::read_dir(bed.dir.join("h0/cni")).unwrap().count(),
        0,
        "saved configs leaked"
    );
}

/// The conflist a runtime would read from /etc/cni/net.d, driven the way
/// libcni chains it: flannel, then portmap with the previous result.
#[test]
fn the_documented_conflist_with_portmap_chains() {
    let mut bed = Bed::new(2);
    bed.start_ready(0);
    bed.start_ready(1);
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dist/10-flannel.conflist"
    ))
    .unwrap();
    let mut list: Value = serde_json::from_str(&text).unwrap();
    // Point the flannel plugin at this host's files.
    let p0 = &mut list["plugins"][0];
    p0["subnetFile"] = json!(bed.hosts[0].subnet_file);
    p0["dataDir"] = json!(bed.dir.join("h0/cni"));
    p0["ipam"] = json!({"dataDir": bed.dir.join("h0/ipam")});
    let pod = bed.add_ns_named("web");
    let runtime =
        json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]});
    let conf_for = |k: usize, prev: Option<&Value>| {
        let mut c = list["plugins"][k].clone();
        c["name"] = list["name"].clone();
        c["cniVersion"] = list["cniVersion"].clone();
        if c.get("capabilities")
            .is_some_and(|cap| cap["portMappings"] == json!(true))
        {
            c["runtimeConfig"] = runtime.clone();
        }
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    };
    let n = list["plugins"].as_array().unwrap().len();
    let mut prev: Option<Value> = None;
    for k in 0..n {
        let ty = list["plugins"][k]["type"].as_str().unwrap().to_string();
        let (ok, res) = cni(
            &bed.ns(0),
            &ty,
            "ADD",
            "web1",
            &pod,
            &conf_for(k, prev.as_ref()),
        );
        assert!(ok, "{ty} ADD: {res}");
        prev = Some(res);
    }
    let ip = pod_ip(prev.as_ref().unwrap());
    // A web server in the pod, reached through the host port from another host.
    let (tx, rx) = std::sync::mpsc::channel();
    let server = spawn_in_ns(&pod, move || {
        let l = std::net::TcpListener::bind("0.0.0.0:80").unwrap();
        tx.send(()).unwrap();
        let (mut s, from) = l.accept().unwrap();
        s.write_all(b"hello from the pod").unwrap();
        from
    });
    rx.recv().unwrap();
    let h0 = bed.hosts[0].ip;
    let got = in_ns(&bed.ns(1), move || {
        let mut s =
            std::net::TcpStream::connect_timeout(&(h0, 18080).into(), Duration::from_secs(5))
                .expect("host port");
        let mut b = String::new();
        std::io::Read::read_to_string(&mut s, &mut b).unwrap();
        b
    });
    assert_eq!(got, "hello from the pod");
    server.join().unwrap();
    // DEL in reverse order with the cached result, as libcni does.
    for k in (0..n).rev() {
        let ty = list["plugins"][k]["type"].as_str().unwrap().to_string();
        let (ok, res) = cni(
            &bed.ns(0),
            &ty,
            "DEL",
            "web1",
            &pod,
            &conf_for(k, prev.as_ref()),
        );
        assert!(ok, "{ty} DEL: {res}");
    }
    assert!(!sh(&["ip", "-n", &pod, "addr"]).contains(&ip.to_string()));
}

/// What flannel refuses, we refuse (a delegate setting `name` or `ipam`), and
/// what it does unsafely we do not: a delegate `type` with a path is never
/// run. runtimeConfig reaches the delegate, CNI 1.1.0 works, and DEL still
/// releases the pod's address when the saved config is corrupt.
#[test]
fn unsafe_delegates_are_refused_and_del_survives_a_corrupt_saved_config() {
    let mut bed = Bed::new(1);
    bed.start_ready(0);
    let pod = bed.add_ns_named("p");
    let ns = bed.ns(0);
    let marker = bed.dir.join("evil-ran");
    let evil_dir = bed.dir.join("evil");
    std::fs::create_dir_all(&evil_dir).unwrap();
    let evil = evil_dir.join("x");
    std::fs::write(&evil, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    sh(&["chmod", "+x", &evil.display().to_string()]);
    for (delegate, what) in [
        (json!({"type": "../evil/x"}), "not a plugin name"),
        (
            json!({"type": evil.display().to_string()}),
            "not a plugin name",
        ),
        (json!({"name": "other"}), "\"name\""),
        (json!({"ipam": {"type": "dhcp"}}), "\"ipam\""),
    ] {
        let mut c = net_conf(&bed, 0);
        c["delegate"] = delegate.clone();
        let (ok, v) = cni(&ns, "flannel", "ADD", "bad", &pod, &c);
        assert!(!ok && v["code"] == json!(7), "{delegate}: {v}");
        assert!(v["msg"].as_str().unwrap().contains(what), "{delegate}: {v}");
    }
    assert!(!marker.exists(), "a delegate outside CNI_PATH was run");
    // 1.1.0 and runtimeConfig (a port mapping, as the runtime puts it).
    let mut c = net_conf(&bed, 0);
    c["cniVersion"] = json!("1.1.0");
    c["runtimeConfig"] =
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]});
    let (ok, res) = cni(&ns, "flannel", "ADD", "good", &pod, &c);
    assert!(ok, "{res}");
    assert_eq!(res["cniVersion"], json!("1.1.0"));
    let saved_path = bed.dir.join("h0/cni/good");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&saved_path).unwrap()).unwrap();
    assert_eq!(
        saved["runtimeConfig"]["portMappings"][0]["hostPort"],
        json!(8080)
    );
    let ip = pod_ip(&res).to_string();
    assert!(ipam_files(&bed, 0).contains(&ip));
    // A crash left garbage in the saved config: DEL still releases the address.
    std::fs::write(&saved_path, b"{\"type\": \"bri").unwrap();
    let (ok, v) = cni(&ns, "flannel", "DEL", "good", &pod, &c);
    assert!(ok, "DEL with a corrupt saved config: {v}");
    assert!(!ipam_files(&bed, 0).contains(&ip), "IPAM allocation left");
    assert!(!saved_path.exists());
}

#[test]
fn a_container_id_ending_in_tmp_keeps_its_saved_config() {
    let mut bed = Bed::new(1);
    bed.start_ready(0);
    let (pa, pb) = (bed.add_ns_named("pa"), bed.add_ns_named("pb"));
    let ns = bed.ns(0);
    let conf = net_conf(&bed, 0);
    assert!(cni(&ns, "flannel", "ADD", "abc.tmp", &pa, &conf).0);
    // A temp file named `<id>.tmp` would overwrite, then rename away,
    // the saved config of container `abc.tmp`.
    assert!(cni(&ns, "flannel", "ADD", "abc", &pb, &conf).0);
    assert!(
        bed.dir.join("h0/cni/abc.tmp").exists(),
        "abc.tmp's saved config is gone"
    );
    assert!(cni(&ns, "flannel", "DEL", "abc.tmp", &pa, &conf).0);
    assert_eq!(
        ipam_files(&bed, 0).len(),
        1,
        "abc.tmp's address leaked: {:?}",
        ipam_files(&bed, 0)
    );
    assert!(cni(&ns, "flannel", "DEL", "abc", &pb, &conf).0);
    assert!(ipam_files(&bed, 0).is_empty(), "{:?}", ipam_files(&bed, 0));
}

/// Runs the plugin like `cni`, with `netns` as CNI_NETNS (None: unset).
fn add_with(bed: &Bed, id: &str, netns: Option<&str>) -> (Option<i32>, Value) {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &bed.ns(0)])
        .arg(PathBuf::from(env!("CARGO_BIN_EXE_flannel")))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", id)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugin_dir())
        .env_remove("CNI_NETNS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(n) = netns {
        c.env("CNI_NETNS", n);
    }
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(net_conf(bed, 0).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
    )
}

/// ADD without CNI_NETNS is refused with code 4 before anything is saved;
/// an ADD whose delegate fails (the pod already has an eth0) leaves no
/// saved config and no address behind, and the pod can be added after.
#[test]
fn a_refused_or_failed_add_leaves_nothing_behind() {
    let mut bed = Bed::new(1);
    bed.start_ready(0);
    let pod = bed.add_ns_named("pod");
    let saved = |id: &str| bed.dir.join(format!("h0/cni/{id}")).exists();

    let (code, err) = add_with(&bed, "nons", None);
    assert_ne!(code, Some(0));
    assert_eq!(err["code"], 4, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("CNI_NETNS"), "{err}");
    assert!(!saved("nons"));

    sh(&[
        "ip", "-n", &pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    let (code, err) = add_with(&bed, "clash", Some(&format!("/run/netns/{pod}")));
    assert_ne!(code, Some(0), "{err}");
    assert!(!saved("clash"), "a failed ADD left its saved config");
    assert!(ipam_files(&bed, 0).is_empty(), "{:?}", ipam_files(&bed, 0));

    // (The delegate's clean-up DEL may have removed it already, as the
    // runtime's DEL after a failed ADD would.)
    let _ = Command::new("ip")
        .args(["-n", &pod, "link", "del", "eth0"])
        .status();
    let (code, res) = add_with(&bed, "clash", Some(&format!("/run/netns/{pod}")));
    assert_eq!(code, Some(0), "{res}");
    assert!(saved("clash"));
    let conf = net_conf(&bed, 0);
    assert!(cni(&bed.ns(0), "flannel", "DEL", "clash", &pod, &conf).0);
    assert!(!saved("clash") && ipam_files(&bed, 0).is_empty());
}

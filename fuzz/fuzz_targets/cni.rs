//! The CNI plugin's inputs (network config JSON, subnet.env) and the
//! Docker options renderer: never a panic; a rendered delegate is an object
//! naming its type and IPAM.
#![no_main]
use flannel::cni::{delegate_config, parse_flannel_env, NetConf};
use flannel::docker::{parse_env, render, DockerOptsArgs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (conf, env) = data.split_at(split);
    let env = String::from_utf8_lossy(env);
    if let (Ok(n), Ok(f)) = (NetConf::parse(conf), parse_flannel_env(&env)) {
        if let Ok(d) = delegate_config(&n, &f) {
            let ty = d.get("type").and_then(|t| t.as_str()).expect("a type");
            assert!(flannel::cni::valid_plugin_type(ty), "{ty:?}");
            assert!(d["ipam"].get("type").is_some());
        }
    }
    let vars = parse_env(&env);
    for flags in 0..8u8 {
        let a = DockerOptsArgs {
            individual: flags & 1 != 0,
            combined: flags & 2 != 0,
            no_ipmasq: flags & 4 != 0,
            combined_key: "DOCKER_OPTS".into(),
        };
        let _ = render(&vars, &a, "");
    }
});

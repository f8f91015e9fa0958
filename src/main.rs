//! `flanneld`: command line → options → [`flannel::daemon::run`].

use clap::Parser;
use flannel::daemon::{self, DatapathOptions, Files, LeaseOptions, Options, RulesOptions};
use flannel::lease::etcd::{EtcdOptions, EtcdStore};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// flanneld with the udp backend: leases a subnet of the overlay network from
/// etcd and carries IPv4 packets between hosts in UDP (flannel's wire format).
///
/// Every flag can also be set by its FLANNELD_* environment variable
/// (upper case, '-' → '_'), as with Go flanneld.
#[derive(Parser, Debug)]
#[command(
    name = "flanneld",
    version,
    about,
    max_term_width = 100,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Comma-separated etcd endpoints.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,

    /// etcd prefix under which the config and the leases live.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    etcd_prefix: String,

    /// SSL key file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    etcd_keyfile: Option<PathBuf>,

    /// SSL certification file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    etcd_certfile: Option<PathBuf>,

    /// SSL Certificate Authority file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    etcd_cafile: Option<PathBuf>,

    /// Username for BasicAuth to etcd.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    etcd_username: Option<String>,

    /// Password for BasicAuth to etcd.
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,

    /// Interface (name or IPv4 address) to use for inter-host traffic; repeat or
    /// comma-separate to give candidates, the first that exists wins. Default: the
    /// interface of the default route.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    iface: Vec<String>,

    /// Regular expressions matched against each interface's IPv4 address, then
    /// its name (repeatable or comma-separated); the first that matches picks
    /// the external interface. Used when --iface is not given.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',')]
    iface_regex: Vec<String>,

    /// Use the interface the kernel would use to reach this address. Used when
    /// neither --iface nor --iface-regex is given.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    iface_can_reach: Option<Ipv4Addr>,

    /// IP address other hosts use to reach this one (default: the interface's address).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    public_ip: Option<Ipv4Addr>,

    /// File to write the lease into, for the CNI plugin and Docker.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    subnet_file: PathBuf,

    /// wireguard backend: our private key (made, mode 0400, when missing;
    /// kept across restarts). flannel's variable and path.
    #[arg(long, env = "WIREGUARD_KEY_FILE", default_value = flannel::wireguard::DEFAULT_KEY_FILE)]
    wireguard_key_file: PathBuf,

    /// Renew the lease this many minutes before it expires (1..1439).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=1439))]
    subnet_lease_renew_margin: u64,

    /// Masquerade traffic from the overlay to the outside (flannel's FLANNEL-POSTRTG
    /// rules in the nat table; pod-to-pod traffic keeps its source).
    #[arg(long, env = "FLANNELD_IP_MASQ", num_args = 0..=1, default_value = "false",
          default_missing_value = "true", action = clap::ArgAction::Set, value_parser = go_bool)]
    ip_masq: bool,

    /// Masquerade without `--random-fully` (flannel's flag, for hosts whose
    /// kernel or middleboxes mishandle randomised source ports).
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", num_args = 0..=1, default_value = "false",
          default_missing_value = "true", action = clap::ArgAction::Set, value_parser = go_bool)]
    ip_masq_fully_random_disable: bool,

    /// Add ACCEPT rules for the Network to the FORWARD chain (FLANNEL-FWD).
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", num_args = 0..=1, default_value = "true",
          default_missing_value = "true", action = clap::ArgAction::Set, value_parser = go_bool)]
    iptables_forward_rules: bool,

    /// Seconds between checks that our iptables rules are still in place (restored if not).
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    iptables_resync: u64,

    /// Do not configure the TUN (address, MTU, up, route): use one an administrator
    /// created and configured beforehand (`ip tuntap add name flannel0 mode tun user …`,
    /// with --tun-name). flanneld then needs no capability at run time.
    #[arg(long, env = "FLANNELD_NO_NETLINK_CONFIG", num_args = 0..=1, default_value = "false",
          default_missing_value = "true", action = clap::ArgAction::Set, value_parser = go_bool)]
    no_netlink_config: bool,

    /// Address to serve /healthz and /metrics on (flannel's default is
    /// 0.0.0.0; ours is loopback: metrics name peers and subnets, and an
    /// open port is an attack surface. Give 0.0.0.0 to serve every address).
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "127.0.0.1")]
    healthz_ip: std::net::IpAddr,

    /// Port to serve /healthz and /metrics on (0 disables).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    healthz_port: u16,

    /// Log format.
    #[arg(long, env = "FLANNELD_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Log verbosity as in Go flanneld: 0 info, 1-3 debug, 4+ trace (RUST_LOG overrides).
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    verbosity: u8,

    /// Name of the TUN device; %d picks the first free number.
    #[arg(long, env = "FLANNELD_TUN_NAME", default_value = "flannel%d")]
    tun_name: String,

    /// Data-path workers: TUN queues (IFF_MULTI_QUEUE) and SO_REUSEPORT sockets,
    /// one thread per direction each. Default: the number of CPUs, at most 8
    /// (more queues than that only add threads and memory on big hosts).
    #[arg(long, env = "FLANNELD_WORKERS", value_parser = clap::value_parser!(u64).range(1..=64))]
    workers: Option<u64>,

    /// Kernel offloads: TUN TSO/GRO with virtio headers, UDP GSO/GRO. `auto` uses
    /// what the kernel supports (logged at start); `off` moves one packet at a time.
    #[arg(long, env = "FLANNELD_OFFLOAD", value_enum, default_value = "auto")]
    offload: Offload,

    /// Accept datagrams from any sender whose inner packet is for us, not only from
    /// the PublicIP of the peer that leases the inner source. For peers behind NAT,
    /// whose packets arrive from another address; it lets anyone who can reach the
    /// UDP port inject packets into this host's subnet.
    #[arg(long, env = "FLANNELD_ACCEPT_UNKNOWN_PEERS", num_args = 0..=1, default_value = "false",
          default_missing_value = "true", action = clap::ArgAction::Set, value_parser = go_bool)]
    accept_unknown_peers: bool,

    /// Where our datagrams come from (the destination is always the peer's
    /// Backend.Port). `per-worker`: worker k sends from Backend.Port+1+k
    /// (8286, 8287, … by default), so a receiver with several workers spreads
    /// our flows over them; firewalls must accept UDP to Backend.Port from
    /// any source port (or from Backend.Port+1 up to Backend.Port+workers).
    /// `fixed`: every datagram from Backend.Port, as Go flanneld.
    #[arg(
        long,
        env = "FLANNELD_UDP_SOURCE_PORTS",
        value_enum,
        default_value = "per-worker"
    )]
    udp_source_ports: SourcePorts,

    /// How each worker runs its two directions: `combined` (the default),
    /// one thread polling both the TUN and the socket; `split`, a thread
    /// each. Measured: combined answers a ping in ~0.8x the time and moves
    /// as much (see docs/benchmarks.md, latency).
    #[arg(
        long,
        env = "FLANNELD_WORKER_THREADS",
        value_enum,
        default_value = "combined"
    )]
    worker_threads: WorkerThreads,

    /// After traffic, keep polling the TUN and socket this long without
    /// sleeping before waiting again, yielding the CPU between polls (Go
    /// duration: 20us, 1ms; 0 never polls). Saves the wake-up of the next
    /// packet of an exchange; an idle daemon sleeps.
    #[arg(long, env = "FLANNELD_BUSY_POLL", default_value = "20us", value_parser = flannel::goflags::parse_duration)]
    busy_poll: std::time::Duration,

    /// Pin worker k's thread(s) to CPU k.
    #[arg(long, env = "FLANNELD_PIN_WORKERS", num_args = 0..=1, default_value = "false",
          default_missing_value = "true", action = clap::ArgAction::Set, value_parser = go_bool)]
    pin_workers: bool,

    /// Lease TTL in seconds (flannel: 24 h). For tests of renewal.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value_t = 86400, hide = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    subnet_lease_ttl: u64,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// The running daemon's state (lease, expiry, peers, backend, last etcd
    /// answer), from its ops endpoint's /status. Exit 0 ready, 1 not ready,
    /// 2 not reachable.
    Status {
        /// The daemon's --healthz-ip.
        #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "127.0.0.1")]
        healthz_ip: std::net::IpAddr,
        /// The daemon's --healthz-port (the unit's env file sets 8471).
        #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 8471)]
        healthz_port: u16,
        /// Print the JSON as served.
        #[arg(long)]
        json: bool,
    },
    /// Docker daemon options from subnet.env, as flannel's mk-docker-opts.sh.
    MkDockerOpts {
        /// Path to flannel env file.
        #[arg(short = 'f', default_value = "/run/flannel/subnet.env")]
        flannel_env: PathBuf,
        /// Path to Docker env file to write to.
        #[arg(short = 'd', default_value = "/run/docker_opts.env")]
        docker_env: PathBuf,
        /// Output each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
        #[arg(short = 'i')]
        individual: bool,
        /// Output combined Docker options into DOCKER_OPTS var
        #[arg(short = 'c')]
        combined: bool,
        /// Set the combined options key to this value
        #[arg(short = 'k', default_value = "DOCKER_OPTS")]
        key: String,
        /// Do not output --ip-masq (useful for older Docker version)
        #[arg(short = 'm')]
        no_ipmasq: bool,
    },
}

/// `flanneld status`: GET /status from the running daemon and print it.
fn status(addr: std::net::SocketAddr, json: bool) -> ExitCode {
    use std::io::{Read, Write};
    let fetch = || -> std::io::Result<String> {
        let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"GET /status HTTP/1.0\r\n\r\n")?;
        let mut reply = String::new();
        c.read_to_string(&mut reply)?;
        Ok(reply)
    };
    let reply = match fetch() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flanneld status: no daemon answers on {addr} ({e}); is it running with --healthz-port={}?", addr.port());
            return ExitCode::from(2);
        }
    };
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let view: flannel::ops::StatusView = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "flanneld status: {addr} did not answer with a status ({e}): {}",
                reply.lines().next().unwrap_or("")
            );
            return ExitCode::from(2);
        }
    };
    if json {
        print!("{body}");
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        print!("{}", view.render(now));
    }
    if view.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn mk_docker_opts(cmd: Command) -> ExitCode {
    let Command::MkDockerOpts {
        flannel_env,
        docker_env,
        individual,
        combined,
        key,
        no_ipmasq,
    } = cmd
    else {
        unreachable!("only mk-docker-opts is passed here")
    };
    use flannel::docker;
    let env = docker::parse_env(&std::fs::read_to_string(&flannel_env).unwrap_or_default());
    if let Some(sn) = docker::subnet_of(&env) {
        let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
        if let Some(r) = docker::routed_via_gateway(&routes, sn) {
            eprintln!("Your routing table already contains the subnet: {r}");
            return ExitCode::FAILURE;
        }
    }
    let args = docker::DockerOptsArgs {
        individual,
        combined,
        combined_key: key.clone(),
        no_ipmasq,
    };
    let existing = std::env::var(&key).unwrap_or_default();
    let text = match docker::render(&env, &args, &existing) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Atomic like subnet.env: a reader never sees half a file.
    let tmp = docker_env.with_extension("tmp");
    match std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &docker_env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("writing {}: {e}", docker_env.display());
            ExitCode::FAILURE
        }
    }
}

// The data path's choices, as the command line spells them (the data path
// itself knows nothing of clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Offload {
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SourcePorts {
    PerWorker,
    Fixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WorkerThreads {
    Split,
    Combined,
}

impl Offload {
    fn mode(self) -> flannel::datapath::OffloadMode {
        match self {
            Offload::Auto => flannel::datapath::OffloadMode::Auto,
            Offload::Off => flannel::datapath::OffloadMode::Off,
        }
    }
}

impl SourcePorts {
    fn mode(self) -> flannel::datapath::SourcePorts {
        match self {
            SourcePorts::PerWorker => flannel::datapath::SourcePorts::PerWorker,
            SourcePorts::Fixed => flannel::datapath::SourcePorts::Fixed,
        }
    }
}

impl WorkerThreads {
    fn mode(self) -> flannel::datapath::WorkerThreads {
        match self {
            WorkerThreads::Split => flannel::datapath::WorkerThreads::Split,
            WorkerThreads::Combined => flannel::datapath::WorkerThreads::Combined,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logs(v: u8, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // -v raises our own crates' level only: the libraries' debug output
    // (gRPC, HTTP/2) drowns ours and says nothing an operator needs.
    let level = match v {
        0 => "info",
        1..=3 => "info,flannel=debug,flanneld=debug",
        _ => "info,flannel=trace,flanneld=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Module paths at -v 1 and above, where they help find the code.
        .with_target(v > 0);
    match format {
        LogFormat::Text => b
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => b.json().init(),
    }
}

/// Installs the SIGTERM/SIGINT handlers now (a signal during start-up is
/// then kept for the main loop instead of killing the process half set up)
/// and returns the future that resolves on the first of them.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Go's `strconv.ParseBool`, for boolean flags and their FLANNELD_* variables.
fn go_bool(s: &str) -> Result<bool, String> {
    flannel::goflags::parse_bool(s)
}

/// Warns once about each FLANNELD_* variable that names no flag of ours (a
/// Go flanneld setting we do not have, or a typo): it is not applied.
fn warn_unknown_env() {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let known: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .filter_map(|e| e.to_str().map(str::to_string))
        .collect();
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    for name in flannel::goflags::unknown_env(std::env::vars(), &known) {
        tracing::warn!(
            "{name} is set but is not a flanneld setting this version knows; it is ignored"
        );
    }
}

/// Go flanneld skips an empty FLANNELD_* variable (an env file's
/// `FLANNELD_IFACE=` placeholder); so do we, instead of failing on it.
fn drop_empty_env() {
    for (k, v) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("FLANNELD_")) && v.is_empty() {
            std::env::remove_var(&k);
        }
    }
}

/// Parses the command line; an invalid value names the flag and the
/// environment variable that may have set it.
fn parse_cli() -> Result<(Cli, Vec<String>), ExitCode> {
    let args = flannel::goflags::normalize(std::env::args_os());
    let (args, ignored) = match flannel::goflags::strip_go_only(args) {
        Ok(a) => a,
        Err(why) => {
            eprintln!("flanneld: {why}");
            return Err(ExitCode::FAILURE);
        }
    };
    match Cli::try_parse_from(args) {
        Ok(cli) => Ok((cli, ignored)),
        Err(e) => {
            use clap::error::{ContextKind, ContextValue};
            let _ = e.print();
            if let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) {
                if let Some(flag) = arg
                    .strip_prefix("--")
                    .and_then(|a| a.split([' ', '=']).next())
                {
                    eprintln!(
                        "  (the value comes from {}, whichever is set)",
                        flannel::startup::setting(flag)
                            .replace(" (", " or the environment variable ")
                            .trim_end_matches(')')
                    );
                }
            }
            Err(ExitCode::from(e.exit_code() as u8))
        }
    }
}

/// What is checked before anything is touched (no lease, no device).
fn check(cli: &Cli) -> Result<(), String> {
    use flannel::startup::{check_endpoints, check_pair, check_tun_name};
    check_endpoints(&cli.etcd_endpoints)?;
    check_pair(
        ("etcd-username", cli.etcd_username.is_some()),
        ("etcd-password", cli.etcd_password.is_some()),
    )?;
    check_pair(
        ("etcd-certfile", cli.etcd_certfile.is_some()),
        ("etcd-keyfile", cli.etcd_keyfile.is_some()),
    )?;
    check_tun_name(&cli.tun_name)?;
    Ok(())
}

fn main() -> ExitCode {
    drop_empty_env();
    let (mut cli, ignored) = match parse_cli() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command.take() {
        Some(Command::Status {
            healthz_ip,
            healthz_port,
            json,
        }) => return status((healthz_ip, healthz_port).into(), json),
        Some(cmd) => return mk_docker_opts(cmd),
        None => {}
    }
    init_logs(cli.verbosity, cli.log_format);
    for flag in ignored {
        tracing::warn!("--{flag} is Go flanneld's logging flag; ignored (logs go to stderr; -v sets the level)");
    }
    if let Err(why) = check(&cli) {
        tracing::error!("{why}");
        return ExitCode::FAILURE;
    }
    warn_unknown_env();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let etcd = EtcdOptions {
        endpoints: cli.etcd_endpoints,
        prefix: cli.etcd_prefix,
        cafile: cli.etcd_cafile,
        certfile: cli.etcd_certfile,
        keyfile: cli.etcd_keyfile,
        username: cli.etcd_username,
        password: cli.etcd_password,
    };
    let opts = Options {
        iface: flannel::iface::Selection {
            ifaces: cli.iface,
            regexes: cli.iface_regex,
            can_reach: cli.iface_can_reach,
            public_ip: cli.public_ip,
        },
        lease: LeaseOptions {
            renew_margin: Duration::from_secs(cli.subnet_lease_renew_margin * 60),
            lease_ttl: Duration::from_secs(cli.subnet_lease_ttl),
        },
        files: Files {
            subnet_file: cli.subnet_file,
            wireguard_key_file: cli.wireguard_key_file,
        },
        rules: RulesOptions {
            ip_masq: cli.ip_masq,
            ip_masq_fully_random_disable: cli.ip_masq_fully_random_disable,
            iptables_forward_rules: cli.iptables_forward_rules,
            iptables_resync: Duration::from_secs(cli.iptables_resync),
        },
        datapath: DatapathOptions {
            tun_name: cli.tun_name,
            workers: cli.workers.map(|w| w as usize).unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
                    .min(DEFAULT_MAX_WORKERS)
            }),
            offload: cli.offload.mode(),
            pin_workers: cli.pin_workers,
            source_ports: cli.udp_source_ports.mode(),
            worker_threads: cli.worker_threads.mode(),
            busy_poll: cli.busy_poll,
            accept_unknown_peers: cli.accept_unknown_peers,
            no_netlink_config: cli.no_netlink_config,
        },
        healthz: (cli.healthz_port != 0).then(|| (cli.healthz_ip, cli.healthz_port).into()),
    };
    // At -v 1 and above: the settings in effect (no secrets: the etcd
    // password is not among them).
    tracing::debug!(options = ?opts, "settings");
    let result = rt.block_on(async {
        let shutdown = shutdown_signal()?;
        let store = EtcdStore::connect(&etcd).await?;
        daemon::run(store, opts, shutdown).await
    });
    // A blocking call that hangs (an iptables never returning) must not
    // hold the exit: the runtime's drop would wait for it forever.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, in the log's format (JSON with --log-format json).
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The default worker count's ceiling (`--workers` sets any up to 64).
const DEFAULT_MAX_WORKERS: usize = 8;

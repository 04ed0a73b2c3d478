//! The `halfpipe` command.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use halfpipe::bench::{self, Plan, System};
use halfpipe::client::{serve_inbound, Exit};
use halfpipe::config;
use halfpipe::keyfile::{encode_key, write_private_key, write_public_key};
use halfpipe::quickstart::{self, Ports};
use halfpipe::server::Server;
use halfpipe_core::aead::AeadLib;

/// halfpipe: a hardened split-path tunnel. What goes up and what comes down travel on
/// separate legs, end-to-end encrypted.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Worker threads of the async runtime (default: one per core but one, at least one:
    /// the kernel's socket work and the peers need a core of their own).
    #[arg(long, global = true, env = "HALFPIPE_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// The library that seals and opens records: `ring` or `aws-lc` (default: the faster on
    /// this CPU; both write the same bytes, so each end chooses alone).
    #[arg(long, global = true, env = "HALFPIPE_AEAD_LIB", value_parser = parse_aead_lib)]
    aead_lib: Option<AeadLib>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create keys, a dev certificate and configs, run exit and client locally, check them.
    Quickstart {
        /// State directory (created 0700; reused when it holds configs).
        #[arg(long, default_value = "halfpipe-quickstart")]
        dir: PathBuf,
        /// Exit after the end-to-end check instead of serving.
        #[arg(long)]
        check_only: bool,
    },
    /// Run the exit server (`server init` first, once, to create its state directory).
    Server {
        #[command(subcommand)]
        command: Option<ServerCommand>,
        /// Server configuration file.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Talk to a running server's admin API (over its Unix socket).
    Ctl(Box<CtlArgs>),
    /// The audit log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Run the client (SOCKS5, HTTP CONNECT and forwards) from a config file or a link.
    Client {
        /// Client configuration file.
        #[arg(long, short, conflicts_with = "link")]
        config: Option<PathBuf>,
        /// A share link from 'halfpipe ctl users add' (quote it; or set HALFPIPE_LINK).
        #[arg(long, env = "HALFPIPE_LINK", hide_env_values = true)]
        link: Option<String>,
        /// With --link: the SOCKS5 address to offer.
        #[arg(long, default_value = "127.0.0.1:1080")]
        socks: String,
        /// With --link: where the client keeps what it learns (a rotated server key).
        #[arg(long, default_value = "halfpipe-client")]
        state_dir: PathBuf,
        /// With --link: do not run; write this client config (no secrets in it) and seal
        /// the link's keys into a key store next to it, then exit.
        #[arg(long, requires = "link")]
        save: Option<PathBuf>,
        /// With --save: how the store is sealed (keyfile:PATH, passphrase-env:VAR,
        /// passphrase-file:PATH, env:VAR, credential:NAME); default a new key file
        /// next to the config.
        #[arg(long, requires = "save")]
        sealer: Option<String>,
    },
    /// Check a configuration file and explain every problem.
    CheckConfig {
        /// The file (server or client; told apart by its `listen` key).
        file: PathBuf,
    },
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Development certificates.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Benchmark the tunnel against a direct connection (and shadowsocks-rust when
    /// `sslocal`/`ssserver` are installed) on loopback.
    Bench {
        /// Small transfers, for a smoke run.
        #[arg(long)]
        quick: bool,
        /// Interleaved rounds; medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Skip shadowsocks-rust even when installed.
        #[arg(long)]
        no_ss: bool,
        /// Keep the state directory and the logs of the systems under test.
        #[arg(long)]
        keep: bool,
        /// Leg transports to measure, one tunnel each: tls, tcp, quic, ws, wss, or an
        /// uplink+downlink pair such as wss+quic; a `/double` suffix (tls/double) keeps the
        /// Noise AEAD on channel-bound legs too (`double_encrypt = true`), `/payload=N`
        /// (quic/payload=1452) sets `[quic] max_udp_payload`, `/threads=N` or
        /// `/threads=CLIENT:EXIT` (tls/threads=1:auto) the ends' `--threads`, `/sessions=N`
        /// (tls/sessions=1) the client's `[limits] sessions`.
        #[arg(long, value_delimiter = ',', default_value = "tls")]
        legs: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Create the state directory: database, token pepper, audit key and log, mode OPEN,
    /// and a bootstrap admin token in a 0600 file.
    Init,
}

#[derive(Subcommand)]
enum LogCommand {
    /// Verify an audit log: chain, signed checkpoints, head file. Exit 0 only when all holds.
    Verify {
        /// The log file (e.g. STATE_DIR/audit/audit.log).
        file: PathBuf,
        /// The signing key's public half (hex, printed by 'server init'); without it the
        /// key named in the log's genesis record is trusted.
        #[arg(long)]
        key: Option<String>,
        /// The head file with the latest checkpoint (default: audit.head beside the log).
        #[arg(long)]
        head: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct CtlArgs {
    /// The server's configuration (finds the admin socket and the bootstrap token).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The admin socket (default: from --config).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The admin API's loopback TLS listener instead of the socket (mutual TLS: needs
    /// --ca-file, --cert-file and --key-file).
    #[arg(long)]
    tcp: Option<std::net::SocketAddr>,
    /// CA (or self-signed certificate) the TLS listener's certificate must chain to.
    #[arg(long, requires = "tcp")]
    ca_file: Option<PathBuf>,
    /// Client certificate for the TLS listener.
    #[arg(long, requires = "tcp")]
    cert_file: Option<PathBuf>,
    /// Client certificate's private key (0600).
    #[arg(long, requires = "tcp")]
    key_file: Option<PathBuf>,
    /// A file holding the admin token (default: HALFPIPE_TOKEN, then the bootstrap token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print the server's JSON answer instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Mode, uptime, sessions, users, legs per transport, bytes, tripwires.
    Status,
    /// Live sessions.
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// The control-plane mode.
    Mode {
        #[command(subcommand)]
        command: ModeCommand,
    },
    /// Admin tokens.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Users.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// The audit log, as the server sees it.
    Log {
        #[command(subcommand)]
        command: CtlLogCommand,
    },
    /// Re-read the configuration file (as SIGHUP does).
    Reload,
    /// The server's keys in its key store.
    Keys {
        #[command(subcommand)]
        command: KeysCtlCommand,
    },
}

#[derive(Subcommand)]
enum KeysCtlCommand {
    /// List the keys (ids, states, public halves; never a secret).
    List,
    /// A new server static key; the old one is still accepted for the overlap window,
    /// during which connected clients learn the new one.
    Rotate {
        /// How long the old key is still accepted (default: keystore.rotation_overlap).
        #[arg(long)]
        overlap: Option<String>,
    },
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// List live sessions.
    List,
    /// Close a session now (by id or unique prefix).
    Kill {
        /// The session id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ModeCommand {
    /// Show the mode.
    Get,
    /// Set the mode: open, restricted, lockdown.
    Set {
        /// The mode.
        mode: String,
        /// Required to leave LOCKDOWN.
        #[arg(long)]
        confirm_leave_lockdown: bool,
        /// Why (recorded in the state and the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Clear the freeze a clock jump put on de-escalation.
    Unfreeze,
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Create a token (shown once).
    Create {
        /// A name for people.
        #[arg(long)]
        name: String,
        /// Capabilities, comma-separated (status, sessions.read, sessions.kill, mode.set,
        /// users.manage, tokens.manage, log.read, log.verify, reload, admin).
        #[arg(long)]
        caps: String,
        /// Lifetime, e.g. 30d.
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id.
    Revoke {
        /// The token id.
        id: String,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// List users.
    List,
    /// Add a user: with --public-key (from 'halfpipe keys gen'), or without, to have the
    /// exit make the key pair and print a share link and QR code, once.
    Add {
        /// Name.
        name: String,
        /// The user's public key.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Remove an API-added user (closes their sessions).
    Remove {
        /// Name.
        name: String,
    },
    /// Disable a user (closes their sessions, refuses new ones).
    Disable {
        /// Name.
        name: String,
    },
    /// Enable a disabled user.
    Enable {
        /// Name.
        name: String,
    },
    /// Set a user's limits (replaces the previous policy; omitted limits are off).
    Policy {
        /// Name.
        name: String,
        /// Access ends after this long (e.g. 30d).
        #[arg(long)]
        expires_in: Option<String>,
        /// Most sessions (devices) at once.
        #[arg(long)]
        max_sessions: Option<u32>,
        /// Upload speed limit, bytes per second.
        #[arg(long)]
        up_bytes_per_sec: Option<u64>,
        /// Download speed limit, bytes per second.
        #[arg(long)]
        down_bytes_per_sec: Option<u64>,
        /// Transfer quota in bytes per --quota-period.
        #[arg(long)]
        quota_bytes: Option<u64>,
        /// day or month (UTC).
        #[arg(long, default_value = "month")]
        quota_period: String,
        /// Destinations allowed (CIDR or address), repeatable.
        #[arg(long = "allow")]
        allow: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CtlLogCommand {
    /// Verify the server's audit log with the server's key.
    Verify,
    /// The last records.
    Tail {
        /// How many.
        #[arg(short, default_value_t = 20)]
        n: usize,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate a static key pair: PATH (private, 0600) and PATH.pub.
    Gen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Generate a self-signed certificate and print its public-key pin.
    Gen {
        /// DNS names or IP addresses the certificate is for.
        #[arg(long = "name", default_value = "localhost")]
        names: Vec<String>,
        /// Certificate output (PEM).
        #[arg(long, default_value = "cert.pem")]
        cert: PathBuf,
        /// Private key output (PEM, 0600).
        #[arg(long, default_value = "cert.key")]
        key: PathBuf,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HALFPIPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

/// Keeps freed data-path buffers in glibc's heap instead of returning them to the kernel
/// (and faulting fresh zeroed pages in again on the next allocation): buffers up to 4 MiB
/// come from the heap, and the heap top is trimmed only beyond 8 MiB free.
///
/// One arena for every thread: by default glibc gives each thread that allocates (tokio
/// workers, the blocking pool, the audit writer) an arena of its own, each keeping up to
/// the trim threshold of freed memory, which cost 6–10 MiB of peak RSS per process in
/// `halfpipe bench` (64 streams: 67 → 55 MiB for both ends) with no measurable throughput
/// change; small allocations still come from each thread's lock-free tcache.
fn tune_allocator() {
    // SAFETY: mallopt only adjusts glibc allocator parameters; it is called once at start,
    // before any other thread exists, with documented parameter constants.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// `--aead-lib`: a library by its name.
fn parse_aead_lib(name: &str) -> Result<AeadLib, String> {
    AeadLib::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = AeadLib::ALL.iter().map(|l| l.name()).collect();
        format!("not one of {}", names.join(", "))
    })
}

/// The runtime's worker threads when `--threads` is not given, on a machine with `cores`
/// cores: one per core but one, and at least one. Every byte a tunnel end moves also costs
/// kernel time in socket calls, and the application and the other end run beside it; a
/// worker on every core makes them fight for the cores, so the tunnel moves less. On a
/// 2-core machine one worker was faster in every throughput figure and used less CPU per GB
/// (docs/BENCHMARKS.md, 2026-12-04 and 2026-12-05).
fn default_worker_threads(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

/// Runs the command; errors are printed as one readable chain (no backtrace) with exit 1.
fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_logging();
    if let Some(lib) = cli.aead_lib {
        // Before any key exists, so this cannot be refused.
        let _ = AeadLib::prefer(lib);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    builder.worker_threads(
        cli.threads
            .map_or_else(|| default_worker_threads(cores), usize::from),
    );
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Quickstart { dir, check_only } => run_quickstart(&dir, check_only).await,
        Command::Server { command, config } => {
            let Some(config) = config else {
                bail!("'halfpipe server' needs --config FILE (the quickstart writes one)");
            };
            match command {
                Some(ServerCommand::Init) => server_init(&config),
                None => run_server(&config).await,
            }
        }
        Command::Ctl(args) => run_ctl(*args).await,
        Command::Log {
            command:
                LogCommand::Verify {
                    file,
                    key,
                    head,
                    json,
                },
        } => log_verify(&file, key.as_deref(), head.as_deref(), json),
        Command::Client {
            config,
            link,
            socks,
            state_dir,
            save,
            sealer,
        } => {
            if let (Some(save), Some(link)) = (&save, &link) {
                return save_link(link, &socks, save, sealer.as_deref());
            }
            let settings = match (config, link) {
                (Some(path), _) => {
                    config::load_client(&path, &config::process_env).map_err(load_errors)?
                }
                (None, Some(link)) => {
                    let link = halfpipe_core::link::ShareLink::parse(&link)
                        .context("the --link is not a valid halfpipe link (ask for a new one)")?;
                    std::fs::create_dir_all(&state_dir)
                        .with_context(|| format!("cannot create {}", state_dir.display()))?;
                    config::client_from_link(&link, &socks, &state_dir).map_err(load_errors)?
                }
                (None, None) => bail!(
                    "'halfpipe client' needs --config FILE or --link LINK (from 'halfpipe ctl users add')"
                ),
            };
            run_client(settings).await
        }
        Command::CheckConfig { file } => check_config(&file),
        Command::Keys {
            command: KeysCommand::Gen { out },
        } => keys_gen(&out),
        Command::Cert {
            command: CertCommand::Gen { names, cert, key },
        } => {
            let c = halfpipe::cert::generate_self_signed(&names)?;
            halfpipe::cert::write_dev_cert(&c, &cert, &key)?;
            println!(
                "certificate: {}\nprivate key: {} (0600)\npin:         {}",
                cert.display(),
                key.display(),
                c.pin
            );
            println!(
                "clients may trust it with  ca_file = \"{}\"  or  pin = \"{}\"",
                cert.display(),
                c.pin
            );
            Ok(())
        }
        Command::Bench {
            quick,
            rounds,
            no_ss,
            keep,
            legs,
        } => run_bench(quick, rounds, no_ss, keep, &legs).await,
    }
}

async fn run_quickstart(dir: &Path, check_only: bool) -> Result<()> {
    let created = quickstart::prepare(dir, Ports::pick([18443, 18444, 11080, 18080])?)?;
    let dir_shown = dir.display();
    if created {
        println!("created keys, a development certificate and configs in {dir_shown}/");
    } else {
        println!("using the existing configs in {dir_shown}/");
    }
    let running = quickstart::start(dir).await.with_context(|| {
        format!("starting from {dir_shown}/ (delete the directory to start afresh)")
    })?;
    quickstart::self_check(running.socks).await?;
    println!("end-to-end check passed: a loopback page came back through the tunnel");
    println!("  uplink and downlink: {}", running.legs.join("  and  "));
    println!("  SOCKS5 proxy:        {}", running.socks);
    if let Some(h) = running.http {
        println!("  HTTP CONNECT proxy:  {h}");
    }
    println!(
        "  try:  curl --socks5-hostname {} http://127.0.0.1:PORT/",
        running.socks
    );
    println!(
        "  note: {dir_shown}/server.toml allow-lists loopback destinations for this demo only;"
    );
    println!("        every other server config denies loopback and private ranges unless told otherwise.");
    println!(
        "  steer the exit:      halfpipe ctl --config {dir_shown}/server.toml status   (modes, sessions, tokens: docs/CONTROL.md)"
    );
    println!("the same thing as two processes:");
    println!("  halfpipe server --config {dir_shown}/server.toml");
    println!("  halfpipe client --config {dir_shown}/client.toml");
    if check_only {
        return Ok(());
    }
    println!("serving; press Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn load_errors(e: config::ConfigErrors) -> anyhow::Error {
    anyhow::anyhow!("{e}\n(run 'halfpipe check-config FILE' after fixing)")
}

fn save_link(link: &str, socks: &str, save: &Path, sealer: Option<&str>) -> Result<()> {
    let link = halfpipe_core::link::ShareLink::parse(link)
        .context("the --link is not a valid halfpipe link (ask for a new one)")?;
    let saved = config::save_link(&link, socks, save, sealer, halfpipe::control::wall_ms())
        .context("saving the link")?;
    println!(
        "client config: {} (no secrets in it)\nkey store:     {} (sealed with {}; it holds the user key{})\nnext: halfpipe client --config {}",
        saved.config.display(),
        saved.store.display(),
        saved.sealer,
        if link.psk.is_some() { " and the pre-shared key" } else { "" },
        saved.config.display()
    );
    Ok(())
}

fn server_init(path: &Path) -> Result<()> {
    let settings = config::load_server(path, &config::process_env).map_err(load_errors)?;
    let init_context = || format!("initializing the state directory of {}", path.display());
    halfpipe::control::init::check_fresh(&settings.control).with_context(init_context)?;
    let mut store = None;
    if let halfpipe::server::keys::KeySource::Store(ks) = &settings.keys {
        let (s, public) = ks
            .create(halfpipe::control::wall_ms())
            .with_context(|| format!("creating the key store {}", ks.file.display()))?;
        println!(
            "key store:           {} (sealed; server public key {} — give it to clients as server_public_key, or use 'halfpipe ctl users add' links; it also holds the token pepper and vouches for the audit key)",
            ks.file.display(),
            halfpipe::keyfile::encode_key(&public)
        );
        store = Some(s);
    }
    let done = halfpipe::control::init::init(&settings.control, store.as_mut())
        .with_context(init_context)?;
    let p = &settings.control.paths;
    println!("state directory:     {} (0700)", p.dir.display());
    println!(
        "bootstrap admin token: {} (0600; id {}) — keep it safe, create narrower tokens with 'halfpipe ctl tokens create'",
        done.token_file.display(),
        done.token_id
    );
    println!(
        "audit log:           {} (signing key {}, public {})",
        p.audit_log.display(),
        p.audit_key.display(),
        done.audit_public
    );
    println!("next: halfpipe server --config {}", path.display());
    Ok(())
}

/// No core dumps and no same-user ptrace: keys live in this process's memory.
fn harden() {
    if let Err(e) = halfpipe_keystore::harden_process() {
        tracing::warn!(error = %e, "cannot switch core dumps off; keys could reach a core file");
    }
}

async fn run_server(path: &Path) -> Result<()> {
    harden();
    let settings = config::load_server(path, &config::process_env).map_err(load_errors)?;
    let server = Server::bind(settings).await?;
    for u in server.urls() {
        tracing::info!(listen = %u, "leg listener up");
    }
    let handle = server.handle();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let run = server.run();
    tokio::pin!(run);
    let result = loop {
        tokio::select! {
            () = &mut run => break Ok(()),
            _ = hup.recv() => match handle.reload() {
                Ok(summary) => tracing::info!(%summary, "SIGHUP: configuration reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: reload failed; the running configuration is unchanged"),
            },
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break Ok(()) }
            _ = tokio::signal::ctrl_c() => { tracing::info!("shutting down"); break Ok(()) }
        }
    };
    let h = handle.clone();
    tokio::task::spawn_blocking(move || h.shutdown()).await?;
    result
}

fn log_verify(file: &Path, key: Option<&str>, head: Option<&Path>, json: bool) -> Result<()> {
    let key = match key {
        None => None,
        Some(k) => {
            let mut b = [0u8; 32];
            hex::decode_to_slice(k.trim(), &mut b).with_context(|| {
                "--key must be the 64 hex characters printed by 'halfpipe server init'"
            })?;
            Some(b)
        }
    };
    let default_head = file.with_file_name("audit.head");
    let head = head.or(default_head.exists().then_some(default_head.as_path()));
    let report = halfpipe_audit::verify(file, head, key);
    if json {
        println!("{:#}", halfpipe::audit_report_json(&report));
    } else {
        print!("{}", halfpipe::render_audit_report(&report));
    }
    if report.is_ok() {
        Ok(())
    } else {
        std::process::exit(7)
    }
}

async fn run_ctl(args: CtlArgs) -> Result<()> {
    use halfpipe::ctl::{read_token, render_status, render_table, AdminAddr, CtlClient, CtlError};
    use serde_json::{json, Value};
    let paths = match &args.config {
        Some(c) => Some(
            config::load_server(c, &config::process_env)
                .map_err(load_errors)?
                .control
                .paths,
        ),
        None => None,
    };
    let addr = match (&args.tcp, &args.ca_file, &args.cert_file, &args.key_file) {
        (Some(addr), Some(ca), Some(cert), Some(key)) => AdminAddr::Tls {
            addr: *addr,
            config: halfpipe::tls::client_config_with(
                &halfpipe::tls::ServerTrust::CaFile(ca.clone()),
                Some((cert, key)),
            )?,
        },
        (Some(_), ..) => bail!("--tcp needs --ca-file, --cert-file and --key-file (mutual TLS)"),
        (None, ..) => match args
            .socket
            .clone()
            .or_else(|| paths.as_ref().map(|p| p.admin_socket.clone()))
        {
            Some(socket) => AdminAddr::Unix(socket),
            None => bail!("'halfpipe ctl' needs --config SERVER.TOML, --socket PATH or --tcp ADDR"),
        },
    };
    let token = match (
        &args.token_file,
        std::env::var("HALFPIPE_TOKEN").ok(),
        &paths,
    ) {
        (Some(f), _, _) => read_token(f),
        (None, Some(t), _) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        (None, _, Some(p)) => read_token(&p.bootstrap_token),
        _ => Err(CtlError::NoToken),
    };
    let outcome = async {
        let client = CtlClient::new(addr, token?);
        let (method, path, body) = match &args.command {
            CtlCommand::Status => ("GET", "/v1/status".to_string(), None),
            CtlCommand::Sessions { command: SessionsCommand::List } => ("GET", "/v1/sessions".into(), None),
            CtlCommand::Sessions { command: SessionsCommand::Kill { id } } => ("POST", format!("/v1/sessions/{id}/kill"), None),
            CtlCommand::Mode { command: ModeCommand::Get } => ("GET", "/v1/mode".into(), None),
            CtlCommand::Mode { command: ModeCommand::Set { mode, confirm_leave_lockdown, reason } } => (
                "POST",
                "/v1/mode".into(),
                Some(json!({ "mode": mode, "confirm": confirm_leave_lockdown, "reason": reason.clone().unwrap_or_else(|| "set with halfpipe ctl".into()) })),
            ),
            CtlCommand::Mode { command: ModeCommand::Unfreeze } => ("POST", "/v1/mode/unfreeze".into(), None),
            CtlCommand::Tokens { command: TokensCommand::Create { name, caps, expires_in } } => (
                "POST",
                "/v1/tokens".into(),
                Some(json!({ "name": name, "caps": caps, "expires_in": expires_in })),
            ),
            CtlCommand::Tokens { command: TokensCommand::List } => ("GET", "/v1/tokens".into(), None),
            CtlCommand::Tokens { command: TokensCommand::Revoke { id } } => ("DELETE", format!("/v1/tokens/{id}"), None),
            CtlCommand::Users { command: UsersCommand::List } => ("GET", "/v1/users".into(), None),
            CtlCommand::Users { command: UsersCommand::Add { name, public_key } } => (
                "POST",
                "/v1/users".into(),
                Some(match public_key {
                    Some(k) => json!({ "name": name, "public_key": k }),
                    None => json!({ "name": name }),
                }),
            ),
            CtlCommand::Users { command: UsersCommand::Remove { name } } => ("DELETE", format!("/v1/users/{name}"), None),
            CtlCommand::Users { command: UsersCommand::Disable { name } } => ("POST", format!("/v1/users/{name}/disable"), None),
            CtlCommand::Users { command: UsersCommand::Enable { name } } => ("POST", format!("/v1/users/{name}/enable"), None),
            CtlCommand::Log { command: CtlLogCommand::Verify } => ("POST", "/v1/log/verify".into(), None),
            CtlCommand::Log { command: CtlLogCommand::Tail { n } } => ("GET", format!("/v1/log/tail?n={n}"), None),
            CtlCommand::Reload => ("POST", "/v1/reload".into(), None),
            CtlCommand::Keys { command: KeysCtlCommand::List } => ("GET", "/v1/keys".into(), None),
            CtlCommand::Keys { command: KeysCtlCommand::Rotate { overlap } } => (
                "POST",
                "/v1/keys/rotate".into(),
                Some(json!({ "overlap": overlap })),
            ),
            CtlCommand::Users {
                command:
                    UsersCommand::Policy {
                        name,
                        expires_in,
                        max_sessions,
                        up_bytes_per_sec,
                        down_bytes_per_sec,
                        quota_bytes,
                        quota_period,
                        allow,
                    },
            } => {
                let expires_at_ms = match expires_in {
                    Some(d) => Some(
                        halfpipe::control::parse_deadline(
                            "--expires-in",
                            d,
                            halfpipe::control::wall_ms(),
                        )
                        .map_err(CtlError::Protocol)?
                        .1,
                    ),
                    None => None,
                };
                let mut policy = json!({ "allowed_destinations": allow });
                for (k, v) in [
                    ("expires_at_ms", expires_at_ms.map(Value::from)),
                    ("max_sessions", max_sessions.map(Value::from)),
                    ("up_bytes_per_sec", up_bytes_per_sec.map(Value::from)),
                    ("down_bytes_per_sec", down_bytes_per_sec.map(Value::from)),
                    (
                        "quota",
                        quota_bytes.map(|b| json!({ "bytes": b, "period": quota_period })),
                    ),
                ] {
                    if let Some(v) = v {
                        policy[k] = v;
                    }
                }
                ("POST", format!("/v1/users/{name}/policy"), Some(policy))
            }
        };
        let v = client.call(method, &path, body).await?;
        let text = if args.json {
            format!("{v:#}
")
        } else {
            match &args.command {
                CtlCommand::Status => render_status(&v),
                CtlCommand::Sessions { command: SessionsCommand::List } => render_table(
                    &v,
                    "sessions",
                    &["id", "user", "peer", "age_s", "streams", "bytes_up", "bytes_down", "uplink", "downlink"],
                ),
                CtlCommand::Tokens { command: TokensCommand::List } => {
                    render_table(&v, "tokens", &["id", "name", "caps", "expires_ms", "revoked"])
                }
                CtlCommand::Tokens { command: TokensCommand::Create { .. } } => format!(
                    "token {} created; it is shown once, store it now:
{}
",
                    v["id"].as_str().unwrap_or("?"),
                    v["token"].as_str().unwrap_or("?")
                ),
                CtlCommand::Users { command: UsersCommand::Add { .. } } if v["link"].is_string() => {
                    let link = v["link"].as_str().unwrap_or_default();
                    format!(
                        "user {} added. Their link, shown this once (it holds their private key; send it privately):\n\n{link}\n\n{}\nthey run: halfpipe client --link '<the link>'\n",
                        v["added"].as_str().unwrap_or("?"),
                        halfpipe::links::qr(link).unwrap_or_default()
                    )
                }
                CtlCommand::Users { command: UsersCommand::List } => {
                    render_table(&v, "users", &["name", "source", "disabled", "sessions", "quota_used", "quota_limit", "public_key"])
                }
                CtlCommand::Keys { command: KeysCtlCommand::List } => {
                    render_table(&v, "keys", &["id", "kind", "state", "public", "created_ms"])
                }
                CtlCommand::Log { command: CtlLogCommand::Verify } => halfpipe::render_audit_json(&v),
                CtlCommand::Log { command: CtlLogCommand::Tail { .. } } => v["records"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| format!("{r}
"))
                    .collect(),
                CtlCommand::Mode { .. } => format!(
                    "mode {}{} (set by {}: {})
",
                    v["mode"].as_str().unwrap_or("?"),
                    if v["frozen"].as_bool() == Some(true) { ", de-escalation frozen" } else { "" },
                    v["changed_by"].as_str().unwrap_or("?"),
                    v["reason"].as_str().unwrap_or("")
                ),
                _ => format!("{v}
"),
            }
        };
        print!("{text}");
        if matches!(args.command, CtlCommand::Log { command: CtlLogCommand::Verify })
            && v["ok"].as_bool() != Some(true)
        {
            return Err(CtlError::LogInvalid);
        }
        Ok::<(), CtlError>(())
    }
    .await;
    match outcome {
        Ok(()) => Ok(()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(e.exit_code() as i32)
        }
    }
}

async fn run_client(settings: config::ClientSettings) -> Result<()> {
    harden();
    let exit = Exit::new(settings.exit);
    let mut tasks = Vec::new();
    for (addr, inbound) in settings.inbounds {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (in use? choose another address)"))?;
        tracing::info!(%addr, "inbound listening");
        tasks.push(tokio::spawn(serve_inbound(l, inbound, exit.clone())));
    }
    // Dial eagerly so configuration problems show at start, not at the first request.
    if let Err(e) = exit.tunnel().await {
        tracing::warn!(error = %e, "exit not reachable yet; will retry on the first request");
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn check_config(file: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let result = if config::is_server_config(&text) {
        config::server_from_str(file, &text, &config::process_env).map(|_| "server")
    } else {
        config::client_from_str(file, &text, &config::process_env).map(|_| "client")
    };
    match result {
        Ok(role) => {
            println!("{}: valid {role} configuration", file.display());
            Ok(())
        }
        Err(e) => {
            eprintln!("{e}");
            bail!("{} problem(s) in {}", e.0.len(), file.display())
        }
    }
}

fn keys_gen(out: &Path) -> Result<()> {
    let (private, public) = halfpipe_core::handshake::generate_keypair()?;
    write_private_key(out, &private)?;
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    write_public_key(&pub_path, &public)?;
    println!("private key: {} (0600; never share it)", out.display());
    println!(
        "public key:  {}  (also in {})",
        encode_key(&public),
        pub_path.display()
    );
    Ok(())
}

fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// One `--legs` entry: `quic`, `quic+tls`, with optional suffixes `/double`
/// (`double_encrypt = true`), `/payload=N` (`[quic] max_udp_payload = N`) and
/// `/threads=N` or `/threads=CLIENT:EXIT` (each end's `--threads`, `auto` for the default)
/// and `/sessions=N` (the client's `[limits] sessions`) and `/aead=LIB` (both ends'
/// `--aead-lib`).
struct LegsSpec<'a> {
    up: &'a str,
    down: &'a str,
    double: bool,
    quic_payload: Option<u16>,
    /// `--threads` of the client and of the exit.
    threads: [Option<u16>; 2],
    /// The client's session pool size.
    sessions: Option<usize>,
    /// Both ends' record AEAD library.
    aead: Option<AeadLib>,
}

impl<'a> LegsSpec<'a> {
    fn parse(legs: &'a str) -> Result<Self> {
        let mut parts = legs.split('/');
        let pair = parts.next().unwrap_or_default();
        let (up, down) = pair.split_once('+').unwrap_or((pair, pair));
        let mut spec = Self {
            up,
            down,
            double: false,
            quic_payload: None,
            threads: [None; 2],
            sessions: None,
            aead: None,
        };
        for s in [up, down] {
            if !matches!(s, "tls" | "tcp" | "quic" | "ws" | "wss" | "wt") {
                bail!(
                    "--legs takes tls, tcp, quic, ws, wss, wt or a pair such as wss+quic (with /double to keep both encryption layers, /payload=N for the QUIC UDP payload bound), not {legs:?}"
                );
            }
        }
        for suffix in parts {
            match suffix.split_once('=') {
                None if suffix == "double" => spec.double = true,
                Some(("payload", n)) => {
                    spec.quic_payload = Some(n.parse().with_context(|| {
                        format!("--legs {legs:?}: /payload= takes a byte count such as 8952")
                    })?)
                }
                Some(("threads", n)) => {
                    let (c, s) = n.split_once(':').unwrap_or((n, n));
                    let count = |v: &str| match v.parse::<u16>() {
                        Ok(n) if n >= 1 => Ok(Some(n)),
                        _ if v == "auto" => Ok(None),
                        _ => Err(anyhow!("--legs {legs:?}: /threads= takes N, or CLIENT:EXIT, each a count of 1 or more or auto")),
                    };
                    spec.threads = [count(c)?, count(s)?];
                }
                Some(("sessions", n)) => match n.parse::<usize>() {
                    Ok(n) if (1..=halfpipe::client::MAX_SESSIONS).contains(&n) => {
                        spec.sessions = Some(n)
                    }
                    _ => bail!(
                        "--legs {legs:?}: /sessions= takes a count from 1 to {}",
                        halfpipe::client::MAX_SESSIONS
                    ),
                },
                Some(("aead", lib)) => {
                    spec.aead = Some(
                        parse_aead_lib(lib).map_err(|e| anyhow!("--legs {legs:?}: /aead={e}"))?,
                    )
                }
                _ => bail!("--legs {legs:?}: unknown suffix /{suffix} (use /double, /payload=N, /threads=N, /sessions=N or /aead=LIB)"),
            }
        }
        Ok(spec)
    }

    /// The row name in the tables.
    fn name(&self) -> String {
        let mut name = if self.up == self.down {
            format!("halfpipe ({} legs", self.up)
        } else {
            format!("halfpipe ({} up, {} down", self.up, self.down)
        };
        if self.double {
            name += ", double-encrypted";
        }
        if let Some(n) = self.quic_payload {
            name += &format!(", QUIC payload {n}");
        }
        let show = |t: Option<u16>| t.map_or("auto".to_string(), |n| n.to_string());
        match self.threads {
            [None, None] => {}
            [c, s] if c == s => name += &format!(", {} threads", show(c)),
            [c, s] => name += &format!(", threads {}:{}", show(c), show(s)),
        }
        if let Some(n) = self.sessions {
            name += &format!(", {n} sessions");
        }
        if let Some(lib) = self.aead {
            name += &format!(", {} AEAD", lib.name());
        }
        name + ")"
    }

    /// Rewrites the generated configs in `dir` for the suffixes.
    fn apply(&self, dir: &Path) -> Result<()> {
        for file in ["server.toml", "client.toml"] {
            let path = dir.join(file);
            let mut text = std::fs::read_to_string(&path)?;
            if self.double {
                let line = "\ndouble_encrypt = false\n";
                if !text.contains(line) {
                    bail!("{} has no double_encrypt line to switch", path.display());
                }
                text = text.replacen(line, "\ndouble_encrypt = true\n", 1);
            }
            if let Some(n) = self.quic_payload {
                if text.contains("\n[quic]\n") {
                    bail!("{} already has a [quic] section", path.display());
                }
                text += &format!("\n[quic]\nmax_udp_payload = {n}\n");
            }
            if let (Some(n), "client.toml") = (self.sessions, file) {
                let Some(at) = text.find("\nsessions = ") else {
                    bail!("{} has no sessions line to change", path.display());
                };
                let end = text[at + 1..].find('\n').map_or(text.len(), |e| at + 1 + e);
                text.replace_range(at + 1..end, &format!("sessions = {n}"));
            }
            std::fs::write(&path, text)?;
        }
        Ok(())
    }
}

/// Starts a tunnel whose legs are `legs` (see [`LegsSpec`]).
async fn start_halfpipe(dir: &Path, legs: &str, target: std::net::SocketAddr) -> Result<System> {
    let spec = LegsSpec::parse(legs)?;
    let ports = Ports::pick([0, 0, 0, 0])?;
    quickstart::prepare_with(dir, ports, [spec.up, spec.down])?;
    spec.apply(dir)?;
    let exe = std::env::current_exe()?;
    let args = |role: &str, threads: Option<u16>| {
        let mut a = vec![
            role.to_string(),
            "--config".into(),
            dir.join(format!("{role}.toml")).display().to_string(),
        ];
        if let Some(n) = threads {
            a.extend(["--threads".into(), n.to_string()]);
        }
        if let Some(lib) = spec.aead {
            a.extend(["--aead-lib".into(), lib.name().into()]);
        }
        a
    };
    let client = bench::spawn(
        &exe,
        &args("client", spec.threads[0]),
        &dir.join("client.log"),
    )?;
    let server = bench::spawn(
        &exe,
        &args("server", spec.threads[1]),
        &dir.join("server.log"),
    )?;
    let socks = ([127, 0, 0, 1], ports.socks).into();
    let sys = System {
        name: spec.name(),
        socks: Some(socks),
        children: vec![client, server],
    };
    bench::wait_listening("halfpipe client", socks).await?;
    bench::wait_tunnel("halfpipe tunnel", socks, target).await?;
    Ok(sys)
}

async fn start_shadowsocks(dir: &Path) -> Result<Option<System>> {
    let (Some(local), Some(server)) = (find_program("sslocal"), find_program("ssserver")) else {
        return Ok(None);
    };
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let ports = Ports::pick([0, 0, 0, 0])?;
    let method = "2022-blake3-aes-256-gcm".to_string();
    let srv_addr = format!("127.0.0.1:{}", ports.uplink);
    let s = bench::spawn(
        &server,
        &[
            "-s".into(),
            srv_addr.clone(),
            "-m".into(),
            method.clone(),
            "-k".into(),
            key.clone(),
        ],
        &dir.join("ssserver.log"),
    )?;
    let c = bench::spawn(
        &local,
        &[
            "-b".into(),
            format!("127.0.0.1:{}", ports.socks),
            "-s".into(),
            srv_addr,
            "-m".into(),
            method,
            "-k".into(),
            key,
        ],
        &dir.join("sslocal.log"),
    )?;
    let socks = ([127, 0, 0, 1], ports.socks).into();
    let sys = System {
        name: "shadowsocks-rust 2022-blake3-aes-256-gcm".into(),
        socks: Some(socks),
        children: vec![c, s],
    };
    bench::wait_listening("sslocal", socks).await?;
    bench::wait_listening("ssserver", ([127, 0, 0, 1], ports.uplink).into()).await?;
    Ok(Some(sys))
}

async fn run_bench(
    quick: bool,
    rounds: usize,
    no_ss: bool,
    keep: bool,
    legs: &[String],
) -> Result<()> {
    let plan = if quick { Plan::quick() } else { Plan::full() };
    let base = std::env::temp_dir().join(format!("halfpipe-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let target = bench::start_target().await?;
    let mut systems = vec![System::direct()];
    for scheme in legs {
        let dir = base.join(format!("halfpipe-{}", scheme.replace('/', "-")));
        systems.push(start_halfpipe(&dir, scheme, target).await?);
    }
    let tunnels = systems.len();
    if !no_ss {
        std::fs::create_dir_all(base.join("ss"))?;
        match start_shadowsocks(&base.join("ss")).await? {
            Some(s) => systems.push(s),
            None => eprintln!("shadowsocks-rust not found (cargo install shadowsocks-rust --version 1.25.0 --bin sslocal --bin ssserver); comparing with direct only"),
        }
    }
    let mut results: Vec<Vec<bench::Round>> = vec![Vec::new(); systems.len()];
    for r in 0..rounds {
        let mut this_round = Vec::with_capacity(systems.len());
        for sys in &systems {
            eprintln!("round {}/{rounds}: {}", r + 1, sys.name);
            let round = bench::round(sys, target, &plan).await.with_context(|| {
                format!("benchmarking {} (logs in {})", sys.name, base.display())
            })?;
            this_round.push(round);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "round {}/{rounds}: round trips, the systems taking turns",
            r + 1
        );
        let trips = bench::round_trips(&systems, target, &plan)
            .await
            .with_context(|| format!("measuring round trips (logs in {})", base.display()))?;
        for ((done, round), trips) in results.iter_mut().zip(this_round).zip(trips) {
            done.push(round.with_round_trips(trips));
        }
    }
    let summaries: Vec<bench::Summary> = systems
        .iter()
        .zip(&results)
        .map(|(s, r)| bench::summarize(&s.name, r, s.peak_rss()))
        .collect();
    println!("{}", bench::render(&summaries));
    for s in &summaries[1..] {
        print!("{}", bench::ratios(s, &summaries[0]));
    }
    if let Some(ss) = summaries.get(tunnels) {
        for s in &summaries[1..tunnels] {
            print!("{}", bench::ratios(s, ss));
        }
    }
    drop(systems);
    if keep {
        eprintln!("state and logs kept in {}", base.display());
    } else {
        let _ = std::fs::remove_dir_all(&base);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{default_worker_threads, AeadLib, LegsSpec};

    #[test]
    fn default_workers_leave_one_core_free_and_never_fall_to_zero() {
        let picked: Vec<usize> = [0, 1, 2, 4, 64].map(default_worker_threads).to_vec();
        assert_eq!(picked, [1, 1, 1, 3, 63]);
    }

    #[test]
    fn legs_spec_reads_pairs_and_suffixes() {
        let s = LegsSpec::parse("wss+quic/double/payload=8952").unwrap();
        assert_eq!(
            (s.up, s.down, s.double, s.quic_payload),
            ("wss", "quic", true, Some(8952))
        );
        assert_eq!(
            s.name(),
            "halfpipe (wss up, quic down, double-encrypted, QUIC payload 8952)"
        );
        let s = LegsSpec::parse("tls").unwrap();
        assert_eq!(
            (s.up, s.down, s.double, s.quic_payload, s.threads),
            ("tls", "tls", false, None, [None, None])
        );
        assert_eq!(s.name(), "halfpipe (tls legs)");
        let s = LegsSpec::parse("tls/threads=1").unwrap();
        assert_eq!(s.threads, [Some(1), Some(1)]);
        assert_eq!(s.name(), "halfpipe (tls legs, 1 threads)");
        let s = LegsSpec::parse("tls/aead=aws-lc").unwrap();
        assert_eq!(s.aead, Some(AeadLib::AwsLc));
        assert_eq!(s.name(), "halfpipe (tls legs, aws-lc AEAD)");
        let s = LegsSpec::parse("tls/threads=1:auto").unwrap();
        assert_eq!(s.threads, [Some(1), None]);
        assert_eq!(s.name(), "halfpipe (tls legs, threads 1:auto)");
        let s = LegsSpec::parse("tls/sessions=2").unwrap();
        assert_eq!(s.sessions, Some(2));
        assert_eq!(s.name(), "halfpipe (tls legs, 2 sessions)");
        for bad in [
            "tls/sessions=0",
            "tls/sessions=17",
            "udp",
            "tls+",
            "quic/payload=big",
            "quic/payload=70000",
            "tls/triple",
            "tls/threads=0",
            "tls/threads=1:many",
            "tls/aead=openssl",
        ] {
            assert!(LegsSpec::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn legs_spec_rewrites_both_configs() {
        let dir = std::env::temp_dir().join(format!("halfpipe-legs-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["server.toml", "client.toml"] {
            std::fs::write(
                dir.join(f),
                "a = 1\ndouble_encrypt = false\n[limits]\nsessions = 1\n",
            )
            .unwrap();
        }
        LegsSpec::parse("quic/double/payload=1500/sessions=2")
            .unwrap()
            .apply(&dir)
            .unwrap();
        for (f, sessions) in [("server.toml", 1), ("client.toml", 2)] {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            assert_eq!(
                text,
                format!("a = 1\ndouble_encrypt = true\n[limits]\nsessions = {sessions}\n\n[quic]\nmax_udp_payload = 1500\n")
            );
        }
        // A second [quic] section would be a TOML error; it is refused instead.
        assert!(LegsSpec::parse("quic/payload=1500")
            .unwrap()
            .apply(&dir)
            .is_err());
        // A client config without a sessions line cannot take a pool size.
        std::fs::write(dir.join("client.toml"), "a = 1\n[limits]\n").unwrap();
        let e = LegsSpec::parse("tls/sessions=2")
            .unwrap()
            .apply(&dir)
            .unwrap_err();
        assert!(e.to_string().contains("no sessions line"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

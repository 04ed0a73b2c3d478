//! The loopback benchmark: a tunnel's two ends (as separate processes) against a direct
//! connection, measured in one run with the same load generator and target.
//!
//! Measures single- and multi-stream throughput both ways, request/response latency
//! (p50/p99 at 1 byte and 1 KiB), new connections per second, CPU seconds per GB of both
//! ends together (from `/proc/<pid>/stat`), and the peak resident memory of each end
//! (`VmHWM`). Systems are interleaved round by round, and within a round the round-trip
//! measurement takes turns between them every few hundred exchanges; medians are reported,
//! because shared machines are noisy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Errors of the benchmark harness.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Socket or process error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A system under test did not become ready.
    #[error("{0} did not start listening within 15 s")]
    NotReady(String),
    /// A SOCKS5 request was refused.
    #[error("SOCKS5 proxy {0} answered code {1}")]
    Socks(SocketAddr, u8),
    /// Setting up a system under test failed.
    #[error("{0}")]
    Setup(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// A system under test: how to reach the target through it, and its processes.
pub struct System {
    /// Display name.
    pub name: String,
    /// SOCKS5 address, or `None` for the direct connection.
    pub socks: Option<SocketAddr>,
    /// Child processes (client end first), killed on drop.
    pub children: Vec<Child>,
}

impl Drop for System {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl System {
    /// The direct connection (no tunnel).
    pub fn direct() -> Self {
        Self {
            name: "direct".into(),
            socks: None,
            children: Vec::new(),
        }
    }

    /// Total CPU seconds (user + system) used so far by the system's processes.
    pub fn cpu_seconds(&self) -> f64 {
        self.cpu().total()
    }

    /// CPU time used so far by the system's processes, user and kernel apart.
    pub fn cpu(&self) -> CpuTime {
        self.children
            .iter()
            .map(|c| proc_cpu(c.id()))
            .fold(CpuTime::default(), |a, b| a + b)
    }

    /// Peak resident memory of each process, in bytes.
    pub fn peak_rss(&self) -> Vec<u64> {
        self.children
            .iter()
            .map(|c| proc_peak_rss(c.id()))
            .collect()
    }
}

/// CPU seconds a process used, in user space and in the kernel on its behalf.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTime {
    /// Seconds in user space.
    pub user: f64,
    /// Seconds in the kernel (system calls, and the network stack's work they carry).
    pub system: f64,
}

impl CpuTime {
    /// User and kernel together.
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Add for CpuTime {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            user: self.user + o.user,
            system: self.system + o.system,
        }
    }
}

impl std::ops::Sub for CpuTime {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            user: self.user - o.user,
            system: self.system - o.system,
        }
    }
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    proc_cpu(pid).total()
}

fn proc_cpu(pid: u32) -> CpuTime {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| parse_proc_cpu(&stat))
        .unwrap_or_default()
}

/// The user and system time in a `/proc/PID/stat` line (zero where it cannot be read).
fn parse_proc_cpu(stat: &str) -> CpuTime {
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else {
        return CpuTime::default();
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let seconds =
        |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / clock_ticks();
    // rest starts at field 3 (state), so utime (14) is index 11 and stime (15) index 12.
    CpuTime {
        user: seconds(11),
        system: seconds(12),
    }
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux configuration we run on.
    100.0
}

fn proc_peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_listening(name: &str, addr: SocketAddr) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(BenchError::NotReady(name.to_owned()))
}

/// Waits until a SOCKS5 connect through `socks` to `target` succeeds (the whole tunnel is
/// up, whatever its transports).
pub async fn wait_tunnel(
    name: &str,
    socks: SocketAddr,
    target: SocketAddr,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if connect(Some(socks), target).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(BenchError::NotReady(name.to_owned()))
}

/// Spawns a child process with output discarded (logs go to `log`).
pub fn spawn(program: &PathBuf, args: &[String], log: &PathBuf) -> Result<Child, BenchError> {
    let log_file =
        std::fs::File::create(log).map_err(io_err(format!("create {}", log.display())))?;
    let err_file = log_file
        .try_clone()
        .map_err(io_err("clone log file handle"))?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file)
        .spawn()
        .map_err(io_err(format!("start {}", program.display())))
}

// ---- the target ------------------------------------------------------------------------

/// Commands understood by the benchmark target (first byte of a connection).
const CMD_DOWNLOAD: u8 = b'D';
const CMD_UPLOAD: u8 = b'U';
const CMD_ECHO: u8 = b'E';

/// Starts the benchmark target on 127.0.0.1: `D<len>` sends len bytes, `U<len>` reads len
/// bytes then answers one byte, `E` echoes.
pub async fn start_target() -> Result<SocketAddr, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io_err("bind target"))?;
    let addr = l.local_addr().map_err(io_err("target address"))?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = serve_target(s).await;
            });
        }
    });
    Ok(addr)
}

async fn serve_target(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let cmd = s.read_u8().await?;
    let buf = vec![0x5au8; 256 * 1024];
    match cmd {
        CMD_DOWNLOAD => {
            let mut left = s.read_u64().await?;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            s.shutdown().await?;
        }
        CMD_UPLOAD => {
            let mut left = s.read_u64().await?;
            let mut rbuf = vec![0u8; 256 * 1024];
            while left > 0 {
                let n = s.read(&mut rbuf).await?;
                if n == 0 {
                    break;
                }
                left = left.saturating_sub(n as u64);
            }
            s.write_u8(1).await?;
        }
        CMD_ECHO => {
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await?;
        }
        _ => {}
    }
    Ok(())
}

// ---- the load ------------------------------------------------------------------------

/// Opens a connection to `target`, through SOCKS5 when `socks` is set.
pub async fn connect(
    socks: Option<SocketAddr>,
    target: SocketAddr,
) -> Result<TcpStream, BenchError> {
    let Some(proxy) = socks else {
        let s = TcpStream::connect(target)
            .await
            .map_err(io_err("connect target"))?;
        s.set_nodelay(true).map_err(io_err("nodelay"))?;
        return Ok(s);
    };
    let mut s = TcpStream::connect(proxy)
        .await
        .map_err(io_err("connect proxy"))?;
    s.set_nodelay(true).map_err(io_err("nodelay"))?;
    let SocketAddr::V4(t) = target else {
        return Err(BenchError::Setup("benchmark target must be IPv4".into()));
    };
    let mut req = vec![5, 1, 0, 5, 1, 0, 1];
    req.extend_from_slice(&t.ip().octets());
    req.extend_from_slice(&t.port().to_be_bytes());
    s.write_all(&req).await.map_err(io_err("socks request"))?;
    let mut reply = [0u8; 2 + 10];
    s.read_exact(&mut reply)
        .await
        .map_err(io_err("socks reply"))?;
    if reply[3] != 0 {
        return Err(BenchError::Socks(proxy, reply[3]));
    }
    Ok(s)
}

/// Bytes per second over `streams` parallel connections moving `per_stream` bytes each,
/// downloading (`true`) or uploading.
pub async fn throughput(
    socks: Option<SocketAddr>,
    target: SocketAddr,
    streams: usize,
    per_stream: u64,
    download: bool,
) -> Result<f64, BenchError> {
    let mut conns = Vec::new();
    for _ in 0..streams {
        conns.push(connect(socks, target).await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut s in conns {
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0x33u8; 256 * 1024];
            if download {
                s.write_u8(CMD_DOWNLOAD).await?;
                s.write_u64(per_stream).await?;
                let mut got = 0u64;
                while got < per_stream {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    got += n as u64;
                }
                Ok::<u64, std::io::Error>(got)
            } else {
                s.write_u8(CMD_UPLOAD).await?;
                s.write_u64(per_stream).await?;
                let mut left = per_stream;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    s.write_all(&buf[..n]).await?;
                    left -= n as u64;
                }
                s.read_u8().await?;
                Ok(per_stream)
            }
        }));
    }
    let mut total = 0u64;
    for t in tasks {
        total += t
            .await
            .map_err(|e| BenchError::Setup(e.to_string()))?
            .map_err(io_err("transfer"))?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// What request/response exchanges of one size took on one system, gathered over the
/// blocks of [`round_trips`].
#[derive(Clone, Debug)]
pub struct Latency {
    /// Round-trip time of each exchange, µs.
    pub rtts: Vec<f64>,
    /// CPU seconds of the system's processes (both ends) over the exchanges; 0 for the
    /// direct connection, which has none. `/proc` counts in 10 ms ticks, so this means
    /// something only over thousands of exchanges (the full plan's 5000, not the quick
    /// plan's 500).
    pub cpu: CpuTime,
    /// TCP segments sent on the whole machine over the exchanges (`/proc/net/snmp`
    /// OutSegs, loopback counts both ways); `None` where the counter cannot be read.
    pub segments: Option<u64>,
}

impl Latency {
    /// An empty record, counting segments from zero.
    fn new() -> Self {
        Self {
            rtts: Vec::new(),
            cpu: CpuTime::default(),
            segments: Some(0),
        }
    }

    /// Adds what one block cost: `cpu` time, and the OutSegs counter before and after
    /// it (a counter that went backwards adds 0; one that could not be read loses the
    /// count for good).
    fn add_cost(&mut self, cpu: CpuTime, (before, after): (Option<u64>, Option<u64>)) {
        self.cpu = self.cpu + cpu;
        self.segments = match (self.segments, before, after) {
            (Some(sum), Some(a), Some(b)) => Some(sum + b.saturating_sub(a)),
            _ => None,
        };
    }

    /// What one exchange cost (NaN segments where the counter could not be read).
    pub fn per_exchange(&self) -> ExchangeCost {
        let n = self.rtts.len().max(1) as f64;
        ExchangeCost {
            cpu_us: self.cpu.total() * 1e6 / n,
            user_us: self.cpu.user * 1e6 / n,
            segments: self.segments.map_or(f64::NAN, |s| s as f64 / n),
        }
    }
}

/// What one request/response exchange cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExchangeCost {
    /// CPU µs of both ends, user and kernel.
    pub cpu_us: f64,
    /// The part of `cpu_us` spent in user space.
    pub user_us: f64,
    /// TCP segments sent on the whole machine.
    pub segments: f64,
}

/// Exchanges (warm-up) at the start of every block of [`round_trips`], not timed: the first
/// exchanges after a system was idle pay for cold caches and sleeping cores.
const BLOCK_WARM_UP: usize = 5;

/// One echo connection through a system, kept open across the blocks of [`round_trips`].
struct EchoLink {
    s: TcpStream,
    msg: Vec<u8>,
    back: Vec<u8>,
}

impl EchoLink {
    /// Connects through `sys` to the target's echo and runs 50 warm-up exchanges.
    async fn open(sys: &System, target: SocketAddr, size: usize) -> Result<Self, BenchError> {
        let mut s = connect(sys.socks, target).await?;
        s.write_u8(CMD_ECHO).await.map_err(io_err("echo"))?;
        let mut link = Self {
            s,
            msg: vec![7u8; size],
            back: vec![0u8; size],
        };
        for _ in 0..50 {
            link.exchange().await?;
        }
        Ok(link)
    }

    async fn exchange(&mut self) -> Result<(), BenchError> {
        self.s
            .write_all(&self.msg)
            .await
            .map_err(io_err("echo write"))?;
        self.s
            .read_exact(&mut self.back)
            .await
            .map_err(io_err("echo read"))?;
        Ok(())
    }

    /// Times `count` exchanges into `into`, with what they cost `sys`'s processes and the
    /// kernel's TCP.
    async fn block(
        &mut self,
        sys: &System,
        count: usize,
        into: &mut Latency,
    ) -> Result<(), BenchError> {
        for _ in 0..BLOCK_WARM_UP {
            self.exchange().await?;
        }
        let (cpu0, seg0) = (sys.cpu(), tcp_out_segments());
        for _ in 0..count {
            let t = Instant::now();
            self.exchange().await?;
            into.rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let (cpu1, seg1) = (sys.cpu(), tcp_out_segments());
        into.add_cost(cpu1 - cpu0, (seg0, seg1));
        Ok(())
    }
}

/// Times `plan.rtt_count` request/response exchanges of `size` bytes through each of
/// `systems`, in blocks of `plan.rtt_block` that take turns system by system. A shared
/// machine has fast and slow spells seconds long; taking turns this finely spreads each
/// spell over every system, so the ratios between them hold still from run to run.
async fn interleaved_latency(
    systems: &[System],
    target: SocketAddr,
    size: usize,
    plan: &Plan,
) -> Result<Vec<Latency>, BenchError> {
    let mut links = Vec::with_capacity(systems.len());
    // Which system failed is the first thing a failed run must say.
    let named = |sys: &System| {
        let name = sys.name.clone();
        move |e: BenchError| BenchError::Setup(format!("{name}: {e}"))
    };
    for sys in systems {
        links.push(
            EchoLink::open(sys, target, size)
                .await
                .map_err(named(sys))?,
        );
    }
    let mut out: Vec<Latency> = systems.iter().map(|_| Latency::new()).collect();
    let block = plan.rtt_block.max(1);
    let mut left = plan.rtt_count;
    while left > 0 {
        let n = left.min(block);
        for ((sys, link), into) in systems.iter().zip(&mut links).zip(&mut out) {
            link.block(sys, n, into).await.map_err(named(sys))?;
        }
        left -= n;
    }
    Ok(out)
}

/// The round trips of one round: 1-byte and 1 KiB exchanges through every system,
/// interleaved (see [`interleaved_latency`]); one `(1 B, 1 KiB)` pair per system, in the
/// order of `systems`.
pub async fn round_trips(
    systems: &[System],
    target: SocketAddr,
    plan: &Plan,
) -> Result<Vec<(Latency, Latency)>, BenchError> {
    let one = interleaved_latency(systems, target, 1, plan).await?;
    let kib = interleaved_latency(systems, target, 1024, plan).await?;
    Ok(one.into_iter().zip(kib).collect())
}

/// TCP segments this machine has sent (`/proc/net/snmp`), if readable.
fn tcp_out_segments() -> Option<u64> {
    parse_tcp_out_segments(&std::fs::read_to_string("/proc/net/snmp").ok()?)
}

/// The `Tcp: OutSegs` counter of a `/proc/net/snmp` text: the first `Tcp:` line names
/// the fields, the second holds their values.
fn parse_tcp_out_segments(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let at = names.split_whitespace().position(|f| f == "OutSegs")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// New connections per second (connect, one echo byte, close), `parallel` at a time.
pub async fn connection_rate(
    socks: Option<SocketAddr>,
    target: SocketAddr,
    parallel: usize,
    duration: Duration,
) -> Result<f64, BenchError> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < duration {
                let mut s = connect(socks, target).await?;
                s.write_all(&[CMD_ECHO, 1])
                    .await
                    .map_err(io_err("cps write"))?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.map_err(io_err("cps read"))?;
                n += 1;
            }
            Ok::<u64, BenchError>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| BenchError::Setup(e.to_string()))??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// The value at quantile `q` (0..=1) of `v` (sorted in place).
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

/// Median of a list.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    quantile(&mut v, 0.5)
}

/// One round of every measurement on one system.
#[derive(Clone, Debug, Default)]
pub struct Round {
    /// Download, 1 stream, bytes/s.
    pub down1: f64,
    /// Upload, 1 stream, bytes/s.
    pub up1: f64,
    /// Download, 8 streams, bytes/s.
    pub down8: f64,
    /// Upload, 8 streams, bytes/s.
    pub up8: f64,
    /// Download, 64 streams, bytes/s.
    pub down64: f64,
    /// Upload, 64 streams, bytes/s.
    pub up64: f64,
    /// RTT 1 B p50 / p99, µs.
    pub rtt1: (f64, f64),
    /// RTT 1 KiB p50 / p99, µs.
    pub rtt1k: (f64, f64),
    /// CPU µs of both ends per 1-byte round trip.
    pub rtt1_cpu_us: f64,
    /// The user-space part of [`Round::rtt1_cpu_us`].
    pub rtt1_user_us: f64,
    /// TCP segments sent (machine-wide) per 1-byte round trip.
    pub rtt1_segments: f64,
    /// New connections per second.
    pub cps: f64,
    /// CPU seconds of both ends per GB moved in the throughput tests.
    pub cpu_per_gb: f64,
}

/// Sizes of one round.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Bytes per single-stream transfer.
    pub single: u64,
    /// Bytes per stream in the 8-stream transfers.
    pub per8: u64,
    /// Bytes per stream in the 64-stream transfer.
    pub per64: u64,
    /// Exchanges per latency measurement.
    pub rtt_count: usize,
    /// Exchanges per turn when the systems take turns at the latency measurement.
    pub rtt_block: usize,
    /// Duration of the connection-rate measurement.
    pub cps_time: Duration,
}

impl Plan {
    /// Full-size plan (about 5 GB per system per round).
    pub fn full() -> Self {
        Self {
            single: 1 << 30,
            per8: 128 << 20,
            per64: 16 << 20,
            rtt_count: 5000,
            rtt_block: 250,
            cps_time: Duration::from_secs(3),
        }
    }

    /// A quick plan for smoke runs.
    pub fn quick() -> Self {
        Self {
            single: 64 << 20,
            per8: 8 << 20,
            per64: 1 << 20,
            rtt_count: 500,
            rtt_block: 100,
            cps_time: Duration::from_millis(500),
        }
    }
}

/// `bytes` in MiB, to one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// CPU and idle counters at the start of a phase, for the per-phase report that
/// `HALFPIPE_BENCH_PHASES=1` turns on: where the cores went while the phase ran.
struct Probe {
    t: Instant,
    ends: Vec<f64>,
    me: f64,
    idle: (f64, f64),
}

/// Idle (idle + iowait) and total jiffies of the whole machine, from `/proc/stat`.
fn machine_idle() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let l = s.lines().next().unwrap_or_default();
    let v: Vec<f64> = l
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    (
        v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0),
        total,
    )
}

impl Probe {
    /// Reads the counters now, when `HALFPIPE_BENCH_PHASES` asks for the report.
    fn start(sys: &System) -> Option<Self> {
        std::env::var_os("HALFPIPE_BENCH_PHASES")?;
        Some(Self {
            t: Instant::now(),
            ends: sys
                .children
                .iter()
                .map(|c| proc_cpu_seconds(c.id()))
                .collect(),
            me: proc_cpu_seconds(std::process::id()),
            idle: machine_idle(),
        })
    }

    /// Prints the phase's rate, each end's and the bench's CPU in cores, and the machine's
    /// idle share since [`Probe::start`].
    fn report(&self, sys: &System, what: &str, bytes: u64) {
        let dt = self.t.elapsed().as_secs_f64();
        let ends: Vec<String> = sys
            .children
            .iter()
            .zip(&self.ends)
            .map(|(c, a)| format!("{:.2}", (proc_cpu_seconds(c.id()) - a) / dt))
            .collect();
        let me = (proc_cpu_seconds(std::process::id()) - self.me) / dt;
        let (i1, t1) = machine_idle();
        let idle = (i1 - self.idle.0) / (t1 - self.idle.1).max(1.0);
        // The peak so far, so the phase that raised an end's peak is the first to show it.
        let peaks: Vec<String> = sys.peak_rss().into_iter().map(mib).collect();
        let rate = match bytes {
            0 => String::new(),
            _ => format!(" {:.3} GB/s,", bytes as f64 / dt / 1e9),
        };
        eprintln!(
            "PHASE {} {what}:{rate} ends cores {ends:?}, bench cores {me:.2}, machine idle {:.0}%, ends peak RSS MiB so far {peaks:?}",
            sys.name,
            idle * 100.0
        );
    }
}

/// Runs `phase` (moving `bytes`) under a [`Probe`] when the per-phase report is on.
async fn probed<T>(
    sys: &System,
    what: String,
    bytes: u64,
    phase: impl std::future::Future<Output = T>,
) -> T {
    let probe = Probe::start(sys);
    let out = phase.await;
    if let Some(p) = probe {
        p.report(sys, &what, bytes);
    }
    out
}

/// Runs one round of the transfers and the connection rate against `sys`; its round
/// trips are measured for all systems at once by [`round_trips`] and added with
/// [`Round::with_round_trips`].
pub async fn round(sys: &System, target: SocketAddr, plan: &Plan) -> Result<Round, BenchError> {
    let s = sys.socks;
    let cpu0 = sys.cpu_seconds();
    let transfer = |streams: usize, per_stream: u64, down: bool| {
        let what = format!("{}{streams}", if down { "down" } else { "up" });
        probed(
            sys,
            what,
            streams as u64 * per_stream,
            throughput(s, target, streams, per_stream, down),
        )
    };
    let down1 = transfer(1, plan.single, true).await?;
    let up1 = transfer(1, plan.single, false).await?;
    let down8 = transfer(8, plan.per8, true).await?;
    let up8 = transfer(8, plan.per8, false).await?;
    let down64 = transfer(64, plan.per64, true).await?;
    let up64 = transfer(64, plan.per64, false).await?;
    let cpu = sys.cpu_seconds() - cpu0;
    let moved = (2 * (plan.single + 8 * plan.per8 + 64 * plan.per64)) as f64;
    let cps = probed(
        sys,
        "conn".into(),
        0,
        connection_rate(s, target, 8, plan.cps_time),
    )
    .await?;
    Ok(Round {
        down1,
        up1,
        down8,
        up8,
        down64,
        up64,
        cps,
        cpu_per_gb: cpu / (moved / 1e9),
        ..Round::default()
    })
}

impl Round {
    /// This round with its round-trip figures, from [`round_trips`].
    pub fn with_round_trips(self, (mut one, mut kib): (Latency, Latency)) -> Self {
        let cost = one.per_exchange();
        Self {
            rtt1: (quantile(&mut one.rtts, 0.5), quantile(&mut one.rtts, 0.99)),
            rtt1k: (quantile(&mut kib.rtts, 0.5), quantile(&mut kib.rtts, 0.99)),
            rtt1_cpu_us: cost.cpu_us,
            rtt1_user_us: cost.user_us,
            rtt1_segments: cost.segments,
            ..self
        }
    }
}

/// Medians over rounds, plus peak memory.
#[derive(Clone, Debug)]
pub struct Summary {
    /// System name.
    pub name: String,
    /// Median of each field.
    pub median: Round,
    /// Peak RSS of each process (client end first).
    pub peak_rss: Vec<u64>,
}

impl Summary {
    /// Whether the system has processes of its own (a tunnel's ends) whose CPU and
    /// memory were measured; the direct connection has none.
    pub fn has_ends(&self) -> bool {
        !self.peak_rss.is_empty()
    }
}

/// Medians of every field over `rounds`.
pub fn summarize(name: &str, rounds: &[Round], peak_rss: Vec<u64>) -> Summary {
    let m = |f: fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    Summary {
        name: name.to_owned(),
        median: Round {
            down1: m(|r| r.down1),
            up1: m(|r| r.up1),
            down8: m(|r| r.down8),
            up8: m(|r| r.up8),
            down64: m(|r| r.down64),
            up64: m(|r| r.up64),
            rtt1: (m(|r| r.rtt1.0), m(|r| r.rtt1.1)),
            rtt1k: (m(|r| r.rtt1k.0), m(|r| r.rtt1k.1)),
            rtt1_cpu_us: m(|r| r.rtt1_cpu_us),
            rtt1_user_us: m(|r| r.rtt1_user_us),
            rtt1_segments: m(|r| r.rtt1_segments),
            cps: m(|r| r.cps),
            cpu_per_gb: m(|r| r.cpu_per_gb),
        },
        peak_rss,
    }
}

/// Renders summaries as a Markdown table, with ratios against the first tunnel named
/// `reference` when present.
pub fn render(summaries: &[Summary]) -> String {
    let gbs = |v: f64| format!("{:.2}", v / 1e9);
    let mut out = String::from(
        "| system | down 1 GB/s | up 1 GB/s | down 8 GB/s | up 8 GB/s | down 64 GB/s | up 64 GB/s | RTT 1 B p50/p99 µs | RTT 1 KiB p50/p99 µs | 1 B round trip: CPU µs (both ends, user part), TCP segments | conn/s | CPU-s/GB (both ends) | peak RSS MiB (client, server) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in summaries {
        let m = &s.median;
        let rss: Vec<String> = s.peak_rss.iter().copied().map(mib).collect();
        let (cpu, rt_cpu) = if s.has_ends() {
            (
                format!("{:.2}", m.cpu_per_gb),
                format!("{:.1} ({:.1} user)", m.rtt1_cpu_us, m.rtt1_user_us),
            )
        } else {
            ("-".to_string(), "-".to_string())
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0}/{:.0} | {:.0}/{:.0} | {rt_cpu}, {:.2} | {:.0} | {} | {} |\n",
            s.name,
            gbs(m.down1),
            gbs(m.up1),
            gbs(m.down8),
            gbs(m.up8),
            gbs(m.down64),
            gbs(m.up64),
            m.rtt1.0,
            m.rtt1.1,
            m.rtt1k.0,
            m.rtt1k.1,
            m.rtt1_segments,
            m.cps,
            cpu,
            if rss.is_empty() {
                "-".into()
            } else {
                rss.join(", ")
            }
        ));
    }
    out
}

/// Ratios of `a` over `b` for the headline figures, as one Markdown line. CPU is
/// compared only when both sides have processes to measure.
pub fn ratios(a: &Summary, b: &Summary) -> String {
    let (x, y) = (&a.median, &b.median);
    let cpu = if a.has_ends() && b.has_ends() {
        format!(
            ", CPU-s/GB {:.2}x, CPU per round trip {:.2}x (user {:.2}x)",
            x.cpu_per_gb / y.cpu_per_gb,
            x.rtt1_cpu_us / y.rtt1_cpu_us,
            x.rtt1_user_us / y.rtt1_user_us
        )
    } else {
        String::new()
    };
    format!(
        "{} vs {}: down1 {:.2}x, up1 {:.2}x, down8 {:.2}x, up8 {:.2}x, down64 {:.2}x, up64 {:.2}x, RTT1 p50 {:.2}x, p99 {:.2}x, conn/s {:.2}x{cpu}\n",
        a.name,
        b.name,
        x.down1 / y.down1,
        x.up1 / y.up1,
        x.down8 / y.down8,
        x.up8 / y.up8,
        x.down64 / y.down64,
        x.up64 / y.up64,
        x.rtt1.0 / y.rtt1.0,
        x.rtt1.1 / y.rtt1.1,
        x.cps / y.cps,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "Ip: Forwarding DefaultTTL InReceives\nIp: 1 64 1000\n\
        Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n\
        Tcp: 1 200 120000 -1 2290 1147 3 38 6 9873312 9879445 12 0 55 0\n\
        Udp: InDatagrams NoPorts\nUdp: 5 0\n";

    #[test]
    fn out_segments_are_read_from_the_tcp_lines_by_name() {
        assert_eq!(parse_tcp_out_segments(SNMP), Some(9_879_445));
        // Fields found by name, not by position.
        let moved = "Tcp: OutSegs InSegs\nTcp: 42 7\n";
        assert_eq!(parse_tcp_out_segments(moved), Some(42));
    }

    #[test]
    fn out_segments_missing_or_garbled_give_none() {
        assert_eq!(parse_tcp_out_segments(""), None);
        assert_eq!(parse_tcp_out_segments("Tcp: InSegs OutSegs\n"), None);
        assert_eq!(parse_tcp_out_segments("Tcp: InSegs\nTcp: 5\n"), None);
        assert_eq!(parse_tcp_out_segments("Tcp: OutSegs\nTcp: many\n"), None);
        assert_eq!(
            parse_tcp_out_segments("Tcp: InSegs OutSegs\nTcp: 5\n"),
            None
        );
    }

    #[test]
    fn round_trip_cost_adds_up_over_blocks_and_says_nan_for_a_missing_counter() {
        let with_rtts = |n: usize| Latency {
            rtts: vec![100.0; n],
            ..Latency::new()
        };
        let cpu = |user: f64, system: f64| CpuTime { user, system };
        let cost = |cpu_us: f64, user_us: f64, segments: f64| ExchangeCost {
            cpu_us,
            user_us,
            segments,
        };
        let mut l = with_rtts(5000);
        l.add_cost(cpu(0.05, 0.25), (Some(1000), Some(31_000)));
        l.add_cost(cpu(0.05, 0.05), (Some(50_000), Some(60_000)));
        assert_eq!(l.per_exchange(), cost(80.0, 20.0, 8.0));
        // A counter that went backwards adds nothing.
        l.add_cost(CpuTime::default(), (Some(9), Some(3)));
        assert_eq!(l.per_exchange(), cost(80.0, 20.0, 8.0));
        // One unreadable counter loses the count for good.
        l.add_cost(CpuTime::default(), (None, Some(5)));
        l.add_cost(CpuTime::default(), (Some(1), Some(5)));
        let c = l.per_exchange();
        assert_eq!((c.cpu_us, c.user_us), (80.0, 20.0));
        assert!(c.segments.is_nan());
        // No exchanges: no division by zero.
        assert_eq!(with_rtts(0).per_exchange(), cost(0.0, 0.0, 0.0));
    }

    #[test]
    fn proc_stat_gives_user_and_kernel_time_apart() {
        // A command name with spaces and a parenthesis must not shift the fields.
        let stat = "42 (halfpipe (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3";
        assert_eq!(
            parse_proc_cpu(stat),
            CpuTime {
                user: 2.5,
                system: 0.75
            }
        );
        assert_eq!(parse_proc_cpu("garbage"), CpuTime::default());
        assert_eq!(parse_proc_cpu("1 (x) S 1"), CpuTime::default());
    }

    fn summary(name: &str, ends: bool, rtt1_cpu_us: f64) -> Summary {
        Summary {
            name: name.into(),
            median: Round {
                down1: 1e9,
                up1: 1e9,
                down8: 1e9,
                up8: 1e9,
                down64: 1e9,
                up64: 1e9,
                rtt1: (100.0, 150.0),
                rtt1k: (110.0, 160.0),
                rtt1_cpu_us,
                rtt1_user_us: rtt1_cpu_us / 4.0,
                rtt1_segments: 6.0,
                cps: 4000.0,
                cpu_per_gb: 1.5,
            },
            peak_rss: if ends {
                vec![20 << 20, 25 << 20]
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn every_table_row_has_the_header_s_columns_and_round_trip_cost() {
        let table = render(&[summary("direct", false, 0.0), summary("tunnel", true, 80.0)]);
        let lines: Vec<&str> = table.lines().collect();
        let columns = |l: &str| l.matches('|').count();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines.iter().all(|l| columns(l) == columns(lines[0])),
            "{table}"
        );
        assert!(lines[2].contains("| -, 6.00 |"), "{table}");
        assert!(lines[3].contains("| 80.0 (20.0 user), 6.00 |"), "{table}");
    }

    #[test]
    fn ratios_compare_round_trip_cpu_only_between_measured_ends() {
        let (direct, a, b) = (
            summary("direct", false, 0.0),
            summary("a", true, 90.0),
            summary("b", true, 60.0),
        );
        assert!(ratios(&a, &b).contains("CPU per round trip 1.50x (user 1.50x)"));
        assert!(!ratios(&a, &direct).contains("CPU per round trip"));
    }
}

//! The round-trip floor of split legs: two plain relays (no framing, no crypto, no async
//! runtime, a blocking thread per direction) between a client and an echo server, joined
//! either by **one** TCP connection carrying both directions or by **two** one-way
//! connections, as halfpipe's uplink and downlink are. Everything else is identical, so the
//! ratio of their 1-byte round trips is what one-way legs cost on this machine, before any
//! of halfpipe's own work. A benchmark, not a test; loopback only:
//!
//! ```sh
//! cargo run --release -p halfpipe --example split_floor            # 5 alternations of 20 000
//! cargo run --release -p halfpipe --example split_floor -- 10 50000
//! ```

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::Instant;

/// A connected pair of loopback sockets: (the connecting end, the accepted end).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
    let a = TcpStream::connect(l.local_addr().unwrap()).expect("connect on loopback");
    let (b, _) = l.accept().expect("accept on loopback");
    for s in [&a, &b] {
        s.set_nodelay(true).unwrap();
        // A chain that stops answering ends the run instead of hanging it.
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
    }
    (a, b)
}

/// Copies `from` into `to` until `from` ends.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Builds app → relay A → relay B → echo and back; returns the app's socket.
fn chain(split: bool) -> TcpStream {
    let (app, a_in) = pair();
    let (b_out, echo) = pair();
    // Between the relays: one connection both ways, or one per direction.
    let (up_a, up_b) = pair();
    let (down_b, down_a) = if split {
        pair()
    } else {
        (up_b.try_clone().unwrap(), up_a.try_clone().unwrap())
    };
    let spawn = |from: &TcpStream, to: &TcpStream| {
        let (f, t) = (from.try_clone().unwrap(), to.try_clone().unwrap());
        thread::spawn(move || pump(f, t));
    };
    spawn(&a_in, &up_a); // relay A, up
    spawn(&down_a, &a_in); // relay A, down
    spawn(&up_b, &b_out); // relay B, up
    spawn(&b_out, &down_b); // relay B, down
    spawn(&echo, &echo); // the echo server
    app
}

/// 1-byte round trips through a fresh chain: (p50, p99) in µs after 1 000 warm-up ones.
fn measure(split: bool, count: usize) -> (f64, f64) {
    let mut app = chain(split);
    let mut rtts = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for i in 0..count + 1000 {
        let t = Instant::now();
        app.write_all(&[i as u8]).unwrap();
        app.read_exact(&mut byte).unwrap();
        if i >= 1000 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let _ = app.shutdown(Shutdown::Both);
    rtts.sort_by(f64::total_cmp);
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let rounds = args.next().and_then(Result::ok).unwrap_or(5);
    let count = args.next().and_then(Result::ok).unwrap_or(20_000);
    let mut ratios = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let one = measure(false, count);
        let two = measure(true, count);
        println!(
            "round {round}: one connection p50 {:.1} µs p99 {:.1} µs; two one-way connections p50 {:.1} µs p99 {:.1} µs; ratio p50 {:.3} p99 {:.3}",
            one.0, one.1, two.0, two.1, two.0 / one.0, two.1 / one.1
        );
        ratios.0.push(two.0 / one.0);
        ratios.1.push(two.1 / one.1);
    }
    for r in [&mut ratios.0, &mut ratios.1] {
        r.sort_by(f64::total_cmp);
    }
    println!(
        "median ratio, two one-way connections ÷ one: p50 {:.3}, p99 {:.3}",
        ratios.0[ratios.0.len() / 2],
        ratios.1[ratios.1.len() / 2]
    );
}

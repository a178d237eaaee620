//! A small real HTTP/1.1 (and UDP echo) server for the integration tests:
//! one thread per connection, keep-alive, and answers that name the server.
//!
//! Usage: xdplb-test-server --name NAME --listen ADDR:PORT [--listen ...]
//!        [--status-file PATH] [--udp]
//! GET /          → 200 (or the code in --status-file) with body "NAME\n"
//! GET /bytes/N   → N bytes of a deterministic pattern
//! UDP datagrams  → echoed back prefixed with "NAME:"

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::Arc,
    thread,
};

struct Opts {
    name: String,
    listen: Vec<SocketAddr>,
    status_file: Option<PathBuf>,
    udp: bool,
}

fn opts() -> Opts {
    let mut o = Opts { name: "server".into(), listen: Vec::new(), status_file: None, udp: false };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--name" => o.name = args.next().expect("--name NAME"),
            "--listen" => o.listen.push(args.next().expect("--listen ADDR:PORT").parse().expect("ADDR:PORT")),
            "--status-file" => o.status_file = Some(args.next().expect("--status-file PATH").into()),
            "--udp" => o.udp = true,
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(!o.listen.is_empty(), "give at least one --listen ADDR:PORT");
    o
}

use tests::topology::pattern;

fn status(o: &Opts) -> u16 {
    o.status_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(200)
}

fn serve(o: &Opts, stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut close = line.contains("HTTP/1.0");
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            if h.to_ascii_lowercase().starts_with("connection: close") {
                close = true;
            }
        }
        let code = status(o);
        let reason = if code == 200 { "OK" } else { "Status" };
        if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<u64>().ok()) {
            write!(out, "HTTP/1.1 {code} {reason}\r\nX-Backend: {}\r\nContent-Length: {n}\r\n\r\n", o.name)?;
            let mut buf = vec![0u8; 65_536];
            let mut sent = 0u64;
            while sent < n {
                let len = (n - sent).min(buf.len() as u64) as usize;
                for (i, b) in buf[..len].iter_mut().enumerate() {
                    *b = pattern(sent + i as u64);
                }
                out.write_all(&buf[..len])?;
                sent += len as u64;
            }
        } else {
            let body = format!("{}\n", o.name);
            write!(
                out,
                "HTTP/1.1 {code} {reason}\r\nX-Backend: {}\r\nContent-Length: {}\r\n{}\r\n{body}",
                o.name,
                body.len(),
                if close { "Connection: close\r\n" } else { "" }
            )?;
        }
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

fn main() {
    let o = Arc::new(opts());
    let mut handles = Vec::new();
    for addr in o.listen.clone() {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
        let o2 = o.clone();
        handles.push(thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let o3 = o2.clone();
                thread::spawn(move || {
                    let _ = serve(&o3, conn);
                });
            }
        }));
        if o.udp {
            let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("cannot bind UDP {addr}: {e}"));
            let name = o.name.clone();
            handles.push(thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let mut reply = format!("{name}:").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&reply, peer);
                }
            }));
        }
    }
    eprintln!("{} listening on {:?}", o.name, o.listen);
    for h in handles {
        let _ = h.join();
    }
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}

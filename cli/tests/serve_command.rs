//! `tier0 serve data` as an operator runs it: a real process on a store file, a client over
//! TCP, Prometheus metrics over HTTP, a clean stop on SIGTERM, and the data still there after
//! a restart.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tier0_client::DaemonConnection;
use tier0_dataplane::store::ChunkId;

const TOKEN: &str = "serve-test-token";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the daemon and returns it with the address it printed.
fn serve(store: &std::path::Path, metrics: u16) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args([
            "serve",
            "data",
            "--listen",
            "127.0.0.1:0",
            "--node",
            "serve-test",
        ])
        .args(["--store-size", "64MiB", "--chunk-size", "1MiB", "--no-pin"])
        .args(["--workers-per-node", "1", "--buffers", "8"])
        .arg("--store")
        .arg(store)
        .arg("--metrics")
        .arg(format!("127.0.0.1:{metrics}"))
        .env("TIER0_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tier0 serve data");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, addr)
}

fn connect(addr: SocketAddr) -> DaemonConnection {
    DaemonConnection::connect(
        addr,
        TOKEN.as_bytes(),
        "serve-test",
        Duration::from_secs(10),
    )
    .unwrap()
}

fn stop(mut child: Child) {
    // SAFETY: kill sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "daemon exited with {status}");
}

fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn serves_chunks_exports_metrics_stops_cleanly_and_keeps_data_across_restarts() {
    let dir = std::env::temp_dir().join(format!("tier0-serve-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = dir.join("store");
    let chunk = ChunkId {
        file: 42,
        index: 0,
        generation: 1,
    };
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();

    let metrics = free_port();
    let (daemon, addr) = serve(&store, metrics);
    let mut client = connect(addr);
    assert_eq!(client.node(), "serve-test");
    client.write(chunk, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    client.read_into(chunk, 0, &mut back).unwrap();
    assert!(back == data);
    let exported = scrape(metrics);
    assert!(
        exported.contains("tier0_dataplane_ops_total"),
        "metrics: {exported}"
    );
    drop(client);
    stop(daemon);

    let (daemon, addr) = serve(&store, free_port());
    let mut client = connect(addr);
    let mut again = vec![0u8; 1000];
    client.read_into(chunk, 299_000, &mut again).unwrap();
    assert!(again == data[299_000..]);
    drop(client);
    stop(daemon);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_daemon_without_a_token_or_with_a_bad_store_says_why_and_exits() {
    let output = Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args(["serve", "data", "--store", "/nonexistent/dir/store"])
        .env_remove("TIER0_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no cluster token"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args(["serve", "data", "--listen", "127.0.0.1:0", "--no-pin"])
        .args(["--store", "/nonexistent/dir/store"])
        .env("TIER0_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/dir/store"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

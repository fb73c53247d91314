//! Sender and receiver in two network namespaces joined by a veth pair (10.77.0.1/24 and
//! 10.77.0.2/24, only inside namespaces this test creates), UCX_TLS=tcp and UCX_NET_DEVICES
//! set to each side's veth. Skips, saying why, where namespaces cannot be created (not root,
//! no `ip`, kernel refuses). The namespaces (and with them the veth pair) are always deleted.

mod common;

use std::io::BufReader;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{peer_exe, peer_line};

struct Netns {
    names: Vec<String>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            // deleting a namespace also deletes the veth end inside it, and so the pair
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    match Command::new("ip")
        .args(args)
        .stderr(Stdio::piped())
        .output()
    {
        Ok(Output { status, .. }) if status.success() => Ok(()),
        Ok(o) => Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("ip: {e}")),
    }
}

fn sysfs(ns: &str, dev: &str, what: &str) -> String {
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "cat",
            &format!("/sys/class/net/{dev}/{what}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn rx_bytes(ns: &str, dev: &str) -> u64 {
    sysfs(ns, dev, "statistics/rx_bytes").parse().unwrap_or(0)
}

#[test]
fn active_messages_across_network_namespaces() {
    let id = std::process::id() % 100_000;
    let (ns_a, ns_b) = (format!("bsucx{id}a"), format!("bsucx{id}b"));
    let (dev_a, dev_b) = (format!("bsu{id}a"), format!("bsu{id}b"));
    let mut guard = Netns { names: vec![] };
    if let Err(e) = ip(&["netns", "add", &ns_a]) {
        println!("SKIP active_messages_across_network_namespaces: cannot create a network namespace ({e})");
        return;
    }
    guard.names.push(ns_a.clone());
    ip(&["netns", "add", &ns_b]).unwrap();
    guard.names.push(ns_b.clone());
    let setup = || -> Result<(), String> {
        ip(&[
            "link", "add", &dev_a, "netns", &ns_a, "type", "veth", "peer", "name", &dev_b, "netns",
            &ns_b,
        ])?;
        for (ns, dev, addr) in [
            (&ns_a, &dev_a, "10.77.0.1/24"),
            (&ns_b, &dev_b, "10.77.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    };
    if let Err(e) = setup() {
        println!("SKIP active_messages_across_network_namespaces: veth pair refused ({e})");
        return;
    }

    // UCX only uses an interface that is running: a veth pair gets its carrier shortly
    // after both ends are up.
    for _ in 0..100 {
        if sysfs(&ns_a, &dev_a, "operstate") == "up" && sysfs(&ns_b, &dev_b, "operstate") == "up" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rx_before = rx_bytes(&ns_b, &dev_b);
    let mut receiver = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns_b,
            peer_exe(),
            "recv",
            "10.77.0.2:0",
            "2",
            "--dev",
            &dev_b,
        ])
        .env("UCX_TLS", "tcp")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn receiver");
    let mut out = BufReader::new(receiver.stdout.take().unwrap());
    let line = peer_line(&mut out);
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("receiver said {line:?}"))
        .to_owned();
    assert!(addr.starts_with("10.77.0.2:"), "{addr}");

    let sizes = ["4096", &(8usize << 20).to_string()];
    let sender = Command::new("ip")
        .args(["netns", "exec", &ns_a, peer_exe(), "send", &addr])
        .args(sizes)
        .args(["--dev", &dev_a])
        .env("UCX_TLS", "tcp")
        .output()
        .expect("run sender");
    let sent: String = String::from_utf8_lossy(&sender.stdout)
        .lines()
        .filter(|l| !l.contains(" UCX "))
        .map(|l| format!("{l}\n"))
        .collect();
    eprintln!("sender: {sent}{}", String::from_utf8_lossy(&sender.stderr));

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = String::new();
        loop {
            let l = peer_line(&mut out);
            if l.is_empty() {
                break;
            }
            rest += &l;
        }
        let _ = tx.send(rest);
    });
    let got = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    let _ = receiver.kill();
    let status = receiver.wait().unwrap();
    eprintln!("receiver: {got}");
    assert!(sender.status.success(), "sender failed: {sent}");
    assert_eq!(
        sent.lines().collect::<Vec<_>>(),
        ["sent 4096", "sent 8388608"]
    );
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        ["ok 4096", "ok 8388608"],
        "receiver status {status}"
    );
    // The bytes crossed the veth pair (not shared memory, not loopback).
    let crossed = rx_bytes(&ns_b, &dev_b) - rx_before;
    eprintln!("{dev_b} received {crossed} bytes");
    assert!(crossed >= 8 << 20, "only {crossed} bytes crossed {dev_b}");
}
